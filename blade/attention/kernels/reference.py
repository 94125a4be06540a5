"""Exact block-sparse attention in plain torch: the ground truth every other backend is tested against.

Works for any float dtype (float64 included) on any device. The softmax runs in float32 (float64 for float64
inputs). Query blocks are processed in chunks so the ``[B, H, chunk, Lk]`` score tile stays bounded; under autograd
each chunk is checkpointed, so the backward recomputes the chunk instead of keeping every score tile alive.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from ..block_mask import BlockMask, as_block_mask

# Budget for one chunk's float32 score tile (elements); ~128 MiB at float32.
_CHUNK_SCORE_ELEMENTS = 32 * 1024 * 1024


def expand_block_mask(block_mask: torch.Tensor, block_size: int, q_len: int, k_len: int) -> torch.Tensor:
    """Token-level mask from a block mask.

    Args:
        block_mask: bool ``[..., Nq_blocks, Nk_blocks]``.
    Returns:
        bool ``[..., q_len, k_len]``; ragged last blocks are cut to the real lengths.
    """
    token_mask = block_mask.repeat_interleave(block_size, dim=-2)[..., :q_len, :]
    return token_mask.repeat_interleave(block_size, dim=-1)[..., :k_len]


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where ``mask`` is True; rows with nothing visible give zeros (not NaN)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(scores - row_max)  # exp(-inf) = 0 for hidden entries
    denom = weights.sum(dim=-1, keepdim=True)
    return weights / denom.clamp_min(torch.finfo(weights.dtype).tiny)


def _attend_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_block_mask: torch.Tensor,
    block_size: int,
    k_len: int,
    scale: float,
    global_k: torch.Tensor | None,
    global_v: torch.Tensor | None,
    global_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Attention for one chunk of queries ``q [B, H, c, D]`` against all keys, in the compute dtype of ``k``."""
    c = q.shape[-2]
    mask = expand_block_mask(token_block_mask, block_size, c, k_len)  # [B|1, H|1, c, Lk]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, c, Lk]
    values = v
    if global_k is not None:
        g_scores = torch.matmul(q, global_k.transpose(-1, -2)) * scale  # [B, H, c, G]
        if global_bias is not None:
            g_scores = g_scores + global_bias
        scores = torch.cat([scores, g_scores], dim=-1)
        g_mask = torch.ones(mask.shape[:-1] + (global_k.shape[-2],), dtype=torch.bool, device=mask.device)
        mask = torch.cat([mask, g_mask], dim=-1)
        values = torch.cat([v, global_v], dim=-2)
    probs = _masked_softmax(scores, mask)
    return torch.matmul(probs, values)


def reference_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask | torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    global_k: torch.Tensor | None = None,
    global_v: torch.Tensor | None = None,
    global_bias: torch.Tensor | None = None,
    chunk_blocks: int | None = None,
) -> torch.Tensor:
    """Masked attention over kept ``block_size x block_size`` tiles (+ optional always-visible global tokens).

    Args:
        q: ``[B, H, Lq, D]``.
        k, v: ``[B, H, Lk, D]``.
        block_mask: ``BlockMask`` (or its bool form) ``[B|1, H|1, ceil(Lq/bs), ceil(Lk/bs)]``, True = attend; this
            backend reads the dense form.
        global_k, global_v: optional ``[B, H, G, D]`` keys/values visible to every query.
        global_bias: optional float ``[G]`` added to the scaled global scores.
        chunk_blocks: query blocks per chunk (default: from a memory budget).
    Returns:
        ``[B, H, Lq, D]`` in the dtype of ``q``.
    """
    dense = as_block_mask(block_mask).dense()
    out_dtype = q.dtype
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[-2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    n_q_blocks = math.ceil(q_len / block_size)

    qc, kc, vc = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    gk = global_k.to(compute_dtype) if global_k is not None else None
    gv = global_v.to(compute_dtype) if global_v is not None else None
    gb = global_bias.to(device=q.device, dtype=compute_dtype) if global_bias is not None else None

    if chunk_blocks is None:
        per_block = batch * heads * block_size * (k_len + (gk.shape[-2] if gk is not None else 0))
        chunk_blocks = max(1, _CHUNK_SCORE_ELEMENTS // max(per_block, 1))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, global_k, global_v)
    )

    outputs = []
    for first in range(0, n_q_blocks, chunk_blocks):
        last = min(first + chunk_blocks, n_q_blocks)
        q_chunk = qc[:, :, first * block_size : min(last * block_size, q_len)]
        mask_chunk = dense[:, :, first:last]
        args = (q_chunk, kc, vc, mask_chunk, block_size, k_len, scale, gk, gv, gb)
        if needs_grad and n_q_blocks > chunk_blocks:
            # Recompute the chunk's scores in the backward instead of storing all of them.
            outputs.append(checkpoint(_attend_chunk, *args, use_reentrant=False))
        else:
            outputs.append(_attend_chunk(*args))
    return torch.cat(outputs, dim=-2).to(out_dtype)
