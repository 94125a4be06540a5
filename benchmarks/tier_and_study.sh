#!/usr/bin/env bash
# One GPU call that runs the GPU test tier (tier, then launch) beside a distillation-study plan, and leaves at most
# 8 files in $OUT (the device tool's limit): tier_tier.tgz, tier_launch.tgz (each written as its stage ends),
# study_logs.tgz (logs, eval curves, the study table, the prompt log) and one lora_<run>.tgz per run (<= 5 runs).
#
#   PLAN=benchmarks/study_plans/call8_shift_long.txt MINUTES=8.0 OUT=out bash benchmarks/tier_and_study.sh
#
# EVAL="teacher NAME=LORA[,FLAG=VALUE...] ..." then runs benchmarks/tinyworld_heldout_eval.sh's arms (on EVAL_PROMPTS x
# EVAL_SEEDS, default its held-out 48 x 2) and archives the reports as eval.tgz, whatever finished by the deadline.
# TIER=0 skips the tier (the study alone); DEADLINE (s, default 570) stops whatever still runs and archives it.
# Wheels in .whl/ (diffusers, imageio) are installed first when present (the device machine lacks diffusers).
set -uo pipefail
T0=$SECONDS
source benchmarks/carried_wheels.sh
install_carried_wheels || exit 1
OUT=${OUT:?OUT}; PLAN=${PLAN:-}; MINUTES=${MINUTES:-8}; DEADLINE=${DEADLINE:-570}; TIER=${TIER:-1}
# The trainers' time box ends at a step boundary, then each saves and runs its last evaluation (48 videos, slow when
# several runs and the tier share the GPU: 2026-12-06's call 1 overran a 30-s margin and the timeout below killed the
# study before it archived its LoRAs). Keep >= 90 s between the box and the deadline.
CAP=$(( (DEADLINE - 90) / 6 ))  # tenths of a minute
if [ "$(awk -v m="$MINUTES" 'BEGIN { print int(m * 10 + 0.5) }')" -gt "$CAP" ]; then
  echo "MINUTES=$MINUTES leaves < 90 s before DEADLINE=$DEADLINE s: using $((CAP / 10)).$((CAP % 10))"
  MINUTES=$((CAP / 10)).$((CAP % 10))
fi
mkdir -p "$OUT"; OUT=$(realpath "$OUT")
W=$(mktemp -d /tmp/tier_and_study.XXXXXX); mkdir -p "$W/tier" "$W/study"
log() { echo "$* (at $((SECONDS - T0)) s)" | tee -a "$W/study/tier_and_study.log"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee -a "$W/study/tier_and_study.log"
if [ "$TIER" = 1 ]; then
  (
    OUT=$W/tier STAGES=tier bash benchmarks/gpu_tier.sh > "$W/tier/stdout_tier.txt" 2>&1
    cp "$W/tier/summary.txt" "$W/tier/summary_tier.txt"
    tar czf "$OUT/tier_tier.tgz" -C "$W" tier; log "tier archived"
    OUT=$W/tier STAGES=launch bash benchmarks/gpu_tier.sh > "$W/tier/stdout_launch.txt" 2>&1
    tar czf "$OUT/tier_launch.tgz" -C "$W" tier; log "launch archived"
  ) &
  TIER_PID=$!
fi
if [ -n "$PLAN" ]; then
  # TERM at the deadline: the study forwards it to its trainers (each saves at its next step), then archives
  OUT=$W/study timeout -k 40 $((DEADLINE - (SECONDS - T0) - 55)) bash benchmarks/tinyworld_study.sh "$PLAN" "$MINUTES" \
    > "$W/study/stdout.txt" 2>&1
  log "study rc=$?"
  mv "$W"/study/lora_*.tgz "$OUT"/ 2>/dev/null
  tar czf "$OUT/study_logs.tgz" -C "$W" study
  tail -20 "$W/study/stdout.txt"
fi
if [ -n "${EVAL:-}" ]; then
  mkdir -p "$W/eval"
  # shellcheck disable=SC2086
  PROMPTS=${EVAL_PROMPTS:-benchmarks/results/tinyworld_heldout48_prompts_2026-12-06.txt} SEEDS=${EVAL_SEEDS:-2000 2001} \
    OUT=$W/eval timeout -k 10 $((DEADLINE - (SECONDS - T0) - 20)) bash benchmarks/tinyworld_heldout_eval.sh $EVAL \
    | tee -a "$W/study/tier_and_study.log"
  log "eval rc=${PIPESTATUS[0]}"
  tar czf "$OUT/eval.tgz" -C "$W" eval
fi
if [ "$TIER" = 1 ]; then
  ( sleep $((DEADLINE - (SECONDS - T0))); log "deadline: stopping the tier"; pkill -f gpu_tier.sh; pkill -f pytest ) &
  KILLER=$!
  wait "$TIER_PID"; kill "$KILLER" 2>/dev/null
  [ -f "$OUT/tier_launch.tgz" ] || tar czf "$OUT/tier_partial.tgz" -C "$W" tier
  cat "$W/tier/summary_tier.txt" "$W/tier/summary.txt" 2>/dev/null
fi
log "end"
