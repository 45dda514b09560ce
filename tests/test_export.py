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
    with torch.no_grad():  # a fresh init has near-equal token scores (see _selection_margin): spread them out
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    embeds = compute_concept_embeddings(model, processor, VOCABULARY)
    return model, processor, DetClipV3FixedVocabularyDetector(model, embeds)


def _images(batch: int, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch)
    pixel_values = torch.randn(batch, 3, 64, 64, generator=generator)
    pixel_mask = torch.ones(batch, 64, 64, dtype=torch.long)
    if padded:
        pixel_mask[-1, :, 44:] = 0  # a padded image
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


def _selection_margin(detector: DetClipV3FixedVocabularyDetector, pixel_values: torch.Tensor) -> float:
    """Smallest gap between the sorted token scores of language-guided query selection, over the batch.

    Each selected token's rank decides which learned query content it gets, so two tokens whose scores agree to float
    precision may swap between runtimes (ONNX Runtime's TopK vs torch.topk) and change those queries' outputs. The ONNX
    comparison runs on images whose ranking is unambiguous.
    """
    trunk = detector.trunk
    mask = torch.ones_like(pixel_values[:, 0], dtype=torch.bool)
    concepts = detector.concept_embeds[None].expand(pixel_values.shape[0], -1, -1)
    concept_mask = torch.ones(concepts.shape[:2], dtype=torch.bool)
    with torch.no_grad():
        tokens, token_mask, pos, shapes, ratios = trunk._embed_image(pixel_values, mask)
        memory, concepts = trunk._encode(tokens, token_mask, pos, shapes, ratios, concepts, concept_mask)
        anchors, valid = trunk._proposal_anchors(token_mask, shapes, ratios)
        proposals = trunk.enc_output_norm(trunk.enc_output(memory.masked_fill(~valid[..., None], 0.0)))
        best = trunk.alignment_head(proposals, concepts, concept_mask).max(-1).values
    ranked = best.sort(dim=1, descending=True).values[:, : trunk.config.num_queries + 1]
    return float((ranked[:, :-1] - ranked[:, 1:]).min())


def test_onnx_matches_pytorch_with_dynamic_batch(setup, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, _, detector = setup
    path = export_onnx(detector, tmp_path / "detector.onnx", image_size=(64, 64), batch_size=2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values", "pixel_mask"]
    checked = 0
    for seed in range(40):
        batch = 1 + seed % 3  # 1 and 3 differ from the export batch
        pixel_values = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        if _selection_margin(detector, pixel_values) < 1e-4:
            continue
        pixel_mask = torch.ones(batch, 64, 64, dtype=torch.long)
        outputs = session.run(None, {"pixel_values": pixel_values.numpy(), "pixel_mask": pixel_mask.numpy()})
        with torch.no_grad():
            expected = detector(pixel_values, pixel_mask)
        for got, want in zip(outputs, expected):
            np.testing.assert_allclose(got, want.numpy(), atol=1e-3, rtol=0)
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


def test_export_cli_writes_file_and_vocabulary(setup, tmp_path):
    pytest.importorskip("onnxruntime")
    model, processor, _ = setup
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("cat\n\nred bus\n")
    parser = add_export_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        [str(tmp_path / "ckpt"), str(tmp_path / "out" / "det.onnx"), "--vocabulary-file", str(vocab_file),
         "--image-size", "64", "64"]
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
