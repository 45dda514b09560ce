"""Stage specs, and that each stage's two optimizer steps change exactly the parameters it trains."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from detclipv3_hf import DetClipV3ForObjectDetection, DetClipV3Processor
from detclipv3_hf.modeling_detclipv3 import DetClipV3ForObjectCaptioning
from detclipv3_hf.training import (
    STAGE_1,
    STAGE_2,
    STAGE_3,
    DetClipV3Trainer,
    build_param_groups,
    get_stage,
    loss_base_term,
    stage_loss,
)


def test_stages_derive_from_stage_one():
    assert STAGE_2 == dataclasses.replace(
        STAGE_1, **{f: getattr(STAGE_2, f) for f in _changed(STAGE_1, STAGE_2)}
    )
    for spec in (STAGE_1, STAGE_2, STAGE_3):
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.stage = 4
        # The concept side (text tower + concept projection) trains at a low LR multiplier.
        assert spec.lr_multiplier("concept") <= 0.1 * spec.lr_multiplier("rest")
    assert STAGE_1.is_trainable("model.decoder_layers.0.ffn.fc1.weight")
    assert not STAGE_2.is_trainable("model.decoder_layers.0.ffn.fc1.weight")
    assert STAGE_2.is_trainable("captioner.layers.0.ffn.fc1.weight")
    assert STAGE_3.is_trainable("model.x") and STAGE_3.is_trainable("captioner.x")
    assert STAGE_1.lr_group("model.image_embedder.backbone.encoder.w") == "backbone"
    assert STAGE_1.lr_group("model.concept_encoder.text_model.w") == "concept"
    assert STAGE_1.lr_group("model.alignment_head.concept_proj.weight") == "concept"
    assert STAGE_1.lr_group("model.alignment_head.query_proj.weight") == "rest"


def _changed(a, b):
    return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def test_spec_validation_and_overrides():
    spec = get_stage(
        1, {"short_sides": [64, 96], "max_size": 128, "learning_rate_multipliers": {"backbone": 0.5}}
    )
    assert spec.short_sides == (64, 96)
    assert dict(spec.learning_rate_multipliers) == {"backbone": 0.5, "concept": 0.1, "rest": 1.0}
    with pytest.raises(ValueError, match="unknown StageSpec fields"):
        get_stage(1, {"resolution": 3})
    with pytest.raises(ValueError, match="max_size"):
        get_stage(1, {"short_sides": [800], "max_size": 100})
    with pytest.raises(ValueError, match="caption losses"):
        dataclasses.replace(STAGE_1, losses=("caption",))
    with pytest.raises(ValueError, match="vocabulary_free_ratio"):
        dataclasses.replace(STAGE_1, vocabulary_free_ratio=1.0)
    with pytest.raises(ValueError, match="stage must be one of"):
        get_stage(4)


def test_loss_terms_follow_their_base_term():
    assert loss_base_term("loss_bbox_dn_0") == "bbox"
    assert loss_base_term("loss_alignment_enc") == "alignment"
    assert loss_base_term("loss_image_caption") == "image_caption"
    assert loss_base_term("loss_caption") == "caption"
    with pytest.raises(ValueError):
        loss_base_term("loss_mask")
    terms = {
        "loss_bbox": torch.tensor(1.0),
        "loss_bbox_0": torch.tensor(2.0),
        "loss_caption": torch.tensor(4.0),
    }
    weights = {"loss_bbox": 5.0, "loss_bbox_0": 5.0, "loss_caption": 1.0}
    assert stage_loss(terms, STAGE_1, weights) == 15.0
    assert stage_loss(terms, STAGE_2, weights) == 4.0
    with pytest.raises(ValueError, match="none of the stage's loss terms"):
        stage_loss({"loss_caption": torch.tensor(1.0)}, STAGE_1, weights)


def test_param_groups_apply_multipliers(detector_folder):
    model = DetClipV3ForObjectDetection.from_pretrained(detector_folder)
    groups = {g["name"]: g for g in build_param_groups(model, STAGE_1, 1e-3, 0.01)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["concept"]["lr"] == pytest.approx(1e-4)
    assert groups["rest"]["lr"] == pytest.approx(1e-3)
    assert groups["rest_no_decay"]["weight_decay"] == 0.0 and groups["rest"]["weight_decay"] == 0.01
    concept = {id(p) for p in groups["concept"]["params"] + groups["concept_no_decay"]["params"]}
    assert id(model.model.alignment_head.concept_proj.weight) in concept
    assert id(model.model.concept_encoder.text_model.text_model.embeddings.token_embedding.weight) in concept
    total = sum(len(g["params"]) for g in groups.values())
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def _run(make_config, model, output, stage, tiny_stage, **fields):
    """Two optimizer steps of ``stage``; returns the trainer and the set of parameter names that changed."""
    config = make_config(model, output, stage=stage, stage_overrides=tiny_stage, **fields)
    trainer = DetClipV3Trainer(config)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    assert trainer.train().global_step == 2
    after = dict(trainer._base_model().named_parameters())
    changed = {name for name, value in before.items() if not torch.equal(value, after[name])}
    frozen_changed = sorted(name for name in changed if not trainer.spec.is_trainable(name))
    assert frozen_changed == []
    return trainer, changed


def test_three_stages_train_only_their_parameters(
    tmp_path, make_config, detector_folder, tiny_stage, training_world
):
    captioned = [f"captioned={training_world.train.granucap_file}"]
    _, changed1 = _run(make_config, detector_folder, tmp_path / "s1", 1, tiny_stage)
    for prefix in ("model.image_embedder.backbone.", "model.concept_encoder.", "model.decoder_layers."):
        assert any(name.startswith(prefix) for name in changed1), prefix

    stage2, changed2 = _run(make_config, tmp_path / "s1", tmp_path / "s2", 2, tiny_stage, data=captioned)
    assert isinstance(stage2._base_model(), DetClipV3ForObjectCaptioning)
    assert changed2 and all(name.startswith("captioner.") for name in changed2)
    # The saved stage-2 detector is bit-identical to stage 1's.
    s1, s2 = (
        load_file(str(tmp_path / "s1" / "model.safetensors")),
        load_file(str(tmp_path / "s2" / "model.safetensors")),
    )
    assert all(torch.equal(s1[name], s2[name]) for name in s1)
    reloaded = DetClipV3ForObjectCaptioning.from_pretrained(tmp_path / "s2")
    assert reloaded.config.captioner_config.obj_token_id == stage2.processor.obj_token_id

    _, changed3 = _run(make_config, tmp_path / "s2", tmp_path / "s3", 3, tiny_stage, data=captioned)
    assert any(n.startswith("model.") for n in changed3) and any(n.startswith("captioner.") for n in changed3)
    assert (tmp_path / "s3" / "generation_config.json").is_file()
    DetClipV3Processor.from_pretrained(tmp_path / "s3")


def test_fresh_config_takes_the_tokenizers_vocabulary_and_special_ids():
    """A fresh config with CLIP's default ids (49406 / 49407, outside a small vocabulary) must follow the tokenizer,
    or the text tower would pool every concept at the same position."""
    from tiny import build_clip_tokenizer

    from detclipv3_hf import DetClipV3Config, DetClipV3ImageProcessor, DetClipV3Processor
    from detclipv3_hf.training.trainer import _fill_token_ids

    processor = DetClipV3Processor(DetClipV3ImageProcessor(), build_clip_tokenizer(), max_concept_tokens=8)
    config = DetClipV3Config()
    _fill_token_ids(config, processor, fresh=True)
    tokenizer = processor.tokenizer
    assert config.text_config.vocab_size == len(tokenizer) == config.captioner_config.vocab_size
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    assert config.captioner_config.eos_token_id == tokenizer.eos_token_id
    assert config.captioner_config.obj_token_id == processor.obj_token_id
