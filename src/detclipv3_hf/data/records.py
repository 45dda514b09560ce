"""The one record format every reader produces (ARCHITECTURE.md section 5).

A :class:`DetectionRecord` is one image with its boxes and text: detection data (one category per box),
grounding data (one phrase per box plus a caption) and GranuCap-style captioned data (phrase, category and
parent category per box) all map onto it. Boxes are stored as COCO ``xywh`` in absolute pixels of
``record.image``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from PIL import Image
from torchvision.ops import box_convert

HIERARCHY_SEPARATOR = "|"


def _clean_text(value: object, name: str) -> str | None:
    """Returns a stripped non-empty string, ``None`` for missing/empty values; raises on other types."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string or None, got {type(value).__name__}: {value!r}")
    value = value.strip()
    return value or None


@dataclass
class ObjectAnnotation:
    """One annotated box.

    Attributes:
        bbox_xywh: COCO box ``(x, y, width, height)`` in absolute pixels of the record's image.
        labels: every text label that is positive for this box, e.g. ``[phrase, category]``. When left
            empty it is filled with the non-empty ``phrase`` and ``category`` (in that order, deduplicated).
        phrase: free-form description, e.g. ``"large striped red circle"``.
        category: category name, e.g. ``"circle"``.
        parent_category: parent category name, e.g. ``"round shape"``.
        score: confidence of a pseudo box (auto-annotated data), ``None`` for human/ground-truth boxes.

    Raises:
        ValueError: if the box does not have 4 finite numbers or the object ends up without any label.
        TypeError: if a text field is not a string.
    """

    bbox_xywh: tuple[float, float, float, float]
    labels: list[str] = field(default_factory=list)
    phrase: str | None = None
    category: str | None = None
    parent_category: str | None = None
    score: float | None = None

    def __post_init__(self) -> None:
        box = self.bbox_xywh
        if isinstance(box, torch.Tensor):
            box = box.tolist()
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise ValueError(f"bbox must be 4 numbers (x, y, w, h), got {self.bbox_xywh!r}")
        try:
            box = tuple(float(v) for v in box)
        except (TypeError, ValueError) as error:
            raise ValueError(f"bbox must be 4 numbers (x, y, w, h), got {self.bbox_xywh!r}") from error
        if not all(math.isfinite(v) for v in box):
            raise ValueError(f"bbox has a non-finite value: {box!r}")
        self.bbox_xywh = box  # type: ignore[assignment]
        self.phrase = _clean_text(self.phrase, "phrase")
        self.category = _clean_text(self.category, "category")
        self.parent_category = _clean_text(self.parent_category, "parent_category")
        if self.score is not None:
            self.score = float(self.score)
        if isinstance(self.labels, str) or not isinstance(self.labels, (list, tuple)):
            raise TypeError(f"labels must be a list of strings, got {type(self.labels).__name__}")
        labels = [_clean_text(label, "label") for label in self.labels]
        if not labels:
            labels = [self.phrase, self.category]
        self.labels = list(dict.fromkeys(label for label in labels if label))
        if not self.labels:
            raise ValueError("object has no text label (labels, phrase and category are all empty)")

    @property
    def bbox_xyxy(self) -> tuple[float, float, float, float]:
        """The box as ``(x0, y0, x1, y1)`` absolute pixels."""
        x, y, w, h = self.bbox_xywh
        return (x, y, x + w, y + h)

    @property
    def hierarchical_label(self) -> str | None:
        """``"phrase|category|parent category"`` when all three fields exist, else ``None``."""
        if self.phrase and self.category and self.parent_category:
            return HIERARCHY_SEPARATOR.join((self.phrase, self.category, self.parent_category))
        return None


@dataclass
class DetectionRecord:
    """One image with its objects and text.

    Attributes:
        image: the decoded image; converted to RGB on construction.
        image_id: identifier unique within ``source``.
        source: where the record came from (file plus line/index, or a dataset id).
        objects: the annotated boxes (``bbox_xywh`` absolute pixels of ``image``).
        caption: image-level caption (grounding and captioned data), ``None`` for plain detection data.
        negatives: text labels known to be absent from the image (used as extra negative concepts).

    Raises:
        TypeError: if ``image`` is not a PIL image or ``objects`` holds something else than
            :class:`ObjectAnnotation`.
    """

    image: Image.Image
    image_id: str
    source: str
    objects: list[ObjectAnnotation] = field(default_factory=list)
    caption: str | None = None
    negatives: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.image, Image.Image):
            raise TypeError(f"image must be a PIL.Image.Image, got {type(self.image).__name__}")
        if self.image.mode != "RGB":
            self.image = self.image.convert("RGB")
        self.image_id = str(self.image_id)
        for obj in self.objects:
            if not isinstance(obj, ObjectAnnotation):
                raise TypeError(f"objects must hold ObjectAnnotation, got {type(obj).__name__}")
        self.caption = _clean_text(self.caption, "caption")
        if isinstance(self.negatives, str) or not isinstance(self.negatives, (list, tuple)):
            raise TypeError(f"negatives must be a list of strings, got {type(self.negatives).__name__}")
        self.negatives = list(
            dict.fromkeys(n for n in (_clean_text(n, "negative") for n in self.negatives) if n)
        )

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    def boxes_xyxy(self) -> torch.Tensor:
        """All object boxes as a float tensor of shape ``(num_objects, 4)``, ``xyxy`` absolute pixels."""
        if not self.objects:
            return torch.zeros((0, 4), dtype=torch.float32)
        xywh = torch.tensor([obj.bbox_xywh for obj in self.objects], dtype=torch.float32)
        return box_convert(xywh, in_fmt="xywh", out_fmt="xyxy")


def validate_record(record: DetectionRecord, tolerance: float = 1.0, min_objects: int = 1) -> str | None:
    """Says why a record cannot be used for training, or ``None`` when it can.

    Args:
        record: the record to check.
        tolerance: how many pixels a box may stick out of the image (rounding in annotation tools)
            before it counts as outside; such boxes are accepted and fixed by :func:`clip_record_boxes`.
        min_objects: fewest objects a usable record has.

    Returns:
        A short human-readable reason (e.g. ``"object 2: box has width 0"``), or ``None``.
    """
    if record.width < 1 or record.height < 1:
        return f"image has size {record.width}x{record.height}"
    if len(record.objects) < min_objects:
        return f"record has {len(record.objects)} objects, needs at least {min_objects}"
    for index, obj in enumerate(record.objects):
        x, y, w, h = obj.bbox_xywh
        if w <= 0 or h <= 0:
            return f"object {index}: box has width {w:g} and height {h:g} (must be > 0)"
        if (
            x < -tolerance
            or y < -tolerance
            or x + w > record.width + tolerance
            or y + h > record.height + tolerance
        ):
            return (
                f"object {index}: box xywh=({x:g}, {y:g}, {w:g}, {h:g}) lies outside the "
                f"{record.width}x{record.height} image"
            )
        if min(x + w, record.width) <= max(x, 0.0) or min(y + h, record.height) <= max(y, 0.0):
            return f"object {index}: box xywh=({x:g}, {y:g}, {w:g}, {h:g}) has no area inside the image"
    return None


def clip_record_boxes(record: DetectionRecord) -> DetectionRecord:
    """Clips every box to the image in place (after :func:`validate_record` accepted small overhangs).

    Returns:
        The same record, for chaining.
    """
    for obj in record.objects:
        x0, y0, x1, y1 = obj.bbox_xyxy
        x0, x1 = min(max(x0, 0.0), record.width), min(max(x1, 0.0), record.width)
        y0, y1 = min(max(y0, 0.0), record.height), min(max(y1, 0.0), record.height)
        obj.bbox_xywh = (x0, y0, x1 - x0, y1 - y0)
    return record
