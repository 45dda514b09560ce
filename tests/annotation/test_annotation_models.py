"""Real transformers models, tiny and random, loaded from folders: their garbage must flow through as
parse failures with reasons (never a crash, never a silently dropped record)."""

import json

import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from detclipv3_hf.annotation import (
    AnnotationConfig,
    TransformersRecaptioner,
    TransformersTextGenerator,
    run_pipeline,
)
from detclipv3_hf.annotation.storage import read_part_records

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CHAT = (
    "{% for m in messages %}USER: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline in milliseconds; every input is encodable."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["a red double-decker bus on the street", '[{"phrase": "bus", "category": "bus"}]'] * 20,
                            trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=chat_template,
    )


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = _tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=16, n_layer=1, n_head=2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=3)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_chat_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-chat")
    tokenizer = _tokenizer(chat_template=CHAT)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    """A tiny LLaVA (CLIP vision tower + Llama) with its processor: a real image-text-to-text model."""
    folder = tmp_path_factory.mktemp("tiny-llava")
    tokenizer = _tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT,
    )
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                       bos_token_id=1, eos_token_id=2, pad_token_id=3)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_text_generator_loads_from_a_folder_and_answers_every_prompt(gpt2_folder):
    generator = TransformersTextGenerator.from_pretrained(str(gpt2_folder), device="cpu", batch_size=2,
                                                          max_new_tokens=6)
    assert not generator.use_chat_template  # this tokenizer has no template: prompts go in verbatim
    prompts = ["a red bus", "a much longer prompt about a red double-decker bus on the street", "x", ""]
    answers = generator.generate(prompts)
    assert len(answers) == len(prompts) and all(isinstance(a, str) for a in answers)
    # Greedy decoding: a prompt's answer does not depend on its batch neighbours (left padding works).
    assert generator.generate(prompts[1:2]) == answers[1:2]
    assert generator.model_id == str(gpt2_folder)


def test_text_generator_uses_the_chat_template_when_present(llama_chat_folder):
    generator = TransformersTextGenerator.from_pretrained(str(llama_chat_folder), device="cpu", max_new_tokens=4)
    assert generator.use_chat_template
    assert generator._render("hi") == "USER: hi\nASSISTANT:"
    assert len(generator.generate(["hi", "a red bus"])) == 2


def test_recaptioner_loads_a_tiny_llava_and_answers_per_image(llava_folder):
    recaptioner = TransformersRecaptioner.from_pretrained(str(llava_folder), device="cpu", batch_size=2,
                                                          max_new_tokens=5)
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (24, 56), "blue"), Image.new("RGB", (64, 64))]
    answers = recaptioner.generate(images, ["red bus", "blue dog", "x"])
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert recaptioner.generate(images[1:2], ["blue dog"]) == answers[1:2]
    with pytest.raises(ValueError, match="images for"):
        recaptioner.generate(images, ["one prompt"])


def test_random_models_garbage_flows_through_as_failures_with_reasons(tmp_path, gpt2_folder, llava_folder):
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = []
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (48, 32), colour).save(raw / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"{colour} bus!! cheap"}))
    (raw / "pairs.jsonl").write_text("\n".join(lines))
    recaptioner = TransformersRecaptioner.from_pretrained(str(llava_folder), device="cpu", max_new_tokens=8)
    llm = TransformersTextGenerator.from_pretrained(str(gpt2_folder), device="cpu", max_new_tokens=12)
    out = tmp_path / "out"
    run_pipeline(raw / "pairs.jsonl", out, recaptioner=recaptioner, llm=llm, steps="recaption,extract,instruct",
                 config=AnnotationConfig(batch_size=2, progress=False))
    records = [r for p in sorted((out / "extract").glob("part-*")) for r in read_part_records(p)]
    assert len(records) == 3
    for record in records:
        assert record["provenance"]["recaption"]["model"] == str(llava_folder)
        assert record["provenance"]["extract"]["model"] == str(gpt2_folder)
        assert record["filter_answer"] is not None
        # Random weights cannot produce a valid entity list; whatever they produce is explained.
        if record["status"] != "ok":
            assert record["status"] in {"parse_failed", "no_facts", "recaption_failed"} and record["reason"]
        assert all(set(e) == {"phrase", "category", "parent_category"} for e in record["entities"])
    assert any(r["status"] == "parse_failed" for r in records)
    instruct = [r for p in sorted((out / "instruct").glob("part-*")) for r in read_part_records(p)]
    assert len(instruct) == 3


def test_cli_loads_models_by_folder_and_runs_the_requested_steps(tmp_path, gpt2_folder, llava_folder, capsys):
    from detclipv3_hf.annotation.cli import main

    Image.new("RGB", (32, 32), "red").save(tmp_path / "a.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "a.png", "text": "red bus"}) + "\n")
    argv = ["--input", str(tmp_path / "pairs.jsonl"), "--output", str(tmp_path / "out"), "--steps",
            "recaption,extract", "--recaption-model", str(llava_folder), "--llm", str(gpt2_folder),
            "--device", "cpu", "--max-new-tokens", "4", "--output-format", "parquet", "--no-progress"]
    assert main(argv) == 0
    assert "extract: 1 written, 0 resumed" in capsys.readouterr().out
    (record,) = read_part_records(next((tmp_path / "out" / "extract").glob("part-*.parquet")))
    assert record["raw_caption"] == "red bus" and record["status"] in {"ok", "parse_failed", "no_facts", "no_entities"}
    assert main(argv) == 0  # rerun: every shard already complete
    assert "already complete" in capsys.readouterr().out
