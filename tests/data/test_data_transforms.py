import random

import numpy as np
import pytest
import torch
from PIL import Image

from detclipv3_hf.data import (
    Compose,
    DetectionRecord,
    RandomCrop,
    RandomHorizontalFlip,
    RandomResize,
    build_eval_transforms,
    build_train_transforms,
    make_synthetic_sample,
    transform_record,
)


def _random_case(seed):
    rng = random.Random(seed)
    width, height = rng.randint(32, 128), rng.randint(32, 128)
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))
    boxes = []
    for _ in range(rng.randint(0, 6)):
        x0, y0 = rng.uniform(0, width - 2), rng.uniform(0, height - 2)
        boxes.append([x0, y0, rng.uniform(x0 + 1, width), rng.uniform(y0 + 1, height)])
    return image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def _assert_valid(image, boxes):
    assert boxes.ndim == 2 and boxes.shape[1] == 4
    assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 3] > boxes[:, 1])
    assert torch.all(boxes[:, :2] >= 0)
    assert torch.all(boxes[:, 2] <= image.width) and torch.all(boxes[:, 3] <= image.height)


def test_flip_twice_is_identity():
    for seed in range(10):
        image, boxes = _random_case(seed)
        flip = RandomHorizontalFlip(p=1.0)
        once = flip(image, boxes, random.Random(0))
        twice = flip(once.image, once.boxes, random.Random(0))
        assert torch.allclose(twice.boxes, boxes)
        assert np.array_equal(np.asarray(twice.image), np.asarray(image))
        if len(boxes):
            assert torch.allclose(once.boxes[:, 0], image.width - boxes[:, 2])


def test_flip_moves_pixels_with_boxes():
    image = Image.new("RGB", (40, 20))
    image.paste((255, 0, 0), (2, 3, 10, 9))
    result = RandomHorizontalFlip(p=1.0)(image, torch.tensor([[2.0, 3, 10, 9]]), random.Random(0))
    x0, y0, x1, y1 = (int(v) for v in result.boxes[0])
    red = np.argwhere(np.asarray(result.image)[:, :, 0] == 255)
    assert (red[:, 1].min(), red[:, 1].max() + 1, red[:, 0].min(), red[:, 0].max() + 1) == (x0, x1, y0, y1)


def test_resize_scales_boxes_and_caps_long_side():
    image = Image.new("RGB", (100, 50))
    result = RandomResize([40], max_size=60)(image, torch.tensor([[10.0, 10, 100, 50]]), random.Random(0))
    assert result.image.size == (60, 30)
    assert torch.allclose(result.boxes, torch.tensor([[6.0, 6, 60, 30]]))
    assert RandomResize([40])(image, torch.zeros(0, 4), random.Random(0)).image.size == (80, 40)


@pytest.mark.parametrize("seed", range(40))
def test_random_crop_and_train_pipeline_keep_boxes_valid(seed):
    image, boxes = _random_case(seed)
    crop = RandomCrop(min_scale=0.3, min_box_size=2.0)
    result = crop(image, boxes, random.Random(seed))
    _assert_valid(result.image, result.boxes)
    assert len(result.kept) == len(result.boxes) and torch.all(result.kept[1:] > result.kept[:-1])
    if len(boxes):
        assert len(result.boxes) > 0  # a crop never empties a non-empty target
        sizes = result.boxes[:, 2:] - result.boxes[:, :2]
        assert torch.all(sizes >= 2.0)
    pipeline = build_train_transforms(short_sides=(48, 64, 80), max_size=128)
    out = pipeline(image, boxes, random.Random(seed))
    _assert_valid(out.image, out.boxes)
    assert min(out.image.size) in (48, 64, 80) or max(out.image.size) == 128
    assert len(out.kept) == len(out.boxes) and (len(out.kept) == 0 or out.kept.max() < len(boxes))


def test_transforms_are_seeded():
    image, boxes = _random_case(3)
    pipeline = build_train_transforms(short_sides=(48, 64, 80), max_size=128)
    a, b = pipeline(image, boxes, random.Random(7)), pipeline(image, boxes, random.Random(7))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.kept, b.kept)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_crop_keeps_label_bookkeeping_aligned():
    image = Image.new("RGB", (100, 100))
    boxes = torch.tensor([[0.0, 0, 10, 10], [45, 45, 55, 55], [90, 90, 100, 100]])
    # A window strictly inside the image can hold the middle box only.
    crop = RandomCrop(min_scale=0.3, max_scale=0.3)
    for seed in range(20):
        result = crop(image, boxes, random.Random(seed))
        original = boxes[result.kept]
        assert torch.all(
            result.boxes[:, 2:] - result.boxes[:, :2] <= original[:, 2:] - original[:, :2] + 1e-5
        )


def test_transform_record_drops_objects_with_their_labels():
    image, objects = make_synthetic_sample(seed=5, size=96)
    record = DetectionRecord(image, "s", "synthetic", objects)
    for seed in range(10):
        out = transform_record(
            record, Compose([RandomCrop(min_scale=0.4), RandomHorizontalFlip()]), random.Random(seed)
        )
        assert 0 < len(out.objects) <= len(objects)
        phrases = [o.phrase for o in objects]
        kept_phrases = [o.phrase for o in out.objects]
        assert all(p in phrases for p in kept_phrases)
        _assert_valid(out.image, out.boxes_xyxy())
    assert record.objects == objects  # the input record is untouched


def test_eval_transform_is_deterministic():
    image, boxes = _random_case(1)
    transform = build_eval_transforms(short_side=64, max_size=100)
    a, b = transform(image, boxes, random.Random(0)), transform(image, boxes, random.Random(99))
    assert a.image.size == b.image.size and torch.equal(a.boxes, b.boxes)


def test_bad_inputs_raise():
    image = Image.new("RGB", (32, 32))
    flip = RandomHorizontalFlip()
    with pytest.raises(ValueError, match="shape"):
        flip(image, torch.zeros(3), random.Random(0))
    with pytest.raises(TypeError, match="floating"):
        flip(image, torch.zeros(1, 4, dtype=torch.int64), random.Random(0))
    with pytest.raises(ValueError, match="x0 < x1"):
        flip(image, torch.tensor([[5.0, 5, 5, 9]]), random.Random(0))
    with pytest.raises(ValueError, match="inside"):
        flip(image, torch.tensor([[5.0, 5, 40, 9]]), random.Random(0))
    with pytest.raises(ValueError, match="short_sides"):
        RandomResize([])
    with pytest.raises(ValueError, match="min_scale"):
        RandomCrop(min_scale=0.0)
