"""Bar chart of TinyWorld evaluation reports against the teacher's: adherence (with issue 16's target line) and the
share of objects drawn twice, each bar with its paired standard error against the teacher.

    python benchmarks/plot_eval_reports.py --teacher T1.json [T2.json ...] --reports NAME=R1.json[,R2.json ...] ... \
        --title TITLE --out chart.png

Reports are `python -m blade.tinyworld.evaluate --out` JSONs over the same (prompt, seed) videos as the teacher's
(the pairing of `benchmarks/tinyworld_paired.py`: a student video without a teacher video is an error). Several
reports per arm (comma-separated) and per teacher pool evaluation sets, e.g. Table 1 and a held-out set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tinyworld_paired import ADHERENCE_MARGIN, load_videos, paired_difference, paired_keys  # noqa: E402


def paired(student: dict, teacher: dict, key: str) -> tuple[float, float, float]:
    """(student mean, teacher mean, standard error of the paired difference) of ``key`` over the student's videos."""
    keys = paired_keys(teacher, student)
    _, standard_error = paired_difference(teacher, student, key)
    mean = lambda videos: sum(videos[k][key] for k in keys) / len(keys)  # noqa: E731
    return mean(student), mean(teacher), standard_error


def main(argv: list[str] | None = None) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Writes the chart; returns {arm: {"adherence"|"duplicated": (student mean, teacher mean, paired se)}}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", nargs="+", required=True, help="the teacher's report(s)")
    parser.add_argument("--reports", nargs="+", required=True,
                        help="NAME=REPORT.json[,REPORT2.json...], one bar each (several reports: their videos pooled)")
    parser.add_argument("--title", default="TinyWorld evaluation")
    parser.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = load_videos(args.teacher)
    names, rows = [], []
    for spec in args.reports:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--reports takes NAME=REPORT.json, got {spec!r}")
        student = load_videos(path.split(","))
        names.append(name)
        rows.append({key: paired(student, teacher, key) for key in ("adherence", "duplicated")})

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in zip(axes, ("adherence", "duplicated"), ("adherence", "objects drawn twice (share)")):
        means = [row[key][0] for row in rows]
        errors = [row[key][2] for row in rows]
        ax.bar(range(len(names)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
        teacher_mean = rows[0][key][1]
        ax.axhline(teacher_mean, color="black", lw=1.2, label=f"teacher {teacher_mean:.3f}")
        if key == "adherence":
            ax.axhline(teacher_mean - ADHERENCE_MARGIN, color="tab:red", ls="--", lw=1,
                       label=f"target {teacher_mean - ADHERENCE_MARGIN:.3f}")
            ax.set_ylim(min(means + [teacher_mean]) - 0.06, 1.0)
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.legend(loc="lower right" if key == "adherence" else "upper right", fontsize=8)
    fig.suptitle(f"{args.title} (bars: paired standard error against the teacher)", fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return dict(zip(names, rows))


if __name__ == "__main__":
    main()
