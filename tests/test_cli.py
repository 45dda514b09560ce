"""`detclipv3 detect` and `detclipv3 caption` on a tiny saved checkpoint."""

import json

import pytest
import torch
from PIL import Image
from tiny import build_clip_tokenizer, tiny_config

from detclipv3_hf import DetClipV3ForObjectCaptioning, DetClipV3ImageProcessor, DetClipV3Processor
from detclipv3_hf.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    processor = DetClipV3Processor(
        DetClipV3ImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}),
        build_clip_tokenizer(),
        max_concept_tokens=8,
    )
    captioner = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "n_points": 2,
        "max_label_length": 6,
        "max_position_embeddings": 80,
        **processor.captioner_token_ids(),
    }
    torch.manual_seed(0)
    DetClipV3ForObjectCaptioning(
        tiny_config(processor.tokenizer, captioner_config=captioner)
    ).save_pretrained(folder)
    processor.save_pretrained(folder)
    image = folder / "image.png"
    Image.new("RGB", (80, 60), (200, 30, 30)).save(image)
    return folder, image


def test_detect_writes_png_and_json(checkpoint, tmp_path):
    folder, image = checkpoint
    assert (
        main(
            [
                "detect",
                str(image),
                "--model",
                str(folder),
                "--concepts",
                "red square, cat",
                "--threshold",
                "0",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    detections = json.loads((tmp_path / "image_detect.json").read_text())
    assert detections and {d["label"] for d in detections} <= {"red square", "cat"}
    assert all(len(d["box"]) == 4 for d in detections)
    assert Image.open(tmp_path / "image_detect.png").size == (80, 60)


def test_caption_writes_structured_labels(checkpoint, tmp_path):
    folder, image = checkpoint
    assert (
        main(
            [
                "caption",
                str(image),
                "--model",
                str(folder),
                "--threshold=-1",
                "--top-k",
                "3",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "image_caption.json").read_text())
    assert results and all(
        {"phrase", "category", "parent_category", "label", "box", "score"} <= r.keys() for r in results
    )


def test_detect_without_concepts_is_a_clear_error(checkpoint, tmp_path):
    folder, image = checkpoint
    with pytest.raises(SystemExit, match="at least one name"):
        main(["detect", str(image), "--model", str(folder), "--concepts", " , ", "--output", str(tmp_path)])
