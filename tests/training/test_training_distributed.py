"""Two CPU processes under torchrun: disjoint data per rank, identical weights at the end, same final folder."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from detclipv3_hf import DetClipV3ForObjectDetection

WORKER = Path(__file__).with_name("training_dist_worker.py")


def test_two_process_cpu_run(tmp_path, make_config, detector_folder):
    config = make_config(detector_folder, tmp_path / "run", max_steps=2, save_steps=1)
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(dataclasses.asdict(config)))
    report = tmp_path / "report"
    report.mkdir()
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(WORKER), str(config_file), str(report),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]

    for rank in (0, 1):
        assert json.loads((report / f"world_rank{rank}.json").read_text()) == {"world_size": 2}
    ids = [json.loads((report / f"ids_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(steps) for steps in ids] == [2, 2]
    rank0, rank1 = ({i for step in steps for i in step} for steps in ids)
    assert len(rank0) == 4 and len(rank1) == 4  # 2 steps x 2 images, no record twice within a rank
    assert not rank0 & rank1  # one sharding mechanism: the ranks read disjoint records

    params = [torch.load(report / f"params_rank{rank}.pt") for rank in (0, 1)]
    assert params[0].keys() == params[1].keys()
    assert all(torch.equal(params[0][name], params[1][name]) for name in params[0])
    initial = DetClipV3ForObjectDetection.from_pretrained(detector_folder).state_dict()
    assert any(not torch.equal(initial[name], value) for name, value in params[0].items())

    final = DetClipV3ForObjectDetection.from_pretrained(tmp_path / "run").state_dict()
    assert all(torch.equal(final[name], value) for name, value in params[0].items())
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000001"
    assert {p.name for p in checkpoint.glob("data_state_rank*.json")} == {
        "data_state_rank0.json",
        "data_state_rank1.json",
    }
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
