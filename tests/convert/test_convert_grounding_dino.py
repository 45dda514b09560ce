"""Conversion of tiny random Grounding DINO / MM-Grounding-DINO models into DetCLIPv3: equal tensors, equal blocks."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    MMGroundingDinoConfig,
    MMGroundingDinoForObjectDetection,
)
from transformers.models.grounding_dino.modeling_grounding_dino import encode_sinusoidal_position_embedding

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "convert"))

from convert_grounding_dino_to_detclipv3 import (  # noqa: E402
    _swap_xy_input_blocks,
    convert_checkpoint,
    convert_grounding_dino,
    target_config_from_source,
)
from key_mapping import ConversionError  # noqa: E402

from detclipv3_hf.hub import check_checkpoint_folder  # noqa: E402
from detclipv3_hf.modeling_detclipv3 import box_sine_embedding  # noqa: E402

SWIN = {
    "model_type": "swin",
    "embed_dim": 8,
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 1, 2, 2],
    "window_size": 2,
    "image_size": 64,
    "out_indices": [2, 3, 4],
}
BERT = {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 32}
SOURCES = {
    "grounding-dino": (GroundingDinoConfig, GroundingDinoForObjectDetection),
    "mm-grounding-dino": (MMGroundingDinoConfig, MMGroundingDinoForObjectDetection),
}


def _source(kind: str, **overrides) -> torch.nn.Module:
    config_class, model_class = SOURCES[kind]
    kwargs = dict(
        backbone_config=SWIN, text_config=BERT, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_n_points=2, decoder_n_points=2, num_queries=16, max_text_len=32,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs)).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (init leaves many zeros / ones)
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        if hasattr(model.model.decoder, "bbox_embed"):
            for copy, original in zip(model.model.decoder.bbox_embed, model.bbox_embed):
                copy.load_state_dict(original.state_dict())
    return model


def _clip(vocab_size: int = 400) -> CLIPTextModelWithProjection:
    torch.manual_seed(1)
    return CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, projection_dim=16, max_position_embeddings=32,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1)
    ).eval()


@pytest.fixture(scope="module", params=list(SOURCES))
def converted(request):
    source = _source(request.param)
    model, report = convert_grounding_dino(source, _clip())
    return source, model, report


def test_every_mapped_tensor_is_equal(converted):
    source, model, report = converted
    source_state, target_state = source.state_dict(), model.state_dict()
    checked = 0
    for target_key, origin in report.filled.items():
        if origin.startswith("special case"):
            continue
        source_key = origin.split(" ")[0]
        if target_key.startswith("model.concept_encoder.text_model."):
            continue  # CLIP tensors: checked in test_text_tower_comes_from_clip
        expected = source_state[source_key]
        if target_key == "model.ref_point_head.layers.0.weight":
            expected = _swap_xy_input_blocks(expected)
        assert torch.equal(target_state[target_key], expected), target_key
        checked += 1
    assert checked > 150
    # The tables explain every tensor: nothing silently missing.
    assert set(report.filled) | set(report.new) == set(target_state)
    assert any("fusion" in k for k in report.new) and all(r for r in report.new.values())


def test_text_tower_comes_from_clip(converted):
    _, model, _ = converted
    clip = _clip()
    for key, value in clip.state_dict().items():
        assert torch.equal(model.model.concept_encoder.text_model.state_dict()[key], value), key


def _image(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    pixel_values = torch.randn(batch, 3, 64, 64)
    pixel_mask = torch.ones(batch, 64, 64, dtype=torch.long)
    pixel_mask[1, :, 40:] = 0  # padding on the second image exercises the masks
    return pixel_values, pixel_mask


def test_backbone_features_identical(converted):
    source, model, _ = converted
    pixel_values, _ = _image()
    with torch.no_grad():
        ours = model.model.image_embedder.backbone(pixel_values).feature_maps
        theirs = source.model.backbone.conv_encoder.model(pixel_values).feature_maps
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _encoder_inputs(model):
    pixel_values, pixel_mask = _image()
    with torch.no_grad():
        tokens, token_mask, pos, shapes, ratios = model.model._embed_image(pixel_values, pixel_mask.bool())
    reference = model.model._encoder_reference_points(shapes, ratios)
    shapes_tensor = torch.tensor(shapes, dtype=torch.long)
    start = torch.cat([shapes_tensor.new_zeros(1), shapes_tensor.prod(1).cumsum(0)[:-1]])
    return tokens, token_mask, pos, shapes, shapes_tensor, start, ratios, reference


def test_encoder_layer_matches_source_deformable_layer(converted):
    source, model, _ = converted
    tokens, token_mask, pos, shapes, shapes_tensor, start, _, reference = _encoder_inputs(model)
    with torch.no_grad():
        # concepts=None: our layer's fusion is skipped, leaving deformable self-attention + FFN (the shared block).
        ours, _ = model.model.encoder_layers[0](tokens, None, pos, reference, token_mask, None, shapes)
        theirs, _ = source.model.encoder.layers[0].deformable_layer(
            tokens, attention_mask=token_mask, position_embeddings=pos, reference_points=reference,
            spatial_shapes=shapes_tensor, spatial_shapes_list=shapes, level_start_index=start,
        )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_index", [0, 1])
def test_decoder_layer_matches_source(converted, layer_index):
    source, model, _ = converted
    memory, memory_mask, _, shapes, shapes_tensor, start, ratios, _ = _encoder_inputs(model)
    torch.manual_seed(3)
    batch, queries, d_model = memory.shape[0], 16, model.config.d_model
    hidden = torch.randn(batch, queries, d_model)
    boxes = torch.rand(batch, queries, 4) * 0.5 + 0.25
    ref_input = boxes[:, :, None] * torch.cat([ratios, ratios], -1)[:, None]
    concepts = torch.randn(batch, 5, d_model)
    concept_mask = torch.ones(batch, 5, dtype=torch.bool)
    concept_mask[0, 3:] = False
    bias = torch.zeros(batch, 1, 1, 5).masked_fill(~concept_mask[:, None, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        query_pos = model.model.ref_point_head(box_sine_embedding(ref_input[:, :, 0], d_model // 2))
        source_pos = source.model.decoder.reference_points_head(
            encode_sinusoidal_position_embedding(ref_input[:, :, 0], num_pos_feats=d_model // 2)
        )
        ours = model.model.decoder_layers[layer_index](
            hidden, query_pos, ref_input, memory, memory_mask, shapes, concepts, bias, None
        )
        theirs = source.model.decoder.layers[layer_index](
            hidden, position_embeddings=query_pos, reference_points=ref_input, spatial_shapes=shapes_tensor,
            spatial_shapes_list=shapes, level_start_index=start, vision_encoder_hidden_states=memory,
            vision_encoder_attention_mask=memory_mask, text_encoder_hidden_states=concepts,
            text_encoder_attention_mask=bias, self_attn_mask=None,
        )[0]
        ours_box = model.model.box_heads[layer_index](ours)
        theirs_box = source.bbox_embed[layer_index](theirs)
    # The reference-point head computes the same function despite the (y, x) / (x, y) embedding orders.
    torch.testing.assert_close(query_pos, source_pos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_box, theirs_box, rtol=1e-5, atol=1e-5)


def test_alignment_head_starts_as_source_dot_product(converted):
    source, model, _ = converted
    torch.manual_seed(4)
    queries, concepts = torch.randn(2, 6, 32), torch.randn(2, 3, 32)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with torch.no_grad():
        ours = model.model.alignment_head(queries, concepts, mask)
        theirs = source.class_embed[0](queries, concepts, mask)[..., :3]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_converted_model_runs_and_trains_a_step(converted, clip_tokenizer):
    _, model, _ = converted
    model = model.train()
    pixel_values, pixel_mask = _image()
    texts = [["cat", "bus", "tree"], ["dog", "car", "house"]]
    encoded = [clip_tokenizer(t, padding="max_length", max_length=8, truncation=True, return_tensors="pt") for t in texts]
    input_ids = torch.stack([e["input_ids"] for e in encoded])
    attention_mask = torch.stack([e["attention_mask"] for e in encoded])
    labels = [
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]]), "class_labels": torch.tensor([0])},
        {"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.7, 0.1, 0.1]]), "class_labels": torch.tensor([1, 2])},
    ]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    out = model(pixel_values, pixel_mask=pixel_mask, input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    optimizer.step()
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert any(k.startswith("model.decoder_layers") for k in changed)
    assert any(k.startswith("model.encoder_layers.0.fusion") for k in changed)
    model.eval()
    with torch.no_grad():
        out = model(pixel_values, pixel_mask=pixel_mask, input_ids=input_ids, attention_mask=attention_mask)
    assert out.logits.shape == (2, 16, 3) and torch.isfinite(out.pred_boxes).all()


def test_target_config_follows_source():
    source = _source("grounding-dino")
    config = target_config_from_source(source.config, _clip().config, fusion="image_only")
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.num_queries) == (32, 1, 2, 16)
    assert config.backbone_config.embed_dim == 8 and config.fusion == "image_only"


def test_unexpected_source_key_fails_loudly():
    source = _source("grounding-dino")
    source.register_buffer("mystery_tensor", torch.zeros(3, 5))
    with pytest.raises(ConversionError, match=r"mystery_tensor \(3, 5\)"):
        convert_grounding_dino(source, _clip())


def test_shape_mismatch_names_key_and_shapes():
    source = _source("grounding-dino")
    source.model.level_embed = torch.nn.Parameter(torch.zeros(4, 31))
    with pytest.raises(ConversionError, match=r"model\.level_embed.*\(4, 32\).*\(4, 31\)"):
        convert_grounding_dino(source, _clip())


def test_unsupported_checkpoint_type_is_refused():
    clip = _clip()
    with pytest.raises(ConversionError, match="unsupported source checkpoint type 'clip_text_model'"):
        convert_grounding_dino(clip, clip)


def test_clip_weights_must_match_clip_config():
    clip = CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=400, hidden_size=24, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, projection_dim=16, max_position_embeddings=32,
                       bos_token_id=0, eos_token_id=1, pad_token_id=1)
    )
    model, _ = convert_grounding_dino(_source("grounding-dino"), clip)  # the target follows the CLIP config
    assert model.config.text_config.hidden_size == 24
    # Weights that do not fit the declared CLIP config: the first offending key is named with both shapes.
    with pytest.raises(ConversionError, match=r"token_embedding\.weight.*\(400, 16\).*\(400, 24\)"):
        convert_grounding_dino(_source("grounding-dino"), clip.state_dict(), clip_config=_clip().config)


def test_convert_checkpoint_writes_complete_folder(tmp_path, clip_tokenizer):
    source_dir, clip_dir, out_dir = tmp_path / "gdino", tmp_path / "clip", tmp_path / "out"
    source = _source("mm-grounding-dino")
    source.save_pretrained(source_dir)
    _clip(len(clip_tokenizer)).save_pretrained(clip_dir)
    clip_tokenizer.save_pretrained(clip_dir)
    report = convert_checkpoint(str(source_dir), clip_dir, out_dir, image_processor_kwargs={"size": {"height": 64, "width": 64}})
    assert report.filled and check_checkpoint_folder(out_dir) == []
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    reloaded = AutoModelForZeroShotObjectDetection.from_pretrained(out_dir).eval()
    assert torch.equal(reloaded.model.decoder_layers[1].ffn.fc1.weight, source.model.decoder.layers[1].fc1.weight)
    processor = AutoProcessor.from_pretrained(out_dir)
    assert processor.max_concept_tokens == reloaded.config.max_concept_tokens


def test_missing_source_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert_checkpoint(str(tmp_path / "empty"), tmp_path, tmp_path / "out")
