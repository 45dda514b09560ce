"""Kill-and-resume: a run killed after a checkpoint and resumed ends with the uninterrupted run's parameters."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from detclipv3_hf.training import DetClipV3Trainer, list_checkpoints


class Killed(RuntimeError):
    pass


def _kill_after(step: int):
    def callback(trainer: DetClipV3Trainer) -> None:
        if trainer.state.global_step == step:
            raise Killed(f"simulated kill after step {step}")

    return callback


def test_kill_and_resume_reproduces_uninterrupted_run(tmp_path, make_config, detector_folder, tiny_stage):
    # Vocabulary-free batches and flips on: the resumed run must also replay the batch plan and the augmentation.
    stage = {**tiny_stage, "vocabulary_free_ratio": 0.3, "horizontal_flip": 0.5}
    fields = dict(max_steps=3, save_steps=2, stage_overrides=stage, warmup_steps=1)

    DetClipV3Trainer(make_config(detector_folder, tmp_path / "full", **fields)).train()
    reference = load_file(str(tmp_path / "full" / "model.safetensors"))

    killed_dir = tmp_path / "killed"
    with pytest.raises(Killed):
        DetClipV3Trainer(
            make_config(detector_folder, killed_dir, **fields), callbacks=[_kill_after(3)]
        ).train()
    checkpoints = list_checkpoints(killed_dir)
    assert [c.name for c in checkpoints] == ["step-00000002"]
    assert not (killed_dir / "model.safetensors").exists()
    data_state = json.loads((checkpoints[0] / "data_state_rank0.json").read_text())
    assert data_state["0"]["position"] == 4  # 2 steps x 2 images, nothing skipped

    resumed = DetClipV3Trainer(make_config(detector_folder, killed_dir, resume="latest", **fields))
    steps_run = []
    resumed.callbacks.append(lambda trainer: steps_run.append(trainer.state.global_step))
    assert resumed.train().global_step == 3
    assert steps_run == [3]  # continued after the checkpoint, repeating nothing before it
    final = load_file(str(killed_dir / "model.safetensors"))
    assert final.keys() == reference.keys()
    mismatched = [name for name in reference if not torch.equal(reference[name], final[name])]
    assert mismatched == []


def test_resume_latest_without_checkpoint_starts_fresh_and_bad_resume_fails(
    tmp_path, make_config, detector_folder
):
    trainer = DetClipV3Trainer(make_config(detector_folder, tmp_path / "run", resume="latest", max_steps=1))
    assert trainer.train().global_step == 1
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        DetClipV3Trainer(make_config(detector_folder, tmp_path / "run2", resume=str(tmp_path))).train()


def test_save_total_limit_keeps_newest(tmp_path, make_config, detector_folder):
    config = make_config(detector_folder, tmp_path / "run", max_steps=3, save_steps=1, save_total_limit=1)
    DetClipV3Trainer(config).train()
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step-00000002"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
