"""Prompt templates of the auto-annotation pipeline (ARCHITECTURE.md section 6) and their formatting.

Templates use named placeholders in braces (``{raw caption}``, ``{caption}``). They are filled by plain
string replacement rather than ``str.format`` so that templates may contain literal JSON braces (the
extraction prompt shows a JSON example) without escaping.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

RAW_CAPTION_FIELD = "{raw caption}"
CAPTION_FIELD = "{caption}"

# [paper] Step 1, verbatim from the DetCLIPv3 paper.
DEFAULT_RECAPTION_PROMPT = (
    "Given a noisy caption of the image: {raw caption}, write a detailed clean description of the image."
)

# [paper] Step 2a: keep only what can be observed. The last two sentences are the paper's; the rest is ours.
DEFAULT_FILTER_PROMPT = (
    "Here is a description of an image: {caption}\n"
    "Keep only the facts that can be directly observed in the image. Remove guesses, opinions, feelings, "
    "intentions, background knowledge and anything else that cannot be seen. Return solely the result "
    "without any other contents. If you think there is no factual description, just return 'None'."
)

# [decision] Step 2b: ask for JSON with the paper's three fields, spelled as the paper spells them.
DEFAULT_EXTRACT_PROMPT = (
    "Here is a description of an image: {caption}\n"
    "List every object entity mentioned in the description. For each entity give its phrase (the words of "
    "the description that name it, with their attributes), its category (a short noun) and its parent "
    "category (a more general class). Answer with a JSON list of objects with the keys \"phrase\", "
    "\"category\" and \"parent category\", for example "
    '[{"phrase": "red double-decker bus", "category": "bus", "parent category": "vehicle"}]. '
    "Return solely the JSON list without any other contents. If there is no entity, return []."
)

# [decision] Step 3: one question asking a VLLM for steps 1 and 2 at once; `<image>` is LLaVA's image slot.
DEFAULT_INSTRUCTION_PROMPT = (
    "<image>\nGiven a noisy caption of the image: {raw caption}, write a detailed clean description of "
    "the image and list the objects that can be observed in it. Answer with a JSON object with the keys "
    '"caption" (the description) and "entities" (a list of objects with the keys "phrase", "category" and '
    '"parent category").'
)


def format_prompt(template: str, **fields: str) -> str:
    """Fills the named placeholders of `template`.

    Args:
        template: text with placeholders such as ``{raw caption}`` or ``{caption}``.
        **fields: placeholder name (underscores stand for spaces: ``raw_caption`` fills ``{raw caption}``
            and ``{raw_caption}``) to the text that replaces it.

    Returns:
        The template with every given placeholder replaced.

    Raises:
        TypeError: when the template or a field value is not a string.
        ValueError: when a given placeholder does not occur in the template.
    """
    if not isinstance(template, str):
        raise TypeError(f"prompt template must be a str, got {type(template).__name__}")
    out = template
    for name, value in fields.items():
        if not isinstance(value, str):
            raise TypeError(f"prompt field {name!r} must be a str, got {type(value).__name__}")
        spellings = {"{" + name + "}", "{" + name.replace("_", " ") + "}"}
        present = [s for s in spellings if s in out]
        if not present:
            raise ValueError(
                f"prompt template has no placeholder {sorted(spellings)}; template starts with {template[:80]!r}"
            )
        for spelling in present:
            out = out.replace(spelling, value)
    return out


def _check_placeholder(name: str, template: str, placeholder: str) -> None:
    if not isinstance(template, str):
        raise TypeError(f"{name} must be a str, got {type(template).__name__}")
    if placeholder not in template and placeholder.replace(" ", "_") not in template:
        raise ValueError(f"{name} must contain the placeholder {placeholder}; got {template[:80]!r}")


@dataclass(frozen=True)
class PromptTemplates:
    """The four prompt templates of the pipeline; every one is user-configurable.

    Attributes:
        recaption: step 1, must contain ``{raw caption}``.
        filter: step 2a, must contain ``{caption}``.
        extract: step 2b, must contain ``{caption}`` (filled with the filtered description).
        instruction: step 3 question, must contain ``{raw caption}``.
    """

    recaption: str = DEFAULT_RECAPTION_PROMPT
    filter: str = DEFAULT_FILTER_PROMPT
    extract: str = DEFAULT_EXTRACT_PROMPT
    instruction: str = DEFAULT_INSTRUCTION_PROMPT

    def __post_init__(self) -> None:
        _check_placeholder("recaption prompt", self.recaption, RAW_CAPTION_FIELD)
        _check_placeholder("filter prompt", self.filter, CAPTION_FIELD)
        _check_placeholder("extract prompt", self.extract, CAPTION_FIELD)
        _check_placeholder("instruction prompt", self.instruction, RAW_CAPTION_FIELD)

    def recaption_prompt(self, raw_caption: str) -> str:
        """Step 1 prompt for one noisy caption."""
        return format_prompt(self.recaption, raw_caption=raw_caption)

    def filter_prompt(self, caption: str) -> str:
        """Step 2a prompt for one clean description."""
        return format_prompt(self.filter, caption=caption)

    def extract_prompt(self, facts: str) -> str:
        """Step 2b prompt for one filtered (observable-only) description."""
        return format_prompt(self.extract, caption=facts)

    def instruction_prompt(self, raw_caption: str) -> str:
        """Step 3 question for one noisy caption."""
        return format_prompt(self.instruction, raw_caption=raw_caption)

    def replace(self, **changes: str | None) -> PromptTemplates:
        """A copy with the given templates replaced; `None` values keep the current template."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def read_template_argument(value: str | None) -> str | None:
    """CLI helper: ``@path`` reads the template from a file, any other string is the template itself."""
    if value is None or not value.startswith("@"):
        return value
    path = Path(value[1:])
    if not path.is_file():
        raise ValueError(f"prompt template file {str(path)!r} does not exist")
    return path.read_text(encoding="utf-8")
