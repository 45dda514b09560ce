"""The offline CLIP-style tokenizer: same result in every process, whole-word tokens, CLIP's special tokens."""

import json
import subprocess
import sys

import pytest

from detclipv3_hf.data import train_clip_tokenizer

WORDS = [
    "large striped red circle|circle|round shape",
    "small dotted blue ring|ring|round shape",
    "green star",
]

PROBE = """
import json
from detclipv3_hf.data import train_clip_tokenizer
tok = train_clip_tokenizer({words!r}, vocab_size=450)
print(json.dumps({{"vocab": tok.get_vocab(), "ids": tok("a red ring|ring|round shape xyz")["input_ids"]}}))
"""


def test_same_tokenizer_in_every_process():
    """`tokenizers` breaks ties in hash order, which differs between processes; the result must not."""
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", PROBE.format(words=WORDS)], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    here = train_clip_tokenizer(WORDS, vocab_size=450)
    assert here.get_vocab() == runs[0]["vocab"]


def test_words_are_single_tokens_and_nothing_is_unknown():
    tok = train_clip_tokenizer(WORDS, vocab_size=450)
    for word in "large striped red circle ring round shape small dotted blue green star".split():
        assert tok.tokenize(word) == [word + "</w>"]
    ids = tok("Zebra #42!")["input_ids"]
    inner = ids[1:-1]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in inner and len(inner) > 0
    # CLIP's layout: the two special tokens are the last ids.
    assert {tok.bos_token_id, tok.eos_token_id} == {len(tok) - 2, len(tok) - 1}


def test_bad_input():
    with pytest.raises(TypeError, match="single string"):
        train_clip_tokenizer("red circle")
    with pytest.raises(ValueError, match="non-empty"):
        train_clip_tokenizer([])
