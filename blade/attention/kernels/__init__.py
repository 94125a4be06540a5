"""``block_sparse_attention``: one semantics, several kernels.

Backends: ``reference`` (plain torch, any dtype/device: the ground truth), ``gather`` (plain torch over packed kept
key blocks: work ~ the kept fraction; the CPU path), ``flex`` (compiled FlexAttention), ``triton`` (our Triton kernel,
Hopper fast path), ``bsa`` (mit-han-lab Block-Sparse-Attention, if built) and ``auto`` (on CPU gather, or reference
under ``torch.compile``, whose graphs cannot take gather's mask-sized shapes; on CUDA triton when it supports the
inputs, else flex).

The mask is a ``BlockMask`` (``blade.attention.block_mask``), made once per call: each backend takes the form it
needs from it (index lists or the dense bool form). A bool tensor is accepted too and wrapped.
"""

from __future__ import annotations

import math

import torch

from ..block_mask import BlockMask, as_block_mask
from .bsa import bsa_block_sparse_attention
from .flex import flex_block_sparse_attention
from .gather import gather_block_sparse_attention
from .reference import reference_block_sparse_attention

BACKENDS = ("auto", "reference", "gather", "flex", "triton", "bsa")

__all__ = ["BACKENDS", "BlockMask", "block_sparse_attention", "resolve_backend"]


def _triton_kernel():
    """The Triton kernel, imported lazily (it needs a working triton install)."""
    try:
        from . import triton_bsa
        from .triton_bsa import triton_block_sparse_attention

        if not getattr(triton_bsa, "is_available", lambda: True)():
            raise ImportError("triton is not installed")
    except Exception as err:  # ImportError, or triton failing to initialise
        raise RuntimeError(
            f"backend='triton' is unavailable: importing blade.attention.kernels.triton_bsa failed ({err!r}). "
            "Install triton (it ships with CUDA builds of torch) or use backend='flex' / 'reference'."
        ) from err
    return triton_block_sparse_attention


def _triton_supports(q: torch.Tensor, block_size: int) -> bool:
    """Whether the Triton kernel can take these inputs (asked of the kernel module when it says so)."""
    try:
        from . import triton_bsa
    except Exception:
        return False
    supports = getattr(triton_bsa, "supports", None)
    if callable(supports):
        return bool(supports(q, block_size))
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in (64, 128) and block_size in (64, 128)


def resolve_backend(backend: str, q: torch.Tensor, block_size: int) -> str:
    """The concrete backend ``auto`` stands for with these inputs (others are returned unchanged)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    if not q.is_cuda:
        return "reference" if torch.compiler.is_compiling() else "gather"
    return "triton" if _triton_supports(q, block_size) else "flex"


def _check_inputs(q, k, v, block_mask: BlockMask, block_size, global_k, global_v, global_bias) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, L, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if block_size <= 0 or block_size % 16 != 0:
        raise ValueError(f"block_size must be a positive multiple of 16, got {block_size}")
    batch, heads, q_len, _ = q.shape
    blocks = (math.ceil(q_len / block_size), math.ceil(k.shape[-2] / block_size))
    shape = block_mask.shape
    if tuple(shape[-2:]) != blocks or shape[0] not in (1, batch) or shape[1] not in (1, heads):
        raise ValueError(f"block_mask shape {tuple(shape)} does not fit [{batch}|1, {heads}|1, *{blocks}]")
    if (global_k is None) != (global_v is None):
        raise ValueError("global_k and global_v must be given together")
    if global_k is not None:
        if global_k.shape != global_v.shape or global_k.shape[:2] != q.shape[:2] or global_k.shape[-1] != q.shape[-1]:
            raise ValueError(f"global_k/global_v must be [B, H, G, D]; got {tuple(global_k.shape)}")
        if global_bias is not None and tuple(global_bias.shape) != (global_k.shape[-2],):
            raise ValueError(f"global_bias must be [G={global_k.shape[-2]}], got {tuple(global_bias.shape)}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask | torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    backend: str = "auto",
    global_k: torch.Tensor | None = None,
    global_v: torch.Tensor | None = None,
    global_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention restricted to the kept ``block_size x block_size`` tiles, plus optional global tokens.

    One exact softmax per query over the keys of its kept blocks and the (always visible) global tokens, whose
    scaled scores get ``global_bias`` added. Queries that see nothing get zeros.

    Args:
        q: ``[B, H, Lq, D]``.
        k, v: ``[B, H, Lk, D]``.
        block_mask: a ``BlockMask`` of shape ``[B|1, H|1, ceil(Lq/bs), ceil(Lk/bs)]`` (size-1 dims broadcast), or
            its dense form, a bool tensor of that shape (True = attend), which is wrapped.
        block_size: tokens per block (positive multiple of 16; fast backends may support fewer sizes).
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto" | "reference" | "gather" | "flex" | "triton" | "bsa"``.
        global_k, global_v: optional ``[B, H, G, D]`` always-visible keys/values.
        global_bias: optional float ``[G]`` additive logit bias of the global tokens (None = 0).
    Returns:
        ``[B, H, Lq, D]`` in the dtype of ``q``.
    """
    block_mask = as_block_mask(block_mask)
    _check_inputs(q, k, v, block_mask, block_size, global_k, global_v, global_bias)
    if global_k is not None and global_k.shape[-2] == 0:
        global_k = global_v = global_bias = None
    block_mask = block_mask.to(q.device)
    kwargs = dict(block_size=block_size, scale=scale, global_k=global_k, global_v=global_v, global_bias=global_bias)
    name = resolve_backend(backend, q, block_size)
    if name == "reference":
        return reference_block_sparse_attention(q, k, v, block_mask, **kwargs)
    if name == "gather":
        return gather_block_sparse_attention(q, k, v, block_mask, **kwargs)
    if name == "flex":
        return flex_block_sparse_attention(q, k, v, block_mask, **kwargs)
    if name == "bsa":
        return bsa_block_sparse_attention(q, k, v, block_mask, **kwargs)
    return _triton_kernel()(q, k, v, block_mask, **kwargs)
