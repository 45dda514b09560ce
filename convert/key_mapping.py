"""Declarative state-dict conversion: regex rules, explained gaps, loud failures.

Shared by every script in `convert/`. A conversion is three tables:

- `MapRule(source_regex, target_template)`: each source key matching the regex becomes the target key obtained with
  `re.sub` (so `\\1` style groups carry layer indices across). The first matching rule wins.
- `IgnoreRule(source_regex, reason)`: source keys that are known and deliberately dropped (e.g. the BERT text tower of
  Grounding DINO, whose job the CLIP text tower does here).
- `NewRule(target_regex, reason)`: target keys that are allowed to keep their fresh initialisation, each with a reason.

Everything else fails: a source key that no table knows (`unexpected`), a mapped key whose target does not exist or
whose shape differs (named with both shapes), and a target key that is neither filled nor explained. The idea follows
the key-renaming tables of transformers' convert scripts; the strictness (no silently dropped key) is ours.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = [
    "ConversionError",
    "ConversionReport",
    "IgnoreRule",
    "MapRule",
    "NewRule",
    "apply_key_map",
    "load_converted_state_dict",
]


class ConversionError(ValueError):
    """A checkpoint cannot be converted: unexpected key, shape mismatch or unexplained missing target."""


@dataclass(frozen=True)
class MapRule:
    """`source` regex (full match) -> `target` template for `re.sub`."""

    source: str
    target: str

    def apply(self, key: str) -> str | None:
        match = re.fullmatch(self.source, key)
        return match.expand(self.target) if match else None


@dataclass(frozen=True)
class IgnoreRule:
    """Source keys (full-match regex) dropped on purpose, with the reason."""

    source: str
    reason: str


@dataclass(frozen=True)
class NewRule:
    """Target keys (full-match regex) that stay newly initialised, with the reason."""

    target: str
    reason: str


@dataclass
class ConversionReport:
    """What a conversion did.

    Attributes:
        filled: target key -> source key it came from (or a description of a special case).
        new: target key -> reason it keeps its fresh initialisation.
        ignored: source key -> reason it was dropped.
    """

    filled: dict[str, str] = field(default_factory=dict)
    new: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)

    def merge(self, other: ConversionReport) -> ConversionReport:
        self.filled.update(other.filled)
        self.ignored.update(other.ignored)
        for key, reason in other.new.items():
            if key not in self.filled:
                self.new[key] = reason
        for key in self.filled:
            self.new.pop(key, None)
        return self

    def format(self) -> str:
        """Human-readable summary: counts, then every new target and every ignored source group with its reason."""
        lines = [
            f"filled {len(self.filled)} target tensors, {len(self.new)} newly initialised, "
            f"{len(self.ignored)} source tensors ignored"
        ]
        lines.append("newly initialised (target: reason):")
        lines += [f"  {key}: {reason}" for key, reason in sorted(self.new.items())]
        by_reason: dict[str, int] = {}
        for reason in self.ignored.values():
            by_reason[reason] = by_reason.get(reason, 0) + 1
        lines.append("ignored source tensors (count: reason):")
        lines += [f"  {count}: {reason}" for reason, count in sorted(by_reason.items())]
        return "\n".join(lines)


def apply_key_map(
    source_state: Mapping[str, torch.Tensor],
    rules: Iterable[MapRule],
    ignore: Iterable[IgnoreRule] = (),
    source_name: str = "source",
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """Renames every source key with the first matching rule.

    Returns:
        `(mapped, origin, ignored)`: target key -> tensor, target key -> source key, source key -> ignore reason.

    Raises:
        ConversionError: a source key matches no rule and no ignore entry (all such keys are named), or two source keys
            map onto the same target key.
    """
    rules, ignore = list(rules), list(ignore)
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    ignored: dict[str, str] = {}
    unexpected: list[str] = []
    for key, tensor in source_state.items():
        target = next((t for t in (rule.apply(key) for rule in rules) if t is not None), None)
        if target is None:
            reason = next((r.reason for r in ignore if re.fullmatch(r.source, key)), None)
            if reason is None:
                unexpected.append(key)
            else:
                ignored[key] = reason
            continue
        if target in mapped:
            raise ConversionError(
                f"{source_name} keys {origin[target]!r} and {key!r} both map to target key {target!r}."
            )
        mapped[target] = tensor
        origin[target] = key
    if unexpected:
        shown = "\n  ".join(f"{k} {tuple(source_state[k].shape)}" for k in unexpected[:20])
        more = f"\n  ... and {len(unexpected) - 20} more" if len(unexpected) > 20 else ""
        raise ConversionError(
            f"{len(unexpected)} unexpected {source_name} key(s) that no mapping or ignore rule covers "
            f"(is this the right checkpoint type?):\n  {shown}{more}"
        )
    return mapped, origin, ignored


def load_converted_state_dict(
    target: torch.nn.Module,
    mapped: Mapping[str, torch.Tensor],
    origin: Mapping[str, str],
    new: Iterable[NewRule],
    transforms: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> ConversionReport:
    """Copies `mapped` tensors into `target` and checks that every target tensor is either filled or explained.

    Args:
        target: The freshly initialised model to fill (in place).
        mapped / origin: From `apply_key_map` (possibly merged over several sources and special cases).
        new: Rules naming the target keys allowed to stay newly initialised.
        transforms: Optional target key -> function applied to the source tensor before copying (special cases
            such as permuted input columns); the result must have the target's shape.

    Raises:
        ConversionError: a mapped key is not a target key, a shape differs (both shapes named), or a target key is
            neither filled nor covered by a `NewRule`.
    """
    transforms = dict(transforms or {})
    state = target.state_dict()
    missing_targets = [k for k in mapped if k not in state]
    if missing_targets:
        raise ConversionError(
            "mapped keys that the target model does not have (does the target config match the source?): "
            + ", ".join(f"{k} <- {origin.get(k, '?')}" for k in missing_targets[:20])
        )
    new = list(new)
    report = ConversionReport()
    with torch.no_grad():
        for key, tensor in mapped.items():
            value = transforms[key](tensor) if key in transforms else tensor
            if tuple(value.shape) != tuple(state[key].shape):
                raise ConversionError(
                    f"shape mismatch for target {key!r} {tuple(state[key].shape)} <- source "
                    f"{origin.get(key, '?')!r} {tuple(value.shape)}."
                )
            state[key].copy_(value.to(state[key].dtype))
            report.filled[key] = origin.get(key, "?")
    unexplained = []
    for key in state:
        if key in report.filled:
            continue
        reason = next((r.reason for r in new if re.fullmatch(r.target, key)), None)
        if reason is None:
            unexplained.append(f"{key} {tuple(state[key].shape)}")
        else:
            report.new[key] = reason
    if unexplained:
        raise ConversionError(
            f"{len(unexplained)} target tensor(s) neither filled from the source nor listed as newly initialised: "
            + ", ".join(unexplained[:20])
        )
    return report
