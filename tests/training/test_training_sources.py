import json

from PIL import Image

from detclipv3_hf.training.config import DataSourceConfig
from detclipv3_hf.training.sources import EndlessSource


def _captioned_file(tmp_path, num_good):
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(num_good):
        Image.new("RGB", (40, 32), (200, 10, 10)).save(tmp_path / "images" / f"{i}.png")
        obj = {"bbox": [1, 2, 10, 8], "phrase": "red box", "category": "box", "parent_category": "thing"}
        rows.append({"image": f"images/{i}.png", "image_id": str(i), "objects": [obj]})
    rows.append({"image": "images/missing.png", "objects": [{"bbox": [0, 0, 4, 4], "category": "box"}]})
    path = tmp_path / "caps.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_skip_statistics_add_up_over_finished_and_running_epochs(tmp_path):
    path = _captioned_file(tmp_path, num_good=3)
    source = EndlessSource(DataSourceConfig("captioned", str(path)), seed=None)
    ids = [source.next_record().image_id for _ in range(3 + 2)]  # one whole epoch, then two of the next
    assert ids == ["0", "1", "2", "0", "1"]
    stats = source.close_stats()
    assert stats.kept == 5 and stats.reasons == {"unreadable image": 1}
    assert stats.seen == 4 + 2  # the first epoch's 4 rows, then 2 of the second
    assert source.stats.kept == 3  # finished epochs only; close_stats does not change the source
