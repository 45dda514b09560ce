"""Data layer: one record format, readers, concept sampling, augmentation and a synthetic world.

Builds on ``datasets``, PIL, numpy, torch and torchvision (plus ``tokenizers`` and ``CLIPTokenizer`` for the offline
tokenizer); never imports the model files.
"""

from .concepts import (
    DETECTION_MAX_CONCEPTS,
    GROUNDING_MAX_CONCEPTS,
    ConceptDictionary,
    ConceptTargets,
    build_targets,
    record_positives,
    sample_concepts,
)
from .offline_tokenizer import train_clip_tokenizer
from .readers import (
    RecordError,
    RecordStream,
    SkipStats,
    detect_row_format,
    load_records,
    read_coco,
    read_granucap,
    read_odvg,
)
from .records import DetectionRecord, ObjectAnnotation, clip_record_boxes, validate_record
from .synthetic import (
    CATEGORY_PARENTS,
    SyntheticSplit,
    SyntheticWorld,
    caption_for,
    generate_synthetic_world,
    make_synthetic_sample,
)
from .transforms import (
    Compose,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    TransformResult,
    build_eval_transforms,
    build_train_transforms,
    check_boxes,
    resize_to,
    transform_record,
)

__all__ = [
    "CATEGORY_PARENTS",
    "DETECTION_MAX_CONCEPTS",
    "GROUNDING_MAX_CONCEPTS",
    "Compose",
    "ConceptDictionary",
    "ConceptTargets",
    "DetectionRecord",
    "ObjectAnnotation",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSelect",
    "RecordError",
    "RecordStream",
    "SkipStats",
    "SyntheticSplit",
    "SyntheticWorld",
    "TransformResult",
    "build_eval_transforms",
    "build_targets",
    "build_train_transforms",
    "caption_for",
    "check_boxes",
    "clip_record_boxes",
    "detect_row_format",
    "generate_synthetic_world",
    "load_records",
    "make_synthetic_sample",
    "read_coco",
    "read_granucap",
    "read_odvg",
    "record_positives",
    "resize_to",
    "sample_concepts",
    "train_clip_tokenizer",
    "transform_record",
    "validate_record",
]
