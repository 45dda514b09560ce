"""Box-aware augmentation on ``(PIL image, boxes)`` pairs, seeded by the caller.

Every transform takes ``(image, boxes, rng)`` with ``boxes`` a float tensor ``(num_boxes, 4)`` in ``xyxy``
absolute pixels of ``image`` and ``rng`` a ``random.Random`` (the only randomness used), and returns a
:class:`TransformResult` ``(image, boxes, kept)``: ``kept`` holds the indices of the input boxes that survive,
in order, so per-box labels can be gathered with it. Output boxes always lie inside the output image and
have positive width and height. The geometry itself is torchvision's (``transforms.v2.functional`` on
``tv_tensors.BoundingBoxes``); the recipe follows DETR's multi-scale training (random flip, then either a
multi-scale resize or resize -> random crop -> multi-scale resize), with our own seeded randomness.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple, Protocol

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .records import DetectionRecord

DEFAULT_TRAIN_SHORT_SIDES: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
DEFAULT_MAX_SIZE = 1333


class TransformResult(NamedTuple):
    """``image``: PIL RGB; ``boxes``: ``(k, 4)`` float ``xyxy`` pixels of ``image``; ``kept``: ``(k,)`` int64
    indices of the input boxes that survived (in input order)."""

    image: Image.Image
    boxes: torch.Tensor
    kept: torch.Tensor


class BoxTransform(Protocol):
    def __call__(self, image: Image.Image, boxes: torch.Tensor, rng: random.Random) -> TransformResult: ...


def check_boxes(image: Image.Image, boxes: torch.Tensor) -> None:
    """Raises ``TypeError``/``ValueError`` unless ``boxes`` is a float ``(N, 4)`` ``xyxy`` tensor of valid
    boxes (``x0 < x1``, ``y0 < y1``) inside ``image``."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if not isinstance(boxes, torch.Tensor) or not boxes.is_floating_point():
        raise TypeError(
            f"boxes must be a floating point torch.Tensor, "
            f"got {type(boxes).__name__} {getattr(boxes, 'dtype', '')}"
        )
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (num_boxes, 4) xyxy, got {tuple(boxes.shape)}")
    if boxes.numel() == 0:
        return
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes contain non-finite values")
    if (boxes[:, 2] <= boxes[:, 0]).any() or (boxes[:, 3] <= boxes[:, 1]).any():
        raise ValueError("boxes must be xyxy with x0 < x1 and y0 < y1")
    eps = 1e-3
    if (
        (boxes[:, :2] < -eps).any()
        or (boxes[:, 2] > image.width + eps).any()
        or (boxes[:, 3] > image.height + eps).any()
    ):
        raise ValueError(f"boxes must lie inside the {image.width}x{image.height} image")


def _as_tv(image: Image.Image, boxes: torch.Tensor) -> tv_tensors.BoundingBoxes:
    return tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(image.height, image.width))


def _clamp(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    boxes = boxes.as_subclass(torch.Tensor).clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


def _all(boxes: torch.Tensor) -> torch.Tensor:
    return torch.arange(boxes.shape[0], dtype=torch.int64)


def resize_to(
    image: Image.Image, boxes: torch.Tensor, short_side: int, max_size: int | None
) -> TransformResult:
    """Resizes so the short side is ``short_side`` unless the long side would pass ``max_size``, in which case
    the long side becomes ``max_size``; the aspect ratio is kept. Boxes scale with the image."""
    check_boxes(image, boxes)
    width, height = image.size
    scale = short_side / min(width, height)
    if max_size is not None and max(width, height) * scale > max_size:
        scale = max_size / max(width, height)
    new_w, new_h = max(1, int(round(width * scale))), max(1, int(round(height * scale)))
    resized = F.resize(image, [new_h, new_w], interpolation=InterpolationMode.BILINEAR)
    new_boxes = F.resize(_as_tv(image, boxes), [new_h, new_w])
    return TransformResult(resized, _clamp(new_boxes, new_w, new_h), _all(boxes))


class RandomResize:
    """Multi-scale resize: short side drawn from ``short_sides``, long side capped at ``max_size``."""

    def __init__(self, short_sides: Sequence[int], max_size: int | None = None) -> None:
        if not short_sides or not all(isinstance(s, int) and s > 0 for s in short_sides):
            raise ValueError(
                f"short_sides must be a non-empty sequence of positive ints, got {short_sides!r}"
            )
        if max_size is not None and (not isinstance(max_size, int) or max_size < max(short_sides)):
            raise ValueError(f"max_size must be an int >= the largest short side, got {max_size!r}")
        self.short_sides = tuple(short_sides)
        self.max_size = max_size

    def __call__(self, image: Image.Image, boxes: torch.Tensor, rng: random.Random) -> TransformResult:
        return resize_to(image, boxes, rng.choice(self.short_sides), self.max_size)


class RandomHorizontalFlip:
    """Mirrors image and boxes (``x0' = W - x1``, ``x1' = W - x0``) with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p = p

    def __call__(self, image: Image.Image, boxes: torch.Tensor, rng: random.Random) -> TransformResult:
        check_boxes(image, boxes)
        if rng.random() >= self.p:
            return TransformResult(image, boxes, _all(boxes))
        flipped = F.horizontal_flip(_as_tv(image, boxes))
        return TransformResult(
            F.horizontal_flip(image), _clamp(flipped, image.width, image.height), _all(boxes)
        )


class RandomCrop:
    """Crops a random window of ``[min_scale, max_scale]`` of each side, keeping boxes consistent.

    Boxes are clipped to the window; a clipped box is dropped when its width or height falls below
    ``min_box_size`` pixels or it keeps less than ``min_visible`` of its area (a sliver would no longer show
    what its label names). If the input has boxes and a window keeps none, another window is drawn; after
    ``max_tries`` the input is returned uncropped, so a crop never empties a non-empty target.
    """

    def __init__(
        self,
        min_scale: float = 0.5,
        max_scale: float = 1.0,
        min_box_size: float = 2.0,
        min_visible: float = 0.3,
        max_tries: int = 10,
    ) -> None:
        if not 0.0 < min_scale <= max_scale <= 1.0:
            raise ValueError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale!r}, {max_scale!r}")
        if min_box_size <= 0 or not 0.0 <= min_visible <= 1.0 or max_tries < 1:
            raise ValueError(
                f"need min_box_size > 0, 0 <= min_visible <= 1 and max_tries >= 1, got {min_box_size!r}, "
                f"{min_visible!r}, {max_tries!r}"
            )
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_box_size, self.min_visible, self.max_tries = min_box_size, min_visible, max_tries

    def _window(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        crop_w = max(1, int(round(width * rng.uniform(self.min_scale, self.max_scale))))
        crop_h = max(1, int(round(height * rng.uniform(self.min_scale, self.max_scale))))
        return rng.randint(0, width - crop_w), rng.randint(0, height - crop_h), crop_w, crop_h

    def __call__(self, image: Image.Image, boxes: torch.Tensor, rng: random.Random) -> TransformResult:
        check_boxes(image, boxes)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        for _ in range(self.max_tries):
            left, top, crop_w, crop_h = self._window(image.width, image.height, rng)
            cropped = _clamp(F.crop(_as_tv(image, boxes), top, left, crop_h, crop_w), crop_w, crop_h)
            sizes = cropped[:, 2:] - cropped[:, :2]
            keep = (sizes >= self.min_box_size).all(dim=1) & (sizes.prod(dim=1) >= self.min_visible * areas)
            if keep.any() or boxes.shape[0] == 0:
                kept = torch.nonzero(keep).flatten()
                return TransformResult(F.crop(image, top, left, crop_h, crop_w), cropped[kept], kept)
        return TransformResult(image, boxes, _all(boxes))


class RandomSelect:
    """Applies ``first`` with probability ``p``, else ``second`` (DETR's RandomSelect)."""

    def __init__(self, first: BoxTransform, second: BoxTransform, p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: Image.Image, boxes: torch.Tensor, rng: random.Random) -> TransformResult:
        return (self.first if rng.random() < self.p else self.second)(image, boxes, rng)


class Compose:
    """Chains transforms; ``kept`` of the result indexes the boxes given to the first one."""

    def __init__(self, transforms: Sequence[BoxTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Image.Image, boxes: torch.Tensor, rng: random.Random) -> TransformResult:
        check_boxes(image, boxes)
        kept = _all(boxes)
        for transform in self.transforms:
            image, boxes, step_kept = transform(image, boxes, rng)
            kept = kept[step_kept]
        return TransformResult(image, boxes, kept)


def build_train_transforms(
    short_sides: Sequence[int] = DEFAULT_TRAIN_SHORT_SIDES,
    max_size: int | None = DEFAULT_MAX_SIZE,
    crop: bool = True,
    crop_prepare_sides: Sequence[int] | None = None,
    crop_min_scale: float = 0.5,
) -> Compose:
    """DETR-style training augmentation: flip, then multi-scale resize, or (when ``crop``) with probability
    0.5 resize to ``crop_prepare_sides`` -> random crop -> multi-scale resize.

    ``crop_prepare_sides`` defaults to 1/2, 5/8 and 3/4 of the largest short side (DETR's 400/500/600
    for 800).
    """
    resize = RandomResize(short_sides, max_size)
    if not crop:
        return Compose([RandomHorizontalFlip(), resize])
    top = max(short_sides)
    prepare = crop_prepare_sides or tuple(sorted({max(1, round(top * f)) for f in (0.5, 0.625, 0.75)}))
    cropped = Compose([RandomResize(prepare), RandomCrop(min_scale=crop_min_scale), resize])
    return Compose([RandomHorizontalFlip(), RandomSelect(resize, cropped)])


def build_eval_transforms(short_side: int = 800, max_size: int | None = DEFAULT_MAX_SIZE) -> Compose:
    """Deterministic resize for evaluation (no randomness is drawn from ``rng``)."""
    return Compose([RandomResize([short_side], max_size)])


def transform_record(record: DetectionRecord, transform: BoxTransform, rng: random.Random) -> DetectionRecord:
    """Applies ``transform`` to a record: new image, boxes back to ``xywh``, dropped objects removed.

    Returns:
        A new :class:`DetectionRecord` (the input is left untouched) whose objects are the survivors in order.
    """
    result = transform(record.image, record.boxes_xyxy(), rng)
    xywh = box_convert(result.boxes, in_fmt="xyxy", out_fmt="xywh").tolist()
    objects = [replace(record.objects[i], bbox_xywh=tuple(box)) for i, box in zip(result.kept.tolist(), xywh)]
    return replace(record, image=result.image, objects=objects)
