import json
import random

import pytest
import torch
from PIL import Image

from detclipv3_hf.data import (
    DETECTION_MAX_CONCEPTS,
    GROUNDING_MAX_CONCEPTS,
    ConceptDictionary,
    DetectionRecord,
    ObjectAnnotation,
    build_targets,
    record_positives,
    sample_concepts,
)

DICTIONARY = ConceptDictionary([f"concept {i}" for i in range(300)] + ["circle", "red circle"])


def test_dictionary_dedups_keeps_order_and_loads_files(tmp_path):
    d = ConceptDictionary(["b", " a ", "b", "", "c"])
    assert list(d) == ["b", "a", "c"] and len(d) == 3 and "a" in d and d.index("c") == 2
    d.save(tmp_path / "c.txt")
    assert list(ConceptDictionary.from_file(tmp_path / "c.txt")) == ["b", "a", "c"]
    (tmp_path / "c.json").write_text(
        json.dumps({"categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}]})
    )
    assert list(ConceptDictionary.from_file(tmp_path / "c.json")) == ["x", "y"]
    with pytest.raises(TypeError):
        ConceptDictionary(["a", 3])
    with pytest.raises(TypeError):
        ConceptDictionary("abc")


def test_defaults_follow_detclipv2():
    assert (DETECTION_MAX_CONCEPTS, GROUNDING_MAX_CONCEPTS) == (150, 100)


@pytest.mark.parametrize("seed", range(20))
def test_sample_concepts_invariants(seed):
    rng = random.Random(seed)
    positives = rng.sample(
        ["circle", "red circle", "star", "concept 5", "concept 7", "tree"], rng.randint(0, 6)
    )
    positives = positives + positives[:2]  # duplicates are merged
    max_concepts = rng.randint(max(1, len(set(positives))), 60)
    concepts = sample_concepts(positives, DICTIONARY, max_concepts, rng)
    assert len(concepts) == len(set(concepts)) == max_concepts
    assert set(positives) <= set(concepts)
    negatives = set(concepts) - set(positives)
    assert negatives <= set(DICTIONARY)
    assert not negatives & set(positives)


def test_sample_concepts_is_seeded_and_shuffled():
    a = sample_concepts(["circle", "tree"], DICTIONARY, 40, random.Random(1))
    b = sample_concepts(["circle", "tree"], DICTIONARY, 40, random.Random(1))
    c = sample_concepts(["circle", "tree"], DICTIONARY, 40, random.Random(2))
    assert a == b and a != c
    positions = {
        sample_concepts(["circle"], DICTIONARY, 40, random.Random(s)).index("circle") for s in range(10)
    }
    assert len(positions) > 1


def test_sample_concepts_small_dictionary_and_extra_negatives():
    concepts = sample_concepts(["a"], ["a", "b", "c"], 10, random.Random(0), extra_negatives=["z", "a"])
    assert sorted(concepts) == ["a", "b", "c", "z"]
    concepts = sample_concepts(["a"], ["b", "c"], 2, random.Random(0), extra_negatives=["z"])
    assert sorted(concepts) == ["a", "z"]


def test_too_many_positives_are_truncated_with_warning():
    with pytest.warns(UserWarning, match="exceed max_concepts"):
        concepts = sample_concepts([f"p{i}" for i in range(5)], DICTIONARY, 3, random.Random(0))
    assert sorted(concepts) == ["p0", "p1", "p2"]


def test_sample_concepts_bad_arguments():
    with pytest.raises(ValueError, match="max_concepts"):
        sample_concepts(["a"], DICTIONARY, 0, random.Random(0))
    with pytest.raises(TypeError, match="rng"):
        sample_concepts(["a"], DICTIONARY, 5, 3)
    with pytest.raises(TypeError):
        sample_concepts("circle", DICTIONARY, 5, random.Random(0))


def _record():
    objects = [
        ObjectAnnotation(
            (0, 0, 4, 4), phrase="large striped red circle", category="circle", parent_category="round shape"
        ),
        ObjectAnnotation((4, 4, 4, 4), phrase="small blue star", category="star", parent_category="symbol"),
        ObjectAnnotation((1, 1, 2, 2), category="circle"),
    ]
    return DetectionRecord(
        Image.new("RGB", (16, 16)), "r", "test", objects, caption="a red circle and a blue star"
    )


def test_build_targets_multi_positive():
    record = _record()
    positives = record_positives(record)
    assert positives == ["large striped red circle", "circle", "small blue star", "star"]
    assert record_positives(record, categories_only=True) == ["circle", "star"]
    phrase_only = DetectionRecord(
        Image.new("RGB", (8, 8)), "p", "test", [ObjectAnnotation((0, 0, 4, 4), phrase="a dog")]
    )
    assert record_positives(phrase_only, categories_only=True) == ["a dog"]  # no category: its labels stay
    concepts = sample_concepts(positives, DICTIONARY, 30, random.Random(0))
    targets = build_targets(record, concepts)
    names = [[concepts[i] for i in indices] for indices in targets.positive_indices]
    assert sorted(names[0]) == ["circle", "large striped red circle"]
    assert sorted(names[1]) == ["small blue star", "star"]
    assert names[2] == ["circle"]
    assert targets.object_captions == [
        "large striped red circle|circle|round shape",
        "small blue star|star|symbol",
        None,
    ]
    assert targets.image_caption == "a red circle and a blue star"
    positive_map = targets.positive_map()
    assert positive_map.shape == (3, 30)
    assert positive_map.sum(dim=1).tolist() == [2.0, 2.0, 1.0]
    # Negatives are never positive for any box.
    negative_columns = [i for i, c in enumerate(concepts) if c not in positives]
    assert torch.all(positive_map[:, negative_columns] == 0)


def test_build_targets_missing_labels_and_duplicates():
    targets = build_targets(_record(), ["star", "tree"])
    assert targets.positive_indices == [[], [0], []] and targets.has_positive == [False, True, False]
    with pytest.raises(ValueError, match="twice"):
        build_targets(_record(), ["star", "star"])
