"""LoRA through the same loop: only adapters train; the adapter saves, reloads with peft and merges."""

from __future__ import annotations

import torch
from peft import PeftModel

from detclipv3_hf import DetClipV3ForObjectDetection
from detclipv3_hf.training import DetClipV3Trainer


def test_lora_round_trip(tmp_path, make_config, detector_folder):
    output = tmp_path / "lora"
    config = make_config(detector_folder, output, lora=True, lora_rank=4, lora_alpha=8)
    trainer = DetClipV3Trainer(config)
    assert trainer.trainable_names and all("lora_" in name for name in trainer.trainable_names)
    trainer.train()
    trained = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name}
    assert any(
        name.endswith("lora_B.default.weight") and value.abs().sum() > 0 for name, value in trained.items()
    )

    assert (output / "adapter_config.json").is_file() and (output / "adapter_model.safetensors").is_file()
    base = DetClipV3ForObjectDetection.from_pretrained(detector_folder)
    original = {name: p.detach().clone() for name, p in base.state_dict().items()}
    reloaded = PeftModel.from_pretrained(base, output)
    for name, value in reloaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(value, trained[name]), name

    merged = reloaded.merge_and_unload().state_dict()
    saved_merged = DetClipV3ForObjectDetection.from_pretrained(output / "merged").state_dict()
    assert merged.keys() == saved_merged.keys() == original.keys()
    targets = tuple(config.lora_target_modules)
    changed = {name for name in merged if not torch.equal(merged[name], original[name])}
    # Merging moves only the adapted layers' weights.
    assert changed and all(name.rsplit(".", 2)[-2] in targets for name in changed)
    bad = [n for n in merged if not torch.allclose(merged[n], saved_merged[n], atol=1e-6)]
    assert bad == []
