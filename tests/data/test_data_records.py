import pytest
import torch
from PIL import Image

from detclipv3_hf.data import DetectionRecord, ObjectAnnotation, clip_record_boxes, validate_record


def _record(*boxes, size=(64, 48)):
    objects = [ObjectAnnotation(bbox_xywh=b, category="circle") for b in boxes]
    return DetectionRecord(image=Image.new("L", size), image_id="x", source="test", objects=objects)


def test_labels_default_to_phrase_and_category_and_hierarchy():
    obj = ObjectAnnotation(
        (1, 2, 3, 4), phrase=" red circle ", category="circle", parent_category="round shape"
    )
    assert obj.labels == ["red circle", "circle"]
    assert obj.hierarchical_label == "red circle|circle|round shape"
    assert obj.bbox_xyxy == (1.0, 2.0, 4.0, 6.0)
    assert ObjectAnnotation((0, 0, 1, 1), category="circle").hierarchical_label is None
    assert ObjectAnnotation((0, 0, 1, 1), labels=["a", "a", "b"]).labels == ["a", "b"]


@pytest.mark.parametrize("box", [(1, 2, 3), (1, 2, 3, float("nan")), ("a", 1, 2, 3)])
def test_bad_box_shapes_raise(box):
    with pytest.raises(ValueError, match="bbox"):
        ObjectAnnotation(box, category="circle")


def test_object_without_label_and_bad_types_raise():
    with pytest.raises(ValueError, match="no text label"):
        ObjectAnnotation((0, 0, 1, 1), phrase="  ")
    with pytest.raises(TypeError, match="category"):
        ObjectAnnotation((0, 0, 1, 1), category=3)
    with pytest.raises(TypeError, match="PIL"):
        DetectionRecord(image=torch.zeros(3, 4, 4), image_id="x", source="s")


def test_record_is_rgb_and_boxes_xyxy():
    record = _record((1, 2, 3, 4), (10, 10, 5, 5))
    assert record.image.mode == "RGB"
    assert torch.equal(record.boxes_xyxy(), torch.tensor([[1.0, 2, 4, 6], [10, 10, 15, 15]]))
    assert record.boxes_xyxy().shape == (2, 4)
    assert _record().boxes_xyxy().shape == (0, 4)


def test_validate_record_reasons():
    assert validate_record(_record((0, 0, 64, 48))) is None
    assert "width 0" in validate_record(_record((1, 1, 0, 5)))
    assert "outside" in validate_record(_record((60, 0, 10, 10)))
    assert "outside" in validate_record(_record((-5, 0, 10, 10)))
    assert "needs at least 1" in validate_record(_record())
    assert validate_record(_record(), min_objects=0) is None
    # Within tolerance: accepted, then clipped into the image.
    record = _record((-0.5, 0, 64.8, 10))
    assert validate_record(record, tolerance=1.0) is None
    assert clip_record_boxes(record).objects[0].bbox_xywh == (0.0, 0.0, 64.0, 10.0)
    assert "no area" in validate_record(_record((64.2, 0, 0.5, 10)), tolerance=1.0)
