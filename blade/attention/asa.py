"""Adaptive Block-Sparse Attention (ASA): Gilbert reorder -> prober mask -> block-sparse kernel -> restore order.

With ``pool_size`` set this is ASA_GT: mean-pooled keys/values over windows of the reordered sequence are appended
as always-visible global tokens with a ``ln(window size)`` logit bias, so each pooled token weighs like the tokens it
summarises. Kept blocks and global tokens share one exact softmax (autograd through it is exact, unlike an LSE merge
of two kernel calls whose LSE gradient is dropped).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from .block_mask import BlockMask, as_block_mask
from .gilbert import gilbert_permutation, inverse_permutation
from .kernels import BACKENDS, block_sparse_attention
from .prober import GLOBAL_RNG, SeededGenerators, _estimate_block_mask


def _from_known_fields(cls: type, data: dict):
    """``cls(**data)`` for a dataclass, refusing keys that are not its fields with a message naming both."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known fields: {sorted(known)}")
    return cls(**data)


@dataclass
class ASAConfig:
    """Settings of adaptive block-sparse attention (JSON-serialisable; stored in a BLADE LoRA's config)."""

    block_size: int = 128
    samples_per_block: int = 16
    threshold: float = 0.95
    min_keep: float = 0.05
    max_keep: float = 0.17
    pool_size: int | None = None
    dense_tail_tokens: int = 0
    backend: str = "auto"
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 16 != 0:
            raise ValueError(f"ASAConfig.block_size must be a positive multiple of 16, got {self.block_size!r}")
        if not isinstance(self.samples_per_block, int) or self.samples_per_block < 1:
            raise ValueError(f"ASAConfig.samples_per_block must be an int >= 1, got {self.samples_per_block!r}")
        if not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError(f"ASAConfig.threshold must be in (0, 1], got {self.threshold!r}")
        if not 0.0 <= float(self.min_keep) <= float(self.max_keep) <= 1.0:
            raise ValueError(
                f"ASAConfig needs 0 <= min_keep <= max_keep <= 1, got min_keep={self.min_keep!r}, "
                f"max_keep={self.max_keep!r}"
            )
        if self.pool_size is not None and (not isinstance(self.pool_size, int) or self.pool_size < 1):
            raise ValueError(f"ASAConfig.pool_size must be None or an int >= 1, got {self.pool_size!r}")
        if not isinstance(self.dense_tail_tokens, int) or self.dense_tail_tokens < 0:
            raise ValueError(f"ASAConfig.dense_tail_tokens must be an int >= 0, got {self.dense_tail_tokens!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"ASAConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"ASAConfig.seed must be None or an int, got {self.seed!r}")

    def with_sampling_overrides(self, *, max_keep: float | None = None, pool_size: int | None = None,
                                samples_per_block: int | None = None) -> ASAConfig:
        """This config with the prober's upper clamp, the global-token window and/or the prober's sampled tokens per
        block replaced (None keeps a field), the way a student is sampled at another operating point than it was
        distilled: a ``max_keep`` below ``min_keep`` lowers ``min_keep`` with it. Validated like any config."""
        changes: dict = {}
        if samples_per_block is not None:
            changes["samples_per_block"] = samples_per_block
        if max_keep is not None:
            changes.update(max_keep=max_keep, min_keep=min(self.min_keep, max_keep))
        if pool_size is not None:
            changes["pool_size"] = pool_size
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ASAConfig:
        return _from_known_fields(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ASAConfig:
        return cls.from_dict(json.loads(text))


def mean_pool_tokens(x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``x [B, H, L, D]`` over consecutive windows of ``window`` tokens (the last one may be shorter).

    Returns:
        pooled ``[B, H, ceil(L/window), D]`` and ``counts`` float ``[ceil(L/window)]`` (tokens per window).
    """
    length = x.shape[-2]
    n_windows = math.ceil(length / window)
    padded = F.pad(x, (0, 0, 0, n_windows * window - length))
    sums = padded.unflatten(-2, (n_windows, window)).sum(dim=-2)
    count_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    counts = (length - torch.arange(n_windows, device=x.device) * window).clamp(max=window).to(count_dtype)
    return sums / counts[:, None].to(x.dtype), counts


@torch.compiler.assume_constant_result
def _token_orders(frames: int, height: int, width: int, length: int) -> torch.Tensor:
    """``[2, length]`` int64: the Gilbert order of the ``F*H*W`` raster video tokens followed by the tail tokens, and
    its inverse. A pure function of the sizes, so a compiled graph holds it as a constant (the curve construction is
    numpy code that torch.compile cannot trace)."""
    n_video = frames * height * width
    perm = torch.cat([gilbert_permutation(frames, height, width), torch.arange(n_video, length)])
    return torch.stack([perm, inverse_permutation(perm)])


def _common_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One dtype for q, k, v: the autocast dtype inside an autocast region (norms and RoPE may hand back float32
    next to a bf16 projection), else the promoted type. Kernels take a single operand dtype."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t if t.dtype == dtype else t.to(dtype) for t in tensors)


@dataclass(frozen=True)
class EarlyContext:
    """More global context at the first sampling steps: ASA's prober clamp ``max_keep`` and global-token window
    ``pool_size`` replaced (``ASAConfig.with_sampling_overrides``) for the first ``steps`` sampling steps, the rest
    sampled with the config as it is.

    Why an option: a student's first steps lay the video out (where each object is), and TinyWorld's x0 trajectories
    show the objects a sparse student draws twice appear there. Measured on TinyWorld's bundled student (one step at
    window 5 / keep <= 0.25), it did not reduce them on the GPU's 192 videos (BENCHMARKS.md, "Session 14"), so nothing
    ships with it on; it is a knob for students and models where the layout steps need more context. ``steps``
    counts sampling steps from the first, as ``dense_steps`` does (a dense step stays dense). None in a field keeps
    the config's.
    """

    steps: int
    max_keep: float | None = 0.25
    pool_size: int | None = 5

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"EarlyContext.steps must be an int >= 0, got {self.steps!r}")
        if self.max_keep is not None and (isinstance(self.max_keep, bool) or not isinstance(self.max_keep, (int, float))
                                          or not 0.0 < self.max_keep <= 1.0):
            raise ValueError(f"EarlyContext.max_keep must be in (0, 1] or None, got {self.max_keep!r}")
        if self.pool_size is not None and (isinstance(self.pool_size, bool) or not isinstance(self.pool_size, int)
                                           or self.pool_size < 1):
            raise ValueError(f"EarlyContext.pool_size must be an int >= 1 or None, got {self.pool_size!r}")

    @classmethod
    def resolve(
        cls, stored: EarlyContext | None, *, attention: str = "asa", steps: int | None = None,
        max_keep: float | None = None, pool_size: int | None = None,
    ) -> EarlyContext | None:
        """What a run samples with (the inference scripts' and the evaluation's rule): ``stored`` (a LoRA's) with the
        given fields over it, this class's defaults for what neither gives; None when the result has no steps, or when
        the run's ``attention`` is not ``"asa"``. A ValueError: fields given for a run without ASA; ``max_keep`` /
        ``pool_size`` with neither a stored context nor ``steps`` (how many steps is not guessed); a value the config
        refuses."""
        given = {name: value for name, value in (("steps", steps), ("max_keep", max_keep), ("pool_size", pool_size))
                 if value is not None}
        if attention != "asa":
            if given:
                raise ValueError(f"the early context's fields change ASA's settings at the first steps; this run's "
                                 f"attention is {attention} (pass --attention asa, or drop them)")
            return None
        if not given:
            return stored
        if stored is None and "steps" not in given:
            raise ValueError("an early context's max_keep / pool_size without its number of steps: give the steps too "
                             "(--early_context_steps N)")
        early = cls.from_dict({**(stored.to_dict() if stored is not None else {}), **given})
        early.config_for(ASAConfig())  # the config's own range checks, on its defaults
        return early if early.steps > 0 else None

    def config_for(self, config: ASAConfig) -> ASAConfig:
        """The config the early steps run: ``config`` with this context's overrides."""
        return config.with_sampling_overrides(max_keep=self.max_keep, pool_size=self.pool_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EarlyContext:
        return _from_known_fields(cls, data)


class AdaptiveBlockSparseAttention(nn.Module):
    """ASA (ASA_GT with ``config.pool_size``) over ``[B, H, L, D]`` tensors; parameter-free.

    Stats of the realised sparsity are kept on the module: ``last_stats`` (the latest call), ``stats()`` (aggregate
    since ``reset_stats()``). Counts are accumulated as device tensors and read only when asked for, so a forward
    does not synchronise with the GPU, and ``torch.compile`` traces it without graph breaks or recompilations
    (no Python number on the module changes per call).
    """

    def __init__(self, config: ASAConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ASAConfig()
        # Created here, not at the first call: a compiled forward cannot create a torch.Generator.
        self._rng = SeededGenerators(self.config.seed) if self.config.seed is not None else None
        self.reset_stats()

    # ----------------------------------------------------------------------------------------------- helpers
    def _rng_key(self) -> int:
        """Key of the prober's random source: private per-device generators seeded with ``config.seed`` (restarted
        by ``reset_stats``), else the global RNG."""
        seed = self.config.seed
        if seed is None:
            return GLOBAL_RNG
        if self._rng is None or self._rng.seed != seed:  # the config was edited after construction
            self._rng = SeededGenerators(seed)
        return self._rng.key

    def _global_tokens(self, k: torch.Tensor, v: torch.Tensor):
        """Pooled keys/values ``[B, H, ceil(L/n), D]`` and their ``ln(count)`` bias, or Nones without pooling."""
        if self.config.pool_size is None:
            return None, None, None
        global_k, counts = mean_pool_tokens(k, self.config.pool_size)
        global_v, _ = mean_pool_tokens(v, self.config.pool_size)
        # Reductions run in float32 under autocast: hand the kernel the operands' dtype.
        return global_k.to(k.dtype), global_v.to(v.dtype), torch.log(counts)

    def _record(self, kept: torch.Tensor, total: int, pooled_fraction: float) -> None:
        """Store one call's counts; ``pooled_fraction`` is the 1/n of the paper's sparsity (0 without pooling).

        One float64 vector ``(kept, total, pooled_fraction * total, 1)`` on ``kept``'s device per call, summed into
        ``_sums``: filled on the device (no host-to-device copy, no sync) and read only when stats are asked for.
        """
        kept = kept.detach().to(torch.float64)
        counts = torch.stack(
            (kept, torch.full_like(kept, total), torch.full_like(kept, pooled_fraction * total), torch.ones_like(kept))
        )
        self._last = counts
        self._sums = counts if self._sums is None else self._sums + counts.to(self._sums.device)

    @staticmethod
    def _summary(kept: float, total: float, pooled_weighted: float) -> dict:
        density = kept / total if total else 1.0  # no call yet: nothing was skipped
        pooled = pooled_weighted / total if total else 0.0
        return {
            "sparsity": 1.0 - density,
            "sparsity_paper": max(0.0, 1.0 - density - pooled),  # the paper's form; clipped for near-dense calls
            "kept_blocks": int(round(kept)),
            "total_blocks": int(total),
            "density": density,
        }

    # ------------------------------------------------------------------------------------------------- stats
    def reset_stats(self) -> None:
        """Clear the counters and restart the seeded prober generator (a seeded run then repeats exactly)."""
        if self._rng is not None:
            self._rng.reset()
        self._sums: torch.Tensor | None = None  # float64 [4]: kept, total, pooled-weighted total, calls
        self._last: torch.Tensor | None = None  # the latest call's vector

    @property
    def last_stats(self) -> dict | None:
        """Latest call: ``sparsity``, ``sparsity_paper``, ``kept_blocks``, ``total_blocks``, ``density``."""
        if self._last is None:
            return None
        kept, total, pooled_weighted, _ = self._last.tolist()
        return self._summary(kept, total, pooled_weighted)

    def stats(self) -> dict:
        """Aggregate over all calls since the last ``reset_stats()`` (block-count weighted), plus ``calls``."""
        kept, total, pooled_weighted, calls = self._sums.tolist() if self._sums is not None else (0.0, 0, 0.0, 0)
        summary = self._summary(kept, total, pooled_weighted)
        summary["calls"] = int(calls)
        return summary

    # ----------------------------------------------------------------------------------------------- forward
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask | torch.Tensor
    ) -> torch.Tensor:
        """Block-sparse attention with a given mask (+ this config's global tokens), tokens already in block order.

        Args:
            q, k, v: ``[B, H, L, D]``; block_mask: ``BlockMask`` (or its bool form) ``[B|1, H|1, Nq, Nk]``.
        Returns:
            ``[B, H, L, D]``; records stats.
        """
        block_mask = as_block_mask(block_mask)
        q, k, v = _common_dtype(q, k, v)
        global_k, global_v, global_bias = self._global_tokens(k, v)
        out = block_sparse_attention(
            q,
            k,
            v,
            block_mask,
            block_size=self.config.block_size,
            backend=self.config.backend,
            global_k=global_k,
            global_v=global_v,
            global_bias=global_bias,
        )
        batch, heads = q.shape[:2]
        pooled_fraction = 1.0 / self.config.pool_size if self.config.pool_size else 0.0
        total = batch * heads * block_mask.shape[-2] * block_mask.shape[-1]
        self._record(block_mask.kept_blocks(batch, heads), total, pooled_fraction)
        return out

    def estimate_mask(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        dense_tail_tokens: int | None = None,
        heads: tuple[int, int] | None = None,
    ) -> BlockMask:
        """The prober's ``BlockMask`` ``[B, H, Nq, Nk]`` for tokens already in block order (built from the ranked
        blocks: index lists, the dense form on demand).

        ``heads=(first, total)``: ``q``/``k`` are heads ``first ...`` of a layer of ``total`` (one process's heads
        under Ulysses context parallelism); the samples drawn are then those of a call with all ``total`` heads.
        """
        cfg = self.config
        return _estimate_block_mask(
            q,
            k,
            block_size=cfg.block_size,
            samples_per_block=cfg.samples_per_block,
            threshold=cfg.threshold,
            min_keep=cfg.min_keep,
            max_keep=cfg.max_keep,
            dense_tail_tokens=cfg.dense_tail_tokens if dense_tail_tokens is None else dense_tail_tokens,
            rng_key=self._rng_key(),
            backend="auto",
            heads=heads,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        grid: tuple[int, int, int] | None = None,
        *,
        pre_reordered: bool = False,
        dense: bool = False,
        dense_tail_tokens: int | None = None,
        heads: tuple[int, int] | None = None,
        block_mask: BlockMask | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Adaptive block-sparse self-attention: the one entry point (the module API and the model processors).

        One call: reorder (unless the caller did) -> one ``BlockMask`` (the prober's, or ``block_mask``) -> kernel
        with global tokens -> stats -> restore the caller's order.

        Args:
            q, k, v: ``[B, H, L, D]``. With ``grid=(F, H, W)`` (and ``pre_reordered=False``) the first ``F*H*W``
                tokens are video tokens in raster order and the rest (e.g. text) a tail that stays dense.
            pre_reordered: the caller already put the tokens in curve order (the model adapters do, once per
                transformer forward); ``dense_tail_tokens`` (default ``config.dense_tail_tokens``) tail tokens stay
                dense.
            dense: exact dense attention (torch SDPA), recorded as sparsity 0 (dense warm-up steps).
            dense_tail_tokens: tail tokens attended densely in both directions (with a grid: at least the tokens
                after the video).
            heads: ``(first, total)``: the tensors hold heads ``first ...`` of a layer of ``total`` (Ulysses context
                parallelism): the prober draws as for all heads, a ``block_mask`` of ``total`` heads is sliced.
            block_mask: a fixed mask (``BlockMask`` or bool ``[B|1, H|1, Nq, Nk]``, in the curve order) used
                instead of the prober, e.g. a static window.
        Returns:
            ``[B, H, L, D]`` in the caller's token order.
        """
        if dense:
            out = F.scaled_dot_product_attention(q, k, v)
            n_blocks = math.ceil(q.shape[-2] / self.config.block_size) * math.ceil(k.shape[-2] / self.config.block_size)
            total = q.shape[0] * q.shape[1] * n_blocks
            self._record(torch.full((), float(total), dtype=torch.float64, device=q.device), total, 0.0)
            return out

        length = q.shape[-2]
        dense_tail = self.config.dense_tail_tokens if dense_tail_tokens is None else dense_tail_tokens
        inv = None
        if grid is not None and not pre_reordered:
            frames, height, width = (int(x) for x in grid)
            n_video = frames * height * width
            if n_video > length or k.shape[-2] != length:
                raise ValueError(f"grid {tuple(grid)} has {n_video} tokens but q has {length} and k {k.shape[-2]}")
            perm, inv = _token_orders(frames, height, width, length).to(q.device).unbind(0)
            q, k, v = (x.index_select(-2, perm) for x in (q, k, v))
            dense_tail = max(dense_tail, length - n_video)

        if block_mask is None:
            mask = self.estimate_mask(q, k, dense_tail, heads=heads)
        else:
            mask = as_block_mask(block_mask)
            if heads is not None and mask.shape[1] == heads[1] != q.shape[1]:
                mask = mask.select_heads(heads[0], q.shape[1])
        out = self.attend(q, k, v, mask)
        return out.index_select(-2, inv) if inv is not None else out
