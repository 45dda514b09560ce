"""Shared fixtures of the training tests: a tiny synthetic world, a tiny processor and tiny model folders."""

from __future__ import annotations

import pytest
import torch
from tiny import build_clip_tokenizer, tiny_config

from detclipv3_hf import DetClipV3ForObjectDetection, DetClipV3ImageProcessor, DetClipV3Processor
from detclipv3_hf.data import generate_synthetic_world
from detclipv3_hf.training import TrainConfig

SIZE = {"shortest_edge": 64, "longest_edge": 96}
# Small images, few concepts, no random branch that is irrelevant to what a test checks.
TINY_STAGE = {
    "short_sides": [64],
    "max_size": 96,
    "max_concepts": {"detection": 12, "grounding": 12, "captioned": 12},
    "vocabulary_free_ratio": 0.0,
}


@pytest.fixture
def tiny_stage():
    """StageSpec overrides for CPU tests (a fresh dict per test)."""
    return {**TINY_STAGE, "max_concepts": dict(TINY_STAGE["max_concepts"])}


@pytest.fixture(scope="session")
def training_world(tmp_path_factory):
    return generate_synthetic_world(
        tmp_path_factory.mktemp("world"),
        num_train=12,
        num_val=2,
        seed=3,
        min_size=64,
        max_size=96,
        max_objects=4,
    )


@pytest.fixture(scope="session")
def tiny_processor():
    return DetClipV3Processor(
        DetClipV3ImageProcessor(size=SIZE), build_clip_tokenizer(), max_concept_tokens=8
    )


@pytest.fixture(scope="session")
def detector_folder(tmp_path_factory, tiny_processor):
    """A saved tiny detector + processor (the start of a stage-1 run)."""
    folder = tmp_path_factory.mktemp("detector")
    torch.manual_seed(0)
    model = DetClipV3ForObjectDetection(tiny_config(tiny_processor.tokenizer))
    model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder


@pytest.fixture
def make_config(training_world):
    """``make_config(model, output, **fields)``: a small TrainConfig on the synthetic world's GranuCap data."""

    def make(model, output, **fields) -> TrainConfig:
        values = dict(
            stage=1,
            model=str(model),
            output=str(output),
            data=[f"detection={training_world.train.granucap_file}"],
            concepts=str(training_world.concepts_file),
            max_steps=2,
            batch_size=2,
            learning_rate=1e-3,
            save_steps=0,
            logging_steps=1,
            report_to="jsonl",
            seed=0,
            shuffle_buffer_size=8,
            stage_overrides=dict(TINY_STAGE),
        )
        values.update(fields)
        return TrainConfig(**values)

    return make
