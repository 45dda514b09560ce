"""Tests of DetClipV3Processor: concept tokenization, save/load, post-processing, hierarchical labels, captioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import build_clip_tokenizer
from tokenizers import normalizers
from transformers import AutoImageProcessor, AutoProcessor
from transformers.modeling_outputs import BaseModelOutput

from detclipv3_hf import DetClipV3Config
from detclipv3_hf.image_processing_detclipv3 import DetClipV3ImageProcessor
from detclipv3_hf.image_processing_pil_detclipv3 import DetClipV3ImageProcessorPil
from detclipv3_hf.processing_detclipv3 import (
    IMG_TOKEN,
    OBJ_TOKEN,
    DetClipV3Processor,
    add_captioning_tokens,
    normalize_hierarchical_label,
    parse_hierarchical_label,
)

SIZE = {"shortest_edge": 32, "longest_edge": 64}
LABELS = [
    "double-decker bus|bus|vehicle",
    "large striped red circle|circle|round shape",
    "man's red hat|hat|clothing",
    "t-shirt|shirt|clothing",
    "cat|cat|animal",
    "traffic light (green)|light|object",
]


@pytest.fixture(scope="module")
def tokenizer():
    # A fresh tokenizer: the processor adds [OBJ]/[IMG] to the tokenizer it gets, which must not leak into the
    # session-wide `clip_tokenizer` fixture other test modules size their models with.
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def processor(tokenizer):
    return DetClipV3Processor(DetClipV3ImageProcessor(size=SIZE), tokenizer, max_concept_tokens=8)


def _image(height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _register_auto_classes() -> None:
    # The package's __init__ registers these too; registering again with exist_ok keeps this test self-contained.
    AutoImageProcessor.register(
        DetClipV3Config,
        image_processor_classes={"torchvision": DetClipV3ImageProcessor, "pil": DetClipV3ImageProcessorPil},
        exist_ok=True,
    )
    AutoProcessor.register(DetClipV3Config, DetClipV3Processor, exist_ok=True)


# ------------------------------------------------------------------------------------------------ concepts


def test_per_image_concept_lists_are_padded(processor, tokenizer):
    out = processor(images=[_image(), _image(seed=1)], text=[["cat", "red bus", "tree"], ["dog"]])
    assert out["input_ids"].shape == (2, 3, 8) and out["input_ids"].dtype == torch.long
    assert out["attention_mask"].shape == (2, 3, 8) and out["attention_mask"].dtype == torch.long
    assert out["concept_mask"].dtype == torch.bool
    assert out["concept_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert (out["input_ids"][1, 1:] == tokenizer.pad_token_id).all()
    assert (out["attention_mask"][1, 1:] == 0).all()
    assert out["pixel_values"].shape[0] == 2 and "pixel_mask" in out
    # Each concept is its own CLIP sentence: start token, words, end token.
    for image_index, concepts in enumerate([["cat", "red bus", "tree"], ["dog"]]):
        for concept_index, concept in enumerate(concepts):
            expected = tokenizer(concept)["input_ids"]
            row = out["input_ids"][image_index, concept_index]
            assert row[: len(expected)].tolist() == expected
            assert row[0] == tokenizer.bos_token_id and expected[-1] == tokenizer.eos_token_id
            assert out["attention_mask"][image_index, concept_index].sum() == len(expected)


def test_shared_and_single_string_text(processor):
    shared = processor(images=[_image(), _image(seed=2)], text=["cat", "dog"])
    assert shared["input_ids"].shape == (2, 2, 8)
    assert torch.equal(shared["input_ids"][0], shared["input_ids"][1])
    single = processor(images=[_image(), _image(seed=2)], text="cat")
    assert single["input_ids"].shape == (2, 1, 8) and single["concept_mask"].all()
    text_only = processor(text=[["cat"], ["dog", "bus"]])
    assert text_only["input_ids"].shape == (2, 2, 8) and "pixel_values" not in text_only
    assert processor(text=["cat", "dog"])["input_ids"].shape == (1, 2, 8)


def test_long_concepts_are_truncated_keeping_the_end_token(processor, tokenizer):
    out = processor(text=["a cat sitting on a red bus next to a person in a house"])
    row = out["input_ids"][0, 0]
    assert out["attention_mask"][0, 0].all() and row[-1] == tokenizer.eos_token_id


def test_annotations_pass_through(processor):
    ann = {"image_id": 3, "annotations": [{"bbox": [2, 3, 10, 12], "category_id": 0}]}
    out = processor(images=_image(), text=["cat"], annotations=[ann])
    assert out["labels"][0]["class_labels"].tolist() == [0] and out["labels"][0]["boxes"].shape == (1, 4)


@pytest.mark.parametrize(
    ("images", "text", "error", "message"),
    [
        ([_image()], [[]], ValueError, "Image 0 has no concepts"),
        ([_image()], [], ValueError, "empty list"),
        ([_image(), _image()], [["cat"], ["dog", ""]], ValueError, "Concept 1 of image 1 is empty"),
        ([_image(), _image()], [["cat"], ["   "]], ValueError, "Concept 0 of image 1 is empty"),
        ([_image(), _image()], [["cat"], ["dog"], ["bus"]], ValueError, "2 images but 3 concept lists"),
        ([_image()], 3, TypeError, "`text` must be"),
        ([_image()], [["cat"], "dog"], TypeError, "mixing"),
        ([_image()], [["cat", 3]], TypeError, "Concept 1 of image 0 must be a string"),
        (None, None, ValueError, "Give `images`, `text`"),
    ],
)
def test_bad_text_is_refused(processor, images, text, error, message):
    with pytest.raises(error, match=message):
        processor(images=images, text=text)


def test_concept_that_tokenizes_to_nothing():
    # CLIP's own normalizer keeps every printable character, so build one that drops "~": a concept made only of
    # it passes the emptiness check on the raw string but leaves nothing between the start and end tokens.
    tokenizer = build_clip_tokenizer()
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Replace("~", ""), backend.normalizer])
    processor = DetClipV3Processor(DetClipV3ImageProcessor(size=SIZE), tokenizer, max_concept_tokens=8)
    assert processor.tokenizer("~~", add_special_tokens=False)["input_ids"] == []
    with pytest.raises(ValueError, match="Concept 1 of image 0 tokenizes to nothing: '~~'"):
        processor(text=[["cat", "~~"]])


def test_other_errors(processor):
    with pytest.raises(ValueError, match="annotations"):
        processor(text=["cat"], annotations=[{"image_id": 0, "annotations": []}])
    with pytest.raises(TypeError, match="without `images`"):
        processor(text=["cat"], do_resize=False)
    with pytest.raises(TypeError, match="foo"):
        processor(images=_image(), text=["cat"], foo=1)
    assert processor.model_input_names[-1] == "concept_mask" and "pixel_mask" in processor.model_input_names
    with pytest.raises(ValueError, match="max_concept_tokens"):
        DetClipV3Processor(processor.image_processor, processor.tokenizer, max_concept_tokens=2)
    with pytest.raises(TypeError):
        DetClipV3Processor(processor.tokenizer, processor.image_processor)


# ------------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_save_and_reload(tmp_path, backend):
    _register_auto_classes()
    image_processor_class = (
        DetClipV3ImageProcessor if backend == "torchvision" else DetClipV3ImageProcessorPil
    )
    tokenizer = build_clip_tokenizer()
    assert OBJ_TOKEN not in tokenizer.get_vocab()
    processor = DetClipV3Processor(image_processor_class(size=SIZE), tokenizer, max_concept_tokens=6)
    processor.save_pretrained(tmp_path)

    for reloaded in (
        DetClipV3Processor.from_pretrained(tmp_path, backend=backend),
        AutoProcessor.from_pretrained(tmp_path, backend=backend),
    ):
        assert type(reloaded) is DetClipV3Processor
        assert type(reloaded.image_processor) is image_processor_class
        assert reloaded.max_concept_tokens == 6
        assert (reloaded.obj_token_id, reloaded.img_token_id) == (
            processor.obj_token_id,
            processor.img_token_id,
        )
        assert reloaded.tokenizer.convert_ids_to_tokens([reloaded.obj_token_id]) == [OBJ_TOKEN]
        inputs = {"images": [_image(), _image(30, 70, seed=1)], "text": [["cat", "red bus"], ["dog"]]}
        expected, actual = processor(**inputs), reloaded(**inputs)
        for key in ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "concept_mask"):
            torch.testing.assert_close(actual[key], expected[key])
        labels = [["double-decker bus|bus|vehicle"]]
        assert torch.equal(
            reloaded.encode_caption_targets(labels, "object", 16)["input_ids"],
            processor.encode_caption_targets(labels, "object", 16)["input_ids"],
        )


def test_captioning_tokens_are_added_once(tokenizer):
    size = len(tokenizer)
    add_captioning_tokens(tokenizer)
    add_captioning_tokens(tokenizer)
    assert len(tokenizer) == size  # already added by the `processor` fixture or the first call
    ids = tokenizer.convert_tokens_to_ids([OBJ_TOKEN, IMG_TOKEN])
    assert len(set(ids)) == 2 and tokenizer.unk_token_id not in ids
    assert (
        tokenizer.decode(
            ids + tokenizer("bus", add_special_tokens=False)["input_ids"], skip_special_tokens=True
        )
        == "bus"
    )


# ------------------------------------------------------------------------------------------------ detection post-processing


def test_post_process_grounded_object_detection(processor):
    logits = torch.tensor(
        [
            [[3.0, -5.0, -5.0], [-5.0, 2.0, -5.0], [-5.0, -5.0, 1.0]],
            [[-5.0, 4.0, 90.0], [1.0, -5.0, 90.0], [-5.0, -5.0, 90.0]],
        ]
    )
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5]]).expand(2, 3, 4).clone()
    outputs = BaseModelOutput(
        {
            "logits": logits,
            "pred_boxes": boxes,
            "concept_mask": torch.tensor([[True, True, True], [True, True, False]]),
        }
    )
    concepts = [["cat", "dog", "bus"], ["tree", "car"]]
    results = processor.post_process_grounded_object_detection(
        outputs, threshold=0.6, target_sizes=[(20, 40), (10, 10)], text_labels=concepts
    )
    assert results[0]["labels"].tolist() == [0, 1, 2]
    assert results[0]["text_labels"] == ["cat", "dog", "bus"]
    assert results[1]["labels"].tolist() == [1, 0]  # the padded slot (logit 90) never wins
    assert results[1]["text_labels"] == ["car", "tree"]
    assert results[1]["labels"].dtype == torch.long
    torch.testing.assert_close(results[0]["boxes"][0], torch.tensor([10.0, 5.0, 30.0, 15.0]))
    shared = processor.post_process_grounded_object_detection(
        {"logits": logits[:1], "pred_boxes": boxes[:1]}, threshold=0.3, text_labels=["a", "b", "c"]
    )
    assert shared[0]["text_labels"] == ["a", "b", "c"]
    assert "text_labels" not in processor.post_process_grounded_object_detection(outputs)[0]
    with pytest.raises(ValueError, match="Image 1 has a detection for concept 1 but only 1 text labels"):
        processor.post_process_grounded_object_detection(
            outputs, text_labels=[["cat", "dog", "bus"], ["tree"]]
        )


# ------------------------------------------------------------------------------------------------ labels


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("red bus|bus|vehicle", ("red bus|bus|vehicle", "red bus", "bus", "vehicle")),
        (" red  bus |bus| vehicle", ("red bus|bus|vehicle", "red bus", "bus", "vehicle")),
        ("red bus", ("red bus", "red bus", "", "")),
        ("red bus|bus", ("red bus|bus", "red bus", "bus", "")),
        ("a|b|c|d", ("a|b|c|d", "a", "b", "c|d")),
        ("", ("", "", "", "")),
        ("||", ("||", "", "", "")),
        ("|bus|", ("|bus|", "", "bus", "")),
        (None, ("", "", "", "")),
        (42, ("42", "42", "", "")),
    ],
)
def test_parse_hierarchical_label(text, expected):
    parsed = parse_hierarchical_label(text)
    assert (parsed["label"], parsed["phrase"], parsed["category"], parsed["parent_category"]) == expected


def test_normalize_hierarchical_label():
    assert normalize_hierarchical_label(" red bus |bus| vehicle") == "red bus|bus|vehicle"


def test_label_round_trip_through_the_tokenizer(processor):
    encoded = processor.encode_caption_targets([LABELS[:2], LABELS[2:]], "object", max_length=32)
    decoded = processor.batch_decode_labels(encoded["input_ids"])
    assert decoded == LABELS
    for label, text in zip(LABELS, decoded):
        parsed = parse_hierarchical_label(text)
        assert parsed["label"] == label
        assert "|".join([parsed["phrase"], parsed["category"], parsed["parent_category"]]) == label


def test_caption_target_layout(processor, tokenizer):
    encoded = processor.encode_caption_targets(
        [["red bus|bus|vehicle", "cat|cat|animal"], [], ["dog"]], "object", 12
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    assert ids.shape[0] == 3 and ids.shape == mask.shape and ids.dtype == torch.long
    assert (ids[:, 0] == processor.obj_token_id).all()
    assert (ids != tokenizer.bos_token_id).all()
    for row in range(3):
        length = int(mask[row].sum())
        assert ids[row, length - 1] == tokenizer.eos_token_id and mask[row, :length].all()
        assert not mask[row, length:].any()
    expected = tokenizer("cat|cat|animal", add_special_tokens=False)["input_ids"]
    assert ids[1, 1 : 1 + len(expected)].tolist() == expected
    # Truncation keeps the task token and the end token.
    short = processor.encode_caption_targets([["large striped red circle|circle|round shape"]], "image", 5)
    assert short["input_ids"].shape == (1, 5)
    assert (
        short["input_ids"][0, 0] == processor.img_token_id
        and short["input_ids"][0, -1] == tokenizer.eos_token_id
    )


def test_caption_target_errors(processor):
    with pytest.raises(ValueError, match="task"):
        processor.encode_caption_targets([["a"]], "region", 8)
    with pytest.raises(TypeError, match="list"):
        processor.encode_caption_targets(["a|b|c"], "object", 8)
    with pytest.raises(TypeError, match="Label 1 of image 0"):
        processor.encode_caption_targets([["a", 3]], "object", 8)
    with pytest.raises(ValueError, match="Label 0 of image 0 is empty"):
        processor.encode_caption_targets([[" | "]], "object", 8)
    with pytest.raises(ValueError, match="max_length"):
        processor.encode_caption_targets([["a"]], "object", 2)


def test_decoding_stops_at_the_end_token_and_never_crashes(processor, tokenizer):
    bus = tokenizer("bus", add_special_tokens=False)["input_ids"]
    cat = tokenizer("cat", add_special_tokens=False)["input_ids"]
    row = [processor.obj_token_id, *bus, tokenizer.eos_token_id, *cat]
    assert processor.batch_decode_labels([row]) == ["bus"]
    random = torch.randint(0, len(tokenizer), (16, 10), generator=torch.Generator().manual_seed(0))
    for text in processor.batch_decode_labels(random):
        assert isinstance(text, str)
        parse_hierarchical_label(text)
    assert processor.batch_decode_labels(torch.zeros(2, 0, dtype=torch.long)) == ["", ""]


# ------------------------------------------------------------------------------------------------ captioning post-processing


def _caption_outputs(processor, labels, boxes, scores):
    sequences = processor.encode_caption_targets([labels], "object", 24)["input_ids"]
    return {
        "pred_boxes": torch.tensor([boxes], dtype=torch.float32),
        "scores": torch.tensor([scores], dtype=torch.float32),
        "sequences": sequences[None],
        "sequences_scores": torch.tensor([[-0.1] * len(labels)]),
    }


def test_captioning_nms_is_class_aware(processor):
    overlapping = [[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4]]
    same = _caption_outputs(
        processor, ["red bus|bus|vehicle", "big bus|bus|vehicle"], overlapping, [0.6, 0.9]
    )
    result = processor.post_process_object_captioning(same, threshold=0.3)[0]
    assert len(result) == 1 and result[0]["phrase"] == "big bus" and result[0]["score"] == pytest.approx(0.9)

    different = _caption_outputs(
        processor, ["red bus|bus|vehicle", "cat|cat|animal"], overlapping, [0.6, 0.9]
    )
    result = processor.post_process_object_captioning(different, threshold=0.3)[0]
    assert [r["category"] for r in result] == ["cat", "bus"]

    # A generation without category is a class of its own: it suppresses its own kind only.
    no_category = _caption_outputs(
        processor,
        ["red bus", "bus thing", "red bus|bus|vehicle"],
        overlapping + [[0.5, 0.5, 0.4, 0.4]],
        [0.9, 0.8, 0.7],
    )
    result = processor.post_process_object_captioning(no_category, threshold=0.3)[0]
    assert [(r["phrase"], r["category"]) for r in result] == [("red bus", ""), ("red bus", "bus")]


def test_captioning_threshold_sorting_and_boxes(processor):
    outputs = _caption_outputs(
        processor,
        ["cat|cat|animal", "double-decker bus|bus|vehicle", "tree|tree|plant"],
        [[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]],
        [0.4, 0.95, 0.2],
    )
    result = processor.post_process_object_captioning(outputs, threshold=0.3, target_sizes=[(100, 200)])[0]
    assert [r["score"] for r in result] == pytest.approx([0.95, 0.4])
    top = result[0]
    assert top["label"] == "double-decker bus|bus|vehicle"
    assert (top["phrase"], top["category"], top["parent_category"]) == ("double-decker bus", "bus", "vehicle")
    assert top["box"] == pytest.approx([130.0, 65.0, 170.0, 85.0])
    assert all(isinstance(v, float) for v in top["box"]) and top["sequence_score"] == pytest.approx(-0.1)
    assert processor.post_process_object_captioning(outputs, threshold=0.99) == [[]]


def test_captioning_handles_malformed_generations(processor, tokenizer):
    generator = torch.Generator().manual_seed(1)
    batch, objects = 2, 5
    outputs = {
        "pred_boxes": torch.rand(batch, objects, 4, generator=generator) * 0.5 + 0.1,
        "scores": torch.rand(batch, objects, generator=generator) * 0.5 + 0.5,
        # Flattened (B*K, T), as `generate` returns it; random ids including special ones.
        "sequences": torch.randint(0, len(tokenizer), (batch * objects, 7), generator=generator),
    }
    results = processor.post_process_object_captioning(outputs, threshold=0.0, nms_threshold=1.0)
    assert [len(r) for r in results] == [objects, objects]
    for entry in results[0] + results[1]:
        assert set(entry) == {"score", "box", "label", "phrase", "category", "parent_category"}
        assert all(isinstance(entry[k], str) for k in ("label", "phrase", "category", "parent_category"))
    with pytest.raises(ValueError, match="sequences"):
        processor.post_process_object_captioning(
            {**outputs, "sequences": torch.zeros(3, 7, dtype=torch.long)}
        )
