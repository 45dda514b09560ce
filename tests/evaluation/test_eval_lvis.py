"""LVIS fixed AP: agreement with COCO AP where it must agree, the per-category cap, federated rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from detclipv3_hf.evaluation import (
    DEFAULT_MAX_DETS_PER_CATEGORY,
    evaluate_coco,
    evaluate_lvis_fixed,
    limit_detections_per_category,
)


def make_ground_truth(
    boxes_per_image: dict[int, list[tuple[list[float], int]]],
    num_categories: int = 2,
    image_fields: dict | None = None,
) -> dict:
    """COCO/LVIS dict from {image_id: [(xywh box, category_id), ...]}; LVIS annotations carry no iscrowd."""
    images = [
        {"id": image_id, "width": 128, "height": 128, **(image_fields or {}).get(image_id, {})}
        for image_id in boxes_per_image
    ]
    annotations = []
    for image_id, boxes in boxes_per_image.items():
        for bbox, category_id in boxes:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": list(bbox),
                    "area": bbox[2] * bbox[3],
                }
            )
    categories = [{"id": i, "name": f"class{i}"} for i in range(1, num_categories + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def random_case(seed: int) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    boxes_per_image = {}
    predictions = []
    for image_id in range(1, 6):
        boxes = []
        for _ in range(rng.integers(1, 5)):
            x, y = rng.uniform(0, 70, size=2)
            w, h = rng.uniform(5, 50, size=2)
            boxes.append(([float(x), float(y), float(w), float(h)], int(rng.integers(1, 4))))
        boxes_per_image[image_id] = boxes
        pred_boxes, scores, labels = [], [], []
        for (x, y, w, h), category_id in boxes + boxes[:1]:
            dx, dy = rng.normal(0, 2, size=2)
            pred_boxes.append([x + dx, y + dy, x + dx + w, y + dy + h])
            scores.append(float(rng.uniform()))
            labels.append(category_id if rng.uniform() < 0.8 else int(rng.integers(1, 4)))
        predictions.append(
            {
                "image_id": image_id,
                "boxes": np.array(pred_boxes),
                "scores": np.array(scores),
                "labels": np.array(labels),
            }
        )
    return make_ground_truth(boxes_per_image, num_categories=3), predictions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_coco_ap_with_few_detections_and_no_lvis_fields(seed):
    # No image holds more than 100 detections and no LVIS field is present: both protocols must agree
    # exactly, metric by metric and category by category.
    ground_truth, predictions = random_case(seed)
    coco = evaluate_coco(ground_truth, predictions)
    lvis = evaluate_lvis_fixed(ground_truth, predictions)
    assert 0.0 < coco["AP"] < 1.0
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        if math.isnan(coco[key]):
            assert math.isnan(lvis[key]), key
        else:
            assert lvis[key] == pytest.approx(coco[key], abs=1e-12), key
    assert lvis["AR@10000/cat"] == pytest.approx(coco["AR@100"], abs=1e-12)
    for name, value in coco["per_category"].items():
        assert (math.isnan(value) and math.isnan(lvis["per_category"][name])) or lvis["per_category"][
            name
        ] == pytest.approx(value)


def crowded_image_case(num_false_positives: int = 149) -> tuple[dict, list[dict]]:
    """One GT box; many higher-scoring false positives elsewhere and the true positive scored last."""
    ground_truth = make_ground_truth({1: [([0, 0, 20, 20], 1)]}, num_categories=1)
    rng = np.random.default_rng(0)
    corners = rng.uniform(50, 100, size=(num_false_positives, 2))
    boxes = np.concatenate([np.concatenate([corners, corners + 20], axis=1), [[0, 0, 20, 20]]])
    scores = np.concatenate([np.linspace(0.9, 0.2, num_false_positives), [0.1]])
    predictions = [
        {"image_id": 1, "boxes": boxes, "scores": scores, "labels": np.ones(len(boxes), dtype=int)}
    ]
    return ground_truth, predictions


def test_more_than_100_detections_per_image_favours_fixed_ap():
    # COCO caps the image at 100 detections and loses the true positive; fixed AP keeps all 150 and finds
    # it at rank 150: precision 1/150 at recall 1, so AP = 1/150.
    ground_truth, predictions = crowded_image_case(149)
    coco = evaluate_coco(ground_truth, predictions)
    lvis = evaluate_lvis_fixed(ground_truth, predictions)
    assert coco["AP"] == 0.0
    assert lvis["AP"] == pytest.approx(1 / 150)
    assert lvis["AP"] > coco["AP"]
    assert lvis["num_detections"] == 150


def test_per_category_cap_drops_the_lowest_scores_from_ap():
    ground_truth, predictions = crowded_image_case(4)  # the true positive is the 5th and lowest score
    assert evaluate_lvis_fixed(ground_truth, predictions, max_dets_per_category=5)["AP"] == pytest.approx(
        1 / 5
    )
    capped = evaluate_lvis_fixed(ground_truth, predictions, max_dets_per_category=4)
    assert capped["AP"] == 0.0
    assert capped["num_detections"] == 4
    assert "AR@4/cat" in capped


def test_limit_detections_per_category_keeps_top_scores_over_the_dataset():
    rng = np.random.default_rng(0)
    results = [
        {"image_id": int(rng.integers(1, 4)), "category_id": int(c), "bbox": [0, 0, 1, 1], "score": float(s)}
        for c, s in zip(rng.integers(1, 3, size=40), rng.uniform(size=40))
    ]
    kept = limit_detections_per_category(results, 5)
    for category_id in (1, 2):
        all_scores = sorted((r["score"] for r in results if r["category_id"] == category_id), reverse=True)
        kept_scores = sorted((r["score"] for r in kept if r["category_id"] == category_id), reverse=True)
        assert kept_scores == all_scores[:5]
    assert kept == [r for r in results if r in kept]  # input order preserved


def test_default_cap_is_ten_thousand_and_drops_exactly_the_lowest():
    assert DEFAULT_MAX_DETS_PER_CATEGORY == 10_000
    scores = np.random.default_rng(1).permutation(10_001) / 10_001
    results = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": float(s)} for s in scores]
    results.append({"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1], "score": 0.0})
    kept = limit_detections_per_category(results)
    assert len(kept) == 10_001
    assert min(r["score"] for r in kept if r["category_id"] == 1) == pytest.approx(1 / 10_001)
    assert any(r["category_id"] == 2 for r in kept)  # other categories are untouched
    with pytest.raises(ValueError, match=">= 1"):
        limit_detections_per_category(results, 0)


def federated_case(image_fields: dict) -> tuple[dict, list[dict]]:
    """Image 1 holds a class1 box, image 2 a class2 box; both found, plus one high-score class2 extra."""
    ground_truth = make_ground_truth(
        {1: [([0, 0, 40, 40], 1)], 2: [([0, 0, 40, 40], 2)]}, image_fields=image_fields
    )
    predictions = [
        # class2 detection on image 1, where class2 has no box.
        {
            "image_id": 1,
            "boxes": [[0, 0, 40, 40], [60, 60, 100, 100]],
            "scores": [0.8, 0.95],
            "labels": [1, 2],
        },
        {"image_id": 2, "boxes": [[0, 0, 40, 40]], "scores": [0.8], "labels": [2]},
    ]
    return ground_truth, predictions


def test_federated_negative_categories_decide_whether_a_detection_is_a_false_positive():
    # Without LVIS fields (exhaustive, COCO-style): the class2 detection on image 1 is a false positive
    # scored above the true positive, AP(class2) = 0.5.
    ground_truth, predictions = federated_case({})
    assert evaluate_lvis_fixed(ground_truth, predictions)["per_category"]["class2"] == pytest.approx(0.5)
    # class2 unknown on image 1 (neither annotated nor negative): the detection is not evaluated.
    ground_truth, predictions = federated_case({1: {"neg_category_ids": []}, 2: {"neg_category_ids": []}})
    assert evaluate_lvis_fixed(ground_truth, predictions)["per_category"]["class2"] == pytest.approx(1.0)
    # class2 verified absent from image 1: a false positive there.
    ground_truth, predictions = federated_case({1: {"neg_category_ids": [2]}, 2: {"neg_category_ids": []}})
    assert evaluate_lvis_fixed(ground_truth, predictions)["per_category"]["class2"] == pytest.approx(0.5)
    # Forcing the COCO semantics on a federated set brings the false positive back.
    ground_truth, predictions = federated_case({1: {"neg_category_ids": []}, 2: {"neg_category_ids": []}})
    assert evaluate_lvis_fixed(ground_truth, predictions, federated=False)["per_category"][
        "class2"
    ] == pytest.approx(0.5)


def test_not_exhaustive_categories_ignore_unmatched_detections_only():
    fields = {1: {"neg_category_ids": []}, 2: {"neg_category_ids": [], "not_exhaustive_category_ids": [2]}}
    ground_truth, predictions = federated_case(fields)
    # An extra, unmatched class2 detection on image 2 with the top score.
    predictions[1] = {
        "image_id": 2,
        "boxes": [[0, 0, 40, 40], [60, 60, 100, 100]],
        "scores": [0.8, 0.99],
        "labels": [2, 2],
    }
    assert evaluate_lvis_fixed(ground_truth, predictions)["per_category"]["class2"] == pytest.approx(1.0)
    fields[2].pop("not_exhaustive_category_ids")
    ground_truth, _ = federated_case(fields)
    assert evaluate_lvis_fixed(ground_truth, predictions)["per_category"]["class2"] == pytest.approx(0.5)
    # The matched detection still counts: dropping it leaves only the ignored one, so recall is 0.
    fields[2]["not_exhaustive_category_ids"] = [2]
    ground_truth, _ = federated_case(fields)
    predictions[1] = {"image_id": 2, "boxes": [[60, 60, 100, 100]], "scores": [0.99], "labels": [2]}
    assert evaluate_lvis_fixed(ground_truth, predictions)["per_category"]["class2"] == 0.0


def test_partial_negative_lists_are_rejected_unless_mode_is_explicit():
    ground_truth, predictions = federated_case({1: {"neg_category_ids": []}})
    with pytest.raises(ValueError, match="neg_category_ids"):
        evaluate_lvis_fixed(ground_truth, predictions)
    assert evaluate_lvis_fixed(ground_truth, predictions, federated=True)["per_category"][
        "class2"
    ] == pytest.approx(1.0)


def test_frequency_groups():
    ground_truth = make_ground_truth(
        {1: [([0, 0, 40, 40], 1), ([50, 50, 40, 40], 2), ([0, 60, 30, 30], 3)]}, num_categories=4
    )
    for category, frequency in zip(ground_truth["categories"], "rcff"):
        category["frequency"] = frequency
    predictions = [
        {"image_id": 1, "boxes": [[0, 0, 40, 40], [50, 50, 90, 90]], "scores": [0.9, 0.8], "labels": [1, 2]}
    ]
    results = evaluate_lvis_fixed(ground_truth, predictions)
    assert results["APr"] == pytest.approx(1.0)
    assert results["APc"] == pytest.approx(1.0)
    assert results["APf"] == 0.0  # class3 missed, class4 has no box (undefined, left out of the mean)
    assert math.isnan(results["per_category"]["class4"])
    # Without frequency tags the keys are absent; a bad tag is an error.
    plain = make_ground_truth({1: [([0, 0, 40, 40], 1)]})
    assert "APr" not in evaluate_lvis_fixed(plain, predictions[:0])
    plain["categories"][0]["frequency"] = "x"
    with pytest.raises(ValueError, match="frequency"):
        evaluate_lvis_fixed(plain, [])


def test_no_predictions_gives_zero():
    ground_truth, _ = random_case(0)
    results = evaluate_lvis_fixed(ground_truth, [])
    assert results["AP"] == 0.0
    assert results["num_detections"] == 0
