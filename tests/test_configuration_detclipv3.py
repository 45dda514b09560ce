"""DetClipV3Config: defaults, sub-configs, serialisation and the `validate_architecture` errors."""

from __future__ import annotations

import pytest
from huggingface_hub.errors import StrictDataclassError
from tiny import tiny_config
from transformers import AutoConfig, CLIPTextConfig

from detclipv3_hf import DetClipV3CaptionerConfig, DetClipV3Config

# `@strict` wraps the ValueError of `validate_architecture` into its own error type, keeping the message.
CONFIG_ERRORS = (ValueError, StrictDataclassError)


def test_default_config_is_the_swin_t_model_and_needs_no_network():
    config = DetClipV3Config()
    assert config.model_type == "detclipv3"
    assert config.backbone_config.model_type == "swin"
    assert config.backbone_config.embed_dim == 96
    assert list(config.backbone_config.depths) == [2, 2, 6, 2]
    assert config.num_backbone_levels == 3 and config.num_feature_levels == 4
    assert isinstance(config.text_config, CLIPTextConfig)
    assert isinstance(config.captioner_config, DetClipV3CaptionerConfig)
    # The captioner shares the CLIP tokenizer: vocabulary and special ids come from the text config.
    assert config.captioner_config.vocab_size == config.text_config.vocab_size
    assert config.captioner_config.eos_token_id == config.text_config.eos_token_id
    assert config.hidden_size == config.d_model  # attribute_map


def test_round_trip_through_dict_and_folder(tmp_path, clip_tokenizer):
    config = tiny_config(clip_tokenizer, fusion="image_only", num_queries=7)
    again = DetClipV3Config.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is DetClipV3Config
    assert (loaded.fusion, loaded.num_queries, loaded.d_model) == ("image_only", 7, 32)
    assert loaded.backbone_config.model_type == "resnet"
    assert loaded.text_config.vocab_size == len(clip_tokenizer)


def test_any_backbone_config_sets_the_number_of_levels(clip_tokenizer):
    assert tiny_config(clip_tokenizer, backbone="resnet").num_backbone_levels == 3
    assert tiny_config(clip_tokenizer, backbone="swin").num_backbone_levels == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"encoder_attention_heads": 3}, "must be divisible by encoder_attention_heads"),
        ({"decoder_attention_heads": 3}, "must be divisible by decoder_attention_heads"),
        ({"d_model": 36, "encoder_attention_heads": 3, "decoder_attention_heads": 3, "norm_groups": 4}, None),
        ({"d_model": 30, "norm_groups": 2}, "multiple of 4"),
        ({"norm_groups": 7}, "norm_groups \\(7\\) must divide d_model"),
        ({"encoder_layers": 0}, "encoder_layers must be >= 1"),
        ({"decoder_n_points": 0}, "decoder_n_points must be >= 1"),
        ({"num_queries": 0}, "num_queries must be >= 1"),
        ({"fusion": "both"}, "fusion must be"),
        ({"max_concept_tokens": 2}, "max_concept_tokens must leave room"),
        ({"max_concept_tokens": 64}, "exceeds the text encoder's max_position_embeddings"),
        ({"prior_prob": 0.0}, "prior_prob must lie in"),
        ({"label_noise_ratio": 1.5}, "label_noise_ratio must lie in"),
        ({"num_denoising": -1}, "num_denoising must be >= 0"),
        ({"ov_score_weights": (1.0, 2.0)}, "ov_score_weights must be three"),
        ({"ov_score_weights": (1.0, -1.0, 1.0)}, "ov_score_weights must be three"),
        ({"num_feature_levels": 2}, "returns 3 feature maps but num_feature_levels is 2"),
        ({"train_detector": False, "train_captioner": False}, "At least one of train_detector"),
        ({"caption_query_iou": 0.0}, "caption_query_iou must lie in"),
        ({"caption_query_iou": 1.5}, "caption_query_iou must lie in"),
    ],
)
def test_validation_errors_name_the_field(clip_tokenizer, overrides, message):
    if message is None:  # a valid non-default combination: no error
        assert tiny_config(clip_tokenizer, **overrides).d_model == overrides["d_model"]
        return
    with pytest.raises(CONFIG_ERRORS, match=message):
        tiny_config(clip_tokenizer, **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "hidden_size \\(30\\) must be divisible"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be >= 1"),
        ({"max_position_embeddings": 10, "max_caption_length": 16}, "max_position_embeddings must cover"),
    ],
)
def test_captioner_config_validation(overrides, message):
    with pytest.raises(CONFIG_ERRORS, match=message):
        DetClipV3CaptionerConfig(**overrides)
