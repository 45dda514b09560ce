"""Image processor of DetCLIPv3, torchvision backend, and the helpers both backends share.

The pipeline follows Grounding DINO's image processor (resize keeping the aspect ratio, rescale, ImageNet
normalization, bottom/right padding with a pixel mask, COCO-detection annotations converted to normalized
`cxcywh` boxes) without the segmentation / panoptic formats. What differs:

- Every input image is first turned into a float32 RGB array with values in `[0, 255]` by one shared function
  (`to_rgb_float_array`), so both backends see the very same pixels: EXIF orientation is applied, grayscale,
  palette, RGBA and 16-bit images are converted (16-bit data scaled, not clipped), empty or non-finite images
  are refused with the index of the offending image.
- Resizing is done on float data (bilinear with antialiasing in both backends), which keeps the torchvision and
  the PIL backend within 1e-3 of each other after normalization.
- Post-processing for the detector outputs lives here once (`post_process_detection_outputs`) and is used by
  both image processors and by `DetClipV3Processor`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torchvision.ops import box_convert
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    PILImageResampling,
    SizeDict,
    load_image,
    pil_torch_interpolation_mapping,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

__all__ = [
    "DetClipV3ImageProcessor",
    "DetClipV3ImageProcessorKwargs",
    "DetClipV3RemoteCodeMixin",
    "convert_coco_detection_annotation",
    "flatten_images",
    "get_resize_output_size",
    "image_processor_backends",
    "post_process_detection_outputs",
    "to_rgb_float_array",
]

# Channel counts we know how to turn into RGB: gray, gray+alpha, RGB, RGBA.
_KNOWN_CHANNELS = (1, 2, 3, 4)
_PIL_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_UINT16_MAX = 65535.0


class DetClipV3ImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    box_clip_tolerance (`float`, *optional*, defaults to 1.0):
        How far (in pixels of the original image) an annotation box may exceed the image border before it is
        refused with a `ValueError`. Boxes within the tolerance are clipped to the image (float rounding in
        dataset converters commonly produces such boxes).
    """

    box_clip_tolerance: float


# ----------------------------------------------------------------------------------------------------------
# Input images
# ----------------------------------------------------------------------------------------------------------


def _is_single_image(obj: Any) -> bool:
    if isinstance(obj, PIL.Image.Image):
        return True
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.ndim in (2, 3)
    return False


def flatten_images(images: Any) -> list[PIL.Image.Image | np.ndarray | torch.Tensor]:
    """Turns the accepted image inputs into a flat list of single images.

    Accepted: one image (PIL image, 2-D/3-D numpy array or torch tensor, path or URL string), a 4-D array or tensor
    (a batch), or a list/tuple of such single images.

    Raises:
        TypeError: for anything else, naming the offending type (and index inside a list).
        ValueError: for an empty list or arrays of unsupported rank.
    """
    if isinstance(images, str):
        return [load_image(images)]
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4:
            return list(images)
        if images.ndim not in (2, 3):
            raise ValueError(
                f"An image array must have 2 (H, W), 3 (HWC or CHW) or 4 (batch) dimensions, "
                f"got shape {tuple(images.shape)}."
            )
        return [images]
    if isinstance(images, PIL.Image.Image):
        return [images]
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("`images` is an empty list: at least one image is required.")
        flat = []
        for index, image in enumerate(images):
            if isinstance(image, str):
                image = load_image(image)
            if not _is_single_image(image):
                shape = f" of shape {tuple(image.shape)}" if hasattr(image, "shape") else ""
                raise TypeError(
                    f"Image {index} has type {type(image).__name__}{shape}; expected a PIL image, a path/URL, or a "
                    "2-D/3-D numpy array or torch tensor."
                )
            flat.append(image)
        return flat
    raise TypeError(
        f"`images` has type {type(images).__name__}; expected a PIL image, a numpy array, a torch tensor, a path/URL "
        "or a list of those."
    )


def _pil_to_array(image: PIL.Image.Image, index: int) -> np.ndarray:
    """Converts a PIL image to an RGB float32 array (H, W, 3) in [0, 255]."""
    # EXIF orientation first: every later step (and the annotations) refers to the image as displayed.
    image = PIL.ImageOps.exif_transpose(image)
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"Image {index} is empty: its size (height, width) is ({height}, {width}).")

    if image.mode in _PIL_16BIT_MODES:
        array = np.asarray(image).astype(np.float64)
        if array.min() < 0 or array.max() > _UINT16_MAX:
            raise ValueError(
                f"Image {index} has mode {image.mode!r} with values in [{array.min()}, {array.max()}]; only 16-bit "
                f"data (0..65535) is supported for integer modes."
            )
        return _gray_or_color_to_rgb(array[..., None] * (255.0 / _UINT16_MAX))
    if image.mode == "F":
        return _float_to_rgb(np.asarray(image)[..., None], index)

    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        return _composite_on_white(rgba, alpha_max=255.0)
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _composite_on_white(array: np.ndarray, alpha_max: float) -> np.ndarray:
    """Blends (H, W, 2|4) gray/RGB + alpha on a white background; returns (H, W, 3) in [0, 255]."""
    color, alpha = array[..., :-1], array[..., -1:] / alpha_max
    blended = color * alpha + 255.0 * (1.0 - alpha)
    return _gray_or_color_to_rgb(blended)


def _gray_or_color_to_rgb(array: np.ndarray) -> np.ndarray:
    """(H, W, 1|3) in [0, 255] -> (H, W, 3) float32."""
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array.astype(np.float32)


def _float_to_rgb(array: np.ndarray, index: int) -> np.ndarray:
    """(H, W, C) floating image in [0, 1] -> (H, W, 3) float32 in [0, 255]."""
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"Image {index} contains non-finite pixel values (NaN or inf).")
    low, high = float(array.min()), float(array.max())
    # Floating images follow torchvision's convention (values in [0, 1]); anything else is almost surely an
    # un-normalized 0..255 image, which would silently come out ~255x too bright.
    if low < -1e-3 or high > 1.0 + 1e-3:
        raise ValueError(
            f"Image {index} is a floating-point image with values in [{low:.4g}, {high:.4g}]; floating images must "
            "be in [0, 1]. Pass uint8 (0..255) or uint16 (0..65535) data, or divide by 255."
        )
    return _channels_to_rgb(np.clip(array, 0.0, 1.0) * 255.0, index, alpha_max=255.0)


def _channels_to_rgb(array: np.ndarray, index: int, alpha_max: float) -> np.ndarray:
    channels = array.shape[-1]
    if channels in (2, 4):
        return _composite_on_white(array, alpha_max=alpha_max)
    if channels in (1, 3):
        return _gray_or_color_to_rgb(array)
    raise ValueError(
        f"Image {index} has {channels} channels; expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA)."
    )


def _channels_last(array: np.ndarray, index: int, prefer_first: bool, input_data_format: Any) -> np.ndarray:
    """Returns (H, W, C) for a 2-D or 3-D array, inferring the channel axis when not given."""
    if array.ndim == 2:
        return array[..., None]
    if input_data_format is not None:
        if ChannelDimension(input_data_format) == ChannelDimension.FIRST:
            return np.moveaxis(array, 0, -1)
        return array
    first, last = array.shape[0] in _KNOWN_CHANNELS, array.shape[-1] in _KNOWN_CHANNELS
    if first and (not last or prefer_first):
        return np.moveaxis(array, 0, -1)
    if last:
        return array
    raise ValueError(
        f"Cannot tell the channel axis of image {index} with shape {tuple(array.shape)}: neither the first nor the "
        f"last dimension is a channel count in {_KNOWN_CHANNELS}. Pass `input_data_format`."
    )


def to_rgb_float_array(
    image: PIL.Image.Image | np.ndarray | torch.Tensor, index: int = 0, input_data_format: Any = None
) -> np.ndarray:
    """Converts one input image into the array both backends start from.

    Rules (documented contract):
    - PIL images: EXIF orientation applied (`PIL.ImageOps.exif_transpose`), then palette / gray / CMYK / ... are
      converted to RGB; images with an alpha channel are composited on white; 16-bit modes (`I;16*`, `I`) are
      scaled by 255/65535; mode `F` follows the floating-point rule below.
    - Arrays and tensors: (H, W), (H, W, C) or (C, H, W) with C in {1, 2, 3, 4}. When both the first and last axis
      could be channels, torch tensors are read as CHW and numpy arrays as HWC (each library's convention), unless
      `input_data_format` says otherwise. uint8/bool are 8-bit, uint16 is 16-bit (scaled by 255/65535), other
      integer types must hold values in [0, 255], floating types must be finite and in [0, 1].

    Args:
        image: The image.
        index: Its position in the batch, used in error messages.
        input_data_format: Optional `ChannelDimension` (or "channels_first"/"channels_last") for arrays.

    Returns:
        `np.ndarray` of shape (3, H, W), float32, values in [0, 255].

    Raises:
        ValueError: empty image (0 px wide or high), non-finite or out-of-range values, unknown channel layout.
        TypeError: unsupported image type.
    """
    if isinstance(image, PIL.Image.Image):
        return np.ascontiguousarray(_pil_to_array(image, index).transpose(2, 0, 1))

    is_tensor = isinstance(image, torch.Tensor)
    if is_tensor:
        tensor = image.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        array = tensor.numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"Image {index} has unsupported type {type(image).__name__}.")

    if array.ndim not in (2, 3):
        raise ValueError(f"Image {index} must have 2 or 3 dimensions, got shape {tuple(array.shape)}.")
    array = _channels_last(array, index, prefer_first=is_tensor, input_data_format=input_data_format)
    height, width = array.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(f"Image {index} is empty: its size (height, width) is ({height}, {width}).")

    if array.dtype == np.bool_:
        rgb = _channels_to_rgb(array.astype(np.float32) * 255.0, index, alpha_max=255.0)
    elif array.dtype == np.uint8:
        rgb = _channels_to_rgb(array.astype(np.float32), index, alpha_max=255.0)
    elif array.dtype == np.uint16:
        rgb = _channels_to_rgb(array.astype(np.float32) * (255.0 / _UINT16_MAX), index, alpha_max=255.0)
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"Image {index} has integer type {array.dtype} with values in [{low}, {high}]; integer images other "
                "than uint16 must hold 8-bit values (0..255). Cast 16-bit data to uint16."
            )
        rgb = _channels_to_rgb(array.astype(np.float32), index, alpha_max=255.0)
    elif np.issubdtype(array.dtype, np.floating):
        rgb = _float_to_rgb(array, index)
    else:
        raise TypeError(f"Image {index} has unsupported dtype {array.dtype}.")
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


# ----------------------------------------------------------------------------------------------------------
# Sizes and annotations
# ----------------------------------------------------------------------------------------------------------


def get_resize_output_size(height: int, width: int, size: SizeDict) -> tuple[int, int]:
    """Output (height, width) of the aspect-preserving resize, identical for both backends.

    `size` may hold `shortest_edge` (+ optional `longest_edge`), `max_height` + `max_width`, or `height` + `width`.
    No side becomes smaller than 1 pixel.
    """
    if size.shortest_edge and size.longest_edge:
        new_h, new_w = get_size_with_aspect_ratio((height, width), size.shortest_edge, size.longest_edge)
    elif size.shortest_edge:
        scale = size.shortest_edge / min(height, width)
        new_h, new_w = int(round(height * scale)), int(round(width * scale))
    elif size.max_height and size.max_width:
        scale = min(size.max_height / height, size.max_width / width)
        new_h, new_w = int(round(height * scale)), int(round(width * scale))
    elif size.height and size.width:
        new_h, new_w = size.height, size.width
    else:
        raise ValueError(
            "`size` must contain 'shortest_edge' (optionally with 'longest_edge'), 'max_height' and 'max_width', "
            f"or 'height' and 'width'; got {dict(size)}."
        )
    return max(1, int(new_h)), max(1, int(new_w))


def _annotation_box(obj: Any, image_index: int, box_index: int) -> tuple[list[float], int]:
    if not isinstance(obj, Mapping):
        raise TypeError(
            f"Annotation {box_index} of image {image_index} must be a dict with 'bbox' and 'category_id', "
            f"got {type(obj).__name__}."
        )
    bbox, category = obj.get("bbox"), obj.get("category_id")
    if (
        not isinstance(bbox, Sequence)
        or isinstance(bbox, str)
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        raise ValueError(
            f"Annotation {box_index} of image {image_index}: 'bbox' must be 4 numbers [x, y, width, height] in "
            f"pixels, got {bbox!r}."
        )
    if not all(math.isfinite(v) for v in bbox):
        raise ValueError(f"Annotation {box_index} of image {image_index} has a non-finite box {list(bbox)}.")
    if isinstance(category, bool) or not isinstance(category, (int, np.integer)):
        raise TypeError(
            f"Annotation {box_index} of image {image_index}: 'category_id' must be an int, got {category!r}."
        )
    return [float(v) for v in bbox], int(category)


def convert_coco_detection_annotation(
    annotation: Mapping[str, Any],
    image_index: int,
    original_size: tuple[int, int],
    resized_size: tuple[int, int],
    box_clip_tolerance: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Converts one COCO-detection annotation into the model's `labels` entry.

    Crowd annotations (`iscrowd` = 1) are dropped, as in DETR / Grounding DINO. Boxes are normalized by the
    original image size: since the resize maps the whole image onto the whole resized image, the normalized box
    is exactly the resized box normalized by the resized (un-padded) size.

    Args:
        annotation: `{"image_id": int, "annotations": [{"bbox": [x, y, w, h] (absolute pixels), "category_id": int}]}`.
            A missing `image_id` defaults to `image_index`.
        image_index: Position of the image in the batch (for error messages).
        original_size: (height, width) of the input image, after EXIF transposition.
        resized_size: (height, width) after resizing, before padding.
        box_clip_tolerance: Boxes exceeding the image by at most this many pixels are clipped, farther ones refused.

    Returns:
        `{"boxes": FloatTensor (T, 4) cxcywh in [0, 1], "class_labels": LongTensor (T,), "image_id": LongTensor (1,),
        "orig_size": LongTensor (2,) (h, w), "size": LongTensor (2,) (h, w) resized}`.

    Raises:
        ValueError: a box with non-positive width/height, outside the image, malformed; naming image, annotation
            and box.
        TypeError: malformed annotation containers.
    """
    if not isinstance(annotation, Mapping) or not isinstance(annotation.get("annotations"), (list, tuple)):
        raise TypeError(
            f"The annotation of image {image_index} must be a dict with an 'annotations' list (COCO detection "
            f"format), got {type(annotation).__name__}."
        )
    image_id = annotation.get("image_id", image_index)
    if isinstance(image_id, bool) or not isinstance(image_id, (int, np.integer)):
        raise TypeError(f"The 'image_id' of image {image_index} must be an int, got {image_id!r}.")

    height, width = original_size
    boxes, classes = [], []
    for box_index, obj in enumerate(annotation["annotations"]):
        if isinstance(obj, Mapping) and obj.get("iscrowd", 0):
            continue
        (x, y, w, h), category = _annotation_box(obj, image_index, box_index)
        if w <= 0 or h <= 0:
            raise ValueError(
                f"Annotation {box_index} of image {image_index} has a non-positive width or height: bbox "
                f"[x, y, w, h] = {[x, y, w, h]}."
            )
        x0, y0, x1, y1 = x, y, x + w, y + h
        tol = box_clip_tolerance
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            raise ValueError(
                f"Annotation {box_index} of image {image_index} lies outside the image: bbox [x, y, w, h] = "
                f"{[x, y, w, h]}, image (height, width) = ({height}, {width})."
            )
        x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(
                f"Annotation {box_index} of image {image_index} is empty once clipped to the image: bbox "
                f"[x, y, w, h] = {[x, y, w, h]}, image (height, width) = ({height}, {width})."
            )
        boxes.append([x0, y0, x1, y1])
        classes.append(category)

    boxes_xyxy = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return {
        "boxes": box_convert(boxes_xyxy, "xyxy", "cxcywh") / scale,
        "class_labels": torch.tensor(classes, dtype=torch.int64),
        "image_id": torch.tensor([int(image_id)], dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
        "size": torch.tensor(list(resized_size), dtype=torch.int64),
    }


def check_annotations(annotations: Any, num_images: int) -> list[Mapping[str, Any]] | None:
    """Normalizes `annotations` to a list with one entry per image (a single dict is accepted for one image)."""
    if annotations is None:
        return None
    if isinstance(annotations, Mapping):
        annotations = [annotations]
    if not isinstance(annotations, (list, tuple)):
        raise TypeError(
            f"`annotations` must be a dict (one image) or a list of dicts, got {type(annotations).__name__}."
        )
    if len(annotations) != num_images:
        raise ValueError(f"Got {num_images} images but {len(annotations)} annotations.")
    return list(annotations)


def padded_batch_size(
    sizes: list[tuple[int, int]], do_pad: bool, pad_size: SizeDict | None
) -> tuple[int, int]:
    """(height, width) of the batch canvas: the largest image, `pad_size` if given; refuses impossible layouts."""
    max_h, max_w = max(h for h, _ in sizes), max(w for _, w in sizes)
    if not do_pad:
        if len(set(sizes)) > 1:
            raise ValueError(
                f"Images have different sizes after resizing ({sorted(set(sizes))}) and `do_pad=False`; enable "
                "padding to batch them."
            )
        return max_h, max_w
    if pad_size is not None:
        if not (pad_size.height and pad_size.width):
            raise ValueError(f"`pad_size` must contain 'height' and 'width', got {dict(pad_size)}.")
        if pad_size.height < max_h or pad_size.width < max_w:
            raise ValueError(
                f"`pad_size` ({pad_size.height}, {pad_size.width}) is smaller than the largest resized image "
                f"({max_h}, {max_w})."
            )
        return pad_size.height, pad_size.width
    return max_h, max_w


def _pad_batch(
    images: list[torch.Tensor], sizes: list[tuple[int, int]], do_pad: bool, pad_size: SizeDict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = padded_batch_size(sizes, do_pad, pad_size)
    pixel_values = images[0].new_zeros((len(images), 3, height, width))
    pixel_mask = torch.zeros((len(images), height, width), dtype=torch.int64, device=images[0].device)
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        pixel_values[i, :, :h, :w] = image
        pixel_mask[i, :h, :w] = 1
    return pixel_values, pixel_mask


def build_batch_feature(
    pixel_values: torch.Tensor,
    pixel_mask: torch.Tensor,
    labels: list[dict[str, torch.Tensor]] | None,
    return_tensors: str | TensorType | None,
) -> BatchFeature:
    """Packs the outputs; `return_tensors` None/"pt" gives torch tensors, "np" numpy arrays (labels stay torch)."""
    if return_tensors in (None, "pt", TensorType.PYTORCH):
        data = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
    elif return_tensors in ("np", TensorType.NUMPY):
        data = {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()}
    else:
        raise ValueError(f"`return_tensors` must be None, 'pt' or 'np', got {return_tensors!r}.")
    features = BatchFeature(data)
    if labels is not None:
        features["labels"] = labels
    return features


# ----------------------------------------------------------------------------------------------------------
# Post-processing (shared by both backends and the processor)
# ----------------------------------------------------------------------------------------------------------


def get_output_field(outputs: Any, name: str, required: bool = True) -> Any:
    """Reads `name` from a `ModelOutput`, a dict or any object with attributes; `None` when absent and optional."""
    value = None
    if isinstance(outputs, Mapping):
        value = outputs.get(name)
    if value is None:
        value = getattr(outputs, name, None)
    if value is None and required:
        raise ValueError(f"The model outputs have no `{name}`.")
    return value


def scale_boxes_to_sizes(
    boxes: torch.Tensor, target_sizes: torch.Tensor | Sequence[Sequence[int]] | None, batch_size: int
) -> torch.Tensor:
    """Scales normalized (B, N, 4) xyxy boxes to pixels of `target_sizes` ((B, 2) as (height, width)); no-op if None."""
    if target_sizes is None:
        return boxes
    sizes = torch.as_tensor(
        target_sizes.tolist() if isinstance(target_sizes, torch.Tensor) else target_sizes, dtype=torch.float32
    )
    if sizes.ndim != 2 or sizes.shape != (batch_size, 2):
        raise ValueError(
            f"`target_sizes` must hold one (height, width) pair per image, i.e. shape ({batch_size}, 2); got shape "
            f"{tuple(sizes.shape)}."
        )
    heights, widths = sizes.to(boxes.device).unbind(1)
    scale = torch.stack([widths, heights, widths, heights], dim=1)
    return boxes * scale[:, None, :]


def post_process_detection_outputs(
    outputs: Any,
    threshold: float = 0.1,
    target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    top_k: int = 100,
    multi_label: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Turns detector outputs into per-image detections.

    Args:
        outputs: Has `logits` (B, Q, M) query-concept alignment logits, `pred_boxes` (B, Q, 4) cxcywh normalized to
            the un-padded resized image, and optionally `concept_mask` (B, M) bool (True = real concept; absent means
            all concepts are real). A `ModelOutput`, a dict or any object with these attributes.
        threshold: Keep detections whose score (sigmoid of the best real concept's logit) is > threshold.
        target_sizes: (B, 2) tensor or list of (height, width); boxes are returned in those pixels. When None,
            boxes stay normalized.
        top_k: At most this many detections per image (the highest scores).
        multi_label: When False (default), one detection per box, labelled with its best real concept. When True,
            every (box, real concept) pair is a candidate scored by the sigmoid of its own logit, so a box can come
            back with several labels: the protocol of Deformable DETR's and DINO's COCO evaluation (the top-k over
            all query-class pairs), which `detclipv3 eval` uses.

    Returns:
        One dict per image: `scores` (N,) float sorted descending, `labels` (N,) long index of the (best) real
        concept, `boxes` (N, 4) xyxy (pixels of `target_sizes`, else normalized).
    """
    logits = get_output_field(outputs, "logits")
    pred_boxes = get_output_field(outputs, "pred_boxes")
    concept_mask = get_output_field(outputs, "concept_mask", required=False)
    if logits.ndim != 3:
        raise ValueError(f"`logits` must have shape (batch, queries, concepts), got {tuple(logits.shape)}.")
    batch_size, num_queries, num_concepts = logits.shape
    if tuple(pred_boxes.shape) != (batch_size, num_queries, 4):
        raise ValueError(
            f"`pred_boxes` must have shape ({batch_size}, {num_queries}, 4) to match `logits`, got "
            f"{tuple(pred_boxes.shape)}."
        )
    if concept_mask is None:
        concept_mask = torch.ones(batch_size, num_concepts, dtype=torch.bool, device=logits.device)
    elif tuple(concept_mask.shape) != (batch_size, num_concepts):
        raise ValueError(
            f"`concept_mask` must have shape ({batch_size}, {num_concepts}), got {tuple(concept_mask.shape)}."
        )
    if top_k < 1:
        raise ValueError(f"`top_k` must be >= 1, got {top_k}.")

    boxes = box_convert(pred_boxes.float(), "cxcywh", "xyxy")
    boxes = scale_boxes_to_sizes(boxes, target_sizes, batch_size)
    if num_concepts == 0:
        empty_boxes = boxes.new_zeros(0, 4)
        return [
            {"scores": boxes.new_zeros(0), "labels": torch.zeros(0, dtype=torch.long), "boxes": empty_boxes}
            for _ in range(batch_size)
        ]

    # Padded concept slots must never win the argmax, whatever value the model left in them.
    real = concept_mask.to(device=logits.device, dtype=torch.bool)
    masked = logits.float().masked_fill(~real[:, None, :], float("-inf"))
    if multi_label:
        pair_scores = masked.sigmoid().flatten(1)  # (B, Q * M); padded concepts score exactly 0
        top = pair_scores.topk(min(top_k, pair_scores.shape[1]), dim=1)
        results = []
        for i in range(batch_size):
            keep = (top.values[i] > threshold) & real[i][top.indices[i] % num_concepts]
            index = top.indices[i][keep]
            results.append(
                {
                    "scores": top.values[i][keep],
                    "labels": index % num_concepts,
                    "boxes": boxes[i][index // num_concepts],
                }
            )
        return results
    best_logits, labels = masked.max(dim=-1)
    scores = best_logits.sigmoid()
    has_concept = real.any(dim=-1)

    results = []
    for i in range(batch_size):
        keep = (scores[i] > threshold) & has_concept[i]
        kept_scores = scores[i][keep]
        order = kept_scores.argsort(descending=True)[:top_k]
        results.append(
            {"scores": kept_scores[order], "labels": labels[i][keep][order], "boxes": boxes[i][keep][order]}
        )
    return results


# ----------------------------------------------------------------------------------------------------------
# Remote code: both backends in `auto_map`
# ----------------------------------------------------------------------------------------------------------


def image_processor_backends() -> dict[str, type]:
    """Both image-processor classes under the backend names `AutoImageProcessor` uses ("torchvision", "pil")."""
    # Imported here because the PIL backend builds on this module. Being a relative import of this file, it also
    # makes transformers' `custom_object_save` copy both backend files next to a saved (image) processor.
    from .image_processing_pil_detclipv3 import DetClipV3ImageProcessorPil

    return {"torchvision": DetClipV3ImageProcessor, "pil": DetClipV3ImageProcessorPil}


class DetClipV3RemoteCodeMixin:
    """Writes both backends into the `AutoImageProcessor` entry of `auto_map` when saving remote code.

    transformers writes only the saved instance's class; `AutoImageProcessor.from_pretrained(..., backend=...)`
    reads a `{"torchvision": "module.Class", "pil": "module.Class"}` dict and picks the requested backend.
    """

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict) and "AutoImageProcessor" in auto_map:
            output["auto_map"] = {
                **auto_map,
                "AutoImageProcessor": {
                    backend: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
                    for backend, cls in image_processor_backends().items()
                },
            }
        return output


# ----------------------------------------------------------------------------------------------------------
# Torchvision backend
# ----------------------------------------------------------------------------------------------------------


def _interpolation(resample: Any) -> tvF.InterpolationMode:
    if resample is None:
        return tvF.InterpolationMode.BILINEAR
    if isinstance(resample, tvF.InterpolationMode):
        return resample
    return pil_torch_interpolation_mapping[PILImageResampling(resample)]


class DetClipV3ImageProcessor(DetClipV3RemoteCodeMixin, TorchvisionBackend):
    r"""DetCLIPv3 image processor (torchvision backend).

    Resize keeping the aspect ratio (`size`, default shortest edge 800 / longest 1333, bilinear with antialiasing on
    float data), rescale by 1/255, ImageNet normalization, pad bottom/right to the largest image of the batch (or
    `pad_size`).

    Returns a `BatchFeature` with `pixel_values` (B, 3, H, W) float32, `pixel_mask` (B, H, W) long (1 = real
    pixel) and, when `annotations` are given, `labels`: one dict per image, see
    `convert_coco_detection_annotation` (boxes cxcywh normalized to the resized, un-padded image).

    Inputs are always converted to RGB by `to_rgb_float_array` (the model needs three channels), so
    `do_convert_rgb` is accepted for compatibility but has no effect. `return_tensors` None or "pt" gives torch
    tensors, "np" numpy arrays for `pixel_values` / `pixel_mask` (`labels` are always torch).
    """

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
        r"""Preprocesses images and, optionally, their COCO-detection annotations.

        Args:
            images: PIL images, numpy arrays or torch tensors (see `to_rgb_float_array` for accepted layouts).
            annotations: One COCO-detection dict per image (`{"image_id", "annotations": [{"bbox", "category_id"}]}`).
            **kwargs: Overrides of the processor attributes (`size`, `do_pad`, `pad_size`, ...).
        """
        return super().preprocess(images, annotations, **kwargs)

    def _preprocess_image_like_inputs(
        self,
        images: Any,
        annotations: Any = None,
        *,
        input_data_format: Any = None,
        device: Any = None,
        **kwargs: Any,
    ) -> BatchFeature:
        arrays = [
            to_rgb_float_array(img, i, input_data_format) for i, img in enumerate(flatten_images(images))
        ]
        tensors = [torch.from_numpy(array) for array in arrays]
        if device is not None:
            tensors = [tensor.to(device) for tensor in tensors]
        return self._preprocess(tensors, annotations=check_annotations(annotations, len(tensors)), **kwargs)

    def _resize_image(self, images: torch.Tensor, size: SizeDict, resample: Any) -> torch.Tensor:
        """Resizes (N, 3, H, W) float images of one shape, bilinear with antialiasing by default (as PIL does)."""
        new_size = get_resize_output_size(images.shape[-2], images.shape[-1], size)
        if tuple(images.shape[-2:]) == new_size:
            return images
        return tvF.resize(images, list(new_size), interpolation=_interpolation(resample), antialias=True)

    def _preprocess(
        self,
        images: list[torch.Tensor],
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
        # Per image: images of a batch rarely share a shape, and the resize itself is the expensive part.
        for image in images:
            if do_resize:
                image = self._resize_image(image[None], size, resample)[0]
            image = self.rescale_and_normalize(
                image[None], do_rescale, rescale_factor, do_normalize, image_mean, image_std
            )
            processed.append(image[0].to(torch.float32))
        resized_sizes = [tuple(image.shape[-2:]) for image in processed]

        labels = None
        if annotations is not None:
            labels = [
                convert_coco_detection_annotation(
                    ann, i, original_sizes[i], resized_sizes[i], box_clip_tolerance
                )
                for i, ann in enumerate(annotations)
            ]
        pixel_values, pixel_mask = _pad_batch(processed, resized_sizes, do_pad, pad_size)
        return build_batch_feature(pixel_values, pixel_mask, labels, return_tensors)

    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.1,
        target_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
        top_k: int = 100,
        multi_label: bool = False,
    ) -> list[dict[str, torch.Tensor]]:
        """Per-image detections (scores, labels, xyxy boxes); see `post_process_detection_outputs`.

        This is the method the stock `pipeline("zero-shot-object-detection")` calls.
        """
        return post_process_detection_outputs(
            outputs, threshold=threshold, target_sizes=target_sizes, top_k=top_k, multi_label=multi_label
        )
