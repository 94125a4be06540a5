#!/usr/bin/env bash
# Held-out TinyWorld evaluation on the GPU: the bundled teacher (50 steps, CFG 5.0) and/or students on a prompt list x
# seeds, one process at a time (float32, `blade.tinyworld.evaluate`), one JSON report each in $OUT. Pair them here
# afterwards with `python benchmarks/tinyworld_paired.py --teacher OUT/heldout_teacher.json --student NAME=OUT/...`.
#
#   PROMPTS=benchmarks/results/tinyworld_heldout48_prompts_2026-12-06.txt SEEDS="2000 2001" OUT=$OUT \
#       bash benchmarks/tinyworld_heldout_eval.sh teacher bundled=assets/tinyworld/blade_lora dense=runs/x/dense
#
# Arguments: `teacher`, or NAME=LORA_FOLDER[,FLAG=VALUE...]: extra `blade.tinyworld.evaluate` flags after commas, e.g.
# `bundled_pool10=assets/tinyworld/blade_lora,--pool_size=10` (the student with three times ASA's global tokens).
# e.g. `early1=assets/tinyworld/blade_lora,--early_context_steps=1,--max_keep=0.15` (its first step with more global
# context: `EarlyContext`).
# Wheels in .whl/ (diffusers, imageio) are installed first when present.
set -uo pipefail
source benchmarks/carried_wheels.sh
install_carried_wheels || exit 1
PROMPTS=${PROMPTS:?PROMPTS}; SEEDS=${SEEDS:-2000 2001}; OUT=${OUT:?OUT}; DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
for arm in "$@"; do
  if [ "$arm" = teacher ]; then
    name=teacher; flags=(--steps 50 --guidance 5.0 --attention dense)
  else
    name=${arm%%=*}; rest=${arm#*=}
    IFS=, read -r -a parts <<< "$rest"
    flags=(--lora "${parts[0]}" "${parts[@]:1}")
  fi
  # shellcheck disable=SC2086
  python -m blade.tinyworld.evaluate --prompts "$PROMPTS" --seeds $SEEDS --device "$DEVICE" "${flags[@]}" \
    --out "$OUT/heldout_$name.json" > "$OUT/heldout_$name.log" 2>&1
  echo "$name: rc=$? $(tail -1 "$OUT/heldout_$name.log")"
done
