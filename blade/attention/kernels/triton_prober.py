"""Fused Triton kernels for the ASA prober: block importance from sampled tokens without the sampled score matrix.

Same semantics as ``blade.attention.prober.block_importance`` (the torch reference and CPU path): the sampled
queries attend to all sampled keys (one softmax per sampled query), every ``samples x samples`` tile of the
probabilities is max-pooled into a block importance, and each query-block row is normalised to sum 1.

Because ``exp`` is monotonic, the max-pool of a tile's probabilities is ``exp(max_j s_ij - m_i) / l_i`` maximised
over the tile's query rows ``i``: it only needs, per sampled query, the max logit of each key block. So one pass
over the sampled keys suffices:

1. ``_scores_kernel`` -- one program per (batch*head, tile of sampled queries); it loads the sampled query rows
   straight from ``q`` at their positions (no gathered copy), walks all sampled keys once and writes the row
   max ``m`` and row sum ``l`` of the online softmax (base 2) and the per-key-block max logit ``g [Nq*s, Nk]``.
2. ``_pool_kernel`` -- ``importance[qb, kb] = max_{i in qb} exp2(g[i, kb] - m_i) / l_i``.

The row normalisation is one torch op on the small ``[B, H, Nq, Nk]`` result. Then

3. ``_select_kernel`` -- one program per query-block row: the threshold + clamp selection of ``rank_blocks`` and
   the kernels' index lists of ``BlockMask.from_ranked`` (dense tail included), in one launch where the torch path
   takes ~20 small ops (``select_lists``; the prober's ``blade::prober_select``).

The prober calls the launches through its opaque custom op ``blade::prober_importance`` (``attention/prober.py``),
so ``torch.compile`` keeps a model that calls the prober in one graph.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: Optional[BaseException] = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = exc

__all__ = ["is_available", "supports", "sampled_block_importance", "select_lists"]

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (BLOCK_QS, BLOCK_KS, num_warps, num_stages) of the score kernel; tiles must be multiples of `samples`.
_SCORE_CONFIGS = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
_TUNED: dict = {}


def is_available() -> bool:
    """True when triton can be imported."""
    return triton is not None


def supports(q: torch.Tensor, samples: int) -> bool:
    """Whether the fused prober takes ``q [B, H, L, D]`` with this many samples per block."""
    head_dim = q.shape[-1]
    return (
        triton is not None
        and (q.is_cuda or _interpreting())
        and q.dtype in _SUPPORTED_DTYPES
        and 16 <= head_dim <= 256
        and head_dim & (head_dim - 1) == 0
        and 1 <= samples <= 64
        and samples & (samples - 1) == 0
    )


if triton is not None:

    @triton.jit
    def _scores_kernel(
        Q,
        K,
        QPOS,
        KPOS,
        G,
        M,
        L,
        sq_b,
        sq_h,
        sq_l,
        sk_b,
        sk_h,
        sk_l,
        num_heads,
        n_qs,
        n_ks,
        n_k_blocks,
        qk_scale,
        HEAD_DIM: tl.constexpr,
        SAMPLES: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_QS: tl.constexpr,
        BLOCK_KS: tl.constexpr,
    ):
        """Online softmax stats (base 2) of the sampled queries and their max logit per key block.

        G is fp32 ``[B*H, n_qs, n_k_blocks]``, M and L fp32 ``[B*H, n_qs]``.
        """
        GROUPS: tl.constexpr = BLOCK_KS // SAMPLES
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // num_heads).to(tl.int64)
        h = (bh % num_heads).to(tl.int64)
        bh64 = bh.to(tl.int64)

        rows = pid * BLOCK_QS + tl.arange(0, BLOCK_QS)
        row_ok = rows < n_qs
        offs_d = tl.arange(0, HEAD_DIM)
        q_pos = tl.load(QPOS + bh64 * n_qs + rows, mask=row_ok, other=0)
        q = tl.load(Q + b * sq_b + h * sq_h + q_pos[:, None] * sq_l + offs_d[None, :], mask=row_ok[:, None], other=0.0)

        m_i = tl.full([BLOCK_QS], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_QS], dtype=tl.float32)
        k_base = K + b * sk_b + h * sk_h
        offs_g = tl.arange(0, GROUPS)
        g_rows = G + (bh64 * n_qs + rows[:, None]) * n_k_blocks
        for start in range(0, n_ks, BLOCK_KS):
            cols = start + tl.arange(0, BLOCK_KS)
            col_ok = cols < n_ks
            k_pos = tl.load(KPOS + bh64 * n_ks + cols, mask=col_ok, other=0)
            k = tl.load(k_base + k_pos[:, None] * sk_l + offs_d[None, :], mask=col_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(col_ok[None, :], s, float("-inf"))
            # Key blocks hold exactly SAMPLES sampled keys each, so a group never straddles two blocks.
            group_max = tl.max(tl.reshape(s, (BLOCK_QS, GROUPS, SAMPLES)), axis=2)
            k_blocks = start // SAMPLES + offs_g
            tl.store(g_rows + k_blocks[None, :], group_max, mask=row_ok[:, None] & (k_blocks[None, :] < n_k_blocks))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        tl.store(M + bh64 * n_qs + rows, m_i, mask=row_ok)
        tl.store(L + bh64 * n_qs + rows, l_i, mask=row_ok)

    @triton.jit
    def _pool_kernel(
        G,
        M,
        L,
        IMP,
        n_q_blocks,
        n_k_blocks,
        SAMPLES: tl.constexpr,
        QB: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """IMP[bh, qb, kb] = max over the SAMPLES queries i of block qb of exp2(G[i, kb] - M[i]) / L[i]."""
        ROWS: tl.constexpr = QB * SAMPLES
        pid = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        n_qs = n_q_blocks * SAMPLES
        rows = pid * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_qs
        m = tl.load(M + bh * n_qs + rows, mask=row_ok, other=0.0)
        inv_l = 1.0 / tl.load(L + bh * n_qs + rows, mask=row_ok, other=1.0)
        q_blocks = pid * QB + tl.arange(0, QB)
        for start in range(0, n_k_blocks, BLOCK_K):
            k_blocks = start + tl.arange(0, BLOCK_K)
            k_ok = k_blocks < n_k_blocks
            g = tl.load(
                G + (bh * n_qs + rows[:, None]) * n_k_blocks + k_blocks[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=float("-inf"),
            )
            p = tl.math.exp2(g - m[:, None]) * inv_l[:, None]
            pooled = tl.max(tl.reshape(p, (QB, SAMPLES, BLOCK_K)), axis=1)
            out = IMP + (bh * n_q_blocks + q_blocks[:, None]) * n_k_blocks + k_blocks[None, :]
            tl.store(out, pooled, mask=(q_blocks[:, None] < n_q_blocks) & k_ok[None, :])


    @triton.jit
    def _select_kernel(
        IMP,
        COUNTS,
        INDEX,
        n_q_blocks,
        n_k_blocks,
        threshold,
        low,
        high,
        rows_from,
        cols_from,
        NK: tl.constexpr,
    ):
        """One program per query-block row: ``prober.rank_blocks`` + ``block_mask._ranked_to_lists`` in one pass.

        Ranks the row's (normalised) importance by a stable descending sort (int64 keys: the float's bits, then the
        reversed column, so ties go to the lower column), keeps the top blocks until their cumulative mass reaches
        ``threshold`` (the crossing block included; count clamped to ``[low, high]``), and writes the kernels'
        lists: ``COUNTS[r]`` and ``INDEX[r, :]`` (kept blocks in increasing order, then the dense tail columns
        ``cols_from ...``, then zeros); rows ``qb >= rows_from`` keep every block. No tail: ``rows_from =
        n_q_blocks``, ``cols_from = n_k_blocks``.
        """
        r = tl.program_id(0).to(tl.int64)
        q_block = r % n_q_blocks
        cols = tl.arange(0, NK)
        ok = cols < n_k_blocks
        imp = tl.load(IMP + r * n_k_blocks + cols, mask=ok, other=0.0)
        bits = imp.to(tl.int32, bitcast=True)  # importance >= 0: the bits order as the floats
        key = bits.to(tl.int64) * 4294967296 + (n_k_blocks - 1 - cols).to(tl.int64)
        key = tl.where(ok, key, -9223372036854775807)  # padding sorts last
        ranked_key = tl.sort(key, descending=True)
        ranked = (n_k_blocks - 1 - (ranked_key & 0xFFFFFFFF)).to(tl.int32)
        value = (ranked_key >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        cumulative = tl.cumsum(tl.where(ok, value, 0.0), 0)
        count = tl.sum(((cumulative < threshold) & (cols < high)).to(tl.int32), 0) + 1
        count = tl.minimum(tl.maximum(count, low), high)
        keep = (cols < count) & (ranked < cols_from)  # tail columns are appended below, once
        n_kept = tl.sum(keep.to(tl.int32), 0)
        kept = tl.sort(tl.where(keep, ranked, n_k_blocks))  # increasing, dropped entries (n_k_blocks) last
        n_tail = n_k_blocks - cols_from
        index = tl.where(cols < n_kept, kept, 0)
        index = tl.where((cols >= n_kept) & (cols < n_kept + n_tail), cols_from + cols - n_kept, index)
        total = n_kept + n_tail
        dense_row = q_block >= rows_from
        index = tl.where(dense_row, cols, index)
        total = tl.where(dense_row, n_k_blocks, total)
        tl.store(INDEX + r * n_k_blocks + cols, index.to(tl.int32), mask=ok)
        tl.store(COUNTS + r, total.to(tl.int32))


# Whether the kernels were built by the Triton CPU interpreter (TRITON_INTERPRET=1 at import): a constant for
# torch.compile (which cannot trace `type()` of a Triton kernel).
_INTERPRETING = triton is not None and type(_scores_kernel).__name__ == "InterpretedFunction"


def _interpreting() -> bool:
    """True when the kernels were built by the Triton CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETING


def _score_kernel_for(samples: int):
    """The score kernel autotuned over the configs whose tiles hold whole blocks of samples (cached)."""
    if samples not in _TUNED:
        fitting = [c for c in _SCORE_CONFIGS if c[0] % samples == 0 and c[1] % samples == 0]
        configs = [
            triton.Config({"BLOCK_QS": bq, "BLOCK_KS": bk}, num_warps=w, num_stages=s) for bq, bk, w, s in fitting
        ]
        _TUNED[samples] = triton.autotune(configs=configs, key=["HEAD_DIM", "SAMPLES"])(_scores_kernel)
    return _TUNED[samples]


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def sampled_block_importance(
    q: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor, samples: int
) -> torch.Tensor:
    """Block importance of the sampled tokens, fused (no ``[Nq*s, Nk*s]`` score matrix in memory).

    Args:
        q: ``[B, H, Lq, D]``; k: ``[B, H, Lk, D]``.
        q_positions: int ``[B, H, Nq*s]``, k_positions: int ``[B, H, Nk*s]`` -- token positions, block-major
            (entries ``j*s ... (j+1)*s-1`` lie in block ``j``), as drawn by ``prober.sample_block_positions``.
        samples: ``s``, a power of two <= 64.
    Returns:
        float32 ``[B, H, Nq, Nk]``, each row summing to 1.
    """
    if not supports(q, samples):
        raise ValueError(f"fused prober does not support {q.dtype} {tuple(q.shape)} on {q.device} with s={samples}")
    return _block_importance(q, k, q_positions, k_positions, samples)


def _block_importance(
    q: torch.Tensor, k: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor, samples: int
) -> torch.Tensor:
    """`sampled_block_importance` without the input check (the two launches and the row normalisation)."""
    batch, heads, _, head_dim = q.shape
    n_qs, n_ks = q_positions.shape[-1], k_positions.shape[-1]
    n_q_blocks, n_k_blocks = n_qs // samples, n_ks // samples
    interpreting = _interpreting()
    if interpreting and q.dtype == torch.bfloat16:
        # The CPU interpreter's tl.dot mishandles bf16 operands; bf16 -> fp32 is exact, so nothing changes.
        q, k = q.float(), k.float()
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_positions = q_positions.reshape(batch * heads, n_qs).contiguous()
    k_positions = k_positions.reshape(batch * heads, n_ks).contiguous()

    dev = q.device
    g = torch.empty((batch * heads, n_qs, n_k_blocks), dtype=torch.float32, device=dev)
    m = torch.empty((batch * heads, n_qs), dtype=torch.float32, device=dev)
    l_sum = torch.empty_like(m)
    args = (q, k, q_positions, k_positions, g, m, l_sum, *_strides(q), *_strides(k), heads, n_qs, n_ks, n_k_blocks)
    # fp32 inputs keep exact fp32 products (the mask must not depend on tf32 rounding).
    meta = dict(HEAD_DIM=head_dim, SAMPLES=samples, DOT_PRECISION="ieee")
    qk_scale = head_dim**-0.5 * _LOG2E
    if interpreting:
        tile = max(16, samples)
        _scores_kernel[(triton.cdiv(n_qs, tile), batch * heads)](*args, qk_scale, **meta, BLOCK_QS=tile, BLOCK_KS=tile)
    else:
        grid = lambda cfg: (triton.cdiv(n_qs, cfg["BLOCK_QS"]), batch * heads)
        _score_kernel_for(samples)[grid](*args, qk_scale, **meta)

    importance = torch.empty((batch, heads, n_q_blocks, n_k_blocks), dtype=torch.float32, device=dev)
    qb = max(1, 64 // samples)
    block_k = 16 if interpreting else 64
    _pool_kernel[(triton.cdiv(n_q_blocks, qb), batch * heads)](
        g, m, l_sum, importance, n_q_blocks, n_k_blocks, SAMPLES=samples, QB=qb, BLOCK_K=block_k
    )
    return importance / importance.sum(dim=-1, keepdim=True)


def select_lists(
    importance: torch.Tensor,
    threshold: float,
    low: int,
    high: int,
    dense_rows_from: Optional[int] = None,
    dense_cols_from: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prober's selection and the kernels' lists in one launch (``_select_kernel``).

    Args:
        importance: float32 ``[B, H, Nq, Nk]``, rows summing to 1 (``sampled_block_importance``).
        threshold, low, high: as ``prober.rank_blocks`` (``low``/``high`` the clamped counts).
        dense_rows_from, dense_cols_from: the dense tail, as ``BlockMask.from_ranked``.
    Returns:
        ``kv_num_blocks`` int32 ``[B, H, Nq]`` and ``kv_indices`` int32 ``[B, H, Nq, Nk]``: what
        ``BlockMask.from_ranked(*prober.rank_blocks(...))`` holds (up to the float order of the cumulative sum).
    """
    batch, heads, n_q_blocks, n_k_blocks = importance.shape
    importance = importance.float().contiguous()
    counts = torch.empty((batch, heads, n_q_blocks), dtype=torch.int32, device=importance.device)
    index = torch.empty((batch, heads, n_q_blocks, n_k_blocks), dtype=torch.int32, device=importance.device)
    rows_from = n_q_blocks if dense_rows_from is None else int(dense_rows_from)
    cols_from = n_k_blocks if dense_cols_from is None else int(dense_cols_from)
    _select_kernel[(batch * heads * n_q_blocks,)](
        importance, counts, index, n_q_blocks, n_k_blocks, float(threshold), int(low), int(high), rows_from,
        cols_from, NK=triton.next_power_of_2(n_k_blocks),
    )
    return counts, index
