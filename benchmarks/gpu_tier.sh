#!/usr/bin/env bash
# Issue 15's GPU checks in one command, on one CUDA GPU:
#   tier   - pytest -m gpu (tests/test_gpu_tier.py + the other gpu-marked kernel/prober/compile tests)
#   launch - both launch scripts (cogvideox/train_tdm_1.sh, wanx/train_wanx_tdm.sh) for 1 step, as a new user runs
#            them: MODEL_PATH / PROMPT_DIR / OUTPUT_DIR / NUM_GPUS=1, on 2-layer published-width random-weight folders
#            (CogVideoX 25x480x720, Wan 33x480x832 from the folder's blade_defaults.json), prompts encoded by
#            utils/process_prompts_*.py, the scripts' own flags (batch 5 x accumulation 4, ASA, checkpointing,
#            validation at the checkpoint when an mp4 writer is present)
#   bench  - benchmarks/train_step.py --models wan cogvideox --steps 3 (full-size, dense vs ASA)
#
#   OUT=out bash benchmarks/gpu_tier.sh                   # all stages (~9-10 min on one H100: split if needed)
#   OUT=out STAGES="tier launch" bash benchmarks/gpu_tier.sh; OUT=out STAGES=bench bash benchmarks/gpu_tier.sh
#   TIER_K="not compiled_blocks" OUT=out STAGES=tier bash benchmarks/gpu_tier.sh   # a pytest -k filter on the tier stage
#
# Logs: $OUT/<stage>.log, $OUT/summary.txt (rc and seconds per stage), $OUT/train_step.json, $OUT/gpu_tier_facts.jsonl,
# $OUT/launch_<family>/ (blade_config.json, trainer_state.json, file listing). Every stage runs even when an
# earlier one failed; the exit code is non-zero when any failed.
# Dry run of the launch stage on a CPU (tiny sizes, batch 1):
#   GPU_TIER_DEVICE=cpu LAUNCH_EXTRA="--train_batch_size 1 --gradient_accumulation_steps 1" STAGES=launch \
#     LAUNCH_SIZES="cogvideox:9x256x256 wan:9x256x256" bash benchmarks/gpu_tier.sh
set -uo pipefail
export PYTHONUNBUFFERED=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-./out}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
export BLADE_GPU_TIER_OUT="$OUT"
STAGES=${STAGES:-"tier launch bench"}
DEVICE=${GPU_TIER_DEVICE:-cuda}
LAUNCH_SIZES=${LAUNCH_SIZES:-"cogvideox:25x480x720 wan:33x480x832"}
LAUNCH_EXTRA=${LAUNCH_EXTRA:-}
WORK=${WORK:-$(mktemp -d /tmp/gpu_tier.XXXXXX)}
FAILED=0

{
  echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  python -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  python -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"
} | tee "$OUT/summary.txt"

stage() {  # stage NAME COMMAND...: run, log, record rc + seconds; never stops the script
  local name=$1; shift
  local start=$SECONDS rc=0
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
  echo "stage $name: rc=$rc, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || FAILED=1
}

mp4_writer() {  # prints nothing when blade.video can write an mp4 here, else the reason
  python - "$WORK" <<'EOF' 2>/dev/null || echo "probe failed"
import sys
from pathlib import Path
import numpy as np
from blade.video import export_mp4
try:
    export_mp4(np.zeros((2, 16, 16, 3), dtype=np.uint8), Path(sys.argv[1]) / "probe.mp4", fps=8)
except Exception as err:  # noqa: BLE001
    print(f"{type(err).__name__}: {err}")
EOF
}

launch_one() {  # launch_one FAMILY FxHxW
  local family=$1 size=$2
  local folder="$WORK/$family" prompts="$WORK/${family}_prompts" output="$WORK/launch_${family}"
  python - "$family" "$size" "$folder" "$DEVICE" <<'EOF' || return 1
import json, sys
import torch
from blade.testing import full_size
family, size, folder, device = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
frames, height, width = (int(x) for x in size.split("x"))
pipe = full_size.build_full_size_pipeline(family, device, torch.bfloat16, num_layers=2,
                                          text_encoder_overrides=dict(num_layers=1, num_heads=2, d_ff=256,
                                                                      vocab_size=1000))
pipe.save_pretrained(folder)
with open(f"{folder}/blade_defaults.json", "w") as f:
    json.dump({"num_frames": frames, "height": height, "width": width, "fps": 16 if family == "wan" else 8}, f)
print(f"{family}: 2-layer published-width folder at {folder}, training size {frames}x{height}x{width}")
EOF
  printf '%s\n' "a red ball rolls across a wooden table" "a dog runs on the beach at sunset" \
    "a blue car drives along a mountain road" "a small cat sleeps on a sofa" "waves crash on rocks at dawn" \
    "a man walks through a busy market" "snow falls on a quiet village" "a kite flies over a green hill" \
    > "$WORK/prompts.txt"
  local script=utils/process_prompts_wanx.py launcher=wanx/train_wanx_tdm.sh
  if [ "$family" = cogvideox ]; then script=utils/process_prompts_cogvideox.py; launcher=cogvideox/train_tdm_1.sh; fi
  python "$script" --input_file "$WORK/prompts.txt" --output_dir "$prompts" --model_path "$folder" \
    --num_validation 1 --device "$DEVICE" || return 1
  local validation="--validation_steps 1 --num_validation_videos 1" writer
  writer=$(mp4_writer)
  if [ -n "$writer" ]; then
    echo "no mp4 writer here ($writer): the launch run skips its validation video (--validation_steps 0)"
    validation="--validation_steps 0"
  fi
  # shellcheck disable=SC2086  # word splitting of the flag lists is intended
  MODEL_PATH="$folder" PROMPT_DIR="$prompts" OUTPUT_DIR="$output" NUM_GPUS=1 \
    bash "$launcher" --max_train_steps 1 --checkpointing_steps 1 $validation $LAUNCH_EXTRA || return 1
  mkdir -p "$OUT/launch_$family"
  ls -lR "$output" > "$OUT/launch_$family/listing.txt"
  cp "$output/blade_config.json" "$output/checkpoint-1/trainer_state.json" "$OUT/launch_$family/"
  cp -r "$output/validation" "$OUT/launch_$family/" 2>/dev/null || true
  test -s "$output/pytorch_lora_weights.safetensors" && test -f "$output/checkpoint-1/COMPLETE" \
    && grep -q '"global_step": 1' "$output/checkpoint-1/trainer_state.json" \
    && echo "$family launch script: 1 step, LoRA + checkpoint-1 written"
}

launch_all() {
  local rc=0 entry
  for entry in $LAUNCH_SIZES; do
    launch_one "${entry%%:*}" "${entry#*:}" || { echo "launch ${entry%%:*}: FAILED"; rc=1; }
    rm -rf "${WORK:?}/${entry%%:*}"  # the ~1 GB model folder
  done
  return $rc
}

for s in $STAGES; do
  case $s in
    tier) stage tier python -m pytest -m gpu -q -rs --durations=15 -p no:cacheprovider ${TIER_K:+-k "$TIER_K"} tests/ ;;
    launch) stage launch launch_all ;;
    bench) stage bench python benchmarks/train_step.py --models wan cogvideox --steps 3 --out "$OUT/train_step.json" ;;
    *) echo "unknown stage $s (tier, launch, bench)"; FAILED=1 ;;
  esac
done
rm -rf "${WORK:?}"
echo "gpu_tier: $([ "$FAILED" -eq 0 ] && echo all stages passed || echo SOME STAGE FAILED), logs in $OUT" \
  | tee -a "$OUT/summary.txt"
exit $FAILED
