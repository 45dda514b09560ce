"""Captioner throughput: labels generated per second for the objects of one image, with and without KV cache.

Default DetCLIPv3 configuration (Swin-T detector, default captioner), random weights, float32, CPU, greedy decoding
that always runs `max_label_length` tokens (end-of-sequence disabled, so random weights cost what a trained model's
longest labels would). Prints the time split between the detector and the captioner and checks the target:
the captioner adds at most 50% to the detector's latency for 100 objects with max label length 24.

    python benchmarks/bench_captioning.py                 # 800x1333, 100 objects, 24 tokens
    python benchmarks/bench_captioning.py --quick         # 320x480 smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from detclipv3_hf import DetClipV3Config, DetClipV3ForObjectCaptioning


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--objects", type=int, default=100)
    parser.add_argument("--label-length", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="320x480, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.height, args.width, args.repeats = 320, 480, 1
    torch.manual_seed(0)
    vocab = 49408 + 2  # CLIP's vocabulary plus the [OBJ] / [IMG] task tokens
    config = DetClipV3Config(
        captioner_config={
            "vocab_size": vocab,
            "obj_token_id": vocab - 2,
            "img_token_id": vocab - 1,
            "separator_token_id": 914,
            "max_label_length": args.label_length,
        }
    )
    model = DetClipV3ForObjectCaptioning(config).eval()
    pixel_values = torch.randn(1, 3, args.height, args.width)
    print(
        f"threads={torch.get_num_threads()} image={args.height}x{args.width} objects={args.objects} "
        f"label_length={args.label_length} captioner={config.captioner_config.num_hidden_layers}x"
        f"{config.captioner_config.hidden_size}"
    )

    with torch.inference_mode():
        model.model(pixel_values)  # warm-up
        detector_s, outputs = timed(lambda: model.model(pixel_values), args.repeats)
        top = outputs.objectness_logits.topk(args.objects, dim=1).indices
        states = outputs.last_hidden_state.gather(1, top[..., None].expand(-1, -1, config.d_model)).flatten(
            0, 1
        )
        boxes = outputs.pred_boxes.gather(1, top[..., None].expand(-1, -1, 4)).flatten(0, 1)
        image_index = torch.zeros(args.objects, dtype=torch.long)
        memory = model._memory_args(outputs)
        visual_s, visual = timed(
            lambda: model.captioner.encode_visual(states, boxes, image_index, **memory), args.repeats
        )
        results = {}
        for use_cache in (True, False):
            kwargs = {
                "max_new_tokens": args.label_length,
                "min_new_tokens": args.label_length,
                "use_cache": use_cache,
            }
            seconds, generated = timed(
                lambda kw=kwargs: model._generate(visual, "obj", dict(kw)), args.repeats
            )
            assert generated.sequences.shape == (args.objects, args.label_length + 1)
            results[use_cache] = seconds
    cached, uncached = results[True], results[False]
    captioner = visual_s + cached
    print()
    print("| part | median s |")
    print("|---|---|")
    print(f"| detector (backbone to heads) | {detector_s:.3f} |")
    print(f"| captioner visual path ({args.objects} objects) | {visual_s:.3f} |")
    print(f"| captioner generation, KV cache | {cached:.3f} |")
    print(f"| captioner generation, no cache | {uncached:.3f} |")
    print()
    print(f"labels/s with cache:    {args.objects / (visual_s + cached):.1f}")
    print(f"labels/s without cache: {args.objects / (visual_s + uncached):.1f}")
    print(f"ratio no-cache / cache generation time: {uncached / cached:.2f}")
    share = captioner / detector_s
    print(
        f"captioner adds {100 * share:.1f}% to the detector's latency "
        f"-> target <= 50%: {'PASS' if share <= 0.5 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
