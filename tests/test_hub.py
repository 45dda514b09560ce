"""Model cards and pushing: the card parses and validates offline; incomplete folders never reach the network."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from unittest import mock

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from tiny import tiny_config

from detclipv3_hf import DetClipV3ForObjectDetection, DetClipV3ImageProcessor, DetClipV3Processor
from detclipv3_hf.evaluation import build_results_record, save_results
from detclipv3_hf.hub import (
    CheckpointIncompleteError,
    add_card_arguments,
    add_push_arguments,
    build_model_card,
    check_checkpoint_folder,
    push_checkpoint,
    run_card,
    run_push,
    validate_model_card,
    write_model_card,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, clip_tokenizer) -> Path:
    """A saved tiny detector + processor (remote code written by save_pretrained), without a card."""
    folder = tmp_path_factory.mktemp("ckpt")
    processor = DetClipV3Processor(DetClipV3ImageProcessor(size={"height": 64, "width": 64}), clip_tokenizer)
    DetClipV3ForObjectDetection(tiny_config(processor.tokenizer)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture()
def results_json(tmp_path) -> Path:
    evaluation = {
        "AP": 0.471,
        "AP50": 0.62,
        "APr": float("nan"),
        "per_category": {"cat": 0.5},
        "num_images": 4,
    }
    return save_results(
        build_results_record("detection-lvis-fixed", "lvis_v1_minival", evaluation), tmp_path / "r.json"
    )


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_card_metadata_and_model_index(checkpoint, results_json, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    path = write_model_card(
        folder,
        eval_results=[results_json],
        training_info={"stage": 1, "data": ["objects365", "goldg"], "steps": 1234},
        base_model="openai/clip-vit-base-patch32",
        datasets=["detection-datasets/coco"],
    )
    card = ModelCard.load(path)
    meta = card.data.to_dict()
    assert meta["pipeline_tag"] == "zero-shot-object-detection"
    assert meta["library_name"] == "transformers"
    assert "detclipv3-hf" in meta["tags"] and meta["license"] == "apache-2.0"
    assert meta["base_model"] == ["openai/clip-vit-base-patch32"]
    assert meta["datasets"] == ["detection-datasets/coco"]
    _, results = model_index_to_eval_results(meta["model-index"])
    values = {r.metric_type: r.metric_value for r in results}
    # AP values are reported in percent; the NaN metric (null in JSON) is left out.
    assert values == {"mAP": pytest.approx(47.1), "mAP@0.5": pytest.approx(62.0)}
    assert {r.dataset_type for r in results} == {"lvis_v1_minival"}
    text = path.read_text()
    for section in (
        "## Model",
        "## Training",
        "## Evaluation",
        "## How to use",
        "### Pipeline",
        "### Auto classes",
        "### Object captioning",
        "### Fine-tuning with PEFT",
        "## Limits",
    ):
        assert section in text
    assert "1234" in text and "objects365, goldg" in text
    validate_model_card(path)


def test_card_refresh_keeps_metadata_and_results(checkpoint, results_json, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    write_model_card(folder, eval_results=[results_json], base_model="a/b", license="mit")
    refreshed = build_model_card(folder)  # no arguments: refresh
    meta = refreshed.data.to_dict()
    assert meta["license"] == "mit" and meta["base_model"] == ["a/b"]
    assert len(model_index_to_eval_results(meta["model-index"])[1]) == 2


def test_card_cli(checkpoint, results_json, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    parser = add_card_arguments(argparse.ArgumentParser())
    assert run_card(parser.parse_args([str(folder), "--eval", str(results_json)])) == 0
    assert "model-index" in ModelCard.load(folder / "README.md").data.to_dict()


def test_validate_rejects_broken_metadata(tmp_path):
    card = tmp_path / "README.md"
    card.write_text("---\nlicense: mit\n---\n# x\n")
    with pytest.raises(ValueError, match="pipeline_tag"):
        validate_model_card(card)
    meta = {
        "license": "mit",
        "library_name": "transformers",
        "pipeline_tag": "zero-shot-object-detection",
        "model-index": [
            {"name": "x", "results": [{"task": {"type": "t"}, "metrics": [{"type": "mAP", "value": 1}]}]}
        ],
    }
    card.write_text(f"---\n{yaml.safe_dump(meta)}---\n# x\n")
    with pytest.raises(ValueError, match="model.index"):
        validate_model_card(card)


def test_bad_eval_file_is_named(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build_model_card(checkpoint, eval_results=[tmp_path / "missing.json"])


def test_complete_folder_passes_check(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    assert "README.md" in " ".join(check_checkpoint_folder(folder))
    write_model_card(folder)
    assert check_checkpoint_folder(folder) == []


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda f: (f / "model.safetensors").unlink(), "model.safetensors"),
        (lambda f: (f / "modeling_detclipv3.py").unlink(), "modeling_detclipv3.py"),
        (lambda f: (f / "loss_detclipv3.py").unlink(), "loss_detclipv3.py"),  # imported by modeling only
        (lambda f: (f / "tokenizer.json").unlink(), "tokenizer"),
        (lambda f: (f / "processor_config.json").unlink(), "processor"),
        (lambda f: (f / "README.md").unlink(), "README.md"),
        (
            lambda f: (f / "config.json").write_text(
                json.dumps(
                    {k: v for k, v in json.loads((f / "config.json").read_text()).items() if k != "auto_map"}
                )
            ),
            "auto_map",
        ),
    ],
)
def test_incomplete_folder_is_refused_before_upload(checkpoint, tmp_path, breakage, expected):
    folder = _copy(checkpoint, tmp_path)
    write_model_card(folder)
    breakage(folder)
    api = mock.MagicMock()
    with pytest.raises(CheckpointIncompleteError, match=expected):
        push_checkpoint(folder, "user/model", api=api)
    assert api.method_calls == []  # nothing reached the Hub, not even create_repo


def test_push_complete_folder_calls_hub(checkpoint, tmp_path):
    folder = _copy(checkpoint, tmp_path)
    write_model_card(folder)
    api = mock.MagicMock()
    api.create_repo.return_value = mock.Mock(repo_id="user/model")
    push_checkpoint(folder, "user/model", private=True, revision="v1", api=api)
    api.create_repo.assert_called_once_with(
        repo_id="user/model", private=True, exist_ok=True, repo_type="model"
    )
    api.create_branch.assert_called_once_with(
        repo_id="user/model", branch="v1", exist_ok=True, repo_type="model"
    )
    kwargs = api.upload_folder.call_args.kwargs
    assert (
        kwargs["folder_path"] == str(folder) and kwargs["revision"] == "v1" and kwargs["create_pr"] is False
    )
    assert [name for name, *_ in api.method_calls] == ["create_repo", "create_branch", "upload_folder"]


def test_push_cli_create_pr_and_refusal(checkpoint, tmp_path, capsys):
    folder = _copy(checkpoint, tmp_path)
    parser = add_push_arguments(argparse.ArgumentParser())
    api = mock.MagicMock()
    assert run_push(parser.parse_args([str(folder), "user/model", "--create-pr"]), api=api) == 1
    assert api.method_calls == [] and "README.md" in capsys.readouterr().out
    write_model_card(folder)
    api.create_repo.return_value = mock.Mock(repo_id="user/model")
    assert (
        run_push(parser.parse_args([str(folder), "user/model", "--create-pr", "--revision", "dev"]), api=api)
        == 0
    )
    api.create_branch.assert_not_called()  # a PR targets the revision without creating it
    assert api.upload_folder.call_args.kwargs["create_pr"] is True


def test_push_rejects_bad_repo_id(checkpoint):
    with pytest.raises(ValueError, match="repo_id"):
        push_checkpoint(checkpoint, "not a repo id", api=mock.MagicMock())


def test_save_pretrained_can_write_the_model_card(tmp_path, clip_tokenizer):
    """`save_pretrained(..., model_card=...)` writes a valid card next to the weights."""
    from huggingface_hub import ModelCard
    from tiny import tiny_config

    from detclipv3_hf import DetClipV3ForObjectDetection, DetClipV3ImageProcessor, DetClipV3Processor

    processor = DetClipV3Processor(DetClipV3ImageProcessor(), clip_tokenizer, max_concept_tokens=8)
    processor.save_pretrained(tmp_path)
    model = DetClipV3ForObjectDetection(tiny_config(processor.tokenizer))
    model.save_pretrained(tmp_path, model_card={"license": "apache-2.0"})
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.pipeline_tag == "zero-shot-object-detection"
    assert card.data.license == "apache-2.0"
    model.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "README.md").exists()
