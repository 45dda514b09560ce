"""Step 4: vocabulary building and entity-to-box assignment rules, with hand-made detections."""

import pytest
import torch
from PIL import Image

from detclipv3_hf.annotation import (
    DetClipV3BoxLabeller,
    Detection,
    Entity,
    as_detections,
    assign_entities,
    build_vocabulary,
)

BUS = Entity("red double-decker bus", "bus", "vehicle")
DOG = Entity("dog", "dog", "animal")
BROWN_DOG = Entity("brown dog", "dog", "animal")
RED_CAR = Entity("red car", "car", "vehicle")
BLUE_CAR = Entity("blue car", "car", "vehicle")


def test_vocabulary_holds_phrase_and_category_once_and_remembers_owners():
    vocab = build_vocabulary([DOG, BROWN_DOG, BUS])
    assert vocab.concepts == ("dog", "brown dog", "red double-decker bus", "bus")
    assert vocab.owners[0] == (0, 1)  # "dog": phrase of DOG, category of BROWN_DOG
    assert vocab.phrase_owners[0] == (0,)
    assert vocab.owners[2] == (2,) and vocab.owners[3] == (2,)


def test_vocabulary_deduplicates_case_and_spacing():
    vocab = build_vocabulary([Entity("Bus", "bus ", "vehicle"), Entity("red  bus", "BUS", "vehicle")])
    assert vocab.concepts == ("Bus", "red  bus")
    assert vocab.owners[0] == (0, 1)


def test_a_box_matching_either_field_gets_the_whole_entity():
    vocab = build_vocabulary([BUS])
    by_phrase = [Detection((0, 0, 10, 10), 0.9, 0)]
    by_category = [Detection((20, 20, 40, 30), 0.8, 1)]
    for dets in (by_phrase, by_category):
        objects, stats = assign_entities([BUS], vocab, dets, threshold=0.5)
        assert [o.entity for o in objects] == [BUS]
        record = objects[0].to_record()
        assert record["phrase"] == BUS.phrase and record["category"] == "bus" and record["parent_category"] == "vehicle"
        assert stats.kept == 1


def test_threshold_is_inclusive_and_scores_are_recorded():
    vocab = build_vocabulary([BUS])
    dets = [Detection((0, 0, 10, 10), 0.5, 0), Detection((50, 50, 60, 60), 0.49, 1)]
    objects, stats = assign_entities([BUS], vocab, dets, threshold=0.5)
    assert [o.score for o in objects] == [0.5]
    assert stats.below_threshold == 1 and stats.detections == 2


def test_bbox_is_coco_xywh_pixels():
    vocab = build_vocabulary([BUS])
    objects, _ = assign_entities([BUS], vocab, [Detection((10, 20, 40, 60), 0.9, 0)], threshold=0.1)
    assert objects[0].to_record()["bbox"] == [10.0, 20.0, 30.0, 40.0]


def test_phrase_and_category_boxes_of_one_object_merge_by_nms_keeping_the_best():
    vocab = build_vocabulary([BUS])
    dets = [Detection((0, 0, 100, 50), 0.7, 0), Detection((2, 1, 101, 50), 0.9, 1)]
    objects, stats = assign_entities([BUS], vocab, dets, threshold=0.1, nms_iou=0.5)
    assert len(objects) == 1 and objects[0].score == 0.9
    assert stats.suppressed == 1


def test_distinct_instances_of_one_entity_survive():
    vocab = build_vocabulary([DOG])
    dets = [Detection((0, 0, 10, 10), 0.9, 0), Detection((50, 50, 60, 60), 0.8, 0)]
    objects, stats = assign_entities([DOG], vocab, dets, threshold=0.1)
    assert len(objects) == 2 and stats.suppressed == 0
    assert [o.score for o in objects] == sorted([o.score for o in objects], reverse=True)


def test_boxes_of_different_entities_are_not_suppressed_against_each_other():
    entities = [BUS, Entity("vehicle in front", "vehicle", "object")]
    vocab = build_vocabulary(entities)
    dets = [Detection((0, 0, 100, 50), 0.9, 0), Detection((0, 0, 100, 50), 0.8, 2)]
    objects, _ = assign_entities(entities, vocab, dets, threshold=0.1)
    assert {o.entity for o in objects} == set(entities)


def test_shared_string_prefers_the_entity_whose_phrase_it_is():
    entities = [DOG, BROWN_DOG]
    vocab = build_vocabulary(entities)
    objects, stats = assign_entities(entities, vocab, [Detection((0, 0, 10, 10), 0.9, 0)], threshold=0.1)
    assert [o.entity for o in objects] == [DOG] and stats.ambiguous == 0


def test_shared_category_is_resolved_by_an_overlapping_phrase_box_else_dropped():
    entities = [RED_CAR, BLUE_CAR]
    vocab = build_vocabulary(entities)
    car = vocab.concepts.index("car")
    red = vocab.concepts.index("red car")
    # A "car" box overlapping a "red car" box belongs to the red car; a lone "car" box is ambiguous.
    dets = [
        Detection((0, 0, 50, 30), 0.6, red),
        Detection((1, 0, 50, 31), 0.8, car),
        Detection((200, 200, 260, 240), 0.9, car),
    ]
    objects, stats = assign_entities(entities, vocab, dets, threshold=0.1, nms_iou=0.5)
    assert [(o.entity, o.score) for o in objects] == [(RED_CAR, 0.8)]
    assert stats.ambiguous == 1 and stats.suppressed == 1


def test_detection_validation_names_the_problem():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        as_detections([((0, 0, 1, 1), 0.5, 3)], num_concepts=2)
    with pytest.raises(ValueError, match="xyxy"):
        as_detections([((5, 0, 1, 1), 0.5, 0)], num_concepts=2)
    with pytest.raises(ValueError, match="finite"):
        as_detections([((0, 0, 1, 1), float("nan"), 0)], num_concepts=2)
    with pytest.raises(ValueError, match="box_xyxy, score, concept_index"):
        as_detections([(1, 2)], num_concepts=2)
    assert as_detections([((0, 0, 1, 1), 0.5, 1)], 2) == [Detection((0.0, 0.0, 1.0, 1.0), 0.5, 1)]


class _ContractProcessor:
    """Implements the DetClipV3Processor contract the labeller relies on, nothing more."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, text, return_tensors):
        from transformers import BatchFeature

        self.calls.append([list(t) for t in text])
        return BatchFeature({"pixel_values": torch.zeros(len(images), 3, 4, 4)})

    def post_process_grounded_object_detection(self, outputs, threshold, target_sizes, text_labels):
        results = []
        for (h, w), labels in zip(target_sizes, text_labels):
            n = len(labels)
            scores = torch.linspace(0.95, 0.2, n)
            boxes = torch.tensor([[0.0, 0.0, w / (i + 1), h / (i + 1)] for i in range(n)])
            keep = scores > threshold
            results.append({"scores": scores[keep], "labels": torch.arange(n)[keep], "boxes": boxes[keep],
                            "text_labels": [labels[i] for i in torch.arange(n)[keep].tolist()]})
        return results


class _ContractModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values):
        return {"logits": pixel_values.mean() + self.weight}


def test_detclipv3_labeller_follows_the_processor_contract_per_image_and_batches():
    processor = _ContractProcessor()
    labeller = DetClipV3BoxLabeller(_ContractModel(), processor, threshold=0.5, device="cpu", batch_size=2)
    images = [Image.new("RGB", (40, 20)), Image.new("RGB", (16, 16)), Image.new("RGB", (32, 32))]
    vocabs = [["bus", "vehicle"], [], ["dog", "animal", "brown dog"]]
    results = labeller.label(images, vocabs)
    assert processor.calls == [[["bus", "vehicle"], ["dog", "animal", "brown dog"]]]  # empty vocab skipped
    assert results[1] == []
    box, score, index = results[0][0]
    assert box == (0.0, 0.0, 40.0, 20.0) and index == 0 and score == pytest.approx(0.95)
    assert all(s > 0.5 for _, s, _ in results[2])
    with pytest.raises(ValueError, match="vocabularies"):
        labeller.label(images, vocabs[:2])
