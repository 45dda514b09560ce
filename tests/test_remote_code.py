"""`save_pretrained` folders load with `trust_remote_code=True` in a Python process that cannot import detclipv3_hf."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import build_clip_tokenizer, tiny_config

import detclipv3_hf
from detclipv3_hf import (
    DetClipV3ForObjectDetection,
    DetClipV3ImageProcessor,
    DetClipV3ImageProcessorPil,
    DetClipV3Processor,
)

SIZE = {"shortest_edge": 64, "longest_edge": 64}
PACKAGE_SOURCE_ROOT = Path(detclipv3_hf.__file__).resolve().parents[1]  # src/ of the editable install
MODEL_FILES = ("configuration_detclipv3.py", "modeling_detclipv3.py", "loss_detclipv3.py")
PROCESSOR_FILES = ("processing_detclipv3.py", "image_processing_detclipv3.py", "image_processing_pil_detclipv3.py")
INPUT_KEYS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "concept_mask")

# Runs in a fresh interpreter. The editable install puts src/ on sys.path through a .pth file; removing that entry
# (and never starting from src/ or tests/) makes `import detclipv3_hf` fail, which the script checks first.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    hidden = os.path.realpath(sys.argv[2])
    sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != hidden]
    try:
        import detclipv3_hf
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"detclipv3_hf is importable from {detclipv3_hf.__file__}")

    import numpy as np
    import torch
    from transformers import (
        AutoConfig, AutoImageProcessor, AutoModel, AutoModelForZeroShotObjectDetection, AutoProcessor, pipeline,
    )

    folder, out_file = sys.argv[1], sys.argv[3]
    inputs = torch.load(os.path.join(folder, "inputs.pt"))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    detector = AutoModelForZeroShotObjectDetection.from_pretrained(folder, trust_remote_code=True).eval()
    trunk = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    report = {
        "config": type(config).__module__ + "." + type(config).__name__,
        "detector": type(detector).__module__ + "." + type(detector).__name__,
        "trunk": type(trunk).__module__ + "." + type(trunk).__name__,
    }
    with torch.no_grad():
        detection = detector(**inputs)
        trunk_out = trunk(**inputs)
    results = {"logits": detection.logits, "pred_boxes": detection.pred_boxes, "trunk_boxes": trunk_out.pred_boxes}

    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for backend in ("torchvision", "pil"):
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True, backend=backend)
        image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True, backend=backend)
        report[f"processor_{backend}"] = type(processor).__name__
        report[f"processor_image_{backend}"] = type(processor.image_processor).__name__
        report[f"image_processor_{backend}"] = type(image_processor).__name__
        features = processor(images=[image], text=[["cat", "red bus"]])
        results[f"pixel_values_{backend}"] = features["pixel_values"]
        results[f"input_ids_{backend}"] = features["input_ids"]

    detector_pipeline = pipeline("zero-shot-object-detection", model=folder, trust_remote_code=True)
    from PIL import Image
    report["pipeline"] = detector_pipeline(Image.fromarray(image), candidate_labels=["cat"], threshold=0.0)[:3]
    report["imported"] = sorted(name for name in sys.modules if name.startswith("detclipv3_hf"))
    torch.save({"report": report, "results": results}, out_file)
    """
)


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("remote") / "detclipv3-tiny"
    processor = DetClipV3Processor(DetClipV3ImageProcessor(size=SIZE), build_clip_tokenizer(), max_concept_tokens=8)
    torch.manual_seed(0)
    model = DetClipV3ForObjectDetection(tiny_config(processor.tokenizer)).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    rng = np.random.default_rng(1)
    features = processor(
        images=[rng.integers(0, 256, (64, 48, 3), dtype=np.uint8), rng.integers(0, 256, (50, 64, 3), dtype=np.uint8)],
        text=[["cat", "dog"], ["red bus"]],
    )
    inputs = {key: features[key] for key in INPUT_KEYS}
    torch.save(inputs, folder / "inputs.pt")
    with torch.no_grad():
        expected = model(**inputs)
    return folder, processor, inputs, expected


def test_save_pretrained_writes_auto_map_and_copies_the_code(saved_folder):
    folder = saved_folder[0]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_detclipv3.DetClipV3Config",
        "AutoModel": "modeling_detclipv3.DetClipV3Model",
        "AutoModelForZeroShotObjectDetection": "modeling_detclipv3.DetClipV3ForObjectDetection",
        "AutoModelForImageTextToText": "modeling_detclipv3.DetClipV3ForObjectCaptioning",
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_detclipv3.DetClipV3Processor"}
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == {
        "torchvision": "image_processing_detclipv3.DetClipV3ImageProcessor",
        "pil": "image_processing_pil_detclipv3.DetClipV3ImageProcessorPil",
    }
    for name in MODEL_FILES + PROCESSOR_FILES:
        assert (folder / name).read_text() == (PACKAGE_SOURCE_ROOT / "detclipv3_hf" / name).read_text()


@pytest.mark.parametrize("image_processor_class", [DetClipV3ImageProcessor, DetClipV3ImageProcessorPil])
def test_a_lone_image_processor_names_both_backends(tmp_path, image_processor_class):
    image_processor_class(size=SIZE).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert set(saved["auto_map"]["AutoImageProcessor"]) == {"torchvision", "pil"}
    assert (tmp_path / "image_processing_detclipv3.py").exists()
    assert (tmp_path / "image_processing_pil_detclipv3.py").exists()


def test_folder_loads_as_remote_code_without_the_package(saved_folder, tmp_path):
    folder, processor, inputs, expected = saved_folder
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")  # a private dynamic-module cache
    env["HF_HUB_OFFLINE"] = "1"
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    out_file = tmp_path / "remote.pt"
    completed = subprocess.run(
        [sys.executable, str(script), str(folder), str(PACKAGE_SOURCE_ROOT), str(out_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    loaded = torch.load(out_file)
    report, results = loaded["report"], loaded["results"]

    assert report["imported"] == []
    for key in ("config", "detector", "trunk"):
        assert report[key].startswith("transformers_modules."), report[key]
    assert report["detector"].endswith("modeling_detclipv3.DetClipV3ForObjectDetection")
    assert report["trunk"].endswith("modeling_detclipv3.DetClipV3Model")
    # Same weights, same code: the remote model gives the same outputs as the original.
    torch.testing.assert_close(results["logits"], expected.logits)
    torch.testing.assert_close(results["pred_boxes"], expected.pred_boxes)
    torch.testing.assert_close(results["trunk_boxes"], expected.pred_boxes)

    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    local = processor(images=[image], text=[["cat", "red bus"]])
    for backend, class_name in (("torchvision", "DetClipV3ImageProcessor"), ("pil", "DetClipV3ImageProcessorPil")):
        assert report[f"processor_{backend}"] == "DetClipV3Processor"
        assert report[f"processor_image_{backend}"] == class_name
        assert report[f"image_processor_{backend}"] == class_name
        torch.testing.assert_close(results[f"pixel_values_{backend}"], local["pixel_values"], atol=1e-3, rtol=0)
        assert torch.equal(results[f"input_ids_{backend}"], local["input_ids"])

    assert len(report["pipeline"]) == 3 and all(r["label"] == "cat" for r in report["pipeline"])
