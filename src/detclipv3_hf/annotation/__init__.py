"""Auto-annotation pipeline (ARCHITECTURE.md section 6): raw image-text pairs -> GranuCap-style records.

Steps: (1) re-caption with a vision-language model, (2) filter + entity extraction with a language model,
(3) LLaVA-style instruction data, (4) DetCLIPv3 boxes for every entity. See docs/annotation.md.
"""

from .labelling import (
    AssignmentStats,
    BoxLabeller,
    DetClipV3BoxLabeller,
    Detection,
    LabelledObject,
    Vocabulary,
    as_detections,
    assign_entities,
    build_vocabulary,
)
from .models import (
    Recaptioner,
    TextGenerator,
    TransformersRecaptioner,
    TransformersTextGenerator,
    as_recaptioner,
    as_text_generator,
)
from .parsing import Entity, EntityParseResult, FilterResult, parse_entities, parse_filter_answer
from .pipeline import STEPS, AnnotationConfig, StepResult, export_llava_json, run_pipeline, run_step
from .prompts import (
    DEFAULT_EXTRACT_PROMPT,
    DEFAULT_FILTER_PROMPT,
    DEFAULT_INSTRUCTION_PROMPT,
    DEFAULT_RECAPTION_PROMPT,
    PromptTemplates,
    format_prompt,
)
from .steps import BoxLabelStep, ExtractStep, InstructionStep, RecaptionStep
from .storage import InputColumns, ShardWriter, iter_input_records

__all__ = [
    "AnnotationConfig",
    "AssignmentStats",
    "BoxLabelStep",
    "BoxLabeller",
    "DEFAULT_EXTRACT_PROMPT",
    "DEFAULT_FILTER_PROMPT",
    "DEFAULT_INSTRUCTION_PROMPT",
    "DEFAULT_RECAPTION_PROMPT",
    "DetClipV3BoxLabeller",
    "Detection",
    "Entity",
    "EntityParseResult",
    "ExtractStep",
    "FilterResult",
    "InputColumns",
    "InstructionStep",
    "LabelledObject",
    "PromptTemplates",
    "RecaptionStep",
    "Recaptioner",
    "STEPS",
    "ShardWriter",
    "StepResult",
    "TextGenerator",
    "TransformersRecaptioner",
    "TransformersTextGenerator",
    "Vocabulary",
    "as_detections",
    "as_recaptioner",
    "as_text_generator",
    "assign_entities",
    "build_vocabulary",
    "export_llava_json",
    "format_prompt",
    "iter_input_records",
    "parse_entities",
    "parse_filter_answer",
    "run_pipeline",
    "run_step",
]
