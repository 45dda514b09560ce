"""Per-sample concept sets and alignment targets (ARCHITECTURE.md section 4).

Each training image gets its own concept list: all its positive labels plus negatives drawn from a concept
dictionary, up to ``max_concepts`` (DetCLIPv2: 150 for detection data, 100 for grounding data). For
GranuCap-style data both ``phrase`` and ``category`` are positive for a box (multi-positive), and
``phrase|category|parent category`` is that box's captioner target.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .records import DetectionRecord

DETECTION_MAX_CONCEPTS = 150
GROUNDING_MAX_CONCEPTS = 100


def _dedup(names: Iterable[str], what: str) -> list[str]:
    """Strips names, drops empty ones and repeats (first wins); raises TypeError for non-strings."""
    out: dict[str, None] = {}
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"{what} must be strings, got {type(name).__name__}: {name!r}")
        name = name.strip()
        if name:
            out.setdefault(name, None)
    return list(out)


class ConceptDictionary(Sequence[str]):
    """An ordered, duplicate-free list of concept names used to draw negative concepts.

    Args:
        concepts: names; surrounding whitespace is stripped, empty names and repeats are dropped.
    """

    def __init__(self, concepts: Iterable[str]) -> None:
        if isinstance(concepts, str):
            raise TypeError("concepts must be an iterable of names, not a single string")
        self._names = tuple(_dedup(concepts, "concepts"))
        self._index = {name: i for i, name in enumerate(self._names)}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ConceptDictionary:
        """Loads a ``.txt`` file (one name per line) or a ``.json`` file (a list of names, a list of
        ``{"name": ...}`` dicts such as COCO categories, or a dict with a ``"concepts"`` list)."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as handle:
            if not path.lower().endswith(".json"):
                return cls(handle.read().splitlines())
            payload = json.load(handle)
        if isinstance(payload, dict):
            payload = payload.get("concepts", payload.get("categories"))
        if not isinstance(payload, list):
            raise ValueError(f"{path}: expected a list of names or a dict with a 'concepts' list")
        return cls(item["name"] if isinstance(item, dict) and "name" in item else item for item in payload)

    def save(self, path: str | os.PathLike) -> None:
        """Writes one name per line (the ``.txt`` format :meth:`from_file` reads)."""
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("".join(name + "\n" for name in self._names))

    def index(self, name: str, *args: int) -> int:  # type: ignore[override]
        if name not in self._index:
            raise ValueError(f"{name!r} is not in the concept dictionary")
        return self._index[name]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, item):  # type: ignore[override]
        return self._names[item]

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __repr__(self) -> str:
        return f"ConceptDictionary({len(self)} concepts)"


def record_positives(record: DetectionRecord, categories_only: bool = False) -> list[str]:
    """Every positive label of the record's objects, in object order, without duplicates.

    With ``categories_only`` an object that has a ``category`` contributes only that name (detection data name
    boxes by their category, as COCO / Objects365 do); objects without one still contribute their labels.
    """
    labels = (
        label
        for obj in record.objects
        for label in ([obj.category] if categories_only and obj.category else obj.labels)
    )
    return _dedup(labels, "labels")


def sample_concepts(
    positives: Sequence[str],
    dictionary: ConceptDictionary | Sequence[str],
    max_concepts: int,
    rng: random.Random,
    extra_negatives: Sequence[str] = (),
) -> list[str]:
    """Builds one sample's concept list: all positives plus sampled negatives, shuffled.

    Positives are deduplicated and always all kept; only if they alone exceed ``max_concepts`` are they
    truncated (with a warning). The remaining room is filled first with ``extra_negatives`` (e.g. a record's
    known-absent labels), then with names drawn without replacement from ``dictionary``; no negative is
    ever one of the positives and no name appears twice.

    Args:
        positives: the sample's positive labels.
        dictionary: names to draw negatives from.
        max_concepts: size cap of the returned list (``DETECTION_MAX_CONCEPTS`` / ``GROUNDING_MAX_CONCEPTS``).
        rng: the only source of randomness.
        extra_negatives: negatives to prefer over random dictionary draws.

    Returns:
        ``min(max_concepts, len(positives) + available negatives)`` distinct names in random order.

    Raises:
        ValueError: if ``max_concepts < 1``. TypeError: if ``rng`` is not a ``random.Random`` or a name
            is not a string.
    """
    if not isinstance(max_concepts, int) or max_concepts < 1:
        raise ValueError(f"max_concepts must be a positive int, got {max_concepts!r}")
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    if isinstance(positives, str):
        raise TypeError("positives must be a sequence of names, not a single string")
    chosen = _dedup(positives, "positives")
    if len(chosen) > max_concepts:
        warnings.warn(
            f"{len(chosen)} positive concepts exceed max_concepts={max_concepts}; "
            f"keeping the first {max_concepts}",
            stacklevel=2,
        )
        chosen = chosen[:max_concepts]
    taken = set(chosen)
    room = max_concepts - len(chosen)
    extras = [name for name in _dedup(extra_negatives, "extra_negatives") if name not in taken]
    if len(extras) > room:
        extras = rng.sample(extras, room)
    chosen += extras
    taken.update(extras)
    room -= len(extras)
    if not isinstance(dictionary, ConceptDictionary):
        dictionary = ConceptDictionary(
            dictionary
        )  # cleans and dedups a plain list (pass one to avoid the cost)
    if room > 0 and len(dictionary) > 0:
        # Draw `room` plus as many indices as can be excluded, then filter: one O(k) draw, no rejection loop.
        excluded = sum(1 for name in taken if name in dictionary)
        draw = rng.sample(range(len(dictionary)), min(len(dictionary), room + excluded))
        negatives = [dictionary[i] for i in draw if dictionary[i] not in taken][:room]
        chosen += negatives
    rng.shuffle(chosen)
    return chosen


@dataclass
class ConceptTargets:
    """Alignment and caption targets of one record against its concept list.

    Attributes:
        concepts: the concept list the targets index into.
        positive_indices: per record object (same order as ``record.objects``), the sorted indices of every
            concept that is positive for it (its phrase *and* its category for captioned data). An empty
            list means none of the object's labels is in ``concepts`` (only after positive truncation); such
            boxes should be dropped from the alignment loss.
        object_captions: per object, ``"phrase|category|parent category"``, or ``None`` when a field is
            missing.
        image_caption: the record's caption, or ``None``.
    """

    concepts: list[str]
    positive_indices: list[list[int]]
    object_captions: list[str | None]
    image_caption: str | None

    @property
    def has_positive(self) -> list[bool]:
        return [bool(indices) for indices in self.positive_indices]

    def positive_map(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Multi-hot targets of shape ``(num_objects, num_concepts)``: 1 where the concept names the box."""
        target = torch.zeros((len(self.positive_indices), len(self.concepts)), dtype=dtype)
        for row, indices in enumerate(self.positive_indices):
            target[row, indices] = 1
        return target


def build_targets(record: DetectionRecord, concepts: Sequence[str]) -> ConceptTargets:
    """Maps each object of ``record`` to the indices of its positive concepts.

    Args:
        record: the record (its objects' ``labels`` are the positive names).
        concepts: the sample's concept list, e.g. from :func:`sample_concepts`; names must be unique.

    Returns:
        :class:`ConceptTargets` aligned with ``record.objects``.

    Raises:
        ValueError: if ``concepts`` holds a name twice (targets would be ambiguous).
    """
    lookup: dict[str, int] = {}
    for i, name in enumerate(concepts):
        if name in lookup:
            raise ValueError(
                f"concept {name!r} appears twice in the concept list (indices {lookup[name]} and {i})"
            )
        lookup[name] = i
    positive_indices = [
        sorted({lookup[label] for label in obj.labels if label in lookup}) for obj in record.objects
    ]
    return ConceptTargets(
        concepts=list(concepts),
        positive_indices=positive_indices,
        object_captions=[obj.hierarchical_label for obj in record.objects],
        image_caption=record.caption,
    )
