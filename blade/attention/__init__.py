"""Adaptive block-sparse attention: Gilbert token order, the sampled-importance prober, the block-mask object, kernels
and the ASA module."""

from .asa import AdaptiveBlockSparseAttention, ASAConfig, EarlyContext, mean_pool_tokens
from .block_mask import BlockMask
from .gilbert import gilbert_permutation, inverse_permutation
from .kernels import BACKENDS, block_sparse_attention, resolve_backend
from .prober import estimate_block_mask

__all__ = [
    "ASAConfig",
    "AdaptiveBlockSparseAttention",
    "BACKENDS",
    "BlockMask",
    "EarlyContext",
    "block_sparse_attention",
    "estimate_block_mask",
    "gilbert_permutation",
    "inverse_permutation",
    "mean_pool_tokens",
    "resolve_backend",
]
