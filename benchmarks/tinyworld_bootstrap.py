"""How often a student passes issue 16's check on one draw of n videos: a bootstrap over paired TinyWorld reports.

    python benchmarks/tinyworld_bootstrap.py --teacher T1.json ... --student S1.json,S2.json ... \
        [--sizes 24 48 96 192] [--draws 20000] [--seed 0] [--json OUT]

The issue's check evaluates the student against the teacher on prompts and seeds drawn afresh, then asks
adherence >= teacher - 0.02 and fidelity distance <= 1.2 x the teacher's, both on that draw's means. With 24 videos a
draw's paired standard error is 0.03-0.07, so whether one draw passes is partly luck. This script measures that luck
from videos already evaluated: it pairs the student's videos with the teacher's by (prompt, seed) (the pairing of
`benchmarks/tinyworld_paired.py`), then for each size n draws n pairs with replacement `--draws` times and counts the
draws on which the target holds (adherence alone, fidelity alone, both). Three students are resampled:

- `student`: the student as evaluated;
- `level`: a student level with the teacher in distribution: each drawn pair's two videos swap roles with
  probability 1/2 (the same per-video spread, no mean gap): the pass rate a student exactly as good as its teacher
  would have, the ceiling a noisy one-draw check puts on "as good as";
- `student+SHIFT` for each `--shift` (adherence only): the student with SHIFT added to every video's adherence (how
  far above the teacher a student must be for the adherence half to pass reliably; fidelity unchanged).

It also prints the mean and standard deviation of the fidelity ratio over the draws of each size. Draws use
`random.Random(--seed)`, one stream for the whole run in the printed order, so a run is reproducible from its command.
"""

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tinyworld_paired import load_videos, paired_keys, target_met  # noqa: E402

Pair = tuple[float, float, float, float]  # (student adherence, teacher adherence, student fidelity, teacher fidelity)


def make_pairs(teacher: dict, student: dict) -> list[Pair]:
    """One (student adherence, teacher adherence, student fidelity, teacher fidelity) per student video, sorted by
    (prompt, seed); a ValueError if a student video has no teacher video."""
    return [(student[k]["adherence"], teacher[k]["adherence"], student[k]["fidelity"], teacher[k]["fidelity"])
            for k in paired_keys(teacher, student)]


def passes(draw: list[Pair]) -> tuple[bool, bool, float]:
    """(adherence met, fidelity met, fidelity ratio) of issue 16's target on one draw's means."""
    n = len(draw)
    adherence = sum(p[0] for p in draw) / n
    teacher_adherence = sum(p[1] for p in draw) / n
    fidelity = sum(p[2] for p in draw) / n
    teacher_fidelity = sum(p[3] for p in draw) / n
    return (*target_met(adherence, teacher_adherence, fidelity, teacher_fidelity), fidelity / teacher_fidelity)


def pass_rates(pairs: list[Pair], n: int, draws: int, rng: random.Random, swap: bool = False,
               adherence_shift: float = 0.0) -> dict:
    """Share of `draws` bootstrap draws of `n` pairs (with replacement) that meet the target: both halves, adherence
    alone, fidelity alone; and the fidelity ratio's mean and standard deviation over the draws. `swap`: each drawn
    pair's roles exchanged with probability 1/2; `adherence_shift` is added to the student's adherence."""
    both = adherence_only = fidelity_only = 0
    ratios = []
    for _ in range(draws):
        draw = []
        for _ in range(n):
            s_adh, t_adh, s_fid, t_fid = pairs[rng.randrange(len(pairs))]
            if swap and rng.random() < 0.5:
                s_adh, t_adh, s_fid, t_fid = t_adh, s_adh, t_fid, s_fid
            draw.append((s_adh + adherence_shift, t_adh, s_fid, t_fid))
        adherence_met, fidelity_met, ratio = passes(draw)
        both += adherence_met and fidelity_met
        adherence_only += adherence_met
        fidelity_only += fidelity_met
        ratios.append(ratio)
    mean = sum(ratios) / draws
    sd = (sum((r - mean) ** 2 for r in ratios) / (draws - 1)) ** 0.5 if draws > 1 else float("nan")
    return {"videos": n, "draws": draws, "pass": both / draws, "adherence_pass": adherence_only / draws,
            "fidelity_pass": fidelity_only / draws, "fidelity_ratio_mean": mean, "fidelity_ratio_sd": sd}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", nargs="+", required=True, help="the teacher's reports (pooled)")
    parser.add_argument("--student", required=True, help="REPORT[,REPORT...]: the student's reports (pooled)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[24, 48, 96, 192],
                        help="videos per simulated draw (default: 24 48 96 192)")
    parser.add_argument("--draws", type=int, default=20000, help="bootstrap draws per size (default: 20000)")
    parser.add_argument("--shift", type=float, nargs="*", default=[0.05],
                        help="adherence shifts to resample the student with (default: 0.05; none: --shift)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random.Random (default: 0)")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.draws < 1 or min(args.sizes) < 1:
        parser.error("--draws and every --sizes value must be >= 1")
    pairs = make_pairs(load_videos(args.teacher), load_videos(args.student.split(",")))
    rng = random.Random(args.seed)
    arms = [("student", False, 0.0), ("level", True, 0.0)] + [(f"student{s:+g}", False, s) for s in args.shift]
    results = {"paired_videos": len(pairs), "seed": args.seed, "arms": {}}
    print(f"{len(pairs)} paired videos; {args.draws} draws per size, random.Random({args.seed})")
    print("| student | videos per draw | pass | adherence alone | fidelity alone | fidelity ratio (mean +- sd) |")
    print("|---|---|---|---|---|---|")
    for name, swap, shift in arms:
        rows = results["arms"][name] = []
        for n in args.sizes:
            r = pass_rates(pairs, n, args.draws, rng, swap=swap, adherence_shift=shift)
            rows.append(r)
            print(f"| {name} | {n} | {r['pass']:.3f} | {r['adherence_pass']:.3f} | {r['fidelity_pass']:.3f} | "
                  f"{r['fidelity_ratio_mean']:.3f} +- {r['fidelity_ratio_sd']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
