"""The run configuration of ``detclipv3 train``: one dataclass, loadable from YAML / JSON, overridable by the CLI.

Precedence: dataclass defaults < the ``--config`` file < flags given on the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .stages import DATA_KINDS

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
NEW_MODEL_PREFIX = "new:"


@dataclass
class DataSourceConfig:
    """One data source of a run.

    Attributes:
        kind: ``"detection"``, ``"grounding"`` or ``"captioned"`` (selects the stage's data-mix ratio and
            concept budget).
        spec: what :func:`detclipv3_hf.data.load_records` reads: a path / glob / Hub id, or a dict with ``path``
            plus reader options (``format``, ``image_root``, ``split``, ...).
    """

    kind: str
    spec: str | dict[str, Any]

    def __post_init__(self) -> None:
        if self.kind not in DATA_KINDS:
            raise ValueError(f"data kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if not isinstance(self.spec, (str, dict)) or not self.spec:
            raise TypeError(f"data spec must be a non-empty path string or dict, got {self.spec!r}")


@dataclass
class TrainConfig:
    """Everything a training run needs.

    Attributes:
        stage: 1, 2 or 3 (see ``stages.py``).
        model: a ``save_pretrained`` folder or Hub id, or ``new:<config.json or folder with config.json>`` to start
            from freshly initialised weights (stage 1 usually); see :data:`NEW_MODEL_PREFIX`.
        output: run folder: the final ``save_pretrained`` model, ``checkpoints/``, ``logs/``.
        data: the data sources. ``"kind=spec"`` strings, bare ``"spec"`` strings (given the stage's first data kind)
            or :class:`DataSourceConfig` / dicts ``{"kind": ..., "spec": ...}``.
        processor: processor folder or Hub id; a folder holding only a tokenizer also works (a processor is built
            around it). Defaults to ``model`` (required with ``new:``).
        concepts: concept dictionary file for negative sampling (``.txt`` one per line or ``.json``); without it,
            negatives are the other images' positives of the same batch.
        max_steps: optimizer steps to run.
        batch_size: images per device per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        learning_rate / weight_decay / adam_beta1 / adam_beta2 / adam_epsilon: AdamW (LR multipliers per parameter
            group come from the stage).
        warmup_steps: linear warm-up steps of the cosine schedule.
        max_grad_norm: gradient clipping (``0`` disables it).
        mixed_precision: ``"no"``, ``"fp16"`` or ``"bf16"`` (Accelerate autocast + scaler).
        gradient_checkpointing: recompute encoder/decoder layers in the backward pass.
        seed: seeds model init, sampling, augmentation and data shuffling.
        shuffle: shuffle every source (shards plus a buffer of ``shuffle_buffer_size`` records), reseeded per epoch.
        streaming: stream the sources (default) instead of building cached ``datasets``.
        save_steps: checkpoint every this many optimizer steps (``0``: only the final model).
        save_total_limit: checkpoints kept (oldest deleted first).
        logging_steps: log averaged loss terms every this many steps.
        resume: ``None``, ``"latest"`` (newest checkpoint under ``output/checkpoints``) or a checkpoint folder.
        report_to: ``"auto"`` (tensorboard if installed, else JSONL), ``"tensorboard"``, ``"jsonl"`` or ``"none"``.
        lora: train LoRA adapters (``peft``) instead of the full weights.
        lora_rank / lora_alpha / lora_dropout / lora_target_modules: the ``peft.LoraConfig``.
        stage_overrides: ``StageSpec`` fields to replace (``short_sides``, ``max_size``, ``vocabulary_free_ratio``,
            ``learning_rate_multipliers`` ...).
    """

    stage: int = 1
    model: str = ""
    output: str = ""
    data: list[Any] = field(default_factory=list)
    processor: str | None = None
    concepts: str | None = None
    max_steps: int = 1000
    batch_size: int = 2
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 0.1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 42
    shuffle: bool = True
    shuffle_buffer_size: int = 1000
    streaming: bool = True
    save_steps: int = 500
    save_total_limit: int = 3
    logging_steps: int = 10
    resume: str | None = None
    report_to: Literal["auto", "tensorboard", "jsonl", "none"] = "auto"
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    stage_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first field that cannot work."""
        if self.stage not in (1, 2, 3):
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage!r}")
        if not self.model:
            raise ValueError("model is required (a folder, a Hub id or new:<config.json>)")
        if self.model.startswith(NEW_MODEL_PREFIX) and not self.processor:
            raise ValueError(
                "a new model needs a processor: give --processor (a processor or tokenizer folder)"
            )
        if not self.output:
            raise ValueError("output is required")
        if not self.data:
            raise ValueError("at least one data source is required (--data)")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "save_steps", "logging_steps", "save_total_limit"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError("learning_rate must be > 0, weight_decay and max_grad_norm >= 0")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.report_to not in ("auto", "tensorboard", "jsonl", "none"):
            raise ValueError(f"report_to must be auto, tensorboard, jsonl or none, got {self.report_to!r}")
        if self.lora and (self.lora_rank < 1 or self.lora_alpha <= 0 or not self.lora_target_modules):
            raise ValueError("lora needs lora_rank >= 1, lora_alpha > 0 and at least one target module")

    def data_sources(self, default_kind: str) -> list[DataSourceConfig]:
        """Parses :attr:`data` into :class:`DataSourceConfig` objects; bare specs get ``default_kind``."""
        sources = []
        for item in self.data:
            if isinstance(item, DataSourceConfig):
                sources.append(item)
            elif isinstance(item, Mapping) and "kind" in item and "spec" in item:
                sources.append(DataSourceConfig(kind=item["kind"], spec=item["spec"]))
            elif isinstance(item, Mapping) and "path" in item:
                sources.append(DataSourceConfig(kind=default_kind, spec=dict(item)))
            elif isinstance(item, str):
                kind, sep, spec = item.partition("=")
                if sep and kind in DATA_KINDS:
                    sources.append(DataSourceConfig(kind=kind, spec=spec))
                else:
                    sources.append(DataSourceConfig(kind=default_kind, spec=item))
            else:
                raise TypeError(
                    f"a data entry must be 'kind=spec', 'spec', {{'kind', 'spec'}} or a reader dict with 'path', "
                    f"got {item!r}"
                )
        return sources

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["data"] = [dataclasses.asdict(d) if isinstance(d, DataSourceConfig) else d for d in self.data]
        return out


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML (``.yaml`` / ``.yml``) or JSON run config into a dict of :class:`TrainConfig` fields.

    Raises:
        ValueError: when the file is not a mapping or names fields :class:`TrainConfig` does not have.
    """
    path = os.fspath(path)
    with open(path, encoding="utf-8") as handle:
        if path.lower().endswith((".yaml", ".yml")):
            import yaml

            payload = yaml.safe_load(handle)
        else:
            payload = json.load(handle)
    if not isinstance(payload, dict):
        raise ValueError(
            f"{path}: a run config must be a mapping of TrainConfig fields, got {type(payload).__name__}"
        )
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(payload) - known
    if unknown:
        raise ValueError(f"{path}: unknown config fields {sorted(unknown)}; known fields: {sorted(known)}")
    return payload


def build_train_config(file_values: Mapping[str, Any] | None = None, **cli_values: Any) -> TrainConfig:
    """Merges defaults < ``file_values`` < ``cli_values`` (``None`` CLI values mean "not given") and validates.

    ``stage_overrides`` dicts are merged key by key rather than replaced.
    """
    values: dict[str, Any] = dict(file_values or {})
    for key, value in cli_values.items():
        if value is None:
            continue
        if key == "stage_overrides":
            values["stage_overrides"] = {**values.get("stage_overrides", {}), **value}
        else:
            values[key] = value
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown TrainConfig fields {sorted(unknown)}")
    config = TrainConfig(**values)
    config.validate()
    return config
