"""Export of the DetCLIPv3 detector with a fixed vocabulary for deployment (ONNX, `torch.export`).

The text tower is not exported: the vocabulary's concept embeddings are computed once (`compute_concept_embeddings`)
and baked into the exported graph as a constant buffer. The exported graph takes images and returns, per query,
alignment logits against every vocabulary concept, boxes and objectness:

    pixel_values (B, 3, H, W) float, pixel_mask (B, H, W) int64 (1 = real pixel)
      -> logits (B, Q, M), pred_boxes (B, Q, 4) cxcywh normalised to the un-padded image, objectness_logits (B, Q)

With `dynamic=True` (the default) batch, height and width are all dynamic: the model keeps every feature-map size
symbolic (no tensors are built from sizes), so one exported file serves any image size and batch. The legacy
TorchScript exporter (`dynamo=False`) supports a dynamic batch only.

The wrapper runs the trunk's named steps (`_embed_image`, `_encode`, `_select_queries`, `_decode`, `_predict`) rather
than `DetClipV3Model.forward`, because the forward's input checks (`torch.isfinite(...).all()`, lists of empty images
via `.tolist()`) are data-dependent Python branches that graph capture cannot keep; the wrapper checks its inputs'
shapes itself, and `tests/test_export.py` pins that it reproduces the forward exactly.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "DetClipV3FixedVocabularyDetector",
    "add_export_arguments",
    "compute_concept_embeddings",
    "export_onnx",
    "export_program",
    "run_export",
    "write_vocabulary",
]

ONNX_INPUT_NAMES = ["pixel_values", "pixel_mask"]
ONNX_OUTPUT_NAMES = ["logits", "pred_boxes", "objectness_logits"]


def compute_concept_embeddings(model: nn.Module, processor: Any, vocabulary: Sequence[str]) -> torch.Tensor:
    """Encodes a vocabulary with the model's text tower: `(M, D)` float, one row per concept, in order.

    Raises:
        ValueError: an empty vocabulary, a duplicate or empty concept.
    """
    if isinstance(vocabulary, str) or not isinstance(vocabulary, Sequence):
        raise TypeError(f"vocabulary must be a list of strings, got {type(vocabulary).__name__}")
    vocabulary = list(vocabulary)
    if not vocabulary:
        raise ValueError("vocabulary is empty: give at least one concept")
    bad = [c for c in vocabulary if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"vocabulary holds empty or non-string concepts: {bad!r}")
    duplicates = sorted({c for c in vocabulary if vocabulary.count(c) > 1})
    if duplicates:
        raise ValueError(f"vocabulary holds duplicates: {duplicates}")
    encoded = processor.encode_concepts([vocabulary])
    with torch.no_grad():
        embeds = model.embed_concepts(
            encoded["input_ids"], encoded["attention_mask"], encoded["concept_mask"]
        )
    return embeds[0].detach().float()


class DetClipV3FixedVocabularyDetector(nn.Module):
    """A `DetClipV3ForObjectDetection` with its vocabulary frozen in: images in, logits / boxes / objectness out.

    Args:
        model: The detector (`DetClipV3ForObjectDetection`); it is put in eval mode.
        concept_embeds: `(M, D)` embeddings of the vocabulary (`compute_concept_embeddings`), kept as a buffer.
    """

    def __init__(self, model: nn.Module, concept_embeds: torch.Tensor):
        super().__init__()
        trunk = getattr(model, "model", None)
        if trunk is None or not hasattr(trunk, "_embed_image"):
            raise TypeError(f"model must be a DetClipV3ForObjectDetection, got {type(model).__name__}")
        d_model = trunk.config.d_model
        if (
            not isinstance(concept_embeds, torch.Tensor)
            or concept_embeds.ndim != 2
            or concept_embeds.shape[1] != d_model
        ):
            shape = (
                tuple(concept_embeds.shape)
                if isinstance(concept_embeds, torch.Tensor)
                else type(concept_embeds)
            )
            raise ValueError(f"concept_embeds must be (num_concepts, {d_model}), got {shape}")
        self.trunk = trunk.eval()
        self.register_buffer("concept_embeds", concept_embeds.detach().clone().to(trunk.dtype))

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`pixel_values` (B, 3, H, W), `pixel_mask` (B, H, W) -> logits (B, Q, M), boxes (B, Q, 4), objectness (B, Q)."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be (batch, 3, height, width), got {tuple(pixel_values.shape)}"
            )
        if pixel_mask is None:
            pixel_mask = torch.ones_like(pixel_values[:, 0], dtype=torch.bool)
        pixel_mask = pixel_mask.to(torch.bool)
        trunk = self.trunk
        batch = pixel_values.shape[0]
        concepts = self.concept_embeds[None].expand(batch, -1, -1)
        concept_mask = torch.ones(concepts.shape[:2], dtype=torch.bool, device=concepts.device)
        tokens, token_mask, pos, spatial_shapes, valid_ratios = trunk._embed_image(pixel_values, pixel_mask)
        memory, concepts = trunk._encode(
            tokens, token_mask, pos, spatial_shapes, valid_ratios, concepts, concept_mask
        )
        selection = trunk._select_queries(
            memory, token_mask, spatial_shapes, valid_ratios, concepts, concept_mask
        )
        reference_boxes = selection["reference_boxes"]
        content = trunk.query_embed.weight[None, : reference_boxes.shape[1]].expand(batch, -1, -1)
        hidden, boxes = trunk._decode(
            content,
            reference_boxes,
            memory,
            token_mask,
            spatial_shapes,
            valid_ratios,
            concepts,
            concept_mask,
            None,
        )
        logits, objectness = trunk._predict(hidden[-1:], concepts, concept_mask)
        return logits[-1], boxes[-1], objectness[-1]


def _example_inputs(
    batch: int, height: int, width: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch, 3, height, width, generator=generator).to(dtype)
    return pixel_values, torch.ones(batch, height, width, dtype=torch.long)


MIN_DYNAMIC_SIZE = 96
# A dynamic export is traced on an example of at least this size (its coarsest level then has 2 x 2 cells).
DYNAMIC_EXAMPLE_SIZE = 128


def _example_size(image_size: tuple[int, int], dynamic: bool) -> tuple[int, int]:
    if not dynamic:
        return image_size
    return max(image_size[0], DYNAMIC_EXAMPLE_SIZE), max(image_size[1], DYNAMIC_EXAMPLE_SIZE)


def _dynamic_shapes(dynamic: bool) -> dict[str, dict[int, Any]] | None:
    """Dynamic batch (1..64), height and width (96..4096 px).

    The minimum keeps every feature level (down to stride 64) at least 2 cells wide: PyTorch specialises size-1
    dimensions, so a level of size 1 would be a different graph."""
    if not dynamic:
        return None
    batch = torch.export.Dim("batch", min=1, max=64)
    height = torch.export.Dim("height", min=MIN_DYNAMIC_SIZE, max=4096)
    width = torch.export.Dim("width", min=MIN_DYNAMIC_SIZE, max=4096)
    return {"pixel_values": {0: batch, 2: height, 3: width}, "pixel_mask": {0: batch, 1: height, 2: width}}


def export_program(
    detector: DetClipV3FixedVocabularyDetector,
    image_size: tuple[int, int] = (64, 64),
    batch_size: int = 2,
    dynamic: bool = True,
) -> torch.export.ExportedProgram:
    """`torch.export` of the fixed-vocabulary detector.

    Args:
        detector: The wrapper to export.
        image_size: (height, width) of the example input (any size with `dynamic=True`).
        batch_size: Batch of the example input.
        dynamic: Export batch (1..64), height and width (MIN_DYNAMIC_SIZE..4096, i.e. 96..4096) as dynamic dimensions.
    """
    inputs = _example_inputs(batch_size, *_example_size(image_size, dynamic), detector.concept_embeds.dtype)
    with torch.no_grad():
        return torch.export.export(
            detector.eval(), inputs, dynamic_shapes=_dynamic_shapes(dynamic), strict=False
        )


def export_onnx(
    detector: DetClipV3FixedVocabularyDetector,
    path: str | os.PathLike,
    image_size: tuple[int, int] = (64, 64),
    batch_size: int = 1,
    dynamic: bool = True,
    opset_version: int = 17,
    dynamo: bool = True,
) -> Path:
    """Writes an ONNX file of the fixed-vocabulary detector; returns the path.

    Inputs `pixel_values` (B, 3, H, W) float32 and `pixel_mask` (B, H, W) int64; outputs `logits`, `pred_boxes`,
    `objectness_logits`. With `dynamic`, batch, H and W are dynamic (with `dynamo=False`: the batch only).

    Args:
        dynamo: Use the `torch.export`-based exporter (default) instead of the legacy TorchScript tracer. The tracer is
            an order of magnitude faster but its graph of this model drifts from eager PyTorch (logits off by ~5e-2
            with torch 2.14 / onnxruntime 1.32), while the `torch.export` graph matches to ~1e-6.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = _example_inputs(
        batch_size, *_example_size(image_size, dynamic and dynamo), detector.concept_embeds.dtype
    )
    detector = detector.eval()
    with torch.no_grad():
        if dynamo:
            program = torch.onnx.export(
                detector,
                inputs,
                dynamo=True,
                input_names=ONNX_INPUT_NAMES,
                output_names=ONNX_OUTPUT_NAMES,
                dynamic_shapes=_dynamic_shapes(dynamic),
                opset_version=opset_version,
            )
            program.save(str(path))
        else:
            axes = {name: {0: "batch"} for name in ONNX_INPUT_NAMES + ONNX_OUTPUT_NAMES} if dynamic else None
            torch.onnx.export(
                detector,
                inputs,
                str(path),
                dynamo=False,
                input_names=ONNX_INPUT_NAMES,
                output_names=ONNX_OUTPUT_NAMES,
                dynamic_axes=axes,
                opset_version=opset_version,
            )
    return path


def write_vocabulary(path: str | os.PathLike, vocabulary: Sequence[str], **extra: Any) -> Path:
    """Writes the vocabulary JSON next to an export: `{"vocabulary": [...], "outputs": {...}, **extra}`.

    Column m of the exported `logits` belongs to `vocabulary[m]`.
    """
    path = Path(path)
    record = {
        "vocabulary": list(vocabulary),
        "inputs": {
            "pixel_values": "(batch, 3, height, width) float32, normalised",
            "pixel_mask": "(batch, height, width) int64",
        },
        "outputs": {
            "logits": "(batch, queries, len(vocabulary)) alignment logits; sigmoid gives scores",
            "pred_boxes": "(batch, queries, 4) cxcywh normalised to the un-padded image",
            "objectness_logits": "(batch, queries)",
        },
        **extra,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `detclipv3 export <checkpoint> <output> --vocabulary a b c | --vocabulary-file f.txt`."""
    parser.add_argument("checkpoint", help="DetCLIPv3 checkpoint folder or Hub id")
    parser.add_argument("output", help="output file (.onnx or .pt2 for torch.export)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--vocabulary", nargs="+", help="concept names")
    group.add_argument("--vocabulary-file", help="text file, one concept per line")
    parser.add_argument(
        "--format", choices=["onnx", "torch"], default=None, help="default: from the file suffix"
    )
    parser.add_argument("--image-size", type=int, nargs=2, default=[800, 800], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--static", action="store_true", help="export a fixed batch size too")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--opset", type=int, default=17)
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Loads the checkpoint, bakes the vocabulary in, writes the export and `<output>.vocabulary.json`."""
    from transformers import AutoProcessor

    from .modeling_detclipv3 import DetClipV3ForObjectDetection

    if args.vocabulary_file:
        vocabulary = [
            line.strip() for line in Path(args.vocabulary_file).read_text().splitlines() if line.strip()
        ]
    else:
        vocabulary = list(args.vocabulary)
    output = Path(args.output)
    fmt = args.format or ("torch" if output.suffix in (".pt2", ".pt") else "onnx")
    model = DetClipV3ForObjectDetection.from_pretrained(args.checkpoint).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    detector = DetClipV3FixedVocabularyDetector(
        model, compute_concept_embeddings(model, processor, vocabulary)
    )
    size = tuple(args.image_size)
    if fmt == "onnx":
        export_onnx(
            detector, output, size, args.batch_size, dynamic=not args.static, opset_version=args.opset
        )
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(
            export_program(detector, size, args.batch_size, dynamic=not args.static), str(output)
        )
    vocab_path = write_vocabulary(
        output.with_suffix(".vocabulary.json"),
        vocabulary,
        checkpoint=str(args.checkpoint),
        format=fmt,
        dynamic=not args.static,
        example_image_size=list(size),
    )
    print(f"wrote {output} and {vocab_path}")
    return 0
