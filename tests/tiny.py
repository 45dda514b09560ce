"""Tiny models, tokenizers and images for the test-suite (built in code, never downloaded)."""

from __future__ import annotations

import json
import string

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from detclipv3_hf import DetClipV3Config

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
    """Trains a CLIP-style byte-level BPE (`</w>` suffix) on a tiny corpus in well under a second.

    Every printable ASCII character is seen as a word on its own, so no input ever maps to the unknown token.
    """
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chars = " ".join(string.ascii_lowercase + string.digits + string.punctuation)
    tok.train_from_iterator([chars] * 5 + (CORPUS + list(extra_text)) * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # `tokenizers` breaks frequency ties in hash order, which changes from process to process: the same corpus gives
    # the same tokens and merges, but different ids and a different order of tied merges, and every test built on
    # this tokenizer would train differently in every run. Canonical order: merges by the length of the token they
    # make (its parts are always shorter, so they come first), ids by (length, token), special tokens last as in CLIP.
    merges.sort(key=lambda pair: (len(pair[0]) + len(pair[1]), pair))
    specials = [token for token in ("<|startoftext|>", "<|endoftext|>") if token in model["vocab"]]
    tokens = sorted((t for t in model["vocab"] if t not in specials), key=lambda t: (len(t), t)) + specials
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=merges)


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
