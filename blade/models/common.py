"""Shared machinery that plugs adaptive block-sparse attention (ASA) into a diffusers video transformer.

``install_asa`` swaps every block's ``attn1`` processor for an ASA subclass of the stock one and adds hooks:

- a forward pre-hook on the transformer binds its (positional or keyword) arguments, reads the latent token grid
  ``(F, H, W)`` and the timestep, advances the step counter (``dense_steps``) and opens a ``ForwardContext``;
- the video tokens are permuted along the Gilbert curve once per forward, before the first block, and restored
  after the last one (norms, modulation, FFN and Wan's text cross-attention are token-wise, so only the RoPE tables
  have to follow: Wan's ``rope`` output is permuted by a forward hook, CogVideoX's ``image_rotary_emb`` argument in
  the transformer pre-hook);
- the context is ``ASAState.current``, read by the first and last blocks' hooks and by the processors. With
  gradient checkpointing on, the transformer pre-hook wraps the transformer's ``_gradient_checkpointing_func``
  (the function diffusers runs each checkpointed block through; ``enable_gradient_checkpointing`` may set it before
  or after ``install_asa``) in ``ASAState.checkpoint_block``: it hands the checkpoint a call of the block that makes
  the context of the forward it was first run in current, and restores the previous one afterwards, so the
  recomputation during backward sees the permutation and mode of its own forward even if the model ran other
  inputs (or ASA off) in between.

One ``AdaptiveBlockSparseAttention`` instance is shared by all layers (it is parameter-free) and aggregates stats.
The hooks and the checkpoint wrapper are bound methods of ``ASAState`` (no closures), so ``copy.deepcopy`` of a
patched transformer (e.g. the TDM fake score) yields an independent, consistently patched copy.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from blade.attention import (
    AdaptiveBlockSparseAttention,
    ASAConfig,
    EarlyContext,
    gilbert_permutation,
    inverse_permutation,
)
from blade.models.mask_reuse import MaskReuse

Grid = tuple[int, int, int]

# Attribute of a transformer that holds its ASAHandle.
HANDLE_ATTR = "_blade_asa_handle"

MODE_OFF = "off"  # stock attention, no reordering (ASA disabled, or no grid)
MODE_DENSE = "dense"  # dense warm-up step through the ASA module (counted as sparsity 0), no reordering
MODE_SPARSE = "sparse"  # Gilbert-ordered tokens, block-sparse attention


@dataclass(frozen=True)
class ForwardContext:
    """What one transformer forward needs in its hooks and attention processors (immutable, cached per grid/mode:
    reusing one object keeps ``torch.compile`` guards on it stable across forwards)."""

    grid: Grid
    mode: str
    perm: torch.Tensor | None = None  # [F*H*W] Gilbert order of the raster video tokens (sparse mode)
    inv: torch.Tensor | None = None  # its inverse

    @property
    def sparse(self) -> bool:
        return self.mode == MODE_SPARSE

    @property
    def num_video_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def bind_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """Bind a call's positional and keyword arguments to ``signature`` (defaults not applied)."""
    return signature.bind(*args, **kwargs)


@dataclass(frozen=True)
class _ArgSlot:
    """Where a named parameter sits in a call: its keyword name and its position (resolved once, at install time;
    plain lookups keep the block hooks cheap and traceable by ``torch.compile``)."""

    name: str
    position: int

    @classmethod
    def of(cls, signature: inspect.Signature, name: str) -> _ArgSlot:
        names = [p.name for p in signature.parameters.values()]
        if name not in names:
            raise ValueError(f"the block's forward has no `{name}` parameter (parameters: {names})")
        return cls(name, names.index(name))

    def get(self, args: tuple, kwargs: dict) -> Any:
        if self.name in kwargs:
            return kwargs[self.name]
        return args[self.position] if self.position < len(args) else None

    def replace(self, args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
        if self.name in kwargs:
            return args, {**kwargs, self.name: value}
        return (*args[: self.position], value, *args[self.position + 1 :]), kwargs


def permute_tokens(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with its token axis ``dim`` re-indexed by ``index`` (a permutation of that axis)."""
    return x.index_select(dim, index.to(x.device))


class ModelFamily:
    """How one transformer family exposes what the ASA hooks need. Subclassed in ``wan.py`` / ``cogvideox.py``."""

    #: Name of the transformer forward argument with the RoPE tables to permute (None: use ``rope_module``).
    rope_arg: str | None = None

    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def grid(self, transformer: nn.Module, arguments: dict[str, Any]) -> Grid:
        """The latent token grid ``(F, H, W)`` of a forward call's bound arguments."""
        raise NotImplementedError

    def timestep(self, arguments: dict[str, Any]) -> float | None:
        t = arguments.get("timestep")
        if t is None:
            return None
        return float(t.max()) if torch.is_tensor(t) else float(t)

    def rope_module(self, transformer: nn.Module) -> nn.Module | None:
        """A submodule whose output ``(cos, sin)`` ``[1, S, 1, d]`` holds per-token RoPE tables to permute."""
        return None

    def restore_module(self, transformer: nn.Module) -> nn.Module | None:
        """A token-wise module after the blocks whose output ``[B, L, C]`` gets the raster order back (None: the
        last block's output). Wan restores after ``proj_out``, so that per-token modulation of the output norm
        (Wan2.2 TI2V) sees the tokens in the order its per-token timestep table was permuted to."""
        return None

    def reorder_arguments(self, transformer: nn.Module, arguments: dict[str, Any], ctx: ForwardContext) -> bool:
        """Permute per-token forward arguments into the Gilbert order of a sparse forward (in place in
        ``arguments``); True when something changed. Default: the ``rope_arg`` tables."""
        rope_arg = self.rope_arg
        if rope_arg is None or arguments.get(rope_arg) is None:
            return False
        cos, sin = arguments[rope_arg]  # [S, D] each, raster order
        arguments[rope_arg] = (permute_tokens(cos, ctx.perm, 0), permute_tokens(sin, ctx.perm, 0))
        return True

    def make_processor(self, original: Any, state: ASAState) -> Any:
        raise NotImplementedError


@dataclass
class _StepTracker:
    """Sampling step from the timestep sequence: same t = same step (CFG), lower t = next step, higher t = new run."""

    step: int = 0
    last_t: float | None = None

    def advance(self, t: float | None) -> int:
        if t is None:
            return self.step
        if self.last_t is None or t > self.last_t:
            self.step = 0
        elif t < self.last_t:
            self.step += 1
        self.last_t = t
        return self.step

    def reset(self) -> None:
        self.step, self.last_t = 0, None


@dataclass
class ASAState:
    """Shared state of one patched transformer: the ASA module, the switches, the step tracker, the hooks."""

    family: ModelFamily
    asa: AdaptiveBlockSparseAttention
    dense_steps: int = 0
    enabled: bool = True
    tracker: _StepTracker = field(default_factory=_StepTracker)
    current: ForwardContext | None = None
    forward_signature: inspect.Signature | None = None
    hidden_slot: _ArgSlot | None = None
    # The transformer's own ``_gradient_checkpointing_func``, wrapped by ``checkpoint_block`` (``wrap_checkpointing``).
    checkpoint_function: Callable | None = None
    # Optional fixed-mask source replacing the prober (training-free baselines: static window, random blocks):
    # ``(q, k, grid, dense_tail_tokens) -> BlockMask`` or bool ``[B|1, H|1, Nq, Nk]``.
    mask_provider: Callable | None = None
    # The running forward's transformer ``_parallel_config`` (diffusers' context parallelism), or None.
    parallel_config: Any = None
    # Prober masks kept across sampling steps (``ASAHandle.mask_reuse_steps``; 1 = a fresh mask every call).
    reuse: MaskReuse | None = None
    # More global context at the first sampling steps (``ASAHandle.early_context``); ``main_config`` is the config
    # the other steps run, saved when it was set: the ASA module's config is switched between the two per step.
    early: EarlyContext | None = None
    main_config: ASAConfig | None = None
    early_config: ASAConfig | None = None
    _contexts: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reuse is None:
            self.reuse = MaskReuse(self.asa)

    # --------------------------------------------------------------------------------------------- contexts
    def _context(self, grid: Grid, mode: str, device: torch.device) -> ForwardContext:
        key = (grid, mode, str(device))
        if key not in self._contexts:
            perm = inv = None
            if mode == MODE_SPARSE:
                perm = gilbert_permutation(*grid).to(device)
                inv = inverse_permutation(perm)
            self._contexts[key] = ForwardContext(grid=grid, mode=mode, perm=perm, inv=inv)
        return self._contexts[key]

    def open_context(self, grid: Grid, t: float | None, device: torch.device) -> ForwardContext:
        step = self.tracker.advance(t)
        if not self.enabled:
            mode = MODE_OFF
        elif step < self.dense_steps:
            mode = MODE_DENSE
        else:
            mode = MODE_SPARSE
            first = self.sparse_steps_from()
            self.reuse.begin(step, step if step < first else first)  # an early step probes afresh
            if self.early is not None:
                self.asa.config = self.early_config if step < self.early.steps else self.main_config
        self.current = self._context(grid, mode, device)
        return self.current

    def sparse_steps_from(self) -> int:
        """The first step sampled with the main config: after the dense and the early steps. Mask reuse counts its
        period from here (an early step's mask, probed at other settings, is never reused by a later step)."""
        return max(self.dense_steps, self.early.steps if self.early is not None else 0)

    def set_early_context(self, early: EarlyContext | None) -> None:
        """Sample the first ``early.steps`` steps with ``early``'s overrides of the current config (None: off)."""
        if self.main_config is not None:  # undo a previous setting first: its main config is the real one
            self.asa.config = self.main_config
        self.early = early
        self.main_config = self.asa.config if early is not None else None
        self.early_config = early.config_for(self.main_config) if early is not None else None

    # ------------------------------------------------------------------------------------------------ hooks
    def transformer_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        self.parallel_config = getattr(module, "_parallel_config", None)
        self.wrap_checkpointing(module)
        bound = bind_arguments(self.forward_signature, args, kwargs)
        arguments = bound.arguments
        hidden_states = arguments["hidden_states"]
        grid = self.family.grid(module, arguments)
        ctx = self.open_context(grid, self.family.timestep(arguments), hidden_states.device)
        if ctx.sparse and self.family.reorder_arguments(module, arguments, ctx):
            return bound.args, bound.kwargs
        return None

    # ------------------------------------------------------------------------------------ gradient checkpointing
    def wrap_checkpointing(self, module: nn.Module) -> None:
        """With gradient checkpointing on, route the transformer's checkpointed blocks through ``checkpoint_block``.

        Done at every forward, not at install: ``enable_gradient_checkpointing`` (re)sets the function, before or
        after ``install_asa``. The function found there is kept as ``checkpoint_function`` and called by the wrapper.
        """
        if not getattr(module, "gradient_checkpointing", False):
            return
        function = getattr(module, "_gradient_checkpointing_func", None)
        if function is None or function == self.checkpoint_block:  # bound methods: equal when of this state
            return
        self.checkpoint_function = function
        module._gradient_checkpointing_func = self.checkpoint_block

    def unwrap_checkpointing(self, module: nn.Module) -> None:
        """Give the transformer back the checkpointing function ``wrap_checkpointing`` wrapped (``remove``)."""
        if getattr(module, "_gradient_checkpointing_func", None) == self.checkpoint_block:
            module._gradient_checkpointing_func = self.checkpoint_function
        self.checkpoint_function = None

    def checkpoint_block(self, block: nn.Module, *args, **kwargs):
        """The transformer's ``_gradient_checkpointing_func(block, *args)`` with the running forward's context bound
        to the block call: the checkpoint runs it now and again in backward (after other forwards, maybe), and
        both times the block sees this forward's grid, mode and permutation."""
        # The checkpoint replays the global RNG for the recompute, not the prober's private seeded generators
        # (ASAConfig.seed): their states now, so the recompute draws the blocks this forward draws.
        rng = getattr(self.asa, "_rng", None)
        replay = {"rng": rng, "states": rng.states() if rng is not None else None, "ran": False}
        call = functools.partial(self.run_block_in_context, self.current, replay, block)
        return self.checkpoint_function(call, *args, **kwargs)

    def run_block_in_context(self, ctx: ForwardContext | None, replay: dict, block: nn.Module, *args, **kwargs):
        """``block(*args, **kwargs)`` with ``ctx`` current; the previous context is current again afterwards.

        ``replay``: on a second call (the checkpoint's recompute) the seeded prober generators restart from the
        states of the first one and are given back their live states afterwards (the recompute consumes nothing).
        """
        previous, self.current = self.current, ctx
        live = None
        if replay["ran"] and replay["rng"] is not None:
            live = replay["rng"].states()
            replay["rng"].set_states(replay["states"])
        replay["ran"] = True
        try:
            return block(*args, **kwargs)
        finally:
            self.current = previous
            if live is not None:
                replay["rng"].set_states(live)

    def rope_forward_hook(self, module: nn.Module, args: tuple, output: Any):
        ctx = self.current
        if ctx is None or not ctx.sparse:
            return None
        cos, sin = output  # [1, S, 1, d] each
        if cos.shape[1] == ctx.num_video_tokens:
            return permute_tokens(cos, ctx.perm, 1), permute_tokens(sin, ctx.perm, 1)
        # Context parallelism (diffusers' plan splits the tables inside rope's forward, before this hook): this
        # process's slice of the raster tables is not the slice of the Gilbert-ordered ones. Recompute them whole
        # (the tables are a function of the input's shape), permute, and split them as the plan splits the tokens.
        parallel = self.parallel_config
        if getattr(parallel, "context_parallel_config", None) is None:
            raise ValueError(
                f"the RoPE tables have {cos.shape[1]} tokens but the latent grid {ctx.grid} has {ctx.num_video_tokens}"
            )
        from blade.parallel import shard_tokens

        full = type(module).forward(module, *args)  # the module's own forward, without diffusers' split hook
        return tuple(shard_tokens(permute_tokens(x, ctx.perm, 1), 1, parallel) for x in full)

    def first_block_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        ctx = self.current
        if ctx is None or not ctx.sparse:
            return None
        hidden_states = self.hidden_slot.get(args, kwargs)  # [B, L_video, C] raster order
        _check_video_length(hidden_states, ctx)
        return self.hidden_slot.replace(args, kwargs, permute_tokens(hidden_states, ctx.perm, 1))

    def last_block_forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        ctx = self.current
        if ctx is None or not ctx.sparse:
            return None
        if isinstance(output, tuple):  # CogVideoX: (video, text)
            return (permute_tokens(output[0], ctx.inv, 1), *output[1:])
        return permute_tokens(output, ctx.inv, 1)

    def restore_forward_hook(self, module: nn.Module, args: tuple, output: Any):
        """On the family's ``restore_module``: the raster order back after the (token-wise) output layers."""
        ctx = self.current
        if ctx is None or not ctx.sparse:
            return None
        return permute_tokens(output, ctx.inv, 1)

    # -------------------------------------------------------------------------------------------- attention
    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        dense_tail_tokens: int,
        heads: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """ASA over ``[B, H, L, D]`` tokens (video already Gilbert-ordered, ``dense_tail_tokens`` dense at the tail).

        ``heads=(first, total)``: the tensors hold heads ``first ... first + H - 1`` of ``total`` (Ulysses context
        parallelism, whole sequence): the prober draws as for all heads, a provider's per-head mask is sliced.
        """
        ctx = self.current
        mask = None
        if self.mask_provider is not None and ctx is not None and ctx.sparse:
            mask = self.mask_provider(q, k, ctx.grid, dense_tail_tokens)
        elif self.reuse.every > 1 and ctx is not None and ctx.sparse and not torch.is_grad_enabled():
            # Sampling only: a training forward (autograd on) probes every call, so gradient checkpointing's
            # recompute and the TDM rollouts see what they always did.
            mask = self.reuse.mask(q, k, dense_tail_tokens, heads)
        # The module's one entry point; the tokens were put in curve order by the hooks, once per forward.
        return self.asa(
            q,
            k,
            v,
            pre_reordered=True,
            dense=ctx is not None and ctx.mode == MODE_DENSE,
            dense_tail_tokens=dense_tail_tokens,
            heads=heads,
            block_mask=mask,
        )

    def processor_mode(self) -> str:
        """Mode of the running forward for an attention processor (``off`` without a context)."""
        ctx = self.current
        return ctx.mode if ctx is not None else MODE_OFF


def _check_video_length(hidden_states: torch.Tensor, ctx: ForwardContext) -> None:
    if hidden_states.shape[1] != ctx.num_video_tokens:
        raise ValueError(
            f"the first block got {hidden_states.shape[1]} tokens but the latent grid {ctx.grid} has "
            f"{ctx.num_video_tokens}; ASA only supports transformers whose blocks see the raster video tokens"
        )


class ASAHandle:
    """Returned by ``apply_asa``: switch ASA on/off, read its stats, start a new run, or remove it."""

    def __init__(self, transformer: nn.Module, state: ASAState, hooks: list, originals: list):
        self._transformer = transformer
        self._state = state
        self._hooks = hooks
        self._originals = originals
        self.removed = False

    @property
    def asa(self) -> AdaptiveBlockSparseAttention:
        """The shared attention module (config, ``last_stats``)."""
        return self._state.asa

    @property
    def config(self) -> ASAConfig:
        """The config the sparse steps run (with an early context: the later steps')."""
        return self._state.main_config or self._state.asa.config

    @property
    def early_context(self) -> EarlyContext | None:
        """More global context at the first sampling steps (``EarlyContext``: its ``max_keep`` / ``pool_size`` over
        ``config`` for its first ``steps`` steps), or None (every sparse step runs ``config``)."""
        return self._state.early

    @early_context.setter
    def early_context(self, early: EarlyContext | dict | None) -> None:
        self._state.set_early_context(EarlyContext.from_dict(early) if isinstance(early, dict) else early)

    @property
    def dense_steps(self) -> int:
        return self._state.dense_steps

    @dense_steps.setter
    def dense_steps(self, value: int) -> None:
        self._state.dense_steps = int(value)

    @property
    def mask_reuse_steps(self) -> int:
        """Sampling steps one prober mask serves: 1 (default) probes at every call; N > 1 probes every layer at the
        first sparse step and every N-th after it and reuses those masks, layer by layer, for the steps between
        (inference only: with autograd on, every call probes). Saves the prober and the mask conversion on the
        reusing steps; whether it costs quality is measured in BENCHMARKS.md ("Mask reuse")."""
        return self._state.reuse.every

    @mask_reuse_steps.setter
    def mask_reuse_steps(self, value: int) -> None:
        self._state.reuse.set_every(value)

    @property
    def enabled(self) -> bool:
        """False: the patched processors run stock dense attention (no reordering) until switched back on."""
        return self._state.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._state.enabled = bool(value)

    @property
    def step(self) -> int:
        """The sampling step of the latest forward (0-based, within the current run)."""
        return self._state.tracker.step

    @property
    def mask_provider(self) -> Callable | None:
        """A callable ``(q, k, grid, dense_tail_tokens) -> block mask`` used instead of the prober, or None."""
        return self._state.mask_provider

    @mask_provider.setter
    def mask_provider(self, provider: Callable | None) -> None:
        self._state.mask_provider = provider

    def stats(self) -> dict:
        """Realised sparsity aggregated over all ASA calls since the last ``reset()`` (see ASA ``stats()``)."""
        return self._state.asa.stats()

    def reset(self) -> None:
        """Start a new sampling run: the step counter restarts (dense steps apply again) and the stats are cleared."""
        self._state.tracker.reset()
        if self._state.main_config is not None:
            self._state.asa.config = self._state.main_config
        self._state.asa.reset_stats()
        self._state.reuse.clear()
        self._state.current = None

    def remove(self) -> None:
        """Restore the stock processors and remove every hook (idempotent)."""
        if self.removed:
            return
        for hook in self._hooks:
            hook.remove()
        for attn, processor in self._originals:
            attn.set_processor(processor)
        self._state.set_early_context(None)  # the ASA module keeps its main config
        self._state.unwrap_checkpointing(self._transformer)
        if getattr(self._transformer, HANDLE_ATTR, None) is self:
            delattr(self._transformer, HANDLE_ATTR)
        self.removed = True


def install_asa(
    transformer: nn.Module,
    family: ModelFamily,
    config: ASAConfig,
    *,
    dense_steps: int = 0,
    share_with: ASAHandle | None = None,
) -> ASAHandle:
    """Patch every block's ``attn1`` with ``family``'s ASA processor and install the reorder / step hooks.

    ``share_with``: another transformer's handle of the same pipeline (Wan2.2-A14B's second expert) whose ASA
    module (config, stats, prober generator) and sampling-step tracker this one uses too: the step count then runs
    over the whole pipeline (``dense_steps`` counts once), and the stats aggregate both experts. ``config`` is
    ignored then.
    """
    existing = getattr(transformer, HANDLE_ATTR, None)
    if existing is not None and not existing.removed:
        raise RuntimeError("this transformer already has ASA applied; call handle.remove() (or unset_...) first")
    if dense_steps < 0:
        raise ValueError(f"dense_steps must be >= 0, got {dense_steps}")
    blocks = family.blocks(transformer)
    if len(blocks) == 0:
        raise ValueError("the transformer has no blocks to patch")

    if share_with is not None:
        state = ASAState(family=family, asa=share_with._state.asa, dense_steps=int(dense_steps),
                         tracker=share_with._state.tracker)
    else:
        state = ASAState(family=family, asa=AdaptiveBlockSparseAttention(config), dense_steps=int(dense_steps))
    state.forward_signature = inspect.signature(transformer.forward)
    block_signature = inspect.signature(blocks[0].forward)
    state.hidden_slot = _ArgSlot.of(block_signature, "hidden_states")

    originals = []
    for block in blocks:
        originals.append((block.attn1, block.attn1.processor))
        block.attn1.set_processor(family.make_processor(block.attn1.processor, state))

    hooks = [transformer.register_forward_pre_hook(state.transformer_pre_hook, with_kwargs=True)]
    rope = family.rope_module(transformer)
    if rope is not None:
        hooks.append(rope.register_forward_hook(state.rope_forward_hook))
    hooks.append(blocks[0].register_forward_pre_hook(state.first_block_pre_hook, with_kwargs=True))
    restore = family.restore_module(transformer)
    if restore is None:
        hooks.append(blocks[-1].register_forward_hook(state.last_block_forward_hook, with_kwargs=True))
    else:
        hooks.append(restore.register_forward_hook(state.restore_forward_hook))

    handle = ASAHandle(transformer, state, hooks, originals)
    setattr(transformer, HANDLE_ATTR, handle)
    return handle


class PipelineASAHandle:
    """The ASA handles of a pipeline with several denoisers (Wan2.2-A14B: ``transformer`` + ``transformer_2``),
    read and switched as one ``ASAHandle``: they share one ASA module (config, stats) and one step tracker.

    ``handles`` maps the pipeline attribute to its ``ASAHandle``; ``experts`` lists the attributes.
    """

    def __init__(self, handles: dict[str, ASAHandle]):
        if not handles:
            raise ValueError("no transformer handles")
        self.handles = dict(handles)
        self._first = next(iter(self.handles.values()))

    @property
    def experts(self) -> list[str]:
        return list(self.handles)

    def __getitem__(self, name: str) -> ASAHandle:
        return self.handles[name]

    @property
    def removed(self) -> bool:
        return all(h.removed for h in self.handles.values())

    @property
    def asa(self) -> AdaptiveBlockSparseAttention:
        return self._first.asa

    @property
    def config(self) -> ASAConfig:
        return self._first.config

    @property
    def early_context(self) -> EarlyContext | None:
        return self._first.early_context

    @early_context.setter
    def early_context(self, early: EarlyContext | dict | None) -> None:
        for h in self.handles.values():  # both experts switch the one shared ASA module
            h.early_context = early

    @property
    def dense_steps(self) -> int:
        return self._first.dense_steps

    @dense_steps.setter
    def dense_steps(self, value: int) -> None:
        for h in self.handles.values():
            h.dense_steps = value

    @property
    def mask_reuse_steps(self) -> int:
        return self._first.mask_reuse_steps

    @mask_reuse_steps.setter
    def mask_reuse_steps(self, value: int) -> None:
        for h in self.handles.values():  # each expert keeps its own layers' masks
            h.mask_reuse_steps = value

    @property
    def enabled(self) -> bool:
        return self._first.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        for h in self.handles.values():
            h.enabled = value

    @property
    def step(self) -> int:
        return self._first.step  # one shared tracker

    @property
    def mask_provider(self) -> Callable | None:
        return self._first.mask_provider

    @mask_provider.setter
    def mask_provider(self, provider: Callable | None) -> None:
        for h in self.handles.values():
            h.mask_provider = provider

    def stats(self) -> dict:
        """Aggregate over every expert's ASA calls since the last ``reset()`` (one shared ASA module)."""
        return self._first.stats()

    def reset(self) -> None:
        for h in self.handles.values():
            h.reset()

    def remove(self) -> None:
        """Restore the stock processors of every expert (idempotent)."""
        for h in self.handles.values():
            h.remove()


def remove_asa(transformer: nn.Module) -> bool:
    """Remove ASA from a transformer patched by ``apply_asa``; returns False when it was not patched."""
    handle = getattr(transformer, HANDLE_ATTR, None)
    if handle is None:
        return False
    handle.remove()
    return True


def get_asa_handle(transformer: nn.Module) -> ASAHandle | None:
    return getattr(transformer, HANDLE_ATTR, None)


def resolve_config(config: ASAConfig | dict | None, default: Callable[[], ASAConfig]) -> ASAConfig:
    """An ``ASAConfig`` from a config, a dict of its fields (e.g. from ``blade_config.json``) or None (default)."""
    if config is None:
        return default()
    if isinstance(config, ASAConfig):
        return config
    if isinstance(config, dict):
        return ASAConfig.from_dict(config)
    raise TypeError(f"config must be an ASAConfig, a dict or None, got {type(config).__name__}")


__all__: Sequence[str] = (
    "ASAHandle",
    "PipelineASAHandle",
    "ASAState",
    "ForwardContext",
    "ModelFamily",
    "get_asa_handle",
    "install_asa",
    "remove_asa",
    "resolve_config",
)
