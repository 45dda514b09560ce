"""Evaluation of detclipv3-hf predictions: COCO box AP, LVIS fixed AP and vocabulary-free naming.

Everything here takes predictions as plain data (per-image dicts of xyxy pixel boxes, scores and dataset
category ids, or generated category strings) and never imports the model files.
"""

from .coco import (
    NON_METRIC_KEYS,
    RESULTS_SCHEMA_DOC,
    build_results_record,
    evaluate_coco,
    load_coco_ground_truth,
    load_results,
    predictions_to_coco_results,
    save_results,
)
from .lvis import (
    DEFAULT_MAX_DETS_PER_CATEGORY,
    FederatedCOCOeval,
    evaluate_lvis_fixed,
    limit_detections_per_category,
)
from .vocab_free import (
    GeneratedCategoryMapper,
    evaluate_vocab_free,
    map_generated_to_classes,
    match_ground_truth_boxes,
    naming_accuracy,
    normalize_category_name,
)

__all__ = [
    "DEFAULT_MAX_DETS_PER_CATEGORY",
    "NON_METRIC_KEYS",
    "RESULTS_SCHEMA_DOC",
    "FederatedCOCOeval",
    "GeneratedCategoryMapper",
    "build_results_record",
    "evaluate_coco",
    "evaluate_lvis_fixed",
    "evaluate_vocab_free",
    "limit_detections_per_category",
    "load_coco_ground_truth",
    "load_results",
    "map_generated_to_classes",
    "match_ground_truth_boxes",
    "naming_accuracy",
    "normalize_category_name",
    "predictions_to_coco_results",
    "save_results",
]
