"""Shared helpers for the benchmarks: wall-clock timing, peak memory, FLOP counting, machine throughput and the
offline BERT vocabulary of the Grounding DINO baselines.

Every benchmark in this folder reuses these so that their numbers are measured the same way:

- `time_calls` runs a callable after warm-up runs and returns every repeat's wall time (seconds);
  `median` summarises them.
- `PeakRSS` measures the peak resident-set-size growth of this process over a block (Linux `VmHWM`, reset through
  `/proc/self/clear_refs`; where that is not allowed, a sampling thread polls `VmRSS`).
- `count_flops` counts the FLOPs of one call with `torch.utils.flop_counter.FlopCounterMode`, adding two operators
  that it does not know on CPU: `scaled_dot_product_attention`'s CPU kernel (counted as the matmuls it does) and
  `grid_sample` (an estimate: 4 multiply-adds = 8 FLOPs per output element, bilinear), reported separately.
- `measure_matmul_flops` measures this machine's fp32 matmul throughput (FLOP/s) with a large square matmul.
- `format_table` renders rows of strings as a Markdown table.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

# FLOPs per output element of bilinear `grid_sample`: 4 neighbours, one multiply-add each.
GRID_SAMPLE_FLOPS_PER_OUTPUT = 8


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Runs `fn` `warmup` times untimed, then `repeats` times timed.

    Args:
        fn: The call to time (no arguments; its result is discarded).
        repeats: Number of timed runs (>= 1).
        warmup: Number of untimed runs first (>= 0), so allocator and kernel caches are warm.

    Returns:
        The wall time of each timed run, in seconds.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}.")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    if not values:
        raise ValueError("median of an empty sequence.")
    return float(statistics.median(values))


# ----------------------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (e.g. `VmRSS`, `VmHWM`) in KiB, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Returns freed heap pages to the OS (glibc `malloc_trim`), so a block's RSS growth is not hidden by memory that
    an earlier block freed but the allocator kept resident. A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter (`VmHWM`) of this process; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Context manager: peak growth of this process's resident memory over the block, in bytes.

    `VmHWM` is reset on entry when the kernel allows it (exact peak); otherwise a thread samples `VmRSS` every
    `interval` seconds (may miss short spikes). `method` says which was used. On entry garbage is collected and
    freed heap is returned to the OS (`malloc_trim`) so earlier temporaries do not hide the block's own allocations;
    memory that the allocator still keeps cached can make the delta an underestimate.

    Example:
        >>> with PeakRSS() as mem:
        ...     run()
        >>> mem.peak_delta_bytes
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_delta_bytes = 0
        self.method = ""
        self._baseline_kib = 0
        self._sampled_peak_kib = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        gc.collect()
        _release_free_heap()
        self._baseline_kib = _status_kib("VmRSS") or 0
        if _reset_peak_rss() and _status_kib("VmHWM") is not None:
            self.method = "VmHWM"
        else:
            self.method = "sampled VmRSS"
            self._sampled_peak_kib = self._baseline_kib
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled_peak_kib = max(self._sampled_peak_kib, _status_kib("VmRSS") or 0)
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._sampled_peak_kib, _status_kib("VmRSS") or 0)
        else:
            peak = _status_kib("VmHWM") or 0
        self.peak_delta_bytes = max(0, peak - self._baseline_kib) * 1024


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------------------------


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV matmuls of attention, `2 * B * H * (Lq * Lk * E + Lq * Lk * Ev)`."""
    batch, heads, q_len, head_dim = query_shape
    k_len = key_shape[-2]
    v_dim = value_shape[-1]
    return 2 * batch * heads * q_len * k_len * (head_dim + v_dim)


def _grid_sample_flops(input_shape, grid_shape, *args, out_shape=None, **kwargs) -> int:
    """Estimate for bilinear `grid_sample`: output `(N, C, Hg, Wg)`, 8 FLOPs per output element."""
    batch, channels = input_shape[:2]
    return GRID_SAMPLE_FLOPS_PER_OUTPUT * batch * channels * grid_shape[1] * grid_shape[2]


@dataclass
class FlopCount:
    """FLOPs of one call.

    Attributes:
        total: every counted FLOP, the `grid_sample` estimate included.
        grid_sample: the `grid_sample` estimate alone (FlopCounterMode itself does not count it).
        by_operator: FLOPs per aten operator name.
    """

    total: int
    grid_sample: int
    by_operator: dict[str, int]


def count_flops(fn: Callable[[], Any]) -> FlopCount:
    """Counts the FLOPs of one run of `fn` (matmuls, convolutions, attention, the `grid_sample` estimate).

    Element-wise work (activations, norms, softmax, additions) is not counted, as is usual for FLOP counts.
    Call it with the model's parameters frozen (`model.requires_grad_(False)`): FlopCounterMode's module tracker
    hooks every module input that requires grad and fails on parameter views made in inference mode.
    """
    custom = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        aten.grid_sampler_2d: _grid_sample_flops,
    }
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    by_operator = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    grid = sum(n for op, n in by_operator.items() if "grid_sampler" in op)
    return FlopCount(total=int(counter.get_total_flops()), grid_sample=grid, by_operator=by_operator)


def measure_matmul_flops(size: int = 4096, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """This machine's matmul throughput in FLOP/s: the best of `repeats` timed `size` x `size` matmuls.

    The best (not the median) run is the attainable peak that the benchmarks' achieved fractions refer to.
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"size and repeats must be >= 1, got size={size}, repeats={repeats}.")
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    with torch.inference_mode():
        torch.mm(a, b)  # warm-up
        best = min(time_calls(lambda: torch.mm(a, b), repeats=repeats, warmup=0))
    return 2.0 * size**3 / best


# ----------------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------------


def machine_summary() -> str:
    """One line describing the machine and the torch build (CPU model, cores, torch threads, versions)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}; {os.cpu_count()} logical cores; torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads; Python {platform.python_version()}"
    )


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with `header` and string `rows` (each row as long as the header)."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)} has {len(row)} cells, the header has {len(header)}.")
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])


def format_bytes(num_bytes: float) -> str:
    """`1.23 GiB` / `456 MiB` style."""
    if num_bytes >= 1024**3:
        return f"{num_bytes / 1024**3:.2f} GiB"
    return f"{num_bytes / 1024**2:.0f} MiB"


# BERT-base-uncased ids that Grounding DINO hard-codes: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103, "." 1012
# and "?" 1029 (its `SPECIAL_TOKENS` split the prompt into phrases by these ids).
BERT_FIXED_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
BERT_VOCAB_SIZE = 30522


def bert_layout_vocab(corpus: Sequence[str], wordpiece_vocab: int) -> dict[str, int]:
    """A BERT-uncased-style WordPiece trained on ``corpus``, laid out at BERT-base ids (piece -> id).

    Grounding DINO splits its prompt into phrases by BERT-base ids, so the special tokens keep BERT's ids and the
    trained pieces fill the free ids of a 30,522-entry vocabulary, in (length, piece) order: ``tokenizers`` assigns
    its own ids in hash order, which differs between processes. The rest are ``[unusedN]``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=wordpiece_vocab,
        special_tokens=list(BERT_FIXED_IDS),
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789.?,-'"),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    vocab = dict(BERT_FIXED_IDS)
    free_ids = (i for i in range(BERT_VOCAB_SIZE) if i not in BERT_FIXED_IDS.values())
    for piece in sorted(tok.get_vocab(), key=lambda piece: (len(piece), piece)):
        if piece not in vocab:
            vocab[piece] = next(free_ids)
    for i in free_ids:
        vocab[f"[unused{i}]"] = i
    return vocab
