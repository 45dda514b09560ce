"""COCO box AP: hand cases with exactly known AP, a cross-check against raw pycocotools, edge cases."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detclipv3_hf.evaluation import (
    build_results_record,
    evaluate_coco,
    load_coco_ground_truth,
    load_results,
    predictions_to_coco_results,
    save_results,
)


def make_ground_truth(
    boxes_per_image: dict[int, list[tuple[list[float], int]]], num_categories: int = 2
) -> dict:
    """COCO dict from {image_id: [(xywh box, category_id), ...]}; 128 px images."""
    images = [{"id": image_id, "width": 128, "height": 128} for image_id in boxes_per_image]
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
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": i, "name": f"class{i}", "supercategory": "thing"} for i in range(1, num_categories + 1)
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def xywh_to_xyxy(box: list[float]) -> list[float]:
    return [box[0], box[1], box[0] + box[2], box[1] + box[3]]


def perfect_predictions(ground_truth: dict) -> list[dict]:
    per_image: dict[int, dict[str, list]] = {
        image["id"]: {"boxes": [], "scores": [], "labels": []} for image in ground_truth["images"]
    }
    for annotation in ground_truth["annotations"]:
        entry = per_image[annotation["image_id"]]
        entry["boxes"].append(xywh_to_xyxy(annotation["bbox"]))
        entry["scores"].append(0.9)
        entry["labels"].append(annotation["category_id"])
    return [
        {
            "image_id": image_id,
            "boxes": torch.tensor(e["boxes"]).reshape(-1, 4),
            "scores": torch.tensor(e["scores"]),
            "labels": torch.tensor(e["labels"], dtype=torch.long),
        }
        for image_id, e in per_image.items()
    ]


# Small (< 32^2), medium and large boxes so every area range is defined.
SIZED_GT = make_ground_truth(
    {
        1: [([2, 2, 20, 20], 1), ([30, 30, 50, 50], 2)],
        2: [([0, 0, 110, 110], 1)],
    }
)


def test_perfect_predictions_give_ap_one_everywhere():
    results = evaluate_coco(SIZED_GT, perfect_predictions(SIZED_GT))
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs", "ARm", "ARl"):
        assert results[key] == pytest.approx(1.0), key
    assert results["per_category"] == {"class1": pytest.approx(1.0), "class2": pytest.approx(1.0)}
    assert results["num_images"] == 2
    assert results["num_detections"] == 3
    json.dumps(results)  # plain Python numbers only


def test_false_positive_ranked_above_the_true_positive_halves_ap():
    # One GT; the false positive (no overlap) has the higher score: precision is 0 then 1/2 at recall 1,
    # so the interpolated precision is 0.5 at every recall threshold and every IoU threshold.
    ground_truth = make_ground_truth({1: [([10, 10, 40, 40], 1)]}, num_categories=1)
    predictions = [
        {
            "image_id": 1,
            "boxes": [[10, 10, 50, 50], [80, 80, 120, 120]],
            "scores": [0.5, 0.9],
            "labels": [1, 1],
        }
    ]
    results = evaluate_coco(ground_truth, predictions)
    assert results["AP"] == pytest.approx(0.5)
    assert results["AP50"] == pytest.approx(0.5)
    assert results["AR@100"] == pytest.approx(1.0)
    assert results["AR@1"] == pytest.approx(0.0)  # the top-1 detection is the false positive


@pytest.mark.parametrize(("height", "expected_ap50", "expected_ap"), [(51, 1.0, 0.1), (49, 0.0, 0.0)])
def test_iou_just_above_and_below_half(height, expected_ap50, expected_ap):
    # GT 100x100, prediction 100 x height inside it: IoU = height / 100.
    ground_truth = make_ground_truth({1: [([0, 0, 100, 100], 1)]}, num_categories=1)
    predictions = [{"image_id": 1, "boxes": [[0, 0, 100, height]], "scores": [0.8], "labels": [1]}]
    results = evaluate_coco(ground_truth, predictions)
    assert results["AP50"] == pytest.approx(expected_ap50)
    assert results["AP75"] == pytest.approx(0.0)
    # Only the 0.5 threshold of the ten in [.5:.95] can match.
    assert results["AP"] == pytest.approx(expected_ap)


def test_no_predictions_at_all_gives_zero_not_a_crash():
    results = evaluate_coco(SIZED_GT, [])
    assert results["AP"] == 0.0
    assert results["AR@100"] == 0.0
    assert results["num_detections"] == 0
    empty_entries = [
        {"image_id": 1, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}
    ]
    assert evaluate_coco(SIZED_GT, empty_entries)["AP"] == 0.0


def test_image_without_predictions_counts_its_boxes_as_missed():
    ground_truth = make_ground_truth({1: [([0, 0, 50, 50], 1)], 2: [([0, 0, 50, 50], 1)]}, num_categories=1)
    predictions = [p for p in perfect_predictions(ground_truth) if p["image_id"] == 1]
    results = evaluate_coco(ground_truth, predictions)
    assert results["AR@100"] == pytest.approx(0.5)
    # Precision 1 up to recall 0.5: 51 of the 101 recall thresholds (0, 0.01, ..., 0.5).
    assert results["AP"] == pytest.approx(51 / 101)


def test_undefined_area_ranges_are_nan():
    ground_truth = make_ground_truth({1: [([0, 0, 100, 100], 1)]}, num_categories=1)
    results = evaluate_coco(ground_truth, perfect_predictions(ground_truth))
    assert results["APl"] == pytest.approx(1.0)
    assert math.isnan(results["APs"]) and math.isnan(results["APm"])


def random_case(seed: int, num_images: int = 6, num_categories: int = 3) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    boxes_per_image = {}
    for image_id in range(1, num_images + 1):
        boxes = []
        for _ in range(rng.integers(1, 6)):
            x, y = rng.uniform(0, 80, size=2)
            w, h = rng.uniform(4, 120 - max(x, y), size=2)
            boxes.append(([float(x), float(y), float(w), float(h)], int(rng.integers(1, num_categories + 1))))
        boxes_per_image[image_id] = boxes
    ground_truth = make_ground_truth(boxes_per_image, num_categories)
    predictions = []
    for image_id, boxes in boxes_per_image.items():
        if image_id == num_images:  # one image without any prediction entry
            continue
        pred_boxes, scores, labels = [], [], []
        for bbox, category_id in boxes:  # jittered copies of GT, sometimes with the wrong label
            x1, y1, x2, y2 = xywh_to_xyxy(bbox)
            jitter = rng.normal(0, 0.1 * min(bbox[2], bbox[3]), size=4)
            x1, y1, x2, y2 = x1 + jitter[0], y1 + jitter[1], x2 + jitter[2], y2 + jitter[3]
            pred_boxes.append([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)])
            scores.append(float(rng.uniform()))
            labels.append(category_id if rng.uniform() < 0.8 else int(rng.integers(1, num_categories + 1)))
        for _ in range(rng.integers(0, 8)):  # random false positives
            x, y = rng.uniform(0, 100, size=2)
            pred_boxes.append(
                [float(x), float(y), float(x + rng.uniform(2, 28)), float(y + rng.uniform(2, 28))]
            )
            scores.append(float(rng.uniform()))
            labels.append(int(rng.integers(1, num_categories + 1)))
        predictions.append(
            {
                "image_id": image_id,
                "boxes": np.array(pred_boxes),
                "scores": np.array(scores),
                "labels": np.array(labels),
            }
        )
    return ground_truth, predictions


def raw_pycocotools_stats(ground_truth: dict, predictions: list[dict]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = json.loads(json.dumps(ground_truth))
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(predictions_to_coco_results(predictions))
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_raw_pycocotools_on_a_random_case(seed):
    ground_truth, predictions = random_case(seed)
    stats = raw_pycocotools_stats(ground_truth, predictions)
    results = evaluate_coco(ground_truth, predictions)
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs", "ARm", "ARl"]
    for key, expected in zip(keys, stats):
        if expected == -1:
            assert math.isnan(results[key]), key
        else:
            assert results[key] == pytest.approx(expected, abs=1e-12), key
    assert 0.0 < results["AP"] < 1.0  # the case is non-trivial
    defined = [v for v in results["per_category"].values() if not math.isnan(v)]
    assert np.mean(defined) == pytest.approx(results["AP"])


def test_tensor_and_numpy_inputs_agree():
    ground_truth, predictions = random_case(3)
    as_tensors = [
        {
            "image_id": p["image_id"],
            "boxes": torch.from_numpy(p["boxes"]).float(),
            "scores": torch.from_numpy(p["scores"]),
            "labels": torch.from_numpy(p["labels"]),
        }
        for p in predictions
    ]
    numpy_results = evaluate_coco(ground_truth, predictions)
    tensor_results = evaluate_coco(ground_truth, as_tensors)
    assert tensor_results["AP"] == pytest.approx(numpy_results["AP"], abs=1e-5)


def test_per_image_cap_drops_lowest_scores():
    # 10 high-score false positives and the true positive last: with max_dets=10 the TP is cut.
    ground_truth = make_ground_truth({1: [([0, 0, 20, 20], 1)]}, num_categories=1)
    boxes = [[60 + i, 60, 80 + i, 80] for i in range(10)] + [[0, 0, 20, 20]]
    scores = [0.9 - 0.01 * i for i in range(10)] + [0.1]
    predictions = [{"image_id": 1, "boxes": boxes, "scores": scores, "labels": [1] * 11}]
    assert evaluate_coco(ground_truth, predictions, max_dets=10)["AP"] == 0.0
    assert evaluate_coco(ground_truth, predictions, max_dets=100)["AP"] == pytest.approx(1 / 11)


def test_category_ids_restricts_evaluation():
    ground_truth = make_ground_truth({1: [([0, 0, 40, 40], 1), ([50, 50, 40, 40], 2)]})
    predictions = [{"image_id": 1, "boxes": [[0, 0, 40, 40]], "scores": [0.9], "labels": [1]}]
    assert evaluate_coco(ground_truth, predictions, category_ids=[1])["AP"] == pytest.approx(1.0)
    results = evaluate_coco(ground_truth, predictions)
    assert results["AP"] == pytest.approx(0.5)
    assert set(evaluate_coco(ground_truth, predictions, category_ids=[1])["per_category"]) == {"class1"}


def test_ground_truth_quirks_are_normalised(tmp_path):
    # Annotation id 0 (pycocotools' "unmatched" marker), no iscrowd, no area: still AP 1.
    ground_truth = {
        "images": [{"id": 7}],
        "annotations": [{"id": 0, "image_id": 7, "category_id": 3, "bbox": [5, 5, 30, 30]}],
        "categories": [{"id": 3, "name": "thing"}],
    }
    predictions = [{"image_id": 7, "boxes": [[5, 5, 35, 35]], "scores": [0.7], "labels": [3]}]
    assert evaluate_coco(ground_truth, predictions)["AP"] == pytest.approx(1.0)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(ground_truth))
    assert evaluate_coco(str(path), predictions)["AP"] == pytest.approx(1.0)
    assert ground_truth["annotations"][0]["id"] == 0  # the caller's dict is not modified


def test_pycocotools_prints_are_suppressed(capsys):
    evaluate_coco(SIZED_GT, perfect_predictions(SIZED_GT))
    assert capsys.readouterr().out == ""
    evaluate_coco(SIZED_GT, perfect_predictions(SIZED_GT), verbose=True)
    assert "AP50 =" in capsys.readouterr().out


def test_predictions_to_coco_results_converts_xyxy_to_xywh():
    results = predictions_to_coco_results(
        [
            {
                "image_id": 4,
                "boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0]]),
                "scores": torch.tensor([0.25]),
                "labels": torch.tensor([2]),
            }
        ]
    )
    assert results == [{"image_id": 4, "category_id": 2, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.25}]
    assert isinstance(results[0]["score"], float) and isinstance(results[0]["category_id"], int)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"image_id": 1, "boxes": [[0, 0, 1]], "scores": [0.5], "labels": [1]}, "shape"),
        ({"image_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [0.5, 0.4], "labels": [1]}, "scores"),
        ({"image_id": 1, "boxes": [[5, 0, 1, 1]], "scores": [0.5], "labels": [1]}, "x2 >= x1"),
        ({"image_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [float("nan")], "labels": [1]}, "NaN"),
        ({"image_id": 99, "boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [1]}, "not an image"),
        (
            {"image_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [9]},
            "not ground-truth categories",
        ),
        ({"image_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [1.5]}, "integer"),
        ({"image_id": "1", "boxes": [[0, 0, 1, 1]], "scores": [0.5], "labels": [1]}, "image_id"),
        ({"image_id": 1, "boxes": [[0, 0, 1, 1]], "scores": [0.5]}, "labels"),
    ],
)
def test_bad_predictions_raise_clear_errors(entry, message):
    with pytest.raises((ValueError, TypeError), match=message):
        evaluate_coco(SIZED_GT, [entry])


def test_repeated_image_and_bad_arguments_raise():
    entry = perfect_predictions(SIZED_GT)[0]
    with pytest.raises(ValueError, match="more than one"):
        evaluate_coco(SIZED_GT, [entry, entry])
    with pytest.raises(ValueError, match="max_dets"):
        evaluate_coco(SIZED_GT, [], max_dets=5)
    with pytest.raises(ValueError, match="category_ids"):
        evaluate_coco(SIZED_GT, [], category_ids=[42])
    with pytest.raises(ValueError, match="annotations"):
        evaluate_coco({"images": [], "categories": []}, [])
    with pytest.raises(TypeError, match="list of per-image dicts"):
        evaluate_coco(SIZED_GT, entry)


def test_results_json_roundtrip_turns_nan_into_null(tmp_path):
    ground_truth = make_ground_truth({1: [([0, 0, 100, 100], 1)]}, num_categories=2)
    evaluation = evaluate_coco(ground_truth, perfect_predictions(ground_truth))
    record = build_results_record("detection", "toy", evaluation, model="tiny")
    path = save_results(record, tmp_path / "out" / "results.json")
    text = path.read_text()
    assert "NaN" not in text
    loaded = load_results(path)
    assert loaded["task"] == "detection" and loaded["dataset"] == "toy" and loaded["model"] == "tiny"
    assert loaded["num_images"] == 1
    assert loaded["metrics"]["AP"] == pytest.approx(1.0)
    assert loaded["metrics"]["APs"] is None
    assert loaded["per_category"] == {"class1": pytest.approx(1.0), "class2": None}
    assert "per_category" not in loaded["metrics"] and "num_images" not in loaded["metrics"]


def test_save_results_rejects_records_off_schema(tmp_path):
    with pytest.raises(ValueError, match="task"):
        save_results({"dataset": "x", "metrics": {}, "num_images": 1}, tmp_path / "r.json")
    with pytest.raises(ValueError, match="number"):
        save_results(
            {"task": "t", "dataset": "x", "metrics": {"AP": "high"}, "num_images": 1}, tmp_path / "r.json"
        )
    with pytest.raises(ValueError, match="overwrite"):
        build_results_record("t", "x", {"AP": 1.0}, metrics={})


def test_pycocotools_coco_object_is_accepted_and_normalised_when_needed():
    raw = {
        "images": [{"id": 1}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0, 0, 30, 30]}],
        "categories": [{"id": 1, "name": "thing"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = raw
        coco.createIndex()
    predictions = [{"image_id": 1, "boxes": [[0, 0, 30, 30]], "scores": [0.9], "labels": [1]}]
    # The annotation lacks iscrowd/area, on which raw COCOeval would fail with a bare KeyError.
    assert evaluate_coco(coco, predictions)["AP"] == pytest.approx(1.0)
    complete = load_coco_ground_truth(SIZED_GT)
    assert load_coco_ground_truth(complete) is complete
