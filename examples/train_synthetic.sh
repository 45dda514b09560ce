#!/usr/bin/env bash
# Trains a small DetCLIPv3 through all three stages on the synthetic shape world, on CPU or GPUs.
#
#   bash examples/train_synthetic.sh                      # single process
#   LAUNCH="accelerate launch --config_file examples/accelerate_configs/ddp.yaml" bash examples/train_synthetic.sh
#   LAUNCH="accelerate launch --cpu --num_processes 2" bash examples/train_synthetic.sh     # 2 CPU processes
#
# Environment: WORK (output root, default runs/synthetic), TOKENIZER (a CLIP tokenizer folder or Hub id, default
# openai/clip-vit-base-patch32), STEPS1/STEPS2/STEPS3 (optimizer steps per stage), BATCH (images per device),
# NUM_TRAIN (synthetic training images), PYTHON (interpreter).
set -euo pipefail

PYTHON=${PYTHON:-python}
LAUNCH=${LAUNCH:-$PYTHON}
WORK=${WORK:-runs/synthetic}
TOKENIZER=${TOKENIZER:-openai/clip-vit-base-patch32}
STEPS1=${STEPS1:-2000}
STEPS2=${STEPS2:-1000}
STEPS3=${STEPS3:-500}
BATCH=${BATCH:-8}
NUM_TRAIN=${NUM_TRAIN:-2000}
mkdir -p "$WORK"

# 1. The synthetic world: images, COCO json, GranuCap jsonl, concept dictionary, held-out split.
"$PYTHON" - "$WORK" "$NUM_TRAIN" <<'PY'
import sys
from detclipv3_hf.data import generate_synthetic_world
world = generate_synthetic_world(f"{sys.argv[1]}/world", num_train=int(sys.argv[2]), num_val=200, seed=0,
                                 min_size=128, max_size=256)
print("world:", world.root, world.train.num_images, "train images")
PY

# 2. A small model config (ResNet-18-like backbone, 4-layer text tower, d_model 128); vocabularies are sized to the
#    tokenizer (plus the captioner's [OBJ]/[IMG] tokens) when the run starts from `new:`.
"$PYTHON" - "$WORK/model_config.json" <<'PY'
import sys
from detclipv3_hf import DetClipV3Config
config = DetClipV3Config(
    backbone_config={"model_type": "resnet", "embedding_size": 32, "hidden_sizes": [32, 64, 128, 256],
                     "depths": [1, 1, 1, 1], "layer_type": "basic", "out_features": ["stage2", "stage3", "stage4"]},
    text_config={"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
                 "projection_dim": 128, "max_position_embeddings": 32},
    captioner_config={"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "intermediate_size": 512, "max_label_length": 24, "max_caption_length": 48},
    d_model=128, encoder_layers=2, decoder_layers=3, encoder_ffn_dim=512, decoder_ffn_dim=512,
    encoder_attention_heads=4, decoder_attention_heads=4, num_queries=50, max_concept_tokens=16, norm_groups=16,
)
config.to_json_file(sys.argv[1])
PY

COMMON=(--concepts "$WORK/world/concepts.txt" --batch-size "$BATCH" --short-sides 192,224,256 --max-size 320
        --save-steps 250 --logging-steps 25 --resume latest)

# 3. Stage 1: the open-vocabulary detector from scratch, on detection (COCO) + grounding (GranuCap) data.
$LAUNCH -m detclipv3_hf.training.cli --stage 1 --model "new:$WORK/model_config.json" --processor "$TOKENIZER" \
    --data "detection=$WORK/world/train/annotations_coco.json" --data "grounding=$WORK/world/train/granucap.jsonl" \
    --output "$WORK/stage1" --max-steps "$STEPS1" --learning-rate 2e-4 --warmup-steps 100 "${COMMON[@]}"

# 4. Stage 2: the captioner on captioned data at low resolution, detector frozen (starts from stage 1's folder).
$LAUNCH -m detclipv3_hf.training.cli --stage 2 --model "$WORK/stage1" \
    --data "captioned=$WORK/world/train/granucap.jsonl" \
    --output "$WORK/stage2" --max-steps "$STEPS2" --learning-rate 2e-4 --warmup-steps 50 "${COMMON[@]}" \
    --short-sides 160 --max-size 256

# 5. Stage 3: everything jointly (starts from stage 2's folder).
$LAUNCH -m detclipv3_hf.training.cli --stage 3 --model "$WORK/stage2" \
    --data "detection=$WORK/world/train/annotations_coco.json" --data "captioned=$WORK/world/train/granucap.jsonl" \
    --output "$WORK/stage3" --max-steps "$STEPS3" --learning-rate 5e-5 --warmup-steps 20 "${COMMON[@]}"

echo "final model: $WORK/stage3 (load with DetClipV3ForObjectCaptioning.from_pretrained)"
