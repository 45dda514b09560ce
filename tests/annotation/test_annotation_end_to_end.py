"""The whole annotation pipeline with the real (tiny, random) DetCLIPv3 detector as box labeller."""

import torch
from test_annotation_engine import _raw_dataset, scripted_llm, scripted_recaptioner
from tiny import build_clip_tokenizer, tiny_config

from detclipv3_hf import DetClipV3ForObjectDetection, DetClipV3ImageProcessor, DetClipV3Processor
from detclipv3_hf.annotation import AnnotationConfig, DetClipV3BoxLabeller, run_pipeline
from detclipv3_hf.data.readers import read_granucap


def test_end_to_end_with_detclipv3_feeds_the_stage2_reader(tmp_path):
    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer()
    processor = DetClipV3Processor(
        DetClipV3ImageProcessor(size={"shortest_edge": 32, "longest_edge": 64}),
        tokenizer,
        max_concept_tokens=8,
    )
    model = DetClipV3ForObjectDetection(tiny_config(tokenizer)).eval()
    labeller = DetClipV3BoxLabeller(model, processor, threshold=0.0, device="cpu", batch_size=2)
    results = run_pipeline(
        _raw_dataset(tmp_path / "raw", 4),
        tmp_path / "out",
        recaptioner=scripted_recaptioner,
        llm=scripted_llm,
        box_labeller=labeller,
        config=AnnotationConfig(box_threshold=0.0, progress=False),
    )
    assert set(results) >= {"recaption", "extract", "boxes"}
    records = list(read_granucap(str(tmp_path / "out" / "boxes"), streaming=True))
    assert records, "the stage-2 reader accepted no record"
    for record in records:
        assert record.caption
        for obj in record.objects:
            assert obj.hierarchical_label and obj.hierarchical_label.count("|") == 2
            x, y, w, h = obj.bbox_xywh
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= record.width + 1 and y + h <= record.height + 1
