"""`detclipv3 eval`: run a checkpoint over a COCO-format dataset and compute AP (and naming accuracy).

Vocabulary mode: the dataset's category names are the vocabulary, encoded once (concept cache) and reused for every
image; box AP with pycocotools (`--protocol coco`) or LVIS fixed AP (`--protocol lvis_fixed`).
Vocabulary-free mode (`--vocabulary-free`, needs a captioning checkpoint): generated categories are mapped to the
class names by the model's own text-encoder similarity, then AP, plus exact-match accuracy of generated category and
parent category. Results are written as the JSON schema of `evaluation.coco.save_results`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from .coco import build_results_record, save_results
from .lvis import evaluate_lvis_fixed
from .vocab_free import evaluate_vocab_free

__all__ = ["add_eval_arguments", "predict_dataset", "run_eval", "text_embedder"]


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def text_embedder(model: Any, processor: Any) -> Any:
    """`list[str] -> (N, D)` embeddings from the model's own concept encoder (for vocabulary-free mapping)."""

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        encoded = processor(text=[list(texts)], return_tensors="pt").to(model.device)
        return model.model.embed_concepts(
            encoded["input_ids"], encoded["attention_mask"], encoded["concept_mask"]
        )[0]

    return embed


@torch.no_grad()
def predict_dataset(
    model: Any,
    processor: Any,
    ground_truth: dict[str, Any],
    image_root: str | Path,
    *,
    vocabulary_free: bool = False,
    batch_size: int = 2,
    threshold: float = 0.0,
    top_k: int = 300,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Predictions for every image of a COCO-format `ground_truth`, in the evaluators' input format.

    Vocabulary mode: `image_id`, `boxes` (xyxy pixels), `scores`, `labels` (category ids). Vocabulary-free mode:
    `image_id`, `boxes`, `scores` and, per box, the generated `phrases`, `categories` and `parent_categories`.
    """
    categories = ground_truth["categories"]
    names = list(class_names) if class_names is not None else [c["name"] for c in categories]
    if len(names) != len(categories):
        raise ValueError(f"class_names has {len(names)} entries for {len(categories)} categories.")
    category_ids = torch.tensor([c["id"] for c in categories])
    concept_embeds = None
    if not vocabulary_free:
        vocab = processor(text=[names], return_tensors="pt").to(model.device)
        embed_concepts = getattr(model, "embed_concepts", model.model.embed_concepts)
        concept_embeds = embed_concepts(vocab["input_ids"], vocab["attention_mask"], vocab["concept_mask"])[0]
    predictions = []
    images = ground_truth["images"]
    for batch in tqdm(_batches(images, batch_size), desc="eval", disable=not progress):
        pil = [Image.open(Path(image_root) / info["file_name"]) for info in batch]
        sizes = [(img.height, img.width) for img in pil]
        inputs = processor(images=pil, return_tensors="pt").to(model.device)
        if vocabulary_free:
            generated = model.generate_object_labels(
                inputs["pixel_values"], inputs["pixel_mask"], top_k=top_k
            )
            results = processor.post_process_object_captioning(
                generated, threshold=threshold, target_sizes=sizes
            )
            for info, found in zip(batch, results):
                predictions.append(
                    {
                        "image_id": info["id"],
                        "boxes": torch.tensor([r["box"] for r in found]).reshape(-1, 4),
                        "scores": torch.tensor([r["score"] for r in found]),
                        "phrases": [r["phrase"] for r in found],
                        "categories": [r["category"] for r in found],
                        "parent_categories": [r["parent_category"] for r in found],
                    }
                )
        else:
            outputs = model.model(inputs["pixel_values"], inputs["pixel_mask"], concept_embeds=concept_embeds)
            # Every (query, class) pair competes for the top-k, as in Deformable DETR's / DINO's COCO evaluation.
            results = processor.post_process_grounded_object_detection(
                outputs, threshold=threshold, target_sizes=sizes, top_k=top_k, multi_label=True
            )
            for info, found in zip(batch, results):
                predictions.append(
                    {
                        "image_id": info["id"],
                        "boxes": found["boxes"],
                        "scores": found["scores"],
                        "labels": category_ids[found["labels"].cpu()],
                    }
                )
    return predictions


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub id")
    parser.add_argument("--annotations", required=True, help="COCO-format json (LVIS json works too)")
    parser.add_argument("--images", required=True, help="folder the json's file_name entries are relative to")
    parser.add_argument("--output", required=True, help="results JSON path")
    parser.add_argument("--protocol", choices=["coco", "lvis_fixed"], default="coco")
    parser.add_argument(
        "--vocabulary-free", action="store_true", help="evaluate generated labels (captioning model)"
    )
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=300)
    parser.add_argument("--threshold", type=float, default=0.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dataset-name", default=None)
    return parser


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from .. import DetClipV3ForObjectCaptioning, DetClipV3ForObjectDetection, DetClipV3Processor

    model_class = DetClipV3ForObjectCaptioning if args.vocabulary_free else DetClipV3ForObjectDetection
    model = model_class.from_pretrained(args.model).to(args.device).eval()
    processor = DetClipV3Processor.from_pretrained(args.model)
    ground_truth = json.loads(Path(args.annotations).read_text())
    predictions = predict_dataset(
        model,
        processor,
        ground_truth,
        args.images,
        vocabulary_free=args.vocabulary_free,
        batch_size=args.batch_size,
        threshold=args.threshold,
        top_k=args.top_k,
    )
    if args.vocabulary_free:
        task = "vocabulary-free-detection"
        metrics = evaluate_vocab_free(
            ground_truth, predictions, None, text_embedder(model, processor), protocol=args.protocol
        )
    elif args.protocol == "lvis_fixed":
        task = "open-vocabulary-detection (LVIS fixed AP)"
        metrics = evaluate_lvis_fixed(ground_truth, predictions)
    else:
        from .coco import evaluate_coco

        task = "open-vocabulary-detection"
        metrics = evaluate_coco(ground_truth, predictions, max_dets=100)
    record = build_results_record(
        task,
        args.dataset_name or Path(args.annotations).stem,
        metrics,
        model=str(args.model),
        protocol=args.protocol,
    )
    save_results(record, args.output)
    print(json.dumps(record["metrics"], indent=2))
    return record
