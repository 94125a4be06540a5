"""The program Nsight Compute profiles for the attention kernel's gap to the dense cuDNN forward (a GPU benchmark).

    ncu --profile-from-start off --clock-control none --set full -o attn \\
        python benchmarks/ncu_attention.py --cases wan:0.1 wan:0.5 cog:0.5

Every case first runs outside the profiled range (Triton autotuning, warm caches), then once inside
`cudaProfilerStart` / `cudaProfilerStop`, so ncu sees exactly one launch of each kernel per case: the Triton
block-sparse forward (with its mask -> list kernels) at the kept fraction, and cuDNN SDPA dense for the same shape as
the yardstick. Prints the autotuned launch config of each case (tiles, warps, stages) and its event-timed
effective TFLOP/s, which ncu's report does not show.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.attention import BLOCK, SHAPES, random_block_mask  # noqa: E402


def timed_ms(fn, repeats: int = 20) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main(argv: list[str] | None = None) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from blade.attention.kernels import triton_bsa

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["wan:0.1", "wan:0.5", "cog:0.5"],
                        help="SHAPE:KEPT_FRACTION, SHAPE one of " + ", ".join(SHAPES))
    args = parser.parse_args(argv)

    runs = []
    for case in args.cases:
        name, kept = case.split(":")
        (b, h, seq, d), *_ = SHAPES[name]
        gen = torch.Generator("cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, seq, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        n_blocks = (seq + BLOCK - 1) // BLOCK
        mask = random_block_mask(b, h, n_blocks, n_blocks, float(kept), "cuda")
        sparse = lambda q=q, k=k, v=v, mask=mask: triton_bsa.triton_block_sparse_attention(q, k, v, mask,
                                                                                             block_size=BLOCK)

        def dense(q=q, k=k, v=v):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        flops = 4 * b * h * seq * seq * d
        kept_frac = mask.float().mean().item()
        ms_sparse, ms_dense = timed_ms(sparse), timed_ms(dense)
        tuned = {key: str(getattr(t, "best_config", None)) for key, t in triton_bsa._TUNED.items() if key[1] == "fwd"}
        print(f"[{case}] kept {kept_frac:.3f}: ours {ms_sparse:.3f} ms = {flops * kept_frac / ms_sparse / 1e9:.0f} "
              f"TFLOP/s eff.; cuDNN dense {ms_dense:.3f} ms = {flops / ms_dense / 1e9:.0f} TFLOP/s; "
              f"fwd config {tuned}", flush=True)
        runs.append((case, sparse, dense))

    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for case, sparse, dense in runs:
        torch.cuda.nvtx.range_push(case)
        sparse()
        dense()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
