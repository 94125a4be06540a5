"""Ulysses context parallelism for ASA, on top of diffusers' context parallelism (``enable_parallelism``).

diffusers (>= 0.36) splits a transformer's sequence across processes with hooks declared in the model's
``_cp_plan`` (Wan: the ``rope`` tables and the first block's ``hidden_states`` are split along the tokens, the
``proj_out`` output gathered), and its attention dispatcher runs Ulysses: an all-to-all turns the local
``[B, L/N, H, D]`` q/k/v into ``[B, L, H/N, D]`` (the whole sequence for a subset of heads), attention runs per head,
and a second all-to-all brings ``[B, L/N, H, D]`` back.

ASA is per head too (Gilbert order, prober mask, global tokens), so it combines with Ulysses exactly. The ASA
processors do the two all-to-alls themselves (``seq_to_heads`` / ``heads_to_seq`` below) around the ASA call,
because they replace the dispatcher's attention; everything else is diffusers' plan:

- the Gilbert reorder happens on the full sequence before it is split (the ASA pre-hook on the first block runs
  before diffusers' split hook inside the block's forward), and the raster order is restored on the full sequence
  after diffusers' gather on ``proj_out``; the RoPE tables, which diffusers splits inside ``rope``'s forward, are
  recomputed whole, permuted and re-split by the ASA hook (``blade.models.common.ASAState.rope_forward_hook``);
- each process draws the prober's sample positions for all heads and keeps its own heads' (``heads=(first,
  total)``), so a seeded run picks the same blocks as on one process.

Ring attention does not combine with block-sparse masks (each process would see a slice of the keys): only
``ulysses_degree`` is supported, with the token count and the head count divisible by it.

``enable_context_parallel`` is ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))``,
plus a CPU path: diffusers 0.42 resolves the device from ``torch.accelerator``, which a CPU-only process (gloo, the
tests) lacks, so there the device mesh is built on ``cpu`` by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class UlyssesGroup:
    """The Ulysses process group of a context-parallel model: ``world`` processes, this one is ``rank``."""

    group: Any
    world: int
    rank: int

    def head_range(self, heads: int) -> tuple[int, int]:
        """``(first local head, total heads)`` of this process for a layer of ``heads`` heads."""
        if heads % self.world:
            raise ValueError(f"Ulysses context parallelism needs the head count ({heads}) divisible by {self.world}")
        return self.rank * (heads // self.world), heads


def ulysses_group(parallel_config: Any) -> UlyssesGroup | None:
    """The Ulysses group of a diffusers ``ParallelConfig`` (a processor's ``_parallel_config``), or None when the
    model runs on one process. Ring attention and uneven ("anything") splits raise: ASA cannot run under them."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return None
    if cp.ring_degree > 1:
        raise ValueError(
            "ASA does not combine with ring attention (each process would hold a slice of the keys); use "
            "ContextParallelConfig(ulysses_degree=N)"
        )
    if getattr(cp, "ulysses_anything", False):
        raise ValueError("ASA under context parallelism needs even shards: ulysses_anything is not supported")
    if cp.ulysses_degree <= 1:
        return None
    group = cp._ulysses_mesh.get_group()
    return UlyssesGroup(group=group, world=cp.ulysses_degree, rank=dist.get_rank(group))


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """``all_to_all_single`` over dim 0 (equal chunks, one per process)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    batch, local_len, heads, dim = x.shape
    x = x.reshape(batch, local_len, world, heads // world, dim).permute(2, 0, 1, 3, 4)  # chunk j: heads of rank j
    x = _all_to_all(x, group)  # chunk j: rank j's tokens, this rank's heads
    return x.permute(1, 0, 2, 3, 4).reshape(batch, world * local_len, heads // world, dim)


def _heads_to_seq(x: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    batch, length, local_heads, dim = x.shape
    x = x.reshape(batch, world, length // world, local_heads, dim).permute(1, 0, 2, 3, 4)  # chunk j: rank j's tokens
    x = _all_to_all(x, group)  # chunk j: rank j's heads, this rank's tokens
    return x.permute(1, 2, 0, 3, 4).reshape(batch, length // world, world * local_heads, dim)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _seq_to_heads(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group, ctx.world), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return _heads_to_seq(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group, ctx.world), None, None


def seq_to_heads(x: torch.Tensor, ulysses: UlyssesGroup) -> torch.Tensor:
    """``[B, L/N, H, D]`` (this process's tokens, all heads) -> ``[B, L, H/N, D]`` (all tokens, its heads)."""
    ulysses.head_range(x.shape[2])  # checks the head count
    return _SeqToHeads.apply(x, ulysses.group, ulysses.world)


def heads_to_seq(x: torch.Tensor, ulysses: UlyssesGroup) -> torch.Tensor:
    """The inverse of ``seq_to_heads``: ``[B, L, H/N, D]`` -> ``[B, L/N, H, D]``."""
    return _HeadsToSeq.apply(x, ulysses.group, ulysses.world)


def shard_tokens(x: torch.Tensor, dim: int, parallel_config: Any) -> torch.Tensor:
    """This process's slice of ``x`` along ``dim``, exactly as diffusers' plan splits the sequence."""
    from diffusers.hooks.context_parallel import EquipartitionSharder

    return EquipartitionSharder.shard(x, dim, parallel_config.context_parallel_config._flattened_mesh)


def enable_context_parallel(transformer: nn.Module, ulysses_degree: int | None = None) -> Any:
    """Run ``transformer`` with Ulysses context parallelism over the initialised default process group
    (``ulysses_degree`` defaults to the world size) through diffusers' ``enable_parallelism`` and the model's
    ``_cp_plan``; returns the model's ``ParallelConfig``. ASA may be applied before or after.

    On a process without an accelerator (gloo on CPU) the device mesh is built on ``cpu`` (diffusers 0.42 would
    divide by ``torch.accelerator.device_count()``).
    """
    from diffusers import ContextParallelConfig
    from diffusers.models._modeling_parallel import ParallelConfig

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised (torchrun) before enabling context parallelism")
    degree = int(ulysses_degree or dist.get_world_size())
    cp_config = ContextParallelConfig(ulysses_degree=degree)
    if torch.accelerator.is_available() and torch.accelerator.device_count() > 0:
        transformer.enable_parallelism(config=cp_config)
        return transformer._parallel_config

    from torch.distributed.device_mesh import init_device_mesh

    config = ParallelConfig(context_parallel_config=cp_config)
    mesh = init_device_mesh("cpu", mesh_shape=cp_config.mesh_shape, mesh_dim_names=cp_config.mesh_dim_names)

    def resolve(given: Any) -> Any:
        config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
        transformer._parallel_config = config
        return config

    transformer._resolve_parallel_config = resolve  # instance attribute: only this call's resolution changes
    try:
        transformer.enable_parallelism(config=cp_config)
    finally:
        del transformer._resolve_parallel_config
    return transformer._parallel_config


__all__ = [
    "UlyssesGroup",
    "enable_context_parallel",
    "heads_to_seq",
    "seq_to_heads",
    "shard_tokens",
    "ulysses_group",
]
