"""Charts of the speed benchmarks, from their JSON (no new measurement).

    python benchmarks/plot_speed.py --end_to_end benchmarks/results/end_to_end_v2_h200_2026-11-28.json \\
        --attention benchmarks/results/attention_v3_h200_2026-11-28.json --out_dir benchmarks/results

    python benchmarks/plot_speed.py --end_to_end benchmarks/results/session13_gpu_2026-12-07_h100/e2e_wan_vae.json \
        benchmarks/results/session13_gpu_2026-12-07_h100/e2e_cog_vae.json \
        --stages_png end_to_end_stages_h100_2026-12-07.png --out_dir benchmarks/results

Writes ``end_to_end_stages.png`` (or ``--stages_png``: seconds per stage, stock 50-step CFG / dense 8-step / BLADE,
one panel per model; each panel from one run, so its ratios are comparable; several JSONs of one card, one panel per
model) and ``kernel_tflops.png`` (effective TFLOP/s of our block-sparse kernel, and of the
paper's kernel when the JSON has its rows, against the kept fraction of key blocks, forward and forward+backward,
with cuDNN's dense attention as the line to reach). Either chart alone: pass only its JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = (("text_encoding_s", "text"), ("denoising_s", "denoise"), ("vae_decode_s", "VAE decode"),
          ("postprocess_s", "postprocess"))
ARMS = (("baseline", "stock, 50 steps CFG"), ("dense", "dense 8-step student"), ("blade", "BLADE 8-step ASA"))
# Sparse kernels drawn when the JSON has their rows: ours, and the paper's (when benchmarks/build_bsa.sh built it)
KERNELS = (("ours", "ours", "C0"), ("bsa", "mit-han-lab BSA (paper's kernel)", "C3"))
SHAPES = {"wan": "Wan2.1-1.3B [1,12,32760,128]", "cog": "CogVideoX-5B [1,48,17776,64]"}


def merge_end_to_end(reports: list[dict]) -> dict:
    """One report from several `end_to_end.py` JSONs of one card: their rows together. Refuses a model present in
    two of them (its arms would mix runs) and JSONs from different cards."""
    devices = {r["device"] for r in reports}
    if len(devices) > 1:
        raise ValueError(f"the JSONs come from different cards {sorted(devices)}: chart each card on its own")
    seen: dict[str, int] = {}
    for i, report in enumerate(reports):
        for family in {r["family"] for r in report["results"]}:
            if seen.setdefault(family, i) != i:
                raise ValueError(f"{family} is in two JSONs: a panel must come from one run")
    return {"device": devices.pop(), "results": [row for r in reports for row in r["results"]]}


def plot_end_to_end(report: dict, out: Path, plt) -> None:
    families = sorted({r["family"] for r in report["results"]}, key=lambda f: f != "wan")
    fig, axes = plt.subplots(1, len(families), figsize=(5.2 * len(families), 4.2), dpi=120)
    axes = axes if len(families) > 1 else [axes]
    for ax, family in zip(axes, families):
        rows = {r["arm"]: r for r in report["results"] if r["family"] == family}
        arms = [(a, label) for a, label in ARMS if a in rows]
        bottoms = [0.0] * len(arms)
        for key, name in STAGES:
            values = [rows[a]["stages"].get(key, 0.0) for a, _ in arms]
            ax.bar(range(len(arms)), values, bottom=bottoms, label=name)
            bottoms = [b + v for b, v in zip(bottoms, values)]
        for i, (a, _) in enumerate(arms):
            total = rows[a]["stages"]["total_s"]
            star = "*" if rows[a].get("extrapolated") else ""
            ax.text(i, bottoms[i], f"{total:.1f} s{star}\n{rows[a].get('speedup_total', 1.0):.1f}x", ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(range(len(arms)), [label for _, label in arms], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(top=max(bottoms) * 4)  # room for the labels above the tallest bar
        ax.set_ylabel("seconds per video (log)")
        ax.set_title(f"{family} ({report['device']})", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("End to end, per stage (* stock denoising scaled to 50 steps from the measured ones)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)


def plot_kernel(report: dict, out: Path, plt) -> None:
    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for ax, shape in zip(axes, SHAPES):
        for mode, style in (("fwd", "-o"), ("fwd+bwd", "--s")):
            for backend, label, color in KERNELS:
                points = sorted((r["density"], r["tflops"]) for r in rows
                                if r["shape"] == shape and r["mode"] == mode and r["backend"] == backend)
                if points:
                    ax.plot([d for d, _ in points], [t for _, t in points], style, color=color,
                            label=f"{label}, {mode}")
            dense = [r["tflops"] for r in rows
                     if r["shape"] == shape and r["mode"] == mode and r["backend"] == "cudnn_sdpa"]
            if dense:
                ax.axhline(dense[0], color="gray", linestyle=":" if mode == "fwd" else "-.",
                           label=f"cuDNN dense, {mode} ({dense[0]:.0f})")
        ax.set_xlabel("kept fraction of key blocks")
        ax.set_ylabel("effective TFLOP/s (kept blocks only)")
        ax.set_ylim(0, 700)
        ax.set_title(SHAPES[shape], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Block-sparse kernel efficiency ({report['device']}, torch {report['torch']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--end_to_end", nargs="+", help="benchmarks/end_to_end.py --out JSON(s) of one card "
                        "(end_to_end_stages.png); several: one panel per model, each model from one JSON")
    parser.add_argument("--stages_png", default="end_to_end_stages.png", help="file name of the stages chart "
                        "(default: end_to_end_stages.png)")
    parser.add_argument("--attention", help="benchmarks/attention.py JSON (kernel_tflops.png)")
    parser.add_argument("--out_dir", required=True)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (args.end_to_end or args.attention):
        parser.error("nothing to draw: pass --end_to_end JSON and/or --attention JSON")
    out_dir = Path(args.out_dir)
    if args.end_to_end:
        report = merge_end_to_end([json.loads(Path(path).read_text()) for path in args.end_to_end])
        plot_end_to_end(report, out_dir / args.stages_png, plt)
        print(f"wrote {out_dir / args.stages_png}")
    if args.attention:
        plot_kernel(json.loads(Path(args.attention).read_text()), out_dir / "kernel_tflops.png", plt)
        print(f"wrote {out_dir / 'kernel_tflops.png'}")


if __name__ == "__main__":
    main()
