"""The one training loop of all three stages, on Accelerate (after detectron2's ``SimpleTrainer`` + hooks and
Accelerate's examples; the stage-specific parts live in :class:`~detclipv3_hf.training.stages.StageSpec`).

What a step does: for each of ``gradient_accumulation_steps`` micro-batches, draw the data kind and the
vocabulary-free decision from an RNG shared by all ranks, read this rank's records, collate them (augmentation and
concept sampling from a per-rank RNG), forward, sum the stage's loss terms, backward (gradient sync only on the last
micro-batch); then clip, AdamW step, cosine schedule step.

Determinism and resumption: every Python random draw of micro-batch ``i`` comes from ``Random(f"{seed}-...-{i}")``,
so it does not depend on history; torch's RNG (denoising noise, dropout), the model, optimizer and scheduler are in
``accelerator.save_state``; the data position of every source on every rank is written next to it. A checkpoint is
written into a temporary folder and renamed when complete, so a run killed at any moment resumes from the last
complete checkpoint and repeats at most the steps after it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, send_to_device, set_seed
from accelerate.utils.imports import is_tensorboard_available
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .. import modeling_detclipv3
from ..configuration_detclipv3 import DetClipV3Config
from ..data import ConceptDictionary
from ..image_processing_detclipv3 import DetClipV3ImageProcessor
from ..loss_detclipv3 import build_loss_weights
from ..processing_detclipv3 import DetClipV3Processor
from .collate import DetClipV3TrainingCollator, model_inputs
from .config import NEW_MODEL_PREFIX, TrainConfig
from .sources import MixedRecordSource
from .stages import StageSpec, get_stage, loss_base_term

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TRAINER_STATE_FILE = "trainer_state.json"
DATA_STATE_FILE = "data_state_rank{rank}.json"
PEFT_PREFIX = "base_model.model."
FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # devices whose AdamW steps use torch's fused kernel
MAIN_TERMS = (
    "loss_alignment",
    "loss_bbox",
    "loss_giou",
    "loss_objectness",
    "loss_caption",
    "loss_image_caption",
)


# ------------------------------------------------------------------------------------------------------ logging


class JsonlTracker(GeneralTracker):
    """An Accelerate tracker writing one JSON object per ``log`` call to ``<logging_dir>/<run_name>/metrics.jsonl``
    (used when tensorboard is not installed); the run config goes to ``config.json`` next to it."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike) -> None:
        super().__init__()
        self.run_dir = Path(logging_dir) / run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        (self.run_dir / "config.json").write_text(json.dumps(values, indent=2, default=str), encoding="utf-8")

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}, default=float) + "\n")


def _trackers(report_to: str, logging_dir: Path, run_name: str) -> list[Any]:
    if report_to == "none":
        return []
    if report_to == "tensorboard" or (report_to == "auto" and is_tensorboard_available()):
        return ["tensorboard"]
    return [JsonlTracker(run_name, logging_dir)]


# ------------------------------------------------------------------------------------------ model and processor


def model_class_for(spec: StageSpec) -> type:
    """``DetClipV3ForObjectDetection`` for detection stages, ``DetClipV3ForObjectCaptioning`` for captioning."""
    if spec.model_kind == "detection":
        return modeling_detclipv3.DetClipV3ForObjectDetection
    return modeling_detclipv3.DetClipV3ForObjectCaptioning


def load_processor(path: str, spec: StageSpec, max_concept_tokens: int | None = None) -> DetClipV3Processor:
    """A processor from a processor folder / Hub id, or built around a tokenizer folder (fresh runs).

    A built processor resizes inference images like training does (short side ``max(spec.short_sides)``, long
    side ``spec.max_size``).
    """
    try:
        return DetClipV3Processor.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as processor_error:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as tokenizer_error:
            raise ValueError(
                f"{path!r} holds neither a DetClipV3Processor ({processor_error}) nor a tokenizer ({tokenizer_error})"
            ) from tokenizer_error
    image_processor = DetClipV3ImageProcessor(
        size={"shortest_edge": max(spec.short_sides), "longest_edge": spec.max_size}
    )
    return DetClipV3Processor(image_processor, tokenizer, max_concept_tokens=max_concept_tokens or 16)


def _new_config(path: str) -> DetClipV3Config:
    if os.path.isdir(path):
        return DetClipV3Config.from_pretrained(path)
    if not os.path.isfile(path):
        raise ValueError(f"new model config {path!r} is neither a config.json file nor a folder holding one")
    return DetClipV3Config.from_json_file(path)


def _fill_token_ids(model_config: DetClipV3Config, processor: DetClipV3Processor, fresh: bool) -> None:
    """Gives the config the tokenizer's vocabulary size (which includes ``[OBJ]`` / ``[IMG]``, added by the
    processor) and the captioner's token ids. A fresh config is sized to the tokenizer; a trained one only gets
    the ids it lacks (a stage-1 folder has no task-token ids yet)."""
    vocab = len(processor.tokenizer)
    captioner = model_config.captioner_config
    tokenizer = processor.tokenizer
    if fresh:
        # The tokenizer defines a fresh model's vocabulary and special ids: the CLIP text tower pools at the end
        # token, so an `eos_token_id` the tokenizer does not use would pool every concept at the same position.
        text = model_config.text_config
        text.vocab_size = vocab
        text.bos_token_id, text.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        text.pad_token_id = tokenizer.pad_token_id
    for key, value in processor.captioner_token_ids().items():
        if not hasattr(captioner, key):
            continue
        if fresh or getattr(captioner, key) is None:
            setattr(captioner, key, value)
    for name, sub in (("text_config", model_config.text_config), ("captioner_config", captioner)):
        if sub.vocab_size is not None and sub.vocab_size < vocab:
            raise ValueError(
                f"the tokenizer has {vocab} tokens but the model's {name}.vocab_size is {sub.vocab_size}; "
                "use the processor the model was trained with"
            )


def build_model_and_processor(
    config: TrainConfig, spec: StageSpec
) -> tuple[torch.nn.Module, DetClipV3Processor]:
    """Loads (or, with ``new:``, initialises) the stage's model class and the processor.

    Raises:
        ValueError: when the tokenizer has more tokens than the model's text or captioner vocabulary.
    """
    cls = model_class_for(spec)
    fresh = config.model.startswith(NEW_MODEL_PREFIX)
    if fresh:
        model_config = _new_config(config.model[len(NEW_MODEL_PREFIX) :])
    else:
        model_config = DetClipV3Config.from_pretrained(config.model)
    processor = load_processor(config.processor or config.model, spec, model_config.max_concept_tokens)
    _fill_token_ids(model_config, processor, fresh)
    model = cls(model_config) if fresh else cls.from_pretrained(config.model, config=model_config)
    return model, processor


def relative_name(name: str) -> str:
    """Parameter name relative to the DetCLIPv3 model (strips the PEFT wrapper prefix)."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def apply_stage_trainability(model: torch.nn.Module, spec: StageSpec, lora: bool = False) -> list[str]:
    """Sets ``requires_grad`` from the stage: full training follows ``spec.is_trainable``; with LoRA only the
    adapter weights of modules the stage trains learn (``peft`` already froze the rest).

    Returns:
        Names of the trainable parameters.

    Raises:
        ValueError: when nothing would train.
    """
    trainable = []
    for name, param in model.named_parameters():
        rel = relative_name(name)
        wanted = spec.is_trainable(rel) and (not lora or "lora_" in rel)
        param.requires_grad_(wanted)
        if wanted:
            trainable.append(name)
    if not trainable:
        raise ValueError(
            f"stage {spec.stage} trains no parameter of this model (trainable prefixes {spec.trainable_prefixes}, "
            f"frozen {spec.frozen_prefixes}{', LoRA adapters only' if lora else ''})"
        )
    base = getattr(model, "get_base_model", lambda: model)()
    if hasattr(base.config, "train_detector") and spec.model_kind == "captioning":
        # The captioning model skips the detector's backward when it does not train (stage 2).
        base.config.train_detector = any(relative_name(n).startswith("model.") for n in trainable)
        base.config.train_captioner = any(relative_name(n).startswith("captioner.") for n in trainable)
    return trainable


def set_train_mode(model: torch.nn.Module, spec: StageSpec) -> None:
    """``model.train()``, except that every module under one of the stage's frozen prefixes stays in eval mode (a
    frozen detector must not update BatchNorm running statistics, drop paths or build denoising queries), and so
    does every BatchNorm whose weights are frozen (e.g. with LoRA: statistics are not part of an adapter)."""
    model.train()
    for name, module in model.named_modules():
        if spec.frozen_prefixes and relative_name(name + ".").startswith(spec.frozen_prefixes):
            module.eval()
        elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.eval()


def build_param_groups(
    model: torch.nn.Module, spec: StageSpec, learning_rate: float, weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups: (backbone | concept | rest) x (decay | no decay); biases, norms and other 1-D
    parameters get no weight decay. Each group records its ``name`` and ``lr = learning_rate * multiplier``."""
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[(spec.lr_group(relative_name(name)), param.ndim > 1)].append(param)
    return [
        {
            "name": f"{group}{'' if decay else '_no_decay'}",
            "params": params,
            "lr": learning_rate * spec.lr_multiplier(group),
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (group, decay), params in sorted(groups.items())
    ]


def stage_loss(
    loss_dict: dict[str, torch.Tensor], spec: StageSpec, weights: dict[str, float]
) -> torch.Tensor:
    """Weighted sum of the ``loss_dict`` terms whose base term is in ``spec.losses``.

    Raises:
        ValueError: when the model returned none of the stage's terms or a term without a weight.
    """
    total = None
    for name, value in loss_dict.items():
        if loss_base_term(name) not in spec.losses:
            continue
        if name not in weights:
            raise ValueError(f"loss term {name!r} has no weight in the model config")
        term = weights[name] * value
        total = term if total is None else total + term
    if total is None:
        raise ValueError(
            f"the model returned none of the stage's loss terms {spec.losses}: {sorted(loss_dict)}"
        )
    return total


# ------------------------------------------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and (path / TRAINER_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str) -> Path | None:
    """``None`` -> no resume; ``"latest"`` -> newest complete checkpoint (``None`` when there is none yet, so
    the same command starts and resumes a run); else the given folder, which must be a complete checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / TRAINER_STATE_FILE).is_file():
        raise ValueError(f"{resume!r} is not a complete checkpoint folder (no {TRAINER_STATE_FILE})")
    return path


@dataclass
class TrainerState:
    """Progress of a run (written to every checkpoint)."""

    global_step: int = 0
    micro_step: int = 0
    last_loss: float = math.nan
    last_losses: dict[str, float] | None = None
    last_image_ids: list[str] = field(default_factory=list)  # records of the last step (this rank), for hooks


@dataclass
class TrainResult:
    output_dir: Path
    global_step: int
    last_loss: float
    skip_summary: dict[str, str]


# ------------------------------------------------------------------------------------------------------ trainer


class DetClipV3Trainer:
    """Trains one stage. ``train()`` runs to ``config.max_steps`` and writes the final model.

    Args:
        config: the run (see :class:`~detclipv3_hf.training.config.TrainConfig`).
        spec: the stage; default ``get_stage(config.stage, config.stage_overrides)``.
        callbacks: called as ``callback(trainer)`` after every optimizer step (and after a checkpoint that step
            wrote); hooks for tests and custom logic. An exception from a callback stops the run like a crash.
    """

    def __init__(
        self,
        config: TrainConfig,
        spec: StageSpec | None = None,
        callbacks: Sequence[Callable[[DetClipV3Trainer], None]] = (),
    ) -> None:
        config.validate()
        self.config = config
        self.spec = spec or get_stage(config.stage, config.stage_overrides)
        self.callbacks = list(callbacks)
        self.output_dir = Path(config.output)
        self.state = TrainerState()
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=_trackers(config.report_to, self.output_dir / "logs", f"stage{self.spec.stage}"),
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            # Frozen parts, vocabulary-free batches and images without caption targets leave parameters unused.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        set_seed(config.seed)
        self.model, self.processor = build_model_and_processor(config, self.spec)
        if config.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # the transformers >= 5.x spelling
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if config.lora:
            self.model = self._wrap_lora(self.model)
        self.trainable_names = apply_stage_trainability(self.model, self.spec, lora=config.lora)
        self.loss_weights = build_loss_weights(self._base_model().config)

    # ------------------------------------------------------------------ setup

    def _wrap_lora(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=list(self.config.lora_target_modules),
        )
        return get_peft_model(model, lora_config)

    def _base_model(self) -> torch.nn.Module:
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def _collator(self) -> DetClipV3TrainingCollator:
        captioner = getattr(self._base_model().config, "captioner_config", None)
        dictionary = ConceptDictionary.from_file(self.config.concepts) if self.config.concepts else None
        return DetClipV3TrainingCollator(
            self.processor,
            self.spec,
            concept_dictionary=dictionary,
            caption_max_length=getattr(captioner, "max_label_length", None) or 32,
            image_caption_max_length=getattr(captioner, "max_caption_length", None) or 64,
        )

    def _rng(self, what: str, micro_step: int, per_rank: bool) -> random.Random:
        rank = self.accelerator.process_index if per_rank else "all"
        return random.Random(f"{self.config.seed}-{what}-{rank}-{micro_step}")

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, data: MixedRecordSource) -> Path:
        """Writes ``checkpoints/step-N`` (model, optimizer, scheduler, RNG, data positions, trainer state)."""
        acc = self.accelerator
        root = self.output_dir / CHECKPOINT_DIR
        final = root / f"{CHECKPOINT_PREFIX}{self.state.global_step:08d}"
        tmp = root / f".tmp-{CHECKPOINT_PREFIX}{self.state.global_step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        rank_file = tmp / DATA_STATE_FILE.format(rank=acc.process_index)
        rank_file.write_text(json.dumps(data.state_dict()), encoding="utf-8")
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "global_step": self.state.global_step,
                "micro_step": self.state.micro_step,
                "world_size": acc.num_processes,
                "stage": self.spec.stage,
            }
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in list_checkpoints(self.output_dir)[: -self.config.save_total_limit or None]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        logger.info("saved checkpoint %s", final)
        return final

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        acc = self.accelerator
        state = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        if state["world_size"] != acc.num_processes:
            raise ValueError(
                f"checkpoint {path} was written by {state['world_size']} processes but this run has "
                f"{acc.num_processes}: data positions are per rank, resume with the same number of processes"
            )
        acc.load_state(str(path))
        self.state.global_step, self.state.micro_step = state["global_step"], state["micro_step"]
        data_file = path / DATA_STATE_FILE.format(rank=acc.process_index)
        return json.loads(data_file.read_text(encoding="utf-8"))

    # ------------------------------------------------------------------ the loop

    def _micro_batch(self, data: MixedRecordSource, collator: DetClipV3TrainingCollator) -> dict[str, Any]:
        micro = self.state.micro_step
        plan = self._rng("plan", micro, per_rank=False)  # same kind and mode on every rank
        source_index = data.choose(plan)
        vocabulary_free = plan.random() < self.spec.vocabulary_free_ratio
        kind, records = data.next_batch(source_index, self.config.batch_size)
        batch = collator(records, self._rng("sample", micro, per_rank=True), kind, vocabulary_free)
        self.state.micro_step += 1
        self.state.last_image_ids.extend(batch["image_ids"])
        return send_to_device(model_inputs(batch), self.accelerator.device)

    def _forward_backward(self, inputs: dict[str, Any], trainable: list[torch.nn.Parameter]) -> dict:
        """One micro-batch inside ``accelerator.accumulate``: gradient sync (DDP / FSDP / DeepSpeed) happens only
        on the last micro-batch of an optimizer step, and ``accelerator.backward`` divides the loss by the number
        of accumulation steps."""
        acc = self.accelerator
        with acc.autocast():
            outputs = self.model(**inputs)
        loss = stage_loss(outputs.loss_dict, self.spec, self.loss_weights)
        if not loss.requires_grad:
            # e.g. a stage-2 batch without any caption target: a zero loss that still touches every trainable
            # parameter keeps all ranks in the same collective calls.
            loss = loss + sum(p.sum() for p in trainable) * 0.0
        acc.backward(loss)
        names = [k for k in outputs.loss_dict if k in MAIN_TERMS]
        values = torch.stack([outputs.loss_dict[k].detach().float() for k in names] + [loss.detach().float()])
        return dict(zip([*names, "loss"], values.tolist()))  # one device-to-host copy per micro-batch

    def train(self) -> TrainResult:
        """Runs (or resumes) the stage to ``max_steps`` and saves the final model; returns where and how it ended."""
        cfg, acc = self.config, self.accelerator
        optimizer = torch.optim.AdamW(
            build_param_groups(self.model, self.spec, cfg.learning_rate, cfg.weight_decay),
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            # torch's fused AdamW kernel: one call for all tensors instead of a Python loop over them (5.9 -> 1.2 ms
            # per step for the learnability benchmark's 0.8 M-parameter model on a 2-core CPU). Other devices keep
            # torch's default implementation.
            fused=acc.device.type in FUSED_ADAMW_DEVICES or None,
        )
        scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
        self.model, optimizer = acc.prepare(self.model, optimizer)
        # The scheduler is stepped once per optimizer step by us (a prepared one steps once per process) and
        # registered so that save_state / load_state carry it.
        acc.register_for_checkpointing(scheduler)
        trainable = [p for p in self.model.parameters() if p.requires_grad]

        resume_from = resolve_resume(cfg.resume, cfg.output)
        data_state = self._load_checkpoint(resume_from) if resume_from is not None else None
        if resume_from is not None:
            logger.info("resumed from %s at step %d", resume_from, self.state.global_step)
        data = MixedRecordSource(
            cfg.data_sources(self.spec.data_mix[0][0]),
            self.spec.data_mix,
            rank=acc.process_index,
            world_size=acc.num_processes,
            seed=cfg.seed if cfg.shuffle else None,
            streaming=cfg.streaming,
            shuffle_buffer_size=cfg.shuffle_buffer_size,
            state=data_state,
        )
        collator = self._collator()
        acc.init_trackers(
            f"detclipv3-stage{self.spec.stage}",
            config={
                k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
                for k, v in self._run_info().items()
            },
        )
        set_train_mode(acc.unwrap_model(self.model), self.spec)
        progress = tqdm(
            total=cfg.max_steps,
            initial=self.state.global_step,
            # Only other ranks force the bar off; on the main process tqdm's own default applies, so
            # ``TQDM_DISABLE=1`` in the environment silences it (as it does every other bar).
            **({} if acc.is_local_main_process else {"disable": True}),
            desc=f"stage {self.spec.stage}",
        )
        window: dict[str, list[float]] = defaultdict(list)
        while self.state.global_step < cfg.max_steps:
            self.state.last_image_ids = []
            for _ in range(cfg.gradient_accumulation_steps):
                inputs = self._micro_batch(data, collator)
                with acc.accumulate(self.model):
                    terms = self._forward_backward(inputs, trainable)
                for key, value in terms.items():
                    window[key].append(value)
            if not acc.sync_gradients:
                raise RuntimeError("gradient accumulation fell out of step with the optimizer steps")
            grad_norm = acc.clip_grad_norm_(trainable, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            optimizer.step()
            if not acc.optimizer_step_was_skipped:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            self.state.global_step += 1
            self.state.last_losses = {k: v[-1] for k, v in window.items()}
            self.state.last_loss = self.state.last_losses["loss"]
            progress.update(1)
            progress.set_postfix(
                {k.removeprefix("loss_"): f"{v:.3f}" for k, v in self.state.last_losses.items()}
            )
            if cfg.logging_steps and self.state.global_step % cfg.logging_steps == 0:
                self._log(window, optimizer, grad_norm, data)
                window.clear()
            if (
                cfg.save_steps
                and self.state.global_step % cfg.save_steps == 0
                and self.state.global_step < cfg.max_steps
            ):
                self.save_checkpoint(data)
            for callback in self.callbacks:
                callback(self)
        progress.close()
        self.save_final()
        acc.end_training()
        stats = {name: s.summary() for name, s in data.stats().items()}
        for name, summary in stats.items():
            logger.info("data %s: %s", name, summary)
        return TrainResult(self.output_dir, self.state.global_step, self.state.last_loss, stats)

    def _log(
        self, window: dict[str, list[float]], optimizer: Any, grad_norm: Any, data: MixedRecordSource
    ) -> None:
        acc = self.accelerator
        keys = sorted(window)
        means = torch.tensor([sum(window[k]) / len(window[k]) for k in keys], device=acc.device)
        means = acc.reduce(means, reduction="mean")  # every rank reaches this point at the same step
        values: dict[str, float] = dict(zip(keys, means.tolist()))
        for group in optimizer.param_groups:
            values[f"lr/{group['name']}"] = group["lr"]
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        for name, stats in data.stats().items():
            values[f"data/{name}/skipped"] = stats.skipped
        acc.log(values, step=self.state.global_step)

    def _run_info(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "stage_spec": self.spec.to_dict()}

    # ------------------------------------------------------------------ final model

    def save_final(self) -> Path:
        """Writes the final model to ``output``: a complete ``save_pretrained`` folder (model, config, generation
        config when the model has one, processor, ``training_run.json``). With LoRA the folder holds the adapter
        (``PeftModel.from_pretrained(base, output)``) and ``output/merged`` the merged full model."""
        acc = self.accelerator
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.model)
        # Gathers FSDP / DeepSpeed shards, so every rank calls it.
        state_dict = acc.get_state_dict(self.model)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.config.lora:
                model.save_pretrained(self.output_dir)  # the adapter only (PeftModel)
            else:
                model.save_pretrained(self.output_dir, state_dict=state_dict)
            self.processor.save_pretrained(self.output_dir)
            if self.config.lora:
                merged_dir = self.output_dir / "merged"
                # merge_and_unload works in place: merge a copy so the trainer's model keeps its adapters.
                copy.deepcopy(model).merge_and_unload().save_pretrained(merged_dir)
                self.processor.save_pretrained(merged_dir)
            info = {**self._run_info(), "global_step": self.state.global_step}
            (self.output_dir / "training_run.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        acc.wait_for_everyone()
        return self.output_dir


def train(config: TrainConfig, callbacks: Sequence[Callable[[DetClipV3Trainer], None]] = ()) -> TrainResult:
    """Builds a :class:`DetClipV3Trainer` for ``config`` and runs it."""
    return DetClipV3Trainer(config, callbacks=callbacks).train()
