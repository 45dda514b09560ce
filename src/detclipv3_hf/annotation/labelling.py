"""Step 4: give each entity boxes with a trained DetCLIPv3 detector.

The vocabulary of an image is the de-duplicated set of its entities' `phrase` and `category` strings
[paper]. Detections come back as (xyxy pixel box, score, concept index); `assign_entities` turns them
into GranuCap objects with these rules:

1. Keep detections with ``score >= threshold``.
2. A detection of concept string ``s`` goes to the entity whose `phrase` or `category` is ``s`` and is
   labelled with that whole entity ``{phrase, category, parent_category}`` [paper].
3. [decision] When ``s`` belongs to several entities (two entities share a category, e.g.
   ``red car|car`` and ``blue car|car``), entities whose *phrase* is ``s`` win (the more specific
   match). If that still leaves several, the box goes to the one candidate that also has an
   above-threshold phrase- or category-only detection overlapping it (IoU >= `nms_iou`); a box that
   stays ambiguous is dropped and counted, because labelling the blue car "red car" is worse training
   data than one missing box.
4. [decision] De-duplication is per entity: non-maximum suppression (torchvision.ops.nms, IoU
   `nms_iou`) over the boxes of one entity, so the phrase and category detections of the same object
   merge into the higher-scoring one while distinct instances ("two dogs") survive. Boxes of different
   entities are never suppressed against each other: two descriptions of one object are both kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torchvision.ops import box_convert, box_iou, nms

from .parsing import Entity

BoxXYXY = tuple[float, float, float, float]


@dataclass(frozen=True)
class Detection:
    """One detector output: `box` is xyxy in absolute pixels; `concept_index` indexes the image's vocabulary."""

    box: BoxXYXY
    score: float
    concept_index: int


@dataclass(frozen=True)
class Vocabulary:
    """The concept strings of one image and, for each, the indices of the entities that own it.

    Attributes:
        concepts: de-duplicated `phrase` and `category` strings (first spelling kept; case-insensitive).
        owners: ``owners[i]`` = indices into the entity list whose phrase or category is ``concepts[i]``.
        phrase_owners: ``phrase_owners[i]`` = the subset of ``owners[i]`` whose *phrase* is ``concepts[i]``.
    """

    concepts: tuple[str, ...]
    owners: tuple[tuple[int, ...], ...]
    phrase_owners: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class LabelledObject:
    """A GranuCap object: `bbox` is COCO ``[x, y, w, h]`` in absolute pixels."""

    bbox: tuple[float, float, float, float]
    entity: Entity
    score: float

    def to_record(self) -> dict[str, Any]:
        return {"bbox": [float(v) for v in self.bbox], **self.entity.to_record(), "score": float(self.score)}


@dataclass(frozen=True)
class AssignmentStats:
    """Counts of what happened to one image's detections (recorded next to the objects)."""

    detections: int = 0
    below_threshold: int = 0
    ambiguous: int = 0
    suppressed: int = 0
    kept: int = 0

    def to_record(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in ("detections", "below_threshold", "ambiguous", "suppressed", "kept")}


@runtime_checkable
class BoxLabeller(Protocol):
    """Detects each image's vocabulary.

    `label(images, vocabularies)` returns, per image, a list of ``(box_xyxy, score, concept_index)``
    with `box_xyxy` in absolute pixels of that image and `concept_index` into its vocabulary.
    """

    def label(
        self, images: list[Image.Image], vocabularies: list[list[str]]
    ) -> list[list[tuple[BoxXYXY, float, int]]]: ...


def _concept_key(text: str) -> str:
    return " ".join(text.lower().split())


def build_vocabulary(entities: Sequence[Entity]) -> Vocabulary:
    """The detector vocabulary of one image: every entity's `phrase` and `category`, de-duplicated."""
    index: dict[str, int] = {}
    concepts: list[str] = []
    owners: list[list[int]] = []
    phrase_owners: list[list[int]] = []
    for e_idx, entity in enumerate(entities):
        if not isinstance(entity, Entity):
            raise TypeError(f"entity {e_idx} must be an Entity, got {type(entity).__name__}")
        for text, is_phrase in ((entity.phrase, True), (entity.category, False)):
            key = _concept_key(text)
            if not key:
                continue
            if key not in index:
                index[key] = len(concepts)
                concepts.append(text.strip())
                owners.append([])
                phrase_owners.append([])
            c_idx = index[key]
            if e_idx not in owners[c_idx]:
                owners[c_idx].append(e_idx)
            if is_phrase and e_idx not in phrase_owners[c_idx]:
                phrase_owners[c_idx].append(e_idx)
    return Vocabulary(tuple(concepts), tuple(map(tuple, owners)), tuple(map(tuple, phrase_owners)))


def as_detections(raw: Sequence[Any], num_concepts: int) -> list[Detection]:
    """Validates one image's labeller output and converts it to `Detection`s."""
    detections: list[Detection] = []
    for i, item in enumerate(raw):
        if isinstance(item, Detection):
            box, score, concept = item.box, item.score, item.concept_index
        else:
            try:
                box, score, concept = item
            except (TypeError, ValueError):
                raise ValueError(f"detection {i} must be (box_xyxy, score, concept_index), got {item!r}") from None
        box = tuple(float(v) for v in box)
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise ValueError(f"detection {i}: box must be 4 finite xyxy numbers, got {box}")
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"detection {i}: box {box} is not xyxy (x2 < x1 or y2 < y1)")
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"detection {i}: score must be finite, got {score}")
        if int(concept) != concept or not 0 <= int(concept) < num_concepts:
            raise ValueError(f"detection {i}: concept_index {concept} is outside the vocabulary of {num_concepts}")
        detections.append(Detection(box, score, int(concept)))  # type: ignore[arg-type]
    return detections


def _resolve_owner(det: Detection, vocab: Vocabulary, kept: list[Detection], iou: float) -> int | None:
    """The entity a detection belongs to (rule 3 of the module docstring), or None when ambiguous."""
    candidates = vocab.phrase_owners[det.concept_index] or vocab.owners[det.concept_index]
    if len(candidates) == 1:
        return candidates[0]
    # Several entities share this string: look for a detection overlapping this box that names exactly
    # one of the candidates.
    box = torch.tensor([det.box])
    supporters: set[int] = set()
    for other in kept:
        if other is det:
            continue
        other_owners = set(vocab.phrase_owners[other.concept_index] or vocab.owners[other.concept_index])
        if len(other_owners) != 1 or not other_owners <= set(candidates):
            continue
        if box_iou(box, torch.tensor([other.box])).item() >= iou:
            supporters |= other_owners
    return supporters.pop() if len(supporters) == 1 else None


def assign_entities(
    entities: Sequence[Entity],
    vocabulary: Vocabulary,
    detections: Sequence[Detection],
    *,
    threshold: float,
    nms_iou: float = 0.5,
) -> tuple[list[LabelledObject], AssignmentStats]:
    """Turns one image's detections into labelled objects (rules in the module docstring).

    Args:
        entities: the image's entities, in the order `vocabulary` was built from.
        vocabulary: `build_vocabulary(entities)`.
        detections: detector outputs; boxes xyxy in absolute pixels.
        threshold: minimum score kept (inclusive).
        nms_iou: IoU above which two boxes of one entity are the same object (also the overlap needed
            to resolve a shared-string detection).

    Returns:
        The kept objects sorted by descending score (bbox COCO xywh pixels) and the counts.
    """
    if not 0.0 <= nms_iou <= 1.0:
        raise ValueError(f"nms_iou must be in [0, 1], got {nms_iou}")
    kept = [d for d in detections if d.score >= threshold]
    per_entity: dict[int, list[Detection]] = {}
    ambiguous = 0
    for det in kept:
        owner = _resolve_owner(det, vocabulary, kept, nms_iou)
        if owner is None:
            ambiguous += 1
        else:
            per_entity.setdefault(owner, []).append(det)
    objects: list[LabelledObject] = []
    suppressed = 0
    for e_idx, dets in per_entity.items():
        boxes = torch.tensor([d.box for d in dets], dtype=torch.float32)
        scores = torch.tensor([d.score for d in dets], dtype=torch.float32)
        keep = nms(boxes, scores, nms_iou).tolist()
        suppressed += len(dets) - len(keep)
        xywh = box_convert(boxes[keep], in_fmt="xyxy", out_fmt="xywh").tolist()
        for k, box in zip(keep, xywh):
            objects.append(LabelledObject(tuple(box), entities[e_idx], dets[k].score))  # type: ignore[arg-type]
    objects.sort(key=lambda o: -o.score)
    stats = AssignmentStats(len(detections), len(detections) - len(kept), ambiguous, suppressed, len(objects))
    return objects, stats


class DetClipV3BoxLabeller:
    """A `BoxLabeller` backed by `DetClipV3ForObjectDetection` + `DetClipV3Processor`.

    Args:
        model: a trained DetCLIPv3 detector.
        processor: its processor (images + per-image concept lists in, grounded post-processing out).
        threshold: score threshold handed to post-processing (the assignment applies its own as well).
        device: where the model runs; None keeps the model where it is.
        batch_size: images per forward pass.
        model_id: provenance name; defaults to the model's `name_or_path`.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        threshold: float = 0.3,
        device: str | torch.device | None = None,
        batch_size: int = 4,
        model_id: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval() if device is None else model.to(device).eval()
        self.processor = processor
        self.threshold = float(threshold)
        self.batch_size = batch_size
        self.model_id = model_id or getattr(model, "name_or_path", None) or type(model).__name__

    @classmethod
    def from_pretrained(
        cls, model_id: str, *, threshold: float = 0.3, device: str | torch.device | None = None, batch_size: int = 4
    ) -> DetClipV3BoxLabeller:
        """Loads a DetCLIPv3 checkpoint folder or Hub id (imported lazily: the detector is optional here)."""
        from detclipv3_hf import DetClipV3ForObjectDetection, DetClipV3Processor

        model = DetClipV3ForObjectDetection.from_pretrained(model_id)
        processor = DetClipV3Processor.from_pretrained(model_id)
        from .models import resolve_device

        return cls(model, processor, threshold=threshold, device=resolve_device(device), batch_size=batch_size, model_id=model_id)

    @torch.inference_mode()
    def label(
        self, images: list[Image.Image], vocabularies: list[list[str]]
    ) -> list[list[tuple[BoxXYXY, float, int]]]:
        """Runs the detector on each image with its own vocabulary; images with an empty one are skipped."""
        if len(images) != len(vocabularies):
            raise ValueError(f"got {len(images)} images for {len(vocabularies)} vocabularies")
        results: list[list[tuple[BoxXYXY, float, int]]] = [[] for _ in images]
        todo = [i for i, vocab in enumerate(vocabularies) if vocab]
        device = next(self.model.parameters()).device
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start : start + self.batch_size]
            batch_images = [images[i].convert("RGB") for i in idx]
            batch_vocab = [list(vocabularies[i]) for i in idx]
            inputs = self.processor(images=batch_images, text=batch_vocab, return_tensors="pt").to(device)
            outputs = self.model(**inputs)
            processed = self.processor.post_process_grounded_object_detection(
                outputs,
                threshold=self.threshold,
                target_sizes=[(img.height, img.width) for img in batch_images],
                text_labels=batch_vocab,
            )
            for i, result in zip(idx, processed):
                results[i] = [
                    (tuple(float(v) for v in box), float(score), int(label))  # type: ignore[misc]
                    for box, score, label in zip(
                        result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist()
                    )
                ]
        return results
