"""Hungarian matcher, criterion terms and loss weights (loss_detclipv3.py)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_config
from torchvision.ops import sigmoid_focal_loss

from detclipv3_hf import DetClipV3ForObjectDetection
from detclipv3_hf.loss_detclipv3 import (
    DetClipV3Criterion,
    DetClipV3HungarianMatcher,
    build_loss_weights,
    prepare_targets,
)

DETECTION_KEYS = ("loss_alignment", "loss_bbox", "loss_giou", "loss_objectness")


def _random_predictions(batch: int, queries: int, concepts: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.rand(batch, queries, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(batch, queries, 2, generator=generator) * 0.3 + 0.05
    logits = torch.randn(batch, queries, concepts, generator=generator)
    objectness = torch.randn(batch, queries, generator=generator)
    return torch.cat([centers, sizes], -1), logits, objectness


def _targets(boxes: list[list[list[float]]], classes: list[list[int]], concepts: int) -> list[dict]:
    labels = [
        {"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "class_labels": torch.tensor(c)}
        for b, c in zip(boxes, classes)
    ]
    return prepare_targets(labels, concepts, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ matcher


def test_matcher_picks_the_obvious_assignment():
    matcher = DetClipV3HungarianMatcher(class_cost=0.0, bbox_cost=5.0, giou_cost=2.0)
    pred = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.8, 0.8, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3]]])
    targets = _targets([[[0.79, 0.81, 0.2, 0.2], [0.21, 0.2, 0.1, 0.1]]], [[0, 1]], 2)
    (rows, cols), = matcher(pred, targets, logits=torch.zeros(1, 3, 2))
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 1, 1: 0}


def test_matcher_class_cost_prefers_the_query_confident_in_the_right_concept():
    matcher = DetClipV3HungarianMatcher(class_cost=1.0, bbox_cost=0.0, giou_cost=0.0)
    boxes = torch.full((1, 2, 4), 0.5)
    logits = torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]])  # query 0 says concept 0, query 1 says concept 1
    targets = _targets([[[0.5, 0.5, 0.2, 0.2]]], [[1]], 2)
    (rows, cols), = matcher(boxes, targets, logits=logits)
    assert rows.tolist() == [1] and cols.tolist() == [0]
    # Without concepts the class cost is taken on the objectness logit instead.
    (rows, _), = matcher(boxes, _targets([[[0.5, 0.5, 0.2, 0.2]]], [[0]], 2), objectness=torch.tensor([[-3.0, 3.0]]))
    assert rows.tolist() == [1]


def test_matcher_averages_the_class_cost_over_every_positive_concept():
    matcher = DetClipV3HungarianMatcher(class_cost=1.0, bbox_cost=0.0, giou_cost=0.0)
    logits = torch.tensor([[[4.0, -4.0, -4.0], [2.0, 2.0, -4.0], [-4.0, 4.0, -4.0]]])
    boxes = torch.full((1, 3, 4), 0.5)
    # The box is positive for concepts 0 and 1 (phrase and category): the query good at both wins.
    target = prepare_targets(
        [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "positive_map": torch.tensor([[1.0, 1.0, 0.0]])}],
        3,
        torch.device("cpu"),
    )
    (rows, _), = matcher(boxes, target, logits=logits)
    assert rows.tolist() == [1]
    focal = matcher._focal_cost(logits[0])
    assert torch.allclose(focal[:, :2].mean(-1), focal[:, :2] @ torch.tensor([0.5, 0.5]))


def test_matcher_one_image_alone_equals_the_same_image_in_a_batch():
    matcher = DetClipV3HungarianMatcher(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)
    boxes, logits, objectness = _random_predictions(3, 12, 4, seed=1)
    targets = _targets(
        [
            [[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.1, 0.4]],
            [[0.4, 0.4, 0.3, 0.3]],
            [[0.2, 0.8, 0.1, 0.1], [0.6, 0.3, 0.2, 0.2]],
        ],
        [[0, 3, 1], [2], [1, 1]],
        4,
    )
    batched = matcher(boxes, targets, logits=logits, objectness=objectness)
    for i, target in enumerate(targets):
        (rows, cols), = matcher(boxes[i : i + 1], [target], logits=logits[i : i + 1])
        assert torch.equal(rows, batched[i][0]) and torch.equal(cols, batched[i][1])
        assert len(rows) == len(target["boxes"])  # every ground-truth box gets its own query


def test_matcher_empty_targets():
    matcher = DetClipV3HungarianMatcher(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)
    boxes, logits, _ = _random_predictions(2, 6, 3)
    empty = _targets([[], []], [[], []], 3)
    assert all(len(rows) == 0 and len(cols) == 0 for rows, cols in matcher(boxes, empty, logits=logits))
    mixed = _targets([[], [[0.5, 0.5, 0.2, 0.2]]], [[], [2]], 3)
    (rows0, _), (rows1, cols1) = matcher(boxes, mixed, logits=logits)
    assert len(rows0) == 0 and len(rows1) == 1 and cols1.tolist() == [0]


def test_matcher_refuses_all_zero_costs():
    with pytest.raises(ValueError, match="costs are zero"):
        DetClipV3HungarianMatcher(0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------------ targets


def test_multi_positive_targets_and_alignment_loss(clip_tokenizer):
    criterion = DetClipV3Criterion(tiny_config(clip_tokenizer))
    logits = torch.randn(1, 4, 3)
    concept_mask = torch.tensor([[True, True, False]])
    targets = prepare_targets(
        [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "positive_map": torch.tensor([[1, 1]])}],
        3,
        torch.device("cpu"),
    )
    assert targets[0]["positive_map"].tolist() == [[1.0, 1.0, 0.0]]  # padded to the batch's concept count
    indices = [(torch.tensor([2]), torch.tensor([0]))]
    pred = {"logits": logits, "concept_mask": concept_mask}
    loss = criterion.loss_alignment(pred, targets, indices, num_boxes=1.0)["loss_alignment"]
    expected_target = torch.zeros(4, 2)
    expected_target[2] = 1.0  # the matched query is positive for BOTH concepts; padded concept 2 is ignored
    expected = sigmoid_focal_loss(logits[0, :, :2], expected_target, 0.25, 2.0, reduction="sum")
    assert torch.allclose(loss, expected)


@pytest.mark.parametrize(
    ("label", "error", "message"),
    [
        ({"boxes": [[0.5, 0.5, 0.0, 0.2]], "class_labels": [0]}, ValueError, "non-positive width or height"),
        ({"boxes": [[0.5, float("nan"), 0.1, 0.2]], "class_labels": [0]}, ValueError, "NaN or infinite"),
        ({"boxes": [[0.5, 0.5, 0.1]], "class_labels": [0]}, ValueError, "shape \\(num_boxes, 4\\)"),
        ({"boxes": [[0.5, 0.5, 0.1, 0.1]], "class_labels": [3]}, ValueError, "must index the image's 2 concepts"),
        ({"boxes": [[0.5, 0.5, 0.1, 0.1]], "class_labels": [0, 1]}, ValueError, "1 boxes but 2 class_labels"),
        ({"boxes": [[0.5, 0.5, 0.1, 0.1]]}, ValueError, "needs 'class_labels' or 'positive_map'"),
        ({"boxes": [[0.5, 0.5, 0.1, 0.1]], "positive_map": [[0, 0]]}, ValueError, "at least one positive"),
        ({"class_labels": [0]}, ValueError, "must be a dict with 'boxes'"),
    ],
)
def test_prepare_targets_errors(label, error, message):
    with pytest.raises(error, match=message):
        prepare_targets([label], 2, torch.device("cpu"))


def test_prepare_targets_needs_a_list():
    with pytest.raises(TypeError, match="one dict per image"):
        prepare_targets({"boxes": torch.zeros(0, 4)}, 2, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ weights / criterion


def test_build_loss_weights_keys(clip_tokenizer):
    config = tiny_config(clip_tokenizer, decoder_layers=3, bbox_loss_coefficient=7.0)
    weights = build_loss_weights(config)
    suffixes = ["", "_0", "_1", "_enc", "_dn", "_dn_0", "_dn_1"]
    expected = {key + suffix for key in DETECTION_KEYS for suffix in suffixes}
    assert set(weights) == expected | {"loss_caption", "loss_image_caption"}
    assert weights["loss_bbox_1"] == weights["loss_bbox_enc"] == weights["loss_bbox_dn"] == 7.0
    assert weights["loss_giou"] == config.giou_loss_coefficient
    no_aux = build_loss_weights(tiny_config(clip_tokenizer, auxiliary_loss=False))
    assert set(no_aux) == {key + s for key in DETECTION_KEYS for s in ("", "_dn")} | {
        "loss_caption",
        "loss_image_caption",
    }


def _batch(num_images: int = 2, concepts: int = 3):
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(num_images, 3, 64, 64, generator=generator)
    input_ids = torch.randint(2, 300, (num_images, concepts, 6), generator=generator)
    input_ids[..., 0], input_ids[..., -1] = 0, 1  # start ... end
    labels = [
        {"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.3]]), "class_labels": torch.tensor([0, 2])},
        {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "class_labels": torch.tensor([1])},
    ][:num_images]
    return {"pixel_values": pixel_values, "input_ids": input_ids, "labels": labels}


def test_every_loss_term_is_present_and_denoising_only_in_training(clip_tokenizer):
    torch.manual_seed(0)
    model = DetClipV3ForObjectDetection(tiny_config(clip_tokenizer))
    batch = _batch()
    model.train()
    outputs = model(**batch)
    detection_weights = {k for k in build_loss_weights(model.config) if "caption" not in k}
    assert set(outputs.loss_dict) == detection_weights
    assert all(torch.isfinite(value) for value in outputs.loss_dict.values())
    weighted = sum(model.criterion.weights[k] * v for k, v in outputs.loss_dict.items())
    assert torch.allclose(outputs.loss, weighted)

    model.eval()  # no denoising queries outside training; every other term is still computed
    with torch.no_grad():
        outputs = model(**batch)
    assert set(outputs.loss_dict) == {k for k in detection_weights if "_dn" not in k}
    assert outputs.denoising_meta is None


def test_vocabulary_free_training_supervises_boxes_and_objectness_only(clip_tokenizer):
    torch.manual_seed(0)
    model = DetClipV3ForObjectDetection(tiny_config(clip_tokenizer)).train()
    batch = _batch()
    outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
    assert outputs.logits is None
    assert not any(key.startswith("loss_alignment") for key in outputs.loss_dict)
    for suffix in ("", "_0", "_enc"):
        assert {f"loss_bbox{suffix}", f"loss_giou{suffix}", f"loss_objectness{suffix}"} <= set(outputs.loss_dict)
    assert torch.isfinite(outputs.loss)


def test_images_without_boxes_give_a_finite_loss(clip_tokenizer):
    torch.manual_seed(0)
    model = DetClipV3ForObjectDetection(tiny_config(clip_tokenizer)).train()
    batch = _batch()
    batch["labels"] = [
        {"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.long)} for _ in range(2)
    ]
    outputs = model(**batch)
    assert torch.isfinite(outputs.loss)
    assert outputs.loss_dict["loss_bbox"] == 0 and outputs.loss_dict["loss_alignment"] > 0  # all negatives
    outputs.loss.backward()
