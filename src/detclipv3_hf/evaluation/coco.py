"""COCO box AP on top of pycocotools, plus the shared prediction / results-JSON plumbing of this package.

Predictions come in as plain data, one entry per image::

    {"image_id": int,
     "boxes": (K, 4) xyxy absolute pixels of the original image (torch.Tensor, np.ndarray or nested list),
     "scores": (K,),
     "labels": (K,) int category ids of the dataset (the ``id`` field of the ground truth's categories)}

Ground truth is a COCO-format dict (``images``, ``annotations`` with ``bbox`` in xywh absolute pixels,
``categories``), a path to such a JSON file, or a ready ``pycocotools.coco.COCO``.

Metric values that pycocotools reports as ``-1`` ("undefined": e.g. ``APs`` when no ground-truth box is
small) are returned as ``float("nan")`` so that nobody averages a sentinel by accident; :func:`save_results`
writes them as JSON ``null``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

GroundTruth = Mapping[str, Any] | str | os.PathLike | COCO

# Keys of an evaluation dict that are not scalar metrics (see `build_results_record`).
NON_METRIC_KEYS = ("per_category", "num_images", "num_detections")

# pycocotools' default area ranges, in the order of `Params.areaRngLbl`.
_AREA_LABELS = ("all", "small", "medium", "large")


# --------------------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Swallows pycocotools' progress prints (it writes straight to stdout) unless `verbose`."""
    if verbose:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _normalize_ground_truth_dict(dataset: Mapping[str, Any]) -> dict[str, Any]:
    """Returns a validated deep copy of a COCO-format dict with the fields pycocotools silently relies on.

    - ``iscrowd`` defaults to 0 and ``area`` to the box's ``w * h`` (LVIS annotations carry no ``iscrowd``;
      pycocotools raises a bare KeyError on both).
    - Annotation ids must be unique and non-zero: pycocotools marks "unmatched" with id 0 in its match
      arrays, so a ground-truth box with id 0 would count as never matched. Offending ids are renumbered.
    """
    for key in ("images", "annotations", "categories"):
        if key not in dataset or not isinstance(dataset[key], list):
            raise ValueError(f"ground truth must have a list under {key!r}; got keys {sorted(dataset)}")
    dataset = copy.deepcopy(dict(dataset))
    image_ids = {image["id"] for image in dataset["images"]}
    category_ids = {category["id"] for category in dataset["categories"]}
    annotations = dataset["annotations"]
    for index, annotation in enumerate(annotations):
        bbox = annotation.get("bbox")
        if bbox is None or len(bbox) != 4:
            raise ValueError(f"annotation #{index} needs a 4-number 'bbox' (xywh pixels), got {bbox!r}")
        if annotation.get("image_id") not in image_ids:
            raise ValueError(f"annotation #{index} refers to unknown image_id {annotation.get('image_id')!r}")
        if annotation.get("category_id") not in category_ids:
            raise ValueError(
                f"annotation #{index} refers to unknown category_id {annotation.get('category_id')!r}"
            )
        annotation.setdefault("iscrowd", 0)
        annotation.setdefault("area", float(bbox[2]) * float(bbox[3]))
    ids = [annotation.get("id") for annotation in annotations]
    if any(i is None or i == 0 for i in ids) or len(set(ids)) != len(ids):
        for new_id, annotation in enumerate(annotations, start=1):
            annotation["id"] = new_id
    return dataset


def load_coco_ground_truth(ground_truth: GroundTruth, *, verbose: bool = False) -> COCO:
    """Builds a pycocotools `COCO` index from a dict, a JSON path or an existing `COCO`.

    Args:
        ground_truth: COCO-format dict (``bbox`` xywh absolute pixels), path to a JSON file, or a `COCO`
            (used as is when its annotations already satisfy the contract below, else re-indexed from a
            normalised copy of its ``dataset``).
        verbose: Let pycocotools print its progress.

    Returns:
        A `COCO` whose annotations all carry ``iscrowd``, ``area`` and a unique non-zero ``id``.

    Raises:
        TypeError: `ground_truth` is of another type.
        ValueError: Required keys are missing or annotations refer to unknown images / categories.
    """
    if isinstance(ground_truth, COCO):
        annotations = ground_truth.dataset.get("annotations", [])
        ids = [annotation.get("id") for annotation in annotations]
        if (
            all("iscrowd" in a and "area" in a for a in annotations)
            and 0 not in ids
            and None not in ids
            and len(set(ids)) == len(ids)
        ):
            return ground_truth
        ground_truth = ground_truth.dataset
    if isinstance(ground_truth, (str, os.PathLike)):
        with open(ground_truth) as handle:
            ground_truth = json.load(handle)
    if not isinstance(ground_truth, Mapping):
        raise TypeError(
            f"ground_truth must be a COCO dict, a JSON path or a pycocotools COCO, got {type(ground_truth)}"
        )
    coco = COCO()
    coco.dataset = _normalize_ground_truth_dict(ground_truth)
    with _quiet(verbose):
        coco.createIndex()
    return coco


# --------------------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------------------
def _to_numpy(value: Any, name: str, image_id: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64).numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"prediction {name!r} of image {image_id!r} is not numeric: {type(value)}") from error
    if not np.all(np.isfinite(array)):
        raise ValueError(f"prediction {name!r} of image {image_id!r} contains NaN or inf")
    return array


def _check_image_id(entry: Any, index: int) -> int:
    if not isinstance(entry, Mapping):
        raise TypeError(f"prediction #{index} must be a dict, got {type(entry)}")
    image_id = entry.get("image_id")
    if isinstance(image_id, torch.Tensor) and image_id.numel() == 1:
        image_id = image_id.item()
    if isinstance(image_id, (bool, float)) or not isinstance(image_id, (int, np.integer)):
        raise TypeError(f"prediction #{index} needs an int 'image_id', got {image_id!r}")
    return int(image_id)


def prediction_boxes_and_scores(entry: Mapping[str, Any], index: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Validates and returns ``(image_id, boxes (K, 4) xyxy float64, scores (K,) float64)`` of one entry.

    Raises:
        TypeError / ValueError: naming the image and the field at fault.
    """
    image_id = _check_image_id(entry, index)
    for key in ("boxes", "scores"):
        if key not in entry:
            raise ValueError(f"prediction of image {image_id} lacks {key!r}; has {sorted(entry)}")
    boxes = _to_numpy(entry["boxes"], "boxes", image_id)
    scores = _to_numpy(entry["scores"], "scores", image_id)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"prediction 'boxes' of image {image_id} must have shape (K, 4), got {boxes.shape}")
    if scores.shape != (boxes.shape[0],):
        raise ValueError(
            f"prediction 'scores' of image {image_id} must have shape ({boxes.shape[0]},), got {scores.shape}"
        )
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise ValueError(f"prediction 'boxes' of image {image_id} must be xyxy with x2 >= x1 and y2 >= y1")
    return image_id, boxes, scores


def _prediction_labels(entry: Mapping[str, Any], image_id: int, num_boxes: int) -> np.ndarray:
    if "labels" not in entry:
        raise ValueError(f"prediction of image {image_id} lacks 'labels'; has {sorted(entry)}")
    labels = _to_numpy(entry["labels"], "labels", image_id)
    if labels.shape != (num_boxes,):
        raise ValueError(
            f"prediction 'labels' of image {image_id} must have shape ({num_boxes},), got {labels.shape}"
        )
    if np.any(labels != np.round(labels)):
        raise ValueError(f"prediction 'labels' of image {image_id} must be integer category ids")
    return labels.astype(np.int64)


def predictions_to_coco_results(
    predictions: Sequence[Mapping[str, Any]],
    *,
    image_ids: Sequence[int] | set[int] | None = None,
    category_ids: Sequence[int] | set[int] | None = None,
) -> list[dict[str, Any]]:
    """Converts per-image predictions (xyxy pixels) into a COCO results list (xywh pixels).

    Args:
        predictions: One dict per image with ``image_id``, ``boxes`` (K, 4) xyxy absolute pixels,
            ``scores`` (K,) and ``labels`` (K,) dataset category ids. An image may appear at most once
            (a repeated image usually means a distributed sampler padded the dataset, which would count
            its detections twice).
        image_ids: When given, every ``image_id`` must be one of these.
        category_ids: When given, every label must be one of these.

    Returns:
        ``[{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}, ...]`` with plain
        Python numbers (JSON-serialisable), in input order.

    Raises:
        TypeError / ValueError: On malformed entries, repeated or unknown images, unknown labels.
    """
    if isinstance(predictions, Mapping) or not isinstance(predictions, Sequence):
        raise TypeError(f"predictions must be a list of per-image dicts, got {type(predictions)}")
    known_images = None if image_ids is None else set(image_ids)
    known_categories = None if category_ids is None else set(category_ids)
    seen: set[int] = set()
    results: list[dict[str, Any]] = []
    for index, entry in enumerate(predictions):
        image_id, boxes, scores = prediction_boxes_and_scores(entry, index)
        labels = _prediction_labels(entry, image_id, len(boxes))
        if image_id in seen:
            raise ValueError(f"image_id {image_id} appears in more than one prediction entry")
        seen.add(image_id)
        if known_images is not None and image_id not in known_images:
            raise ValueError(f"prediction image_id {image_id} is not an image of the ground truth")
        if known_categories is not None:
            unknown = sorted(set(labels.tolist()) - known_categories)
            if unknown:
                raise ValueError(
                    f"prediction labels {unknown} of image {image_id} are not ground-truth categories"
                )
        widths_heights = boxes[:, 2:] - boxes[:, :2]
        for box, size, score, label in zip(boxes, widths_heights, scores, labels):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [float(box[0]), float(box[1]), float(size[0]), float(size[1])],
                    "score": float(score),
                }
            )
    return results


def build_detections_coco(
    ground_truth: COCO, results: Sequence[Mapping[str, Any]], *, verbose: bool = False
) -> COCO:
    """Indexes a COCO results list as a `COCO` object, like ``COCO.loadRes`` but also for an empty list.

    ``loadRes`` indexes ``anns[0]`` and so crashes when a model detected nothing; it also adds polygon
    segmentations that box evaluation never reads. Detection ids start at 1 because pycocotools uses 0 as
    "unmatched".
    """
    annotations = []
    for det_id, result in enumerate(results, start=1):
        x, y, w, h = result["bbox"]
        annotations.append({**result, "area": float(w) * float(h), "id": det_id, "iscrowd": 0})
    detections = COCO()
    detections.dataset = {
        "images": list(ground_truth.dataset["images"]),
        "categories": copy.deepcopy(ground_truth.dataset["categories"]),
        "annotations": annotations,
    }
    with _quiet(verbose):
        detections.createIndex()
    return detections


# --------------------------------------------------------------------------------------------------------
# Summaries (read from COCOeval.eval; same arithmetic as COCOeval.summarize, without its prints and
# without its hard-coded three maxDets)
# --------------------------------------------------------------------------------------------------------
def _mean_defined(values: np.ndarray) -> float:
    """Mean of the entries pycocotools did not mark undefined (-1); NaN when none is defined."""
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else math.nan


def summarize_average_precision(
    coco_eval: COCOeval,
    *,
    iou_threshold: float | None = None,
    area: str = "all",
    max_dets: int | None = None,
    category_indices: Sequence[int] | None = None,
) -> float:
    """AP averaged over IoU thresholds (or at one), recall thresholds and categories, after `accumulate`.

    Args:
        coco_eval: An accumulated `COCOeval`.
        iou_threshold: One of ``params.iouThrs`` (e.g. 0.5); None averages over all of them.
        area: ``"all" | "small" | "medium" | "large"``.
        max_dets: One of ``params.maxDets``; None takes the largest.
        category_indices: Positions in ``params.catIds`` to average over; None takes all.

    Returns:
        The mean over defined entries, NaN when nothing is defined (no ground truth in that slice).
    """
    precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
    precision = precision[_iou_index(coco_eval, iou_threshold)]
    if category_indices is not None:
        precision = precision[:, :, list(category_indices)]
    return _mean_defined(precision[:, :, :, _area_index(area), _max_dets_index(coco_eval, max_dets)])


def summarize_average_recall(coco_eval: COCOeval, *, area: str = "all", max_dets: int | None = None) -> float:
    """AR averaged over IoU thresholds and categories (see `summarize_average_precision`)."""
    recall = coco_eval.eval["recall"]  # [T, K, A, M]
    return _mean_defined(recall[:, :, _area_index(area), _max_dets_index(coco_eval, max_dets)])


def _iou_index(coco_eval: COCOeval, iou_threshold: float | None) -> slice | np.ndarray:
    if iou_threshold is None:
        return slice(None)
    index = np.flatnonzero(np.isclose(coco_eval.params.iouThrs, iou_threshold))
    if index.size != 1:
        raise ValueError(f"iou_threshold {iou_threshold} is not one of {coco_eval.params.iouThrs.tolist()}")
    return index


def _area_index(area: str) -> int:
    if area not in _AREA_LABELS:
        raise ValueError(f"area must be one of {_AREA_LABELS}, got {area!r}")
    return _AREA_LABELS.index(area)


def _max_dets_index(coco_eval: COCOeval, max_dets: int | None) -> int:
    max_dets_list = list(coco_eval.params.maxDets)
    if max_dets is None:
        return len(max_dets_list) - 1
    if max_dets not in max_dets_list:
        raise ValueError(f"max_dets {max_dets} is not one of {max_dets_list}")
    return max_dets_list.index(max_dets)


def per_category_average_precision(coco_eval: COCOeval, coco_gt: COCO) -> dict[str, float]:
    """AP@[.5:.95] (area "all", largest maxDets) of every evaluated category, keyed by category name.

    Categories without ground truth in the evaluated images get NaN. Names are used as keys when they are
    unique, otherwise the category ids (as strings, JSON keys are strings).
    """
    category_ids = list(coco_eval.params.catIds)
    names = [coco_gt.cats[category_id].get("name", str(category_id)) for category_id in category_ids]
    keys = names if len(set(names)) == len(names) else [str(category_id) for category_id in category_ids]
    return {
        key: summarize_average_precision(coco_eval, category_indices=[index])
        for index, key in enumerate(keys)
    }


def _check_category_ids(coco_gt: COCO, category_ids: Sequence[int] | None) -> list[int]:
    if category_ids is None:
        return sorted(coco_gt.getCatIds())
    category_ids = sorted({int(category_id) for category_id in category_ids})
    unknown = sorted(set(category_ids) - set(coco_gt.getCatIds()))
    if unknown:
        raise ValueError(f"category_ids {unknown} are not categories of the ground truth")
    if not category_ids:
        raise ValueError("category_ids must not be empty")
    return category_ids


# --------------------------------------------------------------------------------------------------------
# COCO AP
# --------------------------------------------------------------------------------------------------------
def evaluate_coco(
    ground_truth: GroundTruth,
    predictions: Sequence[Mapping[str, Any]],
    max_dets: int = 100,
    category_ids: Sequence[int] | None = None,
    *,
    verbose: bool = False,
) -> dict[str, Any]:
    """Box AP with the COCO protocol (pycocotools' matcher and accumulation).

    Every ground-truth image is evaluated: images without a prediction entry simply have no detections.
    Each image keeps its `max_dets` highest-scoring detections (over all categories, as in pycocotools).

    Args:
        ground_truth: COCO-format dict / JSON path / `COCO` (``bbox`` xywh absolute pixels).
        predictions: Per-image dicts (see the module docstring), boxes xyxy absolute pixels.
        max_dets: Per-image detection cap of the headline metrics (COCO: 100); must be >= 10 because
            AR@1 and AR@10 are reported too.
        category_ids: Evaluate only these ground-truth category ids (default: all).
        verbose: Let pycocotools print its progress and tables.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", f"AR@{max_dets}", "ARs", "ARm",
        "ARl": float, "per_category": {name: AP}, "num_images": int, "num_detections": int}``. Undefined
        values (no ground truth in that slice) are NaN.

    Raises:
        TypeError / ValueError: On malformed input (see `predictions_to_coco_results`).
    """
    if isinstance(max_dets, bool) or not isinstance(max_dets, int) or max_dets < 10:
        raise ValueError(f"max_dets must be an int >= 10, got {max_dets!r}")
    coco_gt = load_coco_ground_truth(ground_truth, verbose=verbose)
    category_ids = _check_category_ids(coco_gt, category_ids)
    results = predictions_to_coco_results(
        predictions, image_ids=set(coco_gt.getImgIds()), category_ids=set(coco_gt.getCatIds())
    )
    coco_dt = build_detections_coco(coco_gt, results, verbose=verbose)
    coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
    coco_eval.params.catIds = category_ids
    coco_eval.params.maxDets = sorted({1, 10, max_dets})
    with _quiet(verbose):
        coco_eval.evaluate()
        coco_eval.accumulate()
    metrics: dict[str, Any] = {
        "AP": summarize_average_precision(coco_eval),
        "AP50": summarize_average_precision(coco_eval, iou_threshold=0.5),
        "AP75": summarize_average_precision(coco_eval, iou_threshold=0.75),
        "APs": summarize_average_precision(coco_eval, area="small"),
        "APm": summarize_average_precision(coco_eval, area="medium"),
        "APl": summarize_average_precision(coco_eval, area="large"),
        "AR@1": summarize_average_recall(coco_eval, max_dets=1),
        "AR@10": summarize_average_recall(coco_eval, max_dets=10),
        f"AR@{max_dets}": summarize_average_recall(coco_eval, max_dets=max_dets),
        "ARs": summarize_average_recall(coco_eval, area="small"),
        "ARm": summarize_average_recall(coco_eval, area="medium"),
        "ARl": summarize_average_recall(coco_eval, area="large"),
    }
    if verbose:
        # Our own table: COCOeval.summarize hard-codes maxDets=100 for AP and prints -1 for other caps.
        for name, value in metrics.items():
            print(f"{name:>8s} = {value:.4f}")
    metrics["per_category"] = per_category_average_precision(coco_eval, coco_gt)
    metrics["num_images"] = len(coco_eval.params.imgIds)
    metrics["num_detections"] = len(results)
    return metrics


# --------------------------------------------------------------------------------------------------------
# Results JSON
# --------------------------------------------------------------------------------------------------------
RESULTS_SCHEMA_DOC = """\
Results JSON (one file per evaluation run), read by model cards:

{
  "task": str,              # e.g. "detection", "detection-lvis-fixed", "vocabulary-free-detection"
  "dataset": str,           # e.g. "coco_2017_val", "lvis_v1_minival"
  "metrics": {str: float | null},   # e.g. "AP", "AP50", "APr", "category_accuracy"; null = undefined
  "per_category": {str: float | null},  # category name (or id) -> AP@[.5:.95]
  "num_images": int,
  ...                       # optional extra keys (model id, date, config) are kept as they are
}
"""


def _json_number(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def build_results_record(
    task: str, dataset: str, evaluation: Mapping[str, Any], **extra: Any
) -> dict[str, Any]:
    """Shapes an `evaluate_*` output into the results-JSON schema (see `RESULTS_SCHEMA_DOC`).

    Args:
        task: Name of the evaluated task.
        dataset: Name of the evaluated dataset split.
        evaluation: Output of `evaluate_coco`, `evaluate_lvis_fixed` or `evaluate_vocab_free`: scalar
            metrics plus ``per_category`` and ``num_images``.
        **extra: Further JSON-serialisable top-level fields (e.g. ``model="..."``).

    Returns:
        ``{"task", "dataset", "metrics", "per_category", "num_images", **extra}`` with NaN turned into None.
    """
    if not isinstance(task, str) or not task or not isinstance(dataset, str) or not dataset:
        raise ValueError(f"task and dataset must be non-empty strings, got {task!r}, {dataset!r}")
    metrics = {name: _json_number(value) for name, value in evaluation.items() if name not in NON_METRIC_KEYS}
    per_category = {
        str(name): _json_number(value) for name, value in evaluation.get("per_category", {}).items()
    }
    record: dict[str, Any] = {
        "task": task,
        "dataset": dataset,
        "metrics": metrics,
        "per_category": per_category,
        "num_images": int(evaluation.get("num_images", 0)),
    }
    reserved = set(record) & set(extra)
    if reserved:
        raise ValueError(f"extra fields {sorted(reserved)} would overwrite the schema's own fields")
    record.update(extra)
    return record


def _validate_results_record(results: Mapping[str, Any]) -> None:
    for key, kind in (("task", str), ("dataset", str), ("metrics", Mapping), ("num_images", int)):
        if not isinstance(results.get(key), kind):
            raise ValueError(f"results[{key!r}] must be a {kind.__name__}, got {results.get(key)!r}")
    for section in ("metrics", "per_category"):
        for name, value in results.get(section, {}).items():
            if value is not None and not isinstance(value, (int, float)):
                raise ValueError(f"results[{section!r}][{name!r}] must be a number or None, got {value!r}")


def save_results(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Writes a results record (see `RESULTS_SCHEMA_DOC`, built by `build_results_record`) as strict JSON.

    Non-finite numbers become ``null`` (JSON has no NaN); the parent folder is created.

    Returns:
        The written path.

    Raises:
        ValueError: The record does not follow the schema.
    """
    _validate_results_record(results)
    cleaned = dict(results)
    for section in ("metrics", "per_category"):
        if section in cleaned:
            cleaned[section] = {
                str(name): None if value is None else _json_number(value)
                for name, value in cleaned[section].items()
            }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cleaned, indent=2, allow_nan=False) + "\n")
    return path


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Reads and validates a results JSON written by `save_results`."""
    results = json.loads(Path(path).read_text())
    if not isinstance(results, dict):
        raise ValueError(f"{path} does not hold a results record (a JSON object)")
    _validate_results_record(results)
    return results
