"""The main job of the README (`make demo`): train a small DetCLIPv3 on the synthetic world, then run it.

1. Renders synthetic scenes (shapes with `phrase|category|parent category` labels, `detclipv3_hf.data.synthetic`).
2. Trains a small `DetClipV3ForObjectCaptioning` on CPU for a few minutes: detection with per-image concept sets
   (both `phrase` and `category` positive for every box), vocabulary-free batches, and object captions.
3. Runs vocabulary-mode detection and vocabulary-free captioning on held-out scenes and writes annotated PNGs and
   JSON results to `--output`, plus the checkpoint (`save_pretrained` folder: model, processor, generation config).

Everything is offline: the CLIP-style tokenizer is trained on the synthetic vocabulary in a second. With network
access, pass `--tokenizer openai/clip-vit-base-patch32` to use CLIP's real tokenizer.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from pathlib import Path

import torch
from torchvision.ops import box_convert

from detclipv3_hf import (
    DetClipV3Config,
    DetClipV3ForObjectCaptioning,
    DetClipV3ImageProcessor,
    DetClipV3Processor,
)
from detclipv3_hf.cli import draw_detections
from detclipv3_hf.data.synthetic import CATEGORY_PARENTS, COLORS, make_synthetic_sample


def offline_clip_tokenizer(words: list[str]):
    """A CLIP-style byte-level BPE (`</w>` suffix) trained on `words`, wrapped as `CLIPTokenizer`."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pattern = (
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chars = " ".join(string.ascii_lowercase + string.digits + string.punctuation)
    tok.train_from_iterator([chars] * 5 + words * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges)


def build_batch(processor, seeds: list[int], size: int, categories: list[str], with_concepts: bool) -> dict:
    images, annotations, concept_lists, captions = [], [], [], []
    for seed in seeds:
        image, objects = make_synthetic_sample(seed, size=size, min_objects=1, max_objects=3)
        images.append(image)
        concepts = sorted({o.category for o in objects} | set(random.Random(seed).sample(categories, 3)))
        concept_lists.append(concepts)
        annotations.append(
            {
                "image_id": seed,
                "annotations": [
                    {"bbox": list(o.bbox_xywh), "category_id": concepts.index(o.category)} for o in objects
                ],
            }
        )
        captions.append([o.hierarchical_label for o in objects])
    batch = processor(images=images, text=concept_lists, annotations=annotations, return_tensors="pt")
    targets = processor.encode_caption_targets(captions, task="object", max_length=24)
    start = 0
    for label, caps in zip(batch["labels"], captions):
        label["caption_ids"] = targets["input_ids"][start : start + len(caps)]
        label["caption_attention_mask"] = targets["attention_mask"][start : start + len(caps)]
        start += len(caps)
    if not with_concepts:
        for key in ("input_ids", "attention_mask", "concept_mask"):
            batch.pop(key)
    return dict(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_output")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--tokenizer", default=None, help="CLIP tokenizer id/folder (default: trained offline)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    categories = sorted(CATEGORY_PARENTS)
    words = (
        categories
        + sorted(set(CATEGORY_PARENTS.values()))
        + sorted(COLORS)
        + ["large", "small", "medium", "striped", "dotted", "checkered", "solid"]
    )
    if args.tokenizer:
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = offline_clip_tokenizer(words)
    image_processor = DetClipV3ImageProcessor(size={"shortest_edge": args.size, "longest_edge": args.size})
    processor = DetClipV3Processor(image_processor, tokenizer, max_concept_tokens=8)
    config = DetClipV3Config(
        backbone_config={
            "model_type": "resnet",
            "embedding_size": 16,
            "hidden_sizes": [16, 32, 48, 64],
            "depths": [1, 1, 1, 1],
            "layer_type": "basic",
            "out_features": ["stage2", "stage3", "stage4"],
        },
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 32,
            "max_position_embeddings": 16,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        captioner_config={
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "n_points": 2,
            "max_label_length": 24,
            "max_caption_length": 24,
            "max_position_embeddings": 32,
            **processor.captioner_token_ids(),
        },
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=30,
        max_concept_tokens=8,
        norm_groups=8,
        num_denoising=20,
        fusion_drop_path=0.0,
    )
    model = DetClipV3ForObjectCaptioning(config)
    concept_side = [
        p for n, p in model.named_parameters() if "concept_encoder" in n or "alignment_head.concept_proj" in n
    ]
    rest = [
        p
        for n, p in model.named_parameters()
        if not ("concept_encoder" in n or "alignment_head.concept_proj" in n)
    ]
    optimizer = torch.optim.AdamW(
        [{"params": concept_side, "lr": 3e-5}, {"params": rest, "lr": 5e-4}], weight_decay=1e-4
    )

    start = time.time()
    model.train()
    for step in range(args.steps):
        seeds = [1000 + (step * args.batch_size + i) % 64 for i in range(args.batch_size)]
        batch = build_batch(processor, seeds, args.size, categories, with_concepts=step % 4 != 3)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():8.3f}  {time.time() - start:6.1f}s", flush=True)

    model.eval()
    model.save_pretrained(out / "checkpoint")
    processor.save_pretrained(out / "checkpoint")
    summary = []
    for seed in range(5000, 5004):
        image, objects = make_synthetic_sample(seed, size=args.size, min_objects=1, max_objects=3)
        image.save(out / f"sample_{seed}.png")
        inputs = processor(images=[image], text=categories, return_tensors="pt")
        with torch.no_grad():
            detections = processor.post_process_grounded_object_detection(
                model.model(**inputs),
                threshold=0.3,
                target_sizes=[(image.height, image.width)],
                text_labels=[categories],
            )[0]
        detected = [
            {"score": float(s), "label": label, "box": [float(v) for v in box]}
            for s, label, box in zip(detections["scores"], detections["text_labels"], detections["boxes"])
        ]
        generated = model.generate_object_labels(inputs["pixel_values"], inputs["pixel_mask"], top_k=10)
        captioned = processor.post_process_object_captioning(
            generated, threshold=0.05, target_sizes=[(image.height, image.width)]
        )[0]
        draw_detections(image, detected, out / f"sample_{seed}_detect.png")
        draw_detections(image, captioned, out / f"sample_{seed}_caption.png")
        truth = [
            {
                "label": o.hierarchical_label,
                "box": list(box_convert(torch.tensor([o.bbox_xywh]), "xywh", "xyxy")[0].tolist()),
            }
            for o in objects
        ]
        summary.append(
            {"image": f"sample_{seed}.png", "ground_truth": truth, "detect": detected, "caption": captioned}
        )
        print(f"sample_{seed}: truth {[t['label'] for t in truth]}")
        print(f"   caption {[c['label'] for c in captioned[:5]]}")
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}/ (annotated PNGs, results.json, checkpoint/)")


if __name__ == "__main__":
    main()
