"""Training-free comparison on the TinyWorld teacher (the paper's Table 3 in miniature), one process for all modes.

ASA vs a static local window vs random blocks at equal self-attention sparsity, each scored against the dense
teacher run with the same noise (PSNR/SSIM) and on the world's metrics. The dense reference videos are rendered once
and shared by the modes (the evaluation command renders them again for every mode).

    python benchmarks/tinyworld_table3.py --prompts assets/tinyworld/eval_prompts.txt --max_prompts 3 \\
        --seeds 1000 --sparsity 0.75 --out_dir table3/

Writes one report per mode (`table3_{mode}_{sparsity}.json`, the evaluation command's format) and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from blade.tinyworld.evaluate import evaluate, read_prompts

MODES = ("asa", "window", "random")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", required=True, help="grammar prompt file")
    parser.add_argument("--max_prompts", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--model", default=None, help="TinyWorld pipeline folder (default: the bundled one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mask_reuse_steps", type=int, nargs="*", default=[],
                        help="extra ASA rows whose prober masks serve N sampling steps each (e.g. 2 5)")
    parser.add_argument("--out_dir", required=True)
    args = parser.parse_args(argv)

    prompts = read_prompts(args.prompts)[: args.max_prompts]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    rows = []
    for sparsity in args.sparsity:
        runs = [(mode, mode, 1) for mode in MODES] + [(f"asa+reuse{n}", "asa", n) for n in args.mask_reuse_steps]
        for name, mode, reuse in runs:
            report = evaluate(prompts, args.seeds, steps=args.steps, guidance=args.guidance, attention=mode,
                              sparsity=sparsity, model=args.model, device=args.device, compare_dense=True,
                              dense_cache=cache, mask_reuse_steps=reuse)
            (out_dir / f"table3_{name}_{sparsity}.json").write_text(json.dumps(report, indent=1))
            rows.append((sparsity, name, report))
    print("| sparsity | mode | PSNR (dB) | SSIM | adherence | realized sparsity |")
    print("|---|---|---|---|---|---|")
    for sparsity, mode, r in rows:
        cells = (f"{r['psnr']:.2f}", f"{r['ssim']:.3f}", f"{r['adherence']:.3f}", f"{r['sparsity']:.3f}")
        print(f"| {sparsity} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
