"""Prober masks kept across sampling steps (``ASAHandle.mask_reuse_steps``), in a form ``torch.compile`` can call.

One ``MaskReuse`` per patched transformer holds the masks of the step that last refreshed them, one slot per ASA call
of a step in call order (layer by layer; with CFG run as two forwards, the conditional forward's layers and then the
unconditional one's). The transformer pre-hook (eager, outside any compiled region) tells it which sampling step
opens (``begin``); each attention call then takes its slot's mask through the opaque custom op
``blade::asa_reused_mask``, which probes (``AdaptiveBlockSparseAttention.estimate_mask``) on a refreshing step and
hands back the stored lists otherwise. The slot counter and the refresh decision live inside the op, so a compiled
block (one graph shared by all layers) never specialises on them: done in traced Python, they would recompile the
block for every layer.

The op finds its ``MaskReuse`` by an int key (what a custom op can take), as the prober finds its generator.
"""

from __future__ import annotations

import copy
import itertools
import math
import weakref
from typing import Any

import torch

from blade.attention import AdaptiveBlockSparseAttention
from blade.attention.block_mask import BlockMask

_KEYS = itertools.count()
_REGISTRY: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key -> MaskReuse


def check_mask_reuse_steps(value: Any) -> int:
    """``value`` if it is a valid ``mask_reuse_steps`` (an int >= 1), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mask_reuse_steps must be an int >= 1, got {value!r}")
    return value


class MaskReuse:
    """The slots of one transformer's masks and when to refresh them (``every`` steps; 1 = reuse off)."""

    def __init__(self, asa: AdaptiveBlockSparseAttention, every: int = 1):
        self.asa, self.every = asa, every
        self.step: int | None = None
        self.fresh, self.index = True, 0
        self.masks: dict[int, BlockMask] = {}
        self.key = next(_KEYS)
        _REGISTRY[self.key] = self

    def __deepcopy__(self, memo: dict) -> MaskReuse:
        """A copy (e.g. of a patched transformer for the TDM fake score) gets its own key and no stored masks."""
        return MaskReuse(copy.deepcopy(self.asa, memo), self.every)

    def begin(self, step: int, first_sparse_step: int) -> None:
        """A forward of sampling ``step`` opens (CFG's second forward of a step continues the slot count)."""
        if step != self.step:
            self.step, self.index = step, 0
            self.fresh = (step - first_sparse_step) % self.every == 0

    def set_every(self, every: int) -> None:
        """Serve each mask ``every`` steps from now on (the stored masks are dropped)."""
        self.clear()
        self.every = check_mask_reuse_steps(every)

    def clear(self) -> None:
        self.step, self.fresh, self.index = None, True, 0
        self.masks.clear()

    def mask(
        self, q: torch.Tensor, k: torch.Tensor, dense_tail_tokens: int, heads: tuple[int, int] | None
    ) -> BlockMask:
        """This call's mask ``[B, H, Nq, Nk]``, through the opaque op (the same in eager and compiled code)."""
        first, total = heads if heads is not None else (0, -1)
        counts, index = torch.ops.blade.asa_reused_mask(
            q, k, self.key, self.asa.config.block_size, int(dense_tail_tokens), first, total
        )
        return BlockMask.from_lists(counts, index)

    def _slot_mask(self, q: torch.Tensor, k: torch.Tensor, dense_tail_tokens: int, heads: Any) -> BlockMask:
        slot, self.index = self.index, self.index + 1
        block = self.asa.config.block_size
        expected = (q.shape[0], q.shape[1], math.ceil(q.shape[-2] / block), math.ceil(k.shape[-2] / block))
        cached = self.masks.get(slot)
        if self.fresh or cached is None or tuple(cached.shape) != expected:
            cached = self.masks[slot] = self.asa.estimate_mask(q, k, dense_tail_tokens, heads=heads)
        return cached


def _register_op() -> None:
    # Stateful (it counts calls and stores masks): tagged like the prober's random op, so the compiler never merges
    # two calls nor recomputes one.
    torch.library.define(
        "blade::asa_reused_mask",
        "(Tensor q, Tensor k, int key, int block_size, int dense_tail_tokens, int heads_first, int heads_total)"
        " -> (Tensor, Tensor)",
        tags=(torch.Tag.nondeterministic_seeded,),
    )

    @torch.library.impl("blade::asa_reused_mask", "CompositeExplicitAutograd")
    def reused_mask(q, k, key, block_size, dense_tail_tokens, heads_first, heads_total):
        """The kernels' lists (int32 ``[B, H, Nq]``, ``[B, H, Nq, Nk]``) of this call's slot, probed or stored;
        copies, so that no output aliases what the next calls return."""
        reuse = _REGISTRY.get(key)
        if reuse is None:
            raise RuntimeError(f"no MaskReuse with key {key} (its transformer was freed or unpatched)")
        heads = None if heads_total < 0 else (heads_first, heads_total)
        counts, index = reuse._slot_mask(q, k, dense_tail_tokens, heads).lists()
        batch, n_heads, n_q, n_k = q.shape[0], q.shape[1], index.shape[-2], index.shape[-1]
        return (counts.expand(batch, n_heads, n_q).clone(), index.expand(batch, n_heads, n_q, n_k).clone())

    @torch.library.register_fake("blade::asa_reused_mask")
    def _(q, k, key, block_size, dense_tail_tokens, heads_first, heads_total):
        n_q, n_k = -(-q.shape[-2] // block_size), -(-k.shape[-2] // block_size)  # ceil, also for symbolic sizes
        counts = q.new_empty((q.shape[0], q.shape[1], n_q), dtype=torch.int32)
        return counts, q.new_empty((q.shape[0], q.shape[1], n_q, n_k), dtype=torch.int32)


# Registered once per process (a re-import re-executes this file in the same module namespace).
if not hasattr(torch.ops.blade, "asa_reused_mask"):
    _register_op()
