"""A seeded synthetic world of shapes with hierarchical labels, for tests, demos and smoke training.

Each image shows 1..N textured shapes on a noisy background with distractor strokes. Every shape has a
category (13 of them) under a parent category (3), and a phrase with size, texture and colour words, e.g.
``large striped red circle|circle|round shape``. "solid" is the default texture and is not written in the
phrase (``small blue star``), as people would say it.

Box contract: a box is the tight box of *all pixels the shape was drawn with* (COCO ``xywh``, absolute
pixels, pixel ``i`` spans ``[i, i + 1)``). Shapes drawn later may occlude earlier ones; the box of an
occluded shape stays the full (amodal) drawn box. Placement keeps every shape at most half hidden
(intersection over the smaller box <= ``MAX_OVERLAP``), so each object stays recognisable. Distractor
strokes are thin grey lines; they are clutter, never objects.

Determinism: image ``i`` of split ``s`` is drawn from RNGs seeded with ``(seed, s, i)`` only, PNGs are written
with fixed settings and json with sorted keys, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .records import ObjectAnnotation

CATEGORY_PARENTS: dict[str, str] = {
    "circle": "round shape",
    "ellipse": "round shape",
    "ring": "round shape",
    "square": "polygon",
    "rectangle": "polygon",
    "triangle": "polygon",
    "pentagon": "polygon",
    "hexagon": "polygon",
    "diamond": "polygon",
    "star": "symbol",
    "cross": "symbol",
    "arrow": "symbol",
    "heart": "symbol",
}
CATEGORIES: tuple[str, ...] = tuple(CATEGORY_PARENTS)
PARENT_CATEGORIES: tuple[str, ...] = tuple(dict.fromkeys(CATEGORY_PARENTS.values()))
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "orange": (245, 130, 20),
    "purple": (140, 40, 180),
    "pink": (240, 100, 180),
    "black": (25, 25, 25),
}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
# Size word -> range of the shape's long side as a fraction of the image's short side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.14, 0.22), "medium": (0.25, 0.34), "large": (0.37, 0.5)}
MAX_OVERLAP = 0.5
MIN_OBJECT_PIXELS = 10
_SPLIT_CODES = {"train": 1, "val": 2, "sample": 3}


@dataclass(frozen=True)
class SyntheticSplit:
    """Paths of one written split. COCO ``file_name`` and GranuCap ``image`` are relative to ``root``."""

    name: str
    root: Path
    image_dir: Path
    coco_file: Path
    granucap_file: Path
    num_images: int
    num_objects: int


@dataclass(frozen=True)
class SyntheticWorld:
    """What :func:`generate_synthetic_world` wrote."""

    root: Path
    train: SyntheticSplit
    val: SyntheticSplit
    concepts_file: Path
    metadata_file: Path


# ---------------------------------------------------------------------------------------------- outlines


def _regular(n: int, start_deg: float = -90.0, radius: float = 1.0) -> list[tuple[float, float]]:
    return [
        (
            radius * math.cos(math.radians(start_deg + 360.0 * k / n)),
            radius * math.sin(math.radians(start_deg + 360.0 * k / n)),
        )
        for k in range(n)
    ]


def _outline(
    category: str, rng: random.Random
) -> tuple[list[tuple[float, float]], list[tuple[float, float]] | None, float]:
    """Unit-size outline of a shape: ``(polygon, hole polygon or None, max rotation in degrees)``."""
    if category == "circle":
        return _regular(48), None, 0.0
    if category == "ellipse":
        b = rng.uniform(0.45, 0.65)
        return (
            [(math.cos(t), b * math.sin(t)) for t in (2 * math.pi * k / 48 for k in range(48))],
            None,
            180.0,
        )
    if category == "ring":
        return _regular(48), _regular(48, radius=rng.uniform(0.5, 0.65)), 0.0
    if category == "square":
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)], None, 15.0
    if category == "rectangle":
        a = rng.uniform(0.4, 0.62)
        corners = [(-1, -a), (1, -a), (1, a), (-1, a)]
        return (corners if rng.random() < 0.5 else [(y, x) for x, y in corners]), None, 15.0
    if category == "triangle":
        return _regular(3), None, 20.0
    if category == "pentagon":
        return _regular(5), None, 36.0
    if category == "hexagon":
        return _regular(6, start_deg=0.0), None, 30.0
    if category == "diamond":
        a = rng.uniform(0.55, 0.72)
        return [(0, -1), (a, 0), (0, 1), (-a, 0)], None, 10.0
    if category == "star":
        points = []
        for k in range(10):
            radius = 1.0 if k % 2 == 0 else 0.42
            angle = math.radians(-90.0 + 36.0 * k)
            points.append((radius * math.cos(angle), radius * math.sin(angle)))
        return points, None, 36.0
    if category == "cross":
        t = 0.34
        return (
            [
                (-t, -1),
                (t, -1),
                (t, -t),
                (1, -t),
                (1, t),
                (t, t),
                (t, 1),
                (-t, 1),
                (-t, t),
                (-1, t),
                (-1, -t),
                (-t, -t),
            ],
            None,
            20.0,
        )
    if category == "arrow":
        return (
            [(-1, -0.2), (0.15, -0.2), (0.15, -0.55), (1, 0), (0.15, 0.55), (0.15, 0.2), (-1, 0.2)],
            None,
            180.0,
        )
    if category == "heart":
        # Classic parametric heart; y flipped because image rows grow downwards.
        ts = [2 * math.pi * k / 60 for k in range(60)]
        return (
            [
                (
                    16 * math.sin(t) ** 3 / 16,
                    -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 16,
                )
                for t in ts
            ],
            None,
            15.0,
        )
    raise ValueError(f"unknown synthetic category {category!r}; expected one of {CATEGORIES}")


def _rotate(points: list[tuple[float, float]], degrees: float) -> list[tuple[float, float]]:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return [(x * c - y * s, x * s + y * c) for x, y in points]


# ---------------------------------------------------------------------------------------------- drawing


def _texture(texture: str, color: tuple[int, int, int], width: int, height: int) -> np.ndarray:
    """``(height, width, 3)`` uint8 fill pattern: the colour plus a darker shade for the pattern marks."""
    main = np.array(color, dtype=np.float32)
    dark = main * 0.45
    fill = np.broadcast_to(main, (height, width, 3)).copy()
    if texture == "solid":
        return fill.astype(np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    period = max(4, min(width, height) // 5)
    half = max(2, period // 2)
    if texture == "striped":
        marks = ((xx + yy) // half) % 2 == 1
    elif texture == "dotted":
        cx, cy = xx % period - (period - 1) / 2, yy % period - (period - 1) / 2
        marks = cx**2 + cy**2 <= (0.3 * period) ** 2
    elif texture == "checkered":
        marks = ((xx // half) + (yy // half)) % 2 == 1
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")
    fill[marks] = dark
    return fill.astype(np.uint8)


def _background(width: int, height: int, rng: random.Random, noise_rng: np.random.Generator) -> Image.Image:
    base = np.array([rng.randint(165, 235) for _ in range(3)], dtype=np.int16)
    noise = noise_rng.integers(-18, 19, size=(height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), mode="RGB")


def _draw_clutter(draw: ImageDraw.ImageDraw, width: int, height: int, rng: random.Random, count: int) -> None:
    """Thin grey strokes: texture the detector must learn to ignore (never annotated)."""
    for _ in range(count):
        gray = rng.randint(90, 160)
        points = [(rng.uniform(0, width - 1), rng.uniform(0, height - 1)) for _ in range(rng.randint(2, 4))]
        draw.line(points, fill=(gray, gray, gray + rng.randint(-10, 10)), width=rng.randint(1, 2))


def _overlap_ok(box: tuple[int, int, int, int], placed: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    for px0, py0, px1, py1 in placed:
        iw, ih = min(x1, px1) - max(x0, px0), min(y1, py1) - max(y0, py0)
        if iw > 0 and ih > 0:
            smaller = min((x1 - x0) * (y1 - y0), (px1 - px0) * (py1 - py0))
            if iw * ih > MAX_OVERLAP * smaller:
                return False
    return True


def _phrase(size: str, texture: str, color: str, category: str) -> str:
    return " ".join(word for word in (size, None if texture == "solid" else texture, color, category) if word)


def _article(phrase: str) -> str:
    return "an" if phrase[:1] in "aeiou" else "a"


def caption_for(objects: list[ObjectAnnotation]) -> str:
    """Caption naming the objects left to right: ``"a large striped red circle and a small blue star"``."""
    ordered = sorted(objects, key=lambda o: (o.bbox_xywh[0] + o.bbox_xywh[2] / 2, o.bbox_xywh[1]))
    parts = [f"{_article(o.phrase or '')} {o.phrase}" for o in ordered]
    if len(parts) <= 1:
        return parts[0] if parts else ""
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def _draw_object(
    canvas: Image.Image, rng: random.Random, placed: list[tuple[int, int, int, int]], tries: int = 30
) -> tuple[ObjectAnnotation, int] | None:
    """Places and draws one random shape; returns its annotation and pixel area, or ``None`` if no room."""
    width, height = canvas.size
    category = rng.choice(CATEGORIES)
    color = rng.choice(tuple(COLORS))
    texture = rng.choice(TEXTURES)
    size_word = rng.choice(tuple(SIZES))
    low, high = SIZES[size_word]
    long_side = max(MIN_OBJECT_PIXELS, int(round(rng.uniform(low, high) * min(width, height))))
    polygon, hole, max_rotation = _outline(category, rng)
    angle = rng.uniform(-max_rotation, max_rotation)
    polygon = _rotate(polygon, angle)
    hole = _rotate(hole, angle) if hole else None
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    scale = (long_side - 1) / max(max(xs) - min(xs), max(ys) - min(ys))
    local = [((x - min(xs)) * scale, (y - min(ys)) * scale) for x, y in polygon]
    mask_w = int(math.ceil((max(xs) - min(xs)) * scale)) + 1
    mask_h = int(math.ceil((max(ys) - min(ys)) * scale)) + 1
    if mask_w > width or mask_h > height:
        return None
    mask = Image.new("L", (mask_w, mask_h), 0)
    mask_draw = ImageDraw.Draw(mask)
    mask_draw.polygon(local, fill=255)
    if hole:
        mask_draw.polygon([((x - min(xs)) * scale, (y - min(ys)) * scale) for x, y in hole], fill=0)
    pixels = np.asarray(mask) > 0
    rows, cols = np.nonzero(pixels)
    if rows.size == 0:
        return None
    for _ in range(tries):
        ox, oy = rng.randint(0, width - mask_w), rng.randint(0, height - mask_h)
        box = (ox + int(cols.min()), oy + int(rows.min()), ox + int(cols.max()) + 1, oy + int(rows.max()) + 1)
        if _overlap_ok(box, placed):
            break
    else:
        return None
    fill = Image.fromarray(_texture(texture, COLORS[color], mask_w, mask_h), mode="RGB")
    canvas.paste(fill, (ox, oy), mask)
    placed.append(box)
    phrase = _phrase(size_word, texture, color, category)
    annotation = ObjectAnnotation(
        bbox_xywh=(float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])),
        phrase=phrase,
        category=category,
        parent_category=CATEGORY_PARENTS[category],
    )
    return annotation, int(pixels.sum())


def _render(
    width: int, height: int, seed: int, split: str, index: int, min_objects: int, max_objects: int
) -> tuple[Image.Image, list[ObjectAnnotation], list[int]]:
    rng = random.Random(f"detclipv3-synthetic/{seed}/{split}/{index}")
    noise_rng = np.random.default_rng([seed & 0xFFFFFFFF, _SPLIT_CODES[split], index])
    canvas = _background(width, height, rng, noise_rng)
    draw = ImageDraw.Draw(canvas)
    _draw_clutter(draw, width, height, rng, rng.randint(2, 6))
    objects: list[ObjectAnnotation] = []
    areas: list[int] = []
    placed: list[tuple[int, int, int, int]] = []
    for _ in range(rng.randint(min_objects, max_objects)):
        drawn = _draw_object(canvas, rng, placed)
        if drawn is not None:
            objects.append(drawn[0])
            areas.append(drawn[1])
    _draw_clutter(draw, width, height, rng, rng.randint(0, 3))
    return canvas, objects, areas


def _check_sizes(min_size: int, max_size: int) -> None:
    if not (isinstance(min_size, int) and isinstance(max_size, int)) or not 32 <= min_size <= max_size:
        raise ValueError(
            f"need 32 <= min_size <= max_size (ints), got min_size={min_size!r}, max_size={max_size!r}"
        )


def make_synthetic_sample(
    seed: int, size: int | tuple[int, int] = 128, min_objects: int = 1, max_objects: int = 5
) -> tuple[Image.Image, list[ObjectAnnotation]]:
    """Renders one synthetic image in memory.

    Args:
        seed: the only source of randomness; the same seed and size give the same pixels and objects.
        size: ``side`` or ``(width, height)`` in pixels, each at least 32.
        min_objects, max_objects: how many shapes to try to place (at least one is always placed).

    Returns:
        ``(image, objects)``: an RGB image and its objects (``bbox_xywh`` absolute pixels, phrase, category,
        parent category; labels ``[phrase, category]``).
    """
    width, height = (size, size) if isinstance(size, int) else size
    _check_sizes(min(width, height), max(width, height))
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    image, objects, _ = _render(width, height, seed, "sample", 0, min_objects, max_objects)
    return image, objects


# ---------------------------------------------------------------------------------------------- writing


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, sort_keys=True, separators=(",", ":")) + "\n", encoding="utf-8")


def _coco_categories() -> list[dict]:
    return [
        {"id": i + 1, "name": name, "supercategory": CATEGORY_PARENTS[name]}
        for i, name in enumerate(CATEGORIES)
    ]


def _write_split(
    root: Path,
    split: str,
    count: int,
    seed: int,
    min_size: int,
    max_size: int,
    min_objects: int,
    max_objects: int,
) -> tuple[SyntheticSplit, set[str]]:
    split_root = root / split
    image_dir = split_root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    category_ids = {name: i + 1 for i, name in enumerate(CATEGORIES)}
    size_rng = random.Random(f"detclipv3-synthetic-sizes/{seed}/{split}")
    images, annotations, lines, phrases = [], [], [], set()
    for index in range(count):
        width, height = size_rng.randint(min_size, max_size), size_rng.randint(min_size, max_size)
        image, objects, areas = _render(width, height, seed, split, index, min_objects, max_objects)
        file_name = f"images/{index:06d}.png"
        image.save(split_root / file_name, format="PNG", compress_level=1)
        images.append({"id": index + 1, "file_name": file_name, "width": width, "height": height})
        for obj, area in zip(objects, areas):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": category_ids[obj.category],
                    "bbox": list(obj.bbox_xywh),
                    "area": float(area),
                    "iscrowd": 0,
                    "phrase": obj.phrase,
                }
            )
            phrases.add(obj.phrase)
        lines.append(
            {
                "image": file_name,
                "image_id": f"{split}-{index:06d}",
                "width": width,
                "height": height,
                "caption": caption_for(objects),
                "objects": [
                    {
                        "bbox": list(o.bbox_xywh),
                        "phrase": o.phrase,
                        "category": o.category,
                        "parent_category": o.parent_category,
                    }
                    for o in objects
                ],
            }
        )
    coco_file = split_root / "annotations_coco.json"
    _write_json(
        coco_file,
        {
            "info": {"description": f"detclipv3-hf synthetic shapes, split {split}, seed {seed}"},
            "images": images,
            "annotations": annotations,
            "categories": _coco_categories(),
        },
    )
    granucap_file = split_root / "granucap.jsonl"
    granucap_file.write_text(
        "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines), encoding="utf-8"
    )
    written = SyntheticSplit(split, split_root, image_dir, coco_file, granucap_file, count, len(annotations))
    return written, phrases


def generate_synthetic_world(
    output_dir: str | os.PathLike,
    num_train: int,
    num_val: int,
    seed: int,
    min_size: int = 128,
    max_size: int = 512,
    min_objects: int = 1,
    max_objects: int = 6,
) -> SyntheticWorld:
    """Writes a train and a held-out val split of synthetic shape images with hierarchical labels.

    Layout under ``output_dir``::

        train/images/000000.png ...      val/images/...
        train/annotations_coco.json      COCO detection json (categories with supercategory = parent,
                                         extra per-annotation "phrase"; file_name relative to train/)
        train/granucap.jsonl             GranuCap records (image path relative to the jsonl, bbox xywh)
        concepts.txt                     concept dictionary: the categories, then every train phrase (sorted)
        world.json                       the label hierarchy, words and generation arguments

    Parent categories are not in the concept dictionary: a parent name truly describes every box of its
    children, so drawing it as a negative concept would contradict those boxes.

    Args:
        output_dir: folder to write into (created; existing files with the same names are overwritten).
        num_train, num_val: number of images per split (>= 0).
        seed: the only source of randomness; same arguments -> byte-identical files.
        min_size, max_size: image width and height are drawn independently from this range (pixels, >= 32).
        min_objects, max_objects: shapes attempted per image (at least one is always placed).

    Returns:
        A :class:`SyntheticWorld` with every written path.
    """
    _check_sizes(min_size, max_size)
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    train, phrases = _write_split(
        root, "train", num_train, seed, min_size, max_size, min_objects, max_objects
    )
    val, _ = _write_split(root, "val", num_val, seed, min_size, max_size, min_objects, max_objects)
    concepts_file = root / "concepts.txt"
    concepts_file.write_text("\n".join([*CATEGORIES, *sorted(phrases)]) + "\n", encoding="utf-8")
    metadata_file = root / "world.json"
    _write_json(
        metadata_file,
        {
            "categories": [{"name": c, "parent_category": p} for c, p in CATEGORY_PARENTS.items()],
            "colors": list(COLORS),
            "textures": list(TEXTURES),
            "sizes": {word: list(bounds) for word, bounds in SIZES.items()},
            "seed": seed,
            "min_size": min_size,
            "max_size": max_size,
            "min_objects": min_objects,
            "max_objects": max_objects,
            "num_train": num_train,
            "num_val": num_val,
            "box_format": "COCO xywh, absolute pixels, tight box of the full drawn shape (amodal)",
        },
    )
    return SyntheticWorld(root, train, val, concepts_file, metadata_file)
