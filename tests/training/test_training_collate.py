"""The collator: batch shapes, per-image concept sets, multi-positive maps, caption targets, vocabulary-free."""

from __future__ import annotations

import random

import pytest
import torch

from detclipv3_hf.data import ConceptDictionary, load_records
from detclipv3_hf.training import DetClipV3TrainingCollator, get_stage, model_inputs


@pytest.fixture(scope="module")
def records(training_world):
    return list(load_records(str(training_world.train.granucap_file)))[:3]


def _collator(processor, world, tiny_stage, stage=1, **overrides):
    spec = get_stage(stage, {**tiny_stage, **overrides})
    return DetClipV3TrainingCollator(
        processor, spec, ConceptDictionary.from_file(world.concepts_file), caption_max_length=64
    )


def test_shapes_and_positive_maps(tiny_processor, training_world, records, tiny_stage):
    batch = _collator(tiny_processor, training_world, tiny_stage)(records, random.Random(0), "grounding")
    batch_size, max_concepts = len(records), batch["concept_mask"].shape[1]
    assert batch["pixel_values"].shape[:2] == (batch_size, 3)
    assert batch["pixel_mask"].shape == (batch_size, *batch["pixel_values"].shape[-2:])
    assert batch["input_ids"].shape == (batch_size, max_concepts, tiny_processor.max_concept_tokens)
    assert max_concepts <= 12
    for i, (record, label, concepts) in enumerate(zip(records, batch["labels"], batch["concepts"])):
        assert int(batch["concept_mask"][i].sum()) == len(concepts) == len(set(concepts))
        num_boxes = len(record.objects)  # no crop in the tiny stage: every box survives
        assert label["boxes"].shape == (num_boxes, 4)
        assert ((label["boxes"] > 0) & (label["boxes"] <= 1)).all()
        assert label["positive_map"].shape == (num_boxes, len(concepts))
        for obj, row, cls in zip(record.objects, label["positive_map"], label["class_labels"]):
            # GranuCap boxes are positive for their phrase and their category (multi-positive), nothing else.
            positives = {concepts[j] for j in row.nonzero().flatten().tolist()}
            assert positives == {obj.phrase, obj.category}
            assert row[cls] == 1
    assert "caption_ids" not in batch["labels"][0]  # stage 1 builds no captioner targets


def test_detection_batches_name_boxes_by_category_only(tiny_processor, training_world, records, tiny_stage):
    """The same GranuCap records as detection data: only the category names are concepts (the phrase would let a
    model name a box by its colour words); the same records as grounding data keep their phrases."""
    categories = ConceptDictionary(obj.category for record in records for obj in record.objects)
    spec = get_stage(1, tiny_stage)
    collate = DetClipV3TrainingCollator(tiny_processor, spec, categories, caption_max_length=64)
    for dictionary in (categories, None):  # negatives from a dictionary, or from the batch's own positives
        collate.concept_dictionary = dictionary
        batch = collate(records, random.Random(0), "detection")
        for record, label, concepts in zip(records, batch["labels"], batch["concepts"]):
            assert set(concepts) <= set(categories)
            for obj, row in zip(record.objects, label["positive_map"]):
                assert {concepts[j] for j in row.nonzero().flatten().tolist()} == {obj.category}
    phrases = {obj.phrase for record in records for obj in record.objects}
    grounding = collate(records, random.Random(0), "grounding")
    assert phrases <= {name for concepts in grounding["concepts"] for name in concepts}


def test_same_rng_same_batch_and_model_inputs(tiny_processor, training_world, records, tiny_stage):
    collate = _collator(tiny_processor, training_world, tiny_stage, horizontal_flip=0.5)
    first = collate(records, random.Random(7), "detection")
    second = collate(records, random.Random(7), "detection")
    assert first["concepts"] == second["concepts"]
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    inputs = model_inputs(first)
    assert set(inputs) == {
        "pixel_values",
        "pixel_mask",
        "input_ids",
        "attention_mask",
        "concept_mask",
        "labels",
    }


def test_vocabulary_free_batch_has_no_concepts(tiny_processor, training_world, records, tiny_stage):
    batch = _collator(tiny_processor, training_world, tiny_stage)(
        records, random.Random(0), "detection", vocabulary_free=True
    )
    assert "input_ids" not in batch and batch["concepts"] is None
    assert all(set(label) == {"boxes"} for label in batch["labels"])
    assert set(model_inputs(batch)) == {"pixel_values", "pixel_mask", "labels"}


def test_caption_targets_one_row_per_box(tiny_processor, training_world, records, tiny_stage):
    batch = _collator(tiny_processor, training_world, tiny_stage, stage=2)(
        records, random.Random(0), "captioned"
    )
    for record, label in zip(records, batch["labels"]):
        ids, mask = label["caption_ids"], label["caption_attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == label["boxes"].shape[0] == len(record.objects)
        assert (ids[:, 0] == tiny_processor.obj_token_id).all()
        decoded = tiny_processor.batch_decode_labels(ids)
        assert decoded == [obj.hierarchical_label for obj in record.objects]
        assert label["image_caption_ids"].shape[0] == 1
        assert label["image_caption_ids"][0, 0] == tiny_processor.img_token_id


def test_bad_input(tiny_processor, training_world, records, tiny_stage):
    collate = _collator(tiny_processor, training_world, tiny_stage)
    with pytest.raises(ValueError, match="empty"):
        collate([], random.Random(0))
    with pytest.raises(TypeError, match="random.Random"):
        collate(records, 0)
    with pytest.raises(TypeError, match="DetClipV3Processor"):
        DetClipV3TrainingCollator(object(), get_stage(1))
