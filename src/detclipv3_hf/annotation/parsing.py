"""Robust parsing of language-model answers: the filtered description (step 2a) and the entity list (2b).

Language models wrap JSON in code fences, add prose before or after it, use Python quoting, leave
trailing commas, stop mid-list when they hit the token limit or answer ``None``. Every such answer maps
to a `ParseResult` with a status and a human-readable reason; nothing raises on a bad answer and
nothing is dropped silently.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

OK = "ok"
NO_FACTS = "no_facts"
NO_ENTITIES = "no_entities"
PARSE_FAILED = "parse_failed"

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_NONE_ANSWER = re.compile(r"""^[\s'"`*]*none[\s.!'"`*]*$""", re.IGNORECASE)
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_SNIPPET = 120

# Accepted spellings of the three entity fields after normalising keys (lower case, `_`/`-` -> space).
_PHRASE_KEYS = ("phrase", "entity phrase", "entity")
_CATEGORY_KEYS = ("category",)
_PARENT_KEYS = (
    "parent category",
    "parent",
    "parentcategory",
    "parent class",
    "super category",
    "supercategory",
)
_WRAPPER_KEYS = ("entities", "objects", "items", "result")


@dataclass(frozen=True)
class Entity:
    """One object entity named by a caption, with the paper's hierarchical label."""

    phrase: str
    category: str
    parent_category: str

    def to_record(self) -> dict[str, str]:
        """Field names of ARCHITECTURE.md section 5 (`parent_category`)."""
        return {"phrase": self.phrase, "category": self.category, "parent_category": self.parent_category}

    def to_prompt_json(self) -> dict[str, str]:
        """Field names the prompts ask for (`parent category`, as the paper spells it)."""
        return {"phrase": self.phrase, "category": self.category, "parent category": self.parent_category}


@dataclass(frozen=True)
class FilterResult:
    """Parsed step-2a answer: `facts` is the observable-only description, or None (status `no_facts`)."""

    facts: str | None
    status: str
    reason: str | None = None


@dataclass(frozen=True)
class EntityParseResult:
    """Parsed step-2b answer.

    Attributes:
        entities: the valid, de-duplicated entities (possibly empty).
        status: `ok` (at least one entity), `no_entities` (the model said there are none) or
            `parse_failed` (the answer could not be used).
        reason: why the status is not `ok`, or what was repaired/skipped on the way to `ok`; None if clean.
    """

    entities: tuple[Entity, ...]
    status: str
    reason: str | None = None


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= _SNIPPET else text[:_SNIPPET] + "...")


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"model answer must be a str, got {type(text).__name__}")
    return text


def strip_code_fences(text: str) -> str:
    """Returns the body of the first fenced code block (an unclosed fence runs to the end), else `text`."""
    match = _FENCE.search(text)
    return match.group(1) if match else text


def is_none_answer(text: str) -> bool:
    """True when the answer is just `None` (any case, optionally quoted or followed by a full stop)."""
    return bool(_NONE_ANSWER.match(text))


def parse_filter_answer(text: str) -> FilterResult:
    """Parses the step-2a answer (observable facts, or `None` when there are none).

    Returns:
        `ok` with the cleaned facts; `no_facts` when the model answered None; `parse_failed` when empty.
    """
    body = strip_code_fences(_check_text(text)).strip()
    if not body:
        return FilterResult(None, PARSE_FAILED, "empty answer")
    if is_none_answer(body):
        return FilterResult(None, NO_FACTS, "the model found no factual description")
    # Models often quote the rewritten text; the quotes are not part of the description.
    if len(body) >= 2 and body[0] == body[-1] and body[0] in "'\"":
        body = body[1:-1].strip()
    return FilterResult(body, OK, None)


def _is_apostrophe(text: str, i: int) -> bool:
    """Whether the single quote at ``text[i]`` sits between two letters (``man's``) and so is no delimiter."""
    return 0 < i < len(text) - 1 and text[i - 1].isalpha() and text[i + 1].isalpha()


def _scan(text: str):
    """Yields (index, char, depth_before) for bracket characters outside string literals.

    Strings may use double or single quotes; a single quote between two letters is an apostrophe
    (``man's``), not a string delimiter, because models write prose-like values in single-quoted JSON.
    """
    quote: str | None = None
    escaped = False
    depth = 0
    for i, ch in enumerate(text):
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                if not (quote == "'" and _is_apostrophe(text, i)):
                    quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{":
            yield i, ch, depth
            depth += 1
        elif ch in "]}":
            yield i, ch, depth
            depth -= 1
            if depth < 0:
                return


def _matching_close(text: str) -> int | None:
    """Index of the bracket closing text[0], or None when the text is truncated before it."""
    for i, ch, depth in _scan(text):
        if ch in "]}" and depth == 1:
            return i
    return None


def _complete_objects(text: str, level: int) -> list[str]:
    """The substrings of all complete ``{...}`` objects that open at nesting `level`."""
    objects: list[str] = []
    start: int | None = None
    for i, ch, depth in _scan(text):
        if ch == "{" and depth == level:
            start = i
        elif ch == "}" and depth == level + 1 and start is not None:
            objects.append(text[start : i + 1])
            start = None
    return objects


def _double_quoted(text: str) -> str:
    """``text`` with its single-quoted strings rewritten as JSON double-quoted strings, apostrophes inside them
    (``'man's hat'``, the rule of :func:`_scan`) kept as text and double quotes inside them escaped."""
    out: list[str] = []
    quote: str | None = None
    escaped = False
    for i, ch in enumerate(text):
        if quote is None:
            if ch in "\"'":
                quote = ch
                ch = '"'
        elif escaped:
            escaped = False
            if quote == "'" and ch == "'":
                out[-1] = ""  # JSON has no \' escape
        elif ch == "\\":
            escaped = True
        elif ch == quote and not (quote == "'" and _is_apostrophe(text, i)):
            quote = None
            ch = '"'
        elif quote == "'" and ch == '"':
            ch = '\\"'
        out.append(ch)
    return "".join(out)


def _loads(candidate: str) -> Any:
    """Strict JSON, then JSON without trailing commas, then Python literals (single quotes), then single-quoted
    JSON whose strings hold apostrophes (``'man's hat'``, which no Python parser reads); None if all fail."""
    for attempt in (candidate, _TRAILING_COMMA.sub(r"\1", candidate)):
        try:
            return json.loads(attempt)
        except (json.JSONDecodeError, RecursionError):
            pass
    python_like = re.sub(
        r"\bnull\b", "None", re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", candidate))
    )
    try:
        return ast.literal_eval(python_like)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(_TRAILING_COMMA.sub(r"\1", _double_quoted(candidate)))
    except (json.JSONDecodeError, RecursionError):
        return None


def _normalise_key(key: Any) -> str:
    return " ".join(str(key).strip().lower().replace("_", " ").replace("-", " ").split())


def _field(item: dict[str, Any], spellings: tuple[str, ...]) -> str | None:
    for key, value in item.items():
        if _normalise_key(key) in spellings and isinstance(value, str) and value.strip():
            return " ".join(value.split())
    return None


def entity_from_mapping(item: Any) -> Entity | str:
    """Builds an `Entity` from one parsed JSON item, or returns why it is invalid."""
    if not isinstance(item, dict):
        return f"item is a {type(item).__name__}, not an object"
    phrase = _field(item, _PHRASE_KEYS)
    category = _field(item, _CATEGORY_KEYS)
    parent = _field(item, _PARENT_KEYS)
    missing = [
        name
        for name, value in (("phrase", phrase), ("category", category), ("parent category", parent))
        if value is None
    ]
    if missing:
        return "missing or empty " + ", ".join(repr(m) for m in missing)
    return Entity(phrase, category, parent)  # type: ignore[arg-type]


def _items_from_value(value: Any) -> list[Any] | None:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        for key, inner in value.items():
            if _normalise_key(key) in _WRAPPER_KEYS and isinstance(inner, list):
                return inner
        return [value]
    return None


def _extract_items(body: str) -> tuple[list[Any] | None, str | None]:
    """Finds the JSON list (or object) in `body`; returns its items and a note on any repair."""
    starts = [i for i in (body.find("["), body.find("{")) if i >= 0]
    if not starts:
        return None, "no JSON list or object found in answer " + _snippet(body)
    text = body[min(starts) :]
    close = _matching_close(text)
    if close is not None:
        items = _items_from_value(_loads(text[: close + 1]))
        if items is not None:
            return items, None
    # Truncated or malformed as a whole: salvage every complete object inside the outer bracket.
    level = 1 if text[0] == "[" else 0
    pieces = _complete_objects(text, level)
    if not pieces and level == 1:
        pieces = _complete_objects(text, 2)  # [[{...}, ...]] or an object list nested once more
    if not pieces:
        problem = "truncated" if close is None else "malformed"
        return None, f"{problem} JSON with no complete entity object in answer " + _snippet(body)
    items = [_loads(p) for p in pieces]
    unparsable = sum(item is None for item in items)
    note = f"{'truncated' if close is None else 'malformed'} JSON: recovered {len(pieces) - unparsable} complete objects"
    if unparsable:
        note += f", {unparsable} unparsable"
    return [item for item in items if item is not None], note


def parse_entities(text: str) -> EntityParseResult:
    """Parses the step-2b answer into entities.

    Accepts code fences, prose around the JSON, single quotes, trailing commas, truncated lists (the
    complete objects are recovered), a wrapper object such as ``{"entities": [...]}``, the answer
    ``None`` and the key spellings ``parent category`` / ``parent_category`` / ``parent``.
    """
    body = strip_code_fences(_check_text(text)).strip()
    if not body:
        return EntityParseResult((), PARSE_FAILED, "empty answer")
    if is_none_answer(body):
        return EntityParseResult((), NO_ENTITIES, "the model answered None")
    items, note = _extract_items(body)
    if items is None:
        return EntityParseResult((), PARSE_FAILED, note)
    entities: list[Entity] = []
    seen: set[tuple[str, str, str]] = set()
    problems: list[str] = []
    for position, item in enumerate(items):
        entity = entity_from_mapping(item)
        if isinstance(entity, str):
            problems.append(f"item {position}: {entity}")
            continue
        key = (entity.phrase.lower(), entity.category.lower(), entity.parent_category.lower())
        if key not in seen:
            seen.add(key)
            entities.append(entity)
    notes = [n for n in (note, "; ".join(problems) if problems else None) if n]
    reason = "; ".join(notes) if notes else None
    if entities:
        return EntityParseResult(tuple(entities), OK, reason)
    if problems or note:
        return EntityParseResult((), PARSE_FAILED, reason)
    return EntityParseResult((), NO_ENTITIES, "the model returned an empty list")
