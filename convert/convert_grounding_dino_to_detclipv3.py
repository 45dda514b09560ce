"""Convert a Grounding DINO / MM-Grounding-DINO / LLMDet checkpoint (transformers format) into a DetCLIPv3 detector.

    python convert/convert_grounding_dino_to_detclipv3.py \
        --source IDEA-Research/grounding-dino-tiny \
        --clip openai/clip-vit-base-patch32 \
        --output ./detclipv3-from-gdino-tiny [--swin microsoft/swin-tiny-patch4-window7-224]

What moves (see `GROUNDING_DINO_RULES`): the image backbone, the input projections and level embeddings, every
encoder layer's multi-scale deformable self-attention and FFN, the proposal head (`enc_output`, its norm and box MLP),
the learned query content, every decoder layer's self-attention, text cross-attention (-> concept cross-attention),
deformable cross-attention and FFN, the decoder norm, the reference-point head and the per-layer box heads.

What does not (see `GROUNDING_DINO_IGNORE` / `DETCLIPV3_NEW`): Grounding DINO reads the prompt as BERT tokens, DetCLIPv3
encodes every concept on its own with CLIP, so the BERT tower, the text projection, the token-level text enhancer and
the token-level fusion layers are dropped, and our concept-level fusion, concept projection and objectness heads start
fresh. The text tower comes from the `--clip` checkpoint.

Special cases, each explicit below: the reference-point head's first layer has its input blocks re-ordered (Grounding
DINO embeds boxes as (y, x, w, h), we as (x, y, w, h)); the alignment head starts as the source's scaled dot product
(identity projections); tied copies (`model.decoder.bbox_embed`) are checked equal to what they copy.

Any unknown source key, shape mismatch or unexplained target key stops the conversion with the key and the shapes.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from convert_clip_text import (  # noqa: E402
    check_clip_text_config,
    clip_text_state,
    convert_clip_text,
    convert_swin_backbone,
    swin_backbone_state,
)
from key_mapping import (  # noqa: E402
    ConversionError,
    ConversionReport,
    IgnoreRule,
    MapRule,
    NewRule,
    apply_key_map,
    load_converted_state_dict,
)

__all__ = [
    "DETCLIPV3_NEW",
    "GROUNDING_DINO_IGNORE",
    "GROUNDING_DINO_RULES",
    "SUPPORTED_MODEL_TYPES",
    "convert_checkpoint",
    "convert_grounding_dino",
    "target_config_from_source",
]

SUPPORTED_MODEL_TYPES = ("grounding-dino", "mm-grounding-dino")

_ENC = r"model\.encoder\.layers\.(\d+)\."
_DEC = r"model\.decoder\.layers\.(\d+)\."
_MHA = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out_proj": "out_proj"}
_DEFORMABLE = r"(sampling_offsets|attention_weights|value_proj|output_proj)"


def _attention_rules(source_block: str, target_block: str) -> list[MapRule]:
    """Grounding DINO's `query/key/value/out_proj` -> our `q_proj/k_proj/v_proj/out_proj` of one attention block."""
    return [
        MapRule(_DEC + rf"{source_block}\.{src}\.(weight|bias)", rf"model.decoder_layers.\1.{target_block}.{dst}.\2")
        for src, dst in _MHA.items()
    ]


GROUNDING_DINO_RULES: list[MapRule] = [
    # Image path.
    MapRule(r"model\.backbone\.conv_encoder\.model\.(.+)", r"model.image_embedder.backbone.\1"),
    MapRule(r"model\.input_proj_vision\.(\d+)\.([01])\.(weight|bias)", r"model.image_embedder.input_proj.\1.\2.\3"),
    MapRule(r"model\.level_embed", "model.level_embed"),
    # Pixel encoder: the deformable layer (self-attention + FFN, post-norm) is the same block as ours.
    MapRule(_ENC + rf"deformable_layer\.self_attn\.{_DEFORMABLE}\.(weight|bias)", r"model.encoder_layers.\1.self_attn.\2.\3"),
    MapRule(_ENC + r"deformable_layer\.self_attn_layer_norm\.(weight|bias)", r"model.encoder_layers.\1.self_attn_norm.\2"),
    MapRule(_ENC + r"deformable_layer\.(fc1|fc2)\.(weight|bias)", r"model.encoder_layers.\1.ffn.\2.\3"),
    MapRule(_ENC + r"deformable_layer\.final_layer_norm\.(weight|bias)", r"model.encoder_layers.\1.ffn_norm.\2"),
    # Two-stage query selection.
    MapRule(r"model\.enc_output\.(weight|bias)", r"model.enc_output.\1"),
    MapRule(r"model\.enc_output_norm\.(weight|bias)", r"model.enc_output_norm.\1"),
    MapRule(r"model\.encoder_output_bbox_embed\.layers\.(\d+)\.(weight|bias)", r"model.enc_box_head.layers.\1.\2"),
    MapRule(r"model\.query_position_embeddings\.weight", "model.query_embed.weight"),
    # Decoder: self-attention, text (-> concept) cross-attention, deformable cross-attention, FFN, all post-norm.
    *_attention_rules("self_attn", "self_attn"),
    MapRule(_DEC + r"self_attn_layer_norm\.(weight|bias)", r"model.decoder_layers.\1.self_attn_norm.\2"),
    *_attention_rules("encoder_attn_text", "concept_attn"),
    MapRule(_DEC + r"encoder_attn_text_layer_norm\.(weight|bias)", r"model.decoder_layers.\1.concept_attn_norm.\2"),
    MapRule(_DEC + rf"encoder_attn\.{_DEFORMABLE}\.(weight|bias)", r"model.decoder_layers.\1.image_attn.\2.\3"),
    MapRule(_DEC + r"encoder_attn_layer_norm\.(weight|bias)", r"model.decoder_layers.\1.image_attn_norm.\2"),
    MapRule(_DEC + r"(fc1|fc2)\.(weight|bias)", r"model.decoder_layers.\1.ffn.\2.\3"),
    MapRule(_DEC + r"final_layer_norm\.(weight|bias)", r"model.decoder_layers.\1.ffn_norm.\2"),
    MapRule(r"model\.decoder\.layer_norm\.(weight|bias)", r"model.decoder_norm.\1"),
    MapRule(r"model\.decoder\.reference_points_head\.layers\.(\d+)\.(weight|bias)", r"model.ref_point_head.layers.\1.\2"),
    # Heads.
    MapRule(r"bbox_embed\.(\d+)\.layers\.(\d+)\.(weight|bias)", r"model.box_heads.\1.layers.\2.\3"),
    MapRule(r"class_embed\.0\.bias", "model.alignment_head.bias"),  # MM-Grounding-DINO's learned logit bias
]

GROUNDING_DINO_IGNORE: list[IgnoreRule] = [
    IgnoreRule(r"model\.text_backbone\..+", "BERT prompt encoder: DetCLIPv3 encodes each concept with CLIP"),
    IgnoreRule(r"model\.text_projection\.(weight|bias)", "projects BERT tokens to d_model; CLIP has its own path"),
    IgnoreRule(_ENC + r"text_enhancer_layer\..+", "token-level text self-attention; concepts are encoded one by one"),
    IgnoreRule(
        _ENC + r"fusion_layer\..+",
        "token-level bi-attention fusion (before the deformable layer); ours fuses concept embeddings after it",
    ),
    IgnoreRule(r"model\.decoder\.bbox_embed\..+", "tied copy of bbox_embed (checked equal)"),
    IgnoreRule(r"model\.decoder\.class_embed\..+", "tied copy of class_embed"),
    IgnoreRule(r"class_embed\.[1-9]\d*\.bias", "one alignment head serves every decoder layer; class_embed.0 is used"),
    IgnoreRule(r"model\.encoder_output_class_embed\.bias", "the proposals share the decoder's alignment head"),
    IgnoreRule(r".*relative_position_index", "buffer recomputed at load"),
]

DETCLIPV3_NEW: list[NewRule] = [
    NewRule(r"model\.concept_encoder\.concept_proj\.weight", "maps CLIP's projection to d_model; no source counterpart"),
    NewRule(
        r"model\.encoder_layers\.\d+\.fusion\..+",
        "concept-level fusion; the source fusion is token-level (BERT tokens) and runs before the deformable layer",
    ),
    NewRule(r"model\.(enc_)?objectness_head\.(weight|bias)", "objectness is DetCLIPv3's own; the source has none"),
    NewRule(r"model\.query_embed\.weight", "the source has no learned query content (embedding_init_target=False)"),
    NewRule(
        r"model\.image_embedder\.backbone\.(swin\.)?layernorm\.(weight|bias)",
        "final Swin norm: not used for the feature maps, absent from released Grounding DINO checkpoints",
    ),
    NewRule(r".*num_batches_tracked", "BatchNorm counter; the source uses frozen batch norm"),
]


# ----------------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------------


def target_config_from_source(source_config: Any, clip_config: Any, **overrides: Any):
    """The DetCLIPv3 config whose detector matches the source's shapes (backbone, widths, depths, points, queries).

    Args:
        source_config: A `GroundingDinoConfig` / `MMGroundingDinoConfig`.
        clip_config: A `CLIPTextConfig` or a `CLIPConfig` (its `text_config` is used).
        **overrides: Further `DetClipV3Config` fields (e.g. `fusion`, `max_concept_tokens`).

    Raises:
        ConversionError: unsupported model type, a one-stage or timm-backbone source, or a non-CLIP text config.
    """
    from detclipv3_hf import DetClipV3Config

    model_type = getattr(source_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"unsupported source checkpoint type {model_type!r}; expected one of {SUPPORTED_MODEL_TYPES}."
        )
    if not getattr(source_config, "two_stage", True):
        raise ConversionError("only two-stage Grounding DINO checkpoints (two_stage=True) can be converted.")
    if source_config.backbone_config is None:
        raise ConversionError("the source uses a timm backbone (no backbone_config); give a transformers backbone.")
    if getattr(source_config, "query_dim", 4) != 4:
        raise ConversionError(f"query_dim must be 4 (box anchors), got {source_config.query_dim}.")
    text_config = getattr(clip_config, "text_config", clip_config)
    if getattr(text_config, "model_type", None) != "clip_text_model":
        raise ConversionError(
            f"the text tower must come from a CLIP checkpoint, got a {getattr(text_config, 'model_type', None)!r} config."
        )
    backbone = source_config.backbone_config.to_dict()
    kwargs: dict[str, Any] = dict(
        backbone_config=backbone,
        text_config=text_config.to_dict(),
        d_model=source_config.d_model,
        num_feature_levels=source_config.num_feature_levels,
        encoder_layers=source_config.encoder_layers,
        decoder_layers=source_config.decoder_layers,
        encoder_attention_heads=source_config.encoder_attention_heads,
        decoder_attention_heads=source_config.decoder_attention_heads,
        encoder_ffn_dim=source_config.encoder_ffn_dim,
        decoder_ffn_dim=source_config.decoder_ffn_dim,
        encoder_n_points=source_config.encoder_n_points,
        decoder_n_points=source_config.decoder_n_points,
        num_queries=source_config.num_queries,
        activation_function=source_config.activation_function,
        layer_norm_eps=source_config.layer_norm_eps,
        norm_groups=32,  # Grounding DINO's input projections use GroupNorm(32, d_model)
        positional_embedding_temperature=source_config.positional_embedding_temperature,
        max_concept_tokens=min(16, text_config.max_position_embeddings),
        decoder_concept_cross_attention=True,
    )
    kwargs.update(overrides)
    return DetClipV3Config(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Special cases
# ----------------------------------------------------------------------------------------------------------------------


def _swap_xy_input_blocks(weight: torch.Tensor) -> torch.Tensor:
    """Re-orders the input columns of the reference-point head's first layer.

    Grounding DINO's `encode_sinusoidal_position_embedding` lays a box out as [emb(y), emb(x), emb(w), emb(h)];
    our `box_sine_embedding` keeps [emb(x), emb(y), emb(w), emb(h)]. Swapping the first two column blocks makes the
    layer compute the same function on the same box.
    """
    block = weight.shape[1] // 4
    y, x, rest = weight[:, :block], weight[:, block : 2 * block], weight[:, 2 * block :]
    return torch.cat([x, y, rest], dim=1)


def _check_tied_copies(source_state: dict[str, torch.Tensor]) -> None:
    """`model.decoder.bbox_embed.*` must equal `bbox_embed.*`: we keep one copy, so a difference would be lost."""
    for key, tensor in source_state.items():
        if key.startswith("model.decoder.bbox_embed."):
            original = key[len("model.decoder.") :]
            if original in source_state and not torch.equal(tensor, source_state[original]):
                raise ConversionError(f"{key} differs from {original}; the source's tied box heads disagree.")


def _alignment_head_special_case(source_config: Any, d_model: int) -> dict[str, tuple[torch.Tensor, str]]:
    """Start the alignment head as the source's contrastive dot product.

    Ours is `<W_q q, W_c c> / sqrt(D) * exp(log_scale) + bias`. With identity projections and zero biases it equals
    MM-Grounding-DINO's `<q, c> / sqrt(D) + bias` (`log_scale` 0, bias from `class_embed.0.bias`), and Grounding
    DINO's unscaled `<q, c>` with `log_scale = log(sqrt(D))`.
    """
    eye = torch.eye(d_model)
    zero = torch.zeros(d_model)
    log_scale = 0.0 if source_config.model_type == "mm-grounding-dino" else 0.5 * math.log(d_model)
    reason = "special case: identity, so the head starts as the source's dot product"
    values = {
        "model.alignment_head.query_proj.weight": (eye, reason),
        "model.alignment_head.concept_proj.weight": (eye.clone(), reason),
        "model.alignment_head.query_proj.bias": (zero, reason),
        "model.alignment_head.concept_proj.bias": (zero.clone(), reason),
        "model.alignment_head.log_scale": (
            torch.tensor(log_scale),
            "special case: matches the source's logit scale",
        ),
    }
    if source_config.model_type == "grounding-dino":
        values["model.alignment_head.bias"] = (torch.tensor(0.0), "special case: the source's logits have no bias")
    return values


# ----------------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------------


def convert_grounding_dino(
    source: torch.nn.Module,
    clip: torch.nn.Module | dict[str, torch.Tensor],
    clip_config: Any | None = None,
    swin: torch.nn.Module | dict[str, torch.Tensor] | None = None,
    **config_overrides: Any,
):
    """Builds a DetCLIPv3 detector from a loaded Grounding DINO model and a CLIP text model.

    Args:
        source: `GroundingDinoForObjectDetection` or `MMGroundingDinoForObjectDetection` (its state dict and config).
        clip: `CLIPTextModelWithProjection` / `CLIPModel`, or its state dict (then give `clip_config`).
        clip_config: The CLIP config when `clip` is a state dict.
        swin: Optional Swin model / state dict whose weights replace the source's backbone.
        **config_overrides: Extra `DetClipV3Config` fields.

    Returns:
        `(model, report)`: a `DetClipV3ForObjectDetection` in eval mode and the `ConversionReport`.

    Raises:
        ConversionError: see `key_mapping`; also for an unsupported source type.
    """
    from detclipv3_hf import DetClipV3ForObjectDetection

    if not isinstance(source, torch.nn.Module) or not hasattr(source, "config"):
        raise TypeError(f"source must be a transformers Grounding DINO model, got {type(source).__name__}.")
    clip_config = clip_config if clip_config is not None else getattr(clip, "config", None)
    if clip_config is None:
        raise TypeError("clip_config is required when clip is a state dict.")
    config = target_config_from_source(source.config, clip_config, **config_overrides)
    target = DetClipV3ForObjectDetection(config).eval()

    source_state = dict(source.state_dict())
    _check_tied_copies(source_state)
    mapped, origin, ignored = apply_key_map(
        source_state, GROUNDING_DINO_RULES, GROUNDING_DINO_IGNORE, source_name=type(source).__name__
    )
    for key, (value, why) in _alignment_head_special_case(source.config, config.d_model).items():
        mapped[key], origin[key] = value, why
    ref_key = "model.ref_point_head.layers.0.weight"
    origin[ref_key] += " (special case: input blocks (y, x) -> (x, y))"
    # Tensors owned by the CLIP / Swin helpers are filled by them; only the rest must be explained here.
    text_or_backbone = r"model\.concept_encoder\.text_model\..+"
    report = load_converted_state_dict(
        target,
        mapped,
        origin,
        [*DETCLIPV3_NEW, NewRule(text_or_backbone, "filled from the CLIP checkpoint below")],
        transforms={ref_key: _swap_xy_input_blocks},
    )
    report.ignored.update(ignored)

    check_clip_text_config(config.text_config, clip_config)
    report.merge(convert_clip_text(target, clip_text_state(clip)))
    if swin is not None:
        swin_report = convert_swin_backbone(target, swin_backbone_state(swin))
        report.merge(swin_report)
    leftover = [k for k, reason in report.new.items() if reason.startswith("filled from the CLIP")]
    if leftover:
        raise ConversionError(f"text tower tensors not filled by the CLIP checkpoint: {leftover[:10]}")
    return target, report


def _load_source(path: str) -> torch.nn.Module:
    from transformers import AutoConfig, GroundingDinoForObjectDetection, MMGroundingDinoForObjectDetection

    if os.path.isdir(path) and not (Path(path) / "config.json").is_file():
        raise ConversionError(f"{path} has no config.json: not a transformers checkpoint folder.")
    config = AutoConfig.from_pretrained(path)
    classes = {
        "grounding-dino": GroundingDinoForObjectDetection,
        "mm-grounding-dino": MMGroundingDinoForObjectDetection,
    }
    if config.model_type not in classes:
        raise ConversionError(
            f"{path} is a {config.model_type!r} checkpoint; expected one of {SUPPORTED_MODEL_TYPES}."
        )
    return classes[config.model_type].from_pretrained(path)


def convert_checkpoint(
    source: str | torch.nn.Module,
    clip: str | os.PathLike,
    output_dir: str | os.PathLike,
    swin: str | torch.nn.Module | None = None,
    image_processor_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> ConversionReport:
    """Converts and writes a complete `save_pretrained` folder: model, processor (CLIP tokenizer from `clip`, our image
    processor) and a model card.

    Args:
        source: Grounding DINO checkpoint folder / Hub id, or a loaded model.
        clip: CLIP checkpoint folder or Hub id (weights and tokenizer).
        output_dir: Where to write.
        swin: Optional Swin checkpoint (folder / id / model) for the backbone.
        image_processor_kwargs: Options of `DetClipV3ImageProcessor` (e.g. `size`).

    Returns:
        The `ConversionReport` (also printed by `main`).
    """
    from transformers import AutoConfig, CLIPTokenizer

    from detclipv3_hf import DetClipV3ImageProcessor, DetClipV3Processor
    from detclipv3_hf.hub import write_model_card

    if not os.path.exists(clip) and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(clip)):
        raise ConversionError(f"CLIP checkpoint {clip!r} is neither a folder nor a Hub id.")
    source_name = source if isinstance(source, str) else getattr(source.config, "_name_or_path", "")
    source_model = _load_source(source) if isinstance(source, str) else source
    clip_config = AutoConfig.from_pretrained(clip)
    clip_state = clip_text_state(str(clip))
    swin_state = swin_backbone_state(swin) if swin is not None else None
    model, report = convert_grounding_dino(
        source_model, clip_state, clip_config=clip_config, swin=swin_state, **config_overrides
    )
    tokenizer = CLIPTokenizer.from_pretrained(clip)
    processor = DetClipV3Processor(
        DetClipV3ImageProcessor(**(image_processor_kwargs or {})),
        tokenizer,
        max_concept_tokens=model.config.max_concept_tokens,
    )
    captioner = model.config.captioner_config
    captioner.vocab_size = len(processor.tokenizer)
    captioner.obj_token_id, captioner.img_token_id = processor.obj_token_id, processor.img_token_id
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    base_models = [str(m) for m in (source_name, clip, swin if isinstance(swin, str) else None) if m]
    write_model_card(
        output_dir,
        base_model=base_models,
        training_info={
            "stage": "converted (not fine-tuned)",
            "notes": f"Detector weights converted from {source_name or 'a Grounding DINO model'} with the "
            f"DetCLIPv3 text tower from {clip}. Newly initialised: "
            + "; ".join(sorted({reason for reason in report.new.values()})),
        },
    )
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="Grounding DINO / MM-Grounding-DINO folder or Hub id")
    parser.add_argument("--clip", required=True, help="CLIP checkpoint folder or Hub id (text tower + tokenizer)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--swin", help="optional Swin checkpoint for the backbone")
    parser.add_argument("--fusion", choices=["bidirectional", "image_only", "none"], default=None)
    args = parser.parse_args(argv)
    overrides = {"fusion": args.fusion} if args.fusion else {}
    try:
        report = convert_checkpoint(args.source, args.clip, args.output, swin=args.swin, **overrides)
    except (ConversionError, OSError) as error:
        raise SystemExit(f"conversion failed: {error}") from error
    print(report.format())
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
