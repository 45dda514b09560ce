"""``detclipv3 train``: the command-line face of the training loop.

Examples::

    detclipv3 train --stage 1 --model new:configs/tiny.json --processor tokenizer/ \\
        --data detection=world/train/annotations_coco.json --data grounding=world/train/granucap.jsonl \\
        --concepts world/concepts.txt --output runs/stage1 --max-steps 2000 --batch-size 4
    detclipv3 train --stage 2 --model runs/stage1 --data captioned=world/train/granucap.jsonl --output runs/stage2
    detclipv3 train --config run.yaml --resume latest          # YAML/JSON config; flags override it
    accelerate launch --num_processes 8 -m detclipv3_hf.training.cli --stage 1 ...   # same loop, distributed

``--model new:<config.json or folder>`` initialises fresh weights from a config (a fresh run needs ``--processor``,
a processor folder or a plain tokenizer folder). ``--data`` takes ``KIND=SPEC`` (kind ``detection``, ``grounding`` or
``captioned``) or a bare ``SPEC`` (the stage's first data kind); SPEC is anything ``load_records`` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from .config import TrainConfig, build_train_config, load_config_file
from .trainer import TrainResult, train


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from error


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds every ``detclipv3 train`` option to ``parser`` (defaults are ``None``: unset flags leave the config file
    and the :class:`TrainConfig` defaults in charge) and returns it."""
    p = parser
    p.add_argument("--config", help="YAML or JSON file of TrainConfig fields; flags override it")
    p.add_argument("--stage", type=int, choices=(1, 2, 3))
    p.add_argument("--model", help="model folder or Hub id, or new:<config.json or folder> for fresh weights")
    p.add_argument("--processor", help="processor or tokenizer folder / Hub id (default: the model's)")
    p.add_argument(
        "--data",
        action="append",
        help="KIND=SPEC or SPEC; repeat for several sources. KIND: detection (boxes named by their category only), "
        "grounding (phrases), captioned (phrase + category, captioner targets)",
    )
    p.add_argument("--concepts", help="concept dictionary (.txt or .json) for negative concepts")
    p.add_argument("--output", help="run folder: final model, checkpoints/, logs/")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--batch-size", type=int, help="images per device per micro-batch")
    p.add_argument("--gradient-accumulation-steps", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--adam-beta1", type=float)
    p.add_argument("--adam-beta2", type=float)
    p.add_argument("--adam-epsilon", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping; 0 disables")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"))
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-shuffle", dest="shuffle", action="store_false", default=None)
    p.add_argument("--shuffle-buffer-size", type=int)
    p.add_argument("--no-streaming", dest="streaming", action="store_false", default=None)
    p.add_argument("--save-steps", type=int, help="checkpoint every N optimizer steps (0: final model only)")
    p.add_argument("--save-total-limit", type=int)
    p.add_argument("--logging-steps", type=int)
    p.add_argument(
        "--resume", nargs="?", const="latest", help="'latest' (default when given) or a checkpoint"
    )
    p.add_argument("--report-to", choices=("auto", "tensorboard", "jsonl", "none"))
    p.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters (peft)")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-alpha", type=int)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-target-modules", nargs="+")
    stage = p.add_argument_group("stage overrides (StageSpec fields)")
    stage.add_argument("--short-sides", type=_int_list, help="training short sides, e.g. 480,512,544")
    stage.add_argument("--max-size", type=int, help="cap of the long side")
    stage.add_argument("--no-random-crop", dest="random_crop", action="store_false", default=None)
    stage.add_argument("--vocabulary-free-ratio", type=float)
    stage.add_argument("--backbone-lr-multiplier", type=float)
    stage.add_argument("--concept-lr-multiplier", type=float, help="text encoder + concept projection")
    stage.add_argument("--max-concepts", type=int, help="concepts per image for every data kind")
    stage.add_argument("--stage-overrides", type=json.loads, help="JSON object of further StageSpec fields")
    return parser


def _stage_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    overrides: dict[str, Any] = dict(args.stage_overrides or {})
    for name in ("short_sides", "max_size", "random_crop", "vocabulary_free_ratio"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    multipliers = {
        group: value
        for group, value in (
            ("backbone", args.backbone_lr_multiplier),
            ("concept", args.concept_lr_multiplier),
        )
        if value is not None
    }
    if multipliers:
        overrides["learning_rate_multipliers"] = multipliers
    if args.max_concepts is not None:
        overrides["max_concepts"] = dict.fromkeys(("detection", "grounding", "captioned"), args.max_concepts)
    return overrides or None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merges ``--config`` and the flags into a validated :class:`TrainConfig`."""
    file_values = load_config_file(args.config) if args.config else None
    # Every TrainConfig field has a flag of the same name (a test keeps it so); stage overrides are gathered apart.
    names = [field.name for field in dataclasses.fields(TrainConfig) if field.name != "stage_overrides"]
    values = {name: getattr(args, name) for name in names}
    values["stage_overrides"] = _stage_overrides(args)
    return build_train_config(file_values, **values)


def run_train(args: argparse.Namespace) -> TrainResult:
    """Runs ``detclipv3 train`` for parsed ``args`` (from a parser set up by :func:`add_train_arguments`)."""
    return train(config_from_args(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m detclipv3_hf.training.cli`` (and ``accelerate launch -m ...``)."""
    parser = add_train_arguments(
        argparse.ArgumentParser(
            prog="detclipv3 train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_train(args)
    except (ValueError, TypeError) as error:
        print(f"detclipv3 train: error: {error}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:  # one summary line per run, not per process
        return 0
    print(
        json.dumps(
            {
                "output": str(result.output_dir),
                "global_step": result.global_step,
                "last_loss": result.last_loss,
                "data": result.skip_summary,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
