"""The model side of the pipeline: two tiny protocols and their transformers-backed implementations.

Steps 1 and 2 only need "prompts in, texts out". Hiding the model behind `Recaptioner` / `TextGenerator`
lets any transformers model id (or local folder) plug in, and lets tests inject deterministic scripted
generators: any plain callable with the same signature is accepted and wrapped.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image


@runtime_checkable
class TextGenerator(Protocol):
    """Step 2: a language model. Returns one answer per prompt, in order."""

    def generate(self, prompts: list[str]) -> list[str]: ...


@runtime_checkable
class Recaptioner(Protocol):
    """Step 1: a vision-language model. Returns one answer per (image, prompt) pair, in order."""

    def generate(self, images: list[Image.Image], prompts: list[str]) -> list[str]: ...


class _CallableTextGenerator:
    def __init__(self, fn: Callable[[list[str]], list[str]]) -> None:
        self.fn = fn
        self.model_id = f"callable:{getattr(fn, '__qualname__', type(fn).__name__)}"

    def generate(self, prompts: list[str]) -> list[str]:
        return self.fn(prompts)


class _CallableRecaptioner:
    def __init__(self, fn: Callable[[list[Image.Image], list[str]], list[str]]) -> None:
        self.fn = fn
        self.model_id = f"callable:{getattr(fn, '__qualname__', type(fn).__name__)}"

    def generate(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        return self.fn(images, prompts)


def as_text_generator(obj: TextGenerator | Callable[[list[str]], list[str]]) -> TextGenerator:
    """Accepts a `TextGenerator` or any callable ``prompts -> answers`` and returns a `TextGenerator`."""
    if isinstance(obj, TextGenerator):
        return obj
    if callable(obj):
        return _CallableTextGenerator(obj)
    raise TypeError(f"expected a TextGenerator or a callable(prompts) -> list[str], got {type(obj).__name__}")


def as_recaptioner(obj: Recaptioner | Callable[[list[Image.Image], list[str]], list[str]]) -> Recaptioner:
    """Accepts a `Recaptioner` or any callable ``(images, prompts) -> answers`` and returns a `Recaptioner`."""
    if isinstance(obj, Recaptioner):
        return obj
    if callable(obj):
        return _CallableRecaptioner(obj)
    raise TypeError(
        f"expected a Recaptioner or a callable(images, prompts) -> list[str], got {type(obj).__name__}"
    )


def describe_model(obj: Any) -> str:
    """A provenance string for a model wrapper: its `model_id` when it has one, else its class name."""
    model_id = getattr(obj, "model_id", None)
    return str(model_id) if model_id else f"{type(obj).__module__}.{type(obj).__qualname__}"


def check_answers(answers: Any, expected: int, who: str) -> list[str]:
    """Validates a generator's return value: a list of `expected` strings (a contract, not model quality)."""
    if not isinstance(answers, Sequence) or isinstance(answers, str):
        raise TypeError(f"{who} must return a list of str, got {type(answers).__name__}")
    if len(answers) != expected:
        raise ValueError(f"{who} returned {len(answers)} answers for {expected} prompts")
    for i, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise TypeError(f"{who} answer {i} is a {type(answer).__name__}, not a str")
    return list(answers)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or by default the GPU of this process (``LOCAL_RANK`` under torchrun / accelerate) or CPU."""
    if device is not None:
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype if dtype is not None else "auto"
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown torch dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
    return resolved


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


class TransformersTextGenerator:
    """A `TextGenerator` over any causal language model (`AutoModelForCausalLM` + `AutoTokenizer`).

    Prompts go through the tokenizer's chat template as one user turn when it has one (instruction-tuned
    models), else verbatim. Decoding is greedy by default so that reruns are reproducible.

    Args:
        model: a causal LM (`generate` capable), already on its device.
        tokenizer: its tokenizer; left padding is used for batched generation.
        batch_size: prompts per `generate` call.
        max_new_tokens: answer length limit; a list cut by it is recovered by the parser.
        use_chat_template: force (True) or skip (False) the chat template; None uses it when present.
        generate_kwargs: extra keyword arguments for `model.generate` (e.g. sampling settings).
        model_id: provenance name; defaults to the model's `name_or_path`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 256,
        use_chat_template: bool | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        model_id: str | None = None,
    ) -> None:
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token; batched generation needs one")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.use_chat_template = (
            bool(getattr(tokenizer, "chat_template", None)) if use_chat_template is None else use_chat_template
        )
        self.generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}
        self.model_id = model_id or getattr(model, "name_or_path", None) or type(model).__name__

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> TransformersTextGenerator:
        """Loads a `text-generation` model id or local folder. `kwargs` go to the constructor."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code
        ).to(resolve_device(device))
        return cls(model, tokenizer, model_id=model_id, **kwargs)

    def _render(self, prompt: str) -> str:
        if not self.use_chat_template:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )

    @torch.inference_mode()
    def generate(self, prompts: list[str]) -> list[str]:
        """One greedy answer per prompt (special tokens removed, whitespace stripped)."""
        answers: list[str] = []
        for start, end in _batches(len(prompts), self.batch_size):
            texts = [self._render(p) for p in prompts[start:end]]
            # A chat template already inserts BOS and friends; adding them again would double them.
            encoded = self.tokenizer(
                texts, return_tensors="pt", padding=True, add_special_tokens=not self.use_chat_template
            ).to(self.model.device)
            output = self.model.generate(
                **encoded,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                **self.generate_kwargs,
            )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return answers


class TransformersRecaptioner:
    """A `Recaptioner` over any `image-text-to-text` model (`AutoModelForImageTextToText` + `AutoProcessor`).

    Each (image, prompt) pair becomes one user turn ``[image, text]`` rendered by the processor's chat
    template; a processor without one gets ``"<image token>\\n<prompt>"``.

    Args:
        model: an image-text-to-text model, already on its device.
        processor: its processor (image processor + tokenizer).
        batch_size, max_new_tokens, generate_kwargs, model_id: as for `TransformersTextGenerator`.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        batch_size: int = 4,
        max_new_tokens: int = 256,
        generate_kwargs: dict[str, Any] | None = None,
        model_id: str | None = None,
    ) -> None:
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        self.model = model.eval()
        self.processor = processor
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(f"processor {type(processor).__name__} has no tokenizer; an image-text-to-text one is needed")
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.generate_kwargs = {"do_sample": False, **(generate_kwargs or {})}
        self.model_id = model_id or getattr(model, "name_or_path", None) or type(model).__name__

    @classmethod
    def from_pretrained(
        cls,
        model_id: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
        **kwargs: Any,
    ) -> TransformersRecaptioner:
        """Loads an `image-text-to-text` model id or local folder. `kwargs` go to the constructor."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            model_id, dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code
        ).to(resolve_device(device))
        return cls(model, processor, model_id=model_id, **kwargs)

    def _render(self, prompt: str) -> str:
        if getattr(self.processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        return f"{image_token}\n{prompt}"

    @torch.inference_mode()
    def generate(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        """One greedy answer per (image, prompt) pair."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        answers: list[str] = []
        tokenizer = self.processor.tokenizer
        for start, end in _batches(len(prompts), self.batch_size):
            texts = [self._render(p) for p in prompts[start:end]]
            batch_images = [img.convert("RGB") for img in images[start:end]]
            inputs = self.processor(images=batch_images, text=texts, padding=True, return_tensors="pt")
            inputs = inputs.to(self.model.device).to(self.model.dtype)  # dtype casts floating tensors only
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **self.generate_kwargs
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        return answers
