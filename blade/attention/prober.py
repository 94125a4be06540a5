"""The ASA prober: a cheap, sampled estimate of which key blocks each query block needs.

Per block, ``samples_per_block`` token positions are drawn from Q and from K. The sampled queries attend to all
sampled keys (one float32 softmax over ``Nk * samples`` keys); each ``samples x samples`` tile is max-pooled into a
block importance, and each query-block row is normalised to sum 1. Per row, the most important blocks are kept
until their cumulative mass reaches ``threshold`` (the crossing block included), with the count clamped to
``[ceil(min_keep * Nk), ceil(max_keep * Nk)]`` and to ``[1, Nk]``. The cost is about ``(samples / block_size)^2`` of
dense ``Q K^T`` (1/64 for 16 samples in 128-token blocks).
"""

from __future__ import annotations

import math

import torch

# Budget for one head-chunk of sampled scores (float32 elements): ~256 MiB.
_SCORE_ELEMENTS = 64 * 1024 * 1024


def _ceil_fraction(fraction: float, n: int) -> int:
    # The epsilon keeps products such as 0.1 * 30 = 3.0000000000000004 from rounding up to 4.
    return math.ceil(fraction * n - 1e-9)


def sample_block_positions(
    length: int,
    block_size: int,
    samples: int,
    batch_shape: tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Uniform random token positions inside each block (with replacement), within the block's real tokens.

    Returns:
        int64 ``[*batch_shape, n_blocks * samples]``; entries ``j*samples ... (j+1)*samples-1`` lie in block ``j``.
    """
    n_blocks = math.ceil(length / block_size)
    starts = torch.arange(n_blocks, device=device) * block_size
    valid = (length - starts).clamp(max=block_size)  # ragged last block: only its real tokens
    rng_device = generator.device if generator is not None else device
    u = torch.rand(*batch_shape, n_blocks, samples, generator=generator, device=rng_device).to(device)
    offsets = (u * valid[:, None]).long().minimum(valid[:, None] - 1)
    return (starts[:, None] + offsets).flatten(-2)


def _gather_tokens(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, D]`` at ``positions [B, H, S]`` -> ``[B, H, S, D]``."""
    return x.gather(2, positions.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def block_importance(q_samples: torch.Tensor, k_samples: torch.Tensor, samples: int) -> torch.Tensor:
    """Block importance from sampled tokens.

    Args:
        q_samples: ``[B, H, Nq*s, D]``; k_samples: ``[B, H, Nk*s, D]`` (block-major, ``s = samples``).
    Returns:
        float32 ``[B, H, Nq, Nk]``, each row summing to 1.
    """
    batch, heads, n_qs, dim = q_samples.shape
    n_q, n_k = n_qs // samples, k_samples.shape[-2] // samples
    per_head = n_qs * k_samples.shape[-2]
    q_flat = q_samples.reshape(batch * heads, n_qs, dim)
    k_flat = k_samples.reshape(batch * heads, -1, dim)
    step = max(1, _SCORE_ELEMENTS // max(per_head, 1))
    tiles = []
    for first in range(0, batch * heads, step):  # chunks of heads bound the [Nq*s, Nk*s] score memory
        qc = q_flat[first : first + step].float()
        kc = k_flat[first : first + step].float()
        probs = torch.softmax(torch.bmm(qc, kc.transpose(1, 2)) / math.sqrt(dim), dim=-1)
        tiles.append(probs.view(-1, n_q, samples, n_k, samples).amax(dim=(2, 4)))
    importance = torch.cat(tiles).view(batch, heads, n_q, n_k)
    return importance / importance.sum(dim=-1, keepdim=True)


def select_blocks(importance: torch.Tensor, threshold: float, min_keep: float, max_keep: float) -> torch.Tensor:
    """Threshold + clamp selection over each row of ``importance [..., Nq, Nk]`` (rows sum to 1).

    Keeps the smallest top set whose cumulative mass reaches ``threshold`` (the crossing block included), with the
    count clamped to ``[ceil(min_keep*Nk), ceil(max_keep*Nk)]`` and to ``[1, Nk]``.

    Returns:
        bool ``[..., Nq, Nk]``.
    """
    n_k = importance.shape[-1]
    sorted_mass, order = torch.sort(importance, dim=-1, descending=True, stable=True)
    cumulative = sorted_mass.cumsum(dim=-1)
    count = (cumulative < threshold).sum(dim=-1, keepdim=True) + 1  # blocks before the crossing one, plus it
    low = min(max(_ceil_fraction(min_keep, n_k), 1), n_k)
    high = min(max(_ceil_fraction(max_keep, n_k), low), n_k)
    count = count.clamp(low, high)
    rank = torch.arange(n_k, device=importance.device)
    keep_sorted = rank < count
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _force_dense_tail(mask: torch.Tensor, q_len: int, k_len: int, block_size: int, tail_tokens: int) -> torch.Tensor:
    """Full rows and columns for the blocks that hold the last ``tail_tokens`` queries / keys."""
    if tail_tokens <= 0:
        return mask
    first_q_block = max(q_len - tail_tokens, 0) // block_size
    first_k_block = max(k_len - tail_tokens, 0) // block_size
    mask = mask.clone()
    mask[..., first_q_block:, :] = True
    mask[..., :, first_k_block:] = True
    return mask


@torch.no_grad()
def estimate_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int = 128,
    samples_per_block: int = 16,
    threshold: float = 0.95,
    min_keep: float = 0.05,
    max_keep: float = 0.17,
    dense_tail_tokens: int = 0,
    generator: torch.Generator | None = None,
) -> torch.BoolTensor:
    """Adaptive block mask from sampled Q/K tokens.

    Args:
        q: ``[B, H, Lq, D]``; k: ``[B, H, Lk, D]``.
        generator: RNG for the sampled positions; None uses the global RNG (so activation checkpointing, which
            replays the global RNG state, recomputes the same mask).
    Returns:
        bool ``[B, H, ceil(Lq/bs), ceil(Lk/bs)]`` without grad.
    """
    batch, heads, q_len, _ = q.shape
    k_len = k.shape[-2]
    q_pos = sample_block_positions(q_len, block_size, samples_per_block, (batch, heads), q.device, generator)
    k_pos = sample_block_positions(k_len, block_size, samples_per_block, (batch, heads), k.device, generator)
    importance = block_importance(_gather_tokens(q, q_pos), _gather_tokens(k, k_pos), samples_per_block)
    mask = select_blocks(importance, threshold, min_keep, max_keep)
    return _force_dense_tail(mask, q_len, k_len, block_size, dense_tail_tokens)
