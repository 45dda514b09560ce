"""LoRA on the DetCLIPv3 detector: reload reproduces outputs, merge equals adapter, only LoRA weights train."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny import tiny_config

from detclipv3_hf import DetClipV3ForObjectDetection

# Decoder attention + FFN projections and the heads (box MLPs, alignment projections).
TARGET_MODULES = (
    r".*decoder_layers\.\d+\.(self_attn|concept_attn)\.(q_proj|k_proj|v_proj|out_proj)"
    r"|.*decoder_layers\.\d+\.image_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)"
    r"|.*decoder_layers\.\d+\.ffn\.(fc1|fc2)"
    r"|.*box_heads\.\d+\.layers\.\d+|.*alignment_head\.(query_proj|concept_proj)"
)


def _base(tokenizer) -> DetClipV3ForObjectDetection:
    torch.manual_seed(0)
    return DetClipV3ForObjectDetection(tiny_config(tokenizer, use_denoising=False)).eval()


def _inputs(tokenizer):
    torch.manual_seed(1)
    ids = tokenizer(["cat", "bus", "tree"], padding="max_length", max_length=8, return_tensors="pt")
    return {
        "pixel_values": torch.randn(2, 3, 64, 64),
        "input_ids": ids["input_ids"][None].expand(2, -1, -1),
        "attention_mask": ids["attention_mask"][None].expand(2, -1, -1),
    }


def _lora_model(tokenizer):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGET_MODULES, init_lora_weights=False)
    return get_peft_model(_base(tokenizer), config)


def test_lora_targets_decoder_and_heads(clip_tokenizer):
    model = _lora_model(clip_tokenizer)
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert any("decoder_layers.1.ffn.fc2" in n for n in lora_names)
    assert any("box_heads.0.layers.2" in n for n in lora_names)
    assert any("alignment_head.query_proj" in n for n in lora_names)
    assert not any("encoder_layers" in n or "backbone" in n for n in lora_names)


def test_adapter_reload_reproduces_outputs_exactly(clip_tokenizer, tmp_path):
    model = _lora_model(clip_tokenizer).eval()
    inputs = _inputs(clip_tokenizer)
    with torch.no_grad():
        expected = model(**inputs)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_base(clip_tokenizer), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = reloaded(**inputs)
    # The reloaded weights are bit-identical; outputs agree to float reassociation (kernels may pick another path
    # for freshly loaded tensors), far below any effect of the adapter itself.
    original_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert set(original_state) == set(reloaded_state)
    assert all(torch.equal(original_state[k], reloaded_state[k]) for k in original_state)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, atol=1e-6, rtol=0)
    base_out = _base(clip_tokenizer)(**inputs)
    assert not torch.allclose(base_out.logits, expected.logits)  # the adapter does change the model


def test_merged_model_equals_adapter_model(clip_tokenizer):
    model = _lora_model(clip_tokenizer).eval()
    inputs = _inputs(clip_tokenizer)
    with torch.no_grad():
        expected = model(**inputs)
        merged = model.merge_and_unload()
        got = merged(**inputs)
    assert isinstance(merged, DetClipV3ForObjectDetection)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [2])
def test_only_lora_parameters_change_in_training(clip_tokenizer, steps):
    model = _lora_model(clip_tokenizer).train()
    inputs = _inputs(clip_tokenizer)
    labels = [
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]]), "class_labels": torch.tensor([0])},
        {"boxes": torch.tensor([[0.6, 0.5, 0.3, 0.4]]), "class_labels": torch.tensor([2])},
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
