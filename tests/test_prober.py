"""The ASA prober: hand-derived importance, the threshold rule, clamps, dense tail, determinism."""

import math

import pytest
import torch

from blade.attention import estimate_block_mask
from blade.attention.prober import block_importance, sample_block_positions, select_blocks


def constant_block_inputs(q_vectors, k_vectors, block_size, q_len=None, k_len=None):
    """q/k where every token of block i is q_vectors[i] (resp. k_vectors[j]): sampling then cannot matter."""
    q = q_vectors.repeat_interleave(block_size, dim=0)[: q_len or None]
    k = k_vectors.repeat_interleave(block_size, dim=0)[: k_len or None]
    return q[None, None], k[None, None]


def test_importance_is_blockwise_softmax_for_constant_blocks():
    # For constant blocks the sampled softmax's max over a tile is exp(s_ij)/(s * sum_j' exp(s_ij')); after row
    # normalisation the importance is the softmax over blocks of the block logits s_ij = q_i.k_j / sqrt(D).
    g = torch.Generator().manual_seed(0)
    qv, kv = torch.randn(3, 16, generator=g), torch.randn(5, 16, generator=g)
    q, k = constant_block_inputs(qv, kv, 32, q_len=80, k_len=150)  # ragged last blocks
    s = 8
    qs = torch.repeat_interleave(qv, s, dim=0)[None, None]
    ks = torch.repeat_interleave(kv, s, dim=0)[None, None]
    got = block_importance(qs, ks, s)[0, 0]
    expected = torch.softmax(qv.double() @ kv.double().T / 4.0, dim=-1)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)
    # Same through the full prober with all clamps off: rows keep the top blocks up to the 0.9 mass.
    mask = estimate_block_mask(q, k, block_size=32, samples_per_block=s, threshold=0.9, min_keep=0.0, max_keep=1.0)
    for i in range(3):
        order = torch.argsort(expected[i], descending=True)
        n = int((torch.cumsum(expected[i][order], 0) < 0.9).sum()) + 1
        want = torch.zeros(5, dtype=torch.bool)
        want[order[:n]] = True
        assert torch.equal(mask[0, 0, i], want)


def test_threshold_rule_on_hand_built_scores():
    imp = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25], [0.97, 0.01, 0.01, 0.01]])
    # Row 0: sorted 0.5, 0.3 (cum 0.8 >= 0.75: the crossing block is kept) -> blocks 1 and 3.
    # Row 1: 0.25, 0.5, 0.75 -> 3 blocks. Row 2: 0.97 alone.
    mask = select_blocks(imp, threshold=0.75, min_keep=0.0, max_keep=1.0)
    assert mask.tolist() == [[False, True, False, True], [True, True, True, False], [True, False, False, False]]
    # Upper clamp ceil(0.5 * 4) = 2, lower clamp ceil(0.3 * 4) = 2.
    mask = select_blocks(imp, threshold=0.75, min_keep=0.3, max_keep=0.5)
    assert mask.sum(-1).tolist() == [2, 2, 2]
    assert mask[0].tolist() == [False, True, False, True] and mask[2].tolist() == [True, True, False, False]
    # At least one block even when every clamp says zero.
    assert select_blocks(imp, threshold=0.01, min_keep=0.0, max_keep=0.0).sum(-1).tolist() == [1, 1, 1]
    # threshold 1.0 keeps everything (float rounding of the cumulative sum must not lose the last block).
    assert select_blocks(torch.full((1, 10), 0.1), threshold=1.0, min_keep=0.0, max_keep=1.0).all()


def test_clamp_counts_use_ceil():
    g = torch.Generator().manual_seed(1)
    imp = torch.softmax(torch.randn(2, 3, 7, 30, generator=g) * 3, dim=-1)
    counts = select_blocks(imp, threshold=0.999, min_keep=0.05, max_keep=0.1).sum(-1)
    assert counts.max() <= 3  # ceil(0.1 * 30) = 3 (not 4 from 3.0000000000000004)
    counts = select_blocks(imp, threshold=0.01, min_keep=0.05, max_keep=0.1).sum(-1)
    assert (counts == 2).all()  # ceil(0.05 * 30) = 2


def random_qk(b=2, h=3, lq=333, lk=333, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, lq, d, generator=g), torch.randn(b, h, lk, d, generator=g)


def test_output_shape_dtype_no_grad_and_clamps():
    q, k = random_qk(lq=333, lk=200)
    q.requires_grad_(True)
    mask = estimate_block_mask(q, k, block_size=32, min_keep=0.2, max_keep=0.3)
    assert mask.shape == (2, 3, math.ceil(333 / 32), math.ceil(200 / 32)) and mask.dtype == torch.bool
    assert not mask.requires_grad and mask.grad_fn is None
    counts = mask.sum(-1)
    n_k = mask.shape[-1]
    assert counts.min() >= math.ceil(0.2 * n_k) and counts.max() <= math.ceil(0.3 * n_k)


def test_dense_tail_rows_and_columns():
    q, k = random_qk(lq=333, lk=333)
    mask = estimate_block_mask(q, k, block_size=64, min_keep=0.0, max_keep=0.2, dense_tail_tokens=100)
    # The last 100 tokens (233..332) live in blocks 3, 4, 5.
    assert mask[..., 3:, :].all() and mask[..., :, 3:].all()
    assert not mask[..., :3, :3].all()
    base = estimate_block_mask(q, k, block_size=64, min_keep=0.0, max_keep=0.2, generator=torch.Generator())
    assert base.sum() < mask.sum()


def test_deterministic_for_a_seeded_generator_and_global_rng():
    q, k = random_qk()
    a = estimate_block_mask(q, k, block_size=32, samples_per_block=4, generator=torch.Generator().manual_seed(3))
    b = estimate_block_mask(q, k, block_size=32, samples_per_block=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    masks = {
        estimate_block_mask(q, k, block_size=32, samples_per_block=4, generator=torch.Generator().manual_seed(s))
        for s in range(4)
    }
    assert len({m.numpy().tobytes() for m in masks}) > 1  # sampling does depend on the seed
    torch.manual_seed(11)
    c = estimate_block_mask(q, k, block_size=32, samples_per_block=4)
    torch.manual_seed(11)
    d = estimate_block_mask(q, k, block_size=32, samples_per_block=4)
    assert torch.equal(c, d)


@pytest.mark.parametrize("length,block", [(333, 64), (200, 128), (128, 128)])
def test_samples_stay_inside_real_tokens_of_each_block(length, block):
    pos = sample_block_positions(length, block, 50, (2, 2), torch.device("cpu"), torch.Generator().manual_seed(0))
    n_blocks = math.ceil(length / block)
    assert pos.shape == (2, 2, n_blocks * 50)
    blocks = pos.view(2, 2, n_blocks, 50)
    assert (blocks // block == torch.arange(n_blocks)[:, None]).all()
    assert pos.max() < length and pos.min() >= 0
    last = blocks[..., -1, :]
    assert last.min() >= (n_blocks - 1) * block and len(torch.unique(last)) > 1
