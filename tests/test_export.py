"""Fixed-vocabulary export: the wrapper equals the model; ONNX (onnxruntime, CPU) and torch.export match PyTorch."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from tiny import tiny_config

from detclipv3_hf import DetClipV3ForObjectDetection, DetClipV3ImageProcessor, DetClipV3Processor
from detclipv3_hf.export import (
    DetClipV3FixedVocabularyDetector,
    add_export_arguments,
    compute_concept_embeddings,
    export_onnx,
    export_program,
    run_export,
)

VOCABULARY = ["cat", "red bus", "tree", "person"]


@pytest.fixture(scope="module")
def setup(clip_tokenizer):
    processor = DetClipV3Processor(
        DetClipV3ImageProcessor(size={"height": 64, "width": 64}), clip_tokenizer, max_concept_tokens=8
    )
    torch.manual_seed(0)
    model = DetClipV3ForObjectDetection(tiny_config(processor.tokenizer)).eval()
    with torch.no_grad():  # a fresh init has near-equal token scores: spread them out
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        # Identical query contents make a tie-swap in top-k selection a mere permutation of the queries (see below).
        model.model.query_embed.weight.zero_()
    embeds = compute_concept_embeddings(model, processor, VOCABULARY)
    return model, processor, DetClipV3FixedVocabularyDetector(model, embeds)


def _images(batch: int, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    pixel_values = torch.randn(batch, 3, 128, 128, generator=generator)
    pixel_mask = torch.ones(batch, 128, 128, dtype=torch.long)
    if padded:
        pixel_mask[-1, :, 88:] = 0  # a padded image
    return pixel_values, pixel_mask


def test_wrapper_equals_model_with_text_inputs(setup):
    model, processor, detector = setup
    pixel_values, pixel_mask = _images(2)
    concepts = processor.encode_concepts([VOCABULARY, VOCABULARY])
    with torch.no_grad():
        expected = model(pixel_values, pixel_mask=pixel_mask, **concepts)
        logits, boxes, objectness = detector(pixel_values, pixel_mask)
    torch.testing.assert_close(logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(boxes, expected.pred_boxes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(objectness, expected.objectness_logits, rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, model.config.num_queries, len(VOCABULARY))


def _query_order(pred_boxes: torch.Tensor) -> torch.Tensor:
    """`(B, Q)` indices that sort each image's queries by their predicted box (cx, then cy)."""
    key = pred_boxes[..., 0] * 1e3 + pred_boxes[..., 1]
    return key.argsort(dim=1)


def _gather_queries(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    index = order.view(order.shape + (1,) * (values.ndim - 2)).expand(*order.shape, *values.shape[2:])
    return torch.gather(values, 1, index)


def test_onnx_matches_pytorch_with_dynamic_batch_and_size(setup, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, _, detector = setup
    path = export_onnx(detector, tmp_path / "detector.onnx", image_size=(64, 64), batch_size=2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values", "pixel_mask"]
    checked = 0
    sizes = [(128, 128), (96, 160), (160, 96), (112, 144)]  # dynamic height and width (>= 96 px)
    for seed in range(12):
        batch = 1 + seed % 3  # 1 and 3 differ from the export batch
        height, width = sizes[seed % len(sizes)]
        pixel_values = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
        pixel_mask = torch.ones(batch, height, width, dtype=torch.long)
        outputs = session.run(None, {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
        with torch.no_grad():
            expected = detector(pixel_values, pixel_mask)
        # Queries whose selection scores tie to float precision may come out in another order from ONNX Runtime's
        # TopK; the learned query contents are zeroed in the fixture, so such a swap only permutes the queries.
        # Compare in a canonical query order (sorted by predicted box).
        got_order = _query_order(torch.from_numpy(outputs[1]))
        want_order = _query_order(expected[1])
        for got, want in zip(outputs, expected):
            got = _gather_queries(torch.from_numpy(got), got_order)
            want = _gather_queries(want, want_order)
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-3, rtol=0)
        checked += batch
    assert checked >= 3


def test_torch_export_matches_pytorch(setup):
    _, _, detector = setup
    program = export_program(detector, image_size=(64, 64), batch_size=2)
    pixel_values, pixel_mask = _images(3)
    with torch.no_grad():
        got = program.module()(pixel_values, pixel_mask)
        want = detector(pixel_values, pixel_mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Another image size through the same program: height and width are dynamic.
    pixel_values = torch.randn(1, 3, 150, 97, generator=torch.Generator().manual_seed(7))
    pixel_mask = torch.ones(1, 150, 97, dtype=torch.long)
    with torch.no_grad():
        got = program.module()(pixel_values, pixel_mask)
        want = detector(pixel_values, pixel_mask)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_export_cli_writes_file_and_vocabulary(setup, tmp_path):
    pytest.importorskip("onnxruntime")
    model, processor, _ = setup
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("cat\n\nred bus\n")
    parser = add_export_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [
            str(tmp_path / "ckpt"),
            str(tmp_path / "out" / "det.onnx"),
            "--vocabulary-file",
            str(vocab_file),
            "--image-size",
            "64",
            "64",
        ]
    )
    assert run_export(args) == 0
    assert (tmp_path / "out" / "det.onnx").stat().st_size > 0
    record = json.loads((tmp_path / "out" / "det.vocabulary.json").read_text())
    assert record["vocabulary"] == ["cat", "red bus"] and record["format"] == "onnx"


@pytest.mark.parametrize(
    "vocabulary, error",
    [([], ValueError), (["cat", "cat"], ValueError), (["cat", " "], ValueError), ("cat", TypeError)],
)
def test_bad_vocabulary(setup, vocabulary, error):
    model, processor, _ = setup
    with pytest.raises(error):
        compute_concept_embeddings(model, processor, vocabulary)


def test_bad_embeddings_and_images(setup):
    model, _, detector = setup
    with pytest.raises(ValueError, match=r"\(num_concepts, 32\)"):
        DetClipV3FixedVocabularyDetector(model, torch.zeros(3, 7))
    with pytest.raises(ValueError, match="pixel_values"):
        detector(torch.zeros(1, 1, 64, 64))
