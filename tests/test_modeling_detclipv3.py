"""DetClipV3Model / DetClipV3ForObjectDetection: shapes, gradients, invariants, save/load, cache, bad input, overfit."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tiny import build_clip_tokenizer, tiny_config
from torchvision.ops import box_convert, box_iou

from detclipv3_hf import (
    DetClipV3DetectionOutput,
    DetClipV3ForObjectDetection,
    DetClipV3ImageProcessor,
    DetClipV3Model,
    DetClipV3Processor,
)
from detclipv3_hf.modeling_detclipv3 import PADDED_CONCEPT_LOGIT, DetClipV3MultiscaleDeformableAttention

SIZE = {"shortest_edge": 64, "longest_edge": 64}
INPUT_KEYS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "concept_mask")


@pytest.fixture(scope="module")
def processor():
    # A fresh tokenizer: the processor adds [OBJ]/[IMG] to it, which must not leak into the session fixture.
    return DetClipV3Processor(
        DetClipV3ImageProcessor(size=SIZE), build_clip_tokenizer(), max_concept_tokens=8
    )


def _model(processor, seed: int = 0, **overrides) -> DetClipV3ForObjectDetection:
    torch.manual_seed(seed)
    return DetClipV3ForObjectDetection(tiny_config(processor.tokenizer, **overrides))


def _images(count: int, height: int = 64, width: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def _inputs(processor, images, concepts) -> dict[str, torch.Tensor]:
    features = processor(images=images, text=concepts)
    return {key: features[key] for key in INPUT_KEYS}


def _labels() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.7, 0.6, 0.3, 0.3]]),
            "class_labels": torch.tensor([0, 1]),
        },
        {"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "class_labels": torch.tensor([0])},
    ]


# ------------------------------------------------------------------------------------------------ shapes


def test_output_shapes_and_dtypes(processor):
    model = _model(processor).eval()
    config = model.config
    inputs = _inputs(processor, _images(2), [["cat", "dog", "red bus"], ["tree"]])
    with torch.no_grad():
        out = model(**inputs)
    batch, queries, concepts, dim, layers = 2, config.num_queries, 3, config.d_model, config.decoder_layers
    assert isinstance(out, DetClipV3DetectionOutput)
    assert out.logits.shape == (batch, queries, concepts) and out.logits.dtype == torch.float32
    assert out.pred_boxes.shape == (batch, queries, 4)
    assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()
    assert out.objectness_logits.shape == (batch, queries)
    assert out.concept_mask.dtype == torch.bool and out.concept_mask.tolist() == [
        [True] * 3,
        [True, False, False],
    ]
    assert out.concept_embeds.shape == (batch, concepts, dim)
    assert out.last_hidden_state.shape == (batch, queries, dim)
    assert out.intermediate_logits.shape == (layers, batch, queries, concepts)
    assert out.intermediate_boxes.shape == (layers, batch, queries, 4)
    assert out.intermediate_hidden_states.shape == (layers, batch, queries, dim)
    assert torch.equal(out.intermediate_boxes[-1], out.pred_boxes)
    tokens = int(sum(h * w for h, w in out.spatial_shapes.tolist()))
    assert out.encoder_last_hidden_state.shape == (batch, tokens, dim)
    assert out.encoder_mask.shape == (batch, tokens) and out.encoder_mask.dtype == torch.bool
    assert out.spatial_shapes.shape == (config.num_feature_levels, 2)
    assert out.level_start_index.tolist()[0] == 0
    assert out.selected_indices.dtype == torch.long and out.selected_indices.shape == (batch, queries)
    assert out.loss is None and out.loss_dict is None
    # Padded concept slots can never win: they hold a very negative logit.
    assert (out.logits[1, :, 1:] == PADDED_CONCEPT_LOGIT).all()
    assert (out.logits[1, :, 0] > PADDED_CONCEPT_LOGIT).all()


def test_two_dimensional_input_ids_mean_one_concept_per_image(processor):
    model = _model(processor).eval()
    inputs = _inputs(processor, _images(2), [["cat"], ["dog"]])
    flat = {
        **inputs,
        "input_ids": inputs["input_ids"][:, 0],
        "attention_mask": inputs["attention_mask"][:, 0],
    }
    flat.pop("concept_mask")
    with torch.no_grad():
        three_d, two_d = model(**inputs), model(**flat)
    assert two_d.logits.shape == (2, model.config.num_queries, 1)
    torch.testing.assert_close(two_d.logits, three_d.logits)
    torch.testing.assert_close(two_d.pred_boxes, three_d.pred_boxes)


def test_concept_embeds_path_matches_input_ids(processor):
    model = _model(processor).eval()
    inputs = _inputs(processor, _images(2), [["cat", "dog"], ["cat", "dog"]])
    with torch.no_grad():
        reference = model(**inputs)
        embeds = model.embed_concepts(inputs["input_ids"], inputs["attention_mask"], inputs["concept_mask"])
        assert embeds.shape == (2, 2, model.config.d_model)
        pixels = {"pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"]}
        batched = model(**pixels, concept_embeds=embeds, concept_mask=inputs["concept_mask"])
        shared = model(**pixels, concept_embeds=embeds[0])  # (M, D): one vocabulary for every image
    for out in (batched, shared):
        torch.testing.assert_close(out.logits, reference.logits)
        torch.testing.assert_close(out.pred_boxes, reference.pred_boxes)


def test_vocabulary_free_mode(processor):
    model = _model(processor).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 64, 48))
    assert out.logits is None and out.concept_mask is None and out.intermediate_logits is None
    assert out.pred_boxes.shape == (2, model.config.num_queries, 4)
    assert out.objectness_logits.shape == (2, model.config.num_queries)
    # Queries are the top tokens by objectness.
    assert out.enc_objectness.shape == (2, model.config.num_queries)


def test_return_dict_false_gives_the_same_values_as_a_tuple(processor):
    model = _model(processor).eval()
    inputs = _inputs(processor, _images(1), [["cat", "dog"]])
    with torch.no_grad():
        out = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = out.to_tuple()
    assert len(as_tuple) == len(expected)
    for actual, wanted in zip(as_tuple, expected):
        if isinstance(wanted, torch.Tensor):
            torch.testing.assert_close(actual, wanted)
        else:
            assert actual == wanted
    trunk = DetClipV3Model(model.config)
    assert isinstance(trunk(**inputs, return_dict=False), tuple)


# ------------------------------------------------------------------------------------------------ training


def _perturb_zero_initialised_heads(model: DetClipV3ForObjectDetection) -> None:
    """Some layers start at zero and block gradients to what feeds them: the box heads' last layers (boxes =
    reference boxes) and the deformable attentions' offset / weight projections (sampling starts query-independent,
    so the positions and level embeddings get no gradient yet). Give them small random weights so every parameter's
    gradient can be checked."""
    generator = torch.Generator().manual_seed(1)
    zero_started = [
        p
        for head in list(model.model.box_heads) + [model.model.enc_box_head]
        for p in head.layers[-1].parameters()
    ]
    for module in model.modules():
        if isinstance(module, DetClipV3MultiscaleDeformableAttention):
            zero_started += [module.sampling_offsets.weight, module.attention_weights.weight]
    with torch.no_grad():
        for param in zero_started:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.01)


def test_loss_is_finite_and_gradients_reach_every_trainable_parameter(processor):
    model = _model(processor).train()
    _perturb_zero_initialised_heads(model)
    inputs = _inputs(processor, _images(2), [["cat", "dog"], ["red bus", "tree", "house"]])
    out = model(**inputs, labels=_labels())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [
        name
        for name, param in model.named_parameters()
        if param.requires_grad and (param.grad is None or not param.grad.abs().sum() > 0)
    ]
    assert missing == []


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(processor):
    model = _model(processor).train()
    _perturb_zero_initialised_heads(model)
    checkpointed = copy.deepcopy(model)
    # `activation_checkpointing_enable` is the transformers 5.x name of `gradient_checkpointing_enable`.
    checkpointed.activation_checkpointing_enable()
    calls = []
    # Checkpointing wraps the layers' `forward` (their own hooks stay outside): count a sub-module's calls instead.
    checkpointed.model.decoder_layers[0].ffn.register_forward_hook(lambda *args: calls.append(1))
    inputs = _inputs(processor, _images(2), [["cat", "dog"], ["red bus"]])
    results = []
    for candidate in (model, checkpointed):
        torch.manual_seed(3)  # denoising queries are random
        out = candidate(**inputs, labels=_labels())
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in candidate.named_parameters()}))
    assert len(calls) == 2  # the layer ran again during backward: it really was checkpointed
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------ invariances


def test_padding_invariance_across_concept_lists(processor):
    """An image with its concepts gives the same outputs alone and inside a batch of images with longer lists."""
    model = _model(processor).eval()
    images = _images(3, seed=4)
    concepts = [["cat", "dog"], ["red bus", "tree", "house", "bird", "car"], ["person", "vehicle", "animal"]]
    with torch.no_grad():
        alone = model(**_inputs(processor, images[:1], concepts[:1]))
        batched = model(**_inputs(processor, images, concepts))
    assert batched.logits.shape[-1] == 5
    torch.testing.assert_close(batched.logits[0, :, :2], alone.logits[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(batched.pred_boxes[0], alone.pred_boxes[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(batched.objectness_logits[0], alone.objectness_logits[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(batched.concept_embeds[0, :2], alone.concept_embeds[0], atol=1e-4, rtol=0)


def test_save_and_load_give_identical_outputs(processor, tmp_path):
    from transformers import AutoModelForZeroShotObjectDetection

    model = _model(processor).eval()
    inputs = _inputs(processor, _images(2), [["cat", "dog"], ["red bus"]])
    model.save_pretrained(tmp_path)
    for loaded in (
        DetClipV3ForObjectDetection.from_pretrained(tmp_path),
        AutoModelForZeroShotObjectDetection.from_pretrained(tmp_path),
    ):
        assert type(loaded) is DetClipV3ForObjectDetection
        loaded.eval()
        with torch.no_grad():
            expected, actual = model(**inputs), loaded(**inputs)
        assert torch.equal(actual.logits, expected.logits)
        assert torch.equal(actual.pred_boxes, expected.pred_boxes)
        assert torch.equal(actual.objectness_logits, expected.objectness_logits)


# ------------------------------------------------------------------------------------------------ concept cache


def test_concept_cache(processor):
    model = _model(processor).eval()
    vocabulary = ["cat", "dog", "red bus"]
    encoded = processor.encode_concepts([vocabulary])
    args = (encoded["input_ids"], encoded["attention_mask"], encoded["concept_mask"])
    encodes = []
    model.model.concept_encoder.register_forward_hook(
        lambda module, inp, out: encodes.append(inp[0].shape[0])
    )
    with torch.no_grad():
        uncached = model.embed_concepts(*args)
        cached = model.embed_concepts(*args, cache_keys=vocabulary)
        again = model.embed_concepts(*args, cache_keys=[vocabulary])
    torch.testing.assert_close(cached, uncached)
    torch.testing.assert_close(again, uncached)
    assert encodes == [3, 3]  # the second cached call encoded nothing
    assert set(model._concept_cache) == set(vocabulary)

    # A new image mixing known and new concepts only encodes the new one.
    encoded = processor.encode_concepts([["dog", "tree"]])
    with torch.no_grad():
        mixed = model.embed_concepts(
            encoded["input_ids"],
            encoded["attention_mask"],
            encoded["concept_mask"],
            cache_keys=["dog", "tree"],
        )
    assert encodes[-1] == 1
    torch.testing.assert_close(mixed[0, 0], uncached[0, 1])

    with pytest.raises(ValueError, match="one string per real concept"):
        model.embed_concepts(*args, cache_keys=["cat", "dog"])
    model.train()  # weights may change: the cache must not outlive training mode
    assert model._concept_cache == {}
    model.eval()
    with torch.no_grad():
        model.embed_concepts(*args, cache_keys=vocabulary)
    model.clear_concept_cache()
    assert model._concept_cache == {}


def test_a_vocabulary_of_1203_concepts_runs_in_one_forward(processor):
    model = _model(processor).eval()
    vocabulary = [f"thing {i}" for i in range(1203)]
    inputs = _inputs(processor, _images(1), [vocabulary])
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, model.config.num_queries, 1203)
    assert torch.isfinite(out.logits).all()


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_give_clear_errors(processor):
    model = _model(processor).eval()
    inputs = _inputs(processor, _images(2), [["cat", "dog"], ["red bus"]])

    no_concepts = {**inputs, "concept_mask": torch.tensor([[True, True], [False, False]])}
    with pytest.raises(ValueError, match=r"Image\(s\) \[1\] have no concepts"):
        model(**no_concepts)
    with pytest.raises(ValueError, match=r"have no concepts"):
        model(
            pixel_values=inputs["pixel_values"],
            concept_embeds=torch.zeros(2, 2, 32),
            concept_mask=torch.zeros(2, 2),
        )

    mismatched = {
        **inputs,
        "pixel_values": inputs["pixel_values"][:1],
        "pixel_mask": inputs["pixel_mask"][:1],
    }
    with pytest.raises(ValueError, match="Got 1 images but concepts for 2"):
        model(**mismatched)
    with pytest.raises(ValueError, match="Got 2 images but concepts for 3"):
        model(pixel_values=inputs["pixel_values"], concept_embeds=torch.zeros(3, 2, 32))

    with pytest.raises(ValueError, match="empty image"):
        model(pixel_values=torch.zeros(1, 3, 0, 64))
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        model(pixel_values=torch.zeros(1, 64, 64))
    with pytest.raises(TypeError, match="pixel_values must be a torch.FloatTensor"):
        model(pixel_values=np.zeros((1, 3, 64, 64), dtype=np.float32))
    nan_pixels = inputs["pixel_values"].clone()
    nan_pixels[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(**{**inputs, "pixel_values": nan_pixels})
    inf_pixels = inputs["pixel_values"].clone()
    inf_pixels[1, 2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model(**{**inputs, "pixel_values": inf_pixels})
    with pytest.raises(ValueError, match="pixel_mask shape"):
        model(**{**inputs, "pixel_mask": inputs["pixel_mask"][:, :10]})

    with pytest.raises(ValueError, match="either input_ids or concept_embeds"):
        model(**inputs, concept_embeds=torch.zeros(2, 2, 32))
    with pytest.raises(ValueError, match="concept_embeds must be"):
        model(pixel_values=inputs["pixel_values"], concept_embeds=torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match="Concept 1 of image 0 has no tokens"):
        mask = inputs["attention_mask"].clone()
        mask[0, 1] = 0
        model(**{**inputs, "attention_mask": mask})
    with pytest.raises(ValueError, match="concept_mask shape"):
        model(**{**inputs, "concept_mask": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="exceed the text encoder's"):
        long_ids = torch.zeros(2, 1, 64, dtype=torch.long)
        model(pixel_values=inputs["pixel_values"], input_ids=long_ids)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([{"boxes": [[0.5, 0.5, 0.0, 0.1]], "class_labels": [0]}] * 2, "non-positive width or height"),
        ([{"boxes": [[0.5, 0.5, -0.2, 0.1]], "class_labels": [0]}] * 2, "non-positive width or height"),
        ([{"boxes": [[0.5, float("inf"), 0.2, 0.1]], "class_labels": [0]}] * 2, "NaN or infinite"),
        ([{"boxes": [[1.4, 0.5, 0.2, 0.2]], "class_labels": [0]}] * 2, "outside the image"),
        ([{"boxes": [[0.5, 0.5, 0.2, 0.2]], "class_labels": [5]}] * 2, "must index the image's 2 concepts"),
        (
            [{"boxes": [[0.5, 0.5, 0.2, 0.2]], "class_labels": [0]}],
            "Got labels for 1 images but the batch has 2",
        ),
    ],
)
def test_invalid_labels_are_refused(processor, labels, message):
    model = _model(processor).train()
    inputs = _inputs(processor, _images(2), [["cat", "dog"], ["red bus"]])
    with pytest.raises(ValueError, match=message):
        model(**inputs, labels=labels)


# ------------------------------------------------------------------------------------------------ overfit

OVERFIT_CONCEPTS = ["red square", "blue circle", "green triangle"]
# Per image: (concept index, xyxy pixel box). Plain shapes on grey, 64 x 64.
OVERFIT_SCENES = [
    [(0, (6, 8, 30, 32)), (1, (36, 30, 60, 56))],
    [(2, (30, 4, 58, 30)), (0, (8, 36, 28, 58))],
]
OVERFIT_STEPS = 700


def _draw_scene(objects: list[tuple[int, tuple[int, int, int, int]]]) -> tuple[Image.Image, list[dict]]:
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    annotations = []
    for concept, (x0, y0, x1, y1) in objects:
        if concept == 0:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(220, 30, 30))
        elif concept == 1:
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=(30, 70, 220))
        else:
            draw.polygon([(x0, y1 - 1), ((x0 + x1) / 2, y0), (x1 - 1, y1 - 1)], fill=(30, 170, 50))
        box = [x0, y0, x1 - x0, y1 - y0]
        annotations.append({"bbox": box, "category_id": concept, "area": box[2] * box[3], "iscrowd": 0})
    return image, annotations


def _optimizer(model: DetClipV3ForObjectDetection) -> torch.optim.Optimizer:
    """AdamW with a low learning rate on the concept side (text tower and the alignment head's concept projection).

    With a randomly initialised text tower, training the concept side as fast as the rest pulls every concept
    embedding into the same direction (a saddle of the alignment loss); real recipes keep it slow as well.
    """
    concept_side = list(model.model.concept_encoder.parameters())
    concept_side += list(model.model.alignment_head.concept_proj.parameters())
    slow = {id(p) for p in concept_side}
    rest = [p for p in model.parameters() if id(p) not in slow]
    return torch.optim.AdamW(
        [{"params": concept_side, "lr": 1e-5}, {"params": rest, "lr": 1e-3}], weight_decay=1e-4
    )


def test_overfits_two_synthetic_images(processor):
    images, annotations = zip(*(_draw_scene(scene) for scene in OVERFIT_SCENES))
    batch = processor(
        images=list(images),
        text=[OVERFIT_CONCEPTS] * len(images),
        annotations=[{"image_id": i, "annotations": a} for i, a in enumerate(annotations)],
    )
    inputs = {key: batch[key] for key in INPUT_KEYS}
    labels = batch["labels"]
    # Denoising queries (with their label noise) are a training aid that fights memorising two images.
    model = _model(processor, seed=0, use_denoising=False).train()
    optimizer = _optimizer(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / OVERFIT_STEPS))
    )
    for _ in range(OVERFIT_STEPS):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()

    model.eval()
    with torch.no_grad():
        out = model(**inputs)
    for image_index, target in enumerate(labels):
        probs = out.logits[image_index].sigmoid()  # (Q, M)
        boxes = box_convert(out.pred_boxes[image_index], "cxcywh", "xyxy")
        gt_boxes = box_convert(target["boxes"], "cxcywh", "xyxy")
        for gt_box, concept in zip(gt_boxes, target["class_labels"].tolist()):
            # The query the model is most confident shows this concept must sit on the object ...
            best = int(probs[:, concept].argmax())
            iou = float(box_iou(gt_box[None], boxes[best][None]))
            assert iou > 0.5, f"image {image_index}, {OVERFIT_CONCEPTS[concept]}: IoU {iou:.2f}"
            # ... and name it: its highest-probability concept is the right one.
            assert int(probs[best].argmax()) == concept, f"image {image_index}: {probs[best].tolist()}"


def test_concept_encoder_ignores_trailing_padding_columns(clip_tokenizer):
    """Concepts padded to 8 or to 16 tokens give the same embeddings (trailing padding is trimmed, not encoded)."""
    torch.manual_seed(0)
    model = DetClipV3ForObjectDetection(tiny_config(clip_tokenizer, max_concept_tokens=16)).eval()
    short = clip_tokenizer(["red circle", "cat"], padding="max_length", max_length=8, return_tensors="pt")
    long = clip_tokenizer(["red circle", "cat"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        a = model.embed_concepts(short["input_ids"][None], short["attention_mask"][None])
        b = model.embed_concepts(long["input_ids"][None], long["attention_mask"][None])
    torch.testing.assert_close(a, b)


def test_frozen_backbone_batch_norm_keeps_statistics_and_round_trips(processor, tmp_path):
    from torchvision.ops import FrozenBatchNorm2d

    trained = _model(processor)
    backbone = trained.model.image_embedder.backbone
    # Give the batch norms non-trivial statistics, as a pretrained checkpoint has.
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    trained.save_pretrained(tmp_path / "plain")
    inputs = _inputs(processor, _images(2), [["red circle", "dog"], ["cat"]])
    with torch.no_grad():
        expected = trained.eval()(**inputs).logits

    frozen = DetClipV3ForObjectDetection.from_pretrained(tmp_path / "plain", freeze_backbone_batch_norm=True)
    modules = list(frozen.model.image_embedder.backbone.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in modules)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in modules)
    with torch.no_grad():
        # Train mode uses the checkpoint's statistics too: nothing about the backbone changes with the mode.
        torch.testing.assert_close(
            frozen.train().model.image_embedder.backbone(inputs["pixel_values"]).feature_maps,
            frozen.eval().model.image_embedder.backbone(inputs["pixel_values"]).feature_maps,
        )
        torch.testing.assert_close(frozen(**inputs).logits, expected)
    frozen.save_pretrained(tmp_path / "frozen")
    reloaded = DetClipV3ForObjectDetection.from_pretrained(tmp_path / "frozen").eval()
    assert reloaded.config.freeze_backbone_batch_norm
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected)
