#!/usr/bin/env bash
# The distillation study (issue 16, BENCHMARKS.md "Distillation study"): TinyWorld TDM recipe variants side by side
# on one GPU, each a trainer process with its in-training evaluation, in one time-boxed device call.
#
#   bash benchmarks/tinyworld_study.sh PLAN MINUTES
#
# PLAN: a file of "name flags..." lines (# comments); every run gets the common flags below (the released Wan recipe
# at TinyWorld size: batch 16, K 8, cfg 5, LoRA 64/64, lr 1e-4, fake lr 2e-4, bf16) and its own flags after them, so
# a run's flags override the common ones. MINUTES boxes every run (loading and evaluation included); runs resume
# from RUN/<name> when it holds a checkpoint (a second call on a warm machine continues them).
# Results: OUT/study.tgz (each run's logs.jsonl, eval.jsonl, log), OUT/loras.tgz (each run's final LoRA folder) and
# a table of the evaluation curves, printed last.
set -euo pipefail
PLAN=${1:?plan file}
MINUTES=${2:-8}
RUN=${RUN:-runs/study}
OUT=${OUT:-out}
MODEL=${MODEL:-assets/tinyworld/pipeline}
EVAL_EVERY=${EVAL_EVERY:-50}
mkdir -p "$RUN" "$OUT"
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # several processes share the host's cores

if [ ! -f "$RUN/prompts/index.json" ]; then
  python3 utils/process_prompts_wanx.py --input_file "${PROMPTS:-utils/tinyworld_train_prompts.txt}" --output_dir "$RUN/prompts" \
    --model_path "$MODEL" --max_length 32 --negative_prompt "" --num_validation 4 --batch_size 256 \
    --device "${DEVICE:-cuda}" > "$OUT/prompts.log" 2>&1
fi

pids=()
while read -r name flags; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  # shellcheck disable=SC2086
  python3 wanx/train/train_wanx_tdm.py --tinyworld --pretrained_model_name_or_path "$MODEL" \
    --prompt_dir "$RUN/prompts" --output_dir "$RUN/$name" --mixed_precision bf16 --train_batch_size 16 \
    --k_step 8 --eta 0.9 --cfg 5.0 --lambda_reg 0 --rank 64 --lora_alpha 64 --learning_rate 1e-4 \
    --learning_rate_fake 2e-4 --lr_scheduler constant --max_train_steps 100000 --checkpointing_steps 500 \
    --validation_steps 0 --report_to none --eval_every "$EVAL_EVERY" --eval_seeds 1000 --diag_every 10 \
    --max_train_minutes "$MINUTES" --resume_from_checkpoint latest $flags \
    > "$RUN/$name.log" 2>&1 &
  pids+=($!)
done < "$PLAN"
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done

(cd "$RUN" && tar czf - --exclude='checkpoint-*' --exclude='prompts' --exclude='*.safetensors' \
  --exclude='reflow_pairs_*' .) > "$OUT/study.tgz"
(cd "$RUN" && tar czf - $(ls -d */pytorch_lora_weights.safetensors */blade_config.json 2>/dev/null)) \
  > "$OUT/loras.tgz"  # each run's final student LoRA folder (~4 MB each in fp32)
python3 benchmarks/study_table.py "$RUN" --every "$EVAL_EVERY" | tee "$OUT/study_table.md"
exit $status
