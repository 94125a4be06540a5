"""Adapter for mit-han-lab's Block-Sparse-Attention (``block_sparse_attn_func``), used only when the user built it.

The library is not on PyPI. Its kernel takes FlashAttention-style varlen ("unpadded") inputs ``[total_tokens, H, D]``
with cumulative sequence offsets, a per-head ``head_mask_type`` (1 block-sparse, 0 dense, -1 streaming; the library
numbers the block-sparse heads 1..n in order, and the i-th reads mask i-1) and a ``base_blockmask`` bool
``[B, n_sparse_heads, ceil(Lq/128), ceil(Lk/128)]`` (our ``BlockMask``'s dense form, one mask per head); blocks are
fixed at 128x128, dtypes fp16/bf16, head dims 32/64/128. The conversion into that format is plain torch and tested on
CPU against the library's own reading of these arguments; the kernel itself needs a build (see ``_BUILD_HINT``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..block_mask import BlockMask, as_block_mask

BSA_BLOCK_SIZE = 128
BSA_HEAD_DIMS = (32, 64, 128)
BSA_DTYPES = (torch.float16, torch.bfloat16)

_BUILD_HINT = (
    "backend='bsa' needs mit-han-lab's Block-Sparse-Attention, which is not on PyPI. Build it with a CUDA toolkit:\n"
    "  git clone https://github.com/mit-han-lab/Block-Sparse-Attention\n"
    "  cd Block-Sparse-Attention && pip install --no-build-isolation .\n"
    "or, for Hopper (sm_90, bf16, head dims 64/128) in a few minutes, from this repository: "
    "benchmarks/prepare_bsa_src.sh (needs their source and CUTLASS's headers) then benchmarks/build_bsa.sh.\n"
    "It supports fp16/bf16, head dim 32/64/128 and 128-token blocks only. Otherwise use backend='flex' or 'triton'."
)


@dataclass
class BSAInputs:
    """Arguments of ``block_sparse_attn_func`` built from our ``[B, H, L, D]`` tensors."""

    q: torch.Tensor  # [B*Lq, H, D]
    k: torch.Tensor  # [B*Lk, H, D]
    v: torch.Tensor  # [B*Lk, H, D]
    cu_seqlens_q: torch.Tensor  # int32 [B+1]
    cu_seqlens_k: torch.Tensor  # int32 [B+1]
    head_mask_type: torch.Tensor  # int32 [H], all 1 (block-sparse): head h reads base_blockmask[:, h]
    base_blockmask: torch.Tensor  # bool [B, H, Nq, Nk]
    max_seqlen_q: int
    max_seqlen_k: int


def _unpad(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, D]`` -> varlen ``[B*L, H, D]`` (all sequences have the same length)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch * length, heads, dim)


def to_bsa_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask | torch.Tensor,
    block_size: int = BSA_BLOCK_SIZE,
) -> BSAInputs:
    """Convert our inputs into the format of ``block_sparse_attn_func`` (pure torch, no CUDA needed).

    Args:
        q: ``[B, H, Lq, D]``; k, v: ``[B, H, Lk, D]``; block_mask: ``BlockMask`` (or its bool form)
            ``[B|1, H|1, ceil(Lq/128), ceil(Lk/128)]``, whose dense form the library takes, one mask per head.
    """
    if block_size != BSA_BLOCK_SIZE:
        raise ValueError(f"backend='bsa' supports block_size={BSA_BLOCK_SIZE} only, got {block_size}")
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[-2]
    dense = as_block_mask(block_mask).dense()
    expected = (math.ceil(q_len / block_size), math.ceil(k_len / block_size))
    if tuple(dense.shape[-2:]) != expected:
        raise ValueError(f"block_mask has {tuple(dense.shape[-2:])} blocks, expected {expected}")
    device = q.device
    return BSAInputs(
        q=_unpad(q),
        k=_unpad(k),
        v=_unpad(v),
        cu_seqlens_q=torch.arange(batch + 1, device=device, dtype=torch.int32) * q_len,
        cu_seqlens_k=torch.arange(batch + 1, device=device, dtype=torch.int32) * k_len,
        # 1 = a block-sparse head (0 dense, -1 streaming); the library numbers the 1s 1..H in order and head h reads
        # base_blockmask[:, h] (its `replace_ones_with_count`): distinct numbers here fail its head-count assert
        head_mask_type=torch.ones(heads, device=device, dtype=torch.int32),
        base_blockmask=dense.expand(batch, heads, *expected).contiguous().to(device),
        max_seqlen_q=q_len,
        max_seqlen_k=k_len,
    )


def from_bsa_output(out: torch.Tensor, batch: int) -> torch.Tensor:
    """Varlen output ``[B*L, H, D]`` -> ``[B, H, L, D]``."""
    total, heads, dim = out.shape
    return out.reshape(batch, total // batch, heads, dim).transpose(1, 2)


def bsa_block_sparse_attention(
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
    """Block-sparse attention through ``block_sparse_attn_func``; same contract as ``block_sparse_attention``."""
    try:
        import block_sparse_attn  # noqa: F401
    except ImportError as err:
        raise RuntimeError(_BUILD_HINT) from err
    if global_k is not None:
        # The library's backward ignores the gradient of its returned LSE, so an LSE merge of a sparse call and a
        # pooled call would silently drop d(alpha)/d(q, k). Use 'flex' / 'triton' / 'reference' for global tokens.
        raise NotImplementedError("backend='bsa' does not support global tokens; use 'flex', 'triton' or 'reference'")
    if q.dtype not in BSA_DTYPES or q.shape[-1] not in BSA_HEAD_DIMS or not q.is_cuda:
        raise RuntimeError(
            f"backend='bsa' needs CUDA fp16/bf16 inputs with head dim in {BSA_HEAD_DIMS}; "
            f"got {q.dtype}, head dim {q.shape[-1]}, device {q.device}"
        )
    inputs = to_bsa_inputs(q, k, v, block_mask, block_size)
    return from_bsa_output(call_bsa(inputs, scale), q.shape[0])


def call_bsa(inputs: BSAInputs, scale: float | None = None) -> torch.Tensor:
    """``block_sparse_attn_func`` on converted inputs -> varlen output ``[B*Lq, H, D]`` (the kernel alone: what
    `benchmarks/attention.py` times as ``bsa_kernel_only``, the conversion done beforehand)."""
    from block_sparse_attn import block_sparse_attn_func

    return block_sparse_attn_func(
        inputs.q,
        inputs.k,
        inputs.v,
        inputs.cu_seqlens_q,
        inputs.cu_seqlens_k,
        inputs.head_mask_type,
        None,  # streaming_info: no streaming heads
        inputs.base_blockmask,
        inputs.max_seqlen_q,
        inputs.max_seqlen_k,
        0.0,  # dropout
        deterministic=False,
        softmax_scale=scale,
        is_causal=False,
    )
