"""The main job of the README (`make demo`): run the bundled demo model on its sample images.

For every image of ``<model>/samples/`` (default: the bundled ``demo_model/``, a tiny DetCLIPv3 trained on the
package's synthetic shape world by ``benchmarks/bench_learnability.py``; see ``demo_model/README.md``):

1. **vocabulary mode**: detects the world's 13 category names (or ``--concepts``), whose embeddings are computed
   once and reused for every image;
2. **vocabulary-free mode**: finds objects and names each one ``phrase|category|parent category`` with the
   captioner (``generate_object_labels``);

and writes to ``--output``: ``<image>_detect.png`` / ``<image>_caption.png`` (boxes, labels and scores drawn) and one
``results.json`` with both modes' detections next to the ground truth of the samples (when
``samples/ground_truth.json`` exists). Boxes are ``[x0, y0, x1, y1]`` in image pixels. CPU, a few seconds.

The same on any image and model folder: ``detclipv3 detect`` / ``detclipv3 caption``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.ops import box_convert

from detclipv3_hf import DetClipV3ForObjectCaptioning, DetClipV3Processor
from detclipv3_hf.cli import draw_detections
from detclipv3_hf.data.synthetic import CATEGORIES
from detclipv3_hf.export import compute_concept_embeddings

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_samples(model_dir: Path, images: list[str] | None) -> tuple[list[Path], dict[str, Any]]:
    """The images to run on (``images`` or every PNG of ``<model_dir>/samples``) and their ground truth by file name.

    Raises:
        ValueError: when there is no image to run on.
    """
    truth: dict[str, Any] = {}
    truth_file = model_dir / "samples" / "ground_truth.json"
    if truth_file.is_file():
        truth = {entry["file"]: entry for entry in json.loads(truth_file.read_text())}
    paths = [Path(p) for p in images] if images else sorted((model_dir / "samples").glob("*.png"))
    if not paths:
        raise ValueError(f"no images given and no PNG under {model_dir / 'samples'}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"image files not found: {missing}")
    return paths, truth


@torch.no_grad()
def detect(
    model: DetClipV3ForObjectCaptioning,
    processor: DetClipV3Processor,
    inputs: dict[str, torch.Tensor],
    size: tuple[int, int],
    concepts: list[str],
    concept_embeds: torch.Tensor,
    threshold: float,
) -> list[dict[str, Any]]:
    """Vocabulary mode on one preprocessed image of ``size`` (height, width) with precomputed concept embeddings
    ``(M, D)``; detections sorted by score."""
    outputs = model.model(inputs["pixel_values"], inputs["pixel_mask"], concept_embeds=concept_embeds)
    result = processor.post_process_grounded_object_detection(
        outputs, threshold=threshold, target_sizes=[size], text_labels=[concepts]
    )[0]
    return [
        {"score": round(float(s), 4), "label": label, "box": [round(float(v), 1) for v in box]}
        for s, label, box in zip(result["scores"], result["text_labels"], result["boxes"])
    ]


@torch.no_grad()
def caption(
    model: DetClipV3ForObjectCaptioning,
    processor: DetClipV3Processor,
    inputs: dict[str, torch.Tensor],
    size: tuple[int, int],
    threshold: float,
    top_k: int,
) -> list[dict[str, Any]]:
    """Vocabulary-free mode on one preprocessed image of ``size`` (height, width): ``label`` is the generated
    ``phrase|category|parent category``."""
    generated = model.generate_object_labels(inputs["pixel_values"], inputs["pixel_mask"], top_k=top_k)
    found = processor.post_process_object_captioning(
        generated, threshold=threshold, target_sizes=[size], nms_threshold=0.5
    )[0]
    return [
        {
            "score": round(float(d["score"]), 4),
            "label": d["label"],
            "phrase": d["phrase"],
            "category": d["category"],
            "parent_category": d["parent_category"],
            "box": [round(float(v), 1) for v in d["box"]],
        }
        for d in found
    ]


def ground_truth_boxes(entry: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Ground-truth objects of a sample with ``box`` converted from COCO xywh to xyxy pixels."""
    if entry is None:
        return []
    return [
        {
            "label": f"{o['phrase']}|{o['category']}|{o['parent_category']}",
            "box": box_convert(torch.tensor(o["bbox_xywh"], dtype=torch.float32), "xywh", "xyxy").tolist(),
        }
        for o in entry["objects"]
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO_ROOT / "demo_model"), help="model folder or Hub id")
    parser.add_argument("--output", default="demo_output", help="folder for annotated PNGs and results.json")
    parser.add_argument("--images", nargs="*", help="images (default: the model's samples/)")
    parser.add_argument("--concepts", default=",".join(CATEGORIES), help="comma-separated vocabulary")
    parser.add_argument("--threshold", type=float, default=0.15, help="vocabulary-mode score threshold")
    parser.add_argument(
        "--caption-threshold", type=float, default=0.05, help="vocabulary-free score threshold"
    )
    parser.add_argument("--top-k", type=int, default=10, help="objects captioned per image")
    # The default thresholds are low because the bundled model is tiny and trained for minutes (demo_model/README.md):
    # many of its right answers score 0.2-0.5 (detection) and 0.05-0.4 (captioning, objectness x label likelihood).
    args = parser.parse_args(argv)
    concepts = [c.strip() for c in args.concepts.split(",") if c.strip()]
    if not concepts:
        raise SystemExit("demo: --concepts needs at least one name")

    start = time.perf_counter()
    model_dir = Path(args.model)
    paths, truth = load_samples(model_dir, args.images)
    model = DetClipV3ForObjectCaptioning.from_pretrained(args.model).eval()
    processor = DetClipV3Processor.from_pretrained(args.model)
    with torch.no_grad():  # the vocabulary is encoded once and reused for every image
        concept_embeds = compute_concept_embeddings(model.model, processor, concepts)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        inputs, size = processor(images=[image], return_tensors="pt"), (image.height, image.width)
        detected = detect(model, processor, inputs, size, concepts, concept_embeds, args.threshold)
        captioned = caption(model, processor, inputs, size, args.caption_threshold, args.top_k)
        draw_detections(image, detected, out / f"{path.stem}_detect.png")
        draw_detections(image, captioned, out / f"{path.stem}_caption.png")
        gt = ground_truth_boxes(truth.get(path.name))
        results.append({"image": str(path), "ground_truth": gt, "detect": detected, "caption": captioned})
        print(f"{path.name}")
        print(f"  truth   : {[t['label'] for t in gt]}")
        print(f"  detect  : {[(d['label'], d['score']) for d in detected]}")
        print(f"  caption : {[(d['label'], d['score']) for d in captioned]}")
    record = {"model": str(args.model), "concepts": concepts, "images": results}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"wrote {len(paths)} x 2 annotated PNGs and results.json to {out}/ in {time.perf_counter() - start:.1f}s"
    )
    return record


if __name__ == "__main__":
    main()
