"""Reading the pipeline's inputs with `datasets` and writing its output shards resumably.

Input: any `datasets` source, streamed: local JSONL / JSON / parquet / CSV files (a file, a folder or a
glob), a previous step's output folder, or a Hub dataset id. Every row becomes a pipeline record with a
stable string `id` (the `id_column` value, else the row's global position in the input stream) and an
`image` that is an absolute path, or raw bytes still to be saved under ``<output>/images``.

Output layout of one step for shard ``I`` of ``N`` (all names fixed, so a rerun finds them):

    <step dir>/part-IIIII-of-NNNNN-CCCCC.jsonl|parquet   finished files, each written atomically
    <step dir>/_part-IIIII-of-NNNNN.journal              records done since the last finished file
    <step dir>/_part-IIIII-of-NNNNN.done.json            written last: the shard is complete

A record is done once it is in a finished file or in the journal (appended and fsync'ed per batch). On
restart the journal is cut back to its last complete line and de-duplicated against the finished files,
so a crash at any point neither loses nor duplicates a record.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_PART = re.compile(r"^part-(\d{5})-of-(\d{5})-(\d{5})\.(jsonl|parquet)$")
PIPELINE_MARKER = "provenance"  # a row that has it was written by a pipeline step


@dataclass(frozen=True)
class InputColumns:
    """Which columns of a raw image-text dataset hold what.

    Attributes:
        caption: candidate caption columns, the first present one is used.
        image: the image column (path string, bytes, ``{"bytes", "path"}`` or a PIL image).
        id: a column with unique record ids; None numbers rows by their position in the input.
    """

    caption: tuple[str, ...] = ("caption", "text")
    image: str = "image"
    id: str | None = None


def shard_tag(shard_index: int, num_shards: int) -> str:
    """``part-IIIII-of-NNNNN``; validates the pair."""
    if not isinstance(num_shards, int) or not isinstance(shard_index, int):
        raise TypeError("num_shards and shard_index must be int")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"need num_shards >= 1 and 0 <= shard_index < num_shards, got {shard_index} of {num_shards}")
    return f"part-{shard_index:05d}-of-{num_shards:05d}"


# ----------------------------------------------------------------------------------------------- reading


def _step_part_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _PART.match(p.name))


def _local_data_files(spec: str) -> list[Path] | None:
    """The data files a local spec names (file, folder or glob), or None when it is not local."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        parts = _step_part_files(path)
        if parts:
            return parts
        return sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and not p.name.startswith(("_", ".")))
    if any(ch in spec for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).suffix in DATA_SUFFIXES)
    return None


def _select_shard_files(files: list[Path], num_shards: int, shard_index: int) -> tuple[list[Path], bool]:
    """Step outputs written with the same sharding are read shard-by-shard (no modulo needed)."""
    matches = [_PART.match(f.name) for f in files]
    if files and all(m is not None and int(m.group(2)) == num_shards for m in matches):
        return [f for f, m in zip(files, matches) if int(m.group(1)) == shard_index], True
    return files, False


def _stream_file(path: Path, split: str):
    import datasets

    builder = DATA_SUFFIXES.get(path.suffix)
    if builder is None:
        raise ValueError(f"unsupported input file {str(path)!r}; expected one of {sorted(DATA_SUFFIXES)}")
    return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)


def _undecoded(ds, image_column: str):
    """Stops `datasets` from decoding every image of the stream: only this shard's images are opened."""
    import datasets

    features = getattr(ds, "features", None)
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        return ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def iter_input_records(
    spec: str,
    *,
    columns: InputColumns = InputColumns(),
    split: str = "train",
    num_shards: int = 1,
    shard_index: int = 0,
    limit: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Streams the records of shard `shard_index` of `num_shards` from a `datasets` source.

    Raw rows are assigned to shards by ``global_row_index % num_shards`` (disjoint, complete, no length
    needed); a previous step's folder written with the same `num_shards` is read file-by-file instead,
    so a chained run on one machine only ever sees its own shard.

    Args:
        spec: a local file / folder / glob, a pipeline step folder, or a Hub dataset id.
        columns: the raw dataset's column names (ignored for pipeline records).
        split: split of a Hub dataset.
        limit: only the first `limit` rows of the whole input (before sharding) are considered.

    Yields:
        Records with at least `id`, `image`, `raw_caption`, `caption`; pipeline records keep all fields.
    """
    shard_tag(shard_index, num_shards)
    files = _local_data_files(spec)
    if files is None:
        import datasets

        if os.path.exists(spec):
            raise ValueError(f"input {spec!r} exists but holds no {sorted(DATA_SUFFIXES)} files")
        sources = [(datasets.load_dataset(spec, split=split, streaming=True), Path.cwd())]
        presharded = False
    else:
        if not files:
            raise ValueError(f"input {spec!r} matches no {sorted(DATA_SUFFIXES)} files")
        files, presharded = _select_shard_files(files, num_shards, shard_index)
        sources = ((_stream_file(f, split), f.parent.resolve()) for f in files)
    index = 0
    for ds, base in sources:
        for row in _undecoded(ds, columns.image):
            if limit is not None and index >= limit:
                return
            position, index = index, index + 1
            if not presharded and position % num_shards != shard_index:
                continue
            yield normalise_record(row, position, base, columns)


def normalise_record(row: dict[str, Any], position: int, base: Path, columns: InputColumns) -> dict[str, Any]:
    """One input row as a pipeline record; relative image paths are resolved against `base`."""
    if PIPELINE_MARKER in row:
        record = dict(row)
        record["image"] = _absolute_image(record.get("image"), base)
        return record
    if columns.image not in row:
        raise ValueError(f"input row {position} has no image column {columns.image!r}; columns: {sorted(row)}")
    caption_column = next((c for c in columns.caption if c in row), None)
    if caption_column is None:
        raise ValueError(
            f"input row {position} has none of the caption columns {list(columns.caption)}; columns: {sorted(row)}"
        )
    if columns.id is not None:
        if row.get(columns.id) is None:
            raise ValueError(f"input row {position} has no id in column {columns.id!r}")
        record_id = str(row[columns.id])
    else:
        record_id = f"{position:012d}"
    caption = row[caption_column]
    caption = "" if caption is None else " ".join(str(caption).split())
    return {"id": record_id, "image": _absolute_image(row[columns.image], base), "raw_caption": caption,
            "caption": caption}


def _absolute_image(value: Any, base: Path) -> Any:
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        value = value["path"]
    if isinstance(value, str):
        if re.match(r"^[a-z][a-z0-9+.-]*://", value):
            raise ValueError(f"image {value!r} is a URL; download images first (the pipeline reads local files)")
        return str((base / value).resolve()) if not os.path.isabs(value) else value
    return value


def _safe_name(record_id: str) -> str:
    """A filesystem-safe, collision-free file stem for a record id."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", record_id)[:80]
    return f"{stem}-{hashlib.sha1(record_id.encode()).hexdigest()[:8]}"


def materialise_image(value: Any, images_dir: Path, record_id: str) -> str:
    """Returns an absolute image path, saving in-memory images (bytes / PIL) under `images_dir` first.

    Idempotent: the file name depends only on the record id, and the write is atomic.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        data, hint = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, hint = bytes(value), None
    elif isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data, hint = buffer.getvalue(), "x.png"
    else:
        raise TypeError(f"record {record_id!r}: unsupported image value of type {type(value).__name__}")
    if not data:
        raise ValueError(f"record {record_id!r}: image has neither bytes nor a path")
    suffix = Path(hint).suffix.lower() if hint else ""
    if not suffix:
        try:
            suffix = "." + (Image.open(io.BytesIO(data)).format or "img").lower()
        except OSError:
            suffix = ".img"
    images_dir.mkdir(parents=True, exist_ok=True)
    target = images_dir / (_safe_name(record_id) + suffix)
    if not target.exists():
        _atomic_write_bytes(target, data)
    return str(target.resolve())


def load_image(path: str) -> Image.Image:
    """Opens an image as RGB; OSError / ValueError on a missing or broken file."""
    with Image.open(path) as img:
        return img.convert("RGB")


# ----------------------------------------------------------------------------------------------- writing


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonl_bytes(records: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _parquet_bytes(records: Sequence[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(list(records)), buffer)
    return buffer.getvalue().to_pybytes()


def read_part_records(path: Path) -> list[dict[str, Any]]:
    """All records of one finished part file (JSONL or parquet)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_part_ids(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [str(v) for v in pq.read_table(path, columns=["id"]).column("id").to_pylist()]
    return [str(r["id"]) for r in read_part_records(path)]


class ShardWriter:
    """Resumable, idempotent writer of one shard of one step (layout in the module docstring).

    Args:
        step_dir: the step's output folder.
        output_root: records' image paths under it are written relative to `step_dir` (portable output).
        shard_index, num_shards: which shard this process writes.
        records_per_file: records per finished file.
        output_format: ``"jsonl"`` or ``"parquet"`` for finished files.
    """

    def __init__(
        self,
        step_dir: Path,
        output_root: Path,
        *,
        shard_index: int,
        num_shards: int,
        records_per_file: int = 1000,
        output_format: str = "jsonl",
    ) -> None:
        if output_format not in ("jsonl", "parquet"):
            raise ValueError(f"output_format must be 'jsonl' or 'parquet', got {output_format!r}")
        if records_per_file < 1:
            raise ValueError(f"records_per_file must be >= 1, got {records_per_file}")
        self.step_dir = Path(step_dir).resolve()
        self.output_root = Path(output_root).resolve()
        self.tag = shard_tag(shard_index, num_shards)
        self.records_per_file = records_per_file
        self.output_format = output_format
        self.journal_path = self.step_dir / f"_{self.tag}.journal"
        self.done_path = self.step_dir / f"_{self.tag}.done.json"
        self.step_dir.mkdir(parents=True, exist_ok=True)
        self._finished_ids: set[str] = set()
        self._journal: list[dict[str, Any]] = []
        self._next_chunk = 0
        self._recover()

    # -- state
    def _parts(self) -> list[Path]:
        return [p for p in _step_part_files(self.step_dir) if p.name.startswith(self.tag + "-")]

    def _recover(self) -> None:
        parts = self._parts()
        for part in parts:
            self._finished_ids.update(_read_part_ids(part))
        self._next_chunk = 1 + max((int(_PART.match(p.name).group(3)) for p in parts), default=-1)
        if not self.journal_path.exists():
            return
        kept: list[dict[str, Any]] = []
        seen: set[str] = set()
        changed = False
        with open(self.journal_path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    changed = True  # the torn last line of a killed append
                    continue
                rid = str(record["id"])
                if rid in self._finished_ids or rid in seen:
                    changed = True  # finished file written but journal not yet cleared when killed
                    continue
                seen.add(rid)
                kept.append(record)
        self._journal = kept
        if changed:
            _atomic_write_bytes(self.journal_path, _jsonl_bytes(kept))

    @property
    def complete(self) -> bool:
        """True when this shard of this step finished in an earlier run."""
        return self.done_path.exists()

    def done_ids(self) -> set[str]:
        """Ids of every record already written (finished files + journal)."""
        return self._finished_ids | {str(r["id"]) for r in self._journal}

    # -- writing
    def _portable(self, record: dict[str, Any]) -> dict[str, Any]:
        image = record.get("image")
        if isinstance(image, str) and os.path.isabs(image):
            path = Path(image)
            if path.is_relative_to(self.output_root):
                record = {**record, "image": os.path.relpath(path, self.step_dir)}
        return record

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        """Appends finished records durably; rolls a finished file every `records_per_file` records."""
        if not records:
            return
        records = [self._portable(r) for r in records]
        with open(self.journal_path, "ab") as f:
            f.write(_jsonl_bytes(records))
            f.flush()
            os.fsync(f.fileno())
        self._journal.extend(records)
        while len(self._journal) >= self.records_per_file:
            self._finish_file(self.records_per_file)

    def _finish_file(self, count: int) -> None:
        chunk, rest = self._journal[:count], self._journal[count:]
        name = f"{self.tag}-{self._next_chunk:05d}.{self.output_format}"
        data = _parquet_bytes(chunk) if self.output_format == "parquet" else _jsonl_bytes(chunk)
        _atomic_write_bytes(self.step_dir / name, data)
        # A kill right here leaves `chunk` both in the file and the journal; `_recover` drops the copy.
        _atomic_write_bytes(self.journal_path, _jsonl_bytes(rest))
        self._finished_ids.update(str(r["id"]) for r in chunk)
        self._journal = rest
        self._next_chunk += 1

    def close(self, summary: dict[str, Any]) -> None:
        """Finishes the last file and marks the shard complete with `summary` (counts, provenance)."""
        if self._journal:
            self._finish_file(len(self._journal))
        if self.journal_path.exists():
            self.journal_path.unlink()
        parts = self._parts()
        statuses: dict[str, int] = {}
        for part in parts:  # over the whole shard, including records written by earlier (killed) runs
            for record in read_part_records(part):
                statuses[record.get("status", "ok")] = statuses.get(record.get("status", "ok"), 0) + 1
        payload = {"shard": self.tag, "records": len(self._finished_ids), "files": [p.name for p in parts],
                   "statuses": statuses, **summary}
        _atomic_write_bytes(self.done_path, json.dumps(payload, indent=2, ensure_ascii=False).encode("utf-8"))

    def read_summary(self) -> dict[str, Any]:
        """The summary saved by `close` in the run that completed this shard."""
        return json.loads(self.done_path.read_text(encoding="utf-8"))
