"""Static block masks for training-free comparisons (the paper's Table 3): a local 3D window and random blocks.

Both work on the same token order as ASA (video tokens along the Gilbert curve, optional dense tail tokens such as
CogVideoX's text), and keep exactly the same number of key blocks per query row, so that a comparison with ASA at a
fixed keep count is at equal sparsity.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from .gilbert import gilbert_permutation


def keep_count(num_key_blocks: int, sparsity: float) -> int:
    """Key blocks kept per query row for a target sparsity (= 1 - kept fraction), at least 1."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return max(1, min(num_key_blocks, round((1.0 - sparsity) * num_key_blocks)))


@lru_cache(maxsize=32)
def _block_centroids(grid: tuple[int, int, int], block_size: int) -> torch.Tensor:
    """Centroid (f, h, w) of each block of consecutive Gilbert-ordered video tokens: [N_video_blocks, 3]."""
    frames, height, width = grid
    order = gilbert_permutation(frames, height, width)
    coords = torch.stack(
        [order // (height * width), (order // width) % height, order % width], dim=-1
    ).double()  # [L, 3] in curve order
    n = order.numel()
    num_blocks = math.ceil(n / block_size)
    block_id = torch.arange(n) // block_size
    sums = torch.zeros(num_blocks, 3, dtype=torch.float64).index_add_(0, block_id, coords)
    counts = torch.bincount(block_id, minlength=num_blocks).double().unsqueeze(-1)
    return sums / counts


def window_block_mask(
    grid: tuple[int, int, int],
    *,
    sparsity: float,
    block_size: int = 128,
    tail_tokens: int = 0,
    device: torch.device | str = "cpu",
) -> torch.BoolTensor:
    """A static local window (like Sliding Tile Attention): each query block keeps the key blocks nearest in 3D.

    Distances are between block centroids in latent-grid units. Blocks that hold tail tokens are kept dense in both
    directions, as ASA does. Returns ``[1, 1, N, N]`` (broadcast over batch and heads).
    """
    n_video = grid[0] * grid[1] * grid[2]
    length = n_video + tail_tokens
    num_blocks = math.ceil(length / block_size)
    centroids = _block_centroids(tuple(grid), block_size)  # [Nv, 3]
    if centroids.shape[0] < num_blocks:  # blocks made only of tail tokens sit "far away" and are forced dense below
        pad = torch.full((num_blocks - centroids.shape[0], 3), 1e9, dtype=torch.float64)
        centroids = torch.cat([centroids, pad])
    distance = torch.cdist(centroids, centroids)  # [N, N]
    keep = keep_count(num_blocks, sparsity)
    nearest = distance.topk(keep, dim=-1, largest=False).indices
    mask = torch.zeros(num_blocks, num_blocks, dtype=torch.bool).scatter_(1, nearest, True)
    _force_tail(mask, n_video, tail_tokens, block_size)
    return mask[None, None].to(device)


def random_block_mask(
    batch: int,
    heads: int,
    length: int,
    *,
    sparsity: float,
    block_size: int = 128,
    tail_tokens: int = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.BoolTensor:
    """Uniformly random key blocks per (batch, head, query block), the same count per row: ``[B, H, N, N]``."""
    num_blocks = math.ceil(length / block_size)
    keep = keep_count(num_blocks, sparsity)
    scores = torch.rand(batch, heads, num_blocks, num_blocks, generator=generator)
    chosen = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(batch, heads, num_blocks, num_blocks, dtype=torch.bool).scatter_(-1, chosen, True)
    _force_tail(mask, length - tail_tokens, tail_tokens, block_size)
    return mask.to(device)


def _force_tail(mask: torch.Tensor, n_video: int, tail_tokens: int, block_size: int) -> None:
    """Blocks holding any of the last ``tail_tokens`` tokens attend and are attended densely (in place)."""
    if tail_tokens <= 0:
        return
    first_tail_block = n_video // block_size
    mask[..., first_tail_block:, :] = True
    mask[..., :, first_tail_block:] = True
