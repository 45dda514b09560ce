"""detclipv3-hf: DetCLIPv3 open-vocabulary detection and hierarchical object captioning for transformers."""

from .configuration_detclipv3 import DetClipV3CaptionerConfig, DetClipV3Config

__version__ = "0.1.0"

__all__ = ["DetClipV3CaptionerConfig", "DetClipV3Config", "__version__"]
