#!/usr/bin/env bash
# Issue 16: how often does the TinyWorld teacher itself draw an object twice, and does the guidance change it?
# Runs on one GPU (after a study: beside one it slows both) and writes one archive, $OUT/teacher_duplicates.tgz, with:
#   teacher_cfg<G>.json                          Table 1's 48 videos (prompts x seeds 1000 1001) at each CFG in CFGS
#                                                (default none: 5.0 and 3.5 were measured on 2026-12-06, BENCHMARKS
#                                                call 10)
#   teacher_interval.json                        the same 48 with no guidance above t 900 and 3.5 below
#   traj_teacher.json                            the teacher's decoded x0 every 5th of its 50 steps (seed 1000)
#   traj_student.json                            the bundled student's x0 at each of its 8 steps (seed 1000)
#
#   OUT=out bash benchmarks/teacher_duplicates.sh          (BUDGET=s stops what still runs, default 500)
#
# Each process is held to OMP_THREADS CPU threads (default 3): the scoring runs on the CPU, and on 2026-12-06 four of
# these processes at torch's default (16 threads each on a 16-core machine) beside a study's trainers took 13-33 s a
# teacher video and 100-170 s a trajectory, against 1.8 s a teacher video for one process at 6 threads alone.
set -uo pipefail
OUT=${OUT:?OUT}; BUDGET=${BUDGET:-500}
export OMP_NUM_THREADS=${OMP_THREADS:-3}
source benchmarks/carried_wheels.sh
install_carried_wheels || exit 1
W=$(mktemp -d /tmp/teacher_duplicates.XXXXXX)
P=assets/tinyworld/eval_prompts.txt
run() {  # name, command...: each piece is logged, and timed out at the budget so the archive is always written
  local name=$1; shift
  timeout -k 10 "$BUDGET" "$@" > "$W/$name.log" 2>&1; echo "$name rc=$? at ${SECONDS} s" | tee -a "$W/summary.txt"
}
for g in ${CFGS:-}; do
  run "teacher_cfg$g" python3 -m blade.tinyworld.evaluate --prompts $P --seeds 1000 1001 --device cuda --guidance "$g" \
    --out "$W/teacher_cfg$g.json" &
done
run teacher_interval python3 -m blade.tinyworld.evaluate --prompts $P --seeds 1000 1001 --device cuda --guidance 1 \
  --guidance_2 3.5 --guidance_boundary 900 --out "$W/teacher_interval.json" &
run traj_teacher python3 benchmarks/tinyworld_trajectory.py --prompts $P --seeds 1000 --device cuda --every 5 \
  --out "$W/traj_teacher.json" &
run traj_student python3 benchmarks/tinyworld_trajectory.py --prompts $P --seeds 1000 --device cuda \
  --lora assets/tinyworld/blade_lora --out "$W/traj_student.json" &
wait
tail -n 25 "$W"/*.log
mkdir -p "$OUT"; tar czf "$OUT/teacher_duplicates.tgz" -C "$W" .
