"""Turns :class:`~detclipv3_hf.data.DetectionRecord` batches into model inputs through ``DetClipV3Processor``.

Per image: box-aware augmentation (``data.transforms``: flip, multi-scale resize, optional crop), a concept list of
its positives plus sampled negatives (``data.concepts.sample_concepts``), multi-positive targets
(``build_targets`` -> ``positive_map``), and, for the captioner, one ``phrase|category|parent category`` target per
box (``processor.encode_caption_targets``). Images are already at training size after the augmentation, so the
image processor only normalises and pads (``do_resize=False``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from transformers.image_processing_utils import BatchFeature

from ..data import (
    ConceptDictionary,
    DetectionRecord,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    build_targets,
    record_positives,
    sample_concepts,
    transform_record,
)
from ..data.transforms import Compose
from .stages import StageSpec


def build_stage_transforms(spec: StageSpec) -> Compose:
    """The stage's augmentation: flip, then a multi-scale resize to ``spec.short_sides`` (long side capped at
    ``spec.max_size``), or with ``spec.random_crop`` half of the time resize -> random crop -> resize (DETR)."""
    resize = RandomResize(list(spec.short_sides), spec.max_size)
    flip = RandomHorizontalFlip(spec.horizontal_flip)
    if not spec.random_crop:
        return Compose([flip, resize])
    top = max(spec.short_sides)
    prepare = sorted({max(1, round(top * f)) for f in (0.5, 0.625, 0.75)})
    cropped = Compose([RandomResize(prepare), RandomCrop(), resize])
    return Compose([flip, RandomSelect(resize, cropped)])


class DetClipV3TrainingCollator:
    """Builds one training batch from records.

    Args:
        processor: a ``DetClipV3Processor`` (its tokenizer must know ``[OBJ]`` / ``[IMG]``, which the processor adds).
        spec: the stage (augmentation sizes, concept budgets, whether caption targets are built).
        concept_dictionary: names negatives are drawn from; ``None`` uses the other images' positives of the batch.
        caption_max_length: longest object-label target (task token and end token included).
        image_caption_max_length: longest image-caption target.
        augment: apply the stage's random augmentation; ``False`` resizes to ``max(spec.short_sides)`` only.

    Call with ``(records, rng, kind, vocabulary_free)``; returns a ``BatchFeature`` with ``pixel_values`` (B, 3, H, W),
    ``pixel_mask`` (B, H, W), ``labels`` (one dict per image) and, unless ``vocabulary_free``, ``input_ids``
    (B, M, L), ``attention_mask`` (B, M, L), ``concept_mask`` (B, M). Each label dict holds ``boxes`` (T, 4) cxcywh
    normalised to the un-padded image, and with concepts ``class_labels`` (T,) (first positive concept) and
    ``positive_map`` (T, M_i) float multi-hot; with caption targets ``caption_ids`` / ``caption_attention_mask``
    (T, Lc) (only when every box of the image has a hierarchical label) and ``image_caption_ids`` /
    ``image_caption_attention_mask`` (1, Lc) (when the record has a caption). The batch also carries ``concepts``
    (list of concept lists) and ``image_ids`` (record ids), which are not model inputs.
    """

    def __init__(
        self,
        processor: Any,
        spec: StageSpec,
        concept_dictionary: ConceptDictionary | None = None,
        caption_max_length: int = 32,
        image_caption_max_length: int = 64,
        augment: bool = True,
    ) -> None:
        if not hasattr(processor, "encode_caption_targets") or not hasattr(processor, "image_processor"):
            raise TypeError(f"processor must be a DetClipV3Processor, got {type(processor).__name__}")
        self.processor = processor
        self.spec = spec
        self.concept_dictionary = concept_dictionary
        self.caption_max_length = caption_max_length
        self.image_caption_max_length = image_caption_max_length
        self.transforms = (
            build_stage_transforms(spec)
            if augment
            else Compose([RandomResize([max(spec.short_sides)], spec.max_size)])
        )

    # ------------------------------------------------------------------ batch

    def __call__(
        self,
        records: Sequence[DetectionRecord],
        rng: random.Random,
        kind: str = "detection",
        vocabulary_free: bool = False,
    ) -> BatchFeature:
        if not records:
            raise ValueError("cannot collate an empty list of records")
        if not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
        records = [transform_record(record, self.transforms, rng) for record in records]
        # Detection batches use the boxes' category names only, even when the source carries phrases too (a COCO
        # json with phrase extras): that is what makes them detection data. With the phrase in the list, a model can
        # name a box by matching the phrase's easy words (colour) and copying its noun instead of recognising the
        # object (measured on the synthetic world, BENCHMARKS.md "Learnability"). Grounding and captioned batches
        # keep every label (phrase and category).
        positives = (
            []
            if vocabulary_free
            else [record_positives(record, categories_only=kind == "detection") for record in records]
        )
        # Negatives come from the concept dictionary, else from the other images' positives in this batch.
        dictionary = self.concept_dictionary
        if dictionary is None:
            dictionary = ConceptDictionary(name for names in positives for name in names)

        concept_lists: list[list[str]] = []
        annotations, positive_maps, kept_objects = [], [], []
        for index, record in enumerate(records):
            if vocabulary_free:
                keep = list(range(len(record.objects)))
                classes = [0] * len(keep)
            else:
                concepts = sample_concepts(
                    positives[index],
                    dictionary,
                    self.spec.max_concepts_for(kind),
                    rng,
                    extra_negatives=record.negatives,
                )
                targets = build_targets(record, concepts)
                # Objects without a positive concept only exist after positive truncation: not supervised.
                keep = [i for i, indices in enumerate(targets.positive_indices) if indices]
                classes = [targets.positive_indices[i][0] for i in keep]
                concept_lists.append(concepts)
                positive_maps.append(targets.positive_map()[keep])
            kept_objects.append([record.objects[i] for i in keep])
            annotations.append(
                {
                    "image_id": index,
                    "annotations": [
                        {"bbox": list(record.objects[i].bbox_xywh), "category_id": c}
                        for i, c in zip(keep, classes)
                    ],
                }
            )

        batch = self.processor(
            images=[record.image for record in records],
            text=None if vocabulary_free else concept_lists,
            annotations=annotations,
            do_resize=False,
        )
        labels = []
        for index, label in enumerate(batch["labels"]):
            label = {"boxes": label["boxes"]}
            if not vocabulary_free:
                label["class_labels"] = torch.tensor(
                    [a["category_id"] for a in annotations[index]["annotations"]], dtype=torch.long
                )
                label["positive_map"] = positive_maps[index]
            if self.spec.caption_targets:
                label.update(self._caption_targets(kept_objects[index], records[index].caption))
            labels.append(label)
        batch["labels"] = labels
        batch["concepts"] = concept_lists if not vocabulary_free else None
        batch["image_ids"] = [record.image_id for record in records]
        return batch

    def _caption_targets(self, objects: list, caption: str | None) -> dict[str, torch.Tensor]:
        """Captioner targets of one image: one row per box, and the image caption when there is one."""
        out: dict[str, torch.Tensor] = {}
        hierarchical = [obj.hierarchical_label for obj in objects]
        # A box without all three fields has no target; rather than train the captioner on half a label, the
        # image then carries no object targets at all (its boxes still train the detector).
        if hierarchical and all(label is not None for label in hierarchical):
            encoded = self.processor.encode_caption_targets(
                [hierarchical], task="object", max_length=self.caption_max_length
            )
            out["caption_ids"] = encoded["input_ids"]
            out["caption_attention_mask"] = encoded["attention_mask"]
        if caption:
            encoded = self.processor.encode_caption_targets(
                [[caption]], task="image", max_length=self.image_caption_max_length
            )
            out["image_caption_ids"] = encoded["input_ids"]
            out["image_caption_attention_mask"] = encoded["attention_mask"]
        return out


def model_inputs(batch: BatchFeature | dict[str, Any]) -> dict[str, Any]:
    """The keys of a collated batch that the model's ``forward`` takes (drops ``concepts`` / ``image_ids``)."""
    names = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "concept_mask", "labels")
    return {name: batch[name] for name in names if name in batch and batch[name] is not None}
