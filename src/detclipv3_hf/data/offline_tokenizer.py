"""A CLIP-style tokenizer trained offline in about a second, for the synthetic world and tiny models.

Real checkpoints use CLIP's own tokenizer from the Hub. Without a network (tests, the learnability benchmark, a
model trained only on the synthetic world) a byte-level BPE with CLIP's ``</w>`` word-end suffix, trained on the
few words the data uses, gives the same interface: wrap it in ``DetClipV3Processor`` like CLIP's.
"""

from __future__ import annotations

import json
import string
from collections import Counter
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTokenizer

START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits, punctuation runs.
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 400) -> CLIPTokenizer:
    """Trains a CLIP-style byte-level BPE (lower-cased, ``</w>`` suffix) on ``texts`` and returns a ``CLIPTokenizer``.

    Every printable ASCII character is also seen as a word of its own, so no input maps to the unknown token; with
    a small corpus and ``vocab_size`` a few hundred, every word of ``texts`` becomes a single token.

    The result is deterministic. ``tokenizers`` breaks frequency ties in hash order, which changes from process to
    process (same tokens and merges, different ids, tied merges in a different order), so ids are assigned by
    (length, token) with the special tokens last as in CLIP, and the merges are put in the order BPE's greedy rule
    gives when ties are broken by the pair itself (replayed on the corpus).

    Args:
        texts: the training text (strings).
        vocab_size: target vocabulary size, special tokens included.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single string")
    texts = list(texts)
    if not texts or not all(isinstance(text, str) for text in texts):
        raise ValueError("texts must be a non-empty list of strings")
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=END_OF_TEXT))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[START_OF_TEXT, END_OF_TEXT],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chars = " ".join(string.ascii_lowercase + string.digits + string.punctuation)
    corpus = [chars] * 5 + texts * 20
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    merges = _replay_merges(tok, corpus, merges)
    specials = [token for token in (START_OF_TEXT, END_OF_TEXT) if token in model["vocab"]]
    tokens = sorted((t for t in model["vocab"] if t not in specials), key=lambda t: (len(t), t)) + specials
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=merges)


def _replay_merges(tok: Tokenizer, corpus: list[str], merges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The trained merges in a deterministic order: BPE's greedy rule replayed on the corpus (at every step the
    merge whose pair is currently most frequent), ties broken by the pair itself instead of by hash order."""
    counts: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            counts[(*word[:-1], word[-1] + "</w>")] += 1
    words = dict(counts)
    remaining, ordered = set(merges), []
    while remaining:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                if pair in remaining:
                    pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        ordered.append(best)
        remaining.discard(best)
        words = {_merge(symbols, best): count for symbols, count in words.items()}
    return ordered + sorted(remaining)


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)
