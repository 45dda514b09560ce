"""The stock zero-shot-object-detection pipeline and DetClipV3ZeroShotObjectDetectionPipeline on a saved tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import build_clip_tokenizer, tiny_config
from transformers import ZeroShotObjectDetectionPipeline, pipeline

from detclipv3_hf import (
    DetClipV3ForObjectDetection,
    DetClipV3ImageProcessor,
    DetClipV3Processor,
    DetClipV3ZeroShotObjectDetectionPipeline,
)

SIZE = {"shortest_edge": 64, "longest_edge": 64}
THRESHOLD = 0.3
# The exact-agreement test also needs detections of several labels: a lower bar for its randomly initialised model.
JOINT_THRESHOLD = 0.05


def _save_tiny_model(folder, **overrides) -> DetClipV3ForObjectDetection:
    processor = DetClipV3Processor(DetClipV3ImageProcessor(size=SIZE), build_clip_tokenizer(), max_concept_tokens=8)
    torch.manual_seed(0)
    model = DetClipV3ForObjectDetection(tiny_config(processor.tokenizer, **overrides)).eval()
    with torch.no_grad():
        # A fresh model scores every pair at the focal prior (~0.01); spread the scores so that thresholds and
        # sorting are exercised.
        model.model.alignment_head.log_scale.fill_(3.0)
        model.model.alignment_head.bias.fill_(0.0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model


def _image(seed: int, height: int = 50, width: int = 60) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def default_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detclipv3_default")
    _save_tiny_model(folder)
    return folder


@pytest.fixture(scope="module")
def independent_folder(tmp_path_factory):
    """A model whose concepts cannot interact, so per-label and joint forwards must agree exactly.

    Concepts meet in the encoder fusion and the decoder's concept cross-attention (both off here), and in query
    selection: the top tokens by best concept score fill the query slots in score order, and each slot has its own
    learned content. With more query slots than encoder tokens every token is selected, and with zero content
    queries the decoder is permutation-equivariant over its queries, so the slot order no longer matters.
    """
    folder = tmp_path_factory.mktemp("detclipv3_independent")
    model = _save_tiny_model(folder, fusion="none", decoder_concept_cross_attention=False, num_queries=128)
    with torch.no_grad():
        model.model.query_embed.weight.zero_()
    model.save_pretrained(folder)
    return folder


def _check_format(results, labels, image):
    assert results == sorted(results, key=lambda r: r["score"], reverse=True)
    for result in results:
        assert set(result) == {"score", "label", "box"}
        assert result["label"] in labels and result["score"] > THRESHOLD
        box = result["box"]
        assert set(box) == {"xmin", "ymin", "xmax", "ymax"} and all(isinstance(v, int) for v in box.values())
        assert 0 <= box["xmin"] <= box["xmax"] <= image.width and 0 <= box["ymin"] <= box["ymax"] <= image.height


def _same_detections(actual, expected):
    def key(result):
        return (result["label"], tuple(result["box"].values()), result["score"])

    actual, expected = sorted(actual, key=key), sorted(expected, key=key)
    assert [(r["label"], r["box"]) for r in actual] == [(r["label"], r["box"]) for r in expected]
    np.testing.assert_allclose([r["score"] for r in actual], [r["score"] for r in expected], atol=1e-5)


def test_stock_pipeline_works_out_of_the_box(default_folder):
    detector = pipeline("zero-shot-object-detection", model=str(default_folder))
    assert type(detector) is ZeroShotObjectDetectionPipeline
    assert isinstance(detector.model, DetClipV3ForObjectDetection)
    image, labels = _image(0), ["cat", "red bus"]
    results = detector(image, candidate_labels=labels, threshold=THRESHOLD)
    assert results, "the spread-out tiny model should give detections above the threshold"
    _check_format(results, labels, image)

    images = [_image(1), _image(2, 40, 64)]
    batched = detector(images, candidate_labels=labels, threshold=THRESHOLD)
    assert len(batched) == 2
    per_image = detector(images, candidate_labels=[["cat"], ["dog", "tree", "bird"]], threshold=THRESHOLD)
    _check_format(per_image[0], ["cat"], images[0])
    _check_format(per_image[1], ["dog", "tree", "bird"], images[1])
    assert {r["label"] for r in per_image[0]} <= {"cat"}


def test_joint_pipeline_matches_the_stock_pipeline_when_concepts_are_independent(independent_folder):
    stock = pipeline("zero-shot-object-detection", model=str(independent_folder))
    joint = pipeline(
        "zero-shot-object-detection",
        model=str(independent_folder),
        pipeline_class=DetClipV3ZeroShotObjectDetectionPipeline,
    )
    assert type(joint) is DetClipV3ZeroShotObjectDetectionPipeline
    assert isinstance(joint.processor, DetClipV3Processor)
    image, labels = _image(3), ["cat", "dog", "red bus"]
    expected = stock(image, candidate_labels=labels, threshold=JOINT_THRESHOLD)
    actual = joint(image, candidate_labels=labels, threshold=JOINT_THRESHOLD)
    assert len({r["label"] for r in expected}) > 1  # the comparison covers several labels
    _same_detections(actual, expected)
    # top_k keeps the best detections, as the stock pipeline does.
    _same_detections(
        joint(image, candidate_labels=labels, threshold=JOINT_THRESHOLD, top_k=3),
        stock(image, candidate_labels=labels, threshold=JOINT_THRESHOLD, top_k=3),
    )
    # Lists of images with per-image labels, and the comma-separated string form.
    images = [_image(4), _image(5, 64, 40)]
    per_image_labels = [["cat", "tree"], ["dog"]]
    for got, want in zip(
        joint(images, candidate_labels=per_image_labels, threshold=JOINT_THRESHOLD),
        stock(images, candidate_labels=per_image_labels, threshold=JOINT_THRESHOLD),
    ):
        _same_detections(got, want)
    _same_detections(
        joint(image, candidate_labels="cat,dog", threshold=JOINT_THRESHOLD),
        stock(image, candidate_labels="cat,dog", threshold=JOINT_THRESHOLD),
    )


def test_joint_pipeline_runs_one_forward_and_caches_the_vocabulary(default_folder):
    joint = pipeline(
        "zero-shot-object-detection", model=str(default_folder), pipeline_class=DetClipV3ZeroShotObjectDetectionPipeline
    )
    forwards, encoded = [], []
    joint.model.model.register_forward_hook(lambda *args: forwards.append(1))
    joint.model.model.concept_encoder.register_forward_hook(lambda module, inp, out: encoded.append(inp[0].shape[0]))
    image, labels = _image(6), ["cat", "dog", "red bus", "tree"]
    first = joint(image, candidate_labels=labels, threshold=THRESHOLD)
    assert forwards == [1] and encoded == [4]  # one forward for all four labels
    _check_format(first, labels, image)
    second = joint(_image(7), candidate_labels=labels, threshold=THRESHOLD)
    assert forwards == [1, 1] and encoded == [4]  # the fixed vocabulary was not encoded again
    _check_format(second, labels, image)
    joint(image, candidate_labels=["cat", "bird"], threshold=THRESHOLD)
    assert encoded == [4, 1]  # only the new label


def test_joint_pipeline_from_components_and_bad_labels(default_folder):
    model = DetClipV3ForObjectDetection.from_pretrained(default_folder)
    processor = DetClipV3Processor.from_pretrained(default_folder)
    joint = DetClipV3ZeroShotObjectDetectionPipeline(
        model=model, image_processor=processor.image_processor, tokenizer=processor.tokenizer
    )
    assert isinstance(joint.processor, DetClipV3Processor)
    assert joint.processor.max_concept_tokens == model.config.max_concept_tokens
    _check_format(joint(_image(8), candidate_labels=["cat"], threshold=THRESHOLD), ["cat"], _image(8))
    with pytest.raises(ValueError, match="candidate_labels must be a non-empty"):
        joint(_image(8), candidate_labels=[])
    with pytest.raises(ValueError, match="is empty"):
        joint(_image(8), candidate_labels=["cat", "  "])
