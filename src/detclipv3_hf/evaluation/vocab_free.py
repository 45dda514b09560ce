"""Vocabulary-free evaluation: the model names objects in free text (``phrase|category|parent category``).

Two measurements, as in DetCLIPv3 (Sec. 4):

1. **Box AP after mapping.** Each generated category is mapped to the dataset's class name whose text
   embedding is most similar (cosine); an exact match of the normalised strings always wins. The mapped
   detections are then scored with `evaluate_coco` (or LVIS fixed AP).
2. **Naming accuracy.** For every ground-truth box, the prediction with the best IoU (>= 0.5) is taken and
   its generated ``category`` / ``parent_category`` compared (exact match after normalisation) with the
   box's category ``name`` / the category's COCO ``supercategory``. Unmatched boxes count as wrong.

The embedding model is not imported here: callers pass ``embed_fn(list[str]) -> (N, D) tensor`` (e.g. the
DetCLIPv3 text encoder, or any sentence encoder).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou

from .coco import GroundTruth, evaluate_coco, load_coco_ground_truth, prediction_boxes_and_scores
from .lvis import evaluate_lvis_fixed

EmbedFn = Callable[[list[str]], torch.Tensor]


def normalize_category_name(name: str) -> str:
    """Case- and space-normalised form used for exact matching: lower case, ``_`` as space, single spaces.

    ``"Baseball_bat "`` and ``"baseball  bat"`` both become ``"baseball bat"`` (LVIS names use underscores).
    """
    if not isinstance(name, str):
        raise TypeError(f"category names must be str, got {type(name)}: {name!r}")
    return " ".join(name.replace("_", " ").lower().split())


def _embed(texts: list[str], embed_fn: EmbedFn, batch_size: int) -> torch.Tensor:
    """Calls `embed_fn` in batches; returns (N, D) float32 L2-normalised rows (zero rows stay zero)."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        embeddings = embed_fn(batch)
        if isinstance(embeddings, np.ndarray):
            embeddings = torch.from_numpy(embeddings)
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"embed_fn must return a torch.Tensor (N, D), got {type(embeddings)}")
        if embeddings.ndim != 2 or embeddings.shape[0] != len(batch):
            raise ValueError(
                f"embed_fn returned shape {tuple(embeddings.shape)} for {len(batch)} texts; "
                f"expected ({len(batch)}, D)"
            )
        chunks.append(embeddings.detach().to("cpu", torch.float32))
    if len({chunk.shape[1] for chunk in chunks}) > 1:
        raise ValueError("embed_fn returned embeddings of different widths across batches")
    embeddings = torch.cat(chunks)
    if not torch.isfinite(embeddings).all():
        raise ValueError("embed_fn returned NaN or inf")
    return F.normalize(embeddings, dim=-1)


class GeneratedCategoryMapper:
    """Maps generated category strings to dataset classes; class-name embeddings are computed once.

    Args:
        class_names: The dataset's class names, index ``c`` is class ``c``.
        embed_fn: ``list[str] -> (N, D)`` tensor of text embeddings (any scale; cosine similarity is used).
            It receives normalised strings (see `normalize_category_name`).
        batch_size: Most strings per `embed_fn` call.
    """

    def __init__(self, class_names: Sequence[str], embed_fn: EmbedFn, *, batch_size: int = 256) -> None:
        if isinstance(class_names, str) or not isinstance(class_names, Sequence) or not class_names:
            raise ValueError(f"class_names must be a non-empty list of str, got {class_names!r}")
        if not callable(embed_fn):
            raise TypeError(f"embed_fn must be callable, got {type(embed_fn)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.class_names = list(class_names)
        self.embed_fn = embed_fn
        self.batch_size = batch_size
        normalized = [normalize_category_name(name) for name in self.class_names]
        # First class wins when two class names normalise to the same string.
        self._exact_index: dict[str, int] = {}
        for index, name in enumerate(normalized):
            self._exact_index.setdefault(name, index)
        self.class_embeddings = _embed(normalized, embed_fn, batch_size)  # (C, D), unit rows

    def __call__(
        self, generated: Sequence[str], *, min_similarity: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps each generated string to a class.

        Args:
            generated: N generated category strings.
            min_similarity: When given, strings whose best cosine similarity is below it get class -1.

        Returns:
            ``(class_index, similarity)``: LongTensor (N,) indices into `class_names` (-1 = unmapped) and
            FloatTensor (N,) cosine similarities of the chosen class (1.0 for exact matches).
        """
        if isinstance(generated, str) or not isinstance(generated, Sequence):
            raise TypeError(f"generated must be a list of str, got {type(generated)}")
        normalized = [normalize_category_name(text) for text in generated]
        class_index = torch.full((len(normalized),), -1, dtype=torch.long)
        similarity = torch.zeros(len(normalized), dtype=torch.float32)
        # Embed each distinct non-exact string once.
        to_embed = sorted({text for text in normalized if text not in self._exact_index})
        nearest: dict[str, tuple[int, float]] = {}
        if to_embed:
            cosine = _embed(to_embed, self.embed_fn, self.batch_size) @ self.class_embeddings.T  # (U, C)
            best_similarity, best_index = cosine.max(dim=-1)
            nearest = {text: (int(i), float(s)) for text, i, s in zip(to_embed, best_index, best_similarity)}
        for position, text in enumerate(normalized):
            if text in self._exact_index:
                class_index[position], similarity[position] = self._exact_index[text], 1.0
                continue
            index, score = nearest[text]
            similarity[position] = score
            if min_similarity is None or score >= min_similarity:
                class_index[position] = index
        return class_index, similarity


def map_generated_to_classes(
    generated: Sequence[str],
    class_names: Sequence[str],
    embed_fn: EmbedFn,
    *,
    min_similarity: float | None = None,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-shot form of `GeneratedCategoryMapper` (build the mapper yourself to reuse class embeddings).

    Returns:
        ``(class_index LongTensor (N,), similarity FloatTensor (N,))``; see `GeneratedCategoryMapper`.
    """
    mapper = GeneratedCategoryMapper(class_names, embed_fn, batch_size=batch_size)
    return mapper(generated, min_similarity=min_similarity)


def _generated_texts(entry: Mapping[str, Any], key: str, image_id: int, num_boxes: int) -> list[str]:
    texts = entry.get(key)
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"prediction of image {image_id} needs {key!r} as a list of str, got {type(texts)}")
    if len(texts) != num_boxes:
        raise ValueError(
            f"prediction {key!r} of image {image_id} has {len(texts)} entries for {num_boxes} boxes"
        )
    if not all(isinstance(text, str) for text in texts):
        raise TypeError(f"prediction {key!r} of image {image_id} must hold only str")
    return list(texts)


def _parse_vocab_free_predictions(
    predictions: Sequence[Mapping[str, Any]], image_ids: set[int]
) -> list[dict[str, Any]]:
    if isinstance(predictions, Mapping) or not isinstance(predictions, Sequence):
        raise TypeError(f"predictions must be a list of per-image dicts, got {type(predictions)}")
    parsed, seen = [], set()
    for index, entry in enumerate(predictions):
        image_id, boxes, scores = prediction_boxes_and_scores(entry, index)
        if image_id in seen:
            raise ValueError(f"image_id {image_id} appears in more than one prediction entry")
        if image_id not in image_ids:
            raise ValueError(f"prediction image_id {image_id} is not an image of the ground truth")
        seen.add(image_id)
        parsed.append(
            {
                "image_id": image_id,
                "boxes": boxes,
                "scores": scores,
                "categories": _generated_texts(entry, "categories", image_id, len(boxes)),
                "parent_categories": _generated_texts(entry, "parent_categories", image_id, len(boxes)),
            }
        )
    return parsed


def _best_iou_matches(
    coco_gt: Any, entries: Mapping[int, Mapping[str, Any]], iou_threshold: float
) -> Iterator[tuple[dict[str, Any], int | None]]:
    """``(annotation, index of its matched box in its image's entry or None)`` for every non-crowd ground-truth box,
    image by image. ``entries`` maps image ids to dicts with numpy ``boxes`` (K, 4) xyxy and ``scores`` (K,)."""
    for image_id in coco_gt.getImgIds():
        annotations = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        entry = entries.get(image_id)
        if entry is None or len(entry["boxes"]) == 0:
            yield from ((annotation, None) for annotation in annotations)
            continue
        if not annotations:
            continue
        # Sorting predictions by score makes argmax (first maximum) break IoU ties towards higher scores.
        order = np.argsort(-entry["scores"], kind="stable")
        gt_boxes = box_convert(
            torch.tensor([a["bbox"] for a in annotations], dtype=torch.float64), "xywh", "xyxy"
        )
        ious = box_iou(gt_boxes, torch.from_numpy(entry["boxes"][order]))  # (G, K)
        best_iou, best = ious.max(dim=1)
        for annotation, iou, k in zip(annotations, best_iou.tolist(), best.tolist()):
            yield annotation, (int(order[k]) if iou >= iou_threshold else None)


def match_ground_truth_boxes(
    ground_truth: GroundTruth,
    predictions: Sequence[Mapping[str, Any]],
    *,
    iou_threshold: float = 0.5,
) -> list[tuple[dict[str, Any], int | None]]:
    """The match `naming_accuracy` uses, for scoring any other per-box field of the predictions (e.g. phrases).

    Args:
        ground_truth: COCO-format dict / JSON path / `COCO`.
        predictions: Per-image dicts with ``image_id``, ``boxes`` (K, 4) xyxy absolute pixels and ``scores``.
        iou_threshold: Minimum IoU of a match.

    Returns:
        ``(annotation, k)`` for every non-crowd ground-truth box, where ``k`` indexes the matched box in the
        prediction entry of the annotation's image (the highest IoU >= `iou_threshold`, ties to the higher score),
        or is None when no box matches.
    """
    coco_gt = load_coco_ground_truth(ground_truth)
    entries = {}
    for index, entry in enumerate(predictions):
        image_id, boxes, scores = prediction_boxes_and_scores(entry, index)
        entries[image_id] = {"boxes": boxes, "scores": scores}
    return list(_best_iou_matches(coco_gt, entries, iou_threshold))


def naming_accuracy(
    ground_truth: GroundTruth,
    predictions: Sequence[Mapping[str, Any]],
    *,
    iou_threshold: float = 0.5,
) -> dict[str, float]:
    """Exact-match accuracy of generated category / parent category over ground-truth boxes.

    For each non-crowd ground-truth box, the prediction of the same image with the highest IoU (>=
    `iou_threshold`; ties go to the higher score) is its match; a prediction may match several boxes.
    Strings are compared after `normalize_category_name`.

    Args:
        ground_truth: COCO-format dict / JSON path / `COCO`; ``categories[i]["supercategory"]`` is the parent.
        predictions: Per-image dicts with ``image_id``, ``boxes`` (K, 4) xyxy absolute pixels, ``scores``,
            ``categories`` and ``parent_categories`` (K strings each).
        iou_threshold: Minimum IoU of a match.

    Returns:
        ``{"category_accuracy", "parent_category_accuracy", "match_rate", "num_gt_boxes"}``. Unmatched boxes
        count as wrong. Parent accuracy is over boxes whose category has a ``supercategory`` (NaN if none);
        both accuracies are NaN when there is no ground-truth box.
    """
    coco_gt = load_coco_ground_truth(ground_truth)
    parsed = {
        entry["image_id"]: entry for entry in _parse_vocab_free_predictions(predictions, set(coco_gt.imgs))
    }
    matched = category_correct = parent_correct = parent_total = num_gt = 0
    for annotation, prediction in _best_iou_matches(coco_gt, parsed, iou_threshold):
        num_gt += 1
        category = coco_gt.cats[annotation["category_id"]]
        parent = normalize_category_name(category.get("supercategory") or "")
        parent_total += bool(parent)
        if prediction is None:
            continue
        matched += 1
        entry = parsed[annotation["image_id"]]
        category_correct += normalize_category_name(
            entry["categories"][prediction]
        ) == normalize_category_name(category["name"])
        parent_correct += (
            bool(parent) and normalize_category_name(entry["parent_categories"][prediction]) == parent
        )
    nan = float("nan")
    return {
        "category_accuracy": category_correct / num_gt if num_gt else nan,
        "parent_category_accuracy": parent_correct / parent_total if parent_total else nan,
        "match_rate": matched / num_gt if num_gt else nan,
        "num_gt_boxes": float(num_gt),
    }


def evaluate_vocab_free(
    ground_truth: GroundTruth,
    predictions: Sequence[Mapping[str, Any]],
    class_names: Sequence[str] | None,
    embed_fn: EmbedFn,
    *,
    min_similarity: float | None = None,
    iou_threshold: float = 0.5,
    protocol: Literal["coco", "lvis_fixed"] = "coco",
    max_dets: int = 100,
    batch_size: int = 256,
    verbose: bool = False,
) -> dict[str, Any]:
    """Box AP after mapping generated categories to class names, plus naming accuracy.

    Args:
        ground_truth: COCO-format dict / JSON path / `COCO` (``bbox`` xywh absolute pixels).
        predictions: Per-image dicts with ``image_id``, ``boxes`` (K, 4) xyxy absolute pixels, ``scores``
            (K,), ``categories`` and ``parent_categories`` (K generated strings each); no ``labels``.
        class_names: Text for each ground-truth category, in the order of ``ground_truth["categories"]``
            (e.g. prompt-friendly names); None uses the categories' ``name``.
        embed_fn: ``list[str] -> (N, D)`` text embeddings used for the mapping.
        min_similarity: Drop detections whose generated category is less similar than this to every class.
        iou_threshold: IoU of a ground-truth / prediction match for the naming accuracy.
        protocol: ``"coco"`` (`evaluate_coco`, `max_dets` per image) or ``"lvis_fixed"``
            (`evaluate_lvis_fixed`).
        max_dets: Per-image cap of the COCO protocol.
        batch_size: Most strings per `embed_fn` call.
        verbose: Let pycocotools print.

    Returns:
        The AP dict of the chosen protocol plus ``category_accuracy``, ``parent_category_accuracy``,
        ``match_rate``, ``num_gt_boxes`` (see `naming_accuracy`).
    """
    if protocol not in ("coco", "lvis_fixed"):
        raise ValueError(f"protocol must be 'coco' or 'lvis_fixed', got {protocol!r}")
    coco_gt = load_coco_ground_truth(ground_truth, verbose=verbose)
    category_ids = [category["id"] for category in coco_gt.dataset["categories"]]
    if class_names is None:
        class_names = [category["name"] for category in coco_gt.dataset["categories"]]
    if len(class_names) != len(category_ids):
        raise ValueError(
            f"class_names has {len(class_names)} names for {len(category_ids)} ground-truth categories"
        )
    parsed = _parse_vocab_free_predictions(predictions, set(coco_gt.imgs))

    mapper = GeneratedCategoryMapper(class_names, embed_fn, batch_size=batch_size)
    generated = [text for entry in parsed for text in entry["categories"]]
    class_index, _ = mapper(generated, min_similarity=min_similarity)
    category_of_class = torch.tensor(category_ids, dtype=torch.long)

    mapped, start = [], 0
    for entry in parsed:
        indices = class_index[start : start + len(entry["boxes"])]
        start += len(entry["boxes"])
        keep = (indices >= 0).numpy()
        mapped.append(
            {
                "image_id": entry["image_id"],
                "boxes": entry["boxes"][keep],
                "scores": entry["scores"][keep],
                "labels": category_of_class[indices[indices >= 0]].numpy(),
            }
        )
    if protocol == "coco":
        results = evaluate_coco(coco_gt, mapped, max_dets=max_dets, verbose=verbose)
    else:
        results = evaluate_lvis_fixed(coco_gt, mapped, verbose=verbose)
    results.update(naming_accuracy(coco_gt, parsed, iou_threshold=iou_threshold))
    return results
