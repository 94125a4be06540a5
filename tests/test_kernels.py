"""Block-sparse attention backends against an independent float64 dense masked attention."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from blade.attention import block_sparse_attention
from blade.attention.kernels.bsa import BSA_BLOCK_SIZE, bsa_block_sparse_attention, from_bsa_output, to_bsa_inputs


def dense_masked_attention(q, k, v, token_mask, extra_k=None, extra_v=None, extra_bias=None, scale=None):
    """float64 attention with an explicit token mask [B|1, H|1, Lq, Lk]; extra tokens are always visible."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    mask = token_mask.expand(scores.shape)
    if extra_k is not None:
        extra = q @ extra_k.double().transpose(-1, -2) * scale
        if extra_bias is not None:
            extra = extra + extra_bias.double()
        scores = torch.cat([scores, extra], dim=-1)
        mask = torch.cat([mask, torch.ones_like(extra, dtype=torch.bool)], dim=-1)
        v = torch.cat([v, extra_v.double()], dim=-2)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # all-masked rows -> zeros
    return probs @ v


def token_mask_from_blocks(block_mask, block_size, q_len, k_len):
    """Explicit loop-free expansion written independently of the library: token i sees token j iff its block pair."""
    qb = torch.arange(q_len) // block_size
    kb = torch.arange(k_len) // block_size
    return block_mask[:, :, qb][:, :, :, kb]


def random_inputs(b, h, lq, lk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, h, lk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, h, lk, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def random_block_mask(b, h, nq, nk, p=0.4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, nq, nk, generator=g) < p


EXACT_BACKENDS = ["reference", "gather"]  # plain-torch backends held to float64 tolerances

CASES = [
    # (B, H, Lq, Lk, D, block)
    (2, 2, 200, 200, 64, 64),
    (1, 3, 333, 333, 64, 128),
    (2, 1, 384, 384, 128, 128),
    (1, 2, 333, 200, 64, 64),  # Lq != Lk, ragged
    (1, 2, 130, 384, 128, 64),
]


@pytest.mark.parametrize("b,h,lq,lk,d,bs", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_reference_matches_dense(backend, b, h, lq, lk, d, bs, dtype):
    q, k, v = random_inputs(b, h, lq, lk, d, dtype)
    nq, nk = math.ceil(lq / bs), math.ceil(lk / bs)
    mask = random_block_mask(b, h, nq, nk)
    mask[0, 0, 0] = False  # an empty query block -> zero rows
    out = block_sparse_attention(q, k, v, mask, block_size=bs, backend=backend)
    expected = dense_masked_attention(q, k, v, token_mask_from_blocks(mask, bs, lq, lk))
    assert out.dtype == dtype and out.shape == (b, h, lq, d)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, 0, : min(bs, lq)], torch.zeros_like(out[0, 0, : min(bs, lq)]))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)


def test_gather_chunking_is_exact(monkeypatch):
    from blade.attention.kernels import gather

    q, k, v = random_inputs(1, 2, 333, 333, 64, torch.float64)
    mask = random_block_mask(1, 2, 6, 6)
    many = gather.gather_block_sparse_attention(q, k, v, mask, block_size=64)
    monkeypatch.setattr(gather, "_CHUNK_ELEMENTS", 1)  # one query block per chunk
    one = gather.gather_block_sparse_attention(q, k, v, mask, block_size=64)
    torch.testing.assert_close(one, many, atol=1e-13, rtol=0)


def test_reference_chunking_is_exact():
    q, k, v = random_inputs(1, 2, 333, 333, 64, torch.float64)
    mask = random_block_mask(1, 2, 6, 6)
    from blade.attention.kernels.reference import reference_block_sparse_attention

    one = reference_block_sparse_attention(q, k, v, mask, block_size=64, chunk_blocks=1)
    many = reference_block_sparse_attention(q, k, v, mask, block_size=64, chunk_blocks=100)
    torch.testing.assert_close(one, many, atol=1e-13, rtol=0)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_broadcast_mask_and_per_head_masks(backend):
    q, k, v = random_inputs(2, 3, 200, 200, 32, torch.float64)
    shared = random_block_mask(1, 1, 4, 4, seed=3)
    out = block_sparse_attention(q, k, v, shared, block_size=64, backend=backend)
    full = block_sparse_attention(q, k, v, shared.expand(2, 3, 4, 4), block_size=64, backend=backend)
    torch.testing.assert_close(out, full, atol=0, rtol=0)
    per_head = random_block_mask(1, 3, 4, 4, seed=4)
    assert not torch.equal(per_head[0, 0], per_head[0, 1])
    out = block_sparse_attention(q, k, v, per_head, block_size=64, backend=backend)
    expected = dense_masked_attention(q, k, v, token_mask_from_blocks(per_head, 64, 200, 200))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("d", [64, 128])
def test_keep_all_equals_sdpa(d):
    q, k, v = random_inputs(2, 2, 333, 333, d, torch.float32)
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, mask, block_size=128, backend="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_custom_scale(backend):
    q, k, v = random_inputs(1, 2, 200, 200, 64, torch.float64)
    mask = random_block_mask(1, 2, 4, 4, p=0.6)
    out = block_sparse_attention(q, k, v, mask, block_size=64, scale=0.3, backend=backend)
    expected = dense_masked_attention(q, k, v, token_mask_from_blocks(mask, 64, 200, 200), scale=0.3)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("n_global", [4, 7])
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_global_tokens_equal_dense_over_concatenation(backend, n_global):
    q, k, v = random_inputs(1, 2, 333, 333, 64, torch.float64)
    g = torch.Generator().manual_seed(5)
    gk = torch.randn(1, 2, n_global, 64, generator=g, dtype=torch.float64)
    gv = torch.randn(1, 2, n_global, 64, generator=g, dtype=torch.float64)
    bias = torch.log(torch.arange(1, n_global + 1, dtype=torch.float64) * 3.0)
    mask = random_block_mask(1, 2, 6, 6, p=0.3)
    mask[0, 1, 2] = False  # a row that only sees the global tokens
    out = block_sparse_attention(
        q, k, v, mask, block_size=64, backend=backend, global_k=gk, global_v=gv, global_bias=bias
    )
    expected = dense_masked_attention(q, k, v, token_mask_from_blocks(mask, 64, 333, 333), gk, gv, bias)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    # Without bias = bias 0.
    out0 = block_sparse_attention(q, k, v, mask, block_size=64, backend=backend, global_k=gk, global_v=gv)
    expected0 = dense_masked_attention(q, k, v, token_mask_from_blocks(mask, 64, 333, 333), gk, gv, None)
    torch.testing.assert_close(out0, expected0, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_reference_gradients_match_dense(backend, dtype):
    q, k, v = random_inputs(2, 2, 200, 150, 64, dtype)
    g = torch.Generator().manual_seed(7)
    gk, gv = (torch.randn(2, 2, 5, 64, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    bias = torch.full((5,), math.log(3.0), dtype=dtype)
    mask = random_block_mask(2, 2, 4, 3, p=0.5)
    mask[0, 1, 3] = False
    grad_out = torch.randn(2, 2, 200, 64, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, gk, gv)]
    out = block_sparse_attention(
        *leaves[:3], mask, block_size=64, backend=backend, global_k=leaves[3], global_v=leaves[4], global_bias=bias
    )
    (out.double() * grad_out).sum().backward()
    ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v, gk, gv)]
    tm = token_mask_from_blocks(mask, 64, 200, 150)
    expected = dense_masked_attention(*ref_leaves[:3], tm, ref_leaves[3], ref_leaves[4], bias.double())
    (expected * grad_out).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 5e-5
    for got, want in zip(leaves, ref_leaves):
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad.double(), want.grad, atol=tol, rtol=tol)


def test_reference_gradients_through_checkpointed_chunks():
    from blade.attention.kernels.reference import reference_block_sparse_attention

    q, k, v = (t.requires_grad_(True) for t in random_inputs(1, 1, 200, 150, 32, torch.float64))
    mask = random_block_mask(1, 1, 4, 3, p=0.5)
    reference_block_sparse_attention(q, k, v, mask, block_size=64, chunk_blocks=1).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    dense_masked_attention(q2, k2, v2, token_mask_from_blocks(mask, 64, 200, 150)).square().sum().backward()
    for got, want in zip(grads, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_empty_rows_zero_and_finite_gradients():
    q, k, v = (t.requires_grad_(True) for t in random_inputs(1, 1, 200, 200, 64, torch.float32))
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    out = block_sparse_attention(q, k, v, mask, block_size=64, backend="reference")
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() and torch.equal(t.grad, torch.zeros_like(t.grad)) for t in (q, k, v))


def test_invalid_inputs_raise():
    q, k, v = random_inputs(1, 1, 200, 200, 64)
    with pytest.raises(ValueError, match="block_mask shape"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 3, 4, dtype=torch.bool), block_size=64)
    with pytest.raises(ValueError, match="bool"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 4, 4), block_size=64)
    with pytest.raises(ValueError, match="unknown attention backend"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool), block_size=64, backend="nope")


def test_auto_on_cpu_is_gather_eagerly_and_reference_when_compiling(monkeypatch):
    from blade.attention import resolve_backend

    q, _, _ = random_inputs(1, 1, 64, 64, 64)
    assert resolve_backend("auto", q, 128) == "gather"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert resolve_backend("auto", q, 128) == "reference"


def test_triton_backend_missing_module_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "blade.attention.kernels.triton_bsa", None)  # makes the import fail
    q, k, v = random_inputs(1, 1, 64, 64, 64)
    with pytest.raises(RuntimeError, match="backend='triton' is unavailable"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=64, backend="triton")


# ---------------------------------------------------------------------------------------------------------- bsa
def emulate_block_sparse_attn_func(inputs, scale=None):
    """A pure-torch reading of the documented block_sparse_attn_func semantics, to check our conversion."""
    outs = []
    n_batch = inputs.cu_seqlens_q.numel() - 1
    for b in range(n_batch):
        q0, q1 = inputs.cu_seqlens_q[b].item(), inputs.cu_seqlens_q[b + 1].item()
        k0, k1 = inputs.cu_seqlens_k[b].item(), inputs.cu_seqlens_k[b + 1].item()
        q = inputs.q[q0:q1].transpose(0, 1)[None]  # [1, H, Lq, D]
        k = inputs.k[k0:k1].transpose(0, 1)[None]
        v = inputs.v[k0:k1].transpose(0, 1)[None]
        # the library's reading (block_sparse_attn_interface.replace_ones_with_count): the heads of type 1 are
        # numbered 1..n in order, and the i-th of them uses base_blockmask[:, i-1]; the mask count must be n
        sparse = inputs.head_mask_type == 1
        assert bool(sparse.all()) and inputs.base_blockmask.shape[1] == int(sparse.sum())
        masks = inputs.base_blockmask[b, torch.cumsum(sparse.long(), 0) - 1]
        tm = token_mask_from_blocks(masks[None], BSA_BLOCK_SIZE, q.shape[-2], k.shape[-2])
        outs.append(dense_masked_attention(q, k, v, tm, scale=scale)[0].transpose(0, 1))
    return torch.cat(outs)


def test_bsa_conversion_round_trip():
    q, k, v = random_inputs(2, 3, 333, 300, 64, torch.float64)
    mask = random_block_mask(2, 3, 3, 3, p=0.5)
    inputs = to_bsa_inputs(q, k, v, mask)
    assert inputs.q.shape == (2 * 333, 3, 64) and inputs.k.shape == (2 * 300, 3, 64)
    assert inputs.cu_seqlens_q.tolist() == [0, 333, 666] and inputs.cu_seqlens_k.tolist() == [0, 300, 600]
    assert inputs.cu_seqlens_q.dtype == torch.int32 and inputs.head_mask_type.tolist() == [1, 1, 1]
    assert inputs.base_blockmask.shape == (2, 3, 3, 3) and inputs.max_seqlen_q == 333 and inputs.max_seqlen_k == 300
    out = from_bsa_output(emulate_block_sparse_attn_func(inputs), batch=2)
    expected = dense_masked_attention(q, k, v, token_mask_from_blocks(mask, 128, 333, 300))
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    # A broadcast mask is materialised per batch and head.
    inputs = to_bsa_inputs(q, k, v, mask[:1, :1])
    assert inputs.base_blockmask.shape == (2, 3, 3, 3) and torch.equal(inputs.base_blockmask[1, 2], mask[0, 0])


def test_call_bsa_passes_the_librarys_argument_order(monkeypatch):
    """`call_bsa` against a stand-in module with the library's signature (block_sparse_attn_interface.py at 49d6c39:
    q, k, v, cu_seqlens_q, cu_seqlens_k, head_mask_type, streaming_info, base_blockmask, max_seqlen_q, max_seqlen_k,
    p_dropout, then deterministic, softmax_scale, is_causal) that computes with the library's reading of them: the
    output must equal the float64 dense masked reference."""
    import sys
    import types

    from blade.attention.kernels.bsa import call_bsa

    def block_sparse_attn_func(q, k, v, cu_seqlens_q, cu_seqlens_k, head_mask_type, streaming_info, base_blockmask,
                               max_seqlen_q, max_seqlen_k, p_dropout, deterministic=False, softmax_scale=None,
                               is_causal=False, exact_streaming=False, return_attn_probs=False):
        assert streaming_info is None and p_dropout == 0.0 and not is_causal and not return_attn_probs
        fields = dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      head_mask_type=head_mask_type, base_blockmask=base_blockmask, max_seqlen_q=max_seqlen_q,
                      max_seqlen_k=max_seqlen_k)
        return emulate_block_sparse_attn_func(types.SimpleNamespace(**fields), scale=softmax_scale)

    library = types.SimpleNamespace(block_sparse_attn_func=block_sparse_attn_func)
    monkeypatch.setitem(sys.modules, "block_sparse_attn", library)
    q, k, v = random_inputs(2, 3, 260, 300, 64, torch.float64)
    mask = random_block_mask(2, 3, 3, 3, p=0.5)
    out = from_bsa_output(call_bsa(to_bsa_inputs(q, k, v, mask), scale=0.1), batch=2)
    expected = dense_masked_attention(q, k, v, token_mask_from_blocks(mask, 128, 260, 300), scale=0.1)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_bsa_checks():
    q, k, v = random_inputs(1, 1, 200, 200, 64)
    with pytest.raises(ValueError, match="block_size=128"):
        to_bsa_inputs(q, k, v, torch.ones(1, 1, 4, 4, dtype=torch.bool), block_size=64)
    try:
        import block_sparse_attn  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="git clone https://github.com/mit-han-lab/Block-Sparse-Attention"):
            bsa_block_sparse_attention(q, k, v, torch.ones(1, 1, 2, 2, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------- flex (CPU fwd)
def test_flex_cpu_refuses_backward():
    q, k, v = (t.requires_grad_(True) for t in random_inputs(1, 1, 128, 128, 64))
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        block_sparse_attention(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), backend="flex")


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("BLADE_SLOW_TESTS") != "1", reason="compiling flex on CPU takes 30-90 s; set BLADE_SLOW_TESTS=1"
)
def test_flex_cpu_forward_matches_dense():
    """Compiled flex runs forward-only on CPU; one compile (~30 s on 2 cores) covers ragged + globals + per-head."""
    q, k, v = random_inputs(2, 2, 333, 333, 64, torch.float32)
    g = torch.Generator().manual_seed(9)
    gk, gv = (torch.randn(2, 2, 12, 64, generator=g) for _ in range(2))
    bias = torch.log(torch.full((12,), 30.0))
    bias[-1] = math.log(3.0)
    mask = random_block_mask(2, 2, 3, 3, p=0.5)
    mask[1, 0, 1] = False
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, mask, backend="flex", global_k=gk, global_v=gv, global_bias=bias)
    expected = dense_masked_attention(q, k, v, token_mask_from_blocks(mask, 128, 333, 333), gk, gv, bias)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------------ GPU only
def _wan_inputs(requires_grad=True):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (1, 12, 32760, 128)
    q, k, v = (torch.randn(shape, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    n = math.ceil(32760 / 128)
    mask = torch.rand(1, 12, n, n, generator=g, device="cuda") < 0.15
    mask[..., torch.arange(n), torch.arange(n)] = True
    return [t.requires_grad_(requires_grad) for t in (q, k, v)], mask


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
def test_flex_matches_reference_wan_shape_fwd_bwd():
    (q, k, v), mask = _wan_inputs()
    grad = torch.randn_like(q)
    out = block_sparse_attention(q, k, v, mask, backend="flex")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    ref = block_sparse_attention(q, k, v, mask, backend="reference")
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad)
    assert _rel_err(out, ref) < 1e-2
    for got, want in ((dq, rq), (dk, rk), (dv, rv)):
        assert _rel_err(got, want) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_flex_gpu_ragged_globals_grad(d):
    q, k, v = (t.cuda() for t in random_inputs(2, 3, 333, 333, d, torch.float32))
    g = torch.Generator().manual_seed(3)
    gk, gv = (torch.randn(2, 3, 12, d, generator=g).cuda() for _ in range(2))
    bias = torch.log(torch.full((12,), 30.0)).cuda()
    mask = random_block_mask(2, 3, 3, 3, p=0.5).cuda()
    mask[0, 1, 2] = False
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, gk, gv)]
    out = block_sparse_attention(
        *leaves[:3], mask, backend="flex", global_k=leaves[3], global_v=leaves[4], global_bias=bias
    )
    out.square().sum().backward()
    refs = [t.clone().double().requires_grad_(True) for t in (q, k, v, gk, gv)]
    tm = token_mask_from_blocks(mask, 128, 333, 333)
    expected = dense_masked_attention(*refs[:3], tm, refs[3], refs[4], bias)
    expected.square().sum().backward()
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)
    for got, want in zip(leaves, refs):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=5e-3, rtol=5e-3)


def test_gather_half_precision_equals_reference():
    """bf16 inputs: both plain-torch backends compute in float32 and round once, so they agree to bf16 rounding."""
    q, k, v = random_inputs(1, 2, 333, 333, 64, torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    gk, gv = (torch.randn(1, 2, 5, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    mask = random_block_mask(1, 2, 6, 6, p=0.3)
    kwargs = dict(block_size=64, global_k=gk, global_v=gv, global_bias=torch.full((5,), 0.7))
    out = block_sparse_attention(q, k, v, mask, backend="gather", **kwargs)
    ref = block_sparse_attention(q, k, v, mask, backend="reference", **kwargs)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)
