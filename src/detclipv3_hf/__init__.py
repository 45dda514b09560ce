"""detclipv3-hf: DetCLIPv3 open-vocabulary detection and hierarchical object captioning for transformers.

Importing the package registers its classes with the transformers Auto classes (config, models, image processors,
processor) so that `AutoModelForZeroShotObjectDetection.from_pretrained(folder)` and
`pipeline("zero-shot-object-detection", model=folder)` work on a DetCLIPv3 checkpoint.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotObjectDetection,
    AutoProcessor,
)

from .configuration_detclipv3 import DetClipV3CaptionerConfig, DetClipV3Config
from .image_processing_detclipv3 import DetClipV3ImageProcessor
from .image_processing_pil_detclipv3 import DetClipV3ImageProcessorPil
from .modeling_detclipv3 import (
    DetClipV3DetectionOutput,
    DetClipV3ForObjectDetection,
    DetClipV3Model,
    DetClipV3ModelOutput,
    DetClipV3PreTrainedModel,
)
from .processing_detclipv3 import DetClipV3Processor, parse_hierarchical_label

__version__ = "0.1.0"

AutoConfig.register(DetClipV3Config.model_type, DetClipV3Config, exist_ok=True)
AutoModel.register(DetClipV3Config, DetClipV3Model, exist_ok=True)
AutoModelForZeroShotObjectDetection.register(DetClipV3Config, DetClipV3ForObjectDetection, exist_ok=True)
AutoImageProcessor.register(
    DetClipV3Config,
    image_processor_classes={"torchvision": DetClipV3ImageProcessor, "pil": DetClipV3ImageProcessorPil},
    exist_ok=True,
)
AutoProcessor.register(DetClipV3Config, DetClipV3Processor, exist_ok=True)

__all__ = [
    "DetClipV3CaptionerConfig",
    "DetClipV3Config",
    "DetClipV3DetectionOutput",
    "DetClipV3ForObjectDetection",
    "DetClipV3ImageProcessor",
    "DetClipV3ImageProcessorPil",
    "DetClipV3Model",
    "DetClipV3ModelOutput",
    "DetClipV3PreTrainedModel",
    "DetClipV3Processor",
    "__version__",
    "parse_hierarchical_label",
]
