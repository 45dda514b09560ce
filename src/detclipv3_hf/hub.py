"""Model cards and publishing of DetCLIPv3 checkpoint folders on the Hugging Face Hub.

- `build_model_card` / `write_model_card`: a `huggingface_hub.ModelCard` for any `save_pretrained` folder, with
  metadata (`library_name`, `pipeline_tag`, tags, license, base models, datasets, a `model-index` built from the
  results JSON of `detclipv3_hf.evaluation.save_results`) and sections on what the model is, how it was trained, how
  to use it and its limits.
- `check_checkpoint_folder`: lists what a folder lacks to be a complete, loadable-anywhere checkpoint.
- `push_checkpoint`: refuses an incomplete folder before any network call, then `create_repo` + `upload_folder`.
- `add_card_arguments` / `run_card`, `add_push_arguments` / `run_push`: the `detclipv3 card` and `detclipv3 push`
  sub-commands.

Decision: `library_name` is `transformers` (the checkpoint loads through the transformers Auto classes with
`trust_remote_code=True`, so the Hub shows the right snippet); `detclipv3-hf` and `custom_code` are tags.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

__all__ = [
    "CARD_FILENAME",
    "PIPELINE_TAG",
    "TRAINING_INFO_FILENAME",
    "CheckpointIncompleteError",
    "add_card_arguments",
    "add_push_arguments",
    "build_model_card",
    "check_checkpoint_folder",
    "eval_results_from_records",
    "push_checkpoint",
    "run_card",
    "run_push",
    "validate_model_card",
    "write_model_card",
]

CARD_FILENAME = "README.md"
TRAINING_INFO_FILENAME = "training_info.json"
PIPELINE_TAG = "zero-shot-object-detection"
LIBRARY_NAME = "transformers"
BASE_TAGS = ["detclipv3", "detclipv3-hf", "zero-shot-object-detection", "open-vocabulary-detection", "custom_code"]
CAPTIONING_TAGS = ["object-captioning", "image-captioning"]

# Metric names of the results JSON -> (Hub metric type, pretty name). Values are reported in percent.
_METRIC_NAMES = {
    "AP": ("mAP", "box AP"),
    "AP50": ("mAP@0.5", "box AP50"),
    "AP75": ("mAP@0.75", "box AP75"),
    "APs": ("mAP_small", "box AP (small)"),
    "APm": ("mAP_medium", "box AP (medium)"),
    "APl": ("mAP_large", "box AP (large)"),
    "APr": ("mAP_rare", "fixed AP (rare)"),
    "APc": ("mAP_common", "fixed AP (common)"),
    "APf": ("mAP_frequent", "fixed AP (frequent)"),
}


class CheckpointIncompleteError(ValueError):
    """A folder lacks files a published checkpoint needs; `problems` lists each one."""

    def __init__(self, folder: str | os.PathLike, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(
            f"{folder} is not a complete DetCLIPv3 checkpoint:\n  - " + "\n  - ".join(self.problems)
        )


# ----------------------------------------------------------------------------------------------------------------------
# Reading a folder
# ----------------------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def _folder(folder: str | os.PathLike) -> Path:
    if not isinstance(folder, str | os.PathLike):
        raise TypeError(f"folder must be a path, got {type(folder).__name__}")
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder")
    return path


def _auto_map_modules(auto_map: Mapping[str, Any]) -> set[str]:
    """Module names (`modeling_detclipv3`) referenced by an `auto_map` (values may be str, list or dict)."""
    modules = set()
    stack: list[Any] = list(auto_map.values())
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            reference = value.split("--")[-1]  # "repo--module.Class" points into another repo
            modules.add(reference.rsplit(".", 1)[0])
        elif isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(v for v in value if v is not None)
    return modules


def _relative_imports(source: str) -> set[str]:
    """Sibling modules a remote-code file imports with `from .x import ...`."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def check_checkpoint_folder(folder: str | os.PathLike, require_card: bool = True) -> list[str]:
    """Lists what `folder` lacks to be a complete checkpoint; an empty list means complete.

    A complete folder has: `config.json` of model type `detclipv3` with an `auto_map` naming `AutoConfig` and
    `AutoModelForZeroShotObjectDetection`; the weights (`model.safetensors`, or an index and all its shards); the
    processor config with an `AutoProcessor` entry; the tokenizer (`tokenizer_config.json` plus `tokenizer.json` or
    `vocab.json` + `merges.txt`); every remote-code `.py` file referenced by an `auto_map` and every sibling module
    they import; and (when `require_card`) a `README.md` model card that passes `validate_model_card`.
    """
    path = _folder(folder)
    problems: list[str] = []
    modules: set[str] = set()

    config_path = path / "config.json"
    if not config_path.is_file():
        problems.append("config.json is missing")
    else:
        try:
            config = _read_json(config_path)
        except ValueError as error:
            problems.append(str(error))
            config = {}
        if config and config.get("model_type") != "detclipv3":
            problems.append(f"config.json has model_type {config.get('model_type')!r}, expected 'detclipv3'")
        auto_map = config.get("auto_map") or {}
        for key in ("AutoConfig", "AutoModelForZeroShotObjectDetection"):
            if key not in auto_map:
                problems.append(f"config.json auto_map lacks {key} (remote code for trust_remote_code=True)")
        modules |= _auto_map_modules(auto_map)

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(_read_json(index).get("weight_map", {}).values())
        problems += [f"weight shard {s} listed in the index is missing" for s in sorted(shards) if not (path / s).is_file()]
    elif not (path / "model.safetensors").is_file():
        problems.append("model.safetensors (or model.safetensors.index.json) is missing")

    processor_files = [p for p in ("processor_config.json", "preprocessor_config.json") if (path / p).is_file()]
    if not processor_files:
        problems.append("processor_config.json / preprocessor_config.json is missing (save the processor)")
    else:
        processor_configs = [_read_json(path / p) for p in processor_files]
        if not any("AutoProcessor" in (c.get("auto_map") or {}) for c in processor_configs):
            problems.append("the processor config has no auto_map AutoProcessor entry (remote code)")
        for processor_config in processor_configs:
            modules |= _auto_map_modules(processor_config.get("auto_map") or {})
            nested = processor_config.get("image_processor")
            if isinstance(nested, dict):
                modules |= _auto_map_modules(nested.get("auto_map") or {})

    if not (path / "tokenizer_config.json").is_file():
        problems.append("tokenizer_config.json is missing (save the processor or tokenizer)")
    if not (path / "tokenizer.json").is_file() and not (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    ):
        problems.append("tokenizer files are missing (tokenizer.json, or vocab.json + merges.txt)")

    problems += _check_remote_code(path, modules)

    if require_card:
        card_path = path / CARD_FILENAME
        if not card_path.is_file():
            problems.append(f"{CARD_FILENAME} (model card) is missing: run `detclipv3 card {path}`")
        else:
            try:
                validate_model_card(card_path)
            except ValueError as error:
                problems.append(f"{CARD_FILENAME} is not a valid model card: {error}")
    return problems


def _check_remote_code(path: Path, modules: set[str]) -> list[str]:
    problems, seen = [], set()
    pending = sorted(modules)
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        file = path / f"{module}.py"
        if not file.is_file():
            problems.append(f"remote-code file {module}.py is missing")
            continue
        try:
            pending += sorted(_relative_imports(file.read_text()) - seen)
        except SyntaxError as error:
            problems.append(f"remote-code file {module}.py does not parse: {error}")
    return problems


# ----------------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------------


def _load_results(record: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    from .evaluation import load_results

    if isinstance(record, Mapping):
        return dict(record)
    if isinstance(record, str | os.PathLike):
        if not Path(record).is_file():
            raise ValueError(f"evaluation results file {record} does not exist")
        return load_results(record)
    raise TypeError(f"an evaluation result must be a dict or a JSON path, got {type(record).__name__}")


def eval_results_from_records(
    records: Iterable[Mapping[str, Any] | str | os.PathLike], task_type: str = PIPELINE_TAG
) -> list[EvalResult]:
    """Turns results records (`detclipv3_hf.evaluation.save_results` schema) into Hub `EvalResult`s.

    Every finite metric becomes one entry; AP-style metrics (fractions in [0, 1]) are reported in percent, as papers
    and the Hub leaderboards do. `null` metrics are skipped.

    Raises:
        ValueError: a record does not follow the schema (missing task / dataset / metrics).
    """
    results = []
    for raw in records:
        record = _load_results(raw)
        for key in ("task", "dataset", "metrics"):
            if key not in record:
                raise ValueError(f"evaluation record lacks {key!r}: {sorted(record)}")
        for name, value in record["metrics"].items():
            if value is None:
                continue
            metric_type, pretty = _METRIC_NAMES.get(name, (name, name))
            percent = name.startswith("AP") and 0.0 <= float(value) <= 1.0
            results.append(
                EvalResult(
                    task_type=task_type,
                    task_name=record["task"],
                    dataset_type=record["dataset"],
                    dataset_name=record["dataset"],
                    metric_type=metric_type,
                    metric_name=pretty,
                    metric_value=round(float(value) * (100.0 if percent else 1.0), 4),
                )
            )
    return results


def _architecture_summary(config: Mapping[str, Any]) -> tuple[str, bool]:
    backbone = config.get("backbone_config") or {}
    text = config.get("text_config") or {}
    architectures = config.get("architectures") or []
    captioning = any("Captioning" in a for a in architectures)
    summary = (
        f"- image backbone: {backbone.get('model_type', 'unknown')} "
        f"(embed {backbone.get('embed_dim', backbone.get('hidden_sizes', '?'))}, "
        f"depths {backbone.get('depths', '?')})\n"
        f"- text encoder: CLIP text tower (width {text.get('hidden_size', '?')}, "
        f"{text.get('num_hidden_layers', '?')} layers), one embedding per concept\n"
        f"- pixel encoder: {config.get('encoder_layers', '?')} deformable layers with "
        f"`{config.get('fusion', '?')}` vision-language fusion; decoder: {config.get('decoder_layers', '?')} layers, "
        f"{config.get('num_queries', '?')} queries, d_model {config.get('d_model', '?')}\n"
        f"- heads: concept alignment, boxes, objectness" + (", object captioner" if captioning else "")
    )
    return summary, captioning


def _training_section(info: Mapping[str, Any] | None) -> str:
    if not info:
        return "No training information was recorded for this checkpoint."
    lines = []
    for key in ("stage", "data", "steps", "batch_size", "learning_rate", "resolution", "notes"):
        if key in info:
            value = info[key]
            if isinstance(value, list | tuple):
                value = ", ".join(str(v) for v in value)
            lines.append(f"- **{key.replace('_', ' ')}**: {value}")
    lines += [f"- **{k.replace('_', ' ')}**: {v}" for k, v in info.items() if k not in {
        "stage", "data", "steps", "batch_size", "learning_rate", "resolution", "notes"}]
    return "\n".join(lines)


def _results_table(eval_results: Sequence[EvalResult]) -> str:
    if not eval_results:
        return "No evaluation results were attached (`detclipv3 card <folder> --eval results.json`)."
    rows = ["| task | dataset | metric | value |", "|---|---|---|---|"]
    rows += [
        f"| {r.task_name} | {r.dataset_name} | {r.metric_name} | {r.metric_value} |" for r in eval_results
    ]
    return "\n".join(rows)


_CARD_TEMPLATE = """\
# {model_name}

{model_name} is a [DetCLIPv3](https://arxiv.org/abs/2404.09216) (Yao et al., CVPR 2024) checkpoint in the
`detclipv3-hf` format: an open-vocabulary object detector{captioner_clause}. Give it any list of concept names and it
returns boxes, scores and the matching concept for each box; every concept is encoded on its own, so there is no
prompt-length limit on the vocabulary.

## Model

{architecture}

## Training

{training}

## Evaluation

{results}

## How to use

The folder carries its own modeling code: load it with `trust_remote_code=True`, or `import detclipv3_hf` first.

### Pipeline

```python
from transformers import pipeline

detector = pipeline("zero-shot-object-detection", model="{repo}", trust_remote_code=True)
detector("image.jpg", candidate_labels=["cat", "red double-decker bus"])
```

### Auto classes

```python
import torch
from PIL import Image
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
model = AutoModelForZeroShotObjectDetection.from_pretrained("{repo}", trust_remote_code=True).eval()
image = Image.open("image.jpg")
inputs = processor(images=image, text=["cat", "red double-decker bus"], return_tensors="pt")
with torch.no_grad():
    outputs = model(**inputs)
results = processor.post_process_grounded_object_detection(
    outputs, threshold=0.3, target_sizes=[image.size[::-1]]
)
```

### Object captioning (vocabulary-free)

```python
from detclipv3_hf import DetClipV3ForObjectCaptioning

captioner = DetClipV3ForObjectCaptioning.from_pretrained("{repo}").eval()
inputs = processor(images=image, return_tensors="pt")
outputs = captioner.generate_object_labels(inputs["pixel_values"], inputs["pixel_mask"], top_k=100)
labels = processor.post_process_object_captioning(outputs, threshold=0.2, target_sizes=[image.size[::-1]])
# each detection: box, score and {{"phrase", "category", "parent_category"}}
```
{captioner_note}
### Fine-tuning with PEFT (LoRA)

```python
from peft import LoraConfig, get_peft_model

lora = LoraConfig(
    r=8, lora_alpha=16,
    target_modules=r".*decoder_layers\\.\\d+\\.(self_attn\\.(q_proj|k_proj|v_proj|out_proj)|ffn\\.(fc1|fc2))"
    r"|.*box_heads\\.\\d+\\.layers\\.\\d+|.*alignment_head\\.(query_proj|concept_proj)",
)
peft_model = get_peft_model(model, lora)
```

See `docs/peft.md` and `examples/finetune_lora.py` in the detclipv3-hf repository.

## Limits

- Boxes are only as good as the training data; concepts far from it (rare objects, unusual wording) score lower.
- Scores are per-concept sigmoid probabilities, not calibrated across vocabularies: tune the threshold per use.
- Generated labels (captioning) can be wrong or too generic; check the parsed `category` before relying on it.
- No official DetCLIPv3 weights exist: this checkpoint is trained or converted by detclipv3-hf, not by the authors.
"""


def build_model_card(
    folder: str | os.PathLike,
    eval_results: Iterable[Mapping[str, Any] | str | os.PathLike] | None = None,
    training_info: Mapping[str, Any] | None = None,
    base_model: str | Sequence[str] | None = None,
    datasets: Sequence[str] | None = None,
    license: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """Builds the model card of a checkpoint folder.

    Fields not given are kept from the folder's existing card (so `detclipv3 card` refreshes rather than wipes), then
    fall back to defaults (license `apache-2.0`, model name = folder name). Training information comes from
    `training_info`, else `training_info.json` in the folder.

    Args:
        folder: A `save_pretrained` folder (must hold `config.json`).
        eval_results: Results records or paths to results JSON files (`detclipv3_hf.evaluation.save_results`).
        training_info: e.g. `{"stage": 1, "data": ["objects365"], "steps": 100000}`.
        base_model / datasets / license / model_name: card metadata.
        repo_id: Hub id used in the usage snippets (defaults to the model name).

    Raises:
        ValueError: no `config.json`, a bad results record.
    """
    path = _folder(folder)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: build the card of a save_pretrained folder")
    config = _read_json(path / "config.json")
    previous = ModelCard.load(path / CARD_FILENAME).data if (path / CARD_FILENAME).is_file() else ModelCardData()
    if training_info is None and (path / TRAINING_INFO_FILENAME).is_file():
        training_info = _read_json(path / TRAINING_INFO_FILENAME)
    model_name = model_name or previous.model_name or path.resolve().name
    results = eval_results_from_records(eval_results) if eval_results is not None else (previous.eval_results or [])
    if isinstance(base_model, str):
        base_model = [base_model]
    architecture, captioning = _architecture_summary(config)
    tags = list(dict.fromkeys(BASE_TAGS + (CAPTIONING_TAGS if captioning else []) + list(previous.tags or [])))
    data = ModelCardData(
        model_name=model_name,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        license=license or previous.license or "apache-2.0",
        tags=tags,
        base_model=list(base_model) if base_model else previous.base_model,
        datasets=list(datasets) if datasets else previous.datasets,
        eval_results=results or None,
    )
    content = _CARD_TEMPLATE.format(
        model_name=model_name,
        repo=repo_id or model_name,
        captioner_clause=" with an object captioner that names objects as `phrase|category|parent category`"
        if captioning
        else "",
        captioner_note=""
        if captioning
        else "\nThis checkpoint holds the detector only; the captioner head is newly initialised when loaded into "
        "`DetClipV3ForObjectCaptioning` and must be trained (stage 2) before use.\n",
        architecture=architecture,
        training=_training_section(training_info),
        results=_results_table(results),
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{content}")


def validate_model_card(card: ModelCard | str | os.PathLike) -> ModelCard:
    """Parses a card (object or README path) and checks its metadata offline.

    Checks: the YAML header parses (`ModelCard.load`), `pipeline_tag` and `library_name` are set, `license` is set,
    and the `model-index` (if any) has the structure the Hub expects (`model_index_to_eval_results` parses it and every
    result has a task type, a dataset and a numeric value).

    Raises:
        ValueError: naming the problem.
    """
    if isinstance(card, str | os.PathLike):
        if not Path(card).is_file():
            raise ValueError(f"model card {card} does not exist")
        try:
            card = ModelCard.load(card)
        except Exception as error:  # huggingface_hub raises several types for a broken header
            raise ValueError(f"cannot parse the model card: {error}") from error
    elif isinstance(card, ModelCard):
        card = ModelCard(str(card))  # round-trip through the text, as the Hub does
    else:
        raise TypeError(f"expected a ModelCard or a path, got {type(card).__name__}")
    metadata = card.data.to_dict()
    for key in ("pipeline_tag", "library_name", "license"):
        if not metadata.get(key):
            raise ValueError(f"card metadata lacks {key!r}")
    if metadata["pipeline_tag"] != PIPELINE_TAG:
        raise ValueError(f"pipeline_tag is {metadata['pipeline_tag']!r}, expected {PIPELINE_TAG!r}")
    model_index = metadata.get("model-index")
    if model_index is not None:
        if not isinstance(model_index, list) or not model_index or "name" not in model_index[0]:
            raise ValueError("model-index must be a non-empty list of {name, results}")
        try:
            _, results = model_index_to_eval_results(model_index)
        except (KeyError, TypeError, IndexError) as error:
            raise ValueError(f"malformed model-index: missing {error}") from error
        for result in results:
            if not result.task_type or not result.dataset_type or not isinstance(result.metric_value, int | float):
                raise ValueError(f"incomplete model-index entry: {result}")
    return card


def write_model_card(folder: str | os.PathLike, **kwargs: Any) -> Path:
    """Builds (see `build_model_card` for the arguments), validates and writes `folder/README.md`; returns its path."""
    card = build_model_card(folder, **kwargs)
    validate_model_card(card)
    path = Path(folder) / CARD_FILENAME
    card.save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------------------------------


def push_checkpoint(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
) -> Any:
    """Uploads a complete checkpoint folder to the Hub.

    The folder is checked first (`check_checkpoint_folder`); an incomplete one raises before any network call.

    Args:
        folder: The checkpoint folder (model, processor, generation config, remote-code files, card).
        repo_id: `"user/name"`.
        private: Create the repository as private (only when it does not exist yet).
        revision: Branch to upload to (created from main when missing, unless `create_pr`).
        create_pr: Open a pull request instead of committing directly.
        commit_message: Defaults to "Upload DetCLIPv3 checkpoint".
        token: Hub token (defaults to the logged-in one).
        api: An `HfApi` (tests pass a mock).

    Returns:
        The `CommitInfo` of the upload.

    Raises:
        CheckpointIncompleteError: listing everything the folder lacks.
        ValueError: a malformed `repo_id`.
    """
    if not isinstance(repo_id, str) or not re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", repo_id):
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}")
    problems = check_checkpoint_folder(folder)
    if problems:
        raise CheckpointIncompleteError(folder, problems)
    api = api if api is not None else HfApi(token=token)
    repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    if revision is not None and not create_pr:
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message or "Upload DetCLIPv3 checkpoint",
        ignore_patterns=["__pycache__/*", "*.pyc", ".cache/*", ".ipynb_checkpoints/*"],
    )


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def add_card_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `detclipv3 card <folder> [--eval results.json ...]`."""
    parser.add_argument("folder", help="checkpoint folder (save_pretrained)")
    parser.add_argument("--eval", nargs="+", default=None, help="results JSON file(s) from evaluation")
    parser.add_argument("--training-info", default=None, help="JSON file with stage / data / steps")
    parser.add_argument("--base-model", nargs="+", default=None, help="base model id(s)")
    parser.add_argument("--datasets", nargs="+", default=None, help="training dataset id(s)")
    parser.add_argument("--license", default=None, help="license id (default: kept, else apache-2.0)")
    parser.add_argument("--model-name", default=None, help="title of the card (default: folder name)")
    parser.add_argument("--repo-id", default=None, help="Hub id shown in the usage snippets")
    return parser


def run_card(args: argparse.Namespace) -> int:
    """Writes or refreshes `<folder>/README.md`; prints its path. Returns the exit code."""
    training_info = _read_json(Path(args.training_info)) if args.training_info else None
    path = write_model_card(
        args.folder,
        eval_results=args.eval,
        training_info=training_info,
        base_model=args.base_model,
        datasets=args.datasets,
        license=args.license,
        model_name=args.model_name,
        repo_id=args.repo_id,
    )
    print(f"wrote {path}")
    return 0


def add_push_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `detclipv3 push <folder> <repo_id> [--private] [--revision R] [--create-pr]`."""
    parser.add_argument("folder", help="complete checkpoint folder")
    parser.add_argument("repo_id", help="Hub repository, user/name")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    return parser


def run_push(args: argparse.Namespace, api: HfApi | None = None) -> int:
    """Checks and uploads; prints what is missing (exit code 1) or the commit URL (0)."""
    try:
        info = push_checkpoint(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
            token=args.token,
            api=api,
        )
    except CheckpointIncompleteError as error:
        print(f"refusing to push: {error}")
        return 1
    print(f"pushed {args.folder} -> {getattr(info, 'commit_url', info)}")
    return 0
