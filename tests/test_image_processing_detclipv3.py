"""Tests of the DetCLIPv3 image processors (torchvision and PIL backends) and the shared detection post-processing."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from detclipv3_hf.image_processing_detclipv3 import DetClipV3ImageProcessor, post_process_detection_outputs
from detclipv3_hf.image_processing_pil_detclipv3 import DetClipV3ImageProcessorPil

SIZE = {"shortest_edge": 48, "longest_edge": 80}
BACKENDS = [DetClipV3ImageProcessor, DetClipV3ImageProcessorPil]
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _smooth_rgb(height: int, width: int) -> np.ndarray:
    """A gradient image (JPEG-friendly, orientation-revealing)."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack(
        [xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs + ys) % 256], -1
    ).astype(np.uint8)


@pytest.fixture(params=BACKENDS, ids=["torchvision", "pil"])
def processor(request):
    return request.param(size=SIZE)


def _unnormalize(pixel_values: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalized -> 0..255."""
    return (pixel_values * STD[:, None, None] + MEAN[:, None, None]) * 255.0


# ------------------------------------------------------------------------------------------------ outputs


def test_outputs_shapes_padding_and_mask(processor):
    images = [PIL.Image.fromarray(_rgb(60, 90)), PIL.Image.fromarray(_rgb(100, 40, seed=1))]
    out = processor(images)
    pixel_values, pixel_mask = out["pixel_values"], out["pixel_mask"]
    assert pixel_values.dtype == torch.float32 and pixel_mask.dtype == torch.long
    assert pixel_values.shape[:2] == (2, 3) and pixel_mask.shape == (2, *pixel_values.shape[-2:])
    # 60x90 -> shortest edge 48 gives 48x72; 100x40 -> 120x48 exceeds 80, so the longest edge caps it at 80x32.
    for i, (h, w) in enumerate([(48, 72), (80, 32)]):
        assert pixel_mask[i, :h, :w].all() and pixel_mask[i].sum() == h * w
        assert (pixel_values[i][:, pixel_mask[i] == 0] == 0).all()
    assert tuple(pixel_values.shape[-2:]) == (80, 72)


def test_single_image_equals_same_image_in_batch(processor):
    image = PIL.Image.fromarray(_rgb(50, 70))
    alone = processor(image)["pixel_values"][0]
    batched = processor([PIL.Image.fromarray(_rgb(90, 30, seed=3)), image])
    h, w = alone.shape[-2:]
    torch.testing.assert_close(batched["pixel_values"][1, :, :h, :w], alone)


def test_pad_size_and_do_pad(processor):
    image = _rgb(48, 64)
    out = processor(image, pad_size={"height": 70, "width": 90})
    assert tuple(out["pixel_values"].shape) == (1, 3, 70, 90) and out["pixel_mask"].sum() == 48 * 64
    with pytest.raises(ValueError, match="pad_size"):
        processor(image, pad_size={"height": 10, "width": 10})
    with pytest.raises(ValueError, match="do_pad"):
        processor([_rgb(48, 64), _rgb(64, 48)], do_pad=False)
    assert processor([_rgb(48, 64), _rgb(48, 64, seed=2)], do_pad=False)["pixel_mask"].all()


def test_return_numpy(processor):
    out = processor(_rgb(40, 40), return_tensors="np")
    assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].dtype == np.float32


def test_save_and_reload(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = type(processor).from_pretrained(tmp_path)
    assert reloaded.size == processor.size
    image = _rgb(33, 47)
    torch.testing.assert_close(reloaded(image)["pixel_values"], processor(image)["pixel_values"])


# ------------------------------------------------------------------------------------------------ backends


def _backend_inputs():
    rgb = _rgb(37, 53)
    gray = np.random.default_rng(5).integers(0, 256, (61, 45), dtype=np.uint8)
    rgba = np.concatenate(
        [_rgb(30, 70, seed=7), np.random.default_rng(8).integers(0, 256, (30, 70, 1), np.uint8)], -1
    )
    return {
        "pil_rgb_upscale": PIL.Image.fromarray(rgb),
        "pil_rgb_downscale": PIL.Image.fromarray(_rgb(160, 240, seed=2)),
        "pil_gray": PIL.Image.fromarray(gray),
        "pil_rgba": PIL.Image.fromarray(rgba),
        "pil_palette": PIL.Image.fromarray(_rgb(41, 33, seed=4)).convert("P"),
        "pil_16bit": PIL.Image.fromarray(gray.astype(np.uint16) * 257),
        "numpy_hwc_float": _rgb(50, 64, seed=9).astype(np.float32) / 255.0,
        "numpy_chw_uint8": _rgb(44, 66, seed=10).transpose(2, 0, 1).copy(),
        "torch_chw_float": torch.rand(3, 90, 120, generator=torch.Generator().manual_seed(0)),
        "numpy_2d_gray": gray,
    }


@pytest.mark.parametrize("name", list(_backend_inputs()))
def test_backends_agree(name):
    image = _backend_inputs()[name]
    torchvision_out = DetClipV3ImageProcessor(size=SIZE)(image)
    pil_out = DetClipV3ImageProcessorPil(size=SIZE)(image)
    assert torchvision_out["pixel_values"].shape == pil_out["pixel_values"].shape
    torch.testing.assert_close(torchvision_out["pixel_values"], pil_out["pixel_values"], atol=1e-3, rtol=0)
    assert torch.equal(torchvision_out["pixel_mask"], pil_out["pixel_mask"])


def test_backends_agree_at_default_size():
    image = PIL.Image.fromarray(_rgb(64, 96))
    a = DetClipV3ImageProcessor()(image)["pixel_values"]
    b = DetClipV3ImageProcessorPil()(image)["pixel_values"]
    assert tuple(a.shape[-2:]) == (800, 1200)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------------------------ input modes


def test_grayscale_is_replicated(processor):
    gray = np.random.default_rng(0).integers(0, 256, (40, 52), dtype=np.uint8)
    from_gray = processor(PIL.Image.fromarray(gray))["pixel_values"]
    from_rgb = processor(np.repeat(gray[..., None], 3, -1))["pixel_values"]
    torch.testing.assert_close(from_gray, from_rgb)


@pytest.mark.parametrize("mode", ["I;16", "I", "uint16"])
def test_16bit_images_are_scaled_not_clipped(processor, mode):
    gray8 = np.random.default_rng(1).integers(0, 256, (40, 52), dtype=np.uint8)
    wide = gray8.astype(np.uint16) * 257  # 255 -> 65535
    if mode == "I;16":
        image = PIL.Image.fromarray(wide)
        assert image.mode == "I;16"
    elif mode == "I":
        image = PIL.Image.fromarray(wide.astype(np.int32))
        assert image.mode == "I"
    else:
        image = wide
    out = processor(image)["pixel_values"]
    torch.testing.assert_close(out, processor(PIL.Image.fromarray(gray8))["pixel_values"], atol=1e-4, rtol=0)
    assert _unnormalize(out[0]).min() < 250  # clipping to 255 would make the image almost all white


def test_rgba_is_composited_on_white(processor):
    rgb = _rgb(40, 40)
    opaque = np.concatenate([rgb, np.full((40, 40, 1), 255, np.uint8)], -1)
    transparent = np.concatenate([rgb, np.zeros((40, 40, 1), np.uint8)], -1)
    torch.testing.assert_close(
        processor(PIL.Image.fromarray(opaque))["pixel_values"], processor(rgb)["pixel_values"]
    )
    white = _unnormalize(processor(PIL.Image.fromarray(transparent))["pixel_values"][0])
    torch.testing.assert_close(white, torch.full_like(white, 255.0), atol=1e-3, rtol=0)
    # The same rule for RGBA arrays and tensors.
    torch.testing.assert_close(processor(opaque)["pixel_values"], processor(rgb)["pixel_values"])


def test_palette_image_matches_its_rgb(processor):
    palette = PIL.Image.fromarray(_rgb(36, 48)).convert("P")
    torch.testing.assert_close(
        processor(palette)["pixel_values"], processor(palette.convert("RGB"))["pixel_values"]
    )


def test_channel_layouts_and_types_agree(processor):
    hwc = _rgb(40, 56)
    reference = processor(hwc)["pixel_values"]
    for variant in (
        hwc.transpose(2, 0, 1).copy(),
        torch.from_numpy(hwc).permute(2, 0, 1),
        torch.from_numpy(hwc).permute(2, 0, 1).float() / 255.0,
        hwc.astype(np.float64) / 255.0,
        PIL.Image.fromarray(hwc),
    ):
        torch.testing.assert_close(processor(variant)["pixel_values"], reference, atol=1e-4, rtol=0)


def test_exif_orientation_is_applied(processor):
    raw = _smooth_rgb(24, 64)  # wide image
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the displayed image is tall
    buffer = io.BytesIO()
    PIL.Image.fromarray(raw).save(buffer, format="JPEG", exif=exif, quality=95)
    jpeg = PIL.Image.open(io.BytesIO(buffer.getvalue()))
    assert jpeg.getexif().get(0x0112) == 6

    decoded = np.asarray(jpeg.convert("RGB"))  # same pixels, orientation not applied
    upright = PIL.Image.fromarray(decoded).transpose(PIL.Image.Transpose.ROTATE_270)
    out = processor(jpeg, annotations={"image_id": 0, "annotations": []})
    assert out["labels"][0]["orig_size"].tolist() == [64, 24]
    torch.testing.assert_close(out["pixel_values"], processor(upright)["pixel_values"])


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "bad",
    [np.zeros((0, 10, 3), np.uint8), np.zeros((12, 0), np.uint8), PIL.Image.new("RGB", (0, 5))],
    ids=["numpy-zero-height", "numpy-zero-width", "pil-zero-width"],
)
def test_empty_image_is_refused_with_index_and_size(processor, bad):
    with pytest.raises(ValueError, match=r"Image 1 is empty.*\(\d+, \d+\)"):
        processor([_rgb(20, 20), bad])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_pixels_are_refused(processor, value):
    array = np.random.default_rng(0).random((20, 20, 3)).astype(np.float32)
    array[3, 4, 1] = value
    with pytest.raises(ValueError, match="Image 0 contains non-finite"):
        processor(array)
    tensor = torch.rand(3, 20, 20)
    tensor[0, 0, 0] = value
    with pytest.raises(ValueError, match="non-finite"):
        processor(tensor)


def test_out_of_range_and_unsupported_inputs_are_refused(processor):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        processor(np.full((20, 20, 3), 200.0, np.float32))
    with pytest.raises(ValueError, match="8-bit"):
        processor(np.full((20, 20, 3), 1000, np.int64))
    with pytest.raises(ValueError, match="channel"):
        processor(np.zeros((20, 20, 7), np.uint8))
    with pytest.raises(TypeError, match="Image 1 has type int"):
        processor([_rgb(10, 10), 3])
    with pytest.raises(TypeError, match="dict"):
        processor({"not": "an image"})


# ------------------------------------------------------------------------------------------------ annotations


def _annotation(image_id: int, *boxes_and_classes):
    return {
        "image_id": image_id,
        "annotations": [
            {"bbox": list(box), "category_id": cls, "area": 1.0} for box, cls in boxes_and_classes
        ],
    }


def test_annotations_follow_the_resize(processor):
    images = [_rgb(60, 90), _rgb(100, 40, seed=1)]
    boxes = [[10.0, 20.0, 30.0, 25.0], [5.0, 50.0, 30.0, 45.0]]
    annotations = [_annotation(7, (boxes[0], 3)), _annotation(8, (boxes[1], 5), ([0.0, 0.0, 40.0, 100.0], 1))]
    out = processor(images, annotations=annotations)
    labels = out["labels"]
    assert [lab["image_id"].item() for lab in labels] == [7, 8]
    assert labels[1]["class_labels"].tolist() == [5, 1]
    for i, (image, box) in enumerate(zip(images, boxes)):
        lab = labels[i]
        assert lab["boxes"].dtype == torch.float32 and lab["boxes"].shape == (
            len(annotations[i]["annotations"]),
            4,
        )
        assert ((lab["boxes"] >= 0) & (lab["boxes"] <= 1)).all()
        orig_h, orig_w = image.shape[:2]
        new_h, new_w = lab["size"].tolist()
        assert lab["orig_size"].tolist() == [orig_h, orig_w]
        assert out["pixel_mask"][i].sum() == new_h * new_w
        cx, cy, w, h = lab["boxes"][0].tolist()
        resized_xywh = torch.tensor([(cx - w / 2) * new_w, (cy - h / 2) * new_h, w * new_w, h * new_h])
        scale = torch.tensor([new_w / orig_w, new_h / orig_h] * 2)
        torch.testing.assert_close(resized_xywh, torch.tensor(box) * scale, atol=1e-3, rtol=0)
    # The whole-image box covers the whole resized image.
    torch.testing.assert_close(labels[1]["boxes"][1], torch.tensor([0.5, 0.5, 1.0, 1.0]))


def test_annotations_are_the_same_for_both_backends():
    images = [_rgb(60, 90), _rgb(33, 47)]
    annotations = [_annotation(0, ([1, 2, 30, 40], 1)), _annotation(1, ([3, 4, 10, 20], 2))]
    a = DetClipV3ImageProcessor(size=SIZE)(images, annotations=annotations)["labels"]
    b = DetClipV3ImageProcessorPil(size=SIZE)(images, annotations=annotations)["labels"]
    for la, lb in zip(a, b):
        assert la.keys() == lb.keys()
        for key in la:
            torch.testing.assert_close(la[key], lb[key])


def test_crowd_and_empty_annotations(processor):
    ann = {"image_id": 1, "annotations": [{"bbox": [1, 1, 5, 5], "category_id": 2, "iscrowd": 1}]}
    lab = processor(_rgb(30, 30), annotations=[ann])["labels"][0]
    assert lab["boxes"].shape == (0, 4) and lab["class_labels"].shape == (0,)


def test_slightly_out_of_bounds_box_is_clipped(processor):
    lab = processor(_rgb(40, 50), annotations=_annotation(0, ([-0.5, 10.0, 50.7, 20.0], 1)))["labels"][0]
    cx, _, w, _ = lab["boxes"][0].tolist()
    assert cx - w / 2 == pytest.approx(0.0, abs=1e-6) and cx + w / 2 == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ([5.0, 5.0, -3.0, 4.0], "non-positive width or height"),
        ([5.0, 5.0, 4.0, 0.0], "non-positive width or height"),
        ([30.0, 5.0, 25.0, 4.0], "outside the image"),
        ([-3.0, 5.0, 10.0, 4.0], "outside the image"),
        ([1.0, 2.0, 3.0], "4 numbers"),
        ([1.0, float("nan"), 3.0, 4.0], "non-finite"),
    ],
)
def test_bad_boxes_name_image_annotation_and_box(processor, box, message):
    annotations = [_annotation(0, ([1, 1, 4, 4], 1)), _annotation(1, ([1, 1, 4, 4], 1), (box, 2))]
    with pytest.raises(ValueError, match=message) as info:
        processor([_rgb(30, 40), _rgb(30, 40)], annotations=annotations)
    text = str(info.value)
    assert "Annotation 1 of image 1" in text and str(box[0]) in text


def test_annotation_count_and_type_errors(processor):
    with pytest.raises(ValueError, match="2 images but 1 annotations"):
        processor([_rgb(20, 20), _rgb(20, 20)], annotations=[_annotation(0)])
    with pytest.raises(TypeError, match="'annotations' list"):
        processor(_rgb(20, 20), annotations=[{"image_id": 0}])
    with pytest.raises(TypeError, match="category_id"):
        processor(_rgb(20, 20), annotations=_annotation(0, ([1, 1, 4, 4], "cat")))


# ------------------------------------------------------------------------------------------------ post-processing


def _outputs(with_mask: bool = True):
    """Two images, 4 queries, 3 concept slots; image 1 has only 2 real concepts (slot 2 padded)."""
    logits = torch.tensor(
        [
            [[2.0, -1.0, 0.0], [-3.0, -2.0, 1.0], [-9.0, -9.0, -9.0], [0.5, 3.0, -1.0]],
            [[-1.0, 0.2, 50.0], [1.5, -2.0, 50.0], [-9.0, -9.0, 50.0], [-0.5, 0.0, 50.0]],
        ]
    )
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).expand(2, 4, 4).clone()
    boxes[:, 1] = torch.tensor([0.25, 0.75, 0.5, 0.5])
    outputs = {"logits": logits, "pred_boxes": boxes, "objectness_logits": torch.zeros(2, 4)}
    if with_mask:
        outputs["concept_mask"] = torch.tensor([[True, True, True], [True, True, False]])
    return outputs


def test_post_process_threshold_ordering_and_masking(processor):
    results = processor.post_process_object_detection(BaseModelOutput(_outputs()), threshold=0.5)
    first, second = results
    assert first["labels"].tolist() == [1, 0, 2]  # queries 3 (3.0), 0 (2.0), 1 (1.0); query 2 below threshold
    torch.testing.assert_close(first["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0])))
    # The padded slot holds the largest logit and is still never chosen.
    assert 2 not in second["labels"].tolist()
    assert second["labels"].tolist() == [0, 1]  # 1.5 (concept 0), 0.2 (concept 1); query 3 scores exactly 0.5
    assert (second["scores"][:-1] >= second["scores"][1:]).all()
    for result in results:
        assert (result["scores"] > 0.5).all()


def test_post_process_target_sizes_top_k_and_missing_mask(processor):
    outputs = _outputs(with_mask=False)
    normalized = processor.post_process_object_detection(outputs, threshold=0.0)[0]
    sized = processor.post_process_object_detection(
        outputs, threshold=0.0, target_sizes=torch.tensor([[100, 200], [10, 10]], dtype=torch.int32)
    )[0]
    torch.testing.assert_close(
        sized["boxes"], normalized["boxes"] * torch.tensor([200.0, 100.0, 200.0, 100.0])
    )
    # query 1: cxcywh (0.25, 0.75, 0.5, 0.5) -> xyxy (0, 0.5, 0.5, 1.0)
    index = normalized["scores"].tolist().index(torch.sigmoid(torch.tensor(1.0)).item())
    torch.testing.assert_close(normalized["boxes"][index], torch.tensor([0.0, 0.5, 0.5, 1.0]))
    top = processor.post_process_object_detection(outputs, threshold=0.0, top_k=2)
    assert [len(r["scores"]) for r in top] == [2, 2]
    torch.testing.assert_close(top[0]["scores"], normalized["scores"][:2])
    # Without a mask, the 50.0 slot of image 1 is a real concept and wins.
    assert set(processor.post_process_object_detection(outputs)[1]["labels"].tolist()) == {2}


def test_post_process_multi_label_ranks_every_query_concept_pair(processor):
    outputs = _outputs()
    results = processor.post_process_object_detection(outputs, threshold=0.0, top_k=5, multi_label=True)
    first, second = results
    # Image 0, top 5 of the 12 (query, concept) pairs: (3,1) 3.0, (0,0) 2.0, (1,2) 1.0, (3,0) 0.5, (0,2) 0.0.
    assert first["labels"].tolist() == [1, 0, 2, 0, 2]
    torch.testing.assert_close(first["scores"], torch.sigmoid(torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0])))
    torch.testing.assert_close(first["boxes"][1], first["boxes"][4])  # query 0 comes back with two labels
    # Image 1: the padded slot (logit 50) never appears; the top-5 keeps only real pairs.
    assert 2 not in second["labels"].tolist()
    assert second["scores"][0] == torch.sigmoid(torch.tensor(1.5))
    for result in results:
        assert (result["scores"][:-1] >= result["scores"][1:]).all()
    # Its best pair per query is the single-label result: the top-ranked detections agree.
    single = processor.post_process_object_detection(outputs, threshold=0.0)[0]
    assert first["labels"][:2].tolist() == single["labels"][:2].tolist()
    strict = processor.post_process_object_detection(outputs, threshold=0.85, multi_label=True)[0]
    assert (strict["scores"] > 0.85).all() and strict["labels"].tolist() == [1, 0]  # 3.0, 2.0


def test_post_process_as_the_zero_shot_pipeline_calls_it(processor):
    raw = {k: v[:1] for k, v in _outputs().items()}
    outputs = BaseModelOutput({**raw, "target_size": torch.tensor([[48, 64]], dtype=torch.int32)})
    result = processor.post_process_object_detection(
        outputs=outputs, threshold=0.1, target_sizes=outputs["target_size"]
    )[0]
    for index in result["scores"].nonzero():
        box = result["boxes"][index][0]
        assert box.shape == (4,) and box[2] >= box[0]


def test_post_process_errors():
    outputs = _outputs()
    with pytest.raises(ValueError, match="target_sizes"):
        post_process_detection_outputs(outputs, target_sizes=[(10, 10)])
    with pytest.raises(ValueError, match="pred_boxes"):
        post_process_detection_outputs({"logits": outputs["logits"], "pred_boxes": torch.zeros(2, 3, 4)})
    with pytest.raises(ValueError, match="concept_mask"):
        post_process_detection_outputs({**outputs, "concept_mask": torch.ones(2, 5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no `logits`"):
        post_process_detection_outputs({"pred_boxes": outputs["pred_boxes"]})
