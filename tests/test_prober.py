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


# ---------------------------------------------------------------------------------------------------------------
# Fast selection (topk) and the fused Triton prober
# ---------------------------------------------------------------------------------------------------------------


def sorted_selection(importance, threshold, min_keep, max_keep):
    """Independent reference of the selection rule: a full stable sort of each row (the original algorithm)."""
    n_k = importance.shape[-1]
    sorted_mass, order = torch.sort(importance, dim=-1, descending=True, stable=True)
    count = (sorted_mass.cumsum(-1) < threshold).sum(-1, keepdim=True) + 1
    low = min(max(math.ceil(min_keep * n_k - 1e-9), 1), n_k)
    high = min(max(math.ceil(max_keep * n_k - 1e-9), low), n_k)
    keep_sorted = torch.arange(n_k) < count.clamp(low, high)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@pytest.mark.parametrize("max_keep", [0.1, 0.17, 0.5, 1.0])
def test_topk_selection_equals_full_sort_including_ties(max_keep):
    g = torch.Generator().manual_seed(2)
    imp = torch.softmax(torch.randn(2, 3, 6, 40, generator=g) * 2, dim=-1)
    imp[0, 0, 0] = 1.0 / 40  # an all-tie row: the lowest columns win, as in a stable sort
    imp[0, 0, 1, ::2] = imp[0, 0, 1, 1]  # many ties inside a row
    imp[1, 2, 3] = torch.roll(imp[1, 2, 3], 1) * 0  # an all-zero row
    for threshold in (0.3, 0.9, 1.0):
        got = select_blocks(imp, threshold, 0.05, max_keep)
        assert torch.equal(got, sorted_selection(imp, threshold, 0.05, max_keep))
    # Negative scores rank below positive ones (order-preserving float bits).
    signed = torch.tensor([[-0.5, 0.25, -2.0, 0.0, 1.5, -0.1]])
    assert select_blocks(signed, 10.0, 0.0, 0.3).tolist() == [[False, True, False, False, True, False]]
    assert select_blocks(signed, 10.0, 0.0, 0.5).tolist() == [[False, True, False, True, True, False]]


@pytest.fixture(scope="module")
def triton_prober():
    """The fused prober module built by the Triton CPU interpreter (or the real kernel on a GPU)."""
    import importlib
    import os

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton", reason="triton is not importable")
    from blade.attention.kernels import triton_prober as module

    if not torch.cuda.is_available() and not module._interpreting():
        module = importlib.reload(module)  # imported before TRITON_INTERPRET was set
    if not torch.cuda.is_available() and not module._interpreting():
        pytest.skip("the Triton interpreter could not be enabled")
    return module


PROBER_CASES = {
    # (B, H, Lq, Lk, D, block, samples, dtype)
    "ragged_lq_ne_lk": (1, 2, 150, 90, 16, 32, 8, torch.float32),
    "samples_16_fp16": (1, 2, 160, 128, 32, 32, 16, torch.float16),
    "bf16_scaled_inputs": (2, 1, 96, 96, 16, 16, 4, torch.bfloat16),
}


@pytest.mark.parametrize("name", list(PROBER_CASES))
def test_fused_prober_matches_torch_importance_and_mask(triton_prober, name):
    batch, heads, q_len, k_len, dim, block, samples, dtype = PROBER_CASES[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(7)
    q = (torch.randn(batch, heads, q_len, dim, generator=g) * 2).to(device=device, dtype=dtype)
    k = (torch.randn(batch, heads, k_len, dim, generator=g) * 2).to(device=device, dtype=dtype)
    q_pos = sample_block_positions(q_len, block, samples, (batch, heads), q.device, torch.Generator().manual_seed(1))
    k_pos = sample_block_positions(k_len, block, samples, (batch, heads), q.device, torch.Generator().manual_seed(2))
    got = triton_prober.sampled_block_importance(q, k, q_pos, k_pos, samples)
    # Independent float64 reference: dense softmax of the gathered samples, max-pooled per tile, row-normalised.
    qs = q.double().gather(2, q_pos[..., None].expand(-1, -1, -1, dim))
    ks = k.double().gather(2, k_pos[..., None].expand(-1, -1, -1, dim))
    probs = torch.softmax(qs @ ks.transpose(-1, -2) / math.sqrt(dim), dim=-1)
    n_q, n_k = q_pos.shape[-1] // samples, k_pos.shape[-1] // samples
    pooled = probs.view(batch, heads, n_q, samples, n_k, samples).amax(dim=(3, 5))
    expected = pooled / pooled.sum(-1, keepdim=True)
    assert got.shape == (batch, heads, n_q, n_k) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=2e-6, rtol=1e-4)

    # Through estimate_block_mask: same generator state -> same positions -> the same mask as the torch path.
    kwargs = dict(block_size=block, samples_per_block=samples, threshold=0.8, min_keep=0.1, max_keep=0.6)
    fused = estimate_block_mask(q, k, generator=torch.Generator().manual_seed(5), backend="triton", **kwargs)
    ref = estimate_block_mask(q, k, generator=torch.Generator().manual_seed(5), backend="torch", **kwargs)
    assert torch.equal(fused, ref)
    assert 0 < fused.sum() < fused.numel()


@pytest.mark.parametrize("max_keep,tail", [(0.1, (None, None)), (1.0, (None, None)), (0.5, (5, 37))])
def test_fused_selection_writes_the_torch_selections_lists(triton_prober, max_keep, tail):
    """select_lists (one Triton program per row) against the torch selection's lists, exactly: ties (lowest column
    first), an all-zero row, a non-power-of-two Nk, the dense tail; and its mask against the test's own full-sort
    reference (sorted_selection) where there is no tail."""
    from blade.attention.block_mask import BlockMask
    from blade.attention.prober import _clamped_counts, _torch_select

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(3)
    imp = torch.softmax(torch.randn(1, 2, 6, 40, generator=g) * 2, dim=-1)  # the interpreter: ~0.4 s a row
    imp[0, 0, 0] = 1.0 / 40  # all ties
    imp[0, 0, 1, ::2] = imp[0, 0, 1, 1]  # many ties
    imp[0, 1, 3] = 0.0  # all zero
    imp = imp.to(device)
    low, high = _clamped_counts(40, 0.05, max_keep)
    # Thresholds off the all-tie row's partial sums (k / 40): a sum landing exactly on the threshold is decided by
    # the float order of the cumulative sum, which a parallel scan need not share with torch's.
    for threshold in (0.33, 0.91, 1.0):
        counts, index = triton_prober.select_lists(imp, threshold, low, high, *tail)
        ref_counts, ref_index = _torch_select(imp, threshold, low, high, *tail)
        assert counts.dtype == torch.int32 and index.shape == (1, 2, 6, 40)
        assert torch.equal(counts, ref_counts)
        valid = torch.arange(40, device=device) < counts[..., None]  # entries past the count mean nothing
        assert torch.equal(torch.where(valid, index, 0), torch.where(valid, ref_index, 0))
        if tail == (None, None):
            got = BlockMask.from_lists(counts, index).dense().cpu()
            assert torch.equal(got, sorted_selection(imp.cpu(), threshold, 0.05, max_keep))


def test_fused_prober_refuses_unsupported_samples(triton_prober):
    q = torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="does not support"):
        estimate_block_mask(q, q, block_size=32, samples_per_block=6, backend="triton")
    with pytest.raises(ValueError, match="prober backend"):
        estimate_block_mask(q, q, block_size=32, backend="cuda")


@pytest.mark.gpu
def test_gpu_fused_prober_full_size_matches_torch_prober():
    q, k = (torch.randn(1, 12, 32760, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    fused = estimate_block_mask(q, k, generator=torch.Generator(device="cuda").manual_seed(0), backend="triton")
    ref = estimate_block_mask(q, k, generator=torch.Generator(device="cuda").manual_seed(0), backend="torch")
    # Both use bf16 products with fp32 sums; only near-ties at the threshold may differ.
    assert (fused != ref).float().mean() < 1e-3


def test_generators_without_weak_references_are_pinned(monkeypatch):
    """torch < 2.13: `torch.Generator` takes no weak references; the prober then keeps the generator itself."""
    from blade.attention import prober

    class NoWeakRefs:  # what a WeakKeyDictionary does with an object that cannot be weakly referenced
        def get(self, key):
            raise TypeError(f"cannot create weak reference to {type(key).__name__!r} object")

    q, k = random_qk()
    expected = estimate_block_mask(q, k, block_size=32, samples_per_block=4, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(prober, "_KEY_OF_GENERATOR", NoWeakRefs())
    gen = torch.Generator().manual_seed(5)
    got = estimate_block_mask(q, k, block_size=32, samples_per_block=4, generator=gen)
    assert torch.equal(got, expected)
    assert prober._generator_key(gen) == prober._generator_key(gen)  # one key per generator, reused
    assert prober._source_generator(prober._generator_key(gen), q.device) is gen
