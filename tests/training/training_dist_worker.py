"""Worker of test_training_distributed.py, run by ``torchrun --nproc_per_node 2`` on CPU.

Usage: ``training_dist_worker.py CONFIG.json REPORT_DIR``. Trains with the config and writes, per rank, the image ids
each step consumed and the rank's final parameters, so the test can check disjoint data and identical weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from detclipv3_hf.training import DetClipV3Trainer, TrainConfig


def main(config_file: str, report_dir: str) -> None:
    config = TrainConfig(**json.loads(Path(config_file).read_text()))
    seen: list[list[str]] = []
    trainer = DetClipV3Trainer(config, callbacks=[lambda t: seen.append(list(t.state.last_image_ids))])
    trainer.train()
    rank = trainer.accelerator.process_index
    report = Path(report_dir)
    (report / f"ids_rank{rank}.json").write_text(json.dumps(seen))
    params = {name: p.detach().cpu() for name, p in trainer._base_model().named_parameters()}
    torch.save(params, report / f"params_rank{rank}.pt")
    (report / f"world_rank{rank}.json").write_text(
        json.dumps({"world_size": trainer.accelerator.num_processes})
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
