"""Attention kernel benchmark on one GPU (H100): dense SDPA (cuDNN, FlashAttention-2), FlexAttention and BLADE's
Triton block-sparse kernel at several kept fractions, forward and forward+backward, plus the ASA overhead
(prober + Gilbert reorder + mask -> kernel lists) as a share of the dense cuDNN forward.

    python benchmarks/attention.py                      # all shapes, all densities (< 4 min on an H100)
    python benchmarks/attention.py --quick --out attn.json   # wan + cog, 10% and 50% (< 90 s)
    python benchmarks/attention.py --shapes wan --densities 0.1 0.5
    python benchmarks/attention.py --quick --overhead_only     # the ASA overhead rows alone (< 1 min)

Variants of our kernel: "ours" (the default launch configs, `tma_ws` since session 13, Triton mask -> list
builder), "ours_v1" (the first GPU-tuned config set and the torch list builder, kept to make regressions visible),
"ours_kernel_only" (the forward kernel without the list building), and with `--extra_sets v2 tma tma_ws` "ours_v2"
(the pointer-load forward, the default before session 13) / "ours_tma" / "ours_tma_ws" (the forward through
tensor-descriptor (TMA) loads, and with Triton's warp specialization; each checked against flex first, its
forward+backward timed too: the backward is v2's in every set).

ASA overhead rows, each in ms and % of the dense cuDNN forward of the same shape:
- prober (the fused Triton prober, what runs on CUDA) and prober_torch (the reference path);
- reorder_per_layer (permuting q, k, v and restoring the output in every layer: what ASA costs when it gets
  raster-order tokens) and reorder_amortized (what the model adapters do: permute the hidden states once per
  transformer forward and restore once, divided over the model's layers);
- mask_to_lists_fwd / _fwd+bwd (and the torch builder's, "_v1");
- asa_total_per_layer = prober + mask_to_lists_fwd + reorder_amortized, each part timed alone (a launch-bound
  part is timed at its host cost);
- asa_in_stream_per_layer: what a model step pays. `ASA_STREAM_LAYERS` calls of the ASA module itself (prober,
  one-launch selection, pooled global tokens, kernel; the model's defaults for that shape: keep clamps, pool window)
  back to back, minus the same calls given the prober's mask (global tokens + kernel), divided by the layer count.
  The kernels outlast their launches, so the host runs ahead as in a compiled step and the difference is the
  overhead's GPU time plus any launch time the GPU did not hide (the goal: <= 3% Wan, <= 5% CogVideoX).

FLOPs: forward 4*B*H*Lq*Lk*D, forward+backward 3.5x that; "eff." TFLOP/s multiply by the kept block fraction.
Every variant is fail-soft: an error is printed and recorded, the rest still runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {
    # name: ([B, H, L, D], latent grid (F, H, W) of the video tokens, text tokens at the tail, transformer layers)
    "wan": ((1, 12, 32760, 128), (21, 30, 52), 0, 30),
    "cog": ((1, 48, 17776, 64), (13, 30, 45), 226, 42),
    "cog2": ((2, 48, 17776, 64), (13, 30, 45), 226, 42),
}
BLOCK = 128
DEVICE = "cuda"
TIME_BUDGET_S = 280.0


class Bench:
    """Collects rows, prints them as they come, keeps going after failures."""

    def __init__(self, budget_s: float):
        self.rows: list[dict] = []
        self.checks: list[dict] = []
        self.start = time.time()
        self.budget_s = budget_s

    def over_budget(self) -> bool:
        return time.time() - self.start > self.budget_s

    def time_ms(self, fn) -> float:
        import triton

        fn()  # compile / autotune outside the measurement
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))

    def record(self, shape: str, mode: str, density: float, backend: str, fn, flops: float, ref_ms=None) -> None:
        row = dict(shape=shape, mode=mode, density=density, backend=backend)
        if self.over_budget():
            row["error"] = "skipped: time budget exhausted"
            print(f"  [skip] {shape} {mode} {density:.0%} {backend}: time budget exhausted", flush=True)
            self.rows.append(row)
            return
        try:
            ms = self.time_ms(fn)
            row.update(ms=ms, tflops=flops / ms * 1e-9)
            if ref_ms:
                row["speedup_vs_cudnn_dense"] = ref_ms / ms
            print(f"  {shape:5s} {mode:7s} {density:5.0%} {backend:18s} {ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s"
                  + (f"  x{row['speedup_vs_cudnn_dense']:.2f} vs cuDNN dense" if ref_ms else ""), flush=True)
        except Exception as err:  # noqa: BLE001 - fail soft, keep benchmarking
            row["error"] = f"{type(err).__name__}: {err}"
            print(f"  [FAIL] {shape} {mode} {density:.0%} {backend}: {row['error'][:500]}", flush=True)
            traceback.print_exc(limit=3)
        finally:
            torch.cuda.empty_cache()
        self.rows.append(row)

    def check(self, name: str, fn) -> None:
        entry = dict(check=name)
        try:
            entry.update(fn())
            worst = max((v for k, v in entry.items() if k.startswith("rel_")), default=0.0)
            entry["ok"] = bool(worst < 2e-2)
            print(f"  check {name}: " + ", ".join(f"{k}={v:.2e}" for k, v in entry.items() if isinstance(v, float))
                  + ("  OK" if entry["ok"] else "  MISMATCH"), flush=True)
        except Exception as err:  # noqa: BLE001
            entry.update(ok=False, error=f"{type(err).__name__}: {err}")
            print(f"  [FAIL] check {name}: {entry['error'][:500]}", flush=True)
            traceback.print_exc(limit=3)
        self.checks.append(entry)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def random_block_mask(batch: int, heads: int, n_q: int, n_k: int, density: float, device) -> torch.Tensor:
    """Exactly round(density * n_k) random kept kv blocks per query block (at least one)."""
    keep = max(1, round(density * n_k))
    if keep >= n_k:
        return torch.ones(batch, heads, n_q, n_k, dtype=torch.bool, device=device)
    ranks = torch.rand(batch, heads, n_q, n_k, device=device).argsort(-1).argsort(-1)
    return ranks < keep


def sdpa_fn(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def flex_fn():
    try:
        from blade.attention import block_sparse_attention

        return lambda q, k, v, mask, **kw: block_sparse_attention(q, k, v, mask, block_size=BLOCK, backend="flex",
                                                                  **kw)
    except Exception:  # the project's flex backend is missing: a private compiled flex
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)

        def run(q, k, v, mask, **kw):
            if kw:
                raise NotImplementedError("private flex fallback has no global tokens")
            num = mask.sum(-1, dtype=torch.int32)
            idx = torch.argsort(mask.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
            bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=BLOCK, seq_lengths=(q.shape[2], k.shape[2]))
            return compiled(q, k, v, block_mask=bm)

        return run


def bsa_fn():
    """Block-sparse attention through the project's `bsa` adapter, or None when the library is not importable."""
    try:
        import block_sparse_attn  # noqa: F401
    except ImportError:
        print("  [skip] bsa: mit-han-lab Block-Sparse-Attention is not built (benchmarks/build_bsa.sh)", flush=True)
        return None
    from blade.attention import block_sparse_attention

    return lambda q, k, v, mask, **kw: block_sparse_attention(q, k, v, mask, block_size=BLOCK, backend="bsa", **kw)


def ours_fn(config_set: str | None = None):
    """Our kernel; with `config_set` ("v1", ...) the whole call (forward, and backward inside `fwd_bwd`) uses it."""
    from blade.attention.kernels import triton_bsa

    def run(q, k, v, mask, **kw):
        return triton_bsa.triton_block_sparse_attention(q, k, v, mask, block_size=BLOCK, **kw)

    if config_set is None:
        return run

    def run_with_set(q, k, v, mask, **kw):
        with triton_bsa.config_set(config_set):
            return run(q, k, v, mask, **kw)

    return run_with_set


def fwd_bwd(attn, q, k, v, do, *args, config_set: str | None = None, **kw):
    """A closure running forward + backward (autograd.grad: no .grad accumulation between runs)."""
    import contextlib

    leaves = [q, k, v] + [t for t in kw.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def run():
        scope = contextlib.nullcontext()
        if config_set is not None:
            from blade.attention.kernels import triton_bsa

            scope = triton_bsa.config_set(config_set)
        with scope:
            return torch.autograd.grad(attn(q, k, v, *args, **kw), leaves, do)

    return run


def run_shape(bench: Bench, name: str, densities: list[float], with_bwd: bool, extra_sets=()) -> None:
    (batch, heads, seq, head_dim), grid, n_text, n_layers = SHAPES[name]
    dev = DEVICE
    print(f"\n## {name} [{batch}, {heads}, {seq}, {head_dim}] bf16", flush=True)
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(3))
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    do = torch.randn_like(q)
    n_blocks = math.ceil(seq / BLOCK)
    dense_flops = 4.0 * batch * heads * seq * seq * head_dim
    cudnn, fa2, flex, ours = sdpa_fn("CUDNN_ATTENTION"), sdpa_fn("FLASH_ATTENTION"), flex_fn(), ours_fn()
    ours_v1 = ours_fn("v1")
    full = torch.ones(1, 1, n_blocks, n_blocks, dtype=torch.bool, device=dev)
    mask20 = random_block_mask(batch, heads, n_blocks, n_blocks, 0.2, dev)

    # Correctness first: a wrong kernel's timings are worthless.
    def check_dense():
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q, k, v)
            out = ours(q, k, v, full)
        return dict(rel_out=rel_err(out, ref), max_abs=float((out.float() - ref.float()).abs().max()))

    def check_flex20(attn=ours):  # `attn` against flex at 20% kept, forward (+ backward)
        out = attn(qg, kg, vg, mask20)
        ref = flex(qg, kg, vg, mask20)
        grads = torch.autograd.grad(out, (qg, kg, vg), do) if with_bwd else ()
        ref_grads = torch.autograd.grad(ref, (qg, kg, vg), do) if with_bwd else ()
        res = dict(rel_out=rel_err(out, ref))
        for gname, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
            res[f"rel_{gname}"] = rel_err(a, b)
        return res

    def check_flex20_global():
        n_global = seq // BLOCK
        gk, gv = (torch.randn(batch, heads, n_global, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(2))
        bias = torch.full((n_global,), math.log(BLOCK), device=dev)
        with torch.no_grad():
            out = ours(q, k, v, mask20, global_k=gk, global_v=gv, global_bias=bias)
            ref = flex(q, k, v, mask20, global_k=gk, global_v=gv, global_bias=bias)
        return dict(rel_out=rel_err(out, ref))

    bsa = bsa_fn()  # mit-han-lab's Block-Sparse-Attention (the paper's kernel), when built (benchmarks/build_bsa.sh)

    bench.check(f"{name}: ours vs SDPA at 100%", check_dense)
    if bsa is not None:
        bench.check(f"{name}: bsa (Block-Sparse-Attention) vs flex at 20% (fwd+bwd)", lambda: check_flex20(bsa))
    bench.check(f"{name}: ours vs flex at 20% (fwd+bwd)", check_flex20)
    bench.check(f"{name}: ours vs flex at 20% with {seq // BLOCK} global tokens", check_flex20_global)
    extra_set_of = {f"ours_{cfg}": cfg for cfg in extra_sets}  # row label -> launch-configuration set
    extras = {label: ours_fn(cfg) for label, cfg in extra_set_of.items()}
    for label, fn in extras.items():
        bench.check(f"{name}: {label} vs flex at 20% (fwd+bwd)", lambda fn=fn: check_flex20(fn))

    # Dense baselines.
    ref_fwd = None
    for label, fn in (("cudnn_sdpa", cudnn), ("fa2_sdpa", fa2)):
        with torch.no_grad():
            bench.record(name, "fwd", 1.0, label, lambda fn=fn: fn(q, k, v), dense_flops)
        if label == "cudnn_sdpa" and "ms" in bench.rows[-1]:
            ref_fwd = bench.rows[-1]["ms"]
    ref_bwd = None
    if with_bwd:
        for label, fn in (("cudnn_sdpa", cudnn), ("fa2_sdpa", fa2)):
            bench.record(name, "fwd+bwd", 1.0, label, fwd_bwd(fn, qg, kg, vg, do), 3.5 * dense_flops)
            if label == "cudnn_sdpa" and "ms" in bench.rows[-1]:
                ref_bwd = bench.rows[-1]["ms"]

    # Block-sparse backends.
    from blade.attention import BlockMask
    from blade.attention.kernels.triton_bsa import _forward, kernel_lists

    for density in densities:
        mask = random_block_mask(batch, heads, n_blocks, n_blocks, density, dev)
        kept = float(mask.float().mean())
        with torch.no_grad():
            for label, fn in (("flex", flex), ("ours", ours), ("ours_v1", ours_v1), *extras.items()):
                bench.record(name, "fwd", density, label, lambda fn=fn, mask=mask: fn(q, k, v, mask),
                             kept * dense_flops,
                             ref_fwd)
            lists = kernel_lists(BlockMask.from_dense(mask), batch, heads)
            bench.record(name, "fwd", density, "ours_kernel_only",
                         lambda lists=lists: _forward(q, k, v, *lists, None, None, None, BLOCK, head_dim**-0.5),
                         kept * dense_flops, ref_fwd)
            if bsa is not None:  # through our adapter (layout conversion included), then the kernel alone
                from blade.attention.kernels.bsa import call_bsa, to_bsa_inputs

                bench.record(name, "fwd", density, "bsa", lambda mask=mask: bsa(q, k, v, mask), kept * dense_flops,
                             ref_fwd)
                inputs = to_bsa_inputs(q, k, v, mask)
                bench.record(name, "fwd", density, "bsa_kernel_only", lambda inputs=inputs: call_bsa(inputs),
                             kept * dense_flops, ref_fwd)
        if with_bwd:
            for label, fn, cfg in (("flex", flex, None), ("ours", ours, None), ("ours_v1", ours, "v1"),
                                   ("bsa", bsa, None), *((label, ours, cfg) for label, cfg in extra_set_of.items())):
                if fn is None:
                    continue
                bench.record(name, "fwd+bwd", density, label, fwd_bwd(fn, qg, kg, vg, do, mask, config_set=cfg),
                             3.5 * kept * dense_flops, ref_bwd)
    # Ours with ASA's pooled global tokens (G = L / 128, bias ln 128) at 20%.
    n_global = seq // BLOCK
    gk, gv = (torch.randn(batch, heads, n_global, head_dim, device=dev, dtype=torch.bfloat16) for _ in range(2))
    bias = torch.full((n_global,), math.log(BLOCK), device=dev)
    kept20 = float(mask20.float().mean())
    with torch.no_grad():
        bench.record(name, "fwd", 0.2, f"ours+{n_global}global",
                     lambda: ours(q, k, v, mask20, global_k=gk, global_v=gv, global_bias=bias),
                     (kept20 + n_global / seq) * dense_flops, ref_fwd)

    asa_overhead(bench, name, q, k, v, grid, n_text, n_layers, ref_fwd)
    asa_in_stream(bench, name, q, k, v, n_text, ref_fwd)


ASA_STREAM_LAYERS = 10
SHAPE_MODELS = {"wan": "wan2.1-t2v-1.3b", "cog": "cogvideox-5b", "cog2": "cogvideox-5b"}  # whose ASA defaults


def asa_in_stream(bench: Bench, name: str, q, k, v, n_text: int, ref_fwd, layers: int = ASA_STREAM_LAYERS) -> None:
    """ASA's per-layer overhead as a model step sees it (module docstring): `layers` prober+kernel calls back to
    back against `layers` kernel calls with the prober's mask given; q, k, v ``[B, H, L, D]`` in block order."""
    try:
        from blade.attention import AdaptiveBlockSparseAttention, ASAConfig
        from blade.families import get_model

        config = ASAConfig(**get_model(SHAPE_MODELS[name]).asa_defaults(), dense_tail_tokens=n_text)
        asa = AdaptiveBlockSparseAttention(config)
    except Exception as err:  # noqa: BLE001
        print(f"  [FAIL] ASA in-stream imports: {err!r}", flush=True)
        bench.rows.append(dict(shape=name, mode="overhead", density=0.0, backend="asa_in_stream", error=repr(err)))
        return
    with torch.no_grad():
        mask = asa.estimate_mask(q, k)
        kept = float(mask.kept_blocks(q.shape[0], q.shape[1])) / (q.shape[0] * q.shape[1] * mask.shape[-2]
                                                                   * mask.shape[-1])

        def with_prober():
            for _ in range(layers):
                asa(q, k, v, pre_reordered=True)

        def mask_given():
            for _ in range(layers):
                asa(q, k, v, pre_reordered=True, block_mask=mask)

        print(f"  {name}: ASA in stream ({config.max_keep=}, {config.pool_size=}, kept {kept:.3f}), {layers} "
              "layers back to back", flush=True)
        bench.record(name, "overhead", kept, "asa_stream_prober+kernel", with_prober, 0.0)
        bench.record(name, "overhead", kept, "asa_stream_kernel_only", mask_given, 0.0)
    full, bare = bench.rows[-2], bench.rows[-1]
    if "ms" in full and "ms" in bare:
        row = dict(shape=name, mode="overhead", density=0.0, backend="asa_in_stream_per_layer",
                   ms=(full["ms"] - bare["ms"]) / layers, tflops=0.0, layers=layers, kept=kept,
                   max_keep=config.max_keep, pool_size=config.pool_size)
        bench.rows.append(row)
        print(f"  {name:5s} overhead asa_in_stream_per_layer {row['ms']:9.3f} ms", flush=True)
        _add_pct(row, ref_fwd)


def asa_overhead(bench: Bench, name: str, q, k, v, grid, n_text: int, n_layers: int, ref_fwd) -> None:
    """Prober, Gilbert reorder (per layer / amortized) and mask -> kernel lists, as ms and % of dense cuDNN fwd."""
    try:
        from blade.attention import BlockMask, estimate_block_mask, gilbert_permutation
        from blade.attention.block_mask import dense_to_lists
        from blade.attention.kernels import triton_bsa
    except Exception as err:  # noqa: BLE001
        print(f"  [FAIL] ASA overhead imports: {err!r}", flush=True)
        bench.rows.append(dict(shape=name, mode="overhead", density=0.0, backend="imports", error=repr(err)))
        return
    batch, heads, seq, head_dim = q.shape
    perm = gilbert_permutation(*grid).to(q.device)
    n_video = perm.numel()
    index = torch.cat([perm, torch.arange(n_video, n_video + n_text, device=q.device)])
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.numel(), device=q.device)
    # The model's hidden states [B, L, H*D] between blocks: what the adapters permute once per forward.
    hidden = torch.randn(batch, seq, heads * head_dim, device=q.device, dtype=q.dtype)

    def reorder_per_layer():  # q, k, v into curve order and the output back, in every layer
        qr, kr, vr = (t.index_select(2, index) for t in (q, k, v))
        return qr.index_select(2, inverse), kr, vr

    def reorder_per_forward():  # hidden states into curve order before the first block and back after the last
        return hidden.index_select(1, index).index_select(1, inverse)

    def prober():
        return estimate_block_mask(q, k, block_size=BLOCK, dense_tail_tokens=n_text)

    def prober_torch():
        return estimate_block_mask(q, k, block_size=BLOCK, dense_tail_tokens=n_text, backend="torch")

    def check_prober():
        gen = lambda: torch.Generator(device=q.device).manual_seed(0)  # noqa: E731
        fused = estimate_block_mask(q, k, block_size=BLOCK, generator=gen())
        ref = estimate_block_mask(q, k, block_size=BLOCK, generator=gen(), backend="torch")
        differ = float((fused != ref).float().mean())
        # bf16 scores with fp32 accumulation in both paths: only near-ties at the threshold may flip.
        return dict(rel_mask_entries_differing=differ, kept_fused=float(fused.float().mean()),
                    kept_torch=float(ref.float().mean()))

    bench.check(f"{name}: fused prober mask vs torch prober mask", check_prober)
    if PROFILE_PROBER:
        profile_ops(f"{name}: prober (fused)", prober)
    mask = prober()
    print(f"  prober mask kept fraction: {float(mask.float().mean()):.3f}", flush=True)

    def lists_fwd():
        return triton_bsa.kernel_lists(BlockMask.from_dense(mask), batch, heads)

    def lists_bwd():
        return lists_fwd(), triton_bsa.kernel_lists(BlockMask.from_dense(mask.transpose(-1, -2)), batch, heads)

    def lists_fwd_v1():
        return dense_to_lists(mask)

    def lists_bwd_v1():
        return dense_to_lists(mask), dense_to_lists(mask.transpose(-1, -2))

    measured = {}
    with torch.no_grad():
        for label, fn, per in (("prober", prober, 1), ("prober_torch", prober_torch, 1),
                               ("reorder_per_layer", reorder_per_layer, 1),
                               ("reorder_amortized", reorder_per_forward, n_layers),
                               ("mask_to_lists_fwd", lists_fwd, 1), ("mask_to_lists_fwd+bwd", lists_bwd, 1),
                               ("mask_to_lists_fwd_v1", lists_fwd_v1, 1),
                               ("mask_to_lists_fwd+bwd_v1", lists_bwd_v1, 1)):
            bench.record(name, "overhead", 0.0, label, fn, 0.0)
            row = bench.rows[-1]
            if "ms" not in row:
                continue
            if per > 1:
                row.update(ms_per_forward=row["ms"], ms=row["ms"] / per, amortized_over_layers=per)
                print(f"    -> {row['ms_per_forward']:.3f} ms per transformer forward / {per} layers", flush=True)
            measured[label] = row["ms"]
            _add_pct(row, ref_fwd)
    parts = ("prober", "mask_to_lists_fwd", "reorder_amortized")
    if all(p in measured for p in parts):
        total = dict(shape=name, mode="overhead", density=0.0, backend="asa_total_per_layer",
                     ms=sum(measured[p] for p in parts), tflops=0.0, parts=list(parts))
        bench.rows.append(total)
        print(f"  {name:5s} overhead asa_total_per_layer {total['ms']:9.3f} ms (= {' + '.join(parts)})", flush=True)
        _add_pct(total, ref_fwd)


PROFILE_PROBER = False  # --profile: where the prober's time goes, per CUDA kernel and CPU op


def profile_ops(label: str, fn, repeats: int = 20) -> None:
    """Print the torch.profiler table of `repeats` calls of `fn` (after a warm-up), sorted by device time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    print(f"\n  profile of {label}, {repeats} calls:", flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)


def _add_pct(row: dict, ref_fwd) -> None:
    if ref_fwd:
        row["pct_of_cudnn_dense_fwd"] = 100.0 * row["ms"] / ref_fwd
        print(f"    -> {row['pct_of_cudnn_dense_fwd']:.2f}% of the dense cuDNN forward", flush=True)


def markdown(bench: Bench) -> str:
    lines = ["| shape | mode | kept | backend | ms | TFLOP/s (eff.) | vs cuDNN dense |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in bench.rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['mode']} | {r.get('density', 0):.0%} | {r.get('backend', '')} | "
                         f"error: {r['error'][:80]} | | |")
            continue
        extra = f"{r['speedup_vs_cudnn_dense']:.2f}x" if "speedup_vs_cudnn_dense" in r else ""
        if "pct_of_cudnn_dense_fwd" in r:
            extra = f"{r['pct_of_cudnn_dense_fwd']:.2f}% of fwd"
        tf = f"{r['tflops']:.0f}" if r["tflops"] else ""
        lines.append(f"| {r['shape']} | {r['mode']} | {r['density']:.0%} | {r['backend']} | {r['ms']:.3f} | {tf} | "
                     f"{extra} |")
    return "\n".join(lines)


def tuned_configs() -> dict:
    """The configs the autotuner picked (for the report)."""
    try:
        from blade.attention.kernels import triton_bsa

        return {f"{k[0]}/bs{k[1]}": str(getattr(t, "best_config", None)) for k, t in triton_bsa._TUNED.items()}
    except Exception as err:  # noqa: BLE001
        return {"error": repr(err)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES), help="default: all")
    parser.add_argument("--densities", nargs="+", type=float, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer points: wan + cog, kept 10%% and 50%%")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--overhead_only", action="store_true",
                        help="only the checks, the dense baselines and the ASA overhead rows (no sparse kernel sweep)")
    parser.add_argument("--budget-s", type=float, default=TIME_BUDGET_S, help="stop timing new points after this")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of the prober")
    parser.add_argument("--extra_sets", nargs="*", default=[], choices=["v2", "tma", "tma_ws"],
                        help="also time our kernel with these launch-configuration sets (rows ours_<set>)")
    args = parser.parse_args()
    global PROFILE_PROBER
    PROFILE_PROBER = args.profile

    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU")
    shapes = args.shapes or (["wan", "cog"] if args.quick else list(SHAPES))
    densities = args.densities or ([0.1, 0.5] if args.quick else [0.05, 0.1, 0.2, 0.5, 1.0])
    if args.overhead_only:
        densities, args.no_backward = [], True
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    bench = Bench(args.budget_s)
    for name in shapes:
        try:
            run_shape(bench, name, densities, with_bwd=not args.no_backward, extra_sets=args.extra_sets)
        except Exception as err:  # noqa: BLE001
            print(f"[FAIL] shape {name}: {err!r}", flush=True)
            traceback.print_exc()
            bench.rows.append(dict(shape=name, mode="all", density=0.0, backend="", error=repr(err)))
        torch.cuda.empty_cache()

    print("\n" + markdown(bench))
    configs = tuned_configs()
    print("\nautotuned configs:", json.dumps(configs, indent=1))
    from blade.attention.kernels import triton_bsa

    tma_failed = dict(triton_bsa._TMA_FAILED)  # a set listed here timed the pointer kernel (its fallback)
    if tma_failed:
        print("TMA forward fell back to the pointer kernel for:", json.dumps(tma_failed, indent=1))
    failed = [c["check"] for c in bench.checks if not c.get("ok")]
    print(f"\ncorrectness checks: {len(bench.checks) - len(failed)}/{len(bench.checks)} OK" +
          (f"; FAILED: {failed}" if failed else ""))
    print(f"total wall time: {time.time() - bench.start:.1f} s")
    if args.out:
        payload = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       rows=bench.rows, checks=bench.checks, autotuned=configs,
                       tma_failed=tma_failed)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
