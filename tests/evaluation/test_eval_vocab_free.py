"""Vocabulary-free evaluation: mapping generated names to classes, naming accuracy, AP after mapping."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from detclipv3_hf.evaluation import (
    GeneratedCategoryMapper,
    evaluate_vocab_free,
    map_generated_to_classes,
    match_ground_truth_boxes,
    naming_accuracy,
    normalize_category_name,
)

DIM = 512


def trigram_embed(texts: list[str]) -> torch.Tensor:
    """Deterministic toy text encoder: bag of hashed character trigrams of ' text '."""
    out = torch.zeros(len(texts), DIM)
    for row, text in enumerate(texts):
        padded = f" {text} "
        for i in range(len(padded) - 2):
            out[row, zlib.crc32(padded[i : i + 3].encode()) % DIM] += 1.0
    return out


SYNONYMS = {"puppy": "dog", "automobile": "car", "kitty": "cat"}


def synonym_embed(texts: list[str]) -> torch.Tensor:
    """Toy encoder that knows a few synonyms, which no string matching could find."""
    return trigram_embed([SYNONYMS.get(text, text) for text in texts])


class CountingEmbed:
    def __init__(self, embed):
        self.embed = embed
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return self.embed(texts)


CLASSES = ["dog", "cat", "car", "traffic_light", "baseball bat"]


def test_near_strings_map_to_the_right_class():
    index, similarity = map_generated_to_classes(
        ["dogs", "Traffic lights", "sports car", "baseball bats", "cats"], CLASSES, trigram_embed
    )
    assert index.tolist() == [0, 3, 2, 4, 1]
    assert index.dtype == torch.long and similarity.dtype == torch.float32
    assert torch.all((similarity > 0) & (similarity < 1))


def test_synonyms_map_through_the_embeddings():
    index, _ = map_generated_to_classes(["puppy", "automobile", "kitty"], CLASSES, synonym_embed)
    assert index.tolist() == [0, 2, 1]


def test_exact_normalised_match_wins_over_embedding_argmax():
    def constant_embed(texts):  # every string equally similar: argmax alone would always say class 0
        return torch.ones(len(texts), 4)

    index, similarity = map_generated_to_classes(
        ["  CAT ", "traffic light", "Baseball_Bat", "bird"], CLASSES, constant_embed
    )
    assert index.tolist() == [1, 3, 4, 0]
    assert similarity[:3].tolist() == [1.0, 1.0, 1.0]
    assert normalize_category_name("  Traffic_LIGHT  ") == "traffic light"


def test_class_embeddings_are_computed_once_and_strings_deduplicated():
    counting = CountingEmbed(trigram_embed)
    mapper = GeneratedCategoryMapper(CLASSES, counting)
    assert len(counting.calls) == 1 and len(counting.calls[0]) == len(CLASSES)
    first, _ = mapper(["dogs", "dogs", "DOGS", "cat"])
    second, _ = mapper(["sports car"])
    assert first.tolist() == [0, 0, 0, 1] and second.tolist() == [2]
    # No further class-name embedding; "dogs" embedded once, the exact match "cat" not at all.
    assert counting.calls[1:] == [["dogs"], ["sports car"]]


def test_batching_gives_the_same_mapping():
    generated = ["dogs", "sports car", "traffic lights", "kitty cat", "bats"]
    unbatched = GeneratedCategoryMapper(CLASSES, trigram_embed)(generated)
    batched = GeneratedCategoryMapper(CLASSES, trigram_embed, batch_size=2)(generated)
    assert torch.equal(unbatched[0], batched[0])
    assert torch.allclose(unbatched[1], batched[1])


def test_min_similarity_leaves_unrelated_names_unmapped():
    index, similarity = map_generated_to_classes(
        ["dogs", "xylophone"], CLASSES, trigram_embed, min_similarity=0.3
    )
    assert index.tolist() == [0, -1]
    assert similarity[1] < 0.3


def test_empty_and_bad_inputs():
    index, similarity = map_generated_to_classes([], CLASSES, trigram_embed)
    assert index.shape == (0,) and similarity.shape == (0,) and index.dtype == torch.long
    with pytest.raises(ValueError, match="shape"):
        map_generated_to_classes(["dogs"], CLASSES, lambda texts: torch.ones(len(texts) + 1, 3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        map_generated_to_classes(["dogs"], CLASSES, lambda texts: [[1.0]] * len(texts))
    with pytest.raises(ValueError, match="class_names"):
        GeneratedCategoryMapper([], trigram_embed)
    with pytest.raises(TypeError, match="list of str"):
        map_generated_to_classes("dogs", CLASSES, trigram_embed)


def ground_truth() -> dict:
    categories = [
        {"id": 10, "name": "dog", "supercategory": "animal"},
        {"id": 20, "name": "car", "supercategory": "vehicle"},
        {"id": 30, "name": "cat", "supercategory": "animal"},
    ]
    boxes = [
        (1, 10, [0, 0, 40, 40]),  # A: dog
        (1, 20, [60, 60, 50, 50]),  # B: car
        (2, 30, [10, 10, 40, 40]),  # C: cat
        (2, 10, [80, 80, 30, 30]),  # D: dog, never predicted
    ]
    annotations = [
        {
            "id": i + 1,
            "image_id": image_id,
            "category_id": category_id,
            "bbox": bbox,
            "area": bbox[2] * bbox[3],
            "iscrowd": 0,
        }
        for i, (image_id, category_id, bbox) in enumerate(boxes)
    ]
    images = [{"id": 1, "width": 128, "height": 128}, {"id": 2, "width": 128, "height": 128}]
    return {"images": images, "annotations": annotations, "categories": categories}


def hand_predictions() -> list[dict]:
    return [
        {
            "image_id": 1,
            "boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0], [62.0, 62.0, 110.0, 110.0]]),
            "scores": torch.tensor([0.9, 0.8]),
            "categories": ["Dog", "truck"],
            "parent_categories": ["animal", "vehicle"],
        },
        {
            "image_id": 2,
            # Best IoU with C is the first box (IoU 0.64, "cat"); the second has the higher score but a
            # lower IoU (0.5625, "dog") and must not be chosen.
            "boxes": torch.tensor([[10.0, 10.0, 42.0, 50.0], [10.0, 10.0, 40.0, 50.0]]),
            "scores": torch.tensor([0.5, 0.95]),
            "categories": ["cat", "dog"],
            "parent_categories": ["pet", "animal"],
        },
    ]


def test_naming_accuracy_on_a_hand_case():
    accuracy = naming_accuracy(ground_truth(), hand_predictions())
    # Matches: A <- "Dog"/"animal" (right, right), B <- "truck"/"vehicle" (wrong, right),
    # C <- "cat"/"pet" (right, wrong), D unmatched (wrong, wrong).
    assert accuracy["match_rate"] == pytest.approx(3 / 4)
    assert accuracy["category_accuracy"] == pytest.approx(2 / 4)
    assert accuracy["parent_category_accuracy"] == pytest.approx(2 / 4)
    assert accuracy["num_gt_boxes"] == 4


def test_match_ground_truth_boxes_is_the_naming_match():
    # Only boxes and scores are needed; the hand case's labels say which box each annotation must get.
    predictions = [
        {k: v for k, v in entry.items() if k in ("image_id", "boxes", "scores")}
        for entry in hand_predictions()
    ]
    matches = match_ground_truth_boxes(ground_truth(), predictions)
    assert [(annotation["id"], k) for annotation, k in matches] == [(1, 0), (2, 1), (3, 0), (4, None)]
    # Image 2 without predictions: both of its boxes are unmatched.
    matches = match_ground_truth_boxes(ground_truth(), predictions[:1])
    assert [(annotation["id"], k) for annotation, k in matches] == [(1, 0), (2, 1), (3, None), (4, None)]
    assert [k for _, k in match_ground_truth_boxes(ground_truth(), predictions, iou_threshold=0.99)] == [
        0,
        None,
        None,
        None,
    ]


def test_naming_accuracy_respects_the_iou_threshold():
    strict = naming_accuracy(ground_truth(), hand_predictions(), iou_threshold=0.95)
    assert strict["match_rate"] == pytest.approx(1 / 4)  # only the exact box on A
    assert strict["category_accuracy"] == pytest.approx(1 / 4)


def test_evaluate_vocab_free_maps_then_scores_ap():
    gt = ground_truth()
    predictions = [
        {
            "image_id": 1,
            "boxes": np.array([[0, 0, 40, 40], [60, 60, 110, 110]], dtype=float),
            "scores": np.array([0.9, 0.8]),
            "categories": ["dogs", "sports car"],
            "parent_categories": ["animal", "vehicle"],
        },
        {
            "image_id": 2,
            "boxes": np.array([[10, 10, 50, 50], [80, 80, 110, 110]], dtype=float),
            "scores": np.array([0.7, 0.6]),
            "categories": ["cats", "puppy"],
            "parent_categories": ["animal", "animal"],
        },
    ]
    results = evaluate_vocab_free(gt, predictions, None, synonym_embed)
    assert results["AP"] == pytest.approx(1.0)
    assert results["match_rate"] == pytest.approx(1.0)
    assert results["category_accuracy"] == 0.0  # mapped correctly, but no generated name is exact
    assert results["parent_category_accuracy"] == pytest.approx(1.0)
    # A name the mapping sends to the wrong class costs AP.
    predictions[1]["categories"] = ["cats", "automobile"]
    worse = evaluate_vocab_free(gt, predictions, None, synonym_embed)
    assert worse["AP"] < 1.0
    assert worse["per_category"]["car"] < 1.0
    lvis = evaluate_vocab_free(gt, predictions, None, synonym_embed, protocol="lvis_fixed")
    assert lvis["AP"] == pytest.approx(worse["AP"])


def test_prompt_class_names_replace_category_names_for_the_mapping():
    gt = ground_truth()
    predictions = [
        {
            "image_id": 1,
            "boxes": [[0, 0, 40, 40]],
            "scores": [0.9],
            "categories": ["hound"],
            "parent_categories": ["animal"],
        },
        {
            "image_id": 2,
            "boxes": [[80, 80, 110, 110]],
            "scores": [0.9],
            "categories": ["Hound"],
            "parent_categories": ["animal"],
        },
    ]
    # With the prompt name "hound" for category 10 the mapping is exact.
    results = evaluate_vocab_free(gt, predictions, ["hound", "car", "cat"], trigram_embed)
    assert results["per_category"]["dog"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="class_names"):
        evaluate_vocab_free(gt, predictions, ["hound"], trigram_embed)


def test_no_predictions():
    results = evaluate_vocab_free(ground_truth(), [], None, trigram_embed)
    assert results["AP"] == 0.0
    assert results["category_accuracy"] == 0.0
    assert results["match_rate"] == 0.0
    no_gt = {"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "dog"}]}
    empty = naming_accuracy(no_gt, [])
    assert math.isnan(empty["category_accuracy"]) and empty["num_gt_boxes"] == 0


@pytest.mark.parametrize(
    ("entry", "error", "message"),
    [
        (
            {"image_id": 1, "boxes": [[0, 0, 4, 4]], "scores": [0.5], "parent_categories": ["a"]},
            TypeError,
            "categories",
        ),
        (
            {
                "image_id": 1,
                "boxes": [[0, 0, 4, 4]],
                "scores": [0.5],
                "categories": ["a", "b"],
                "parent_categories": ["a"],
            },
            ValueError,
            "2 entries for 1 boxes",
        ),
        (
            {
                "image_id": 1,
                "boxes": [[0, 0, 4, 4]],
                "scores": [0.5],
                "categories": [3],
                "parent_categories": ["a"],
            },
            TypeError,
            "only str",
        ),
        (
            {
                "image_id": 5,
                "boxes": [[0, 0, 4, 4]],
                "scores": [0.5],
                "categories": ["a"],
                "parent_categories": ["a"],
            },
            ValueError,
            "not an image",
        ),
    ],
)
def test_bad_vocab_free_predictions(entry, error, message):
    with pytest.raises(error, match=message):
        evaluate_vocab_free(ground_truth(), [entry], None, trigram_embed)
