"""Image processor of DetCLIPv3, PIL backend (portable, CPU only).

Same contract and outputs as `DetClipV3ImageProcessor` (torchvision backend); both share input conversion,
annotation conversion, padding-size rules and post-processing from `image_processing_detclipv3`. Resizing is done
per channel on 32-bit float PIL images (mode "F") so that no uint8 rounding happens and the result matches
torchvision's antialiased bilinear resize within 1e-3 after normalization.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PILImageResampling,
    SizeDict,
    torch_pil_interpolation_mapping,
)
from transformers.processing_utils import Unpack
from transformers.utils import TensorType

from .image_processing_detclipv3 import (
    DetClipV3ImageProcessorKwargs,
    DetClipV3RemoteCodeMixin,
    build_batch_feature,
    check_annotations,
    convert_coco_detection_annotation,
    flatten_images,
    get_resize_output_size,
    padded_batch_size,
    post_process_detection_outputs,
    to_rgb_float_array,
)

__all__ = ["DetClipV3ImageProcessorPil"]


def _pil_resample(resample: Any) -> PIL.Image.Resampling:
    if resample is None:
        return PIL.Image.Resampling.BILINEAR
    if isinstance(resample, (PILImageResampling, int)):
        return PIL.Image.Resampling(int(resample))
    if resample in torch_pil_interpolation_mapping:
        return PIL.Image.Resampling(int(torch_pil_interpolation_mapping[resample]))
    raise ValueError(f"Unsupported `resample` {resample!r} for the PIL backend.")


def resize_float_image(image: np.ndarray, new_size: tuple[int, int], resample: Any) -> np.ndarray:
    """Resizes a (C, H, W) float32 image channel by channel with PIL's float ("F") mode; returns (C, h, w) float32."""
    height, width = new_size
    if tuple(image.shape[-2:]) == (height, width):
        return image
    method = _pil_resample(resample)
    channels = [
        np.asarray(
            PIL.Image.fromarray(channel, mode="F").resize((width, height), resample=method), dtype=np.float32
        )
        for channel in image.astype(np.float32)
    ]
    return np.stack(channels, axis=0)


class DetClipV3ImageProcessorPil(DetClipV3RemoteCodeMixin, PilBackend):
    r"""DetCLIPv3 image processor (PIL backend); same options and outputs as `DetClipV3ImageProcessor`."""

    valid_kwargs = DetClipV3ImageProcessorKwargs
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_pad = True
    do_convert_rgb = True
    size = {"shortest_edge": 800, "longest_edge": 1333}
    default_to_square = False
    box_clip_tolerance = 1.0
    model_input_names = ["pixel_values", "pixel_mask"]

    def __init__(self, **kwargs: Unpack[DetClipV3ImageProcessorKwargs]) -> None:
        super().__init__(**kwargs)

    def preprocess(
        self,
        images: Any,
        annotations: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
        **kwargs: Unpack[DetClipV3ImageProcessorKwargs],
    ) -> BatchFeature:
        r"""Preprocesses images and, optionally, their COCO-detection annotations (see `DetClipV3ImageProcessor`)."""
        return super().preprocess(images, annotations, **kwargs)

    def _preprocess_image_like_inputs(
        self, images: Any, annotations: Any = None, *, input_data_format: Any = None, **kwargs: Any
    ) -> BatchFeature:
        arrays = [
            to_rgb_float_array(img, i, input_data_format) for i, img in enumerate(flatten_images(images))
        ]
        kwargs.pop("device", None)  # the PIL backend works on the CPU
        return self._preprocess(arrays, annotations=check_annotations(annotations, len(arrays)), **kwargs)

    def _preprocess(
        self,
        images: list[np.ndarray],
        annotations: list[Mapping[str, Any]] | None = None,
        do_resize: bool = True,
        size: SizeDict | None = None,
        resample: Any = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_pad: bool = True,
        pad_size: SizeDict | None = None,
        box_clip_tolerance: float = 1.0,
        return_tensors: str | TensorType | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        processed = []
        for image in images:
            if do_resize:
                image = resize_float_image(image, get_resize_output_size(*image.shape[-2:], size), resample)
            if do_rescale:
                image = image * np.float32(rescale_factor)
            if do_normalize:
                mean = np.asarray(image_mean, dtype=np.float32).reshape(-1, 1, 1)
                std = np.asarray(image_std, dtype=np.float32).reshape(-1, 1, 1)
                image = (image - mean) / std
            processed.append(image.astype(np.float32))
        resized_sizes = [tuple(image.shape[-2:]) for image in processed]

        labels = None
        if annotations is not None:
            labels = [
                convert_coco_detection_annotation(
                    ann, i, original_sizes[i], resized_sizes[i], box_clip_tolerance
                )
                for i, ann in enumerate(annotations)
            ]
        height, width = padded_batch_size(resized_sizes, do_pad, pad_size)
        pixel_values = np.zeros((len(processed), 3, height, width), dtype=np.float32)
        pixel_mask = np.zeros((len(processed), height, width), dtype=np.int64)
        for i, (image, (h, w)) in enumerate(zip(processed, resized_sizes)):
            pixel_values[i, :, :h, :w] = image
            pixel_mask[i, :h, :w] = 1
        return build_batch_feature(
            torch.from_numpy(pixel_values), torch.from_numpy(pixel_mask), labels, return_tensors
        )

    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.1,
        target_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
        top_k: int = 100,
        multi_label: bool = False,
    ) -> list[dict[str, torch.Tensor]]:
        """Per-image detections (scores, labels, xyxy boxes); see `post_process_detection_outputs`."""
        return post_process_detection_outputs(
            outputs, threshold=threshold, target_sizes=target_sizes, top_k=top_k, multi_label=multi_label
        )
