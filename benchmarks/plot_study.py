"""Learning curves of the distillation study: in-training adherence against optimizer step, with the teacher's line.

    python benchmarks/plot_study.py --runs DIR/run ... --labels ... --teacher 0.924 --out curves.png

Each run folder holds the trainer's eval.jsonl (--eval_every); for a run trained with --ema_decay the raw weights'
curve (eval_raw_adherence) is drawn, so every line is the weights as trained.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def curve(run: Path, metric: str = "adherence") -> tuple[list[int], list[float]]:
    """(steps, values) of one run's in-training `metric`; steps whose record lacks it (older runs logged no
    `duplicated`) are left out."""
    records: dict[int, dict] = {}
    for line in (run / "eval.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[int(record["step"])] = record
    raw, plain = f"eval_raw_{metric}", f"eval_{metric}"
    key = raw if raw in records[max(records)] else plain
    steps = [s for s in sorted(records) if key in records[s] or plain in records[s]]
    return steps, [records[s].get(key, records[s].get(plain)) for s in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run folders (each with eval.jsonl)")
    parser.add_argument("--labels", nargs="+", default=None, help="legend labels (default: folder names)")
    parser.add_argument(
        "--metric", default="adherence",
        help="which evaluation figure to draw: adherence, fidelity, duplicated, stability, acc_present, ...",
    )
    parser.add_argument("--teacher", type=float, default=None, help="the teacher's value on the same prompts")
    parser.add_argument("--title", default="TinyWorld distillation: adherence during training")
    parser.add_argument("--ylabel", default="adherence (24 held-out videos)", help="y-axis label (the evaluation set)")
    parser.add_argument(
        "--ymin", type=float, default=0.0,
        help="bottom of the y axis (e.g. 0.7 to see the last 0.1 between runs that all start near 0.4; points "
        "below it are clipped, not dropped)",
    )
    parser.add_argument("--ymax", type=float, default=1.0, help="top of the y axis")
    parser.add_argument("--out", required=True, help="PNG path")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = args.labels or [Path(r).name for r in args.runs]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    for index, (run, label) in enumerate(zip(args.runs, labels)):
        steps, values = curve(Path(run), args.metric)
        if not steps:
            print(f"{run}: no {args.metric} logged, left out")
            continue
        # colour by the run's place on the command line, so a run keeps its colour in every chart of a call
        ax.plot(steps, values, marker="o", markersize=3, label=label, color=f"C{index % 10}")
    if args.teacher is not None:
        ax.axhline(args.teacher, color="black", linestyle="--", label=f"teacher, 50 steps CFG 5 ({args.teacher:.3f})")
    ax.set_xlabel("optimizer step (batch 16)")
    ax.set_ylabel(args.ylabel)
    ax.set_ylim(args.ymin, args.ymax)
    ax.grid(alpha=0.3)
    ax.set_title(args.title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
