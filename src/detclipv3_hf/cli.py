"""The `detclipv3` command line: detect, caption, train, eval, annotate, card, push, export.

Every sub-command is a thin layer over the Python API; the heavy modules are imported only by the sub-command that
needs them, so `detclipv3 --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("detclipv3")

# Sub-commands implemented in other modules: name -> (module, add-arguments function, run function, help).
EXTERNAL_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "train": ("detclipv3_hf.training.cli", "add_train_arguments", "run_train", "train a stage (1, 2 or 3)"),
    "annotate": (
        "detclipv3_hf.annotation.cli",
        "add_annotate_arguments",
        "run_annotate",
        "auto-annotate image-text pairs into GranuCap-style records",
    ),
    "eval": (
        "detclipv3_hf.evaluation.run",
        "add_eval_arguments",
        "run_eval",
        "COCO AP / LVIS fixed AP (vocabulary mode) or generated-label AP and accuracy (vocabulary-free)",
    ),
    "card": ("detclipv3_hf.hub", "add_card_arguments", "run_card", "write or refresh a checkpoint's model card"),
    "push": ("detclipv3_hf.hub", "add_push_arguments", "run_push", "upload a complete checkpoint to the Hub"),
    "export": ("detclipv3_hf.export", "add_export_arguments", "run_export", "export the detector to ONNX"),
}


def _load_images(paths: Sequence[str]) -> list[Any]:
    from PIL import Image

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"detclipv3: image {path!r} does not exist.")
        images.append(Image.open(path))
    return images


def _load_model(model_id: str, captioning: bool, device: str) -> tuple[Any, Any]:
    from . import DetClipV3ForObjectCaptioning, DetClipV3ForObjectDetection, DetClipV3Processor

    model_class = DetClipV3ForObjectCaptioning if captioning else DetClipV3ForObjectDetection
    model = model_class.from_pretrained(model_id).to(device).eval()
    processor = DetClipV3Processor.from_pretrained(model_id)
    return model, processor


def draw_detections(image: Any, detections: list[dict[str, Any]], path: Path) -> None:
    """Draws boxes (`box` xyxy pixels), labels and scores on a copy of `image` and writes a PNG."""
    from PIL import ImageDraw, ImageOps

    canvas = ImageOps.exif_transpose(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c"]
    for i, det in enumerate(detections):
        color = palette[i % len(palette)]
        x0, y0, x1, y1 = det["box"]
        draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
        draw.text((x0 + 2, max(0, y0 - 11)), f"{det['label']} {det['score']:.2f}", fill=color)
    canvas.save(path)


def run_detect(args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    """Vocabulary mode: boxes for the given concept names, drawn and written as JSON."""
    import torch

    model, processor = _load_model(args.model, captioning=False, device=args.device)
    images = _load_images(args.images)
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    if not concepts:
        raise SystemExit("detclipv3 detect: --concepts needs at least one name (comma separated).")
    inputs = processor(images=images, text=concepts, return_tensors="pt").to(args.device)
    with torch.no_grad():
        outputs = model(**inputs)
    sizes = [(img.height, img.width) for img in images]
    results = processor.post_process_grounded_object_detection(
        outputs, threshold=args.threshold, target_sizes=sizes, text_labels=[concepts] * len(images)
    )
    per_image = []
    for image, path, result in zip(images, args.images, results):
        detections = [
            {"score": float(s), "label": label, "box": [float(v) for v in box]}
            for s, label, box in zip(result["scores"], result["text_labels"], result["boxes"])
        ]
        per_image.append(detections)
        _write_outputs(args.output, path, image, detections, "detect")
    return per_image


def run_caption(args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    """Vocabulary-free mode: finds objects and names each with `phrase|category|parent category`."""
    model, processor = _load_model(args.model, captioning=True, device=args.device)
    images = _load_images(args.images)
    inputs = processor(images=images, return_tensors="pt").to(args.device)
    generated = model.generate_object_labels(
        inputs["pixel_values"], inputs.get("pixel_mask"), top_k=args.top_k, num_beams=args.num_beams
    )
    sizes = [(img.height, img.width) for img in images]
    results = processor.post_process_object_captioning(
        generated, threshold=args.threshold, target_sizes=sizes, nms_threshold=args.nms_threshold
    )
    for image, path, detections in zip(images, args.images, results):
        _write_outputs(args.output, path, image, detections, "caption")
    return results


def _write_outputs(output: str, image_path: str, image: Any, detections: list[dict[str, Any]], kind: str) -> None:
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{Path(image_path).stem}_{kind}"
    draw_detections(image, detections, out_dir / f"{stem}.png")
    (out_dir / f"{stem}.json").write_text(json.dumps(detections, indent=2))
    print(f"{image_path}: {len(detections)} objects -> {out_dir / stem}.png")
    for det in detections[:10]:
        print(f"  {det['score']:.3f}  {det['label']}")


def _add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--output", default="detclipv3_output", help="folder for annotated PNGs and JSON")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detclipv3", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    detect = sub.add_parser("detect", help="detect the given concepts in images")
    _add_inference_arguments(detect)
    detect.add_argument("--concepts", required=True, help="comma-separated concept names")
    detect.set_defaults(func=run_detect)

    caption = sub.add_parser("caption", help="find and name objects without a vocabulary")
    _add_inference_arguments(caption)
    caption.add_argument("--top-k", type=int, default=50)
    caption.add_argument("--num-beams", type=int, default=1)
    caption.add_argument("--nms-threshold", type=float, default=0.5)
    caption.set_defaults(func=run_caption)

    for name, (module, add_name, run_name, help_text) in EXTERNAL_COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text)
        sub_parser.set_defaults(func=_lazy(module, run_name), _add=(module, add_name))
    return parser


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], Any]:
    def run(args: argparse.Namespace) -> Any:
        return getattr(importlib.import_module(module), name)(args)

    return run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # External sub-commands declare their own arguments: add them to the chosen sub-parser before parsing.
    if argv and argv[0] in EXTERNAL_COMMANDS:
        module, add_name, _, _ = EXTERNAL_COMMANDS[argv[0]]
        sub_parser = parser._subparsers._group_actions[0].choices[argv[0]]  # noqa: SLF001 - argparse has no API for it
        getattr(importlib.import_module(module), add_name)(sub_parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        result = args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        # Bad input (a wrong path, an invalid option combination): one clear line, no traceback.
        print(f"detclipv3 {args.command}: error: {error}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
