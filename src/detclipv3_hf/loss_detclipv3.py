"""Hungarian matching and the training losses of DetCLIPv3 (detector and captioner).

Shaped like DETR's `models/matcher.py` and `SetCriterion`: a no-grad matcher whose costs are constructor arguments,
computed batched then split per image; a criterion with one method per loss term and a name-to-method map; and the
weight of every term (main, `_enc`, `_dn`, per decoder layer `_{i}`) built in one place from the config
(`build_loss_weights`). Differences from DETR: alignment is a multi-positive sigmoid focal loss over (query, concept)
pairs (GLIP), there is an objectness term, and DINO's contrastive denoising queries have their own fixed matching.

Box convention: `cxcywh` normalised to the un-padded image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

if TYPE_CHECKING:
    from .configuration_detclipv3 import DetClipV3Config

__all__ = ["DetClipV3Criterion", "DetClipV3HungarianMatcher", "build_loss_weights", "prepare_targets"]

# How far (fraction of the image) a target box may exceed [0, 1]: float rounding of converted annotations.
BOX_TOLERANCE = 0.01


def prepare_targets(
    labels: list[dict[str, torch.Tensor]], num_concepts: int | None, device: torch.device
) -> list[dict]:
    """Validates `labels` and adds a `(T, num_concepts)` float `positive_map` to each (multi-positive targets).

    Raises:
        ValueError / TypeError naming the image and the problem for malformed boxes or labels.
    """
    if not isinstance(labels, (list, tuple)):
        raise TypeError(f"labels must be a list with one dict per image, got {type(labels).__name__}.")
    targets = []
    for i, target in enumerate(labels):
        if not isinstance(target, dict) or "boxes" not in target:
            raise ValueError(
                f"labels[{i}] must be a dict with 'boxes' (and 'class_labels'), got {type(target).__name__}."
            )
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32, device=device)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(
                f"labels[{i}]['boxes'] must have shape (num_boxes, 4), got {tuple(boxes.shape)}."
            )
        if not torch.isfinite(boxes).all():
            raise ValueError(f"labels[{i}]['boxes'] contains NaN or infinite values.")
        if (boxes[:, 2:] <= 0).any():
            raise ValueError(
                f"labels[{i}]['boxes'] has a box with non-positive width or height (cxcywh expected)."
            )
        corners = box_convert(boxes, "cxcywh", "xyxy")
        if ((corners < -BOX_TOLERANCE) | (corners > 1 + BOX_TOLERANCE)).any():
            raise ValueError(
                f"labels[{i}]['boxes'] has a box outside the image (corners span [{float(corners.min()):.3f}, "
                f"{float(corners.max()):.3f}]); boxes must be cxcywh normalised to the un-padded image, in [0, 1]."
            )
        new = {"boxes": boxes}
        if num_concepts is not None:
            new["positive_map"] = _positive_map(target, i, boxes.shape[0], num_concepts, device)
            new["class_labels"] = (
                new["positive_map"].argmax(-1)
                if boxes.shape[0]
                else torch.zeros(0, dtype=torch.long, device=device)
            )
        for key in ("caption_labels",):
            if key in target:
                new[key] = target[key]
        targets.append(new)
    return targets


def _positive_map(
    target: dict[str, Any], index: int, num_boxes: int, num_concepts: int, device: torch.device
) -> torch.Tensor:
    if "positive_map" in target and target["positive_map"] is not None:
        positive = torch.as_tensor(target["positive_map"], device=device).float()
        if positive.ndim != 2 or positive.shape[0] != num_boxes or positive.shape[1] > num_concepts:
            raise ValueError(
                f"labels[{index}]['positive_map'] must have shape ({num_boxes}, <= {num_concepts}), "
                f"got {tuple(positive.shape)}."
            )
        positive = F.pad(positive, (0, num_concepts - positive.shape[1]))
    else:
        if "class_labels" not in target:
            raise ValueError(
                f"labels[{index}] needs 'class_labels' or 'positive_map' when concepts are given."
            )
        classes = torch.as_tensor(target["class_labels"], dtype=torch.long, device=device).reshape(-1)
        if classes.shape[0] != num_boxes:
            raise ValueError(f"labels[{index}] has {num_boxes} boxes but {classes.shape[0]} class_labels.")
        if classes.numel() and (classes.min() < 0 or classes.max() >= num_concepts):
            raise ValueError(
                f"labels[{index}]['class_labels'] must index the image's {num_concepts} concepts, "
                f"got values in [{int(classes.min())}, {int(classes.max())}]."
            )
        positive = (
            F.one_hot(classes, num_concepts).float()
            if num_boxes
            else torch.zeros(0, num_concepts, device=device)
        )
    if num_boxes and (positive.sum(-1) == 0).any():
        raise ValueError(f"labels[{index}]: every box needs at least one positive concept.")
    return positive


def build_loss_weights(config: DetClipV3Config, num_decoder_layers: int | None = None) -> dict[str, float]:
    """The weight of every loss term: main terms, `_{i}` per auxiliary decoder layer, `_enc`, `_dn`, `_dn_{i}`."""
    base = {
        "loss_alignment": config.alignment_loss_coefficient,
        "loss_bbox": config.bbox_loss_coefficient,
        "loss_giou": config.giou_loss_coefficient,
        "loss_objectness": config.objectness_loss_coefficient,
    }
    layers = num_decoder_layers if num_decoder_layers is not None else config.decoder_layers
    weights = dict(base)
    suffixes = ["_dn"]
    if config.auxiliary_loss:
        suffixes += [f"_{i}" for i in range(layers - 1)] + ["_enc"] + [f"_dn_{i}" for i in range(layers - 1)]
    for suffix in suffixes:
        weights.update({k + suffix: v for k, v in base.items()})
    weights["loss_caption"] = config.caption_loss_coefficient
    weights["loss_image_caption"] = config.image_caption_loss_coefficient
    return weights


class DetClipV3HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth boxes (DETR's matcher, multi-positive alignment cost).

    The class cost of (query q, box t) is the focal-style cost of q's alignment logits, averaged over the concepts
    positive for t. Without concepts (vocabulary-free training) it is the same cost on the objectness logit.
    """

    def __init__(
        self,
        class_cost: float,
        bbox_cost: float,
        giou_cost: float,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("All matcher costs are zero; at least one must be positive.")
        self.class_cost = class_cost
        self.bbox_cost = bbox_cost
        self.giou_cost = giou_cost
        self.alpha = focal_alpha
        self.gamma = focal_gamma

    def _focal_cost(self, logits: torch.Tensor) -> torch.Tensor:
        prob = logits.sigmoid()
        neg = (1 - self.alpha) * prob.pow(self.gamma) * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob).pow(self.gamma) * -(prob + 1e-8).log()
        return pos - neg

    @torch.no_grad()
    def forward(
        self,
        pred_boxes: torch.Tensor,
        targets: list[dict[str, torch.Tensor]],
        logits: torch.Tensor | None = None,
        objectness: torch.Tensor | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """
        Args:
            pred_boxes: `(B, Q, 4)` cxcywh.
            targets: per image `boxes` `(T, 4)` cxcywh and, with `logits`, `positive_map` `(T, M)`.
            logits: `(B, Q, M)` alignment logits, or None to use `objectness` `(B, Q)`.

        Returns:
            Per image `(query_indices, target_indices)`, both LongTensor of length min(Q, T).
        """
        batch, num_queries = pred_boxes.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return [(empty, empty) for _ in targets]
        out_boxes = pred_boxes.flatten(0, 1).float()
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).float()
        if logits is not None:
            # (B*Q, M) x (M, sumT): average cost over each target's positive concepts.
            positive = torch.cat([t["positive_map"] for t in targets]).float()
            positive = positive / positive.sum(-1, keepdim=True)
            class_cost = self._focal_cost(logits.flatten(0, 1).float()) @ positive.T
        else:
            class_cost = self._focal_cost(objectness.flatten(0, 1).float())[:, None].expand(
                -1, tgt_boxes.shape[0]
            )
        bbox_cost = torch.cdist(out_boxes, tgt_boxes, p=1)
        giou_cost = -generalized_box_iou(
            box_convert(out_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        cost = self.bbox_cost * bbox_cost + self.class_cost * class_cost + self.giou_cost * giou_cost
        cost = cost.view(batch, num_queries, -1).cpu()
        indices = []
        for i, chunk in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(chunk[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return indices


class DetClipV3Criterion(nn.Module):
    """The detection losses of DetCLIPv3 (DETR's `SetCriterion` with GLIP alignment and DINO denoising).

    Call with the trunk's `DetClipV3ModelOutput` and the labels; returns `(loss, loss_dict)` where `loss_dict` holds
    every unweighted term and `loss` their weighted sum (weights from `build_loss_weights`).
    """

    def __init__(self, config: DetClipV3Config):
        super().__init__()
        self.matcher = DetClipV3HungarianMatcher(
            config.class_cost, config.bbox_cost, config.giou_cost, config.focal_alpha, config.focal_gamma
        )
        self.alpha = config.focal_alpha
        self.gamma = config.focal_gamma
        self.auxiliary_loss = config.auxiliary_loss
        self.weights = build_loss_weights(config)
        self.loss_map = {
            "alignment": self.loss_alignment,
            "bbox": self.loss_boxes,
            "giou": self.loss_boxes,
            "objectness": self.loss_objectness,
        }

    # ------------------------------------------------------------------ terms
    def loss_alignment(self, pred: dict, targets: list[dict], indices: list, num_boxes: float) -> dict:
        """Sigmoid focal loss over every (query, real concept) pair; matched queries target their positive map."""
        logits = pred["logits"]
        if logits is None:
            return {}
        target = torch.zeros_like(logits)
        for b, (src, tgt) in enumerate(indices):
            if len(src):
                target[b, src.to(logits.device)] = targets[b]["positive_map"][tgt.to(logits.device)].to(
                    logits.dtype
                )
        valid = pred["concept_mask"][:, None, :].expand_as(logits)
        loss = sigmoid_focal_loss(
            logits[valid].float(), target[valid].float(), self.alpha, self.gamma, reduction="sum"
        )
        return {"loss_alignment": loss / num_boxes}

    def loss_boxes(self, pred: dict, targets: list[dict], indices: list, num_boxes: float) -> dict:
        """L1 and GIoU on matched boxes (cxcywh)."""
        boxes = pred["boxes"]
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(
            boxes.device
        )
        src_idx = torch.cat([src for src, _ in indices]).to(boxes.device)
        src = boxes[batch_idx, src_idx].float()
        tgt = torch.cat([t["boxes"][j.to(boxes.device)] for t, (_, j) in zip(targets, indices)]).float()
        if src.numel() == 0:
            zero = boxes.sum() * 0.0
            return {"loss_bbox": zero, "loss_giou": zero}
        l1 = F.l1_loss(src, tgt, reduction="sum")
        giou = torch.diag(
            generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
        )
        return {"loss_bbox": l1 / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    def loss_objectness(self, pred: dict, targets: list[dict], indices: list, num_boxes: float) -> dict:
        """Sigmoid focal loss of "this query is matched to any ground-truth object"."""
        objectness = pred["objectness"]
        target = torch.zeros_like(objectness)
        for b, (src, _) in enumerate(indices):
            target[b, src.to(objectness.device)] = 1.0
        loss = sigmoid_focal_loss(objectness.float(), target.float(), self.alpha, self.gamma, reduction="sum")
        return {"loss_objectness": loss / num_boxes}

    # ------------------------------------------------------------------ orchestration
    def _terms(self, pred: dict, targets: list[dict], indices: list, num_boxes: float, suffix: str) -> dict:
        losses = {}
        for name in ("alignment", "bbox", "objectness"):
            losses.update(self.loss_map[name](pred, targets, indices, num_boxes))
        return {k + suffix: v for k, v in losses.items()}

    def _match(self, pred: dict, targets: list[dict]) -> list:
        return self.matcher(pred["boxes"], targets, pred["logits"], pred["objectness"])

    @staticmethod
    def _num_boxes(targets: list[dict], device: torch.device) -> float:
        num = torch.tensor(float(sum(len(t["boxes"]) for t in targets)), device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num)
            num = num / torch.distributed.get_world_size()
        return max(float(num), 1.0)

    def _denoising_indices(self, targets: list[dict], meta: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed assignment of the positive denoising queries to their boxes (no Hungarian matching)."""
        indices = []
        for target in targets:
            count = len(target["boxes"])
            tgt = torch.arange(count, dtype=torch.long)
            group = 2 * meta.pad_size
            src = torch.cat([g * group + tgt for g in range(meta.num_groups)]) if count else tgt
            indices.append((src, tgt.repeat(meta.num_groups) if count else tgt))
        return indices

    def forward(
        self, outputs: Any, labels: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            outputs: a `DetClipV3ModelOutput`.
            labels: per image `boxes` (T, 4) cxcywh normalised, `class_labels` (T,), optional `positive_map` (T, M).
        """
        has_concepts = outputs.logits is not None
        device = outputs.pred_boxes.device
        num_concepts = outputs.logits.shape[-1] if has_concepts else None
        if len(labels) != outputs.pred_boxes.shape[0]:
            raise ValueError(
                f"Got labels for {len(labels)} images but the batch has {outputs.pred_boxes.shape[0]}."
            )
        targets = prepare_targets(labels, num_concepts, device)
        num_boxes = self._num_boxes(targets, device)
        concept_mask = outputs.concept_mask

        def pred(logits, boxes, objectness):
            return {"logits": logits, "boxes": boxes, "objectness": objectness, "concept_mask": concept_mask}

        num_layers = outputs.intermediate_boxes.shape[0]
        final = pred(outputs.logits, outputs.pred_boxes, outputs.objectness_logits)
        losses = self._terms(final, targets, self._match(final, targets), num_boxes, "")
        if self.auxiliary_loss:
            for i in range(num_layers - 1):
                layer = pred(
                    outputs.intermediate_logits[i] if has_concepts else None,
                    outputs.intermediate_boxes[i],
                    outputs.intermediate_objectness[i],
                )
                losses.update(self._terms(layer, targets, self._match(layer, targets), num_boxes, f"_{i}"))
            enc = pred(outputs.enc_logits, outputs.enc_boxes, outputs.enc_objectness)
            losses.update(self._terms(enc, targets, self._match(enc, targets), num_boxes, "_enc"))
        meta = outputs.denoising_meta
        if meta is not None and outputs.denoising_boxes is not None:
            dn_indices = self._denoising_indices(targets, meta)
            layers = range(num_layers) if self.auxiliary_loss else [num_layers - 1]
            for i in layers:
                layer = pred(
                    outputs.denoising_logits[i] if has_concepts else None,
                    outputs.denoising_boxes[i],
                    outputs.denoising_objectness[i],
                )
                suffix = "_dn" if i == num_layers - 1 else f"_dn_{i}"
                losses.update(self._terms(layer, targets, dn_indices, num_boxes * meta.num_groups, suffix))
        total = sum(self.weights[name] * value for name, value in losses.items())
        return total, losses
