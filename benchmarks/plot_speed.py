"""Charts of the speed benchmarks, from their JSON (no new measurement).

    python benchmarks/plot_speed.py --end_to_end benchmarks/results/end_to_end_v2_h200_2026-11-28.json \\
        --attention benchmarks/results/attention_v3_h200_2026-11-28.json --out_dir benchmarks/results

Writes ``end_to_end_stages.png`` (seconds per stage, stock 50-step CFG / dense 8-step / BLADE, both models; one run,
so the ratios are comparable) and ``kernel_tflops.png`` (effective TFLOP/s of our block-sparse kernel, and of the
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
        ax.set_ylabel("seconds per video (log)")
        ax.set_title(f"{family} ({report['device']})", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("End to end, per stage (* denoising extrapolated from 5-6 measured steps)", fontsize=9)
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
    parser.add_argument("--end_to_end", help="benchmarks/end_to_end.py --out JSON (end_to_end_stages.png)")
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
        plot_end_to_end(json.loads(Path(args.end_to_end).read_text()), out_dir / "end_to_end_stages.png", plt)
        print(f"wrote {out_dir / 'end_to_end_stages.png'}")
    if args.attention:
        plot_kernel(json.loads(Path(args.attention).read_text()), out_dir / "kernel_tflops.png", plt)
        print(f"wrote {out_dir / 'kernel_tflops.png'}")


if __name__ == "__main__":
    main()
