"""The annotation engine: input streaming, the four steps, resume after a crash, sharding, CLI."""

import argparse
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from detclipv3_hf.annotation import (
    AnnotationConfig,
    InputColumns,
    ShardWriter,
    export_llava_json,
    iter_input_records,
    parse_entities,
    run_pipeline,
)
from detclipv3_hf.annotation.cli import add_annotate_arguments, config_from_args, run_annotate
from detclipv3_hf.annotation.storage import read_part_records

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "pink", "brown", "grey"]
SHAPES = ["bus", "dog"]


def _raw_dataset(folder: Path, n: int, *, bad_image_at: int | None = None) -> Path:
    """n image-text pairs: PNGs on disk, referenced by relative paths from a JSONL file."""
    (folder / "imgs").mkdir(parents=True)
    lines = []
    for i in range(n):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[i % 2]
        name = f"imgs/{i}.png"
        if i != bad_image_at:
            Image.new("RGB", (48 + 4 * (i % 3), 32), colour).save(folder / name)
        lines.append(json.dumps({"image": name, "text": f"{colour} {shape} BUY NOW cheap #{i}"}))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def scripted_recaptioner(images, prompts):
    """Deterministic step-1 model: cleans the noisy caption quoted in the prompt."""
    out = []
    for image, prompt in zip(images, prompts):
        noisy = re.search(r"image: (.*), write", prompt).group(1)
        colour, shape = noisy.split()[:2]
        out.append(f"A {colour} {shape} on a plain {image.width}-pixel-wide background, which looks cheap.")
    return out


def scripted_llm(prompts):
    """Deterministic step-2 model: answers the filter and extraction prompts in varied messy shapes."""
    out = []
    for prompt in prompts:
        text = re.search(r"image: (.*)\n", prompt).group(1)
        if "Keep only the facts" in prompt:
            out.append(text.replace(", which looks cheap", "") if "red" not in text else "None")
            continue
        colour, shape = text.split()[1:3]
        parent = "vehicle" if shape == "bus" else "animal"
        item = {"phrase": f"{colour} {shape}", "category": shape, "parent category": parent}
        if colour == "green":
            out.append("I cannot help with that.")
        elif colour == "blue":
            out.append("```json\n" + json.dumps([item, {"phrase": "plain background", "category": "background"}]) + "\n```")
        else:
            out.append("Entities: " + str([item]))  # Python quoting plus prose
    return out


class ScriptedBoxLabeller:
    """Every concept gets one box covering the left part of the image, score falling with its index."""

    model_id = "scripted-detector"

    def label(self, images, vocabularies):
        return [
            [((0.0, 0.0, img.width / 2, float(img.height)), 0.9 - 0.1 * k, k) for k in range(len(vocab))]
            for img, vocab in zip(images, vocabularies)
        ]


class CrashAfter:
    """Wraps a generator and raises after it has answered `limit` prompts (a killed run)."""

    def __init__(self, fn, limit):
        self.fn, self.limit, self.answered = fn, limit, 0

    def __call__(self, *args):
        n = len(args[-1])
        if self.answered + n > self.limit:
            raise RuntimeError("simulated crash")
        self.answered += n
        return self.fn(*args)


def _records(step_dir: Path) -> list[dict]:
    return [r for p in sorted(step_dir.glob("part-*")) for r in read_part_records(p)]


def _config(**kw) -> AnnotationConfig:
    return AnnotationConfig(**{"batch_size": 2, "records_per_file": 3, "progress": False, **kw})


# ------------------------------------------------------------------------------------------------ input


def test_input_reader_numbers_rows_resolves_paths_and_reads_captions(tmp_path):
    path = _raw_dataset(tmp_path, 3)
    records = list(iter_input_records(str(path), columns=InputColumns()))
    assert [r["id"] for r in records] == ["000000000000", "000000000001", "000000000002"]
    assert records[1]["image"] == str((tmp_path / "imgs/1.png").resolve())
    assert records[1]["raw_caption"] == records[1]["caption"] == "blue dog BUY NOW cheap #1"


def test_input_reader_errors_name_missing_columns(tmp_path):
    path = _raw_dataset(tmp_path, 1)
    with pytest.raises(ValueError, match="caption columns"):
        list(iter_input_records(str(path), columns=InputColumns(caption=("alt",))))
    with pytest.raises(ValueError, match="matches no"):
        list(iter_input_records(str(tmp_path / "*.parquet")))


def test_parquet_input_with_image_bytes_is_saved_under_the_output(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(3):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), COLOURS[i]).save(buffer, format="PNG")
        rows.append({"key": f"k{i}", "image": {"bytes": buffer.getvalue(), "path": None}, "caption": f"{COLOURS[i]} bus"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    out = tmp_path / "out"
    config = _config(columns=InputColumns(id="key"))
    run_pipeline(tmp_path / "pairs.parquet", out, recaptioner=scripted_recaptioner, steps="recaption", config=config)
    records = _records(out / "recaption")
    assert [r["id"] for r in records] == ["k0", "k1", "k2"]
    for record in records:
        image = (out / "recaption" / record["image"]).resolve()
        assert not Path(record["image"]).is_absolute() and image.is_relative_to((out / "images").resolve())
        assert Image.open(image).size == (32, 32)
    # The relative paths stay valid in later steps' folders, for the stage-2 reader too.
    from detclipv3_hf.data.readers import read_granucap

    run_pipeline(out / "recaption", out, llm=scripted_llm, box_labeller=ScriptedBoxLabeller(), steps="extract,boxes",
                 config=config)
    usable = [r for r in _records(out / "boxes") if r["status"] == "ok"]
    assert usable and all(not Path(r["image"]).is_absolute() for r in usable)
    assert [r.image.size for r in read_granucap(str(out / "boxes" / "part-*.jsonl"))] == [(32, 32)] * len(usable)


# ------------------------------------------------------------------------------------------------ full run


def test_full_pipeline_produces_granucap_records_with_provenance(tmp_path):
    path = _raw_dataset(tmp_path / "raw", 6, bad_image_at=4)
    out = tmp_path / "out"
    results = run_pipeline(
        path, out, recaptioner=scripted_recaptioner, llm=scripted_llm, box_labeller=ScriptedBoxLabeller(),
        config=_config(box_threshold=0.75),
    )
    assert set(results) == {"recaption", "extract", "instruct", "boxes"}
    records = {r["id"]: r for r in _records(out / "boxes")}
    assert len(records) == 6  # nothing dropped
    by_colour = {COLOURS[int(rid)]: r for rid, r in records.items()}
    assert by_colour["red"]["status"] == "no_facts"
    assert by_colour["green"]["status"] == "parse_failed" and "no JSON" in by_colour["green"]["reason"]
    assert by_colour["purple"]["status"] == "image_error" and by_colour["purple"]["objects"] == []
    blue = by_colour["blue"]
    assert blue["status"] == "ok" and "item 1" in blue["reason"]  # the incomplete item was reported
    # Threshold 0.75 keeps the phrase box (0.9) and the category box (0.8); NMS merges them.
    assert blue["objects"] == [
        {"bbox": [0.0, 0.0, blue["width"] / 2, 32.0], "phrase": "blue dog", "category": "dog",
         "parent_category": "animal", "score": pytest.approx(0.9)}
    ]
    assert blue["box_stats"]["suppressed"] == 1
    assert blue["caption"].startswith("A blue dog") and blue["raw_caption"].startswith("blue dog BUY")
    image = (out / "boxes" / blue["image"]).resolve()
    assert image == (tmp_path / "raw/imgs/1.png").resolve() and Path(blue["image"]).is_absolute()
    prov = blue["provenance"]
    assert set(prov) == {"recaption", "extract", "boxes"}
    assert prov["boxes"]["threshold"] == 0.75 and prov["boxes"]["detector"] == "scripted-detector"
    assert "transformers=" in prov["extract"]["versions"] and "{caption}" in prov["extract"]["filter_prompt"]
    done = json.loads((out / "boxes" / "_part-00000-of-00001.done.json").read_text())
    assert done["records"] == 6 and done["statuses"]["ok"] == sum(r["status"] == "ok" for r in records.values())


def test_granucap_output_is_readable_by_datasets(tmp_path):
    import datasets

    path = _raw_dataset(tmp_path / "raw", 5)
    out = tmp_path / "out"
    run_pipeline(path, out, recaptioner=scripted_recaptioner, llm=scripted_llm, box_labeller=ScriptedBoxLabeller(),
                 steps="recaption,extract,boxes", config=_config(output_format="parquet"))
    files = sorted(str(p) for p in (out / "boxes").glob("part-*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    rows = list(ds)
    assert len(rows) == 5
    for row in rows:
        assert {"image", "caption", "objects"} <= set(row)
        for obj in row["objects"]:
            assert len(obj["bbox"]) == 4 and obj["bbox"][2] > 0 and obj["bbox"][3] > 0
            assert obj["phrase"] and obj["category"] and obj["parent_category"] and 0 <= obj["score"] <= 1


def test_instruction_data_is_llava_conversation_json(tmp_path):
    path = _raw_dataset(tmp_path / "raw", 4)
    out = tmp_path / "out"
    run_pipeline(path, out, recaptioner=scripted_recaptioner, llm=scripted_llm, steps="recaption,extract,instruct",
                 config=_config())
    records = {r["id"]: r for r in _records(out / "instruct")}
    assert len(records) == 4
    green = records["000000000002"]
    assert green["status"] == "parse_failed" and green["conversations"] == []
    blue = records["000000000001"]
    human, gpt = blue["conversations"]
    assert human["from"] == "human" and human["value"].startswith("<image>\n")
    assert "blue dog BUY NOW cheap #1" in human["value"]
    answer = json.loads(gpt["value"])
    assert gpt["from"] == "gpt" and answer["caption"] == blue["caption"]
    assert parse_entities(json.dumps(answer["entities"])).entities[0].phrase == "blue dog"
    exported = tmp_path / "llava.json"
    assert export_llava_json(out / "instruct", exported) == 3
    rows = json.loads(exported.read_text())
    assert {r["id"] for r in rows} == {"000000000000", "000000000001", "000000000003"}
    assert all(Path(r["image"]).is_file() and len(r["conversations"]) == 2 for r in rows)


# ------------------------------------------------------------------------------------------------ steps alone


def test_each_step_runs_alone_on_the_previous_steps_output(tmp_path):
    path = _raw_dataset(tmp_path / "raw", 5)
    chained = tmp_path / "chained"
    run_pipeline(path, chained, recaptioner=scripted_recaptioner, llm=scripted_llm,
                 box_labeller=ScriptedBoxLabeller(), config=_config())
    alone = tmp_path / "alone"
    run_pipeline(path, alone, recaptioner=scripted_recaptioner, steps=["recaption"], config=_config())
    run_pipeline(alone / "recaption", alone, llm=scripted_llm, steps=["extract"], config=_config())
    run_pipeline(alone / "extract", alone, steps=["instruct"], config=_config())
    run_pipeline(alone / "extract", alone, box_labeller=ScriptedBoxLabeller(), steps=["boxes"], config=_config())

    def comparable(record):
        return {k: v for k, v in record.items() if k != "provenance"}

    for step in ("recaption", "extract", "instruct", "boxes"):
        a, b = _records(chained / step), _records(alone / step)
        assert [comparable(r) for r in a] == [comparable(r) for r in b], step


def test_a_step_needs_its_model_and_its_producers_fields(tmp_path):
    path = _raw_dataset(tmp_path / "raw", 2)
    with pytest.raises(ValueError, match="boxes needs box_labeller"):
        run_pipeline(path, tmp_path / "out", llm=scripted_llm, recaptioner=scripted_recaptioner)
    with pytest.raises(ValueError, match="run the extract step first"):
        run_pipeline(path, tmp_path / "out2", steps="instruct", config=_config())
    with pytest.raises(ValueError, match="unknown or empty steps"):
        run_pipeline(path, tmp_path / "out3", steps="recaption,caption")


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("crash_after", [1, 4, 7])
def test_resume_after_a_crash_mid_shard_loses_and_duplicates_nothing(tmp_path, crash_after):
    n = 9
    path = _raw_dataset(tmp_path / "raw", n)
    out = tmp_path / "out"
    config = _config(batch_size=2, records_per_file=3)
    crashing = CrashAfter(scripted_llm, limit=crash_after)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(path, out, recaptioner=scripted_recaptioner, llm=crashing, steps="recaption,extract",
                     config=config)
    assert not (out / "extract" / "_part-00000-of-00001.done.json").exists()
    calls = []

    def counting_llm(prompts):
        calls.extend(prompts)
        return scripted_llm(prompts)

    results = run_pipeline(path, out, recaptioner=scripted_recaptioner, llm=counting_llm,
                           steps="recaption,extract", config=config)
    assert results["recaption"].resumed_complete
    ids = [r["id"] for r in _records(out / "extract")]
    assert sorted(ids) == [f"{i:012d}" for i in range(n)] and len(set(ids)) == n
    assert results["extract"].skipped + results["extract"].written == n
    # Records finished before the crash are not sent to the model again: one filter prompt per new record.
    assert sum("Keep only the facts" in p for p in calls) == results["extract"].written
    assert (results["extract"].skipped > 0) == (crash_after > 2)
    assert not list((out / "extract").glob("_*.journal"))
    # A third run is a no-op.
    again = run_pipeline(path, out, recaptioner=scripted_recaptioner, llm=scripted_llm,
                         steps="recaption,extract", config=config)
    assert again["extract"].resumed_complete and again["extract"].written == 0
    assert [r["id"] for r in _records(out / "extract")] == ids


def test_writer_recovers_from_a_kill_between_file_rename_and_journal_reset(tmp_path):
    writer = ShardWriter(tmp_path / "step", tmp_path, shard_index=0, num_shards=1, records_per_file=10)
    writer.write([{"id": "a", "image": "x"}, {"id": "b", "image": "x"}])
    # The finished file landed but the journal still holds its records, plus a torn half line.
    (tmp_path / "step" / "part-00000-of-00001-00000.jsonl").write_text(
        json.dumps({"id": "a", "image": "x"}) + "\n" + json.dumps({"id": "b", "image": "x"}) + "\n"
    )
    with open(writer.journal_path, "a") as f:
        f.write('{"id": "c", "ima')
    resumed = ShardWriter(tmp_path / "step", tmp_path, shard_index=0, num_shards=1, records_per_file=10)
    assert resumed.done_ids() == {"a", "b"}
    resumed.write([{"id": "c", "image": "x"}])
    resumed.close({})
    ids = [r["id"] for p in sorted((tmp_path / "step").glob("part-*")) for r in read_part_records(p)]
    assert ids == ["a", "b", "c"]


def test_duplicate_input_ids_are_rejected(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    path = tmp_path / "dup.jsonl"
    path.write_text("\n".join(json.dumps({"id": "same", "image": "a.png", "caption": "x"}) for _ in range(2)))
    with pytest.raises(ValueError, match="occurs twice"):
        run_pipeline(path, tmp_path / "out", recaptioner=scripted_recaptioner, steps="recaption",
                     config=_config(columns=InputColumns(id="id")))


# ------------------------------------------------------------------------------------------------ sharding


def test_shards_are_disjoint_and_cover_the_input(tmp_path):
    n, num_shards = 10, 3
    path = _raw_dataset(tmp_path / "raw", n)
    out = tmp_path / "out"
    for shard in range(num_shards):
        run_pipeline(path, out, recaptioner=scripted_recaptioner, llm=scripted_llm, steps="recaption,extract",
                     config=_config(num_shards=num_shards, shard_index=shard))
    per_shard = [
        {r["id"] for p in (out / "extract").glob(f"part-{s:05d}-of-00003-*") for r in read_part_records(p)}
        for s in range(num_shards)
    ]
    assert all(a.isdisjoint(b) for i, a in enumerate(per_shard) for b in per_shard[i + 1:])
    assert set().union(*per_shard) == {f"{i:012d}" for i in range(n)}
    # A later step reading the whole step folder with the same sharding reads only its own shard's files.
    own = list(iter_input_records(str(out / "extract"), num_shards=num_shards, shard_index=1))
    assert {r["id"] for r in own} == per_shard[1]


def test_invalid_shard_arguments_are_value_errors(tmp_path):
    path = _raw_dataset(tmp_path / "raw", 1)
    with pytest.raises(ValueError, match="shard_index"):
        list(iter_input_records(str(path), num_shards=2, shard_index=2))


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_arguments_build_the_config_and_validate_models(tmp_path, monkeypatch):
    parser = add_annotate_arguments(argparse.ArgumentParser())
    template = tmp_path / "recaption.txt"
    template.write_text("Fix this caption: {raw caption}")
    args = parser.parse_args([
        "--input", "x.jsonl", "--output", str(tmp_path / "out"), "--steps", "recaption,boxes", "--num-shards", "4",
        "--caption-column", "alt", "--recaption-prompt", f"@{template}", "--box-threshold", "0.4",
    ])
    monkeypatch.setenv("RANK", "2")
    config = config_from_args(args)
    assert config.shard_index == 2 and config.num_shards == 4 and config.box_threshold == 0.4
    assert config.columns.caption == ("alt",)
    assert config.prompts.recaption_prompt("x") == "Fix this caption: x"
    with pytest.raises(ValueError, match="needs --recaption-model; step boxes needs --detector"):
        run_annotate(args)


@pytest.mark.parametrize("output_format", ["jsonl", "parquet"])
def test_stage2_reader_accepts_the_boxes_output(tmp_path, output_format):
    from detclipv3_hf.data.readers import read_granucap

    path = _raw_dataset(tmp_path / "raw", 8, bad_image_at=5)
    out = tmp_path / "out"
    run_pipeline(path, out, recaptioner=scripted_recaptioner, llm=scripted_llm, box_labeller=ScriptedBoxLabeller(),
                 steps="recaption,extract,boxes", config=_config(output_format=output_format))
    written = {r["id"]: r for r in _records(out / "boxes")}
    usable = {rid for rid, r in written.items() if r["status"] == "ok"}
    assert usable and len(usable) < len(written)
    records = list(read_granucap(str(out / "boxes" / f"part-*.{output_format}")))
    assert len(records) == len(usable)  # records without objects are the reader's to skip
    for record in records:
        source = written[str(record.image_id)]
        assert record.caption == source["caption"]
        assert [o.phrase for o in record.objects] == [o["phrase"] for o in source["objects"]]
        assert [o.parent_category for o in record.objects] == [o["parent_category"] for o in source["objects"]]
