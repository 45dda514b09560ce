"""The `object-captioning` pipeline and the captioning model as Hub remote code."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import build_clip_tokenizer, tiny_config
from transformers import pipeline

import detclipv3_hf
from detclipv3_hf import DetClipV3ForObjectCaptioning, DetClipV3ImageProcessor, DetClipV3Processor

FIELDS = {"score", "box", "label", "phrase", "category", "parent_category"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("captioning") / "ckpt"
    processor = DetClipV3Processor(
        DetClipV3ImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}),
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
    model = DetClipV3ForObjectCaptioning(tiny_config(processor.tokenizer, captioner_config=captioner)).eval()
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path, model, processor


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def test_pipeline_matches_the_model_api(folder):
    path, model, processor = folder
    captioner = pipeline("object-captioning", model=str(path))
    found = captioner(image(0), threshold=-1.0, top_k=4, num_beams=2)
    assert found and all(FIELDS <= r.keys() for r in found)
    inputs = processor(images=image(0), return_tensors="pt")
    direct = model.generate_object_labels(inputs["pixel_values"], inputs["pixel_mask"], top_k=4, num_beams=2)
    expected = processor.post_process_object_captioning(direct, threshold=-1.0, target_sizes=[(48, 64)])[0]
    assert [r["label"] for r in found] == [r["label"] for r in expected]
    np.testing.assert_allclose([r["score"] for r in found], [r["score"] for r in expected], rtol=1e-5)


def test_pipeline_takes_a_list_of_images(folder):
    captioner = pipeline("object-captioning", model=str(folder[0]))
    results = captioner([image(0), image(1)], threshold=-1.0, top_k=2)
    assert len(results) == 2 and all(isinstance(r, list) and r for r in results)


def test_pipeline_refuses_a_detector_only_model(folder, tmp_path):
    from detclipv3_hf import DetClipV3ForObjectDetection

    path, model, processor = folder
    with pytest.raises(ValueError, match="DetClipV3ForObjectCaptioning"):
        pipeline(
            "object-captioning",
            model=DetClipV3ForObjectDetection(model.config),
            tokenizer=processor.tokenizer,
            image_processor=processor.image_processor,
        )


REMOTE = textwrap.dedent(
    """
    import os, sys
    hidden = os.path.realpath(sys.argv[2])
    sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != hidden]
    try:
        import detclipv3_hf
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("detclipv3_hf is importable")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    pixel_values = torch.load(os.path.join(sys.argv[1], "pixels.pt"))
    out = model.generate_object_labels(pixel_values, top_k=3)
    torch.save({"class": type(model).__module__, "sequences": out.sequences,
                "labels": processor.batch_decode_labels(out.sequences)}, sys.argv[3])
    """
)


def test_captioning_folder_generates_the_same_labels_as_remote_code(folder, tmp_path):
    path, model, processor = folder
    pixel_values = processor(images=[image(2)], return_tensors="pt")["pixel_values"]
    torch.save(pixel_values, path / "pixels.pt")
    script = tmp_path / "remote.py"
    script.write_text(REMOTE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    source_root = os.path.dirname(os.path.dirname(os.path.realpath(detclipv3_hf.__file__)))
    done = subprocess.run(
        [sys.executable, str(script), str(path), source_root, str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt")
    assert remote["class"].startswith("transformers_modules.")
    local = model.generate_object_labels(pixel_values, top_k=3)
    assert torch.equal(remote["sequences"], local.sequences)
    assert remote["labels"] == processor.batch_decode_labels(local.sequences)
