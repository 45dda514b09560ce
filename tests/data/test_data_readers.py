import io
import json
import tarfile

import datasets
import pytest
from PIL import Image

from detclipv3_hf.data import load_records, read_coco, read_granucap, read_odvg


def _png(path, size=(40, 32), color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _png_bytes(size=(40, 32), color=(10, 200, 10)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _granucap_rows(tmp_path, n, prefix="img"):
    rows = []
    for i in range(n):
        _png(tmp_path / "images" / f"{prefix}{i}.png")
        rows.append(
            {
                "image": f"images/{prefix}{i}.png",
                "image_id": f"{prefix}{i}",
                "caption": f"picture {i}",
                "objects": [
                    {
                        "bbox": [1, 2, 10, 8],
                        "phrase": "red box",
                        "category": "box",
                        "parent_category": "thing",
                    }
                ],
            }
        )
    return rows


@pytest.fixture
def coco_file(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png"):
        _png(tmp_path / "imgs" / name)
    (tmp_path / "imgs" / "broken.png").write_bytes(b"this is not a png")
    images = [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 32},
        {"id": 2, "file_name": "b.png", "width": 40, "height": 32},
        {"id": 3, "file_name": "broken.png", "width": 40, "height": 32},
        {"id": 4, "file_name": "c.png", "width": 40, "height": 32},  # box outside
        {"id": 5, "file_name": "d.png", "width": 40, "height": 32},  # w = 0
        {"id": 6, "file_name": "e.png", "width": 40, "height": 32},  # unknown category
        {"id": 7, "file_name": "missing.png", "width": 40, "height": 32},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0},
        {
            "id": 2,
            "image_id": 1,
            "category_id": 2,
            "bbox": [5, 5, 20, 20],
            "iscrowd": 0,
            "phrase": "big blue star",
        },
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 40, 32], "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 32], "iscrowd": 1},
        {"id": 5, "image_id": 3, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0},
        {"id": 6, "image_id": 4, "category_id": 1, "bbox": [35, 1, 10, 10], "iscrowd": 0},
        {"id": 7, "image_id": 5, "category_id": 1, "bbox": [1, 1, 0, 10], "iscrowd": 0},
        {"id": 8, "image_id": 6, "category_id": 99, "bbox": [1, 1, 10, 10], "iscrowd": 0},
        {"id": 9, "image_id": 7, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0},
    ]
    cats = [
        {"id": 1, "name": "circle", "supercategory": "round shape"},
        {"id": 2, "name": "star", "supercategory": "symbol"},
    ]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_coco_reads_good_records_and_counts_skips(coco_file, tmp_path):
    stream = read_coco(str(coco_file), image_root=str(tmp_path / "imgs"))
    assert isinstance(stream.dataset, datasets.IterableDataset)  # streaming is the default
    records = list(stream)
    assert [r.image_id for r in records] == ["1", "2"]
    first = records[0]
    assert first.objects[0].labels == ["circle"] and first.objects[0].parent_category == "round shape"
    assert first.objects[1].labels == ["big blue star", "star"]
    assert first.objects[1].hierarchical_label == "big blue star|star|symbol"
    assert len(records[1].objects) == 1  # the crowd region is dropped
    stats = stream.stats
    assert (stats.seen, stats.kept, stats.skipped) == (7, 2, 5)
    assert stats.reasons == {"unreadable image": 2, "invalid box": 2, "missing field": 1}
    assert all(str(coco_file) in source for source, _ in stats.examples)
    assert "image_id=3" in " ".join(s for s, _ in stats.examples)


def test_coco_dict_spec_and_auto_format(coco_file, tmp_path):
    spec = {"path": str(coco_file), "image_root": str(tmp_path / "imgs")}
    assert [r.image_id for r in load_records(spec)] == ["1", "2"]


def test_odvg_grounding_and_detection(tmp_path):
    _png(tmp_path / "g.png")
    _png(tmp_path / "d.png")
    _png(tmp_path / "o.png")
    rows = [
        {
            "filename": "g.png",
            "height": 32,
            "width": 40,
            "grounding": {
                "caption": "a cat and a dog",
                "regions": [
                    {"bbox": [2, 3, 12, 23], "phrase": "a cat"},
                    {"bbox": [20, 1, 39, 31], "phrase": "a dog"},
                ],
            },
        },
        "{not json",
        "",
        {
            "filename": "d.png",
            "detection": {"instances": [{"bbox": [0, 0, 10, 10], "label": 3, "category": "bus"}]},
        },
        {
            "filename": "o.png",
            "detection": {"instances": [{"bbox": [0, 0, 50, 10], "label": 3, "category": "bus"}]},
        },
        {"filename": "d.png", "detection": {"instances": [{"bbox": [0, 0, 10, 10], "label": 7}]}},
        {"filename": "g.png", "height": 99, "width": 40, "detection": {"instances": []}},
    ]
    path = _write_jsonl(tmp_path / "odvg.jsonl", rows)
    stream = read_odvg(str(path))
    records = list(stream)
    assert len(records) == 2
    grounding, detection = records
    assert grounding.caption == "a cat and a dog"
    assert [o.bbox_xywh for o in grounding.objects] == [(2, 3, 10, 20), (20, 1, 19, 30)]
    assert [o.labels for o in grounding.objects] == [["a cat"], ["a dog"]]
    assert detection.objects[0].category == "bus" and detection.caption is None
    assert stream.stats.reasons == {
        "malformed row": 1,
        "invalid box": 1,
        "missing field": 1,
        "image size mismatch": 1,
    }
    assert any(source.endswith("odvg.jsonl:2") for source, _ in stream.stats.examples)
    # With a label map, the instance without a category becomes usable.
    assert len(list(read_odvg(str(path), label_map={7: "tram"}))) == 3


def test_granucap_jsonl_with_bad_records(tmp_path):
    rows = _granucap_rows(tmp_path, 3)
    rows[1]["objects"].append({"bbox": [1, 2, 0, 8], "phrase": "flat", "category": "box"})  # w = 0
    rows[2]["negatives"] = ["cat", "dog"]
    rows[2]["objects"][0]["score"] = 0.7
    rows.append({"image": "images/img0.png", "caption": "no objects key"})
    rows.append({"image": "images/nope.png", "objects": [{"bbox": [0, 0, 1, 1], "category": "box"}]})
    rows.append({"image": "images/img0.png", "objects": [{"bbox": [0, 0, 5, 5]}]})  # no label at all
    path = _write_jsonl(tmp_path / "caps.jsonl", rows)
    stream = load_records(str(path))
    records = list(stream)
    assert [r.image_id for r in records] == ["img0", "img2"]
    obj = records[0].objects[0]
    assert obj.labels == ["red box", "box"] and obj.hierarchical_label == "red box|box|thing"
    assert records[0].caption == "picture 0" and records[0].image.size == (40, 32)
    assert records[1].negatives == ["cat", "dog"] and records[1].objects[0].score == pytest.approx(0.7)
    assert stream.stats.reasons == {
        "invalid box": 1,
        "missing field": 1,
        "unreadable image": 1,
        "invalid object": 1,
    }


def test_granucap_parquet_with_embedded_bytes(tmp_path):
    good = {
        "image": {"bytes": _png_bytes(), "path": None},
        "caption": "green",
        "objects": [
            {
                "bbox": [1.0, 1.0, 5.0, 5.0],
                "phrase": "green box",
                "category": "box",
                "parent_category": "thing",
            }
        ],
    }
    corrupt = dict(good, image={"bytes": b"\x89PNG broken", "path": None})
    outside = dict(good, objects=[dict(good["objects"][0], bbox=[30.0, 1.0, 20.0, 5.0])])
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "objects": datasets.List(
                {
                    "bbox": datasets.List(datasets.Value("float32")),
                    "phrase": datasets.Value("string"),
                    "category": datasets.Value("string"),
                    "parent_category": datasets.Value("string"),
                }
            ),
        }
    )
    path = tmp_path / "caps.parquet"
    datasets.Dataset.from_list([good, corrupt, outside, good], features=features).to_parquet(str(path))
    stream = read_granucap(str(path))
    records = list(stream)
    assert len(records) == 2
    assert records[0].objects[0].hierarchical_label == "green box|box|thing"
    assert records[0].image.getpixel((0, 0)) == (10, 200, 10)
    assert stream.stats.reasons == {"unreadable image": 1, "invalid box": 1}
    assert any(source.endswith("caps.parquet#1") for source, _ in stream.stats.examples)


def test_webdataset_shards(tmp_path):
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            annotation = {
                "caption": f"c{i}",
                "objects": [{"bbox": [1, 1, 4, 4], "category": "box", "phrase": "tiny box"}],
            }
            if i == 1:
                annotation["objects"][0]["bbox"] = [1, 1, 100, 4]
            for name, data in ((f"s{i}.png", _png_bytes()), (f"s{i}.json", json.dumps(annotation).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stream = load_records(str(tmp_path / "*.tar"))
    records = list(stream)
    assert [r.caption for r in records] == ["c0", "c2"]
    assert stream.stats.reasons == {"invalid box": 1}
    assert "#s1" in stream.stats.examples[0][0]


def test_format_override_applies_to_every_row(tmp_path):
    path = _write_jsonl(tmp_path / "caps.jsonl", _granucap_rows(tmp_path, 2))
    stream = load_records(str(path), format="odvg")
    assert list(stream) == []
    assert stream.stats.reasons == {"missing field": 2}


@pytest.mark.parametrize("num_files", [1, 4])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_read_disjoint_records_covering_everything(tmp_path, num_files, world_size):
    for f in range(num_files):
        _write_jsonl(tmp_path / f"part{f}.jsonl", _granucap_rows(tmp_path, 5, prefix=f"f{f}_"))
    pattern = str(tmp_path / "part*.jsonl")
    everything = [r.image_id for r in load_records(pattern)]
    assert len(everything) == 5 * num_files
    per_rank = [
        [r.image_id for r in load_records(pattern, rank=k, world_size=world_size)] for k in range(world_size)
    ]
    flat = [i for ids in per_rank for i in ids]
    assert len(flat) == len(set(flat)) and set(flat) == set(everything)
    assert all(per_rank)


def test_coco_ranks_are_disjoint(coco_file, tmp_path):
    root = str(tmp_path / "imgs")
    ranks = [{r.image_id for r in read_coco(str(coco_file), root, rank=k, world_size=2)} for k in range(2)]
    assert not ranks[0] & ranks[1] and ranks[0] | ranks[1] == {"1", "2"}


def test_resume_from_position(tmp_path):
    rows = _granucap_rows(tmp_path, 8)
    rows.insert(3, "{broken")
    path = str(_write_jsonl(tmp_path / "caps.jsonl", rows))
    full = [r.image_id for r in load_records(path)]
    stream = load_records(path)
    head = [next(stream).image_id for _ in range(4)]
    assert stream.position == 5  # four records plus the broken row before the fourth
    rest = [r.image_id for r in load_records(path, start_index=stream.position)]
    assert head + rest == full
    # Per rank: the position counts rows of that rank's stream only.
    rank_stream = load_records(path, rank=1, world_size=2)
    first = next(rank_stream).image_id
    resumed = [r.image_id for r in load_records(path, rank=1, world_size=2, start_index=rank_stream.position)]
    assert [first, *resumed] == [r.image_id for r in load_records(path, rank=1, world_size=2)]


def test_shuffle_is_seeded_permutation(tmp_path):
    for f in range(4):
        _write_jsonl(tmp_path / f"part{f}.jsonl", _granucap_rows(tmp_path, 3, prefix=f"f{f}_"))
    pattern = str(tmp_path / "part*.jsonl")
    plain = [r.image_id for r in load_records(pattern)]
    a = [r.image_id for r in load_records(pattern, shuffle_seed=3, shuffle_buffer_size=4)]
    b = [r.image_id for r in load_records(pattern, shuffle_seed=3, shuffle_buffer_size=4)]
    assert a == b and sorted(a) == sorted(plain)


def test_non_streaming_matches_streaming(tmp_path):
    path = str(_write_jsonl(tmp_path / "caps.jsonl", _granucap_rows(tmp_path, 4)))
    stream = load_records(path, streaming=False, cache_dir=str(tmp_path / "cache"))
    assert isinstance(stream.dataset, datasets.Dataset)
    assert [r.image_id for r in stream] == [r.image_id for r in load_records(path)]


def test_bad_arguments_raise(tmp_path, coco_file):
    with pytest.raises(ValueError, match="rank"):
        load_records(str(coco_file), rank=2, world_size=2)
    with pytest.raises(ValueError, match="format"):
        load_records(str(coco_file), format="yolo")
    with pytest.raises(ValueError, match="no data file"):
        load_records(str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(ValueError, match="path"):
        load_records({"file": str(coco_file)})
    with pytest.raises(ValueError, match="start_index"):
        load_records(str(coco_file), start_index=-1)
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        load_records(str(tmp_path / "notes.csv"))
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="images"):
        load_records(str(tmp_path / "bad.json"))
