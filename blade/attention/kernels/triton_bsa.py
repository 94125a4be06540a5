"""Triton block-sparse flash attention that consumes the ASA block mask directly (forward + backward).

Semantics are those of `blade.attention.kernels.reference` (see docs/internals.md): for every query row, one exact
softmax over the keys of the kept 128-blocks plus the always-visible global tokens (additive bias on the *scaled*
logits). Ragged last blocks are masked, rows that see nothing get zeros.

Kernel layout (FlashAttention-2 style):
- forward: one program per (batch*head, query tile); it walks the kept kv blocks of its query block (the
  `BlockMask`'s index list), then the dense global segment, with an online softmax in the exp2 domain. It saves the
  row log-sum-exp (base 2, fp32) for the backward.
- backward: `delta = rowsum(dO * O)`, then a dq kernel over the same kv index lists, a dk/dv kernel over the
  transposed lists (per kv block, the query blocks that use it; built in the backward from the forward's lists), and
  a dense dk/dv kernel for the global tokens whose partial sums over query chunks are reduced in torch.

Programs are launched in order of decreasing work (rows with more kept blocks first), which keeps the tail of the
launch short when heads have very different densities.

A mask made by the prober already holds its index lists. For one that holds only a dense mask (static masks, the
backward's transposed mask), `block_lists` builds them with one small Triton kernel (a per-row prefix sum that
compacts the kept columns): one launch instead of a segmented sort, the same lists as `dense_to_lists`. Launch
configurations come in named sets: "tma_ws" (the default: v2 with the forward's loads through tensor descriptors and
the kept-block loop warp-specialized, on Hopper or newer; elsewhere v2's pointer kernel), "tma" (the same without
warp specialization), "v2" (pointer loads everywhere) and "v1" (the first GPU-tuned set with the torch list builder,
kept so a benchmark can show regressions); see `config_set` and `BLADE_BSA_CONFIG_SET`.

`torch.compile`: the Triton launches run inside opaque custom operators (``blade::bsa_block_lists``,
``blade::bsa_forward`` with its autograd formula, ``blade::bsa_backward``), whose fake implementations give the
output shapes from the input shapes alone (the index lists are padded to the row length). Dynamo never traces the
launch code and inductor never lowers it, so a compiled model keeps the attention in one graph.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch

from ..block_mask import BlockMask, as_block_mask, dense_to_lists, lists_to_dense

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[BaseException] = None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - Triton < 3.4: the TMA config sets use the pointer kernel
        TensorDescriptor = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    TensorDescriptor = None
    _TRITON_IMPORT_ERROR = exc

__all__ = [
    "triton_block_sparse_attention",
    "block_lists",
    "config_set",
    "kernel_lists",
    "launch_order",
    "is_available",
    "supports",
]

_LOG2E = 1.4426950408889634
_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Query chunk (tokens) handled by one program of the global-token dk/dv kernel.
_GLOBAL_CHUNK = 4096


def is_available() -> bool:
    """True when triton can be imported."""
    return triton is not None


# ----------------------------------------------------------------------------------------------------------------
# Mask -> kernel format
# ----------------------------------------------------------------------------------------------------------------


def launch_order(counts: torch.Tensor, rows: int) -> torch.Tensor:
    """Launch order of the rows: heads with more kept blocks first, the rows of one head together (so concurrent
    programs share that head's K/V in L2). ``counts [B*H*R]`` -> int32 ``[B*H*R]``."""
    head_work = counts.view(-1, rows).sum(-1)
    head_order = torch.sort(head_work, descending=True, stable=True).indices
    order = head_order[:, None] * rows + torch.arange(rows, device=counts.device)
    return order.flatten().to(torch.int32)


def block_lists(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dense_to_lists`` of a bool ``[B, H, R, C]`` mask (any strides: expanded or transposed views are fine) as
    an op opaque to ``torch.compile``: the Triton row compaction where it runs, else the torch stable sort.

    Returns:
        counts int32 ``[B, H, R]`` and index int32 ``[B, H, R, C]`` (kept columns first, increasing, then the
        others, increasing): the lists of ``BlockMask``, which passes this builder when it holds only a dense mask.
    """
    return torch.ops.blade.bsa_block_lists(dense)


def _block_lists_eager(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`block_lists` itself (eager code: the Triton builder where it runs, else the torch one)."""
    use_kernel = triton is not None and (dense.is_cuda or _interpreting()) and not _LIST_KERNEL_FAILED
    if not use_kernel or _CONFIG_SETS[_ACTIVE[0]]["lists"] != "triton" or dense.shape[-1] > _MAX_LIST_COLS:
        return dense_to_lists(dense)
    try:
        return _compact_rows(dense)
    except Exception as err:  # a compiler problem must not take attention down: warn once, use torch from now on
        _LIST_KERNEL_FAILED.append(repr(err))
        warnings.warn(f"Triton mask -> list builder failed ({err!r}); using the torch builder", stacklevel=2)
        return dense_to_lists(dense)


def _compact_rows(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, rows, cols = dense.shape
    counts = torch.empty((batch, heads, rows), dtype=torch.int32, device=dense.device)
    index = torch.empty((batch, heads, rows, cols), dtype=torch.int32, device=dense.device)
    mask = dense if dense.dtype == torch.bool else dense.bool()
    _compact_rows_kernel[(batch * heads * rows,)](
        mask.view(torch.uint8),
        counts,
        index,
        *mask.stride(),
        heads,
        rows,
        cols,
        BLOCK_C=max(16, triton.next_power_of_2(cols)),
    )
    return counts, index


def kernel_lists(block_mask: BlockMask, batch: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the kernels walk, from a ``BlockMask`` ``[B|1, H|1, R, C]`` broadcast to ``batch x heads``.

    Returns:
        counts int32 ``[B*H*R]``, index int32 ``[B*H*R, C]`` (kept column blocks first, in increasing order) and
        the launch order int32 ``[B*H*R]`` (heads with more kept blocks first, the rows of one head together).
    """
    counts, index = block_mask.lists(builder=block_lists)
    rows, cols = index.shape[-2:]
    kv_count = counts.expand(batch, heads, rows).reshape(-1)
    kv_index = index.expand(batch, heads, rows, cols).reshape(-1, cols)
    return kv_count, kv_index, launch_order(kv_count, rows)


def _transposed_lists(kv_count: torch.Tensor, kv_index: torch.Tensor, batch: int, heads: int):
    """Per kv block, the query blocks that use it (the dk/dv kernel's lists), from the forward's flat lists."""
    rows, cols = kv_count.numel() // (batch * heads), kv_index.shape[-1]
    dense = lists_to_dense(kv_count.view(batch, heads, rows), kv_index.view(batch, heads, rows, cols), cols)
    q_count, q_index = _block_lists_eager(dense.transpose(-1, -2))
    q_count = q_count.reshape(-1)
    return q_count, q_index.reshape(-1, rows), launch_order(q_count, cols)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _compact_rows_kernel(
        MASK,
        COUNT,
        INDEX,
        sm_b,
        sm_h,
        sm_r,
        sm_c,
        num_heads,
        n_rows_per_head,
        n_cols,
        BLOCK_C: tl.constexpr,
    ):
        """One mask row -> its kept columns first (increasing), then the others (increasing), and the count."""
        row = tl.program_id(0).to(tl.int64)
        b = row // (num_heads * n_rows_per_head)
        h = (row // n_rows_per_head) % num_heads
        r = row % n_rows_per_head
        offs = tl.arange(0, BLOCK_C)
        valid = offs < n_cols
        kept = tl.load(MASK + b * sm_b + h * sm_h + r * sm_r + offs * sm_c, mask=valid, other=0) != 0
        kept_upto = tl.cumsum(kept.to(tl.int32), 0)  # inclusive prefix count of kept columns
        count = tl.sum(kept.to(tl.int32), 0)
        # Kept column: slot (kept before it); dropped column: after all kept ones, in order (== a stable sort).
        slot = tl.where(kept, kept_upto - 1, count + offs - kept_upto)
        tl.store(INDEX + row * n_cols + slot, offs, mask=valid)
        tl.store(COUNT + row, count)

    @triton.jit
    def _softmax_step(
        acc,
        m_i,
        l_i,
        q,
        k,
        v,
        cols,
        n_limit,
        bias_ptr,
        qk_scale,
        MASK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """One [BLOCK_M, BLOCK_N] step of the online softmax (exp2 domain) on loaded k, v ``[BLOCK_N, D]``."""
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            s += tl.load(bias_ptr + cols, mask=cols < n_limit, other=0.0)[None, :]
        if MASK_N:
            s = tl.where(cols[None, :] < n_limit, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _fwd_tile(
        acc,
        m_i,
        l_i,
        q,
        k_base,
        v_base,
        stride_kl,
        stride_vl,
        start_n,
        n_limit,
        bias_ptr,
        qk_scale,
        offs_n,
        offs_d,
        MASK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """Load one kv tile through pointers, then `_softmax_step`."""
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None].to(tl.int64) * stride_kl + offs_d[None, :]
        v_ptrs = v_base + cols[:, None].to(tl.int64) * stride_vl + offs_d[None, :]
        if MASK_N:
            k = tl.load(k_ptrs, mask=cols[:, None] < n_limit, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < n_limit, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        return _softmax_step(
            acc, m_i, l_i, q, k, v, cols, n_limit, bias_ptr, qk_scale, MASK_N, HAS_BIAS, DOT_PRECISION
        )

    @triton.jit
    def _fwd_tile_tma(
        acc,
        m_i,
        l_i,
        q,
        desc_k,
        desc_v,
        b,
        h,
        start_n,
        n_limit,
        bias_ptr,
        qk_scale,
        offs_n,
        MASK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
    ):
        """Load one kv tile through tensor descriptors (TMA on Hopper; rows past the end arrive as zeros, so only
        the scores need the mask), then `_softmax_step`."""
        k = desc_k.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = desc_v.load([b, h, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        return _softmax_step(
            acc, m_i, l_i, q, k, v, start_n + offs_n, n_limit, bias_ptr, qk_scale, MASK_N, HAS_BIAS, DOT_PRECISION
        )

    @triton.jit
    def _program_row(ORDER, n_blocks, num_heads, SUB: tl.constexpr):
        """This program's mask row (a kv column for dk/dv) in launch order ``ORDER`` (``SUB`` programs share one):
        the row, its batch*head index, its block within the head, and the batch and head (int64, for offsets)."""
        row = tl.load(ORDER + tl.program_id(0) // SUB)
        bh = row // n_blocks
        return row, bh, row % n_blocks, (bh // num_heads).to(tl.int64), (bh % num_heads).to(tl.int64)

    @triton.jit
    def _kept_blocks(COUNT, INDEX, row, n_blocks, EVEN: tl.constexpr):
        """A row's index list (kept blocks first, increasing), the number of its kept blocks without the ragged last
        block, and whether that block is kept: only it needs element masks, so it is peeled off the sorted list."""
        count = tl.load(COUNT + row)
        idx_ptr = INDEX + row.to(tl.int64) * n_blocks
        has_tail = count < 0  # False: no ragged block
        if not EVEN:
            last = tl.load(idx_ptr + tl.maximum(count - 1, 0))
            has_tail = (count > 0) & (last == n_blocks - 1)
        return idx_ptr, count - has_tail.to(tl.int32), has_tail

    @triton.jit
    def _fwd_store(acc, m_i, l_i, OUT, LSE, b, h, bh, so_b, so_h, so_l, offs_m, offs_d, seq_q, lse_stride):
        """Normalise and store the forward's output rows and base-2 LSE (a row that sees nothing: zeros, +inf)."""
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        # +inf LSE makes every probability of an empty row exactly 0 in the backward.
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
        o_ptrs = OUT + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_l + offs_d[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=offs_m[:, None] < seq_q)
        tl.store(LSE + bh.to(tl.int64) * lse_stride + offs_m, lse)

    @triton.jit
    def _bsa_fwd_kernel(
        Q,
        K,
        V,
        OUT,
        LSE,
        GK,
        GV,
        GBIAS,
        KV_COUNT,
        KV_INDEX,
        ROW_ORDER,
        sq_b,
        sq_h,
        sq_l,
        sk_b,
        sk_h,
        sk_l,
        sv_b,
        sv_h,
        sv_l,
        so_b,
        so_h,
        so_l,
        sgk_b,
        sgk_h,
        sgk_l,
        sgv_b,
        sgv_h,
        sgv_l,
        num_heads,
        seq_q,
        seq_k,
        num_global,
        lse_stride,
        n_q_blocks,
        n_k_blocks,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        MASK_BLOCK: tl.constexpr,
        EVEN_K: tl.constexpr,
        HAS_GLOBAL: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        SUB_M: tl.constexpr = MASK_BLOCK // BLOCK_M
        SUB_N: tl.constexpr = MASK_BLOCK // BLOCK_N
        row, bh, q_block, b, h = _program_row(ROW_ORDER, n_q_blocks, num_heads, SUB_M)

        offs_m = q_block * MASK_BLOCK + (tl.program_id(0) % SUB_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_l + offs_d[None, :]
        q = tl.load(q_ptrs, mask=offs_m[:, None] < seq_q, other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        k_base = K + b * sk_b + h * sk_h
        v_base = V + b * sv_b + h * sv_h
        idx_ptr, n_full, has_tail = _kept_blocks(KV_COUNT, KV_INDEX, row, n_k_blocks, EVEN_K)
        for t in range(0, n_full * SUB_N):
            k_block = tl.load(idx_ptr + t // SUB_N)
            start_n = k_block * MASK_BLOCK + (t % SUB_N) * BLOCK_N
            acc, m_i, l_i = _fwd_tile(
                acc,
                m_i,
                l_i,
                q,
                k_base,
                v_base,
                sk_l,
                sv_l,
                start_n,
                seq_k,
                GBIAS,
                qk_scale,
                offs_n,
                offs_d,
                False,
                False,
                DOT_PRECISION,
            )
        if not EVEN_K:
            if has_tail:
                for start_n in range((n_k_blocks - 1) * MASK_BLOCK, seq_k, BLOCK_N):
                    acc, m_i, l_i = _fwd_tile(
                        acc,
                        m_i,
                        l_i,
                        q,
                        k_base,
                        v_base,
                        sk_l,
                        sv_l,
                        start_n,
                        seq_k,
                        GBIAS,
                        qk_scale,
                        offs_n,
                        offs_d,
                        True,
                        False,
                        DOT_PRECISION,
                    )
        if HAS_GLOBAL:
            gk_base = GK + b * sgk_b + h * sgk_h
            gv_base = GV + b * sgv_b + h * sgv_h
            for start_n in range(0, num_global, BLOCK_N):
                acc, m_i, l_i = _fwd_tile(
                    acc,
                    m_i,
                    l_i,
                    q,
                    gk_base,
                    gv_base,
                    sgk_l,
                    sgv_l,
                    start_n,
                    num_global,
                    GBIAS,
                    qk_scale,
                    offs_n,
                    offs_d,
                    True,
                    HAS_BIAS,
                    DOT_PRECISION,
                )

        _fwd_store(acc, m_i, l_i, OUT, LSE, b, h, bh, so_b, so_h, so_l, offs_m, offs_d, seq_q, lse_stride)

    @triton.jit
    def _bsa_fwd_tma_kernel(
        desc_q,
        desc_k,
        desc_v,
        desc_gk,
        desc_gv,
        OUT,
        LSE,
        GBIAS,
        KV_COUNT,
        KV_INDEX,
        ROW_ORDER,
        so_b,
        so_h,
        so_l,
        num_heads,
        seq_q,
        seq_k,
        num_global,
        lse_stride,
        n_q_blocks,
        n_k_blocks,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        MASK_BLOCK: tl.constexpr,
        EVEN_K: tl.constexpr,
        HAS_GLOBAL: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        WARP_SPECIALIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """`_bsa_fwd_kernel` with q, k, v and the global tokens read through 4-D tensor descriptors ``[B, H, L, D]``
        (TMA loads on Hopper instead of per-thread pointer loads: the profile's MIO-throttle and long-scoreboard
        stalls), and optionally Triton's warp specialization of the kept-block loop (a producer partition issuing
        the loads while consumers compute). Same programs, launch order, results and LSE as the pointer kernel."""
        SUB_M: tl.constexpr = MASK_BLOCK // BLOCK_M
        SUB_N: tl.constexpr = MASK_BLOCK // BLOCK_N
        row, bh, q_block, b, h = _program_row(ROW_ORDER, n_q_blocks, num_heads, SUB_M)
        b32, h32 = b.to(tl.int32), h.to(tl.int32)  # descriptor coordinates are int32

        start_m = q_block * MASK_BLOCK + (tl.program_id(0) % SUB_M) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q = desc_q.load([b32, h32, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        idx_ptr, n_full, has_tail = _kept_blocks(KV_COUNT, KV_INDEX, row, n_k_blocks, EVEN_K)
        for t in tl.range(0, n_full * SUB_N, warp_specialize=WARP_SPECIALIZE):
            k_block = tl.load(idx_ptr + t // SUB_N)
            start_n = k_block * MASK_BLOCK + (t % SUB_N) * BLOCK_N
            acc, m_i, l_i = _fwd_tile_tma(
                acc, m_i, l_i, q, desc_k, desc_v, b32, h32, start_n, seq_k, GBIAS, qk_scale, offs_n,
                False, False, DOT_PRECISION, BLOCK_N, HEAD_DIM,
            )
        if not EVEN_K:
            if has_tail:
                for start_n in range((n_k_blocks - 1) * MASK_BLOCK, seq_k, BLOCK_N):
                    acc, m_i, l_i = _fwd_tile_tma(
                        acc, m_i, l_i, q, desc_k, desc_v, b32, h32, start_n, seq_k, GBIAS, qk_scale, offs_n,
                        True, False, DOT_PRECISION, BLOCK_N, HEAD_DIM,
                    )
        if HAS_GLOBAL:
            for start_n in range(0, num_global, BLOCK_N):
                acc, m_i, l_i = _fwd_tile_tma(
                    acc, m_i, l_i, q, desc_gk, desc_gv, b32, h32, start_n, num_global, GBIAS, qk_scale, offs_n,
                    True, HAS_BIAS, DOT_PRECISION, BLOCK_N, HEAD_DIM,
                )

        _fwd_store(acc, m_i, l_i, OUT, LSE, b, h, bh, so_b, so_h, so_l, offs_m, offs_d, seq_q, lse_stride)

    @triton.jit
    def _bsa_bwd_delta_kernel(
        OUT,
        DO,
        DELTA,
        so_b,
        so_h,
        so_l,
        sdo_b,
        sdo_h,
        sdo_l,
        num_heads,
        seq_q,
        lse_stride,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """delta[row] = sum_d O * dO (fp32); zero on padding rows."""
        bh = tl.program_id(1)
        b = (bh // num_heads).to(tl.int64)
        h = (bh % num_heads).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = offs_m[:, None] < seq_q
        o = tl.load(
            OUT + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_l + offs_d[None, :], mask=rows, other=0.0
        )
        do = tl.load(
            DO + b * sdo_b + h * sdo_h + offs_m[:, None].to(tl.int64) * sdo_l + offs_d[None, :], mask=rows, other=0.0
        )
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh.to(tl.int64) * lse_stride + offs_m, delta)

    @triton.jit
    def _dq_tile(
        dq,
        q,
        do,
        lse,
        delta,
        k_base,
        v_base,
        stride_kl,
        stride_vl,
        start_n,
        n_limit,
        bias_ptr,
        qk_scale,
        offs_n,
        offs_d,
        MASK_N: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """dq += dS @ K for one kv tile (dS in natural-log units, scale applied by the caller)."""
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None].to(tl.int64) * stride_kl + offs_d[None, :]
        v_ptrs = v_base + cols[:, None].to(tl.int64) * stride_vl + offs_d[None, :]
        if MASK_N:
            k = tl.load(k_ptrs, mask=cols[:, None] < n_limit, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < n_limit, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            s += tl.load(bias_ptr + cols, mask=cols < n_limit, other=0.0)[None, :]
        if MASK_N:
            s = tl.where(cols[None, :] < n_limit, s, float("-inf"))
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        return dq

    @triton.jit
    def _bsa_bwd_dq_kernel(
        Q,
        K,
        V,
        DO,
        DQ,
        LSE,
        DELTA,
        GK,
        GV,
        GBIAS,
        KV_COUNT,
        KV_INDEX,
        ROW_ORDER,
        sq_b,
        sq_h,
        sq_l,
        sk_b,
        sk_h,
        sk_l,
        sv_b,
        sv_h,
        sv_l,
        sdo_b,
        sdo_h,
        sdo_l,
        sdq_b,
        sdq_h,
        sdq_l,
        sgk_b,
        sgk_h,
        sgk_l,
        sgv_b,
        sgv_h,
        sgv_l,
        num_heads,
        seq_q,
        seq_k,
        num_global,
        lse_stride,
        n_q_blocks,
        n_k_blocks,
        qk_scale,
        sm_scale,
        HEAD_DIM: tl.constexpr,
        MASK_BLOCK: tl.constexpr,
        EVEN_K: tl.constexpr,
        HAS_GLOBAL: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        SUB_M: tl.constexpr = MASK_BLOCK // BLOCK_M
        SUB_N: tl.constexpr = MASK_BLOCK // BLOCK_N
        row, bh, q_block, b, h = _program_row(ROW_ORDER, n_q_blocks, num_heads, SUB_M)

        offs_m = q_block * MASK_BLOCK + (tl.program_id(0) % SUB_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        rows = offs_m[:, None] < seq_q
        q = tl.load(
            Q + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_l + offs_d[None, :], mask=rows, other=0.0
        )
        do = tl.load(
            DO + b * sdo_b + h * sdo_h + offs_m[:, None].to(tl.int64) * sdo_l + offs_d[None, :], mask=rows, other=0.0
        )
        lse = tl.load(LSE + bh.to(tl.int64) * lse_stride + offs_m)
        delta = tl.load(DELTA + bh.to(tl.int64) * lse_stride + offs_m)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        k_base = K + b * sk_b + h * sk_h
        v_base = V + b * sv_b + h * sv_h
        idx_ptr, n_full, has_tail = _kept_blocks(KV_COUNT, KV_INDEX, row, n_k_blocks, EVEN_K)
        for t in range(0, n_full * SUB_N):
            k_block = tl.load(idx_ptr + t // SUB_N)
            start_n = k_block * MASK_BLOCK + (t % SUB_N) * BLOCK_N
            dq = _dq_tile(
                dq,
                q,
                do,
                lse,
                delta,
                k_base,
                v_base,
                sk_l,
                sv_l,
                start_n,
                seq_k,
                GBIAS,
                qk_scale,
                offs_n,
                offs_d,
                False,
                False,
                DOT_PRECISION,
            )
        if not EVEN_K:
            if has_tail:
                for start_n in range((n_k_blocks - 1) * MASK_BLOCK, seq_k, BLOCK_N):
                    dq = _dq_tile(
                        dq,
                        q,
                        do,
                        lse,
                        delta,
                        k_base,
                        v_base,
                        sk_l,
                        sv_l,
                        start_n,
                        seq_k,
                        GBIAS,
                        qk_scale,
                        offs_n,
                        offs_d,
                        True,
                        False,
                        DOT_PRECISION,
                    )
        if HAS_GLOBAL:
            gk_base = GK + b * sgk_b + h * sgk_h
            gv_base = GV + b * sgv_b + h * sgv_h
            for start_n in range(0, num_global, BLOCK_N):
                dq = _dq_tile(
                    dq,
                    q,
                    do,
                    lse,
                    delta,
                    gk_base,
                    gv_base,
                    sgk_l,
                    sgv_l,
                    start_n,
                    num_global,
                    GBIAS,
                    qk_scale,
                    offs_n,
                    offs_d,
                    True,
                    HAS_BIAS,
                    DOT_PRECISION,
                )

        dq_ptrs = DQ + b * sdq_b + h * sdq_h + offs_m[:, None].to(tl.int64) * sdq_l + offs_d[None, :]
        tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows)

    @triton.jit
    def _dkdv_tile(
        dk,
        dv,
        k,
        v,
        q_base,
        do_base,
        lse_base,
        delta_base,
        stride_ql,
        stride_dol,
        start_m,
        seq_q,
        bias,
        qk_scale,
        offs_m,
        offs_d,
        MASK_M: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """dv += P^T dO, dk += dS^T Q for one query tile (kv rows on the M axis of the transposed scores)."""
        rows = start_m + offs_m
        q_ptrs = q_base + rows[:, None].to(tl.int64) * stride_ql + offs_d[None, :]
        do_ptrs = do_base + rows[:, None].to(tl.int64) * stride_dol + offs_d[None, :]
        if MASK_M:
            valid = rows < seq_q
            q = tl.load(q_ptrs, mask=valid[:, None], other=0.0)
            do = tl.load(do_ptrs, mask=valid[:, None], other=0.0)
            lse = tl.load(lse_base + rows, mask=valid, other=float("inf"))
            delta = tl.load(delta_base + rows, mask=valid, other=0.0)
        else:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        if HAS_BIAS:
            s_t += bias[:, None]
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        return dk, dv

    @triton.jit
    def _bsa_bwd_dkdv_kernel(
        Q,
        K,
        V,
        DO,
        DK,
        DV,
        LSE,
        DELTA,
        Q_COUNT,
        Q_INDEX,
        COL_ORDER,
        sq_b,
        sq_h,
        sq_l,
        sk_b,
        sk_h,
        sk_l,
        sv_b,
        sv_h,
        sv_l,
        sdo_b,
        sdo_h,
        sdo_l,
        sdk_b,
        sdk_h,
        sdk_l,
        sdv_b,
        sdv_h,
        sdv_l,
        num_heads,
        seq_q,
        seq_k,
        lse_stride,
        n_q_blocks,
        n_k_blocks,
        qk_scale,
        sm_scale,
        HEAD_DIM: tl.constexpr,
        MASK_BLOCK: tl.constexpr,
        EVEN_Q: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        SUB_M: tl.constexpr = MASK_BLOCK // BLOCK_M
        SUB_N: tl.constexpr = MASK_BLOCK // BLOCK_N
        col, bh, k_block, b, h = _program_row(COL_ORDER, n_k_blocks, num_heads, SUB_N)

        offs_n = k_block * MASK_BLOCK + (tl.program_id(0) % SUB_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        kv_rows = offs_n[:, None] < seq_k
        k = tl.load(
            K + b * sk_b + h * sk_h + offs_n[:, None].to(tl.int64) * sk_l + offs_d[None, :], mask=kv_rows, other=0.0
        )
        v = tl.load(
            V + b * sv_b + h * sv_h + offs_n[:, None].to(tl.int64) * sv_l + offs_d[None, :], mask=kv_rows, other=0.0
        )
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

        q_base = Q + b * sq_b + h * sq_h
        do_base = DO + b * sdo_b + h * sdo_h
        lse_base = LSE + bh.to(tl.int64) * lse_stride
        delta_base = DELTA + bh.to(tl.int64) * lse_stride
        idx_ptr, n_full, has_tail = _kept_blocks(Q_COUNT, Q_INDEX, col, n_q_blocks, EVEN_Q)
        for t in range(0, n_full * SUB_M):
            q_block = tl.load(idx_ptr + t // SUB_M)
            start_m = q_block * MASK_BLOCK + (t % SUB_M) * BLOCK_M
            dk, dv = _dkdv_tile(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                lse_base,
                delta_base,
                sq_l,
                sdo_l,
                start_m,
                seq_q,
                qk_scale,
                qk_scale,
                offs_m,
                offs_d,
                False,
                False,
                DOT_PRECISION,
            )
        if not EVEN_Q:
            if has_tail:
                for start_m in range((n_q_blocks - 1) * MASK_BLOCK, seq_q, BLOCK_M):
                    dk, dv = _dkdv_tile(
                        dk,
                        dv,
                        k,
                        v,
                        q_base,
                        do_base,
                        lse_base,
                        delta_base,
                        sq_l,
                        sdo_l,
                        start_m,
                        seq_q,
                        qk_scale,
                        qk_scale,
                        offs_m,
                        offs_d,
                        True,
                        False,
                        DOT_PRECISION,
                    )

        dk_ptrs = DK + b * sdk_b + h * sdk_h + offs_n[:, None].to(tl.int64) * sdk_l + offs_d[None, :]
        dv_ptrs = DV + b * sdv_b + h * sdv_h + offs_n[:, None].to(tl.int64) * sdv_l + offs_d[None, :]
        tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_rows)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_rows)

    @triton.jit
    def _bsa_bwd_global_kernel(
        Q,
        GK,
        GV,
        DO,
        DGK,
        DGV,
        LSE,
        DELTA,
        GBIAS,
        sq_b,
        sq_h,
        sq_l,
        sgk_b,
        sgk_h,
        sgk_l,
        sgv_b,
        sgv_h,
        sgv_l,
        sdo_b,
        sdo_h,
        sdo_l,
        num_heads,
        seq_q,
        num_global,
        lse_stride,
        chunk_len,
        qk_scale,
        sm_scale,
        HEAD_DIM: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """Partial dk/dv of the global tokens over one chunk of queries: DGK/DGV are fp32 [chunks, B*H, G, D]."""
        n_g_tiles = tl.cdiv(num_global, BLOCK_N)
        pid = tl.program_id(0)
        g_tile = pid % n_g_tiles
        chunk = pid // n_g_tiles
        bh = tl.program_id(1)
        b = (bh // num_heads).to(tl.int64)
        h = (bh % num_heads).to(tl.int64)

        offs_n = g_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        g_rows = offs_n < num_global
        gk = tl.load(
            GK + b * sgk_b + h * sgk_h + offs_n[:, None].to(tl.int64) * sgk_l + offs_d[None, :],
            mask=g_rows[:, None],
            other=0.0,
        )
        gv = tl.load(
            GV + b * sgv_b + h * sgv_h + offs_n[:, None].to(tl.int64) * sgv_l + offs_d[None, :],
            mask=g_rows[:, None],
            other=0.0,
        )
        bias = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(GBIAS + offs_n, mask=g_rows, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

        q_base = Q + b * sq_b + h * sq_h
        do_base = DO + b * sdo_b + h * sdo_h
        lse_base = LSE + bh.to(tl.int64) * lse_stride
        delta_base = DELTA + bh.to(tl.int64) * lse_stride
        chunk_start = chunk * chunk_len
        chunk_end = tl.minimum(chunk_start + chunk_len, seq_q)
        for start_m in range(chunk_start, chunk_end, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk,
                dv,
                gk,
                gv,
                q_base,
                do_base,
                lse_base,
                delta_base,
                sq_l,
                sdo_l,
                start_m,
                seq_q,
                bias,
                qk_scale,
                offs_m,
                offs_d,
                True,
                HAS_BIAS,
                DOT_PRECISION,
            )

        out_offs = (chunk * tl.num_programs(1) + bh).to(tl.int64) * num_global * HEAD_DIM
        out_offs += offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DGK + out_offs, dk * sm_scale, mask=g_rows[:, None])
        tl.store(DGV + out_offs, dv, mask=g_rows[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, in named sets. Small spaces: autotuning must stay within the
# benchmark's budget. For dk/dv BLOCK_N is the kv tile owned by a program and BLOCK_M the inner query tile.
# "v1": the first GPU-tuned set (H200 picks: fwd 128/64/8/3, dq 128/64/8/3, dkdv 64/64/4/3) + torch list building.
# "v2": a superset of v1 (so the autotuner cannot pick worse than v1 on the same GPU), adding the two-stage
# 128x128 forward tiles (fewer online-softmax rescales per kv block) and the deeper-pipelined small tiles of the
# Triton fused-attention tutorial's backward (dq 128/32/4/5, dkdv 32/128/4/5), and the Triton list builder.
_CONFIG_SETS = {
    "v1": dict(
        fwd=[(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3)],
        dq=[(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
        dkdv=[(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3)],
        lists="torch",
    ),
    "v2": dict(
        fwd=[(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2), (128, 128, 4, 3)],
        dq=[(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 32, 4, 5)],
        dkdv=[(64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 128, 4, 5)],
        lists="triton",
    ),
}
# "tma": v2 with the forward's loads through tensor descriptors (`_bsa_fwd_tma_kernel`, Hopper TMA) where the
# layouts allow it (16-byte aligned base and strides; else v2's pointer kernel); "tma_ws": the same with Triton's
# warp specialization of the kept-block loop. Tuples of the TMA forward: (BLOCK_M, BLOCK_N, warps, stages, WS).
_CONFIG_SETS["tma"] = dict(
    _CONFIG_SETS["v2"],
    fwd_tma=[(128, 128, 8, 3, False), (128, 128, 8, 2, False), (128, 64, 8, 3, False), (128, 64, 4, 3, False),
             (128, 128, 4, 3, False)],
)
_CONFIG_SETS["tma_ws"] = dict(
    _CONFIG_SETS["v2"],
    fwd_tma=[(128, 128, 4, 3, True), (128, 128, 8, 3, True), (128, 64, 4, 3, True), (128, 128, 4, 2, True)],
)
# The default set, for a whole process: `BLADE_BSA_CONFIG_SET` (read once, at import) picks another, e.g.
# `BLADE_BSA_CONFIG_SET=v2` for the pointer forward everywhere (`config_set` for a block). tma_ws since session 13: its
# forward was never slower than v2's on an H100 (+1-8% Wan, +6-8% CogVideoX; BENCHMARKS.md "The TMA forward on a GPU")
# and the whole GPU tier (training, resume, both families' inference, compiled ASA) passed with it as every call's
# kernel. The backward is v2's in every set; GPUs before Hopper and layouts TMA cannot read take v2's forward.
DEFAULT_CONFIG_SET = "tma_ws"


def _config_set_from_env() -> str:
    name = os.environ.get("BLADE_BSA_CONFIG_SET", "").strip() or DEFAULT_CONFIG_SET
    if name not in _CONFIG_SETS:
        raise ValueError(f"BLADE_BSA_CONFIG_SET={name!r} is not a config set of the Triton block-sparse kernel; "
                         f"known: {sorted(_CONFIG_SETS)} (unset it for the default, {DEFAULT_CONFIG_SET!r})")
    return name


_ACTIVE = [_config_set_from_env()]
# Rows wider than this fall back to the torch list builder (the Triton one holds a whole row in registers).
_MAX_LIST_COLS = 8192
_LIST_KERNEL_FAILED: list = []
_GLOBAL_CONFIG = (64, 64, 4, 3)
_TUNED: dict = {}


@contextmanager
def config_set(name: str) -> Iterator[None]:
    """Run the kernels with the launch-configuration set `name` ("v1", "v2", "tma", "tma_ws") inside the block."""
    if name not in _CONFIG_SETS:
        raise ValueError(f"unknown config set {name!r}; known: {sorted(_CONFIG_SETS)}")
    previous = _ACTIVE[0]
    _ACTIVE[0] = name
    try:
        yield
    finally:
        _ACTIVE[0] = previous


# Whether the kernels were built by the Triton CPU interpreter (TRITON_INTERPRET=1 at import). A plain bool read
# once at import: torch.compile guards on it like on any constant (it cannot trace `type()` of a Triton kernel).
_INTERPRETING = triton is not None and type(_bsa_fwd_kernel).__name__ == "InterpretedFunction"


def _interpreting() -> bool:
    """True when the kernels were built by the Triton CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETING


def _interpret_tiles(block_size: int) -> tuple[int, int]:
    # Tiles below the mask block exercise the sub-tiling path even at interpreter sizes.
    tile = min(block_size, 64)
    return tile, tile


def _autotuned(name: str, kernel, configs, block_size: int, pre_hook=None):
    """An autotuner over `configs` restricted to tiles that divide the mask block, cached per (set, kernel, block).
    A config is (BLOCK_M, BLOCK_N, num_warps, num_stages[, WARP_SPECIALIZE])."""
    key = (_ACTIVE[0], name, block_size)
    if key not in _TUNED:
        fitting = [c for c in configs if c[0] <= block_size and c[1] <= block_size]
        if not fitting:
            fitting = [(min(block_size, c[0]), min(block_size, c[1]), *c[2:]) for c in configs[:1]]
        tconfigs = [
            triton.Config(_config_kwargs(c), num_warps=c[2], num_stages=c[3], pre_hook=pre_hook) for c in fitting
        ]
        _TUNED[key] = triton.autotune(configs=tconfigs, key=["HEAD_DIM", "MASK_BLOCK"])(kernel)
    return _TUNED[key]


def _config_kwargs(config: tuple) -> dict:
    kwargs = {"BLOCK_M": config[0], "BLOCK_N": config[1]}
    if len(config) > 4:
        kwargs["WARP_SPECIALIZE"] = config[4]
    return kwargs


def _launch(name: str, kernel, block_size: int, grid_fn, args: tuple, meta: dict, pre_hook=None) -> None:
    """Launch with a fixed config in the interpreter, one autotuned over the active set's configs on the GPU.
    ``pre_hook(nargs)`` gets this launch's arguments by name plus the chosen config's BLOCK_M / BLOCK_N (the TMA
    kernel sizes its descriptors there). It must read the launch's tensors from ``nargs``, never from a closure: the
    autotuner, cached per set and kernel, keeps the hook of its first launch for every later one."""
    configs = _CONFIG_SETS[_ACTIVE[0]][name]
    if _interpreting():
        bm, bn = _interpret_tiles(block_size)
        chosen = {**_config_kwargs((bm, bn, *configs[0][2:])), **meta}
        if pre_hook is not None:  # called as Triton's autotuner calls it: every argument by name, and the config
            pre_hook({**dict(zip(kernel.arg_names, args)), **chosen})
        kernel[grid_fn(chosen)](*args, **chosen)
    else:
        _autotuned(name, kernel, configs, block_size, pre_hook)[grid_fn](*args, **meta)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: tf32 tensor cores on the GPU, exact fp32 in the CPU interpreter (reference-grade tests).
    if dtype == torch.float32:
        return "ieee" if _interpreting() else "tf32"
    return "ieee"


# ----------------------------------------------------------------------------------------------------------------
# Forward / backward drivers
# ----------------------------------------------------------------------------------------------------------------


def _global_args(q: torch.Tensor, global_k, global_v):
    """Pointers and strides of the global segment (q as a harmless placeholder when absent)."""
    if global_k is None:
        return q, q, (0, 0, 0), (0, 0, 0), 0
    return global_k, global_v, _strides(global_k), _strides(global_v), global_k.shape[2]


def _forward(q, k, v, kv_count, kv_index, row_order, global_k, global_v, bias_log2, block_size, scale):
    """Runs the forward kernel. Returns out [B,H,Lq,D] and the base-2 LSE [B*H, NQ*bs] (fp32)."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    n_q_blocks = triton.cdiv(seq_q, block_size)
    n_k_blocks = triton.cdiv(seq_k, block_size)
    lse_stride = n_q_blocks * block_size
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch * heads, lse_stride), dtype=torch.float32, device=q.device)
    gk, gv, sgk, sgv, num_global = _global_args(q, global_k, global_v)
    gbias = bias_log2 if bias_log2 is not None else lse

    n_rows = batch * heads * n_q_blocks
    grid = lambda meta: (n_rows * (block_size // meta["BLOCK_M"]),)
    sizes = (heads, seq_q, seq_k, num_global, lse_stride, n_q_blocks, n_k_blocks, scale * _LOG2E)
    args = (
        q,
        k,
        v,
        out,
        lse,
        gk,
        gv,
        gbias,
        kv_count,
        kv_index,
        row_order,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        *sgk,
        *sgv,
        *sizes,
    )
    meta = dict(
        HEAD_DIM=head_dim,
        MASK_BLOCK=block_size,
        EVEN_K=seq_k % block_size == 0,
        HAS_GLOBAL=num_global > 0,
        HAS_BIAS=bias_log2 is not None,
        DOT_PRECISION=_dot_precision(q.dtype),
    )
    if _CONFIG_SETS[_ACTIVE[0]].get("fwd_tma") and _tma_ready(q, k, v, global_k, global_v):
        try:
            _forward_tma(q, k, v, out, lse, gbias, kv_count, kv_index, row_order, global_k, global_v, grid, sizes,
                         meta)
            return out, lse
        except Exception as err:  # a compiler problem must not take attention down: warn once, pointer kernel after
            _TMA_FAILED[_ACTIVE[0]] = repr(err)
            warnings.warn(f"TMA forward ({_ACTIVE[0]}) failed ({err!r}); using the pointer kernel", stacklevel=2)
    _launch("fwd", _bsa_fwd_kernel, block_size, grid, args, meta)
    return out, lse


# Config sets whose TMA forward failed to compile or launch (name -> error): they use the pointer kernel from then on.
_TMA_FAILED: dict = {}


def _tma_ready(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether tensor descriptors can read these ``[B, H, L, D]`` tensors: Triton has them, the GPU is Hopper or
    newer (or the CPU interpreter runs), no earlier TMA launch of the active set failed, and every base address and
    outer stride is 16-byte aligned with a unit last stride (TMA's rule)."""
    present = [t for t in tensors if t is not None]
    if TensorDescriptor is None or _ACTIVE[0] in _TMA_FAILED:
        return False
    if not _interpreting() and not (present[0].is_cuda and torch.cuda.get_device_capability(present[0].device)[0] >= 9):
        return False
    return all(
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all((stride * t.element_size()) % 16 == 0 for stride in t.stride()[:-1])
        for t in present
    )


def _forward_tma(q, k, v, out, lse, gbias, kv_count, kv_index, row_order, global_k, global_v, grid, sizes, meta):
    """`_bsa_fwd_tma_kernel` on descriptors of q, k, v (and the global tokens; k's stand in when there are none),
    their block shapes set per launch configuration. ``grid``, ``sizes``, ``meta``: the pointer kernel's."""
    head_dim = q.shape[-1]
    describe = lambda t: TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, head_dim])
    descs = [describe(q), describe(k), describe(v)]
    descs += [describe(global_k) if global_k is not None else descs[1]]
    descs += [describe(global_v) if global_v is not None else descs[2]]
    tma_args = (*descs, out, lse, gbias, kv_count, kv_index, row_order, *_strides(out), *sizes)
    _launch("fwd_tma", _bsa_fwd_tma_kernel, meta["MASK_BLOCK"], grid, tma_args, meta, pre_hook=_tma_block_shapes)


def _tma_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook of `_bsa_fwd_tma_kernel`: its descriptors' blocks ``[1, 1, rows, D]`` for the config, q's
    ``BLOCK_M`` rows, the others' ``BLOCK_N``; from ``nargs`` (this launch's descriptors, see `_launch`)."""
    for name in ("desc_q", "desc_k", "desc_v", "desc_gk", "desc_gv"):
        rows = nargs["BLOCK_M"] if name == "desc_q" else nargs["BLOCK_N"]
        nargs[name].block_shape = [1, 1, rows, nargs["HEAD_DIM"]]


def _backward(
    do, q, k, v, out, lse, kv_count, kv_index, row_order, global_k, global_v, bias_log2, block_size, scale
):
    """Runs the backward kernels. Returns dq, dk, dv and (dglobal_k, dglobal_v) or (None, None)."""
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    n_q_blocks = triton.cdiv(seq_q, block_size)
    n_k_blocks = triton.cdiv(seq_k, block_size)
    lse_stride = lse.shape[1]
    precision = _dot_precision(q.dtype)
    qk_scale = scale * _LOG2E
    do = do if do.stride(-1) == 1 else do.contiguous()

    delta = torch.empty_like(lse)
    # A divisor of the padded row count, so the padded LSE/delta buffers are never overrun.
    delta_block = min(block_size, 64 if _interpreting() else 128)
    _bsa_bwd_delta_kernel[(triton.cdiv(lse_stride, delta_block), batch * heads)](
        out,
        do,
        delta,
        *_strides(out),
        *_strides(do),
        heads,
        seq_q,
        lse_stride,
        HEAD_DIM=head_dim,
        BLOCK=delta_block,
    )

    gk, gv, sgk, sgv, num_global = _global_args(q, global_k, global_v)
    gbias = bias_log2 if bias_log2 is not None else lse
    common_meta = dict(HEAD_DIM=head_dim, MASK_BLOCK=block_size, DOT_PRECISION=precision)

    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    n_rows = batch * heads * n_q_blocks
    dq_args = (
        q,
        k,
        v,
        do,
        dq,
        lse,
        delta,
        gk,
        gv,
        gbias,
        kv_count,
        kv_index,
        row_order,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        *_strides(dq),
        *sgk,
        *sgv,
        heads,
        seq_q,
        seq_k,
        num_global,
        lse_stride,
        n_q_blocks,
        n_k_blocks,
        qk_scale,
        scale,
    )
    dq_meta = dict(
        common_meta, EVEN_K=seq_k % block_size == 0, HAS_GLOBAL=num_global > 0, HAS_BIAS=bias_log2 is not None
    )
    _launch(
        "dq",
        _bsa_bwd_dq_kernel,
        block_size,
        lambda meta: (n_rows * (block_size // meta["BLOCK_M"]),),
        dq_args,
        dq_meta,
    )

    # Transposed lists (per kv block, the query blocks that use it): only the backward needs them.
    q_count, q_index, col_order = _transposed_lists(kv_count, kv_index, batch, heads)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    n_cols = batch * heads * n_k_blocks
    dkdv_args = (
        q,
        k,
        v,
        do,
        dk,
        dv,
        lse,
        delta,
        q_count,
        q_index,
        col_order,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(do),
        *_strides(dk),
        *_strides(dv),
        heads,
        seq_q,
        seq_k,
        lse_stride,
        n_q_blocks,
        n_k_blocks,
        qk_scale,
        scale,
    )
    dkdv_meta = dict(common_meta, EVEN_Q=seq_q % block_size == 0)
    _launch(
        "dkdv",
        _bsa_bwd_dkdv_kernel,
        block_size,
        lambda meta: (n_cols * (block_size // meta["BLOCK_N"]),),
        dkdv_args,
        dkdv_meta,
    )

    if num_global == 0:
        return dq, dk, dv, None, None
    if _interpreting():
        bm, bn = _interpret_tiles(block_size)
        warps, stages = 4, 1
    else:
        bm, bn, warps, stages = _GLOBAL_CONFIG
    bn = max(16, min(bn, triton.next_power_of_2(num_global)))
    chunk_len = triton.cdiv(triton.cdiv(seq_q, triton.cdiv(seq_q, _GLOBAL_CHUNK)), 128) * 128
    n_chunks = triton.cdiv(seq_q, chunk_len)
    dgk = torch.empty((n_chunks, batch * heads, num_global, head_dim), dtype=torch.float32, device=q.device)
    dgv = torch.empty_like(dgk)
    _bsa_bwd_global_kernel[(n_chunks * triton.cdiv(num_global, bn), batch * heads)](
        q,
        gk,
        gv,
        do,
        dgk,
        dgv,
        lse,
        delta,
        gbias,
        *_strides(q),
        *sgk,
        *sgv,
        *_strides(do),
        heads,
        seq_q,
        num_global,
        lse_stride,
        chunk_len,
        qk_scale,
        scale,
        HEAD_DIM=head_dim,
        HAS_BIAS=bias_log2 is not None,
        DOT_PRECISION=precision,
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=warps,
        num_stages=stages,
    )
    shape = (batch, heads, num_global, head_dim)
    dgk = dgk.sum(0).view(shape).to(global_k.dtype)
    dgv = dgv.sum(0).view(shape).to(global_v.dtype)
    return dq, dk, dv, dgk, dgv


def _kernel_layout(q, k, v, global_k, global_v, *flat: Optional[torch.Tensor]) -> tuple:
    """The layouts the kernels index with: q, k, v with a unit last stride, the rest contiguous. No-ops (no copy)
    on what `triton_block_sparse_attention` passes; a guard on the layouts a compiler may pick for op inputs."""
    contiguous = lambda t: None if t is None else t.contiguous()
    return (
        *(_last_dim_contiguous(t) for t in (q, k, v)),
        *(contiguous(t) for t in (global_k, global_v, *flat)),
    )


# The ops are registered once per process: a re-import (importlib.reload in the tests) re-executes this file in the
# same module namespace, so the registered implementations already call the reloaded helpers.
def _register_ops() -> None:
    @torch.library.custom_op("blade::bsa_block_lists", mutates_args=())
    def lists(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`block_lists` of a bool `[B, H, R, C]` mask."""
        return _block_lists_eager(dense)

    @lists.register_fake
    def _(dense):
        new = lambda *shape: dense.new_empty(shape, dtype=torch.int32)
        return new(*dense.shape[:-1]), new(*dense.shape)

    @torch.library.custom_op("blade::bsa_forward", mutates_args=())
    def forward(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_count: torch.Tensor,
        kv_index: torch.Tensor,
        row_order: torch.Tensor,
        global_k: Optional[torch.Tensor],
        global_v: Optional[torch.Tensor],
        bias_log2: Optional[torch.Tensor],
        block_size: int,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Out `[B, H, Lq, D]` and the base-2 LSE `[B*H, NQ*bs]` (the lists are `kernel_lists`')."""
        q, k, v, global_k, global_v, kv_count, kv_index, row_order, bias_log2 = _kernel_layout(
            q, k, v, global_k, global_v, kv_count, kv_index, row_order, bias_log2
        )
        return _forward(q, k, v, kv_count, kv_index, row_order, global_k, global_v, bias_log2, block_size, scale)

    @forward.register_fake
    def _(q, k, v, kv_count, kv_index, row_order, global_k, global_v, bias_log2, block_size, scale):
        batch, heads, seq_q, _ = q.shape
        lse_len = -(-seq_q // block_size) * block_size
        return q.new_empty(q.shape), q.new_empty((batch * heads, lse_len), dtype=torch.float32)

    @torch.library.custom_op("blade::bsa_backward", mutates_args=())
    def backward(
        grad_out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        kv_count: torch.Tensor,
        kv_index: torch.Tensor,
        row_order: torch.Tensor,
        global_k: Optional[torch.Tensor],
        global_v: Optional[torch.Tensor],
        bias_log2: Optional[torch.Tensor],
        block_size: int,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """dq, dk, dv and dglobal_k, dglobal_v (empty placeholders without global tokens: ops return tensors)."""
        q, k, v, global_k, global_v, kv_count, kv_index, row_order, bias_log2, lse = _kernel_layout(
            q, k, v, global_k, global_v, kv_count, kv_index, row_order, bias_log2, lse
        )
        out = _last_dim_contiguous(out)
        dq, dk, dv, dgk, dgv = _backward(
            grad_out, q, k, v, out, lse, kv_count, kv_index, row_order, global_k, global_v, bias_log2,
            block_size, scale,
        )  # fmt: skip
        if dgk is None:
            dgk, dgv = q.new_empty(0), q.new_empty(0)
        return dq, dk, dv, dgk, dgv

    @backward.register_fake
    def _(grad_out, q, k, v, out, lse, kv_count, kv_index, row_order, global_k, global_v, *rest):
        if global_k is None:
            dgk, dgv = q.new_empty(0), q.new_empty(0)
        else:
            dgk, dgv = global_k.new_empty(global_k.shape), global_v.new_empty(global_v.shape)
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgk, dgv

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, kv_count, kv_index, row_order, global_k, global_v, bias_log2, block_size, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, kv_count, kv_index, row_order, global_k, global_v, bias_log2)
        ctx.block_size, ctx.scale = block_size, scale

    def grad(ctx, grad_out, grad_lse):
        q, k, v, out, lse, kv_count, kv_index, row_order, global_k, global_v, bias_log2 = ctx.saved_tensors
        dq, dk, dv, dgk, dgv = torch.ops.blade.bsa_backward(
            grad_out, q, k, v, out, lse, kv_count, kv_index, row_order, global_k, global_v, bias_log2,
            ctx.block_size, ctx.scale,
        )  # fmt: skip
        if global_k is None:
            dgk = dgv = None
        # The LSE is internal (never differentiated); the lists, bias and sizes get no gradient.
        return dq, dk, dv, None, None, None, dgk, dgv, None, None, None

    forward.register_autograd(grad, setup_context=setup_context)


if not hasattr(torch.ops.blade, "bsa_forward"):
    _register_ops()


# ----------------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------------


def _validate(q, k, v, block_mask: BlockMask, block_size, global_k, global_v, global_bias) -> None:
    """Raises ValueError for configurations this kernel does not handle (the dispatcher then falls back)."""
    if triton is None:
        raise ValueError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be [B, H, L, D]")
    batch, heads, seq_q, head_dim = q.shape
    if k.shape[:2] != (batch, heads) or v.shape != k.shape or k.shape[-1] != head_dim:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if head_dim not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} not supported by the triton kernel (supported: {_SUPPORTED_HEAD_DIMS})")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"unsupported dtypes {q.dtype}, {k.dtype}, {v.dtype}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if q.device.type != "cuda" and not _interpreting():
        raise ValueError("the triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if seq_q == 0 or k.shape[2] == 0:
        raise ValueError("empty sequences are not supported by the triton kernel")
    n_q_blocks, n_k_blocks = -(-seq_q // block_size), -(-k.shape[2] // block_size)
    if len(block_mask.shape) != 4 or tuple(block_mask.shape[-2:]) != (n_q_blocks, n_k_blocks):
        raise ValueError(f"block_mask must be [B, H, {n_q_blocks}, {n_k_blocks}], got {tuple(block_mask.shape)}")
    if block_mask.shape[0] not in (1, batch) or block_mask.shape[1] not in (1, heads):
        raise ValueError(f"block_mask batch/head dims {tuple(block_mask.shape[:2])} do not broadcast to {batch, heads}")
    if (global_k is None) != (global_v is None):
        raise ValueError("global_k and global_v must be given together")
    if global_k is not None:
        if global_k.dim() != 4 or global_k.shape[:2] != (batch, heads) or global_k.shape[-1] != head_dim:
            raise ValueError(f"global_k must be [B, H, G, D], got {tuple(global_k.shape)}")
        if global_v.shape != global_k.shape or global_k.dtype != q.dtype or global_v.dtype != q.dtype:
            raise ValueError("global_v must match global_k in shape and q in dtype")
        if global_bias is not None and global_bias.shape != (global_k.shape[2],):
            raise ValueError(f"global_bias must be [G], got {tuple(global_bias.shape)}")
    elif global_bias is not None:
        raise ValueError("global_bias given without global tokens")


def supports(q: torch.Tensor, block_size: int) -> bool:
    """Whether the kernel takes inputs like `q` [B, H, L, D] with this mask block size (the dispatcher asks)."""
    return (
        triton is not None
        and (q.is_cuda or _interpreting())
        and q.dtype in _SUPPORTED_DTYPES
        and q.shape[-1] in _SUPPORTED_HEAD_DIMS
        and block_size >= 16
        and block_size & (block_size - 1) == 0
    )


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask | torch.Tensor,
    *,
    block_size: int = 128,
    scale: Optional[float] = None,
    global_k: Optional[torch.Tensor] = None,
    global_v: Optional[torch.Tensor] = None,
    global_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact attention over the kept blocks of `block_mask` plus optional global tokens, differentiable.

    Args:
        q: `[B, H, Lq, D]`, k, v: `[B, H, Lk, D]` (fp16/bf16, or fp32 computed in tf32 on the GPU).
        block_mask: `BlockMask` (or its bool form) `[B|1, H|1, ceil(Lq/bs), ceil(Lk/bs)]`; the kernels walk its
            index lists (built by `block_lists` when it holds only a dense mask).
        block_size: tokens per mask block (power of two).
        scale: logit scale, default `1/sqrt(D)`.
        global_k, global_v: `[B, H, G, D]` tokens visible to every query.
        global_bias: `[G]` additive bias on their scaled logits (no gradient flows into it).

    Returns:
        `[B, H, Lq, D]` in q's dtype.

    Raises:
        ValueError: for configurations the kernel does not support.
    """
    block_mask = as_block_mask(block_mask)
    _validate(q, k, v, block_mask, block_size, global_k, global_v, global_bias)
    batch, heads = q.shape[:2]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    mask = block_mask.to(q.device)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if _interpreting() and q.dtype == torch.bfloat16:
        # The CPU interpreter's tl.dot mishandles bf16 operands: emulate in fp32 (GPU runs use bf16 tensor cores).
        to32 = lambda t: None if t is None else t.float()
        out = triton_block_sparse_attention(
            q.float(),
            k.float(),
            v.float(),
            mask,
            block_size=block_size,
            scale=scale,
            global_k=to32(global_k),
            global_v=to32(global_v),
            global_bias=global_bias,
        )
        return out.to(torch.bfloat16)
    bias_log2 = None
    if global_k is not None:
        global_k, global_v = global_k.contiguous(), global_v.contiguous()
        if global_bias is not None:
            bias_log2 = (global_bias.detach().to(device=q.device, dtype=torch.float32) * _LOG2E).contiguous()
    kv_count, kv_index, row_order = kernel_lists(mask, batch, heads)
    out, _ = torch.ops.blade.bsa_forward(
        q, k, v, kv_count, kv_index, row_order, global_k, global_v, bias_log2, block_size, scale
    )
    return out
