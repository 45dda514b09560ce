"""Prompt formatting and robust parsing of language-model answers (steps 2a / 2b)."""

import json

import pytest

from detclipv3_hf.annotation import (
    DEFAULT_RECAPTION_PROMPT,
    Entity,
    PromptTemplates,
    format_prompt,
    parse_entities,
    parse_filter_answer,
)
from detclipv3_hf.annotation.parsing import NO_ENTITIES, NO_FACTS, OK, PARSE_FAILED

BUS = Entity("red double-decker bus", "bus", "vehicle")
DOG = Entity("small brown dog", "dog", "animal")
CLEAN = (
    '[{"phrase": "red double-decker bus", "category": "bus", "parent category": "vehicle"}, '
    '{"phrase": "small brown dog", "category": "dog", "parent category": "animal"}]'
)


# ------------------------------------------------------------------------------------------------ prompts


def test_default_recaption_prompt_is_the_papers_sentence():
    prompt = PromptTemplates().recaption_prompt("dog bus cheap flights!!")
    assert prompt == (
        "Given a noisy caption of the image: dog bus cheap flights!!, write a detailed clean description of the image."
    )
    assert DEFAULT_RECAPTION_PROMPT.count("{raw caption}") == 1


def test_default_filter_prompt_carries_the_papers_instructions():
    prompt = PromptTemplates().filter_prompt("A happy dog, probably named Rex, runs.")
    assert "A happy dog, probably named Rex, runs." in prompt
    assert "Return solely the result without any other contents." in prompt
    assert "If you think there is no factual description, just return 'None'." in prompt


def test_extract_prompt_keeps_literal_json_braces_and_asks_for_the_three_keys():
    prompt = PromptTemplates().extract_prompt("a red bus")
    assert "a red bus" in prompt and "{caption}" not in prompt
    for key in ('"phrase"', '"category"', '"parent category"'):
        assert key in prompt
    # The example in the template must survive formatting as valid JSON.
    start, end = prompt.index("[{"), prompt.index("}]") + 2
    assert json.loads(prompt[start:end])[0]["parent category"] == "vehicle"


def test_templates_are_configurable_and_validated():
    custom = PromptTemplates().replace(recaption="Noisy: {raw caption}. Describe.", filter=None)
    assert custom.recaption_prompt("x") == "Noisy: x. Describe."
    assert custom.filter == PromptTemplates().filter
    with pytest.raises(ValueError, match="raw caption"):
        PromptTemplates(recaption="Describe the image.")
    with pytest.raises(ValueError, match="caption"):
        PromptTemplates(extract="List entities as JSON.")


def test_format_prompt_errors_name_the_problem():
    assert format_prompt("a {raw caption} b {raw_caption}", raw_caption="X") == "a X b X"
    with pytest.raises(ValueError, match="placeholder"):
        format_prompt("no field", caption="x")
    with pytest.raises(TypeError, match="str"):
        format_prompt("{caption}", caption=3)


# ------------------------------------------------------------------------------------------------ filter


@pytest.mark.parametrize("answer", ["None", "none.", "'None'", '"None"', "  NONE  ", "```\nNone\n```"])
def test_filter_none_answers_mean_no_facts(answer):
    result = parse_filter_answer(answer)
    assert result.status == NO_FACTS and result.facts is None and result.reason


def test_filter_keeps_the_facts_and_strips_quotes_and_fences():
    assert parse_filter_answer('"A dog runs on grass."').facts == "A dog runs on grass."
    assert parse_filter_answer("```text\nA dog runs.\n```").facts == "A dog runs."
    empty = parse_filter_answer("   ")
    assert empty.status == PARSE_FAILED and "empty" in empty.reason


# ------------------------------------------------------------------------------------------------ entities


@pytest.mark.parametrize(
    "answer",
    [
        CLEAN,
        f"```json\n{CLEAN}\n```",
        f"```\n{CLEAN}```",
        f"Sure! Here are the entities:\n{CLEAN}\nLet me know if you need anything else.",
        CLEAN.replace('"', "'"),  # Python-style single quotes
        CLEAN.replace("}]", "},]").replace('"animal"', '"animal",'),  # trailing commas
        CLEAN.replace("parent category", "parent_category"),
        CLEAN.replace("parent category", "parent"),
        CLEAN.replace("parent category", "Parent-Category"),
        '{"entities": ' + CLEAN + "}",
    ],
    ids=[
        "clean",
        "fence-json",
        "fence-bare",
        "prose",
        "single-quotes",
        "trailing-commas",
        "parent_category",
        "parent",
        "odd-case-key",
        "wrapper-object",
    ],
)
def test_messy_answers_parse_to_the_same_entities(answer):
    result = parse_entities(answer)
    assert result.status == OK, result.reason
    assert result.entities == (BUS, DOG)


def test_single_quoted_json_with_apostrophe_inside_double_quotes():
    answer = "[{'phrase': \"man's red hat\", 'category': 'hat', 'parent category': 'clothing'}]"
    assert parse_entities(answer).entities == (Entity("man's red hat", "hat", "clothing"),)


@pytest.mark.parametrize(
    "phrase, written",
    [
        ("man's red hat", "man's red hat"),  # apostrophe between letters: no Python parser reads this
        ('it\'s a "big" hat', 'it\\\'s a "big" hat'),  # escaped apostrophe, double quotes inside
    ],
    ids=["bare-apostrophe", "escaped-apostrophe-and-quotes"],
)
def test_single_quoted_json_with_apostrophe_inside_single_quotes(phrase, written):
    answer = "[{'phrase': '" + written + "', 'category': 'hat', 'parent category': 'clothing',}]"
    result = parse_entities(answer)
    assert result.status == OK, result.reason
    assert result.entities == (Entity(phrase, "hat", "clothing"),)


@pytest.mark.parametrize("cut", [len(CLEAN) - 1, len(CLEAN) - 3, CLEAN.index('"animal"') + 4])
def test_truncated_list_recovers_complete_objects(cut):
    result = parse_entities("```json\n" + CLEAN[:cut])
    assert result.status == OK
    assert BUS in result.entities
    assert "truncated" in result.reason
    # The second object survives only when it was complete before the cut.
    assert (DOG in result.entities) == (CLEAN[:cut].rstrip().endswith("}"))


def test_malformed_middle_object_is_skipped_with_a_reason():
    answer = (
        '[{"phrase": "red double-decker bus", "category": "bus", "parent category": "vehicle"}, '
        '{"phrase": oops}, {"phrase": "small brown dog", "category": "dog", "parent category": "animal"}]'
    )
    result = parse_entities(answer)
    assert result.status == OK and result.entities == (BUS, DOG)
    assert "unparsable" in result.reason


def test_items_missing_fields_are_reported_and_duplicates_merged():
    answer = json.dumps(
        [
            {"phrase": "red double-decker bus", "category": "bus", "parent category": "vehicle"},
            {"phrase": "Red  double-decker bus", "category": "Bus", "parent category": "Vehicle"},
            {"phrase": "tree", "category": "tree"},
            "just a string",
        ]
    )
    result = parse_entities(answer)
    assert result.status == OK
    assert result.entities == (BUS,)
    assert "item 2" in result.reason and "parent category" in result.reason and "item 3" in result.reason


@pytest.mark.parametrize("answer", ["None", "'None'", "none."])
def test_none_means_no_entities(answer):
    result = parse_entities(answer)
    assert result.status == NO_ENTITIES and result.entities == ()


def test_empty_list_means_no_entities():
    assert parse_entities("[]").status == NO_ENTITIES


@pytest.mark.parametrize(
    "answer, fragment",
    [
        ("", "empty"),
        ("There is a bus and a dog in the image.", "no JSON"),
        ('[{"phrase": "red bus", "categ', "no complete entity"),
        ('[{"phrase": "a"}, {"category": "b"}]', "missing"),
        ("[1, 2, 3]", "not an object"),
    ],
)
def test_unusable_answers_fail_with_a_reason(answer, fragment):
    result = parse_entities(answer)
    assert result.status == PARSE_FAILED
    assert result.entities == ()
    assert fragment in result.reason


def test_non_string_answer_is_a_type_error():
    with pytest.raises(TypeError, match="str"):
        parse_entities(None)
