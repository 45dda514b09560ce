"""The engine: streams records through a step in batches and writes resumable shards; chains the steps.

``run_pipeline(input, output, recaptioner=..., llm=..., box_labeller=...)`` runs all four steps for one
shard. Output layout (one folder per step, each readable by `datasets` and by the next step):

    <output>/recaption/  <output>/extract/  <output>/instruct/  <output>/boxes/  <output>/images/

``<output>/boxes`` holds the GranuCap-style records that ``detclipv3 train --stage 2`` reads.
"""

from __future__ import annotations

import logging
import platform
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from .labelling import BoxLabeller
from .models import as_recaptioner, as_text_generator
from .prompts import PromptTemplates
from .steps import AnnotationStep, BoxLabelStep, ExtractStep, InstructionStep, RecaptionStep
from .storage import InputColumns, ShardWriter, iter_input_records, materialise_image, read_part_records

logger = logging.getLogger(__name__)

STEPS = ("recaption", "extract", "instruct", "boxes")
# Which step's output each step reads when both run in the same invocation.
PRODUCER: dict[str, str | None] = {"recaption": None, "extract": "recaption", "instruct": "extract", "boxes": "extract"}
IMAGES_DIR = "images"


@dataclass(frozen=True)
class AnnotationConfig:
    """Engine settings shared by all steps.

    Attributes:
        prompts: the prompt templates (defaults: the paper's prompts).
        columns: raw-input column names (caption candidates, image, optional id).
        split: split of a Hub dataset input.
        num_shards, shard_index: this process handles rows with ``global_index % num_shards == shard_index``.
        batch_size: records per model call batch.
        records_per_file: records per finished output file.
        output_format: ``"jsonl"`` or ``"parquet"`` for finished output files.
        box_threshold: minimum detector score kept in step 4 (inclusive).
        nms_iou: IoU of the per-entity de-duplication in step 4.
        limit: only the first `limit` input rows (before sharding); None for all.
        progress: show a tqdm bar (records/s) per step.
    """

    prompts: PromptTemplates = field(default_factory=PromptTemplates)
    columns: InputColumns = field(default_factory=InputColumns)
    split: str = "train"
    num_shards: int = 1
    shard_index: int = 0
    batch_size: int = 8
    records_per_file: int = 1000
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    box_threshold: float = 0.3
    nms_iou: float = 0.5
    limit: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.box_threshold <= 1.0:
            raise ValueError(f"box_threshold must be in [0, 1], got {self.box_threshold}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"limit must be >= 0, got {self.limit}")


@dataclass(frozen=True)
class StepResult:
    """What one `run_step` call did: `written` records this run, `skipped` already done, status counts."""

    step: str
    output_dir: Path
    written: int
    skipped: int
    statuses: dict[str, int]
    resumed_complete: bool = False


def library_versions() -> str:
    """Versions recorded in provenance, e.g. ``detclipv3_hf=0.1.0 transformers=5.2 torch=2.6 ...``."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for package in ("detclipv3-hf", "transformers", "torch", "datasets"):
        try:
            parts.append(f"{package}={version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package}=unknown")
    parts.append(f"python={platform.python_version()}")
    return " ".join(parts)


def _batched(records: Iterable[dict[str, Any]], size: int):
    batch: list[dict[str, Any]] = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_step(
    step: AnnotationStep,
    records: Iterable[dict[str, Any]],
    output_dir: str | Path,
    *,
    output_root: str | Path | None = None,
    config: AnnotationConfig = AnnotationConfig(),
) -> StepResult:
    """Runs `step` over `records` (already this shard's) and writes them to `output_dir`, resumably.

    Records already written by an earlier run (same `output_dir` and shard) are skipped before any model
    call; a shard marked complete is not read at all. Every written record gets
    ``provenance[step.name]`` (model ids, prompts, thresholds, library versions).

    Raises:
        ValueError: when the input repeats a record id, or the step breaks its contract.
    """
    output_dir = Path(output_dir)
    root = Path(output_root) if output_root is not None else output_dir.parent
    writer = ShardWriter(
        output_dir, root, shard_index=config.shard_index, num_shards=config.num_shards,
        records_per_file=config.records_per_file, output_format=config.output_format,
    )
    if writer.complete:
        summary = writer.read_summary()
        logger.info("%s: %s already complete, skipping", step.name, writer.tag)
        return StepResult(step.name, output_dir, 0, summary.get("records", 0), summary.get("statuses", {}), True)
    provenance = {**step.provenance(), "versions": library_versions(), "shard": writer.tag}
    done = writer.done_ids()
    seen: set[str] = set()
    statuses: Counter[str] = Counter()
    skipped = written = 0
    images_dir = root / IMAGES_DIR

    def pending() -> Iterable[dict[str, Any]]:
        nonlocal skipped
        for record in records:
            rid = str(record["id"])
            if rid in seen:
                raise ValueError(f"record id {rid!r} occurs twice in the input of step {step.name!r}; ids must be unique")
            seen.add(rid)
            if rid in done:
                skipped += 1
                continue
            yield {**record, "id": rid, "image": materialise_image(record["image"], images_dir, rid)}

    bar = tqdm(desc=f"{step.name} [{writer.tag}]", unit="rec", disable=not config.progress, dynamic_ncols=True)
    try:
        for batch in _batched(pending(), config.batch_size):
            results = step.process([dict(r) for r in batch])
            if [str(r.get("id")) for r in results] != [r["id"] for r in batch]:
                raise ValueError(f"step {step.name!r} must return its input records in order (ids differ)")
            for record in results:
                record["provenance"] = {**(record.get("provenance") or {}), step.name: provenance}
                statuses[record.get("status", "ok")] += 1
            writer.write(results)
            written += len(results)
            bar.update(len(results))
            bar.set_postfix(statuses, refresh=False)
    finally:
        bar.close()
    writer.close({"step": step.name, "provenance": provenance})
    return StepResult(step.name, output_dir, written, skipped, dict(statuses))


def _resolve_steps(steps: Sequence[str] | str | None) -> list[str]:
    if steps is None:
        return list(STEPS)
    if isinstance(steps, str):
        steps = [s.strip() for s in steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        raise ValueError(f"unknown or empty steps {list(steps)}; choose from {list(STEPS)}")
    return [s for s in STEPS if s in steps]  # canonical order


def run_pipeline(
    input: str | Path,
    output: str | Path,
    *,
    recaptioner: Any = None,
    llm: Any = None,
    box_labeller: BoxLabeller | None = None,
    steps: Sequence[str] | str | None = None,
    config: AnnotationConfig | None = None,
    on_step_done: Callable[[StepResult], None] | None = None,
) -> dict[str, StepResult]:
    """Runs the requested steps (default all four) for one shard, each reading its producer's output.

    A step whose producer is not among `steps` reads `input` instead, so every step runs alone on the
    previous step's output folder (e.g. ``steps=["boxes"], input="<out>/extract"``).

    Args:
        input: a `datasets` source: raw image-text pairs, or a previous step's output folder.
        output: the output root; step folders are created under it.
        recaptioner: a `Recaptioner` or callable ``(images, prompts) -> texts`` (needed by recaption).
        llm: a `TextGenerator` or callable ``prompts -> texts`` (needed by extract).
        box_labeller: a `BoxLabeller`, e.g. `DetClipV3BoxLabeller` (needed by boxes).
        steps: subset of ``("recaption", "extract", "instruct", "boxes")``, list or comma-separated.
        config: engine settings; defaults to `AnnotationConfig()`.
        on_step_done: called with each step's result (the CLI prints it).

    Returns:
        Step name to its `StepResult`.
    """
    config = config or AnnotationConfig()
    selected = _resolve_steps(steps)
    needs = {"recaption": ("recaptioner", recaptioner), "extract": ("llm", llm), "boxes": ("box_labeller", box_labeller)}
    missing = [f"{step} needs {needs[step][0]}" for step in selected if step in needs and needs[step][1] is None]
    if missing:
        raise ValueError("missing models: " + "; ".join(missing))
    output = Path(output)
    results: dict[str, StepResult] = {}
    for name in selected:
        step = _build_step(name, config, recaptioner=recaptioner, llm=llm, box_labeller=box_labeller)
        producer = PRODUCER[name]
        source = str(output / producer) if producer in results else str(input)
        records = iter_input_records(
            source, columns=config.columns, split=config.split, num_shards=config.num_shards,
            shard_index=config.shard_index, limit=config.limit if producer not in results else None,
        )
        results[name] = run_step(step, records, output / name, output_root=output, config=config)
        if on_step_done is not None:
            on_step_done(results[name])
    return results


def _build_step(name: str, config: AnnotationConfig, *, recaptioner: Any, llm: Any, box_labeller: Any) -> AnnotationStep:
    if name == "recaption":
        return RecaptionStep(as_recaptioner(recaptioner), config.prompts)
    if name == "extract":
        return ExtractStep(as_text_generator(llm), config.prompts)
    if name == "instruct":
        return InstructionStep(config.prompts)
    return BoxLabelStep(box_labeller, threshold=config.box_threshold, nms_iou=config.nms_iou)


def export_llava_json(instruct_dir: str | Path, path: str | Path) -> int:
    """Merges an instruct step folder into one LLaVA training file (a JSON array).

    Only records with a conversation are exported; `image` stays as written (relative paths are made
    absolute so the file can live anywhere). Returns the number of exported conversations.
    """
    import json

    instruct_dir = Path(instruct_dir).resolve()
    parts = sorted(p for p in instruct_dir.iterdir() if p.name.startswith("part-"))
    if not parts:
        raise ValueError(f"{str(instruct_dir)!r} holds no finished part files of the instruct step")
    rows = []
    for part in parts:
        for record in read_part_records(part):
            if record.get("conversations"):
                image = Path(record["image"])
                image = image if image.is_absolute() else (instruct_dir / image).resolve()
                rows.append({"id": record["id"], "image": str(image), "conversations": record["conversations"]})
    Path(path).write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return len(rows)
