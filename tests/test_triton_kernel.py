"""Triton block-sparse attention kernel vs a float64 dense masked reference.

On a CPU-only machine the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set before triton is
imported). Tests marked `gpu` run the real kernel at full size on the accelerator (`pytest -m gpu`).
"""

import importlib
import math
import os

import pytest
import torch

_ON_CUDA = torch.cuda.is_available()
if not _ON_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="triton is not importable")

from blade.attention.block_mask import BlockMask, dense_to_lists  # noqa: E402
from blade.attention.kernels import triton_bsa  # noqa: E402

if not _ON_CUDA and not triton_bsa._interpreting():
    # Another module imported the kernels before TRITON_INTERPRET was set: rebuild them in interpreter mode.
    triton_bsa = importlib.reload(triton_bsa)
if not _ON_CUDA and not triton_bsa._interpreting():
    pytest.skip("the Triton interpreter could not be enabled", allow_module_level=True)

DEVICE = "cuda" if _ON_CUDA else "cpu"


def dense_reference(q, k, v, block_mask, block_size, scale=None, global_k=None, global_v=None, global_bias=None):
    """Float64 masked attention with an explicit token mask: [B, H, Lq, D]. Differentiable."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    token_mask = block_mask.expand(batch, heads, -1, -1)
    token_mask = token_mask.repeat_interleave(block_size, 2).repeat_interleave(block_size, 3)[:, :, :q_len, :k_len]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~token_mask, float("-inf"))
    values = v
    if global_k is not None:
        g_scores = q @ global_k.double().transpose(-1, -2) * scale
        if global_bias is not None:
            g_scores = g_scores + global_bias.double()
        scores = torch.cat([scores, g_scores], dim=-1)
        values = torch.cat([v, global_v.double()], dim=2)
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    denom = weights.sum(-1, keepdim=True)
    probs = weights / torch.where(denom == 0, torch.ones_like(denom), denom)
    return probs @ values


def _random_case(batch, heads, q_len, k_len, head_dim, block_size, num_global, with_bias, mask_batch, mask_heads,
                 keep, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)
    q, k, v = rand(batch, heads, q_len, head_dim), rand(batch, heads, k_len, head_dim), rand(batch, heads, k_len,
                                                                                                   head_dim)
    n_q, n_k = math.ceil(q_len / block_size), math.ceil(k_len / block_size)
    mask = (torch.rand(mask_batch, mask_heads, n_q, n_k, generator=gen) < keep).to(DEVICE)
    globals_ = {}
    if num_global:
        globals_ = dict(global_k=rand(batch, heads, num_global, head_dim), global_v=rand(batch, heads, num_global,
                                                                                      head_dim))
        if with_bias:
            globals_["global_bias"] = torch.rand(num_global, generator=gen).to(DEVICE) * 2.0
    return q, k, v, mask, globals_


def _tolerance(dtype):
    if dtype == torch.float32:
        return 2e-3 if _ON_CUDA else 1e-5  # tf32 on the GPU, exact fp32 in the interpreter
    return 3e-2


def _assert_close(actual, expected, tol, what):
    err = (actual.double() - expected).abs().max().item()
    ref = expected.abs().max().item() + 1e-12
    assert err <= tol * max(ref, 1.0), f"{what}: max abs err {err:.3e} (ref max {ref:.3e})"


# (B, H, Lq, Lk, D, block, G, bias, mask B, mask H, keep, seed)
CASES = {
    "ragged_perhead": (2, 2, 170, 170, 32, 32, 0, False, 2, 2, 0.4, 0),
    "lq_ne_lk_global_bias_bcast_batch": (2, 2, 90, 120, 16, 16, 5, True, 1, 2, 0.35, 1),
    "subtiles_block128_two_global_tiles": (2, 2, 260, 260, 64, 128, 70, True, 2, 1, 0.5, 2),
    "even_lengths": (2, 2, 256, 192, 64, 64, 0, False, 2, 2, 0.5, 3),
}


@pytest.mark.parametrize("config", ["tma_ws", "v2"])  # the default (TMA forward) and the pointer forward
@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_float64_reference(name, config, monkeypatch):
    calls = []
    original = triton_bsa._forward_tma
    monkeypatch.setattr(triton_bsa, "_forward_tma", lambda *a: calls.append(1) or original(*a))
    q, k, v, mask, globals_ = _random_case(*CASES[name])
    block_size = CASES[name][5]
    if name == "ragged_perhead":
        mask[0, 1, 2, :] = False  # a query block that sees nothing: zeros, zero grads, no NaN
    leaves = [q, k, v] + [globals_[n] for n in ("global_k", "global_v") if n in globals_]
    for t in leaves:
        t.requires_grad_(True)

    with triton_bsa.config_set(config):
        out = triton_bsa.triton_block_sparse_attention(q, k, v, mask, block_size=block_size, **globals_)
    assert bool(calls) == (config == "tma_ws")  # the set's own forward ran (tensors aligned: no fallback)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ref_globals = dict(globals_)
    if "global_k" in globals_:
        ref_globals.update(global_k=ref_leaves[3], global_v=ref_leaves[4])
    ref = dense_reference(*ref_leaves[:3], mask, block_size, **ref_globals)

    tol = _tolerance(q.dtype)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    _assert_close(out, ref, tol, "out")
    if name == "ragged_perhead":
        assert torch.equal(out[0, 1, 2 * block_size : 3 * block_size], torch.zeros_like(out[0, 1, :block_size]))

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    names = ["dq", "dk", "dv", "dglobal_k", "dglobal_v"]
    for grad, ref_grad, what in zip(grads, ref_grads, names):
        assert torch.isfinite(grad).all(), what
        _assert_close(grad, ref_grad, 5 * tol, what)


def test_only_global_tokens_and_scale():
    """A head whose mask is all False still sees the global tokens; a custom scale is honoured."""
    q, k, v, mask, globals_ = _random_case(1, 2, 100, 130, 32, 32, 3, False, 1, 2, 0.5, 4)
    mask[0, 0] = False
    out = triton_bsa.triton_block_sparse_attention(q, k, v, mask, block_size=32, scale=0.3, **globals_)
    ref = dense_reference(q, k, v, mask, 32, scale=0.3, **globals_)
    _assert_close(out, ref, _tolerance(q.dtype), "out")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(dtype):
    q, k, v, mask, globals_ = _random_case(2, 2, 130, 130, 32, 32, 4, True, 2, 2, 0.5, 5, dtype=dtype)
    out = triton_bsa.triton_block_sparse_attention(q, k, v, mask, block_size=32, **globals_)
    assert out.dtype == dtype
    _assert_close(out, dense_reference(q, k, v, mask, 32, **globals_), 2e-2, f"out {dtype}")


def test_kv_block_index_lists_kept_blocks_in_order():
    mask = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(6)) < 0.4
    counts, index, order = triton_bsa.kernel_lists(BlockMask.from_dense(mask), 2, 3)
    rows = mask.reshape(-1, 7)
    for r in range(rows.shape[0]):
        kept = torch.nonzero(rows[r]).flatten().tolist()
        assert counts[r].item() == len(kept)
        assert index[r, : len(kept)].tolist() == kept
    assert sorted(order.tolist()) == list(range(rows.shape[0]))
    # Launch order: whole heads (rows of one head contiguous, in order), heads by decreasing kept-block total.
    by_head = order.long().view(6, 5)
    assert bool((by_head - by_head[:, :1] == torch.arange(5)).all()) and bool((by_head[:, 0] % 5 == 0).all())
    head_totals = mask.reshape(6, -1).sum(-1)[by_head[:, 0] // 5]
    assert bool((head_totals[:-1] >= head_totals[1:]).all())


def _lists_by_hand(mask):
    """Kept columns of every row of a [B, H, R, C] mask, then the dropped ones, both increasing (python loops)."""
    rows = mask.reshape(-1, mask.shape[-1]).cpu().tolist()
    counts = [sum(r) for r in rows]
    index = [[c for c, x in enumerate(r) if x] + [c for c, x in enumerate(r) if not x] for r in rows]
    return counts, index


@pytest.mark.parametrize("view", ["plain", "transposed", "broadcast_batch", "broadcast_head_transposed"])
def test_triton_list_builder_matches_hand_lists_on_any_strides(view):
    base = torch.rand(2, 3, 5, 9, generator=torch.Generator().manual_seed(8)) < 0.4
    base[0, 0, 0] = False  # an empty row
    base[1, 2, 4] = True  # a full row
    mask = {
        "plain": base,
        "transposed": base.transpose(-1, -2),
        "broadcast_batch": base[:1].expand(2, 3, 5, 9),
        "broadcast_head_transposed": base[:, :1].expand(2, 3, 5, 9).transpose(-1, -2),
    }[view].to(DEVICE)
    counts, index, order = triton_bsa.kernel_lists(BlockMask.from_dense(mask), *mask.shape[:2])  # Triton builder
    want_counts, want_index = _lists_by_hand(mask)
    assert counts.tolist() == want_counts and index.tolist() == want_index
    ref_counts, ref_index = dense_to_lists(mask)  # the torch builder
    ref_order = triton_bsa.launch_order(ref_counts.flatten(), mask.shape[-2])
    assert torch.equal(order, ref_order) and torch.equal(index, ref_index.flatten(0, 2))
    assert torch.equal(counts, ref_counts.flatten())


def test_config_sets_switch_and_restore():
    mask = torch.rand(1, 2, 3, 4, generator=torch.Generator().manual_seed(9)) < 0.5
    default = triton_bsa._ACTIVE[0]  # "tma_ws", or the set BLADE_BSA_CONFIG_SET names for the process
    assert triton_bsa.DEFAULT_CONFIG_SET == "tma_ws"
    assert default == (os.environ.get("BLADE_BSA_CONFIG_SET") or "tma_ws")
    with triton_bsa.config_set("v1"):
        assert triton_bsa._ACTIVE[0] == "v1"
        v1_lists = triton_bsa.kernel_lists(BlockMask.from_dense(mask.to(DEVICE)), 1, 2)
    assert triton_bsa._ACTIVE[0] == default
    for a, b in zip(v1_lists, triton_bsa.kernel_lists(BlockMask.from_dense(mask.to(DEVICE)), 1, 2)):
        assert torch.equal(a, b)
    # v2 only adds configs: whatever v1 could pick, v2 can too.
    for kernel in ("fwd", "dq", "dkdv"):
        assert set(triton_bsa._CONFIG_SETS["v1"][kernel]) <= set(triton_bsa._CONFIG_SETS["v2"][kernel])
    with pytest.raises(ValueError, match="unknown config set"):
        with triton_bsa.config_set("v9"):
            pass


@pytest.mark.parametrize("value, expected", [("v2", "v2"), ("", "tma_ws"), ("v9", None)])
def test_the_process_default_set_comes_from_the_environment(value, expected):
    """BLADE_BSA_CONFIG_SET picks the default set at import (e.g. v2's pointer forward everywhere); an
    unknown name stops the import with a message naming the known sets."""
    import subprocess
    import sys

    env = {**os.environ, "BLADE_BSA_CONFIG_SET": value, "TRITON_INTERPRET": "1"}
    code = "from blade.attention.kernels import triton_bsa; print(triton_bsa._ACTIVE[0])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if expected is None:
        assert result.returncode != 0 and "BLADE_BSA_CONFIG_SET='v9'" in result.stderr and "tma_ws" in result.stderr
    else:
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip().splitlines()[-1] == expected


def test_unsupported_configurations_raise_value_error():
    q = torch.randn(1, 1, 64, 48, device=DEVICE)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        triton_bsa.triton_block_sparse_attention(q, q, q, mask, block_size=32)
    q = torch.randn(1, 1, 64, 32, device=DEVICE)
    with pytest.raises(ValueError, match="block_mask"):
        triton_bsa.triton_block_sparse_attention(q, q, q, mask[..., :1], block_size=32)
    with pytest.raises(ValueError, match="together"):
        triton_bsa.triton_block_sparse_attention(q, q, q, mask, block_size=32, global_k=q[:, :, :2])
    with pytest.raises(ValueError, match="block_size"):
        triton_bsa.triton_block_sparse_attention(q, q, q, mask, block_size=24)


# ---------------------------------------------------------------------------------------------------------------
# Full size, on the accelerator
# ---------------------------------------------------------------------------------------------------------------


def _sampled_rows_reference(q, k, v, mask, block_size, q_blocks, global_k=None, global_v=None, global_bias=None):
    """fp32 reference for a few query blocks only (full-size shapes would not fit a dense float64 pass)."""
    rows = torch.cat([torch.arange(b * block_size, min((b + 1) * block_size, q.shape[2])) for b in q_blocks])
    sub_mask = mask[:, :, q_blocks]
    out = dense_reference(q[:, :, rows].float(), k.float(), v.float(), sub_mask, block_size,
                          global_k=global_k, global_v=global_v, global_bias=global_bias)
    return rows, out


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 12, 32760, 128), (2, 48, 17776, 64)])
def test_gpu_full_size_forward_bf16(shape):
    batch, heads, seq, head_dim = shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    n = math.ceil(seq / 128)
    mask = torch.rand(batch, heads, n, n, device="cuda") < 0.2
    gk, gv = (torch.randn(batch, heads, 256, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bias = torch.full((256,), math.log(128.0), device="cuda")
    out = triton_bsa.triton_block_sparse_attention(q, k, v, mask, global_k=gk, global_v=gv, global_bias=bias)
    q_blocks = [0, 7, n // 2, n - 1]
    rows, ref = _sampled_rows_reference(q, k, v, mask, 128, q_blocks, gk, gv, bias)
    _assert_close(out[:, :, rows], ref, 2e-2, "out")

    dense = torch.ones(1, 1, n, n, dtype=torch.bool, device="cuda")
    out = triton_bsa.triton_block_sparse_attention(q, k, v, dense)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    _assert_close(out, sdpa.double(), 2e-2, "dense vs sdpa")


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_gradients_bf16(head_dim):
    shape = (1, 4, 4096 + 77, head_dim)
    torch.manual_seed(1)
    leaves = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    gk, gv = (torch.randn(1, 4, 40, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
              for _ in range(2))
    bias = torch.rand(40, device="cuda")
    n = math.ceil(shape[2] / 128)
    mask = torch.rand(1, 4, n, n, device="cuda") < 0.3
    out = triton_bsa.triton_block_sparse_attention(*leaves, mask, global_k=gk, global_v=gv, global_bias=bias)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves + [gk, gv], grad_out)
    ref_leaves = [t.detach().float().requires_grad_(True) for t in leaves + [gk, gv]]
    ref = dense_reference(*ref_leaves[:3], mask, 128, global_k=ref_leaves[3], global_v=ref_leaves[4],
                          global_bias=bias)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    _assert_close(out, ref, 2e-2, "out")
    for grad, ref_grad, what in zip(grads, ref_grads, ["dq", "dk", "dv", "dgk", "dgv"]):
        _assert_close(grad, ref_grad, 3e-2, what)


@pytest.mark.parametrize("name", ["ragged_perhead", "lq_ne_lk_global_bias_bcast_batch",
                                  "subtiles_block128_two_global_tiles"])
@pytest.mark.parametrize("layout", ["contiguous", "diffusers_view"])
def test_tma_forward_matches_float64_reference_and_the_pointer_kernel(name, layout, monkeypatch):
    """The "tma" config set reads q, k, v and the global tokens through tensor descriptors (zero rows past the end,
    masked scores): same float64-reference accuracy, and the same output and LSE as the pointer kernel, on a
    contiguous [B, H, L, D] and on the [B, L, H, D].transpose(1, 2) view the attention processors pass."""
    q, k, v, mask, globals_ = _random_case(*CASES[name])
    block_size = CASES[name][5]
    if layout == "diffusers_view":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    calls = []
    original = triton_bsa._forward_tma
    monkeypatch.setattr(triton_bsa, "_forward_tma", lambda *a: calls.append(1) or original(*a))
    with triton_bsa.config_set("tma"):
        out = triton_bsa.triton_block_sparse_attention(q, k, v, mask, block_size=block_size, **globals_)
    assert calls and "tma" not in triton_bsa._TMA_FAILED  # the descriptor kernel ran, no fallback
    ref = dense_reference(q, k, v, mask, block_size, **globals_)
    _assert_close(out, ref, _tolerance(q.dtype), "out")
    tma_calls = len(calls)
    with triton_bsa.config_set("v2"):  # the pointer kernel (the default set reads through descriptors too)
        pointer = triton_bsa.triton_block_sparse_attention(q, k, v, mask, block_size=block_size, **globals_)
    assert len(calls) == tma_calls
    torch.testing.assert_close(out, pointer, rtol=0, atol=1e-6)


def test_tma_forward_falls_back_to_pointers_on_misaligned_tensors(monkeypatch):
    """A base address off TMA's 16-byte rule (a storage offset of one element) takes the pointer kernel, right."""
    q, k, v, mask, globals_ = _random_case(*CASES["even_lengths"])
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype, device=q.device)[1:].view(q.shape)
    shifted.copy_(q)
    assert not triton_bsa._tma_ready(shifted, k, v) and triton_bsa._tma_ready(q, k, v)
    monkeypatch.setattr(triton_bsa, "_forward_tma", lambda *a: pytest.fail("the TMA path took a misaligned q"))
    with triton_bsa.config_set("tma"):
        out = triton_bsa.triton_block_sparse_attention(shifted, k, v, mask, block_size=CASES["even_lengths"][5])
    _assert_close(out, dense_reference(q, k, v, mask, CASES["even_lengths"][5]), _tolerance(q.dtype), "out")


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["tma", "tma_ws"])
@pytest.mark.parametrize("shape", [(1, 12, 32760, 128), (2, 48, 17776, 64)])
def test_gpu_tma_forward_full_size_bf16(shape, config):
    """The descriptor (TMA) forward at full size, with global tokens and a ragged tail, against fp32 rows and the
    pointer kernel. "tma" must run without falling back; "tma_ws" (Triton's warp specialization, experimental on
    Hopper) is skipped, with the compiler's error, when it does not compile here."""
    batch, heads, seq, head_dim = shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))
    n = math.ceil(seq / 128)
    mask = torch.rand(batch, heads, n, n, device="cuda") < 0.2
    gk, gv = (torch.randn(batch, heads, 256, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    bias = torch.full((256,), math.log(128.0), device="cuda")
    with triton_bsa.config_set(config):
        out = triton_bsa.triton_block_sparse_attention(q, k, v, mask, global_k=gk, global_v=gv, global_bias=bias)
    if config in triton_bsa._TMA_FAILED:
        assert config == "tma_ws", triton_bsa._TMA_FAILED[config]
        pytest.skip(f"warp specialization does not compile here: {triton_bsa._TMA_FAILED[config][:300]}")
    q_blocks = [0, 7, n // 2, n - 1]
    rows, ref = _sampled_rows_reference(q, k, v, mask, 128, q_blocks, gk, gv, bias)
    _assert_close(out[:, :, rows], ref, 2e-2, "out")
    with triton_bsa.config_set("v2"):  # the pointer kernel (the default set reads through descriptors too)
        pointer = triton_bsa.triton_block_sparse_attention(q, k, v, mask, global_k=gk, global_v=gv, global_bias=bias)
    _assert_close(out, pointer.double(), 1e-2, "tma vs pointer kernel")


def test_tma_pre_hook_sizes_the_launchs_own_descriptors():
    """The autotuner is cached per config set and keeps the pre-hook of its first launch, so the hook must size the
    descriptors it is handed (this launch's, by argument name), not ones captured earlier: q gets BLOCK_M rows, the
    others BLOCK_N, every block [1, 1, rows, D]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    def descs():
        t = torch.zeros(1, 2, 64, 32)
        return {name: TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, 32])
                for name in ("desc_q", "desc_k", "desc_v", "desc_gk", "desc_gv")}

    first, second = descs(), descs()
    triton_bsa._tma_block_shapes({**second, "BLOCK_M": 64, "BLOCK_N": 32, "HEAD_DIM": 32})
    assert [list(d.block_shape) for d in second.values()] == [[1, 1, 64, 32]] + [[1, 1, 32, 32]] * 4
    assert all(list(d.block_shape) == [1, 1, 16, 32] for d in first.values())
