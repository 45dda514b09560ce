"""The bundled demo model (``demo_model/``): it loads through every public door and its weights are trained.

One forward on one sample image: the model must find at least one ground-truth object with the right category and
IoU > 0.5, which a randomly initialised (or wrongly loaded) model does not do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.ops import box_convert, box_iou

import detclipv3_hf  # noqa: F401 - registers the Auto classes
from detclipv3_hf import DetClipV3ForObjectCaptioning, DetClipV3Processor
from detclipv3_hf.data.synthetic import CATEGORIES

DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo_model"
MAX_BYTES = 15 * 1024 * 1024

pytestmark = pytest.mark.skipif(
    not (DEMO_MODEL / "config.json").is_file(), reason="demo_model/ is not bundled"
)


@pytest.fixture(scope="module")
def demo():
    model = DetClipV3ForObjectCaptioning.from_pretrained(DEMO_MODEL).eval()
    processor = DetClipV3Processor.from_pretrained(DEMO_MODEL)
    truth = json.loads((DEMO_MODEL / "samples" / "ground_truth.json").read_text())
    return model, processor, truth


def test_weights_are_small_float16_and_load_as_float32(demo):
    from safetensors import safe_open

    weights = DEMO_MODEL / "model.safetensors"
    assert weights.stat().st_size <= MAX_BYTES
    with safe_open(str(weights), "pt") as handle:
        dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
    assert "F16" in dtypes and not dtypes & {
        "F32",
        "F64",
        "BF16",
    }  # integer buffers (position ids) stay integer
    model, _, _ = demo
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_loads_with_auto_class():
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    model = AutoModelForZeroShotObjectDetection.from_pretrained(DEMO_MODEL)
    assert type(model).__name__ == "DetClipV3ForObjectDetection"
    assert isinstance(AutoProcessor.from_pretrained(DEMO_MODEL), DetClipV3Processor)


def test_finds_a_sample_object_with_the_right_category(demo):
    """Vocabulary = the sample's own categories; among the top ``objects + 2`` detections one must have the right
    category and IoU > 0.5 with its object. Untrained weights do not localise, so this fails for them."""
    model, processor, truth = demo
    sample = truth[0]
    image = Image.open(DEMO_MODEL / "samples" / sample["file"]).convert("RGB")
    gt_labels = [o["category"] for o in sample["objects"]]
    names = sorted(set(gt_labels))
    assert set(names) <= set(CATEGORIES)
    inputs = processor(images=[image], text=names, return_tensors="pt")
    with torch.no_grad():
        outputs = model.model(**inputs)
    found = processor.post_process_grounded_object_detection(
        outputs,
        threshold=0.0,
        target_sizes=[(image.height, image.width)],
        text_labels=[names],
        top_k=len(gt_labels) + 2,
    )[0]
    gt_boxes = box_convert(
        torch.tensor([o["bbox_xywh"] for o in sample["objects"]], dtype=torch.float32), "xywh", "xyxy"
    )
    iou = box_iou(found["boxes"].float(), gt_boxes)  # (detections, objects)
    hits = [
        (d, g)
        for d in range(iou.shape[0])
        for g in range(iou.shape[1])
        if iou[d, g] > 0.5 and found["text_labels"][d] == gt_labels[g]
    ]
    assert hits, (
        f"no detection matches a ground-truth object: {found['text_labels']} vs {gt_labels}, IoU {iou}"
    )


def test_remote_code_copies_match_the_package_sources():
    """demo_model/ ships the model files as Hub remote code; they must be the package's current sources, not drift."""
    from pathlib import Path

    source = Path(detclipv3_hf.__file__).parent
    demo = Path(__file__).resolve().parents[1] / "demo_model"
    copies = sorted(p.name for p in demo.glob("*.py"))
    assert copies, "demo_model/ carries no remote-code files"
    for name in copies:
        assert (demo / name).read_text() == (source / name).read_text(), f"demo_model/{name} is stale"
