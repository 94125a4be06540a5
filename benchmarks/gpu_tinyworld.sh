#!/usr/bin/env bash
# TinyWorld on one GPU, in stages that each fit one 10-minute device call and resume from what the last call left:
#
#   bash benchmarks/gpu_tinyworld.sh vae MINUTES        # VAE (warm-starts from RUN/pipeline when it exists)
#   bash benchmarks/gpu_tinyworld.sh teacher MINUTES    # teacher (warm-starts from RUN/pipeline)
#   bash benchmarks/gpu_tinyworld.sh distill MINUTES    # prompt cache, then dense and ASA TDM students, MINUTES each
#                                                       # (fake lr 2e-4: rank 64 is a quarter of this model's width)
#   bash benchmarks/gpu_tinyworld.sh eval               # Table 1 and Table 3 reports (JSON) on held-out prompts
#
# RUN (default runs/tw) is carried between calls; OUT (the device tool's output folder, default ./out) receives the
# logs, the reports and RUN packed into <= 15 MB parts (cat parts | tar xzf - to unpack).
set -euo pipefail
STAGE=${1:?stage: vae | teacher | distill | eval}
MINUTES=${2:-4}
RUN=${RUN:-runs/tw}
OUT=${OUT:-out}
EVAL_PROMPTS=${EVAL_PROMPTS:-assets/tinyworld/eval_prompts.txt}
mkdir -p "$RUN" "$OUT"
export PYTHONUNBUFFERED=1

distill() {  # $1 = name, remaining = extra flags
  local name=$1; shift
  python3 wanx/train/train_wanx_tdm.py --tinyworld --pretrained_model_name_or_path "$RUN/pipeline" \
    --prompt_dir "$RUN/prompts" --output_dir "$RUN/$name" --mixed_precision bf16 --gradient_checkpointing \
    --train_batch_size 16 --k_step 8 --eta 0.9 --cfg 5.0 --lambda_reg 0 --rank 64 --lora_alpha 64 \
    --learning_rate 1e-4 --learning_rate_fake 2e-4 --max_train_steps 100000 --checkpointing_steps 100 \
    --validation_steps 0 --max_train_minutes "$MINUTES" --resume_from_checkpoint latest "$@" 2>&1 \
    | tr '\r' '\n' | grep -v "it/s]$" | tee "$OUT/tdm_$name.log"
}

case "$STAGE" in
  vae)
    python3 -m blade.tinyworld.train vae --out "$RUN" --minutes "$MINUTES" --resume --vae-frames 9 \
      --vae-batch-size 16 2>&1 | tee "$OUT/vae.log" ;;
  teacher)
    python3 -m blade.tinyworld.train teacher --out "$RUN" --minutes "$MINUTES" --resume 2>&1 | tee "$OUT/teacher.log" ;;
  distill)
    python3 utils/process_prompts_wanx.py --input_file utils/tinyworld_train_prompts.txt --output_dir "$RUN/prompts" \
      --model_path "$RUN/pipeline" --max_length 32 --negative_prompt "" --num_validation 4 --batch_size 256 \
      --device cuda
    distill dense                # distillation alone first (control), then with ASA
    distill asa --use_sparsity ;;
  eval)
    common=(--prompts "$EVAL_PROMPTS" --model "$RUN/pipeline" --device cuda)
    python3 -m blade.tinyworld.evaluate "${common[@]}" --seeds 1000 1001 --steps 50 --guidance 5.0 \
      --attention dense --out "$OUT/table1_teacher.json"
    for name in asa dense; do
      [ -d "$RUN/$name" ] && python3 -m blade.tinyworld.evaluate "${common[@]}" --seeds 1000 1001 \
        --lora "$RUN/$name" --out "$OUT/table1_student_$name.json"
    done
    head -13 "$EVAL_PROMPTS" > "$RUN/table3_prompts.txt"  # comment line + 12 prompts
    for sparsity in 0.5 0.75; do
      for mode in asa window random; do
        python3 -m blade.tinyworld.evaluate --prompts "$RUN/table3_prompts.txt" --model "$RUN/pipeline" \
          --device cuda --seeds 1000 --steps 50 --guidance 5.0 --attention "$mode" --sparsity "$sparsity" \
          --compare_dense --out "$OUT/table3_${mode}_${sparsity}.json"
      done
    done ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac

# Pack the run (without optimizer-sized checkpoints, which do not fit the transfer limits) for the next call.
tar czf - --exclude='ckpt_*.pt' --exclude='checkpoint-*' --exclude='prompts' -C "$(dirname "$RUN")" "$(basename "$RUN")" \
  | split -b 15M - "$OUT/run.tgz.part-"
