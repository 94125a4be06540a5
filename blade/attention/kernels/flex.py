"""FlexAttention backend: torch's flex ``BlockMask`` made from our ``BlockMask``'s index lists, run through compiled
flex.

Our lists (kept kv blocks first, per query block) are flex's ``kv_num_blocks`` / ``kv_indices`` as they are. Global
tokens are appended after K/V padded to a block multiple, so they occupy their own kv blocks, which
are marked visible for every query block; their logit bias is added by ``score_mod`` and padding tokens are hidden
by ``mask_mod``. Blocks with no padding are passed as "full" blocks so the kernel skips ``mask_mod`` on them.

On CPU, torch's compiled flex runs the forward only (no backward), and compiling takes tens of seconds.

Compilation is static-shape (``dynamic=False``): every new sequence length, global-token count or grad mode is one
more graph of the same code object. Dynamo's default limit of 8 graphs per code object is far too low for that
(a benchmark over three shapes hit it), and past the limit dynamo silently runs flex *eagerly*, which materialises
the full score matrix (113 GiB at CogVideoX size). So calls raise the limit to ``RECOMPILE_LIMIT`` and, where the
installed torch supports it, turn hitting the limit into an error instead of the silent eager fallback.
"""

from __future__ import annotations

import contextlib
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..block_mask import BlockMask, as_block_mask

# Graphs of compiled flex kept per process (one per shape / global-token layout / grad mode).
RECOMPILE_LIMIT = 64


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex materialises the full score matrix; compiled flex generates a fused kernel.
    return torch.compile(flex_attention, dynamic=False)


def _dynamo_limits() -> dict:
    """Dynamo config overrides for a flex call: a roomy recompile limit, and failing loudly past it."""
    import torch._dynamo.config as dynamo_config

    # (torch >= 2.6 name, older alias, value): the first name the installed torch knows is patched.
    options = (
        ("recompile_limit", "cache_size_limit", RECOMPILE_LIMIT),
        ("accumulated_recompile_limit", "accumulated_cache_size_limit", 4 * RECOMPILE_LIMIT),
        ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit", True),
    )
    limits = {}
    for new_name, old_name, value in options:
        name = next((n for n in (new_name, old_name) if hasattr(dynamo_config, n)), None)
        if name is not None:
            limits[name] = value
    if getattr(dynamo_config, "suppress_errors", False):  # dynamo refuses both together; keep the user's choice
        limits = {n: v for n, v in limits.items() if not n.startswith("fail_on")}
    return limits


def _run_compiled_flex(*args, **kwargs) -> torch.Tensor:
    """Compiled flex under `_dynamo_limits()`; never the silent eager (score-materialising) fallback."""
    try:
        import torch._dynamo.config as dynamo_config

        limits = dynamo_config.patch(**_dynamo_limits())
    except Exception:  # pragma: no cover - a torch without these options: run with its defaults
        limits = contextlib.nullcontext()
    with limits:
        return _compiled_flex_attention()(*args, **kwargs)


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad ``x [B, H, L, D]`` along L to ``length`` tokens."""
    return x if x.shape[-2] == length else F.pad(x, (0, 0, 0, length - x.shape[-2]))


def flex_block_sparse_attention(
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
    """Block-sparse attention through compiled FlexAttention; same contract as ``block_sparse_attention``.

    Args:
        q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lk, D]``; block_mask: ``BlockMask`` (or its bool form)
            ``[B|1, H|1, ceil(Lq/bs), ceil(Lk/bs)]``.
        global_k, global_v: optional ``[B, H, G, D]``; global_bias: optional ``[G]``.
    Returns:
        ``[B, H, Lq, D]``.
    """
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, global_k, global_v)
    )
    if q.device.type == "cpu" and needs_grad:
        raise RuntimeError(
            "backend='flex' has no backward on CPU (torch's FlexAttention supports CPU inference only); "
            "use backend='reference' on CPU, or run under torch.no_grad()."
        )
    q_len, k_len, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    n_k_blocks = math.ceil(k_len / block_size)
    block_mask = as_block_mask(block_mask)

    mask_mod = None
    score_mod = None
    if global_k is not None:
        # Layout of the kv axis: [K (padded to n_k_blocks*bs) | globals (padded to a block multiple)].
        n_global = global_k.shape[-2]
        k_pad = n_k_blocks * block_size
        n_g_blocks = math.ceil(n_global / block_size)
        kv_len = k_pad + n_g_blocks * block_size
        k = torch.cat([_pad_tokens(k, k_pad), _pad_tokens(global_k.to(k.dtype), n_g_blocks * block_size)], dim=-2)
        v = torch.cat([_pad_tokens(v, k_pad), _pad_tokens(global_v.to(v.dtype), n_g_blocks * block_size)], dim=-2)

        # The kv axis gains the global blocks (visible to every query block). Columns whose tokens are all real
        # skip mask_mod ("full" blocks); ragged ones keep it. Both are masks of their own, as flex takes them.
        dense = block_mask.dense()
        kv_dense = torch.cat([dense, dense.new_ones(dense.shape[:-1] + (n_g_blocks,))], dim=-1)
        ragged = torch.zeros(n_k_blocks + n_g_blocks, dtype=torch.bool, device=dense.device)
        ragged[n_k_blocks - 1] = k_len % block_size != 0
        ragged[-1] = n_global % block_size != 0
        kv_lists = BlockMask.from_dense(kv_dense & ragged).lists()
        full_lists = BlockMask.from_dense(kv_dense & ~ragged).lists()

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < k_len) | ((kv_idx >= k_pad) & (kv_idx < k_pad + n_global))

        bias = torch.zeros(max(n_global, 1), device=q.device, dtype=torch.float32)
        if global_bias is not None:
            bias[:n_global] = global_bias.detach().to(device=q.device, dtype=torch.float32)

        def score_mod(score, b, h, q_idx, kv_idx):
            g_idx = (kv_idx - k_pad).clamp(0, n_global - 1)
            return torch.where(kv_idx >= k_pad, score + bias[g_idx].to(score.dtype), score)
    else:
        kv_len = k_len
        kv_lists, full_lists = block_mask.lists(), (None, None)

    flex_mask = FlexBlockMask.from_kv_blocks(
        *kv_lists,
        *full_lists,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
        compute_q_blocks=needs_grad,  # the transposed (backward) indices cost as much as the sparse forward
    )
    return _run_compiled_flex(q, k, v, score_mod=score_mod, block_mask=flex_mask, scale=scale)
