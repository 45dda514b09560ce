"""Readers: every supported source becomes a stream of :class:`DetectionRecord` through ``datasets``.

One entry point, :func:`load_records`, reads

- a COCO detection json (plus an image folder),
- ODVG-style jsonl (one line per image, ``grounding`` or ``detection`` variant, boxes ``xyxy`` pixels),
- GranuCap-style / generic records (``image``, ``caption``, ``objects`` with ``bbox`` COCO ``xywh`` pixels,
  ``phrase``, ``category``, ``parent_category``, optional ``score`` / ``labels``; optional ``negatives``)
  from jsonl, parquet or webdataset ``.tar`` shards,
- a Hub dataset id (``owner/name`` or ``hf://datasets/owner/name``) through ``datasets.load_dataset``.

Everything is a ``datasets`` (``Iterable``)``Dataset`` underneath, streamed by default. Local json/jsonl
files are served by ``IterableDataset.from_generator`` over the raw lines (one shard per file, COCO in
image-range shards) rather than the ``json`` builder: a single malformed line or a line whose schema differs
from the others must cost one skipped record, not the run, and each record keeps its ``file:line`` origin.

Robustness contract: a record that cannot be used (unreadable image, empty/invalid/outside box, missing
field, malformed line) is skipped, counted in :class:`SkipStats` under a short reason kind and logged with its
source. File-level problems (no such file, a COCO json without ``images``) raise ``ValueError`` at once.

Distribution and resumption: ``rank``/``world_size`` apply ``datasets.distributed.split_dataset_by_node``
(the only sharding mechanism), so ranks read disjoint records whose union is the whole source.
``start_index`` skips that many *raw rows of this rank's stream* (bad rows included), and
:attr:`RecordStream.position` is the value to pass back as ``start_index`` to resume after the last record
handed out. A shuffle (``shuffle_seed``) must use the same seed on every rank and on resume.
"""

from __future__ import annotations

import base64
import binascii
import glob as globlib
import io
import json
import logging
import os
import posixpath
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from typing import Any, Literal

import datasets
import fsspec
from datasets.distributed import split_dataset_by_node
from PIL import Image

from .records import DetectionRecord, ObjectAnnotation, clip_record_boxes, validate_record

logger = logging.getLogger(__name__)

RecordFormat = Literal["auto", "coco", "odvg", "granucap"]
RECORD_FORMATS: tuple[str, ...] = ("auto", "coco", "odvg", "granucap")

# Reason kinds used as SkipStats keys.
SKIP_UNREADABLE_IMAGE = "unreadable image"
SKIP_INVALID_BOX = "invalid box"
SKIP_MISSING_FIELD = "missing field"
SKIP_INVALID_OBJECT = "invalid object"
SKIP_MALFORMED_ROW = "malformed row"
SKIP_UNKNOWN_LAYOUT = "unknown layout"
SKIP_SIZE_MISMATCH = "image size mismatch"
SKIP_TOO_FEW_OBJECTS = "too few objects"

_COCO_MAX_SHARDS = 16
_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_PAYLOAD_FEATURES = datasets.Features(
    {"source": datasets.Value("string"), "payload": datasets.Value("string")}
)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class RecordError(ValueError):
    """A single record cannot be used; ``kind`` is one of the ``SKIP_*`` reason kinds."""

    def __init__(self, kind: str, message: str, source: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.source = source


@dataclass
class SkipStats:
    """Counts of what a :class:`RecordStream` read, kept and skipped (updated while iterating).

    Attributes:
        seen: raw rows read from the source by this stream (after the ``start_index`` skip).
        kept: records handed out.
        reasons: skipped rows per reason kind (``SKIP_*`` constants).
        examples: the first ``max_examples`` skipped rows as ``(source, reason message)``.
        max_logged: skips logged at WARNING level; later ones go to DEBUG so a bad shard cannot flood logs.
    """

    seen: int = 0
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)
    max_examples: int = 100
    max_logged: int = 20

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def add_skip(self, source: str, kind: str, message: str) -> None:
        """Counts one skipped row and logs it with its source."""
        self.reasons[kind] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((source, message))
        level = logging.WARNING if self.skipped <= self.max_logged else logging.DEBUG
        logger.log(level, "skipping record %s: %s (%s)", source, message, kind)
        if self.skipped == self.max_logged:
            logger.warning("further skipped records are logged at DEBUG level only")

    def merge(self, other: SkipStats) -> SkipStats:
        """Adds ``other``'s counts (seen, kept, skip reasons) to these and returns ``self``; examples are kept."""
        self.seen += other.seen
        self.kept += other.kept
        self.reasons.update(other.reasons)
        return self

    def summary(self) -> str:
        """One line such as ``"read 10, kept 8, skipped 2 (invalid box: 1, unreadable image: 1)"``."""
        detail = ", ".join(f"{kind}: {count}" for kind, count in sorted(self.reasons.items()))
        return f"read {self.seen}, kept {self.kept}, skipped {self.skipped}" + (
            f" ({detail})" if detail else ""
        )


# --------------------------------------------------------------------------------------------------- files


def _is_remote(path: str) -> bool:
    return "://" in path


def _join(base: str | None, relative: str) -> str:
    """Resolves ``relative`` against ``base`` (a local dir or a URL prefix); absolute paths pass through."""
    if not base or _is_remote(relative) or os.path.isabs(relative):
        return relative
    return posixpath.join(base, relative) if _is_remote(base) else os.path.join(base, relative)


def _dirname(path: str) -> str:
    return posixpath.dirname(path) if _is_remote(path) else os.path.dirname(os.path.abspath(path))


DATA_FILE_EXTENSIONS = (".jsonl", ".parquet", ".json", ".tar")


def _expand_files(pattern: str) -> list[str]:
    """Expands a local or fsspec path / glob into a sorted file list; raises ``ValueError`` when empty."""
    if _is_remote(pattern):
        fs, path = fsspec.core.url_to_fs(pattern)
        paths = fs.glob(path) if globlib.has_magic(path) else ([path] if fs.isfile(path) else [])
        files = sorted(fs.unstrip_protocol(p) for p in paths)
    else:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            # A folder (e.g. the output of `detclipv3 annotate`): every data file in it, except marker / hidden
            # files whose name starts with "_" or "." (as Spark and `datasets` shards do).
            files = sorted(
                p
                for ext in DATA_FILE_EXTENSIONS
                for p in globlib.glob(os.path.join(pattern, f"*{ext}"))
                if os.path.isfile(p) and not os.path.basename(p).startswith(("_", "."))
            )
        else:
            files = sorted(p for p in globlib.glob(pattern) if os.path.isfile(p))
    if not files:
        raise ValueError(f"no data file matches {pattern!r}")
    return files


def _file_signature(path: str) -> str:
    """Size and modification stamp, so cached (non-streaming) datasets are rebuilt when a file changes."""
    if _is_remote(path):
        fs, inner = fsspec.core.url_to_fs(path)
        info = fs.info(inner)
        return f"{info.get('size')}-{info.get('last_commit') or info.get('mtime') or info.get('ETag')}"
    stat = os.stat(path)
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def _open_binary(path: str) -> Any:
    return fsspec.open(path, "rb").open() if _is_remote(path) else open(path, "rb")


# --------------------------------------------------------------------------------------------- generators


def _generate_jsonl_rows(files: list[tuple[str, str]]) -> Iterator[dict[str, str]]:
    """Yields ``{"source": "file:line", "payload": line}`` for every non-blank line of the shard's files."""
    for path, _signature in files:
        with _open_binary(path) as handle:
            for line_number, raw in enumerate(handle, start=1):
                text = raw.decode("utf-8", errors="replace").strip()
                if text:
                    yield {"source": f"{path}:{line_number}", "payload": text}


@lru_cache(maxsize=2)
def _coco_index(
    annotation_file: str, signature: str
) -> tuple[list[dict], dict[Any, list[dict]], dict[Any, dict]]:
    """Parses a COCO json once per process: images, annotations per image id, categories per id."""
    del signature  # part of the cache key only
    with _open_binary(annotation_file) as handle:
        coco = json.load(handle)
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise ValueError(f"{annotation_file} is not a COCO detection json: it has no 'images' list")
    if not isinstance(coco.get("annotations", []), list) or not isinstance(coco.get("categories", []), list):
        raise ValueError(f"{annotation_file}: 'annotations' and 'categories' must be lists")
    per_image: dict[Any, list[dict]] = defaultdict(list)
    for annotation in coco.get("annotations", []):
        if isinstance(annotation, dict):
            per_image[annotation.get("image_id")].append(annotation)
    categories = {c.get("id"): c for c in coco.get("categories", []) if isinstance(c, dict)}
    return coco["images"], dict(per_image), categories


def _coco_object(annotation: dict, categories: Mapping[Any, dict]) -> dict[str, Any]:
    category = categories.get(annotation.get("category_id"), {})
    return {
        "bbox": annotation.get("bbox"),
        "category": category.get("name"),
        "parent_category": category.get("supercategory"),
        # Non-standard extras (the synthetic world writes them; a detection source uses only the category).
        "phrase": annotation.get("phrase"),
        "score": annotation.get("score"),
    }


def _generate_coco_rows(
    annotation_file: str, signature: str, image_root: str, ranges: list[tuple[int, int]]
) -> Iterator[dict[str, str]]:
    """Yields one payload row per image of the shard's image-index ranges; crowd regions are dropped."""
    images, per_image, categories = _coco_index(annotation_file, signature)
    for start, stop in ranges:
        for index in range(start, stop):
            image = images[index]
            if not isinstance(image, dict):
                yield {"source": f"{annotation_file}#images[{index}]", "payload": json.dumps(image)}
                continue
            annotations = per_image.get(image.get("id"), [])
            row = {
                "image_id": image.get("id"),
                "file_name": image.get("file_name"),
                "width": image.get("width"),
                "height": image.get("height"),
                "image_root": image_root,
                # Crowd regions cover many instances with one box; like DETR we do not train on them.
                "objects": [_coco_object(a, categories) for a in annotations if not a.get("iscrowd", 0)],
            }
            yield {"source": f"{annotation_file}#image_id={image.get('id')}", "payload": json.dumps(row)}


# ------------------------------------------------------------------------------------------------- images


def _load_image(value: Any, base_dir: str | None) -> Image.Image:
    """Decodes an image given as a PIL image, a path, raw bytes or a ``{"bytes", "path"}`` dict.

    ``bytes`` given as a string are read as base64 (how jsonl embeds binary data). Raises
    :class:`RecordError` (kind ``unreadable image``) for anything that does not decode.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        else:
            if isinstance(value, dict):
                data, path = value.get("bytes"), value.get("path")
                value = data if data is not None else path
            if isinstance(value, str) and not value.strip():
                raise RecordError(SKIP_MISSING_FIELD, "image reference is empty")
            if isinstance(value, (bytes, bytearray)):
                image = Image.open(io.BytesIO(value))
            elif isinstance(value, str) and value.startswith("data:"):
                image = Image.open(io.BytesIO(base64.b64decode(value.split(",", 1)[-1], validate=True)))
            elif isinstance(value, str):
                with _open_binary(_join(base_dir, value)) as handle:
                    image = Image.open(io.BytesIO(handle.read()))
            elif value is None:
                raise RecordError(SKIP_MISSING_FIELD, "record has no image")
            else:
                raise RecordError(
                    SKIP_UNREADABLE_IMAGE, f"image of type {type(value).__name__} is not supported"
                )
            image.load()  # decode now: a truncated file must fail here, not in a DataLoader worker
        return image.convert("RGB")
    except RecordError:
        raise
    except (OSError, ValueError, binascii.Error, Image.DecompressionBombError, SyntaxError) as error:
        raise RecordError(SKIP_UNREADABLE_IMAGE, f"cannot read image: {error}") from error


def _check_size(image: Image.Image, width: Any, height: Any) -> None:
    """Boxes are annotated in the stated frame: a decoded image of another size would misplace them."""
    if width is None or height is None:
        return
    try:
        stated = (int(width), int(height))
    except (TypeError, ValueError) as error:
        raise RecordError(
            SKIP_MISSING_FIELD, f"width/height are not integers: {width!r}, {height!r}"
        ) from error
    if stated != image.size:
        raise RecordError(
            SKIP_SIZE_MISMATCH,
            f"annotation says {stated[0]}x{stated[1]}, image is {image.width}x{image.height}",
        )


# ----------------------------------------------------------------------------------------- row converters


def _require(row: Mapping[str, Any], key: str, where: str = "record") -> Any:
    value = row.get(key)
    if value is None:
        raise RecordError(SKIP_MISSING_FIELD, f"{where} has no '{key}'")
    return value


def _box_numbers(value: Any, where: str) -> list[float]:
    if value is None:
        raise RecordError(SKIP_MISSING_FIELD, f"{where} has no 'bbox'")
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise RecordError(SKIP_INVALID_BOX, f"{where}: bbox must be 4 numbers, got {value!r}")
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError) as error:
        raise RecordError(SKIP_INVALID_BOX, f"{where}: bbox must be 4 numbers, got {value!r}") from error


def _make_object(where: str, **fields: Any) -> ObjectAnnotation:
    try:
        return ObjectAnnotation(**fields)
    except (TypeError, ValueError) as error:
        kind = SKIP_INVALID_BOX if "bbox" in str(error) else SKIP_INVALID_OBJECT
        raise RecordError(kind, f"{where}: {error}") from error


def _rows_of(objects: Any, where: str) -> list[dict]:
    """Objects as a list of dicts; also accepts the dict-of-lists layout ``datasets`` uses for Sequence."""
    if isinstance(objects, dict):
        lengths = {len(v) for v in objects.values() if isinstance(v, (list, tuple))}
        if len(lengths) > 1:
            raise RecordError(
                SKIP_INVALID_OBJECT, f"{where}: object columns have different lengths {sorted(lengths)}"
            )
        count = lengths.pop() if lengths else 0
        return [
            {k: (v[i] if isinstance(v, (list, tuple)) else v) for k, v in objects.items()}
            for i in range(count)
        ]
    if not isinstance(objects, (list, tuple)) or not all(isinstance(o, dict) for o in objects):
        raise RecordError(SKIP_INVALID_OBJECT, f"{where}: 'objects' must be a list of dicts")
    return list(objects)


@dataclass(frozen=True)
class _Context:
    """What a converter needs besides the row: where relative paths start and how to name categories."""

    base_dir: str | None
    image_root: str | None = None
    category_names: tuple[str, ...] | None = None
    label_map: Mapping[Any, str] | None = None


def _convert_coco(
    row: Mapping[str, Any], source: str, context: _Context, image: Any = None
) -> DetectionRecord:
    file_name = image if image is not None else _require(row, "file_name", "COCO image")
    picture = _load_image(file_name, row.get("image_root") or context.image_root or context.base_dir)
    _check_size(picture, row.get("width"), row.get("height"))
    objects = []
    for i, obj in enumerate(_rows_of(row.get("objects") or [], "COCO image")):
        where = f"annotation {i}"
        if obj.get("category") is None:
            raise RecordError(SKIP_MISSING_FIELD, f"{where}: unknown or missing category_id")
        objects.append(
            _make_object(
                where,
                bbox_xywh=_box_numbers(obj.get("bbox"), where),
                phrase=obj.get("phrase"),
                category=obj.get("category"),
                parent_category=obj.get("parent_category"),
                score=obj.get("score"),
            )
        )
    return DetectionRecord(image=picture, image_id=str(row.get("image_id")), source=source, objects=objects)


def _xyxy_to_xywh(box: list[float]) -> list[float]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _odvg_grounding_objects(grounding: Mapping[str, Any]) -> list[ObjectAnnotation]:
    objects = []
    for i, region in enumerate(_rows_of(grounding.get("regions") or [], "grounding")):
        where = f"region {i}"
        phrase = _require(region, "phrase", where)
        boxes = region.get("bbox")
        # Some ODVG exports give one phrase several boxes: [[x0, y0, x1, y1], ...].
        box_list = (
            boxes
            if isinstance(boxes, (list, tuple)) and boxes and isinstance(boxes[0], (list, tuple))
            else [boxes]
        )
        for box in box_list:
            xywh = _xyxy_to_xywh(_box_numbers(box, where))
            objects.append(_make_object(where, bbox_xywh=xywh, phrase=phrase))
    return objects


def _odvg_detection_objects(detection: Mapping[str, Any], context: _Context) -> list[ObjectAnnotation]:
    objects = []
    for i, instance in enumerate(_rows_of(detection.get("instances") or [], "detection")):
        where = f"instance {i}"
        category = instance.get("category")
        if category is None and context.label_map is not None and instance.get("label") is not None:
            category = context.label_map.get(instance["label"], context.label_map.get(str(instance["label"])))
        if category is None:
            raise RecordError(
                SKIP_MISSING_FIELD, f"{where} has no 'category' (and no label_map entry for its label)"
            )
        xywh = _xyxy_to_xywh(_box_numbers(instance.get("bbox"), where))
        objects.append(_make_object(where, bbox_xywh=xywh, category=category))
    return objects


def _convert_odvg(
    row: Mapping[str, Any], source: str, context: _Context, image: Any = None
) -> DetectionRecord:
    picture = _load_image(
        image if image is not None else _require(row, "filename"), context.image_root or context.base_dir
    )
    _check_size(picture, row.get("width"), row.get("height"))
    caption = None
    if isinstance(row.get("grounding"), dict):
        caption = row["grounding"].get("caption")
        objects = _odvg_grounding_objects(row["grounding"])
    elif isinstance(row.get("detection"), dict):
        objects = _odvg_detection_objects(row["detection"], context)
    else:
        raise RecordError(SKIP_MISSING_FIELD, "ODVG record has neither a 'grounding' nor a 'detection' dict")
    image_id = row.get("image_id") or row.get("filename") or source
    return DetectionRecord(
        image=picture, image_id=str(image_id), source=source, objects=objects, caption=caption
    )


def _convert_granucap(
    row: Mapping[str, Any], source: str, context: _Context, image: Any = None
) -> DetectionRecord:
    picture = _load_image(
        image if image is not None else _require(row, "image"), context.image_root or context.base_dir
    )
    _check_size(picture, row.get("width"), row.get("height"))
    objects = []
    for i, obj in enumerate(_rows_of(_require(row, "objects"), "record")):
        where = f"object {i}"
        category = obj.get("category")
        if (
            isinstance(category, int)
            and not isinstance(category, bool)
            and context.category_names is not None
        ):
            category = context.category_names[category]  # a ClassLabel column of a Hub dataset
        labels = obj.get("labels") or []
        objects.append(
            _make_object(
                where,
                bbox_xywh=_box_numbers(obj.get("bbox"), where),
                labels=list(labels) if isinstance(labels, (list, tuple)) else labels,
                phrase=obj.get("phrase"),
                category=category,
                parent_category=obj.get("parent_category"),
                score=obj.get("score"),
            )
        )
    image_id = row.get("image_id") or row.get("id")
    if image_id is None:
        reference = row.get("image")
        image_id = reference if isinstance(reference, str) else source
    return DetectionRecord(
        image=picture,
        image_id=str(image_id),
        source=source,
        objects=objects,
        caption=row.get("caption"),
        negatives=list(row.get("negatives") or []),
    )


_CONVERTERS: dict[str, Callable[..., DetectionRecord]] = {
    "coco": _convert_coco,
    "odvg": _convert_odvg,
    "granucap": _convert_granucap,
}


def detect_row_format(row: Mapping[str, Any]) -> str:
    """Names the layout of one annotation row: ``"odvg"``, ``"granucap"`` or ``"coco"`` (reader rows).

    ``grounding``/``detection`` -> ODVG; ``objects`` with ``file_name`` -> COCO reader row; ``objects`` or
    ``image`` -> GranuCap.

    Raises:
        RecordError: (kind ``unknown layout``) when the row matches none of them.
    """
    if "grounding" in row or "detection" in row:
        return "odvg"
    if "objects" in row and "file_name" in row:
        return "coco"
    if "objects" in row or "image" in row:
        return "granucap"  # an `image` without `objects` is a GranuCap record missing a field
    raise RecordError(SKIP_UNKNOWN_LAYOUT, f"row with keys {sorted(row)[:8]} is neither ODVG nor GranuCap")


def _webdataset_parts(row: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """Splits a webdataset sample into its annotation dict (the ``json`` member) and its image member."""
    annotation = row.get("json")
    if isinstance(annotation, (bytes, str)):
        try:
            annotation = json.loads(annotation)
        except json.JSONDecodeError as error:
            raise RecordError(SKIP_MALFORMED_ROW, f"json member does not parse: {error}") from error
    if not isinstance(annotation, dict):
        raise RecordError(SKIP_MISSING_FIELD, "webdataset sample has no json member")
    image = next((row[ext] for ext in _IMAGE_EXTENSIONS if row.get(ext) is not None), None)
    if image is None:
        raise RecordError(SKIP_MISSING_FIELD, "webdataset sample has no image member")
    return annotation, image


def _convert_row(
    row: Mapping[str, Any], index: int, description: str, fmt: str, context: _Context
) -> DetectionRecord:
    """Turns one raw row (payload row, webdataset sample or native dict) into a record; raises RecordError."""
    image = None
    if set(row) == {"source", "payload"}:
        source = row["source"]
        try:
            row = json.loads(row["payload"])
        except json.JSONDecodeError as error:
            raise RecordError(SKIP_MALFORMED_ROW, f"line is not valid JSON ({error.msg})", source) from error
        if not isinstance(row, dict):
            raise RecordError(
                SKIP_MALFORMED_ROW, f"line is a JSON {type(row).__name__}, not an object", source
            )
    elif "__key__" in row:
        source = f"{row.get('__url__', description)}#{row['__key__']}"
    else:
        source = f"{description}#{index}"
    try:
        if "__key__" in row:
            row, image = _webdataset_parts(row)
        layout = detect_row_format(row) if fmt == "auto" else fmt
        return _CONVERTERS[layout](row, source, context, image=image)
    except RecordError as error:
        raise RecordError(error.kind, str(error), source=source) from error


# ---------------------------------------------------------------------------------------------- the stream


class RecordStream(Iterator[DetectionRecord]):
    """A single pass over a source, yielding usable :class:`DetectionRecord` objects.

    Attributes:
        dataset: the underlying (already node-split) ``datasets`` dataset of raw rows.
        stats: :class:`SkipStats`, updated while iterating.
        position: raw rows of this rank's stream consumed so far, counting ``start_index``; pass it as
            ``start_index`` to a new stream to resume right after the last record handed out.
    """

    def __init__(
        self,
        dataset: datasets.Dataset | datasets.IterableDataset,
        description: str,
        fmt: str,
        context: _Context,
        start_index: int = 0,
        min_objects: int = 1,
        box_tolerance: float = 1.0,
    ) -> None:
        self.dataset = dataset
        self.description = description
        self.stats = SkipStats()
        self.position = start_index
        self._fmt = fmt
        self._context = context
        self._min_objects = min_objects
        self._box_tolerance = box_tolerance
        self._iterator: Iterator[DetectionRecord] | None = None

    def __iter__(self) -> RecordStream:
        return self

    def __next__(self) -> DetectionRecord:
        if self._iterator is None:
            self._iterator = self._generate()
        return next(self._iterator)

    def _generate(self) -> Iterator[DetectionRecord]:
        # Resume by skipping raw rows of *this rank's* stream: `IterableDataset.skip` placed after
        # `split_dataset_by_node` would skip rows of the global stream instead.
        for index, row in enumerate(islice(iter(self.dataset), self.position, None), start=self.position):
            self.position = index + 1
            self.stats.seen += 1
            try:
                record = _convert_row(row, index, self.description, self._fmt, self._context)
                reason = validate_record(record, tolerance=self._box_tolerance, min_objects=self._min_objects)
                if reason is not None:
                    kind = SKIP_TOO_FEW_OBJECTS if "needs at least" in reason else SKIP_INVALID_BOX
                    raise RecordError(kind, reason, record.source)
            except RecordError as error:
                self.stats.add_skip(error.source or f"{self.description}#{index}", error.kind, str(error))
                continue
            except (TypeError, ValueError, KeyError, IndexError, AttributeError) as error:
                # Data of an unexpected shape (e.g. a ClassLabel index out of range): one record's problem.
                self.stats.add_skip(
                    f"{self.description}#{index}", SKIP_MALFORMED_ROW, f"{type(error).__name__}: {error}"
                )
                continue
            self.stats.kept += 1
            yield clip_record_boxes(record)


# -------------------------------------------------------------------------------------------- opening specs


def _payload_dataset(
    generator: Callable[..., Iterator[dict[str, str]]],
    gen_kwargs: dict[str, Any],
    streaming: bool,
    cache_dir: str | None,
) -> datasets.Dataset | datasets.IterableDataset:
    if streaming:
        return datasets.IterableDataset.from_generator(
            generator, features=_PAYLOAD_FEATURES, gen_kwargs=gen_kwargs
        )
    return datasets.Dataset.from_generator(
        generator, features=_PAYLOAD_FEATURES, gen_kwargs=gen_kwargs, cache_dir=cache_dir
    )


def _open_coco(annotation_file: str, image_root: str | None, streaming: bool, cache_dir: str | None):
    signature = _file_signature(annotation_file)
    images, _, _ = _coco_index(annotation_file, signature)
    num_shards = max(1, min(_COCO_MAX_SHARDS, len(images)))
    bounds = [round(i * len(images) / num_shards) for i in range(num_shards + 1)]
    ranges = [(bounds[i], bounds[i + 1]) for i in range(num_shards)]
    gen_kwargs = {
        "annotation_file": annotation_file,
        "signature": signature,
        "image_root": image_root or _dirname(annotation_file),
        "ranges": ranges,
    }
    return _payload_dataset(_generate_coco_rows, gen_kwargs, streaming, cache_dir)


def _disable_image_decoding(dataset: datasets.Dataset | datasets.IterableDataset):
    """Casts Image columns to ``decode=False`` so a corrupt image becomes one skipped record, not a crash."""
    features = dataset.features
    if features is None:
        return dataset
    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
    return dataset


def _class_label_names(features: datasets.Features | None) -> tuple[str, ...] | None:
    """Category names when ``objects.category`` is a ClassLabel (common in Hub detection datasets)."""
    if features is None or "objects" not in features:
        return None
    inner = getattr(features["objects"], "feature", features["objects"])
    if not isinstance(inner, dict) or "category" not in inner:
        return None
    category = getattr(inner["category"], "feature", inner["category"])
    return tuple(category.names) if isinstance(category, datasets.ClassLabel) else None


def _open_spec(
    path: str,
    fmt: str,
    streaming: bool,
    split: str,
    name: str | None,
    image_root: str | None,
    cache_dir: str | None,
) -> tuple[datasets.Dataset | datasets.IterableDataset, str, str | None]:
    """Opens ``path`` as a dataset of raw rows. Returns ``(dataset, format, base_dir)``."""
    hub_path = path[len("hf://datasets/") :] if path.startswith("hf://datasets/") else None
    is_local = globlib.has_magic(path) or os.path.exists(os.path.expanduser(path))
    is_hub_id = (
        hub_path.count("/") == 1 if hub_path is not None else (not is_local and bool(_HUB_ID.match(path)))
    )
    if is_hub_id:
        repo_id = hub_path or path
        dataset = datasets.load_dataset(
            repo_id, name=name, split=split, streaming=streaming, cache_dir=cache_dir
        )
        return dataset, fmt, image_root
    files = _expand_files(path)
    extensions = {_extension(f) for f in files}
    if len(extensions) != 1:
        raise ValueError(
            f"{path!r} matches files of several kinds {sorted(extensions)}; give one kind per spec"
        )
    extension = extensions.pop()
    base_dir = image_root or _dirname(files[0])
    if extension == "json" or fmt == "coco":
        if fmt not in ("auto", "coco"):
            raise ValueError(
                f"a .json file is read as COCO; format={fmt!r} needs .jsonl, .parquet or .tar data"
            )
        if len(files) != 1 or extension != "json":
            raise ValueError(f"COCO input must be exactly one .json file, {path!r} matches {files[:3]}")
        return _open_coco(files[0], image_root, streaming, cache_dir), "coco", base_dir
    if extension == "jsonl":
        shards = [(f, _file_signature(f)) for f in files]
        return _payload_dataset(_generate_jsonl_rows, {"files": shards}, streaming, cache_dir), fmt, base_dir
    if extension in ("parquet", "tar"):
        builder = "parquet" if extension == "parquet" else "webdataset"
        dataset = datasets.load_dataset(
            builder, data_files=files, split="train", streaming=streaming, cache_dir=cache_dir
        )
        return dataset, fmt, base_dir
    raise ValueError(
        f"unsupported data file type '.{extension}' in {path!r}: use .json (COCO), .jsonl, .parquet or .tar"
    )


def _extension(path: str) -> str:
    lower = path.lower()
    return "jsonl" if lower.endswith((".jsonl", ".ndjson")) else lower.rsplit(".", 1)[-1]


def load_records(
    spec: str | Mapping[str, Any],
    streaming: bool = True,
    *,
    format: RecordFormat = "auto",  # noqa: A002 - the documented option name
    image_root: str | None = None,
    split: str = "train",
    name: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    start_index: int = 0,
    shuffle_seed: int | None = None,
    shuffle_buffer_size: int = 1000,
    min_objects: int = 1,
    box_tolerance: float = 1.0,
    label_map: Mapping[Any, str] | None = None,
    cache_dir: str | None = None,
) -> RecordStream:
    """Reads any supported source as a stream of usable records.

    Args:
        spec: a local file or glob (``.json`` COCO, ``.jsonl``, ``.parquet``, webdataset ``.tar``), an fsspec
            URL of such files (``hf://datasets/owner/name/path/*.jsonl``), a Hub dataset id (``owner/name`` or
            ``hf://datasets/owner/name``), or a dict with key ``path`` plus any keyword below
            (``{"path": "ann.json", "format": "coco", "image_root": "images/"}``); dict values win.
        streaming: stream through ``datasets.IterableDataset`` (default) instead of building a cached
            ``datasets.Dataset`` first.
        format: ``"coco"``, ``"odvg"``, ``"granucap"`` or ``"auto"`` (``.json`` is COCO; other rows are
            recognised by their keys: ``grounding``/``detection`` -> ODVG, ``objects`` -> GranuCap).
        image_root: folder (or URL prefix) that relative image paths start from; default: the folder of
            the (first) data file.
        split, name: split and config name of a Hub dataset.
        rank, world_size: this process's place in distributed training (``split_dataset_by_node``).
        start_index: raw rows of this rank's stream to skip (resume; see :attr:`RecordStream.position`).
        shuffle_seed: shuffle (shard order plus a buffer of ``shuffle_buffer_size`` rows when streaming)
            with this seed before splitting by node; ``None`` keeps the file order.
        min_objects: records with fewer objects are skipped.
        box_tolerance: pixels a box may overhang the image before the record is skipped (it is clipped).
        label_map: ODVG detection label id -> category name, for instances without ``category``.
        cache_dir: ``datasets`` cache folder (non-streaming mode and Hub downloads).

    Returns:
        A :class:`RecordStream`: iterate it for :class:`DetectionRecord` objects (boxes ``xywh`` pixels,
        inside the image), read ``.stats`` for skip counts and ``.position`` to resume.

    Raises:
        ValueError: for bad arguments, missing files, unsupported file types or a malformed COCO file.
    """
    options: dict[str, Any] = {
        "format": format,
        "image_root": image_root,
        "split": split,
        "name": name,
        "label_map": label_map,
    }
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"path", *options}
        if "path" not in spec or unknown:
            raise ValueError(f"a dict spec needs 'path' and only keys {sorted(options)}; got {sorted(spec)}")
        options.update({k: v for k, v in spec.items() if k != "path"})
        path = spec["path"]
    elif isinstance(spec, (str, os.PathLike)):
        path = spec
    else:
        raise TypeError(f"spec must be a str, os.PathLike or dict, got {type(spec).__name__}")
    path = os.fspath(path)
    fmt = options["format"]
    if fmt not in RECORD_FORMATS:
        raise ValueError(f"format must be one of {RECORD_FORMATS}, got {fmt!r}")
    if (
        not isinstance(world_size, int)
        or world_size < 1
        or not isinstance(rank, int)
        or not 0 <= rank < world_size
    ):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    if not isinstance(start_index, int) or start_index < 0:
        raise ValueError(f"start_index must be a non-negative int, got {start_index!r}")

    dataset, fmt, base_dir = _open_spec(
        path, fmt, streaming, options["split"], options["name"], options["image_root"], cache_dir
    )
    context = _Context(
        base_dir=base_dir,
        image_root=options["image_root"],
        category_names=_class_label_names(dataset.features),
        label_map=options["label_map"],
    )
    dataset = _disable_image_decoding(dataset)
    if shuffle_seed is not None:
        if isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer_size)
        else:
            dataset = dataset.shuffle(seed=shuffle_seed)
    if world_size > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return RecordStream(
        dataset,
        description=path,
        fmt=fmt,
        context=context,
        start_index=start_index,
        min_objects=min_objects,
        box_tolerance=box_tolerance,
    )


def read_coco(
    annotation_file: str, image_root: str | None = None, streaming: bool = True, **kwargs: Any
) -> RecordStream:
    """Reads a COCO detection json; ``image_root`` defaults to the json's folder. See :func:`load_records`."""
    return load_records(annotation_file, streaming, format="coco", image_root=image_root, **kwargs)


def read_odvg(
    path: str, image_root: str | None = None, streaming: bool = True, **kwargs: Any
) -> RecordStream:
    """Reads ODVG jsonl (``grounding`` or ``detection`` lines, boxes ``xyxy``). See :func:`load_records`."""
    return load_records(path, streaming, format="odvg", image_root=image_root, **kwargs)


def read_granucap(
    path: str, image_root: str | None = None, streaming: bool = True, **kwargs: Any
) -> RecordStream:
    """Reads GranuCap-style jsonl / parquet / webdataset records (``xywh`` boxes). See load_records."""
    return load_records(path, streaming, format="granucap", image_root=image_root, **kwargs)
