"""Paired comparison of TinyWorld evaluation reports against the teacher's, video by video, and issue 16's target.

    python benchmarks/tinyworld_paired.py --teacher T1.json T2.json ... --student NAME=S1.json,S2.json ... [--json OUT]

Each report is a `python -m blade.tinyworld.evaluate --out` JSON. Videos are matched by (prompt, seed): a student
video is compared with the teacher's video of the same prompt and seed (same initial noise on the same device), so
the per-video differences cancel what a prompt or a noise makes easy or hard. For each student it prints mean
adherence and fidelity distance beside the teacher's on the same videos, the paired mean difference of adherence
with its standard error (sample standard deviation / sqrt(n)), the fidelity ratio, and the target of issue 16:
adherence >= teacher - 0.02 and fidelity <= 1.2 x the teacher's, on those videos, beside the student's mean sparsity
in both forms (block: 1 - kept blocks / all; the paper's: 1 - density - 1/n, the pooled global keys counted as
attended; "-" for reports written before they were recorded). A student video without a teacher video is an error
(the comparison would silently shrink).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

ADHERENCE_MARGIN = 0.02  # issue 16: adherence >= teacher - 0.02
FIDELITY_RATIO = 1.2  # issue 16: fidelity distance <= 1.2 x the teacher's


def target_met(adherence: float, teacher_adherence: float, fidelity: float, teacher_fidelity: float
               ) -> tuple[bool, bool]:
    """Issue 16's target on means over the same videos: (adherence >= teacher - ADHERENCE_MARGIN, fidelity distance
    <= FIDELITY_RATIO x the teacher's)."""
    return adherence >= teacher_adherence - ADHERENCE_MARGIN, fidelity <= FIDELITY_RATIO * teacher_fidelity


def load_videos(paths: list[str]) -> dict[tuple[str, int], dict]:
    """(prompt, seed) -> the video's record, over several reports; a (prompt, seed) twice is an error."""
    videos: dict[tuple[str, int], dict] = {}
    for path in paths:
        for video in json.loads(Path(path).read_text())["videos"]:
            key = (video["prompt"], int(video["seed"]))
            if key in videos:
                raise ValueError(f"{path}: video {key} already in an earlier report")
            videos[key] = video
    return videos


def paired_keys(teacher: dict[tuple[str, int], dict], student: dict[tuple[str, int], dict]) -> list[tuple[str, int]]:
    """The student's (prompt, seed) keys, sorted; a ValueError if a student video has no teacher video (the
    comparison would silently shrink)."""
    missing = [key for key in student if key not in teacher]
    if missing:
        raise ValueError(f"{len(missing)} student videos have no teacher video, e.g. {missing[0]}")
    return sorted(student)


def paired_difference(teacher: dict, student: dict, field: str) -> tuple[float, float]:
    """(mean, standard error) of the per-video difference student - teacher of `field` over the student's videos
    (sample standard deviation / sqrt(n); nan for one video)."""
    keys = paired_keys(teacher, student)
    n = len(keys)
    diffs = [student[k][field] - teacher[k][field] for k in keys]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
    return mean, sd / math.sqrt(n)


def compare(teacher: dict[tuple[str, int], dict], student: dict[tuple[str, int], dict]) -> dict:
    """Paired statistics of `student` against `teacher` on the student's videos."""
    keys = paired_keys(teacher, student)
    n = len(keys)
    mean, standard_error = paired_difference(teacher, student, "adherence")

    def avg(videos: dict, field: str) -> float:
        return sum(videos[k][field] for k in keys) / n

    out = {
        "videos": n,
        "adherence": avg(student, "adherence"),
        "teacher_adherence": avg(teacher, "adherence"),
        "paired_difference": mean,
        "paired_standard_error": standard_error,
        "fidelity": avg(student, "fidelity"),
        "teacher_fidelity": avg(teacher, "fidelity"),
    }
    for field in ("duplicated", "sparsity", "sparsity_paper"):  # absent from older reports: left out
        values = [student[k].get(field) for k in keys]
        if all(v is not None for v in values):
            out[field] = sum(values) / n
    out["fidelity_ratio"] = out["fidelity"] / out["teacher_fidelity"]
    out["adherence_line"] = out["teacher_adherence"] - ADHERENCE_MARGIN
    out["fidelity_line"] = FIDELITY_RATIO * out["teacher_fidelity"]
    out["adherence_met"], out["fidelity_met"] = target_met(out["adherence"], out["teacher_adherence"],
                                                           out["fidelity"], out["teacher_fidelity"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", nargs="+", required=True, help="the teacher's reports (pooled)")
    parser.add_argument("--student", nargs="+", required=True,
                        help="NAME=REPORT[,REPORT...]: one student (its reports pooled); repeat for several")
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    teacher = load_videos(args.teacher)
    results = {}
    print("| student | videos | adherence (teacher) | paired vs teacher | fidelity (teacher, ratio) | duplicated "
          "| sparsity (block / paper) | target |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.student:
        name, _, paths = spec.partition("=")
        if not paths:
            parser.error(f"--student {spec!r}: expected NAME=REPORT[,REPORT...]")
        r = results[name] = compare(teacher, load_videos(paths.split(",")))
        verdict = "met" if r["adherence_met"] and r["fidelity_met"] else "missed: " + ", ".join(
            f"{what} by {gap:.4f}" for what, gap, ok in (
                ("adherence", r["adherence_line"] - r["adherence"], r["adherence_met"]),
                ("fidelity", r["fidelity"] - r["fidelity_line"], r["fidelity_met"])) if not ok)
        shown = lambda field, r=r: f"{r[field]:.3f}" if field in r else "-"
        print(f"| {name} | {r['videos']} | {r['adherence']:.4f} ({r['teacher_adherence']:.4f}) | "
              f"{r['paired_difference']:+.3f} +- {r['paired_standard_error']:.3f} | {r['fidelity']:.4f} "
              f"({r['teacher_fidelity']:.4f}, {r['fidelity_ratio']:.3f}x) | {shown('duplicated')} | "
              f"{shown('sparsity')} / {shown('sparsity_paper')} | {verdict} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
