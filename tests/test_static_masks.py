import math

import pytest
import torch

from blade.attention import gilbert_permutation
from blade.attention.static_masks import keep_count, random_block_mask, window_block_mask


@pytest.mark.parametrize("grid,block,sparsity", [((5, 32, 32), 128, 0.75), ((3, 7, 9), 16, 0.5), ((2, 5, 6), 32, 0.6)])
def test_window_keeps_exact_count_and_nearest_blocks(grid, block, sparsity):
    mask = window_block_mask(grid, sparsity=sparsity, block_size=block)
    n = math.ceil(grid[0] * grid[1] * grid[2] / block)
    assert mask.shape == (1, 1, n, n) and mask.dtype == torch.bool
    keep = keep_count(n, sparsity)
    assert (mask.sum(-1) == keep).all()
    assert mask[0, 0].diagonal().all()  # a block is always nearest to itself

    # Independent check: brute-force centroids from the permutation, then the kept blocks are the nearest ones.
    order = gilbert_permutation(*grid)
    f, h, w = order // (grid[1] * grid[2]), (order // grid[2]) % grid[1], order % grid[2]
    coords = torch.stack([f, h, w], -1).double()
    centroids = torch.stack([coords[i * block:(i + 1) * block].mean(0) for i in range(n)])
    dist = torch.cdist(centroids, centroids)
    for row in range(n):
        kept = dist[row][mask[0, 0, row]]
        dropped = dist[row][~mask[0, 0, row]]
        if dropped.numel():
            assert kept.max() <= dropped.min() + 1e-9


def test_tail_blocks_dense_both_directions():
    grid, block, tail = (2, 6, 10), 32, 40  # 120 video tokens + 40 text tokens = 160 -> 5 blocks
    for mask in (
        window_block_mask(grid, sparsity=0.8, block_size=block, tail_tokens=tail)[0, 0],
        random_block_mask(1, 1, 160, sparsity=0.8, block_size=block, tail_tokens=tail)[0, 0],
    ):
        first_tail_block = 120 // block
        assert mask[first_tail_block:].all() and mask[:, first_tail_block:].all()


def test_random_mask_count_per_head_and_seeded():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = random_block_mask(2, 3, 1000, sparsity=0.75, block_size=64, generator=g1)
    b = random_block_mask(2, 3, 1000, sparsity=0.75, block_size=64, generator=g2)
    assert torch.equal(a, b) and a.shape == (2, 3, 16, 16)
    assert (a.sum(-1) == 4).all()
    assert not torch.equal(a[0, 0], a[0, 1])  # per-head draws


def test_keep_count_bounds():
    assert keep_count(40, 0.75) == 10 and keep_count(40, 0.5) == 20 and keep_count(3, 0.99) == 1
    with pytest.raises(ValueError):
        keep_count(10, 1.0)
