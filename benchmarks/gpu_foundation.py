"""One-GPU check + timing of the attention foundation at the Wan2.1-1.3B self-attention shape.

(a) flex vs reference, forward and backward (relative errors), bf16, [1, 12, 32760, 128];
(b) median times: dense cuDNN SDPA, flex at 10/20/50% kept random block masks (fwd, fwd+bwd), the prober;
(c) a markdown table on stdout and JSON at --out.

    python benchmarks/gpu_foundation.py --out results/gpu_foundation.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F

from blade.attention import block_sparse_attention, estimate_block_mask

SHAPE = (1, 12, 32760, 128)
BLOCK = 128


def bench_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median wall time of ``fn`` in ms (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def random_block_mask(density: float, generator: torch.Generator) -> torch.Tensor:
    n = math.ceil(SHAPE[2] / BLOCK)
    keep = max(1, round(density * n))
    scores = torch.rand(SHAPE[0], SHAPE[1], n, n, generator=generator, device="cuda")
    top = scores.topk(keep, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top, True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_flex_vs_reference(q, k, v, mask, grad) -> dict:
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = block_sparse_attention(*leaves, mask, backend="flex")
    grads = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref = block_sparse_attention(*ref_leaves, mask, backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad)
    errors = {"out": rel_err(out, ref)}
    errors.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="path of the JSON results")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    t0 = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(SHAPE, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    grad = torch.randn(SHAPE, generator=gen, device="cuda", dtype=torch.bfloat16)

    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "shape": list(SHAPE),
        "block_size": BLOCK,
    }
    print(f"# attention foundation on {results['device']} (torch {torch.__version__})", flush=True)

    # (a) correctness at the Wan shape.
    results["flex_vs_reference_rel_err"] = check_flex_vs_reference(q, k, v, random_block_mask(0.15, gen), grad)
    print("flex vs reference (rel. err):", results["flex_vs_reference_rel_err"], flush=True)

    # (b) timings.
    rows = []
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def fwd_bwd(fn):
        def run():
            out = fn()
            torch.autograd.grad(out, (qg, kg, vg), grad)

        return run

    def sdpa():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(qg, kg, vg)

    with torch.no_grad():
        fwd = bench_ms(lambda: sdpa())
    rows.append({"name": "dense cuDNN SDPA", "density": 1.0, "fwd_ms": fwd, "fwd_bwd_ms": bench_ms(fwd_bwd(sdpa))})
    for density in (0.1, 0.2, 0.5):
        mask = random_block_mask(density, gen)
        with torch.no_grad():
            fwd = bench_ms(lambda m=mask: block_sparse_attention(qg, kg, vg, m, backend="flex"))
        both = bench_ms(fwd_bwd(lambda m=mask: block_sparse_attention(qg, kg, vg, m, backend="flex")))
        rows.append({"name": f"flex {int(density * 100)}% kept", "density": density, "fwd_ms": fwd, "fwd_bwd_ms": both})
    prober = bench_ms(lambda: estimate_block_mask(q, k))
    rows.append({"name": "prober (16 samples/block)", "density": None, "fwd_ms": prober, "fwd_bwd_ms": None})
    results["timings"] = rows

    # (c) report.
    dense_fwd, dense_both = rows[0]["fwd_ms"], rows[0]["fwd_bwd_ms"]
    print("\n| kernel | fwd ms | fwd speedup | fwd+bwd ms | fwd+bwd speedup |\n|---|---|---|---|---|")
    for row in rows:
        both = row["fwd_bwd_ms"]
        both_txt = f"{both:.2f} | {dense_both / both:.2f}x" if both else "- | -"
        print(f"| {row['name']} | {row['fwd_ms']:.2f} | {dense_fwd / row['fwd_ms']:.2f}x | {both_txt} |")
    results["wall_s"] = time.time() - t0
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {args.out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
