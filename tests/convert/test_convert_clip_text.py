"""CLIP text tower and plain Swin backbone into an existing DetCLIPv3 detector."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from tiny import tiny_config
from transformers import CLIPConfig, CLIPModel, SwinConfig, SwinForImageClassification

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "convert"))

from convert_clip_text import convert_clip_text, convert_swin_backbone  # noqa: E402
from key_mapping import ConversionError  # noqa: E402

from detclipv3_hf import DetClipV3ForObjectDetection  # noqa: E402


def test_full_clip_model_fills_text_tower(clip_tokenizer):
    model = DetClipV3ForObjectDetection(tiny_config(clip_tokenizer))
    text = model.config.text_config.to_dict()
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config={"hidden_size": 16, "intermediate_size": 32,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32,
                                "patch_size": 16}, projection_dim=16))
    report = convert_clip_text(model, clip.state_dict())
    assert any("vision" in reason for reason in report.ignored.values())
    target = model.model.concept_encoder.text_model
    assert torch.equal(target.text_model.final_layer_norm.weight, clip.text_model.final_layer_norm.weight)
    assert torch.equal(target.text_projection.weight, clip.text_projection.weight)


def test_swin_classifier_fills_backbone(clip_tokenizer):
    model = DetClipV3ForObjectDetection(tiny_config(clip_tokenizer, backbone="swin"))
    swin_fields = {k: v for k, v in model.config.backbone_config.to_dict().items()
                   if k in ("embed_dim", "depths", "num_heads", "window_size", "image_size")}
    swin = SwinForImageClassification(SwinConfig(**swin_fields, num_labels=3))
    report = convert_swin_backbone(model, swin.state_dict())
    assert all("hidden_states_norms" in k for k in report.new)
    ours = model.model.image_embedder.backbone.swin
    assert torch.equal(ours.encoder.layers[1].blocks[0].mlp.fc1.weight, swin.swin.encoder.layers[1].blocks[0].mlp.fc1.weight)


def test_swin_shape_mismatch_is_named(clip_tokenizer):
    model = DetClipV3ForObjectDetection(tiny_config(clip_tokenizer, backbone="swin"))
    swin = SwinForImageClassification(SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                                 window_size=2, image_size=64))
    with pytest.raises(ConversionError, match=r"shape mismatch.*patch_embeddings.*\(8, 3, 4, 4\).*\(16, 3, 4, 4\)"):
        convert_swin_backbone(model, swin.state_dict())
