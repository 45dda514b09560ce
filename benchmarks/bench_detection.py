"""Detection speed: DetCLIPv3 (Swin-T) against transformers' Grounding DINO (Swin-T) on CPU, in the same run.

Both models are built from their default configs with random weights (nothing is downloaded), in eval mode, float32,
under `torch.inference_mode`, on one 800x1333 image (batch 1), for vocabularies of 1, 80 and 1,203 concepts:

- **ours, uncached**: concept strings tokenised by a CLIP BPE tokenizer (one concept per row, padded to
  `max_concept_tokens` = 16) and encoded by the CLIP text tower inside the forward;
- **ours, cached**: `concept_embeds` computed once by `model.embed_concepts` and passed in (a fixed vocabulary);
- **Grounding DINO**: concepts joined as GD's processor does (`"a. b. c."`) and packed greedily into as many
  prompts of at most 256 BERT tokens as needed; one forward per prompt, as its users must. GD's latency per image
  is the sum over its prompts.

Tokenizers are trained here on the generated concept names (they only decide token counts: a CLIP byte-level BPE
for ours, a BERT WordPiece laid out at BERT's ids so GD's phrase masks see `[CLS]`, `[SEP]` and `.` where they
expect them). Concept names are 1-3 common English words, like LVIS names.

Printed per (concepts, system): median latency over the repeats (after warm-up), ratio ours/GD, peak RSS growth
during a forward (`VmHWM`), FLOPs per image (`FlopCounterMode` plus an estimate for `grid_sample`, which it does not
count), and the achieved fraction of this machine's fp32 matmul throughput measured at the start of the run.
Targets: ratio <= 0.8 at 80 concepts and <= 0.1 at 1,203 concepts, with cached embeddings.

Usage:
    python benchmarks/bench_detection.py                     # full: 800x1333, 1 / 80 / 1203 concepts
    python benchmarks/bench_detection.py --quick             # smoke run: small image, one repeat
    python benchmarks/bench_detection.py --concepts 80 --repeats 5 --profile
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection

from detclipv3_hf import (
    DetClipV3Config,
    DetClipV3ForObjectDetection,
    DetClipV3ImageProcessor,
    DetClipV3Processor,
)
from detclipv3_hf.data import train_clip_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    FlopCount,
    PeakRSS,
    bert_layout_vocab,
    count_flops,
    format_bytes,
    format_table,
    machine_summary,
    measure_matmul_flops,
    median,
)

GD_MAX_TEXT_LEN = 256
TARGETS = {80: 0.8, 1203: 0.1}
HEADER = [
    "concepts",
    "system",
    "forwards/img",
    "runs",
    "median s/img",
    "ratio vs GD",
    "peak RSS delta",
    "GFLOPs/img (grid_sample est.)",
    "of fp32 matmul peak",
]  # concepts -> max latency ratio ours (cached) / GD

# Common English words, a few of them rare enough to split into several WordPiece pieces (as "aerosol" does in
# BERT's vocabulary).
WORDS = """
apple bag ball banana basket bat bear bed bell bench bicycle bird blanket boat book boot bottle bowl box bread
bridge broom brush bucket bus butter cabinet cake camera can candle cap car carpet carrot cart cat chair cheese
clock coat computer cookie cow cup curtain desk dog doll door dress drum duck egg elephant fan fence fish flag
flower fork frog glass glove goat guitar hammer hat helmet horse house jacket jar kettle key kite knife ladder lamp
leaf lemon lock mirror monkey motorcycle mouse mug napkin necklace onion orange oven owl pan pen pencil phone piano
pillow pipe plate pot rabbit radio ring rope sandwich scarf scissors sheep shelf shirt shoe sink sock sofa spoon
stool table tent tiger toaster towel tower toy train tray tree truck umbrella vase wallet watch wheel whistle window
wine zebra red blue green yellow black white brown wooden metal plastic glass paper small large round striped
aerosol avocado armband barrette bobbin cappuccino clementine crescent dachshund escargot flamingo gargoyle
harmonium igniter kimono lanyard mandarin nutcracker ottoman pacifier quesadilla rhubarb saucepan tambourine
ukulele vizsla waffle xylophone yarmulke zucchini
""".split()


# ----------------------------------------------------------------------------------------------------------------------
# Concepts and tokenizers
# ----------------------------------------------------------------------------------------------------------------------


def make_concept_names(count: int, seed: int = 0) -> list[str]:
    """`count` distinct concept names of 1-3 words (40% / 45% / 15%), deterministic for a seed."""
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        num_words = rng.choices((1, 2, 3), weights=(40, 45, 15))[0]
        name = " ".join(rng.sample(WORDS, num_words))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def build_bert_tokenizer(names: list[str], wordpiece_vocab: int = 600) -> BertTokenizer:
    """A BERT-uncased-style WordPiece trained on `names`, laid out at BERT-base ids (`common.bert_layout_vocab`)."""
    corpus = [" . ".join(names)] * 3 + WORDS
    return BertTokenizer(vocab=bert_layout_vocab(corpus, wordpiece_vocab), do_lower_case=True)


def gd_prompts(names: list[str], tokenizer: BertTokenizer, max_len: int = GD_MAX_TEXT_LEN) -> list[dict]:
    """Packs concepts greedily into Grounding DINO prompts (`"a. b. c."`) of at most `max_len` tokens.

    Returns one tokenised prompt per chunk (`input_ids`, `token_type_ids`, `attention_mask`, each `(1, L)`).
    """
    costs = [len(tokenizer(name + ".", add_special_tokens=False)["input_ids"]) for name in names]
    budget = max_len - 2  # [CLS] and [SEP]
    chunks: list[list[str]] = [[]]
    used = 0
    for name, cost in zip(names, costs):
        if cost > budget:
            raise ValueError(
                f"Concept {name!r} alone needs {cost} tokens, more than a {max_len}-token prompt."
            )
        if used + cost > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += cost
    prompts = []
    for chunk in chunks:
        encoded = tokenizer(". ".join(chunk) + ".", return_tensors="pt")
        if encoded["input_ids"].shape[1] > max_len:
            raise RuntimeError(
                f"Prompt packing overflowed: {encoded['input_ids'].shape[1]} > {max_len} tokens."
            )
        prompts.append(dict(encoded))
    return prompts


# ----------------------------------------------------------------------------------------------------------------------
# Systems under test
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class System:
    """One way of detecting a vocabulary in one image: `run` does every forward the image needs."""

    name: str
    run: Callable[[], None]
    warm: Callable[[], None]
    forwards: int
    note: str = ""
    times: list[float] = field(default_factory=list)
    peak_rss: int = 0
    flops: FlopCount | None = None


def ours_systems(
    model: DetClipV3ForObjectDetection,
    processor: DetClipV3Processor,
    names: list[str],
    pixel_values: torch.Tensor,
    pixel_mask: torch.Tensor,
) -> list[System]:
    """DetCLIPv3 without and with cached concept embeddings."""
    concepts = processor.encode_concepts([names])
    tokens = concepts["attention_mask"].sum(-1).float()
    note = f"CLIP tokens/concept {tokens.mean():.1f} (padded to {concepts['input_ids'].shape[-1]})"

    def uncached() -> None:
        model(pixel_values, pixel_mask=pixel_mask, **concepts)

    model.clear_concept_cache()
    with torch.inference_mode():
        embeds = model.embed_concepts(**concepts, cache_keys=names)

    def cached() -> None:
        model(
            pixel_values, pixel_mask=pixel_mask, concept_embeds=embeds, concept_mask=concepts["concept_mask"]
        )

    return [
        System("ours (uncached)", uncached, uncached, 1, note),
        System("ours (cached)", cached, cached, 1, "concept_embeds precomputed"),
    ]


def gd_system(
    model: GroundingDinoForObjectDetection,
    tokenizer: BertTokenizer,
    names: list[str],
    pixel_values: torch.Tensor,
    pixel_mask: torch.Tensor,
) -> System:
    """Grounding DINO: one forward per 256-token prompt chunk."""
    prompts = gd_prompts(names, tokenizer)
    lengths = [int(p["input_ids"].shape[1]) for p in prompts]
    per_concept = (sum(lengths) - 2 * len(prompts)) / len(names)
    note = (
        f"{len(prompts)} prompt(s) of {min(lengths)}-{max(lengths)} tokens; {per_concept:.1f} tokens/concept"
    )

    def run() -> None:
        for prompt in prompts:
            model(pixel_values=pixel_values, pixel_mask=pixel_mask, **prompt)

    # One forward warms the kernels; warming with a whole image would cost `len(prompts)` forwards.
    def warm() -> None:
        model(pixel_values=pixel_values, pixel_mask=pixel_mask, **prompts[0])

    system = System("Grounding DINO", run, warm, len(prompts), note)
    system.prompts = prompts  # type: ignore[attr-defined]  # kept for FLOP counting by prompt length
    return system


def _quadratic_through(points: dict[int, int], x: int) -> int:
    """Value at `x` of the quadratic through three `(length, flops)` points (Lagrange form)."""
    (x0, y0), (x1, y1), (x2, y2) = sorted(points.items())[:1] + sorted(points.items())[-2:]
    value = (
        y0 * (x - x1) * (x - x2) / ((x0 - x1) * (x0 - x2))
        + y1 * (x - x0) * (x - x2) / ((x1 - x0) * (x1 - x2))
        + y2 * (x - x0) * (x - x1) / ((x2 - x0) * (x2 - x1))
    )
    return round(value)


def gd_flops(
    model: GroundingDinoForObjectDetection,
    system: System,
    pixel_values: torch.Tensor,
    pixel_mask: torch.Tensor,
    cache: dict[int, FlopCount],
) -> tuple[FlopCount, int]:
    """FLOPs of every GD prompt of the image. Returns the count and how many prompt lengths were fitted.

    GD's FLOPs for a fixed image are a polynomial of degree <= 2 in the prompt length L (matmuls are linear in L,
    text self-attention is quadratic), so once three lengths are counted (`cache`, shared across vocabularies of the
    same image), other lengths are read off the quadratic through them instead of paying a counted forward each.
    """
    total, grid, fitted = 0, 0, 0
    for prompt in system.prompts:  # type: ignore[attr-defined]
        length = int(prompt["input_ids"].shape[1])
        if length not in cache and len(cache) < 3:
            cache[length] = count_flops(
                lambda p=prompt: model(pixel_values=pixel_values, pixel_mask=pixel_mask, **p)
            )
        if length in cache:
            total += cache[length].total
            grid += cache[length].grid_sample
        else:
            fitted += 1
            total += _quadratic_through({k: v.total for k, v in cache.items()}, length)
            grid += _quadratic_through({k: v.grid_sample for k, v in cache.items()}, length)
    return FlopCount(total=total, grid_sample=grid, by_operator={}), fitted


# ----------------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------------


def measure(systems: list[System], repeats: dict[str, int], warmup: int) -> None:
    """Warms every system up, then interleaves their timed runs (so a load spike on this shared machine hits all of
    them alike), recording wall times and the peak RSS growth of each run."""
    for system in systems:
        for _ in range(warmup):
            system.warm()
    for round_index in range(max(repeats.values())):
        for system in systems:
            if round_index >= repeats[system.name]:
                continue
            with PeakRSS() as memory:
                start = time.perf_counter()
                system.run()
                system.times.append(time.perf_counter() - start)
            system.peak_rss = max(system.peak_rss, memory.peak_delta_bytes)
            print(f"    {system.name:16s} run {round_index + 1}: {system.times[-1]:7.2f} s", flush=True)


def profile_ours(model: DetClipV3ForObjectDetection, run: Callable[[], None], label: str, top: int) -> None:
    """Per-module wall time (forward hooks on the main blocks) and the top operators by self CPU time."""
    trunk = model.model
    blocks: dict[str, torch.nn.Module] = {
        "backbone + input projection": trunk.image_embedder,
        "concept encoder (CLIP text)": trunk.concept_encoder,
    }
    for i, layer in enumerate(trunk.encoder_layers):
        blocks[f"encoder.{i}.deformable self-attn"] = layer.self_attn
        blocks[f"encoder.{i}.ffn"] = layer.ffn
        if layer.fusion is not None:
            blocks[f"encoder.{i}.fusion"] = layer.fusion
    blocks["query selection: alignment head"] = trunk.alignment_head
    for i, layer in enumerate(trunk.decoder_layers):
        blocks[f"decoder.{i}"] = layer
    elapsed: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    handles = []
    for name, module in blocks.items():
        handles.append(
            module.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter()))
        )
        handles.append(
            module.register_forward_hook(
                lambda m, a, o, n=name: elapsed.__setitem__(n, elapsed[n] + time.perf_counter() - starts[n])
            )
        )
    start = time.perf_counter()
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    total = time.perf_counter() - start
    grouped: dict[str, float] = defaultdict(float)
    for name, seconds in elapsed.items():
        parts = name.split(".")
        key = (
            f"encoder * {parts[2]}"
            if parts[0] == "encoder"
            else ("decoder (6 layers)" if parts[0] == "decoder" else name)
        )
        grouped[key] += seconds
    grouped["other (selection, heads, glue)"] = total - sum(grouped.values())
    print(f"\n### Profile: {label} (one forward, {total:.2f} s)")
    rows = [
        [k, f"{v:.2f}", f"{100 * v / total:.0f}%"] for k, v in sorted(grouped.items(), key=lambda kv: -kv[1])
    ]
    print(format_table(["block", "seconds", "share"], rows))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=top))


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concepts", type=int, nargs="+", default=[1, 80, 1203], help="vocabulary sizes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system (after warm-up)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed runs per system before the first vocabulary (GD: one prompt); later ones reuse the warm process",
    )
    parser.add_argument(
        "--gd-forward-budget",
        type=int,
        default=16,
        help="at most this many timed GD forwards per vocabulary: GD's repeats drop to max(1, budget // prompts)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="default 800 1333 (--quick: 320 512)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 320x512 image, 1 repeat, no warm-up")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting (one extra forward each)")
    parser.add_argument(
        "--profile", action="store_true", help="profile ours (cached) at the target sizes (80, 1203)"
    )
    parser.add_argument("--top", type=int, default=15, help="operators shown by --profile")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 0
    if args.image_size is None:
        args.image_size = [320, 512] if args.quick else [800, 1333]
    if any(n < 1 for n in args.concepts):
        parser.error(f"--concepts must be positive, got {args.concepts}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"# bench_detection: {' '.join(sys.argv[1:]) or '(defaults)'}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine: {machine_summary()}")
    matmul = measure_matmul_flops()
    print(f"fp32 matmul throughput (best 4096^3 mm): {matmul / 1e9:.1f} GFLOP/s")

    all_names = make_concept_names(max(args.concepts), seed=args.seed)
    clip_tokenizer = train_clip_tokenizer(all_names, vocab_size=2000)
    bert_tokenizer = build_bert_tokenizer(all_names)

    # Frozen: inference only, and FlopCounterMode's module tracker needs inputs that do not require grad.
    ours = DetClipV3ForObjectDetection(DetClipV3Config()).eval().requires_grad_(False)
    processor = DetClipV3Processor(DetClipV3ImageProcessor(), clip_tokenizer, max_concept_tokens=16)
    gd = GroundingDinoForObjectDetection(GroundingDinoConfig()).eval().requires_grad_(False)
    print(
        f"params: ours {sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M, "
        f"Grounding DINO {sum(p.numel() for p in gd.parameters()) / 1e6:.1f} M"
    )
    height, width = args.image_size
    pixel_values = torch.randn(1, 3, height, width)
    pixel_mask = torch.ones(1, height, width, dtype=torch.long)
    print(f"image: 1x3x{height}x{width}; repeats {args.repeats}, warm-up {args.warmup}\n", flush=True)

    rows = []
    verdicts = []
    gd_flop_cache: dict[int, FlopCount] = {}
    with torch.inference_mode():
        for count in args.concepts:
            names = all_names[:count]
            systems = ours_systems(ours, processor, names, pixel_values, pixel_mask)
            systems.append(gd_system(gd, bert_tokenizer, names, pixel_values, pixel_mask))
            gd_sys = systems[-1]
            repeats = {s.name: args.repeats for s in systems}
            repeats[gd_sys.name] = max(1, min(args.repeats, args.gd_forward_budget // gd_sys.forwards))
            print(f"## {count} concept(s): {gd_sys.note}; {systems[0].note}", flush=True)
            measure(systems, repeats, args.warmup if count == args.concepts[0] else 0)
            if not args.no_flops:
                for system in systems[:2]:
                    system.flops = count_flops(system.run)
                gd_sys.flops, fitted = gd_flops(gd, gd_sys, pixel_values, pixel_mask, gd_flop_cache)
                if fitted:
                    print(
                        f"    GD FLOPs: {fitted} prompt(s) fitted from counted lengths {sorted(gd_flop_cache)}"
                    )
            gd_latency = median(gd_sys.times)
            for system in systems:
                latency = median(system.times)
                flops = system.flops
                rows.append(
                    [
                        str(count),
                        system.name,
                        str(system.forwards),
                        str(len(system.times)),
                        f"{latency:.2f}",
                        f"{latency / gd_latency:.3f}" if system is not gd_sys else "1",
                        format_bytes(system.peak_rss),
                        f"{flops.total / 1e9:.0f} ({flops.grid_sample / 1e9:.1f})" if flops else "-",
                        f"{flops.total / latency / matmul:.0%}" if flops else "-",
                    ]
                )
            ratio = median(systems[1].times) / gd_latency
            if count in TARGETS:
                verdict = "PASS" if ratio <= TARGETS[count] else "FAIL"
                verdicts.append(
                    f"{verdict}: {count} concepts, ours (cached) / GD = {ratio:.3f} (target <= {TARGETS[count]})"
                )
            print(format_table(HEADER, rows[-len(systems) :]), flush=True)
            if args.profile and count in TARGETS:
                profile_ours(ours, systems[1].run, f"ours (cached), {count} concept(s)", args.top)

    print("\n" + format_table(HEADER, rows))
    print(
        "\npeak RSS delta: growth of the process's resident memory during one image (VmHWM reset before each run; "
        "max over runs).\nGFLOPs: torch FlopCounterMode (matmul, conv, attention) plus an estimate for grid_sample "
        "(8 FLOPs per sampled value), shown in brackets; element-wise ops are not counted."
    )
    for verdict in verdicts:
        print(verdict)


if __name__ == "__main__":
    main()
