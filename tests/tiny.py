"""Tiny models, tokenizers and images for the test-suite (built in code, never downloaded)."""

from __future__ import annotations

from transformers import CLIPTokenizer

from detclipv3_hf import DetClipV3Config
from detclipv3_hf.data import train_clip_tokenizer

CORPUS = [
    "a photo of a red circle",
    "large striped red circle|circle|round shape",
    "small dotted blue square|square|polygon",
    "green triangle|triangle|polygon",
    "yellow star|star|polygon",
    "purple ellipse|ellipse|round shape",
    "orange hexagon|hexagon|polygon",
    "cat dog bus car person vehicle animal tree house bird",
    "a cat sitting on a red bus next to a person",
    "double-decker bus|bus|vehicle",
]


def build_clip_tokenizer(
    extra_text: list[str] | tuple[str, ...] = (), vocab_size: int = 400
) -> CLIPTokenizer:
    """The package's offline CLIP-style tokenizer (deterministic) trained on ``CORPUS`` plus ``extra_text``."""
    return train_clip_tokenizer([*CORPUS, *extra_text], vocab_size=vocab_size)


def tiny_config(
    tokenizer: CLIPTokenizer | None = None, backbone: str = "resnet", **overrides
) -> DetClipV3Config:
    """A DetCLIPv3 config small enough for CPU unit tests (d_model 32, 1-2 layers, 16 queries)."""
    tokenizer = tokenizer if tokenizer is not None else build_clip_tokenizer()
    if backbone == "resnet":
        backbone_config = {
            "model_type": "resnet",
            "embedding_size": 8,
            "hidden_sizes": [8, 16, 24, 32],
            "depths": [1, 1, 1, 1],
            "layer_type": "basic",
            "out_features": ["stage2", "stage3", "stage4"],
        }
    elif backbone == "swin":
        backbone_config = {
            "model_type": "swin",
            "embed_dim": 8,
            "depths": [1, 1, 1, 1],
            "num_heads": [1, 1, 2, 2],
            "window_size": 2,
            "image_size": 64,
            "out_indices": [2, 3, 4],
        }
    else:
        raise ValueError(backbone)
    vocab = len(tokenizer)
    kwargs = dict(
        backbone_config=backbone_config,
        text_config={
            "vocab_size": vocab,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "projection_dim": 16,
            "max_position_embeddings": 32,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        captioner_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "num_image_queries": 2,
            "max_label_length": 16,
            "max_caption_length": 16,
            "n_points": 2,
            "max_position_embeddings": 32,
        },
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=16,
        max_concept_tokens=8,
        norm_groups=8,
        num_denoising=8,
        fusion_drop_path=0.0,
    )
    kwargs.update(overrides)
    return DetClipV3Config(**kwargs)
