"""Block-sparse attention that gathers each query block's kept key blocks: plain torch, work ~ the kept fraction.

The CPU path of ``auto`` (eager mode). The reference backend computes every score and masks most of them away, so
its cost is that of dense attention and more; here each query block attends, through the fused SDPA, to a packed
``[K_max * bs (+ G), D]`` copy of its kept key blocks (``K_max`` = the most blocks any row keeps) and the global
tokens, so the work shrinks with the mask. Exact (the same softmax, in float32 or float64 as the inputs come; half
precision is computed in float32) and differentiable through autograd.

The packed width ``K_max`` is read from the mask's kept counts (a host sync), so this path is for eager use; under
``torch.compile`` ``auto`` keeps the reference backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..block_mask import BlockMask, as_block_mask

# Budget for one chunk's packed keys + score tile (float elements); ~256 MiB at float32.
_CHUNK_ELEMENTS = 64 * 1024 * 1024


def _pad_to_blocks(x: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """``[B, H, L, D]`` -> ``[B, H, n_blocks, block_size, D]`` with zero rows after the real ``L``."""
    pad = n_blocks * block_size - x.shape[-2]
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.unflatten(-2, (n_blocks, block_size))


def _attend_query_blocks(
    q_blocks: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    kept_index: torch.Tensor,
    kept_valid: torch.Tensor,
    token_valid: torch.Tensor,
    scale: float,
    global_k: torch.Tensor | None,
    global_v: torch.Tensor | None,
    global_bias: torch.Tensor | None,
) -> torch.Tensor:
    """One chunk of query blocks: fused SDPA of each query block over its packed keys (+ the global tokens).

    Args:
        q_blocks: ``[N, c, bs, D]`` (N = B * H flattened, c query blocks).
        k_blocks, v_blocks: ``[N, Nk, bs, D]``.
        kept_index: int64 ``[N, c, K]`` key-block indices; ``kept_valid`` bool ``[N, c, K]`` marks the real ones.
        token_valid: bool ``[Nk, bs]``, False for the padding after the real key length.
        global_k, global_v: ``[N, G, D]``; global_bias ``[G]``.
    Returns:
        ``[N, c, bs, D]``.
    """
    n, c, bs, d = q_blocks.shape
    kept = kept_index.shape[-1]
    gather = kept_index.reshape(n, c * kept)[:, :, None].expand(-1, -1, bs * d)
    packed_k = torch.gather(k_blocks.flatten(2), 1, gather).view(n, c, kept * bs, d)  # [N, c, K*bs, D]
    packed_v = torch.gather(v_blocks.flatten(2), 1, gather).view(n, c, kept * bs, d)
    visible = (kept_valid[..., None] & token_valid[kept_index]).view(n, c, 1, kept * bs)  # [N, c, 1, K*bs]
    # Additive mask: -inf hides a key; the global tokens' columns carry their logit bias (pre-scaled: SDPA adds
    # the mask after scaling the scores).
    bias = torch.zeros((), dtype=q_blocks.dtype, device=q_blocks.device).masked_fill(~visible, float("-inf"))
    if global_k is not None:
        g = global_k.shape[1]
        packed_k = torch.cat([packed_k, global_k[:, None].expand(n, c, g, d)], dim=2)
        packed_v = torch.cat([packed_v, global_v[:, None].expand(n, c, g, d)], dim=2)
        g_bias = global_bias if global_bias is not None else q_blocks.new_zeros(g)
        bias = torch.cat([bias, g_bias.to(bias.dtype).expand(n, c, 1, g)], dim=-1)
        sees_nothing = None  # every query sees the global tokens
    else:
        sees_nothing = ~visible.any(dim=-1, keepdim=True)  # [N, c, 1, 1]: a query block that keeps no block
        bias = bias.masked_fill(sees_nothing, 0.0)  # (an all -inf row would give NaN; zeroed below)
    out = F.scaled_dot_product_attention(q_blocks, packed_k, packed_v, attn_mask=bias, scale=scale)
    if sees_nothing is not None:
        out = out.masked_fill(sees_nothing, 0.0)
    return out


def gather_block_sparse_attention(
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
) -> torch.Tensor:
    """Same semantics as ``reference_block_sparse_attention``, computed over packed kept key blocks.

    Args:
        q: ``[B, H, Lq, D]``.
        k, v: ``[B, H, Lk, D]``.
        block_mask: ``BlockMask`` (or its bool form) ``[B|1, H|1, ceil(Lq/bs), ceil(Lk/bs)]``; this backend reads
            the index lists (the kept key blocks of a query block, increasing, are its packed keys).
        global_k, global_v: optional ``[B, H, G, D]``; global_bias optional float ``[G]``.
    Returns:
        ``[B, H, Lq, D]`` in the dtype of ``q``; queries that see nothing get zeros.
    """
    out_dtype = q.dtype
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[-2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    n_q, n_k = math.ceil(q_len / block_size), math.ceil(k_len / block_size)
    n = batch * heads

    counts, index = as_block_mask(block_mask).lists()
    counts = counts.expand(batch, heads, n_q).reshape(n, n_q)
    kept = max(1, int(counts.max()))  # host sync: the packed width
    # The lists hold the kept blocks first; the padding after them is a valid block index, hidden by kept_valid.
    kept_index = index[..., :kept].expand(batch, heads, n_q, kept).reshape(n, n_q, kept).long()
    kept_valid = torch.arange(kept, device=q.device) < counts.unsqueeze(-1)
    token_valid = (torch.arange(n_k * block_size, device=q.device) < k_len).view(n_k, block_size)

    q_blocks = _pad_to_blocks(q.to(compute_dtype), n_q, block_size).flatten(0, 1)  # [N, Nq, bs, D]
    k_blocks = _pad_to_blocks(k.to(compute_dtype), n_k, block_size).flatten(0, 1)  # [N, Nk, bs, D]
    v_blocks = _pad_to_blocks(v.to(compute_dtype), n_k, block_size).flatten(0, 1)
    gk = global_k.to(compute_dtype).flatten(0, 1) if global_k is not None else None  # [N, G, D]
    gv = global_v.to(compute_dtype).flatten(0, 1) if global_v is not None else None
    gb = global_bias.to(device=q.device, dtype=compute_dtype) if global_bias is not None else None

    per_block = n * block_size * (2 * kept * head_dim + kept * block_size + (gk.shape[1] if gk is not None else 0))
    chunk = max(1, _CHUNK_ELEMENTS // max(per_block, 1))
    outputs = [
        _attend_query_blocks(
            q_blocks[:, first : first + chunk], k_blocks, v_blocks, kept_index[:, first : first + chunk],
            kept_valid[:, first : first + chunk], token_valid, scale, gk, gv, gb,
        )
        for first in range(0, n_q, chunk)
    ]
    out = torch.cat(outputs, dim=1).flatten(1, 2)[:, :q_len]  # [N, Lq, D]
    return out.view(batch, heads, q_len, head_dim).to(out_dtype)
