import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from tiny import build_clip_tokenizer  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def clip_tokenizer():
    return build_clip_tokenizer()
