"""detclipv3-hf: DetCLIPv3 open-vocabulary detection and hierarchical object captioning for transformers.

Importing the package registers its classes with the transformers Auto classes (config, models, image processors,
processor) so that `AutoModelForZeroShotObjectDetection.from_pretrained(folder)` and
`pipeline("zero-shot-object-detection", model=folder)` work on a DetCLIPv3 checkpoint, and for remote code, so that
`save_pretrained` folders load with `trust_remote_code=True` where this package is not installed.
`DetClipV3ZeroShotObjectDetectionPipeline` (`pipeline(..., pipeline_class=...)`) runs all labels in one forward.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
)

from .configuration_detclipv3 import DetClipV3CaptionerConfig, DetClipV3Config
from .hub import write_model_card as _write_model_card
from .image_processing_detclipv3 import DetClipV3ImageProcessor, image_processor_backends
from .image_processing_pil_detclipv3 import DetClipV3ImageProcessorPil
from .modeling_detclipv3 import (
    DetClipV3Captioner,
    DetClipV3CaptioningOutput,
    DetClipV3DetectionOutput,
    DetClipV3ForObjectCaptioning,
    DetClipV3ForObjectDetection,
    DetClipV3Model,
    DetClipV3ModelOutput,
    DetClipV3ObjectLabelsOutput,
    DetClipV3PreTrainedModel,
)
from .pipelines import (
    DetClipV3ObjectCaptioningPipeline,
    DetClipV3ZeroShotObjectDetectionPipeline,
    register_pipelines,
)
from .processing_detclipv3 import DetClipV3Processor, parse_hierarchical_label

__version__ = "0.1.0"

AutoConfig.register(DetClipV3Config.model_type, DetClipV3Config, exist_ok=True)
AutoModel.register(DetClipV3Config, DetClipV3Model, exist_ok=True)
AutoModelForZeroShotObjectDetection.register(DetClipV3Config, DetClipV3ForObjectDetection, exist_ok=True)
AutoModelForImageTextToText.register(DetClipV3Config, DetClipV3ForObjectCaptioning, exist_ok=True)
AutoImageProcessor.register(DetClipV3Config, image_processor_classes=image_processor_backends(), exist_ok=True)
AutoProcessor.register(DetClipV3Config, DetClipV3Processor, exist_ok=True)

# Remote code: `save_pretrained` copies the model / processor files next to the weights and writes `auto_map`, so a
# saved folder loads with `trust_remote_code=True` where this package is not installed.
DetClipV3Config.register_for_auto_class("AutoConfig")
DetClipV3Model.register_for_auto_class("AutoModel")
DetClipV3ForObjectDetection.register_for_auto_class("AutoModelForZeroShotObjectDetection")
DetClipV3ForObjectCaptioning.register_for_auto_class("AutoModelForImageTextToText")
for _image_processor_class in image_processor_backends().values():
    _image_processor_class.register_for_auto_class("AutoImageProcessor")
del _image_processor_class
DetClipV3Processor.register_for_auto_class("AutoProcessor")
register_pipelines()
DetClipV3PreTrainedModel.model_card_writer = staticmethod(_write_model_card)

__all__ = [
    "DetClipV3Captioner",
    "DetClipV3CaptionerConfig",
    "DetClipV3CaptioningOutput",
    "DetClipV3ForObjectCaptioning",
    "DetClipV3ObjectLabelsOutput",
    "DetClipV3Config",
    "DetClipV3DetectionOutput",
    "DetClipV3ForObjectDetection",
    "DetClipV3ImageProcessor",
    "DetClipV3ImageProcessorPil",
    "DetClipV3Model",
    "DetClipV3ModelOutput",
    "DetClipV3PreTrainedModel",
    "DetClipV3Processor",
    "DetClipV3ObjectCaptioningPipeline",
    "DetClipV3ZeroShotObjectDetectionPipeline",
    "__version__",
    "parse_hierarchical_label",
]
