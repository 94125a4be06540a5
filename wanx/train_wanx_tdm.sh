#!/usr/bin/env bash
# Sparsity-aware TDM distillation of Wan2.1-T2V-1.3B (paper hyperparameters: K=8, eta 0.9, cfg 5.0, LoRA 64/64,
# lr 1e-4 / fake 5e-4, 5 videos x 4 accumulation x 4 GPUs = batch 80, 300 steps, checkpoint every 15).
# DeepSpeed is optional: train/config.yaml (ZeRO-2, documented, not run here) is used when it is installed,
# otherwise train/config_ddp.yaml (plain multi-GPU).
set -euo pipefail

MODEL_PATH=${MODEL_PATH:-./Wan2.1-T2V-1.3B-Diffusers}
PROMPT_DIR=${PROMPT_DIR:-./prompt_cache/wanx}
OUTPUT_DIR=${OUTPUT_DIR:-./outputs/wanx_tdm_asa}
NUM_GPUS=${NUM_GPUS:-4}

MODEL_PATH=$(realpath -m "$MODEL_PATH"); PROMPT_DIR=$(realpath -m "$PROMPT_DIR"); OUTPUT_DIR=$(realpath -m "$OUTPUT_DIR")

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="$HERE/train/config_ddp.yaml"
if python -c "import deepspeed" 2>/dev/null; then CONFIG="$HERE/train/config.yaml"; fi
cd "$HERE/train"  # config.yaml points at ../../ds_config.json

accelerate launch --config_file "$CONFIG" --num_processes "$NUM_GPUS" --mixed_precision bf16 \
  train_wanx_tdm.py \
  --pretrained_model_name_or_path "$MODEL_PATH" \
  --prompt_dir "$PROMPT_DIR" \
  --output_dir "$OUTPUT_DIR" \
  --mixed_precision bf16 \
  --train_batch_size 5 \
  --gradient_accumulation_steps 4 \
  --learning_rate 1e-4 \
  --learning_rate_g 1e-4 \
  --learning_rate_fake 5e-4 \
  --lambda_reg 0 \
  --k_step 8 \
  --cfg 5.0 \
  --eta 0.9 \
  --use_sparsity \
  --rank 64 \
  --lora_alpha 64 \
  --max_train_steps 300 \
  --checkpointing_steps 15 \
  --gradient_checkpointing \
  --enable_slicing \
  --enable_tiling \
  --resume_from_checkpoint latest \
  "$@"
