"""Fine-tune a DetCLIPv3 detector with LoRA (PEFT), save the adapter, reload it on a fresh base, merge it.

    python examples/finetune_lora.py --checkpoint path/or/hub-id --output lora-out [--steps 100] [--rank 8]

The short manual loop below runs on synthetic images so the recipe can be smoke-tested anywhere; for real data use
the same `get_peft_model` model with the package's training loop (`detclipv3_hf.training`). LoRA goes on the decoder's attention and FFN projections and on the heads; the backbone, text tower and encoder stay
frozen. See docs/peft.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoProcessor

from detclipv3_hf import DetClipV3ForObjectDetection

DETECTOR_TARGETS = (
    r".*decoder_layers\.\d+\.(self_attn|concept_attn)\.(q_proj|k_proj|v_proj|out_proj)"
    r"|.*decoder_layers\.\d+\.image_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)"
    r"|.*decoder_layers\.\d+\.ffn\.(fc1|fc2)"
    r"|.*box_heads\.\d+\.layers\.\d+|.*alignment_head\.(query_proj|concept_proj)"
)


def synthetic_batches(processor, steps: int, size: int = 128):
    """Random images with one box each, for a smoke test without data."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images = [(torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy() for _ in range(2)]
        annotations = [
            {"image_id": i, "annotations": [{"bbox": [10, 10, 40, 30], "category_id": 0, "area": 1200, "iscrowd": 0}]}
            for i in range(2)
        ]
        yield processor(images=images, text=[["cat", "bus"], ["cat", "bus"]], annotations=annotations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args()

    processor = AutoProcessor.from_pretrained(args.checkpoint)
    base = DetClipV3ForObjectDetection.from_pretrained(args.checkpoint)
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                                            target_modules=DETECTOR_TARGETS))
    model.print_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    batches = synthetic_batches(processor, args.steps)
    model.train()
    for step, batch in enumerate(batches):
        inputs = {k: batch[k] for k in ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "concept_mask")}
        loss = model(**inputs, labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}")

    adapter_dir = Path(args.output) / "adapter"
    model.save_pretrained(adapter_dir)  # only the LoRA weights (a few MB)

    # Reload on a fresh base and merge for deployment: the merged model is a plain DetClipV3ForObjectDetection.
    fresh = DetClipV3ForObjectDetection.from_pretrained(args.checkpoint)
    merged = PeftModel.from_pretrained(fresh, adapter_dir).merge_and_unload()
    merged.save_pretrained(Path(args.output) / "merged")
    processor.save_pretrained(Path(args.output) / "merged")
    print(f"adapter: {adapter_dir}; merged checkpoint: {Path(args.output) / 'merged'}")


if __name__ == "__main__":
    main()
