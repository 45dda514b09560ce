"""Key maps for the parts of a DetCLIPv3 detector that come from plain checkpoints: the CLIP text tower and a Swin
backbone.

Used by `convert_grounding_dino_to_detclipv3.py`, and on its own to put CLIP text weights (and optionally a Swin
backbone) into an existing DetCLIPv3 checkpoint folder:

    python convert/convert_clip_text.py --checkpoint path/to/detclipv3 --clip openai/clip-vit-base-patch32 \
        --output path/to/out [--swin microsoft/swin-tiny-patch4-window7-224]

Accepted CLIP sources: `CLIPTextModelWithProjection`, `CLIPModel` (its vision half is ignored). Accepted Swin sources:
`SwinModel`, `SwinForImageClassification` (head ignored) or `SwinBackbone` weights.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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
    "BACKBONE_PREFIX",
    "CLIP_IGNORE",
    "CLIP_RULES",
    "SWIN_IGNORE",
    "SWIN_NEW",
    "SWIN_RULES",
    "TEXT_PREFIX",
    "check_clip_text_config",
    "clip_text_state",
    "convert_clip_text",
    "convert_swin_backbone",
    "swin_backbone_state",
]

TEXT_PREFIX = "model.concept_encoder.text_model."
BACKBONE_PREFIX = "model.image_embedder.backbone."

# CLIPTextModelWithProjection keeps `text_model.*` + `text_projection.weight`; CLIPModel adds the vision half.
CLIP_RULES = [
    MapRule(r"text_model\.(.+)", TEXT_PREFIX + r"text_model.\1"),
    MapRule(r"text_projection\.weight", TEXT_PREFIX + "text_projection.weight"),
]
CLIP_IGNORE = [
    IgnoreRule(r"vision_model\..+", "CLIP vision tower: DetCLIPv3 sees images through its own backbone"),
    IgnoreRule(r"visual_projection\.weight", "CLIP vision projection: not used"),
    IgnoreRule(r"logit_scale", "CLIP image-text temperature: the alignment head has its own scale"),
    IgnoreRule(r"text_model\.embeddings\.position_ids", "buffer recomputed at load"),
]

# transformers' SwinBackbone wraps a SwinModel as `.swin` and adds one LayerNorm per returned stage.
SWIN_RULES = [
    MapRule(r"(?:swin\.)?((?:embeddings|encoder|layernorm)\..+)", BACKBONE_PREFIX + r"swin.\1"),
    MapRule(r"(hidden_states_norms\..+)", BACKBONE_PREFIX + r"\1"),
]
SWIN_IGNORE = [
    IgnoreRule(r"classifier\..+", "ImageNet classification head"),
    IgnoreRule(r".*relative_position_index", "buffer recomputed at load"),
]
SWIN_NEW = [
    NewRule(
        re.escape(BACKBONE_PREFIX) + r"hidden_states_norms\..+",
        "per-stage output norms exist only in SwinBackbone, not in a SwinModel / classification checkpoint",
    )
]


def _state_dict(source: torch.nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike, loader) -> dict:
    if isinstance(source, torch.nn.Module):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, str | os.PathLike):
        return dict(loader(str(source)).state_dict())
    raise TypeError(f"expected a model, a state dict or a checkpoint path/id, got {type(source).__name__}")


def clip_text_state(source) -> dict[str, torch.Tensor]:
    """State dict of a CLIP checkpoint (model, state dict, folder or Hub id of a CLIP text or full CLIP model)."""

    def load(path: str):
        from transformers import AutoConfig, CLIPModel, CLIPTextModelWithProjection

        config = AutoConfig.from_pretrained(path)
        if config.model_type == "clip":
            return CLIPModel.from_pretrained(path)
        if config.model_type == "clip_text_model":
            return CLIPTextModelWithProjection.from_pretrained(path)
        raise ConversionError(f"{path} is a {config.model_type!r} checkpoint, expected a CLIP model (clip).")

    return _state_dict(source, load)


def swin_backbone_state(source) -> dict[str, torch.Tensor]:
    """State dict of a Swin checkpoint (SwinModel, SwinForImageClassification or SwinBackbone)."""

    def load(path: str):
        from transformers import AutoConfig, SwinModel

        config = AutoConfig.from_pretrained(path)
        if config.model_type != "swin":
            raise ConversionError(f"{path} is a {config.model_type!r} checkpoint, expected a Swin model (swin).")
        return SwinModel.from_pretrained(path)

    return _state_dict(source, load)


def check_clip_text_config(text_config, clip_config) -> None:
    """Raises `ConversionError` naming the field when the target's text tower differs from the CLIP checkpoint."""
    clip_config = getattr(clip_config, "text_config", clip_config)
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        a, b = getattr(text_config, name), getattr(clip_config, name)
        if a != b:
            raise ConversionError(f"text_config.{name} is {a} in the target but {b} in the CLIP checkpoint.")


def convert_clip_text(target: torch.nn.Module, clip_state: Mapping[str, torch.Tensor]) -> ConversionReport:
    """Fills `model.concept_encoder.text_model.*` of a DetCLIPv3 model from a CLIP state dict (in place).

    Only the text-tower keys are checked for completeness; the rest of the target is left alone.
    """
    mapped, origin, ignored = apply_key_map(clip_state, CLIP_RULES, CLIP_IGNORE, source_name="CLIP")
    report = _load_subset(target, mapped, origin, TEXT_PREFIX, [])
    report.ignored.update(ignored)
    return report


def convert_swin_backbone(target: torch.nn.Module, swin_state: Mapping[str, torch.Tensor]) -> ConversionReport:
    """Fills `model.image_embedder.backbone.*` of a DetCLIPv3 model from a Swin state dict (in place)."""
    mapped, origin, ignored = apply_key_map(swin_state, SWIN_RULES, SWIN_IGNORE, source_name="Swin")
    report = _load_subset(target, mapped, origin, BACKBONE_PREFIX, SWIN_NEW)
    report.ignored.update(ignored)
    return report


class _Subset(torch.nn.Module):
    """Exposes only the keys under `prefix` of a model's state dict (shares storage), for completeness checks."""

    def __init__(self, model: torch.nn.Module, prefix: str):
        super().__init__()
        self._full = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}

    def state_dict(self, *args, **kwargs):  # noqa: D102 - same contract as nn.Module.state_dict
        return self._full


def _load_subset(target, mapped, origin, prefix, new_rules) -> ConversionReport:
    return load_converted_state_dict(_Subset(target, prefix), mapped, origin, new_rules)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="DetCLIPv3 checkpoint folder or Hub id to update")
    parser.add_argument("--clip", help="CLIP checkpoint folder or Hub id for the text tower")
    parser.add_argument("--swin", help="Swin checkpoint folder or Hub id for the backbone")
    parser.add_argument("--output", required=True, help="output folder (save_pretrained)")
    args = parser.parse_args(argv)
    if not args.clip and not args.swin:
        parser.error("give --clip and/or --swin")
    from transformers import AutoProcessor

    import detclipv3_hf

    model = detclipv3_hf.DetClipV3ForObjectDetection.from_pretrained(args.checkpoint)
    report = ConversionReport()
    if args.clip:
        from transformers import AutoConfig

        check_clip_text_config(model.config.text_config, AutoConfig.from_pretrained(args.clip))
        report.merge(convert_clip_text(model, clip_text_state(args.clip)))
    if args.swin:
        report.merge(convert_swin_backbone(model, swin_backbone_state(args.swin)))
    print(report.format())
    model.save_pretrained(args.output)
    AutoProcessor.from_pretrained(args.checkpoint).save_pretrained(args.output)


if __name__ == "__main__":
    main()
