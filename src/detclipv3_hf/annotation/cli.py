"""``detclipv3 annotate``: the command-line face of `run_pipeline`.

The top-level CLI wires it as::

    sub = subparsers.add_parser("annotate", help="auto-annotate image-text pairs (GranuCap-style)")
    add_annotate_arguments(sub)
    sub.set_defaults(func=run_annotate)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .pipeline import STEPS, AnnotationConfig, StepResult, _resolve_steps, run_pipeline
from .prompts import PromptTemplates, read_template_argument
from .storage import InputColumns


def add_annotate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``annotate`` options to `parser` and returns it."""
    io = parser.add_argument_group("input / output")
    io.add_argument("--input", required=True,
                    help="datasets source: JSONL/JSON/parquet/CSV file, folder or glob, a previous step's output "
                         "folder, or a Hub dataset id")
    io.add_argument("--output", required=True, help="output root; one folder per step is created under it")
    io.add_argument("--steps", default=",".join(STEPS),
                    help=f"comma-separated subset of {','.join(STEPS)} (default: all). A step whose producer is "
                         "not listed reads --input")
    io.add_argument("--caption-column", action="append", default=None,
                    help="caption column of raw input (repeatable; first present wins; default: caption, text)")
    io.add_argument("--image-column", default="image", help="image column of raw input (path or bytes)")
    io.add_argument("--id-column", default=None, help="column with unique record ids (default: row position)")
    io.add_argument("--split", default="train", help="split of a Hub dataset")
    io.add_argument("--limit", type=int, default=None, help="only the first N input rows (before sharding)")
    io.add_argument("--output-format", choices=("jsonl", "parquet"), default="jsonl")
    io.add_argument("--records-per-file", type=int, default=1000)

    shard = parser.add_argument_group("sharding (one process per shard; any scheduler)")
    shard.add_argument("--num-shards", type=int, default=1)
    shard.add_argument("--shard-index", type=int, default=None,
                       help="this process's shard; default 0, or the RANK / SLURM_PROCID of the launcher")

    models = parser.add_argument_group("models (any Hugging Face model id or local folder)")
    models.add_argument("--recaption-model", default=None, help="image-text-to-text model for step 1")
    models.add_argument("--llm", default=None, help="text-generation model for step 2")
    models.add_argument("--detector", default=None, help="trained DetCLIPv3 checkpoint for step 4")
    models.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    models.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: checkpoint's)")
    models.add_argument("--batch-size", type=int, default=8, help="records per model call")
    models.add_argument("--max-new-tokens", type=int, default=256)
    models.add_argument("--trust-remote-code", action="store_true")
    models.add_argument("--box-threshold", type=float, default=0.3, help="minimum detector score (step 4)")
    models.add_argument("--nms-iou", type=float, default=0.5, help="per-entity de-duplication IoU (step 4)")

    prompts = parser.add_argument_group("prompts (a template string, or @file to read one)")
    prompts.add_argument("--recaption-prompt", default=None, help="step 1; must contain {raw caption}")
    prompts.add_argument("--filter-prompt", default=None, help="step 2a; must contain {caption}")
    prompts.add_argument("--extract-prompt", default=None, help="step 2b; must contain {caption}")
    prompts.add_argument("--instruction-prompt", default=None, help="step 3; must contain {raw caption}")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def _default_shard_index(num_shards: int) -> int:
    """RANK (torchrun / accelerate launch) or SLURM_PROCID when the launcher set one, else 0."""
    import os

    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value is not None and value.isdigit() and num_shards > 1:
            return int(value)
    return 0


def config_from_args(args: argparse.Namespace) -> AnnotationConfig:
    """The `AnnotationConfig` an argument namespace describes."""
    prompts = PromptTemplates().replace(
        recaption=read_template_argument(args.recaption_prompt),
        filter=read_template_argument(args.filter_prompt),
        extract=read_template_argument(args.extract_prompt),
        instruction=read_template_argument(args.instruction_prompt),
    )
    shard_index = args.shard_index if args.shard_index is not None else _default_shard_index(args.num_shards)
    columns = InputColumns(
        caption=tuple(args.caption_column) if args.caption_column else InputColumns().caption,
        image=args.image_column,
        id=args.id_column,
    )
    return AnnotationConfig(
        prompts=prompts, columns=columns, split=args.split, num_shards=args.num_shards, shard_index=shard_index,
        batch_size=args.batch_size, records_per_file=args.records_per_file, output_format=args.output_format,
        box_threshold=args.box_threshold, nms_iou=args.nms_iou, limit=args.limit, progress=not args.no_progress,
    )


def _load_models(args: argparse.Namespace, steps: list[str]) -> dict[str, Any]:
    """Loads only the models the selected steps need (each is optional otherwise)."""
    from .labelling import DetClipV3BoxLabeller
    from .models import TransformersRecaptioner, TransformersTextGenerator

    need = {"recaption": ("--recaption-model", args.recaption_model), "extract": ("--llm", args.llm),
            "boxes": ("--detector", args.detector)}
    missing = [f"step {s} needs {need[s][0]}" for s in steps if s in need and not need[s][1]]
    if missing:
        raise ValueError("; ".join(missing))
    common = {"device": args.device, "dtype": args.dtype, "trust_remote_code": args.trust_remote_code,
              "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens}
    models: dict[str, Any] = {}
    if "recaption" in steps:
        models["recaptioner"] = TransformersRecaptioner.from_pretrained(args.recaption_model, **common)
    if "extract" in steps:
        models["llm"] = TransformersTextGenerator.from_pretrained(args.llm, **common)
    if "boxes" in steps:
        models["box_labeller"] = DetClipV3BoxLabeller.from_pretrained(
            args.detector, threshold=args.box_threshold, device=args.device, batch_size=args.batch_size
        )
    return models


def _report(result: StepResult) -> None:
    state = "already complete" if result.resumed_complete else f"{result.written} written, {result.skipped} resumed"
    print(f"[annotate] {result.step}: {state} -> {result.output_dir} {json.dumps(result.statuses)}", flush=True)


def run_annotate(args: argparse.Namespace) -> int:
    """Runs ``detclipv3 annotate`` for the parsed `args`; returns the process exit code (0)."""
    steps = _resolve_steps(args.steps)
    config = config_from_args(args)
    models = _load_models(args, steps)
    run_pipeline(args.input, args.output, steps=steps, config=config, on_step_done=_report, **models)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m detclipv3_hf.annotation.cli``)."""
    parser = add_annotate_arguments(argparse.ArgumentParser("detclipv3 annotate", description=__doc__))
    return run_annotate(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
