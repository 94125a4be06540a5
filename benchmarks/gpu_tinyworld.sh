#!/usr/bin/env bash
# TinyWorld on the GPU machine, in stages that each fit one 10-minute device call and resume from what the last left:
#
#   bash benchmarks/gpu_tinyworld.sh vae MINUTES        # VAE (warm-starts from RUN/pipeline when it exists)
#   bash benchmarks/gpu_tinyworld.sh teacher MINUTES    # teacher (warm-starts from RUN/pipeline)
#   bash benchmarks/gpu_tinyworld.sh step               # time a teacher step by part, eager vs compiled (~1 min)
#   bash benchmarks/gpu_tinyworld.sh quick              # teacher on 6 held-out prompts (a progress check, ~1 min)
#   bash benchmarks/gpu_tinyworld.sh prompts            # the TDM prompt cache of the training prompts (seconds)
#   bash benchmarks/gpu_tinyworld.sh distill MINUTES    # prompt cache, then dense and ASA TDM students, MINUTES each
#                                                       # (in parallel when 2 GPUs) with the bundled student's
#                                                       # recipe (BENCHMARKS.md "Distillation study": L2 + per-
#                                                       # sample normalisation, 2 fake updates, LoRA on every
#                                                       # Linear, anchors at shift 3, target CFG 3.5, ASA keep
#                                                       # <= 0.25, lr 2e-4 cosine over STEPS, default 650; the
#                                                       # ASA student then samples at keep <= 0.17, window 20)
#   bash benchmarks/gpu_tinyworld.sh eval               # Table 1 and Table 3 reports (JSON) on held-out prompts
#   bash benchmarks/gpu_tinyworld.sh distill_eval4 MINUTES  # 4 GPUs: students on GPUs 0/1 while the teacher's
#                                                       # Table 1 / Table 3 runs on GPUs 2/3, then `tdm_2gpu 40` on
#                                                       # GPUs 2-3 and the students' Table 1 rows on GPUs 0/1
#   bash benchmarks/gpu_tinyworld.sh tdm_2gpu STEPS     # the wanx launch script on 2 GPUs (accelerate, DDP)
#   bash benchmarks/gpu_tinyworld.sh student MINUTES    # the ASA student through the launch script on NPROC GPUs
#                                                       # (data-parallel, batch 16 per GPU, resumes RUN/asa_dp),
#                                                       # then its Table 1 row on GPU 0
#   bash benchmarks/gpu_tinyworld.sh table3_only        # Table 3 alone (ASA vs window vs random at 0.5 and 0.75)
#   bash benchmarks/gpu_tinyworld.sh pack               # RUN -> OUT/run.tgz.part-* (<= 15 MB each)
#
# NPROC (default: every visible GPU) processes train the VAE and the teacher data-parallel (torchrun). RUN (default
# runs/tw) is carried between calls; OUT (the device tool's output folder, default ./out) receives the logs, the
# reports and, with `pack`, RUN without optimizer-sized checkpoints (cat parts | tar xzf - to unpack).
# COOLDOWN=M (vae, teacher) decays the learning rate to a tenth over the stage's last M minutes. TWO_SHARE=P (teacher)
# trains on a share P of two-object scenes (default 0.5); COMPILE=1 (teacher) compiles the transformer; REUSE=R
# (teacher) serves each encoded clip about R steps (default 4); LR (teacher) is its peak learning rate (default 3e-4).
set -euo pipefail
STAGE=${1:?stage: vae | teacher | distill | eval}
MINUTES=${2:-4}
RUN=${RUN:-runs/tw}
OUT=${OUT:-out}
EVAL_PROMPTS=${EVAL_PROMPTS:-assets/tinyworld/eval_prompts.txt}
mkdir -p "$RUN" "$OUT"
export PYTHONUNBUFFERED=1
# Several jobs share the host in the multi-GPU stages, each with torch's default of one CPU thread per core: four
# side-by-side evaluations on a 64-core host ran ~10x slower than one alone (most likely this oversubscription).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
NPROC=${NPROC:-$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")}

train_tw() {  # blade.tinyworld.train on NPROC processes
  if [ "$NPROC" -gt 1 ]; then
    torchrun --standalone --nproc_per_node "$NPROC" -m blade.tinyworld.train "$@"
  else
    python3 -m blade.tinyworld.train "$@"
  fi
}

distill() {  # $1 = name, remaining = extra flags
  local name=$1; shift
  python3 wanx/train/train_wanx_tdm.py --tinyworld --pretrained_model_name_or_path "$RUN/pipeline" \
    --prompt_dir "$RUN/prompts" --output_dir "$RUN/$name" --mixed_precision bf16 --gradient_checkpointing \
    --train_batch_size 16 --k_step 8 --eta 0.9 --cfg 3.5 --lambda_reg 0 --rank 64 --lora_alpha 64 \
    --learning_rate 2e-4 --learning_rate_fake 2e-4 --lr_scheduler cosine --max_train_steps "${STEPS:-650}" \
    --fake_updates 2 --generator_loss l2 --normalize_generator on --checkpointing_steps 100 \
    --validation_steps 0 --max_train_minutes "$MINUTES" --resume_from_checkpoint latest "$@" 2>&1 \
    | tr '\r' '\n' | grep -v "it/s]$" | tee "$OUT/tdm_$name.log"
}

sampling_point() {  # $1 = student folder: sample as the bundled student does (issue 16, session 12)
  # The ASA students train at keep <= 0.25 with Wan's pool window 30 and are shipped sampling at the paper's Wan clamp,
  # keep <= 0.17, with window 20 (sparsity 0.83, 0.78 in the paper's form): on three fresh prompt draws it met the
  # target on each where window 5 (the ~1,100 global tokens of scaled_pool_size, shipped sessions 9-11) missed twice;
  # level on 144 CPU videos (BENCHMARKS.md, "Session 12"). The trained values stay on record.
  python3 - "$RUN/$1" <<'PY'
import sys
from blade.config import BladeConfig
config = BladeConfig.load(sys.argv[1])
config.extra.setdefault("trained_asa_pool_size", config.asa["pool_size"])
config.extra.setdefault("trained_asa_max_keep", config.asa["max_keep"])
config.asa["max_keep"], config.asa["pool_size"] = 0.17, 20
print(f"{config.save(sys.argv[1])}: samples at keep <= {config.asa['max_keep']}, pool window {config.asa['pool_size']}")
PY
}

evaluate() {  # blade.tinyworld.evaluate on RUN's pipeline
  python3 -m blade.tinyworld.evaluate --model "$RUN/pipeline" --device cuda "$@"
}

prompt_cache() {
  python3 utils/process_prompts_wanx.py --input_file utils/tinyworld_train_prompts.txt --output_dir "$RUN/prompts" \
    --model_path "$RUN/pipeline" --max_length 32 --negative_prompt "" --num_validation 4 --batch_size 256 \
    --device cuda
}

table1_teacher() {
  evaluate --prompts "$EVAL_PROMPTS" --seeds 1000 1001 --steps 50 --guidance 5.0 --attention dense \
    --out "$OUT/table1_teacher.json"
}

table1_student() {  # $1 = asa | dense
  if [ -d "$RUN/$1" ]; then
    evaluate --prompts "$EVAL_PROMPTS" --seeds 1000 1001 --lora "$RUN/$1" --out "$OUT/table1_student_$1.json"
  fi
}

table3() {  # training-free, on the teacher: ASA vs window vs random blocks at equal sparsity, against dense
  # (one process: each dense reference video is rendered once for all modes)
  python3 benchmarks/tinyworld_table3.py --prompts "$EVAL_PROMPTS" --max_prompts 12 --seeds 1000 \
    --sparsity 0.5 0.75 --steps 50 --guidance 5.0 --model "$RUN/pipeline" --device cuda --out_dir "$OUT"
}

launch_tdm() {  # $1 = output folder under RUN, $2 = GPUs, then extra flags: the user-facing launch script, unchanged
  local name=$1 gpus=$2; shift 2
  MODEL_PATH="$RUN/pipeline" PROMPT_DIR="$RUN/prompts" OUTPUT_DIR="$RUN/$name" NUM_GPUS="$gpus" \
    bash wanx/train_wanx_tdm.sh --tinyworld --train_batch_size 16 --gradient_accumulation_steps 1 \
    --learning_rate_fake 2e-4 --validation_steps 0 "$@" 2>&1 | tr '\r' '\n' | grep -v "it/s]$"
}

tdm_2gpu() {  # $1 = steps; the launch script on 2 GPUs (step time and memory)
  launch_tdm tdm_2gpu 2 --max_train_steps "$1" --checkpointing_steps "$1" | tee "$OUT/tdm_2gpu.log"
}

case "$STAGE" in
  vae)  # 13-frame clips: the shortest that reach the causal VAE's steady-state chunk path (see vae_clip_frames)
    train_tw vae --out "$RUN" --minutes "$MINUTES" --resume --vae-frames 13 --vae-batch-size 16 \
      --cooldown-minutes "${COOLDOWN:-0}" 2>&1 \
      | tee -a "$OUT/vae.log" ;;
  teacher)
    train_tw teacher --out "$RUN" --minutes "$MINUTES" --resume --latent-reuse "${REUSE:-4}" \
      --cooldown-minutes "${COOLDOWN:-0}" --two-object-share "${TWO_SHARE:-0.5}" --lr "${LR:-3e-4}" \
      ${COMPILE:+--compile} 2>&1 | tee -a "$OUT/teacher.log" ;;
  step)  # where a teacher step's time goes, eager vs compiled (OUT/step.json's "faster": whether to set COMPILE)
    python3 benchmarks/tinyworld_step.py --device cuda --profile --out "$OUT/step.json" 2>&1 | tee "$OUT/step.log" ;;
  quick)
    head -7 "$EVAL_PROMPTS" > "$RUN/quick_prompts.txt"  # comment line + 6 prompts
    evaluate --prompts "$RUN/quick_prompts.txt" --seeds 1000 --steps 50 --guidance 5.0 --attention dense \
      --out "$OUT/quick_teacher.json" 2>&1 | tail -3 ;;
  prompts) prompt_cache ;;
  distill)
    prompt_cache
    if [ "$NPROC" -gt 1 ]; then  # the dense control and the ASA student side by side, one GPU each
      CUDA_VISIBLE_DEVICES=0 distill dense > /dev/null &
      CUDA_VISIBLE_DEVICES=1 distill asa --use_sparsity --asa_max_keep 0.25 > /dev/null
      wait
    else
      distill dense                # distillation alone first (control), then with ASA
      distill asa --use_sparsity --asa_max_keep 0.25
    fi
    sampling_point asa ;;
  eval)
    table1() { table1_teacher; table1_student asa; table1_student dense; }
    if [ "$NPROC" -gt 1 ]; then
      CUDA_VISIBLE_DEVICES=0 table1 > "$OUT/eval_table1.log" 2>&1 &
      CUDA_VISIBLE_DEVICES=1 table3 > "$OUT/eval_table3.log" 2>&1
      wait
    else
      table1; table3
    fi ;;
  distill_eval4)
    [ -d "$RUN/prompts" ] || prompt_cache
    CUDA_VISIBLE_DEVICES=0 distill dense > /dev/null & dense_pid=$!
    CUDA_VISIBLE_DEVICES=1 distill asa --use_sparsity --asa_max_keep 0.25 > /dev/null & asa_pid=$!
    (
      CUDA_VISIBLE_DEVICES=2 table1_teacher > "$OUT/eval_table1_teacher.log" 2>&1 &
      CUDA_VISIBLE_DEVICES=3 table3 > "$OUT/eval_table3.log" 2>&1
      wait
      CUDA_VISIBLE_DEVICES=2,3 tdm_2gpu 40 > /dev/null
    ) &
    wait "$dense_pid" "$asa_pid"
    sampling_point asa
    CUDA_VISIBLE_DEVICES=0 table1_student dense > "$OUT/eval_table1_dense.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 table1_student asa > "$OUT/eval_table1_asa.log" 2>&1
    wait ;;
  table3_only) table3 ;;
  tdm_2gpu) tdm_2gpu "$MINUTES" ;;
  student)
    [ -d "$RUN/prompts" ] || prompt_cache
    launch_tdm asa_dp "$NPROC" --max_train_steps 100000 --checkpointing_steps 100 --max_train_minutes "$MINUTES" \
      | tee -a "$OUT/tdm_asa_dp.log"
    CUDA_VISIBLE_DEVICES=0 table1_student asa_dp > "$OUT/eval_table1_asa_dp.log" 2>&1 ;;
  pack)  # without optimizer-sized checkpoints, which do not fit the transfer limits
    tar czf - --exclude='ckpt_*.pt' --exclude='checkpoint-*' --exclude='prompts' -C "$(dirname "$RUN")" \
      "$(basename "$RUN")" | split -b 15M - "$OUT/run.tgz.part-" ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
