"""ASA module: config validation, reorder round trip, dense tail, global tokens, stats, gradients, seeding."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from blade.attention import AdaptiveBlockSparseAttention, ASAConfig, gilbert_permutation

KEEP_ALL = dict(block_size=32, threshold=1.0, min_keep=1.0, max_keep=1.0, backend="reference")


def qkv(b=1, h=2, length=2 * 6 * 10, d=32, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, length, d, generator=g, dtype=dtype) for _ in range(3)]


def test_config_round_trip_and_validation():
    cfg = ASAConfig(pool_size=30, seed=4, dense_tail_tokens=226, max_keep=0.1)
    assert ASAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in [
        dict(block_size=100),
        dict(block_size=0),
        dict(threshold=0.0),
        dict(threshold=1.5),
        dict(min_keep=0.5, max_keep=0.2),
        dict(max_keep=1.2),
        dict(pool_size=0),
        dict(backend="cuda"),
    ]:
        with pytest.raises(ValueError, match="ASAConfig"):
            ASAConfig(**bad)
    with pytest.raises(ValueError, match="unknown ASAConfig fields"):
        ASAConfig.from_dict({"block_sz": 64})


def test_sampling_overrides_replace_the_clamp_and_window_and_lower_min_keep_with_the_clamp():
    cfg = ASAConfig(min_keep=0.3, max_keep=0.6, pool_size=4, threshold=0.9)
    assert cfg.with_sampling_overrides() == cfg
    assert cfg.with_sampling_overrides(pool_size=30) == ASAConfig(min_keep=0.3, max_keep=0.6, pool_size=30,
                                                                  threshold=0.9)
    assert cfg.with_sampling_overrides(max_keep=0.4) == ASAConfig(min_keep=0.3, max_keep=0.4, pool_size=4,
                                                                  threshold=0.9)
    lowered = cfg.with_sampling_overrides(max_keep=0.2, pool_size=30)
    assert (lowered.min_keep, lowered.max_keep, lowered.pool_size, lowered.threshold) == (0.2, 0.2, 30, 0.9)
    for bad in (dict(max_keep=1.5), dict(max_keep=-0.1), dict(pool_size=0)):
        with pytest.raises(ValueError, match="ASAConfig"):
            cfg.with_sampling_overrides(**bad)


def test_keep_all_round_trip_equals_dense_in_original_order():
    q, k, v = qkv(length=2 * 6 * 10 + 7)  # 120 video tokens + 7 tail tokens
    asa = AdaptiveBlockSparseAttention(ASAConfig(**KEEP_ALL))
    out = asa(q, k, v, grid=(2, 6, 10))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12, rtol=1e-12)
    assert asa.last_stats["sparsity"] == 0.0


def test_sparse_output_is_block_sparse_attention_in_curve_order():
    from blade.attention import block_sparse_attention, estimate_block_mask

    q, k, v = qkv(length=3 * 8 * 10)
    cfg = ASAConfig(block_size=32, min_keep=0.1, max_keep=0.3, backend="reference", seed=5)
    out = AdaptiveBlockSparseAttention(cfg)(q, k, v, grid=(3, 8, 10))
    perm = gilbert_permutation(3, 8, 10)
    qp, kp, vp = q[:, :, perm], k[:, :, perm], v[:, :, perm]
    mask = estimate_block_mask(
        qp, kp, block_size=32, min_keep=0.1, max_keep=0.3, generator=torch.Generator().manual_seed(5)
    )
    expected = torch.empty_like(out)
    expected[:, :, perm] = block_sparse_attention(qp, kp, vp, mask, block_size=32, backend="reference")
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_text_tail_is_dense_both_ways():
    n_video, n_text = 3 * 8 * 10, 40
    q, k, v = qkv(length=n_video + n_text)
    cfg = ASAConfig(block_size=32, min_keep=0.0, max_keep=0.1, backend="reference")
    asa = AdaptiveBlockSparseAttention(cfg)
    out = asa(q, k, v, grid=(3, 8, 10))
    # Text queries see every token: their rows equal dense attention.
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[:, :, n_video:], dense[:, :, n_video:], atol=1e-12, rtol=1e-12)
    # Every query sees the text: perturbing a text value changes every output row.
    v2 = v.clone()
    v2[:, :, -1] += 1.0
    delta = (asa(q, k, v2, grid=(3, 8, 10)) - out).abs().sum(-1)
    assert (delta > 0).all()
    assert 0.0 < asa.last_stats["sparsity"] < 1.0


def test_pre_reordered_uses_dense_tail_tokens():
    q, k, v = qkv(length=200)
    cfg = ASAConfig(block_size=32, min_keep=0.0, max_keep=0.1, dense_tail_tokens=40, backend="reference")
    out = AdaptiveBlockSparseAttention(cfg)(q, k, v, pre_reordered=True)
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out[:, :, 160:], dense[:, :, 160:], atol=1e-12, rtol=1e-12)


def dense_with_pooled_tokens(q, k, v, mask_tokens, pool):
    """Joint softmax over masked keys and mean-pooled windows with a ln(count) bias, written out in float64."""
    length = k.shape[-2]
    windows = [range(s, min(s + pool, length)) for s in range(0, length, pool)]
    gk = torch.stack([k[:, :, list(w)].mean(-2) for w in windows], dim=-2)
    gv = torch.stack([v[:, :, list(w)].mean(-2) for w in windows], dim=-2)
    bias = torch.tensor([math.log(len(w)) for w in windows], dtype=q.dtype)
    scale = 1 / math.sqrt(q.shape[-1])
    s = torch.cat(
        [
            (q @ k.transpose(-1, -2) * scale).masked_fill(~mask_tokens, float("-inf")),
            q @ gk.transpose(-1, -2) * scale + bias,
        ],
        dim=-1,
    )
    return torch.softmax(s, -1) @ torch.cat([v, gv], dim=-2)


def test_global_tokens_and_paper_sparsity():
    q, k, v = qkv(length=200)
    cfg = ASAConfig(block_size=32, min_keep=0.0, max_keep=0.3, pool_size=30, backend="reference", seed=1)
    asa = AdaptiveBlockSparseAttention(cfg)
    out = asa(q, k, v)
    from blade.attention import estimate_block_mask

    mask = estimate_block_mask(
        q, k, block_size=32, min_keep=0.0, max_keep=0.3, generator=torch.Generator().manual_seed(1)
    )
    idx = torch.arange(200) // 32
    expected = dense_with_pooled_tokens(q, k, v, mask[:, :, idx][:, :, :, idx], 30)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    stats = asa.last_stats
    density = mask.float().mean().item()
    assert stats["kept_blocks"] == int(mask.sum()) and stats["total_blocks"] == mask.numel()
    assert stats["sparsity"] == pytest.approx(1 - density)
    assert stats["sparsity_paper"] == pytest.approx(1 - density - 1 / 30)


def test_stats_aggregate_and_reset_and_dense_switch():
    q, k, v = qkv(length=128)
    asa = AdaptiveBlockSparseAttention(ASAConfig(block_size=32, min_keep=0.0, max_keep=0.5, backend="reference"))
    out = asa(q, k, v, dense=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert asa.last_stats["sparsity"] == 0.0 and asa.last_stats["sparsity_paper"] == 0.0
    asa(q, k, v)
    sparse = asa.last_stats
    agg = asa.stats()
    assert agg["calls"] == 2 and agg["total_blocks"] == 2 * sparse["total_blocks"]
    assert agg["sparsity"] == pytest.approx(sparse["sparsity"] / 2)
    asa.reset_stats()
    assert asa.stats()["calls"] == 0 and asa.last_stats is None


def test_gradients_equal_dense_with_keep_all_and_pooling():
    q, k, v = (t.requires_grad_(True) for t in qkv(length=2 * 6 * 10 + 5))
    asa = AdaptiveBlockSparseAttention(ASAConfig(**KEEP_ALL, pool_size=7))
    out = asa(q, k, v, grid=(2, 6, 10))
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    # Reference: same joint softmax in curve order, pooled windows included (they depend on k, v too).
    perm = torch.cat([gilbert_permutation(2, 6, 10), torch.arange(120, 125)])
    q2, k2, v2 = (t.detach()[:, :, perm].requires_grad_(True) for t in (q, k, v))
    ref = dense_with_pooled_tokens(q2, k2, v2, torch.ones(125, 125, dtype=torch.bool), 7)
    ref_grads = torch.autograd.grad(ref, (q2, k2, v2), g[:, :, perm])
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[:, :, perm], want, atol=1e-10, rtol=1e-10)


def test_seed_determinism():
    q, k, v = qkv(length=3 * 8 * 10, dtype=torch.float32)
    cfg = ASAConfig(block_size=32, samples_per_block=2, min_keep=0.0, max_keep=0.3, seed=7, backend="reference")
    a1 = AdaptiveBlockSparseAttention(cfg)
    a2 = AdaptiveBlockSparseAttention(cfg)
    first = [a1(q, k, v, grid=(3, 8, 10)) for _ in range(2)]
    second = [a2(q, k, v, grid=(3, 8, 10)) for _ in range(2)]
    for x, y in zip(first, second):
        assert torch.equal(x, y)  # same seed -> same sequence of masks


def test_mixed_operand_dtypes_under_autocast_use_one_kernel_dtype():
    """Norms/RoPE can hand back float32 q/k beside a bf16 v inside autocast; pooled tokens come out float32."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 16) for _ in range(3))
    module = AdaptiveBlockSparseAttention(ASAConfig(block_size=32, threshold=1.0, min_keep=1.0, max_keep=1.0,
                                                    pool_size=8, backend="reference"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(q, k.bfloat16(), v)
    assert out.dtype == torch.bfloat16
    expected = module(q.double(), k.double(), v.double())
    assert torch.allclose(out.double(), expected, atol=3e-2, rtol=3e-2)
