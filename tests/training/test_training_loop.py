"""The loop end to end: CLI + config file, a fresh model from a config, accumulation, logging, final folder."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import yaml
from tiny import tiny_config
from tqdm.auto import tqdm
from transformers import AutoModelForZeroShotObjectDetection

from detclipv3_hf import DetClipV3ForObjectDetection, DetClipV3Processor
from detclipv3_hf.training import DetClipV3Trainer, TrainConfig
from detclipv3_hf.training import trainer as trainer_module
from detclipv3_hf.training.cli import main


def test_cli_with_config_file_and_fresh_model(tmp_path, training_world, tiny_processor, tiny_stage, capsys):
    # A fresh run: model from a config file, processor built around a plain tokenizer folder.
    tiny_processor.tokenizer.save_pretrained(tmp_path / "tokenizer")
    tiny_config(tiny_processor.tokenizer).to_json_file(tmp_path / "config.json")
    run_config = {
        "stage": 1,
        "model": f"new:{tmp_path / 'config.json'}",
        "processor": str(tmp_path / "tokenizer"),
        "data": [f"grounding={training_world.train.granucap_file}"],
        "max_steps": 5,  # overridden by the flag below
        "batch_size": 2,
        "report_to": "jsonl",
        "stage_overrides": tiny_stage,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_config))
    code = main(
        ["--config", str(tmp_path / "run.yaml"), "--output", str(tmp_path / "out"), "--max-steps", "2",
         "--logging-steps", "1", "--concept-lr-multiplier", "0.05", "--gradient-checkpointing"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["global_step"] == 2

    out = tmp_path / "out"
    model = AutoModelForZeroShotObjectDetection.from_pretrained(out)
    assert isinstance(model, DetClipV3ForObjectDetection)
    processor = DetClipV3Processor.from_pretrained(out)
    assert len(processor.tokenizer) <= model.config.text_config.vocab_size
    assert processor.image_processor.size.shortest_edge == 64  # inference size follows the training size
    run = json.loads((out / "training_run.json").read_text())
    assert run["global_step"] == 2 and run["stage_spec"]["learning_rate_multipliers"]["concept"] == 0.05
    metrics = [
        json.loads(line) for line in (out / "logs" / "stage1" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == [1, 2]
    assert {"loss", "loss_bbox", "loss_giou", "loss_objectness", "lr/rest", "lr/concept"} <= set(metrics[0])
    assert metrics[0]["lr/concept"] == pytest.approx(0.05 * metrics[0]["lr/rest"])


def test_cli_reports_bad_arguments(tmp_path, training_world, capsys):
    assert main(["--stage", "1", "--output", str(tmp_path), "--data", "x.jsonl"]) == 2
    assert "model is required" in capsys.readouterr().err
    code = main(["--stage", "1", "--model", "new:cfg.json", "--output", str(tmp_path), "--data", "x.jsonl"])
    assert code == 2 and "--processor" in capsys.readouterr().err


def test_gradient_accumulation_and_data_kinds(tmp_path, make_config, detector_folder, training_world):
    trainer = DetClipV3Trainer(
        make_config(detector_folder, tmp_path / "acc", max_steps=1, gradient_accumulation_steps=2)
    )
    trainer.train()
    assert len(trainer.state.last_image_ids) == 4 and trainer.state.micro_step == 2
    # Stage 2 reads captioned data only: a run whose only source is detection data cannot start.
    with pytest.raises(ValueError, match="no data source matches"):
        config = make_config(tmp_path / "acc", tmp_path / "s2", stage=2)
        DetClipV3Trainer(config).train()


@pytest.mark.parametrize("default_disable", [True, False])
def test_progress_bar_keeps_tqdm_default(
    tmp_path, make_config, detector_folder, monkeypatch, capsys, default_disable
):
    # tqdm reads TQDM_DISABLE into its defaults at import time; a default set through partial stands in for it
    # (an explicit ``disable=`` from the trainer would override either).
    monkeypatch.setattr(trainer_module, "tqdm", functools.partial(tqdm, disable=default_disable))
    DetClipV3Trainer(make_config(detector_folder, tmp_path / "run", max_steps=1)).train()
    assert ("stage 1: 100%|" in capsys.readouterr().err) is not default_disable


def test_every_train_config_field_has_a_flag_that_reaches_the_config():
    import argparse
    import dataclasses

    from detclipv3_hf.training.cli import add_train_arguments, config_from_args

    parser = add_train_arguments(argparse.ArgumentParser())
    flags = vars(parser.parse_args([]))
    fields = [field.name for field in dataclasses.fields(TrainConfig)]
    assert [name for name in fields if name != "stage_overrides" and name not in flags] == []
    args = parser.parse_args(["--model", "m", "--output", "o", "--data", "x.json", "--adam-beta2", "0.98"])
    config = config_from_args(args)
    assert config.adam_beta2 == 0.98 and config.adam_beta1 == TrainConfig.adam_beta1


def test_cpu_runs_step_with_the_fused_adamw_kernel(tmp_path, make_config, detector_folder):
    out = tmp_path / "run"
    DetClipV3Trainer(make_config(detector_folder, out, max_steps=2, save_steps=1)).train()  # keeps step 1
    (optimizer_file,) = (out / trainer_module.CHECKPOINT_DIR).glob("*/optimizer.bin")
    groups = torch.load(optimizer_file, weights_only=True)["param_groups"]
    assert groups and all(group["fused"] for group in groups)
