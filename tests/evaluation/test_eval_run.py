"""`detclipv3 eval` end to end on a tiny checkpoint and a tiny synthetic COCO split."""

import json

import pytest
import torch
from tiny import build_clip_tokenizer, tiny_config

from detclipv3_hf import DetClipV3ForObjectCaptioning, DetClipV3ImageProcessor, DetClipV3Processor
from detclipv3_hf.cli import main
from detclipv3_hf.data import generate_synthetic_world


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    world = generate_synthetic_world(root / "world", num_train=1, num_val=3, seed=0, min_size=64, max_size=96)
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
        "max_label_length": 8,
        **processor.captioner_token_ids(),
    }
    torch.manual_seed(0)
    DetClipV3ForObjectCaptioning(
        tiny_config(processor.tokenizer, captioner_config=captioner)
    ).save_pretrained(root / "ckpt")
    processor.save_pretrained(root / "ckpt")
    return root, world


@pytest.mark.parametrize("extra", [[], ["--protocol", "lvis_fixed"], ["--vocabulary-free"]])
def test_eval_writes_results_json(setup, extra):
    root, world = setup
    annotations = world.val.coco_file
    out = root / f"results{len(extra)}.json"
    main(
        [
            "eval",
            "--model",
            str(root / "ckpt"),
            "--annotations",
            str(annotations),
            "--images",
            str(world.val.root),
            "--output",
            str(out),
            *extra,
        ]
    )
    record = json.loads(out.read_text())
    assert record["num_images"] == 3
    assert "AP" in record["metrics"] and "AP50" in record["metrics"]
    if "--vocabulary-free" in extra:
        assert "category_accuracy" in record["metrics"]


def test_vocabulary_free_predictions_carry_the_three_label_fields(setup):
    from PIL import Image

    from detclipv3_hf.evaluation.run import predict_dataset

    root, world = setup
    model = DetClipV3ForObjectCaptioning.from_pretrained(root / "ckpt").eval()
    processor = DetClipV3Processor.from_pretrained(root / "ckpt")
    ground_truth = json.loads(world.val.coco_file.read_text())
    predictions = predict_dataset(
        model, processor, ground_truth, world.val.root, vocabulary_free=True, batch_size=1, top_k=5
    )
    assert [p["image_id"] for p in predictions] == [info["id"] for info in ground_truth["images"]]
    for entry, info in zip(predictions, ground_truth["images"]):
        image = Image.open(world.val.root / info["file_name"])
        inputs = processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            generated = model.generate_object_labels(inputs["pixel_values"], inputs["pixel_mask"], top_k=5)
        (found,) = processor.post_process_object_captioning(
            generated, threshold=0.0, target_sizes=[(image.height, image.width)]
        )
        assert entry["phrases"] == [r["phrase"] for r in found]
        assert entry["categories"] == [r["category"] for r in found]
        assert entry["parent_categories"] == [r["parent_category"] for r in found]
        assert entry["boxes"].shape[0] == len(found) == len(entry["scores"])
