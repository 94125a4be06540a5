"""``BlockMask``: its two forms against hand-built masks, and every backend fed the object against float64 attention."""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from blade.attention import AdaptiveBlockSparseAttention, ASAConfig, BlockMask, block_sparse_attention  # noqa: E402
from blade.attention.block_mask import as_block_mask, dense_to_lists, lists_to_dense  # noqa: E402
from blade.attention.kernels.bsa import to_bsa_inputs  # noqa: E402
from blade.attention.prober import _estimate_block_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_dense(b, h, nq, nk, p=0.4, seed=0):
    mask = torch.rand(b, h, nq, nk, generator=torch.Generator().manual_seed(seed)) < p
    mask[0, 0, 0] = False  # an empty row
    mask[-1, -1, -1] = True  # a full row
    return mask


def _kept_by_hand(dense):
    """Kept columns of every row of a [B, H, R, C] mask, by python loops."""
    return [[c for c, x in enumerate(row) if x] for row in dense.reshape(-1, dense.shape[-1]).tolist()]


def _dense_from_rows_by_hand(rows, shape):
    """A bool mask of `shape` whose flattened rows keep the given columns (python loops)."""
    dense = torch.zeros(shape, dtype=torch.bool)
    flat = dense.view(-1, shape[-1])
    for r, cols in enumerate(rows):
        for c in cols:
            flat[r, c] = True
    return dense


# ----------------------------------------------------------------------------------------------------- the forms
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 1, 4, 4), (1, 2, 3, 9)])
def test_dense_lists_round_trip(shape):
    dense = _random_dense(*shape)
    mask = BlockMask.from_dense(dense)
    counts, index = mask.lists()
    assert counts.dtype == index.dtype == torch.int32
    assert counts.shape == shape[:-1] and index.shape == shape
    again = BlockMask.from_lists(counts, index)
    assert torch.equal(again.dense(), dense) and again.shape == shape


def test_lists_match_hand_built_mask():
    dense = _random_dense(2, 3, 5, 7, seed=1)
    counts, index = BlockMask.from_dense(dense).lists()
    want = _kept_by_hand(dense)
    flat_counts, flat_index = counts.reshape(-1).tolist(), index.reshape(-1, 7).tolist()
    for r, kept in enumerate(want):
        assert flat_counts[r] == len(kept)
        assert flat_index[r][: len(kept)] == kept  # kept columns first, increasing
        assert sorted(flat_index[r]) == list(range(7))  # then the dropped ones: a permutation of the columns


def test_lists_to_dense_ignores_padding():
    counts = torch.tensor([[[2, 0, 3]]], dtype=torch.int32)
    index = torch.tensor([[[[4, 1, 1, 1, 1], [3, 3, 3, 3, 3], [0, 2, 4, 0, 0]]]], dtype=torch.int32)
    expected = _dense_from_rows_by_hand([[1, 4], [], [0, 2, 4]], (1, 1, 3, 5))
    assert torch.equal(lists_to_dense(counts, index, 5), expected)


@pytest.mark.parametrize("tail", [None, (3, 4), (0, 5)])
def test_from_ranked_matches_hand_built_mask(tail):
    """The prober's ranked blocks + counts, with or without a dense tail, against the mask written out by hand."""
    g = torch.Generator().manual_seed(2)
    b, h, nq, nk, width = 2, 2, 5, 6, 4
    ranked = torch.stack([torch.randperm(nk, generator=g)[:width] for _ in range(b * h * nq)]).view(b, h, nq, width)
    counts = torch.randint(1, width + 1, (b, h, nq), generator=g)
    rows_from, cols_from = tail if tail is not None else (None, None)
    mask = BlockMask.from_ranked(ranked, counts, nk, dense_rows_from=rows_from, dense_cols_from=cols_from)

    rows = []
    for r, (cols, n) in enumerate(zip(ranked.view(-1, width).tolist(), counts.view(-1).tolist())):
        kept = set(cols[:n])
        if cols_from is not None:
            kept |= set(range(cols_from, nk))
        if rows_from is not None and r % nq >= rows_from:
            kept = set(range(nk))
        rows.append(sorted(kept))
    expected = _dense_from_rows_by_hand(rows, (b, h, nq, nk))
    assert torch.equal(mask.dense(), expected)

    got_counts, got_index = BlockMask.from_ranked(
        ranked, counts, nk, dense_rows_from=rows_from, dense_cols_from=cols_from
    ).lists()  # a fresh object: the lists as built, not from the dense form
    assert got_index.shape == (b, h, nq, nk)
    for r, kept in enumerate(rows):
        assert got_counts.view(-1)[r].item() == len(kept)
        assert got_index.view(-1, nk)[r, : len(kept)].tolist() == kept  # increasing, what the kernels need
        assert ((got_index.view(-1, nk)[r] >= 0) & (got_index.view(-1, nk)[r] < nk)).all()  # padding in range


def test_prober_lists_equal_the_lists_of_its_dense_mask():
    """The prober builds lists from its ranking: the kept prefix equals the lists rebuilt from the dense form."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 2, 3, 200, 16, generator=g).unbind(0)
    for tail in (0, 40):
        mask = _estimate_block_mask(
            q, k, block_size=32, samples_per_block=4, threshold=0.7, min_keep=0.1, max_keep=0.4,
            dense_tail_tokens=tail, rng_key=-1, backend="torch",
        )  # fmt: skip
        counts, index = mask.lists()
        ref_counts, ref_index = dense_to_lists(mask.dense())
        assert torch.equal(counts, ref_counts)
        keep = torch.arange(index.shape[-1]) < counts.unsqueeze(-1)
        assert torch.equal(torch.where(keep, index, -1), torch.where(keep, ref_index, -1))


def test_kept_blocks_select_heads_and_wrapping():
    dense = _random_dense(1, 4, 3, 3, seed=4)
    mask = BlockMask.from_dense(dense)
    assert mask.kept_blocks(2, 4).item() == 2 * int(dense.sum())
    lists_only = BlockMask.from_lists(*dense_to_lists(dense))
    assert lists_only.kept_blocks(2, 4).item() == 2 * int(dense.sum())
    assert torch.equal(lists_only.select_heads(1, 2).dense(), dense[:, 1:3])
    shared = BlockMask.from_dense(dense[:, :1])
    assert shared.select_heads(1, 2) is shared  # broadcast over heads: every head's mask
    assert as_block_mask(mask) is mask and torch.equal(as_block_mask(dense).dense(), dense)
    with pytest.raises(ValueError, match="4-D bool"):
        BlockMask.from_dense(dense.int())
    with pytest.raises(TypeError):
        as_block_mask([[True]])


# -------------------------------------------------------------------------------------- backends fed the object
def _float64_attention(q, k, v, dense, block_size, global_k=None, global_v=None, global_bias=None):
    """float64 softmax over the keys of the kept blocks (token mask by indexing) and the global tokens."""
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, q_len, dim = q.shape
    token_mask = dense.expand(batch, heads, -1, -1)[:, :, torch.arange(q_len) // block_size]
    token_mask = token_mask[:, :, :, torch.arange(k.shape[-2]) // block_size]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(dim)).masked_fill(~token_mask, float("-inf"))
    if global_k is not None:
        g_scores = q @ global_k.double().transpose(-1, -2) / math.sqrt(dim) + global_bias.double()
        scores, v = torch.cat([scores, g_scores], -1), torch.cat([v, global_v.double()], -2)
    return torch.nan_to_num(torch.softmax(scores, -1), nan=0.0) @ v


def _case(with_globals):
    g = torch.Generator().manual_seed(5)
    b, h, lq, lk, d, bs, nk, width = 2, 2, 100, 90, 16, 32, 3, 2
    q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (lq, lk, lk))
    ranked = torch.stack([torch.randperm(nk, generator=g)[:width] for _ in range(b * h * 4)]).view(b, h, 4, width)
    counts = torch.randint(0, width + 1, (b, h, 4), generator=g)  # 0: a query block that keeps nothing
    mask = BlockMask.from_ranked(ranked, counts, nk)
    extra = {}
    if with_globals:
        gk, gv = torch.randn(2, b, h, 3, d, generator=g).unbind(0)
        extra = dict(global_k=gk, global_v=gv, global_bias=torch.log(torch.tensor([1.0, 2.0, 3.0])))
    return q, k, v, mask, bs, extra


def _backends():
    backends = ["reference", "gather"]
    try:
        from blade.attention.kernels import triton_bsa

        if triton_bsa.is_available() and (torch.cuda.is_available() or triton_bsa._interpreting()):
            backends.append("triton")
    except Exception:
        pass
    return backends


@pytest.mark.parametrize("with_globals", [False, True])
@pytest.mark.parametrize("backend", _backends())
def test_every_backend_fed_the_object_equals_float64(backend, with_globals):
    q, k, v, mask, bs, extra = _case(with_globals)
    expected = _float64_attention(q, k, v, mask.dense(), bs, **extra)
    # The object as the prober makes it (lists only) and as a bool mask wraps (dense only): the same output.
    lists_only = BlockMask.from_lists(*mask.lists())
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    extra = {name: t.to(DEVICE) for name, t in extra.items()}
    for block_mask in (lists_only, BlockMask.from_dense(mask.dense())):
        out = block_sparse_attention(q, k, v, block_mask.to(DEVICE), block_size=bs, backend=backend, **extra)
        torch.testing.assert_close(out.double().cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif("triton" not in _backends(), reason="triton is not importable")
def test_triton_gradients_from_a_lists_only_object_equal_float64():
    """The backward builds its transposed lists from the forward's lists (no dense mask was ever given)."""
    q, k, v, mask, bs, extra = _case(with_globals=True)
    lists_only = BlockMask.from_lists(*mask.lists())
    leaves = [t.to(DEVICE).requires_grad_(True) for t in (q, k, v, extra["global_k"], extra["global_v"])]
    bias = extra["global_bias"].to(DEVICE)
    out = block_sparse_attention(*leaves[:3], lists_only.to(DEVICE), block_size=bs, backend="triton",
                                 global_k=leaves[3], global_v=leaves[4], global_bias=bias)  # fmt: skip
    (out * out).sum().backward()
    ref_leaves = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    ref = _float64_attention(*ref_leaves[:3], mask.dense(), bs, ref_leaves[3], ref_leaves[4], bias.cpu())
    (ref * ref).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(
    os.environ.get("BLADE_SLOW_TESTS") != "1", reason="compiling flex on CPU takes 30-90 s; set BLADE_SLOW_TESTS=1"
)
@pytest.mark.parametrize("with_globals", [False, True])
def test_flex_fed_the_object_equals_float64(with_globals):
    q, k, v, mask, bs, extra = _case(with_globals)
    expected = _float64_attention(q, k, v, mask.dense(), bs, **extra)
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, BlockMask.from_lists(*mask.lists()), block_size=bs, backend="flex",
                                     **extra)  # fmt: skip
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_bsa_inputs_take_the_objects_dense_form():
    q, k, v = torch.randn(3, 1, 2, 300, 32).unbind(0)
    ranked = torch.tensor([[0, 2], [1, 0], [2, 1]]).expand(1, 2, 3, 2)
    mask = BlockMask.from_ranked(ranked, torch.tensor([1, 2, 2]).expand(1, 2, 3), 3)
    inputs = to_bsa_inputs(q, k, v, mask)
    expected = _dense_from_rows_by_hand([[0], [0, 1], [1, 2]] * 2, (1, 2, 3, 3))
    assert torch.equal(inputs.base_blockmask, expected)


def test_asa_module_builds_one_object_and_counts_its_blocks():
    """The module's stats come from the object's counts: equal to the kept entries of its dense form."""
    config = ASAConfig(block_size=16, samples_per_block=4, threshold=0.6, min_keep=0.1, max_keep=0.4, seed=7)
    q, k, v = torch.randn(3, 1, 2, 70, 16, generator=torch.Generator().manual_seed(6)).unbind(0)
    asa = AdaptiveBlockSparseAttention(config)
    mask = asa.estimate_mask(q, k, dense_tail_tokens=6)
    assert isinstance(mask, BlockMask) and mask.shape == (1, 2, 5, 5)
    asa.attend(q, k, v, mask)
    assert asa.last_stats["kept_blocks"] == int(mask.dense().sum()) and asa.last_stats["total_blocks"] == 50


def test_asa_forward_takes_a_given_mask_and_slices_its_heads():
    """The one entry point with a fixed mask (a provider's): same output as the kernel over that mask, and a mask of
    all ``total`` heads sliced to the call's heads under ``heads=(first, total)``."""
    config = ASAConfig(block_size=16, samples_per_block=4, backend="reference")
    q, k, v = torch.randn(3, 1, 4, 64, 16, generator=torch.Generator().manual_seed(8)).unbind(0)
    dense = _random_dense(1, 4, 4, 4, p=0.5, seed=9)
    asa = AdaptiveBlockSparseAttention(config)
    out = asa(q, k, v, pre_reordered=True, block_mask=dense)
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, dense, block_size=16, backend="reference"))
    assert asa.last_stats["kept_blocks"] == int(dense.sum())
    part = asa(q[:, 2:], k[:, 2:], v[:, 2:], pre_reordered=True, heads=(2, 4), block_mask=BlockMask.from_dense(dense))
    torch.testing.assert_close(part, out[:, 2:])
