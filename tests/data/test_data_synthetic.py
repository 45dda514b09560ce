import json

import numpy as np
import pytest

from detclipv3_hf.data import (
    CATEGORY_PARENTS,
    ConceptDictionary,
    generate_synthetic_world,
    make_synthetic_sample,
    read_coco,
    read_granucap,
)
from detclipv3_hf.data.synthetic import COLORS


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_synthetic_world(
        tmp_path_factory.mktemp("world"), 12, 5, seed=7, min_size=64, max_size=128
    )


def test_same_seed_gives_byte_identical_files(tmp_path, world):
    again = generate_synthetic_world(tmp_path / "again", 12, 5, seed=7, min_size=64, max_size=128)
    assert _files(again.root) == _files(world.root)
    other = generate_synthetic_world(tmp_path / "other", 12, 5, seed=8, min_size=64, max_size=128)
    assert _files(other.root) != _files(world.root)


def test_hierarchy_has_enough_categories_and_parents(world):
    coco = json.loads(world.train.coco_file.read_text())
    categories = {c["name"]: c["supercategory"] for c in coco["categories"]}
    assert categories == CATEGORY_PARENTS
    assert len(categories) >= 12 and len(set(categories.values())) >= 3
    concepts = ConceptDictionary.from_file(world.concepts_file)
    assert set(categories) <= set(concepts)
    assert not set(categories.values()) & set(concepts)  # parents are never drawn as negatives


def test_coco_round_trip_through_reader(world):
    stream = read_coco(str(world.train.coco_file))
    records = list(stream)
    assert len(records) == world.train.num_images and stream.stats.skipped == 0
    assert sum(len(r.objects) for r in records) == world.train.num_objects
    for record in records:
        assert 64 <= record.width <= 128 and 64 <= record.height <= 128
        for obj in record.objects:
            x, y, w, h = obj.bbox_xywh
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= record.width and y + h <= record.height
            assert obj.parent_category == CATEGORY_PARENTS[obj.category]
            assert obj.labels == [obj.phrase, obj.category] and obj.phrase.endswith(obj.category)


def test_granucap_round_trip_matches_coco(world):
    coco = {r.image.tobytes(): r for r in read_coco(str(world.val.coco_file))}
    stream = read_granucap(str(world.val.granucap_file))
    records = list(stream)
    assert len(records) == world.val.num_images and stream.stats.skipped == 0
    for record in records:
        twin = coco[record.image.tobytes()]
        assert [o.hierarchical_label for o in record.objects] == [o.hierarchical_label for o in twin.objects]
        assert [o.bbox_xywh for o in record.objects] == [o.bbox_xywh for o in twin.objects]
        for obj in record.objects:
            assert obj.hierarchical_label.count("|") == 2
            assert f"a {obj.phrase}" in record.caption or f"an {obj.phrase}" in record.caption


def test_train_and_val_are_different_images(world):
    train = {r.image.tobytes() for r in read_coco(str(world.train.coco_file))}
    val = {r.image.tobytes() for r in read_coco(str(world.val.coco_file))}
    assert not train & val


@pytest.mark.parametrize("seed", range(15))
def test_sample_boxes_are_tight_around_the_drawn_shape(seed):
    image, objects = make_synthetic_sample(seed, size=(96, 80), max_objects=1)
    again, objects_again = make_synthetic_sample(seed, size=(96, 80), max_objects=1)
    assert np.array_equal(np.asarray(image), np.asarray(again)) and objects == objects_again
    (obj,) = objects
    x, y, w, h = obj.bbox_xywh
    assert x >= 0 and y >= 0 and x + w <= 96 and y + h <= 80
    color = next(c for c in COLORS if f" {c} " in f" {obj.phrase} ")
    pixels = np.argwhere(np.all(np.asarray(image) == COLORS[color], axis=-1))
    assert len(pixels) > 0
    rows, cols = pixels[:, 0], pixels[:, 1]
    # Colour pixels never leave the box; clutter strokes drawn on top may hide at most a 2-pixel rim.
    assert cols.min() >= x and cols.max() + 1 <= x + w and rows.min() >= y and rows.max() + 1 <= y + h
    if not any(t in obj.phrase for t in ("striped", "dotted", "checkered")):
        assert cols.min() - x <= 2 and (x + w) - (cols.max() + 1) <= 2
        assert rows.min() - y <= 2 and (y + h) - (rows.max() + 1) <= 2


def test_sample_sizes_are_validated():
    with pytest.raises(ValueError, match="min_size"):
        make_synthetic_sample(0, size=16)
    with pytest.raises(ValueError, match="min_objects"):
        make_synthetic_sample(0, size=64, min_objects=3, max_objects=2)
