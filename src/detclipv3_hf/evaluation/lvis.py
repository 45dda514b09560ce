"""LVIS "fixed AP" (Dave et al. 2021, "Evaluating Large-Vocabulary Object Detectors: The Devil is in the
Details") on top of pycocotools, without the `lvis` package.

Fixed AP removes the per-image detection cap (which lets AP depend on how a detector spreads its budget over
categories) and instead keeps, for each category, its `max_dets_per_category` (10,000) highest-scoring
detections over the whole dataset. Matching and accumulation are pycocotools' (identical arithmetic to
``lvis.LVISEval``); the federated-annotation rules of LVIS are added by a small `COCOeval` subclass, after
``lvis/eval.py`` of lvis-api:

- a detection of category ``c`` on image ``i`` is evaluated only if ``c`` is annotated in ``i`` or listed in
  ``i["neg_category_ids"]`` (verified absent, so its detections are false positives); otherwise nobody knows
  whether ``c`` is there and the detection is dropped;
- for a category in ``i["not_exhaustive_category_ids"]``, detections that match no ground-truth box are
  ignored rather than counted as false positives.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .coco import (
    GroundTruth,
    _check_category_ids,
    _quiet,
    build_detections_coco,
    load_coco_ground_truth,
    per_category_average_precision,
    predictions_to_coco_results,
    summarize_average_precision,
    summarize_average_recall,
)

DEFAULT_MAX_DETS_PER_CATEGORY = 10_000
FREQUENCY_GROUPS = ("r", "c", "f")


class FederatedCOCOeval(COCOeval):
    """`COCOeval` with LVIS' federated rules (negative and not-exhaustive category lists per image).

    Args:
        coco_gt: Ground truth; with ``federated=True`` its images' ``neg_category_ids`` are read (missing =
            empty) and their ``not_exhaustive_category_ids`` always (missing = empty).
        coco_dt: Detections.
        federated: Drop detections of categories neither annotated nor negative in their image.
    """

    def __init__(self, coco_gt: COCO, coco_dt: COCO, *, federated: bool) -> None:
        super().__init__(coco_gt, coco_dt, iouType="bbox")
        self.federated = federated
        images = coco_gt.dataset["images"]
        self.negative_categories = {image["id"]: set(image.get("neg_category_ids", ())) for image in images}
        self.not_exhaustive_categories = {
            image["id"]: set(image.get("not_exhaustive_category_ids", ())) for image in images
        }

    def _prepare(self) -> None:
        super()._prepare()
        if not self.federated:
            return
        # Categories known to be present in each image: those with a ground-truth box there (crowd boxes
        # count, they are annotations of the category).
        positive = defaultdict(set)
        for image_id, category_id in self._gts:
            if self._gts[image_id, category_id]:
                positive[image_id].add(category_id)
        for image_id, category_id in list(self._dts):
            known = positive[image_id] | self.negative_categories.get(image_id, set())
            if category_id not in known:
                del self._dts[image_id, category_id]

    def evaluateImg(self, imgId: int, catId: int, aRng: list[float], maxDet: int) -> dict[str, Any] | None:
        result = super().evaluateImg(imgId, catId, aRng, maxDet)
        if result is not None and catId in self.not_exhaustive_categories.get(imgId, ()):
            # Unmatched detections (match id 0) of a not-exhaustively annotated category may well be
            # unannotated true objects: ignore them instead of counting false positives.
            result["dtIgnore"] = np.logical_or(result["dtIgnore"], result["dtMatches"] == 0)
        return result


def limit_detections_per_category(
    results: Sequence[Mapping[str, Any]], max_dets_per_category: int = DEFAULT_MAX_DETS_PER_CATEGORY
) -> list[Mapping[str, Any]]:
    """Keeps the `max_dets_per_category` highest-scoring results of every category over the whole dataset.

    Args:
        results: COCO results list (``category_id``, ``score`` per entry).
        max_dets_per_category: Cap per category (fixed AP: 10,000).

    Returns:
        The kept results, in input order. Ties at the cut are broken by input order (stable sort).
    """
    if isinstance(max_dets_per_category, bool) or not isinstance(max_dets_per_category, int):
        raise TypeError(f"max_dets_per_category must be an int, got {type(max_dets_per_category)}")
    if max_dets_per_category < 1:
        raise ValueError(f"max_dets_per_category must be >= 1, got {max_dets_per_category}")
    by_category: dict[int, list[int]] = defaultdict(list)
    for index, result in enumerate(results):
        by_category[result["category_id"]].append(index)
    keep: list[int] = []
    for indices in by_category.values():
        if len(indices) > max_dets_per_category:
            scores = np.array([results[i]["score"] for i in indices])
            order = np.argsort(-scores, kind="stable")[:max_dets_per_category]
            indices = [indices[i] for i in order]
        keep.extend(indices)
    return [results[i] for i in sorted(keep)]


def _is_federated(coco_gt: COCO, federated: bool | None) -> bool:
    if federated is not None:
        return bool(federated)
    has_negatives = ["neg_category_ids" in image for image in coco_gt.dataset["images"]]
    if any(has_negatives) and not all(has_negatives):
        raise ValueError(
            "some ground-truth images carry 'neg_category_ids' and others do not; pass federated=True "
            "(missing lists count as empty) or federated=False (COCO-style exhaustive evaluation)"
        )
    return bool(has_negatives) and all(has_negatives)


def _frequency_groups(coco_gt: COCO, category_ids: Sequence[int]) -> dict[str, list[int]]:
    """Positions in `category_ids` of rare / common / frequent categories; empty when none is tagged."""
    groups: dict[str, list[int]] = {group: [] for group in FREQUENCY_GROUPS}
    for index, category_id in enumerate(category_ids):
        frequency = coco_gt.cats[category_id].get("frequency")
        if frequency is None:
            continue
        if frequency not in groups:
            raise ValueError(
                f"category {category_id} has frequency {frequency!r}; expected one of {FREQUENCY_GROUPS}"
            )
        groups[frequency].append(index)
    return groups if any(groups.values()) else {}


def evaluate_lvis_fixed(
    ground_truth: GroundTruth,
    predictions: Sequence[Mapping[str, Any]],
    max_dets_per_category: int = DEFAULT_MAX_DETS_PER_CATEGORY,
    category_ids: Sequence[int] | None = None,
    *,
    federated: bool | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """LVIS fixed AP: no per-image cap, at most `max_dets_per_category` detections per category.

    Args:
        ground_truth: LVIS- or COCO-format dict / JSON path / `COCO` (``bbox`` xywh absolute pixels).
            Categories may carry ``frequency`` in ``"r" | "c" | "f"``; images may carry
            ``neg_category_ids`` and ``not_exhaustive_category_ids``.
        predictions: Per-image dicts with ``boxes`` (K, 4) xyxy absolute pixels, ``scores``, ``labels``
            (dataset category ids); see `detclipv3_hf.evaluation.coco`.
        max_dets_per_category: Detections kept per category over the dataset (highest scores first). The
            cap is applied to the submitted detections, before the federated filter, as in the paper.
        category_ids: Evaluate only these category ids (default: all).
        federated: Apply LVIS' federated filter (see the module docstring). None: on when every image
            carries ``neg_category_ids``, off when none does (a COCO-style, exhaustively labelled set).
        verbose: Let pycocotools print its progress.

    Returns:
        ``{"AP", "AP50", "AP75", "APs", "APm", "APl", ["APr", "APc", "APf"], f"AR@{cap}/cat", "ARs",
        "ARm", "ARl": float, "per_category": {name: AP}, "num_images": int, "num_detections": int}``.
        The frequency metrics are present when categories carry ``frequency``; NaN marks undefined values.
    """
    coco_gt = load_coco_ground_truth(ground_truth, verbose=verbose)
    category_ids = _check_category_ids(coco_gt, category_ids)
    use_federated = _is_federated(coco_gt, federated)
    results = predictions_to_coco_results(
        predictions, image_ids=set(coco_gt.getImgIds()), category_ids=set(coco_gt.getCatIds())
    )
    results = limit_detections_per_category(results, max_dets_per_category)
    coco_dt = build_detections_coco(coco_gt, results, verbose=verbose)

    coco_eval = FederatedCOCOeval(coco_gt, coco_dt, federated=use_federated)
    coco_eval.params.catIds = category_ids
    # "No per-image cap": pycocotools always truncates each image to maxDets[-1], so set it to the largest
    # number of detections any image holds after the per-category cap.
    detections_per_image = Counter(result["image_id"] for result in results)
    coco_eval.params.maxDets = [max([1, *detections_per_image.values()])]
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
    }
    for group, indices in _frequency_groups(coco_gt, category_ids).items():
        metrics[f"AP{group}"] = (
            summarize_average_precision(coco_eval, category_indices=indices) if indices else float("nan")
        )
    metrics[f"AR@{max_dets_per_category}/cat"] = summarize_average_recall(coco_eval)
    for area, key in (("small", "ARs"), ("medium", "ARm"), ("large", "ARl")):
        metrics[key] = summarize_average_recall(coco_eval, area=area)
    metrics["per_category"] = per_category_average_precision(coco_eval, coco_gt)
    metrics["num_images"] = len(coco_eval.params.imgIds)
    metrics["num_detections"] = len(results)
    return metrics
