#!/usr/bin/env bash
# The distillation study (issue 16, BENCHMARKS.md "Distillation study"): TinyWorld TDM recipe variants side by side
# on one GPU, each a trainer process with its in-training evaluation, in one time-boxed device call.
#
#   bash benchmarks/tinyworld_study.sh PLAN MINUTES
#
# PLAN: a file of "name flags..." lines (# comments); every run gets the common flags below (the released Wan recipe
# at TinyWorld size, pinned so that every plan keeps its meaning when the trainer's defaults move: batch 16, K 8,
# cfg 5, anchor shift 1 (the released uniform anchors; the trainer's default became the folder's flow shift, 3.0,
# on 2026-12-06), LoRA 64/64 on the attention projections, pseudo-Huber generator loss, lr 1e-4, fake lr 2e-4, bf16) and its own flags after them, so
# a run's flags override the common ones ({RUN} in them stands for the RUN folder). MINUTES boxes every run (loading
# and evaluation included); runs resume
# from RUN/<name> when it holds a checkpoint (a second call on a warm machine continues them).
# EVAL_SEEDS (default "1000 1001" from 2026-12-06: Table 1's 48 videos; calls 1-5 used "1000", 24 videos): the
# in-training evaluation's seeds. At ~0.23 adherence sd per video, 24 videos give a standard error of ~0.05, 48 ~0.033.
# Results: OUT/study.tgz (each run's logs.jsonl, eval.jsonl, log), OUT/lora_<name>.tgz (each run's final LoRA) and
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

encode() {  # encode(prompt file, cache folder): the trainer's prompt cache, once per RUN
  [ -f "$2/index.json" ] || python3 utils/process_prompts_wanx.py --input_file "$1" --output_dir "$2" \
    --model_path "$MODEL" --max_length 32 --negative_prompt "" --num_validation 4 --batch_size 256 \
    --device "${DEVICE:-cuda}" >> "$OUT/prompts.log" 2>&1
}
encode "${PROMPTS:-utils/tinyworld_train_prompts.txt}" "$RUN/prompts"
# PROMPT_COUNT=N: also a list of N distinct grammar prompts (Table 1's prompts and every held-out or fresh-check list
# under benchmarks/results excluded; until 2026-12-08 only the sixth run's fresh list was) in RUN/prompts_N; a plan
# line selects it with --prompt_dir {RUN}/prompts_N. A fresh check of such a run must exclude RUN/prompts_N.txt.
if [ -n "${PROMPT_COUNT:-}" ]; then
  [ -f "$RUN/prompts_$PROMPT_COUNT.txt" ] || python3 -m blade.tinyworld.prompts --count "$PROMPT_COUNT" --seed 0 \
    --exclude assets/tinyworld/eval_prompts.txt benchmarks/results/tinyworld_*prompts*.txt \
    --out "$RUN/prompts_$PROMPT_COUNT.txt" >> "$OUT/prompts.log" 2>&1
  encode "$RUN/prompts_$PROMPT_COUNT.txt" "$RUN/prompts_$PROMPT_COUNT"
fi

pids=()
while read -r name flags; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  flags=${flags//\{RUN\}/$RUN}
  # shellcheck disable=SC2086
  python3 wanx/train/train_wanx_tdm.py --tinyworld --pretrained_model_name_or_path "$MODEL" \
    --prompt_dir "$RUN/prompts" --output_dir "$RUN/$name" --mixed_precision bf16 --train_batch_size 16 \
    --k_step 8 --eta 0.9 --cfg 5.0 --shift 1 --lambda_reg 0 --rank 64 --lora_alpha 64 --lora_targets attn \
    --generator_loss huber --normalize_generator auto --learning_rate 1e-4 \
    --learning_rate_fake 2e-4 --lr_scheduler constant --max_train_steps 100000 --checkpointing_steps 500 \
    --validation_steps 0 --report_to none --eval_every "$EVAL_EVERY" --eval_seeds ${EVAL_SEEDS:-1000 1001} --diag_every 10 \
    --max_train_minutes "$MINUTES" --resume_from_checkpoint latest $flags \
    > "$RUN/$name.log" 2>&1 &
  pids+=($!)
done < "$PLAN"
# A TERM (the wrapper's timeout, a cluster's preemption) reaches every trainer: each stops at its next step with a
# checkpoint and its LoRA, and the archive below still runs.
trap 'echo "TERM: stopping the runs at their next step" >&2; kill -TERM "${pids[@]}" 2> /dev/null' TERM
status=0
source "$(dirname "$0")/wait_all.sh"
wait_all "${pids[@]}" || status=1

(cd "$RUN" && tar czf - --exclude='checkpoint-*' --exclude='prompts*' --exclude='*.safetensors' \
  --exclude='reflow_pairs_*' .) > "$OUT/study.tgz"
for lora in "$RUN"/*/pytorch_lora_weights.safetensors; do  # each run's final student LoRA folder, one archive a run
  name=$(basename "$(dirname "$lora")")                        # (fp32: ~4 MB with --lora_targets attn, ~8 MB all)
  raw=(); [ -f "$RUN/$name/raw_student/pytorch_lora_weights.safetensors" ] && \
    raw=("$name/raw_student/pytorch_lora_weights.safetensors" "$name/raw_student/blade_config.json")  # --ema_decay
  (cd "$RUN" && tar czf - "$name/pytorch_lora_weights.safetensors" "$name/blade_config.json" "${raw[@]}") \
    > "$OUT/lora_$name.tgz"
done
python3 benchmarks/study_table.py "$RUN" --every "$EVAL_EVERY" | tee "$OUT/study_table.md"
exit $status
