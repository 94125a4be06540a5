"""The ASA prober: a cheap, sampled estimate of which key blocks each query block needs.

Per block, ``samples_per_block`` token positions are drawn from Q and from K. The sampled queries attend to all
sampled keys (one float32 softmax over ``Nk * samples`` keys); each ``samples x samples`` tile is max-pooled into a
block importance, and each query-block row is normalised to sum 1. Per row, the most important blocks are kept
until their cumulative mass reaches ``threshold`` (the crossing block included), with the count clamped to
``[ceil(min_keep * Nk), ceil(max_keep * Nk)]`` and to ``[1, Nk]``. The cost is about ``(samples / block_size)^2`` of
dense ``Q K^T`` (1/64 for 16 samples in 128-token blocks).

On CUDA the importance comes from a fused Triton kernel (``kernels/triton_prober.py``) that never materialises the
sampled score matrix; the torch code here is the reference and the CPU path. Both use the same sampled positions
(drawn here, in torch), so they give the same mask for the same generator state. The selection ranks the top blocks
of each row and hands them, with the kept counts, to ``BlockMask.from_ranked``: the kernels' index lists are made
from the ranking directly, without a dense bool mask in between.

``torch.compile``: the random positions are drawn inside the opaque custom op ``blade::prober_positions`` (a graph
cannot take a ``torch.Generator``; the op receives an int key naming the generator instead, and it draws exactly
what eager code draws, also under inductor, whose own RNG would differ), and the fused importance inside
``blade::prober_importance``. The mask selection is plain torch, so a compiled model keeps the prober in its graph.
"""

from __future__ import annotations

import itertools
import math
import warnings
import weakref

import torch

from .block_mask import BlockMask

# Budget for one head-chunk of sampled scores (float32 elements): ~256 MiB.
_SCORE_ELEMENTS = 64 * 1024 * 1024
# Set (with the error) when the fused prober failed to run: "auto" then stays on the torch path.
_FUSED_PROBER_FAILED: list = []


# ----------------------------------------------------------------------------------------------------------------
# Random sources of the sampled positions, named by int keys (what a custom op can take)
# ----------------------------------------------------------------------------------------------------------------

GLOBAL_RNG = -1  # key of torch's default generator of the device
_KEYS = itertools.count()
_SOURCES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # key -> torch.Generator | SeededGenerators
_KEY_OF_GENERATOR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # torch.Generator -> key
# torch.Generator takes no weak references before torch 2.13: such generators are kept for the process's life.
_PINNED_SOURCES: dict[int, torch.Generator] = {}  # key -> generator
_PINNED_KEYS: dict[int, int] = {}  # id(generator) -> key (ids stay unique: the generator is never freed)


class SeededGenerators:
    """One ``torch.Generator`` per device, seeded with ``seed`` at its first use; ``reset()`` starts them over.

    The object is registered under ``key`` (an int that compiled code reads as a constant, so restarting the
    generators never recompiles). Copies (``copy.deepcopy``, pickling) get their own key and generator states.
    """

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self.key = next(_KEYS)
        _SOURCES[self.key] = self

    def generator(self, device: torch.device) -> torch.Generator:
        name = str(device)
        if name not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[name] = gen
        return self._generators[name]

    def reset(self) -> None:
        self._generators = {}

    def states(self) -> dict[str, torch.Tensor]:
        """The generators' states by device name (for a replay: ``set_states``)."""
        return {name: g.get_state() for name, g in self._generators.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Put the generators back to ``states`` (from ``states()``); devices not in it start over."""
        self._generators = {}
        for name, rng_state in states.items():
            self.generator(torch.device(name)).set_state(rng_state)

    def __getstate__(self) -> dict:
        return {"seed": self.seed, "states": self.states()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["seed"])
        self.set_states(state["states"])


@torch.compiler.assume_constant_result
def _generator_key(generator: torch.Generator | None) -> int:
    """The int key of a caller's generator (registered on first use, weakly). Under torch.compile this runs once,
    at trace time, and the graph is guarded on the generator object, so another generator retraces."""
    if generator is None:
        return GLOBAL_RNG
    try:
        key = _KEY_OF_GENERATOR.get(generator)
    except TypeError:  # not weakly referenceable (torch.Generator before torch 2.13)
        key = _PINNED_KEYS.get(id(generator))
        if key is None:
            key = next(_KEYS)
            _PINNED_KEYS[id(generator)], _PINNED_SOURCES[key] = key, generator
        return key
    if key is None:
        key = next(_KEYS)
        _KEY_OF_GENERATOR[generator] = key
        _SOURCES[key] = generator
    return key


def _source_generator(key: int, device: torch.device) -> torch.Generator | None:
    if key == GLOBAL_RNG:
        return None
    source = _SOURCES.get(key)
    if source is None:
        source = _PINNED_SOURCES.get(key)
    if source is None:
        raise RuntimeError(f"prober random source {key} no longer exists (its generator was garbage-collected)")
    return source.generator(device) if isinstance(source, SeededGenerators) else source


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


def _register_ops() -> None:
    # A random op: tagged so that the compiler never merges two identical calls nor recomputes one (e.g. for the
    # backward). `torch.library.define` takes tags in every torch this project supports (custom_op's `tags=` is new).
    torch.library.define(
        "blade::prober_positions",
        "(Device device, int q_len, int k_len, int block_size, int samples, int batch, int heads, int rng_key)"
        " -> (Tensor, Tensor)",
        tags=(torch.Tag.nondeterministic_seeded,),
    )

    @torch.library.impl("blade::prober_positions", "CompositeExplicitAutograd")
    def positions(
        device: torch.device,
        q_len: int,
        k_len: int,
        block_size: int,
        samples: int,
        batch: int,
        heads: int,
        rng_key: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled query and key positions ``[batch, heads, n_blocks * samples]`` (int64), queries drawn first."""
        generator = _source_generator(rng_key, device)
        q_pos = sample_block_positions(q_len, block_size, samples, (batch, heads), device, generator)
        k_pos = sample_block_positions(k_len, block_size, samples, (batch, heads), device, generator)
        return q_pos, k_pos

    @torch.library.register_fake("blade::prober_positions")
    def _(device, q_len, k_len, block_size, samples, batch, heads, rng_key):
        new = lambda length: torch.empty(
            (batch, heads, math.ceil(length / block_size) * samples), dtype=torch.int64, device=device
        )
        return new(q_len), new(k_len)

    @torch.library.custom_op("blade::prober_importance", mutates_args=())
    def fused_importance(
        q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, samples: int, strict: bool
    ) -> torch.Tensor:
        """The fused Triton importance; unless ``strict``, the torch one (with a warning, once) if Triton fails."""
        from .kernels import triton_prober

        try:
            return triton_prober._block_importance(q, k, q_pos, k_pos, samples)
        except Exception as err:
            if strict:
                raise
            # A compiler problem must not take ASA down: warn once and use the torch path from now on.
            _FUSED_PROBER_FAILED.append(repr(err))
            warnings.warn(f"fused Triton prober failed ({err!r}); using the torch prober", stacklevel=2)
            return block_importance(_gather_tokens(q, q_pos), _gather_tokens(k, k_pos), samples)

    @fused_importance.register_fake
    def _(q, k, q_pos, k_pos, samples, strict):
        shape = (*q.shape[:2], q_pos.shape[-1] // samples, k_pos.shape[-1] // samples)
        return q.new_empty(shape, dtype=torch.float32)

    @torch.library.custom_op("blade::prober_select", mutates_args=())
    def fused_select(
        importance: torch.Tensor, threshold: float, low: int, high: int, rows_from: int, cols_from: int, strict: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The selection and the kernels' lists in one Triton launch (``rows_from``/``cols_from`` -1: no dense
        tail); unless ``strict``, the torch selection (with a warning, once) if Triton fails."""
        from .kernels import triton_prober

        tail = (None if rows_from < 0 else rows_from, None if cols_from < 0 else cols_from)
        try:
            return triton_prober.select_lists(importance, threshold, low, high, *tail)
        except Exception as err:
            if strict:
                raise
            _FUSED_PROBER_FAILED.append(repr(err))
            warnings.warn(f"fused Triton mask selection failed ({err!r}); using the torch one", stacklevel=2)
            return _torch_select(importance, threshold, low, high, *tail)

    @fused_select.register_fake
    def _(importance, threshold, low, high, rows_from, cols_from, strict):
        return (importance.new_empty(importance.shape[:-1], dtype=torch.int32),
                importance.new_empty(importance.shape, dtype=torch.int32))


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


def _ranked_blocks(importance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row, in the order of a stable descending sort.

    For ``k`` below the row length this is a ``topk`` over a composite int64 key (order-preserving float bits,
    then the reversed column index), so ties go to the lower column exactly as with ``torch.sort(stable=True)``
    while costing far less than a full sort when ``k`` is small (``max_keep``).
    """
    n = importance.shape[-1]
    if k >= n:
        return torch.sort(importance, dim=-1, descending=True, stable=True).indices
    bits = importance.float().contiguous().view(torch.int32)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: flip magnitude bits to sort as ints
    tie_break = n - 1 - torch.arange(n, device=importance.device, dtype=torch.int64)
    key = bits.to(torch.int64) * (1 << 32) + tie_break
    return torch.topk(key, k, dim=-1, largest=True, sorted=True).indices


def _clamped_counts(n_k: int, min_keep: float, max_keep: float) -> tuple[int, int]:
    """Range ``[low, high]`` of kept blocks per row: ``[ceil(min_keep*Nk), ceil(max_keep*Nk)]`` within ``[1, Nk]``."""
    low = min(max(_ceil_fraction(min_keep, n_k), 1), n_k)
    high = min(max(_ceil_fraction(max_keep, n_k), low), n_k)
    return low, high


def rank_blocks(
    importance: torch.Tensor, threshold: float, min_keep: float, max_keep: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold + clamp selection over each row of ``importance [..., Nq, Nk]`` (rows sum to 1), as ranked lists.

    Keeps the smallest top set whose cumulative mass reaches ``threshold`` (the crossing block included), with the
    count clamped to ``[ceil(min_keep*Nk), ceil(max_keep*Nk)]`` and to ``[1, Nk]``.

    Returns:
        ``ranked`` int64 ``[..., Nq, K]`` (the top ``K = ceil(max_keep*Nk)`` blocks, most important first) and
        ``counts`` int64 ``[..., Nq]`` (how many of them are kept): the input of ``BlockMask.from_ranked``.
    """
    return _rank_clamped(importance, threshold, *_clamped_counts(importance.shape[-1], min_keep, max_keep))


def _rank_clamped(importance: torch.Tensor, threshold: float, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``rank_blocks`` with the count range ``[low, high]`` already resolved."""
    # Only the top `high` blocks can be kept: rank just those (the cumulative mass of the rest is irrelevant).
    order = _ranked_blocks(importance, high)
    cumulative = importance.gather(-1, order).cumsum(dim=-1)
    count = (cumulative < threshold).sum(dim=-1) + 1  # blocks before the crossing one, plus it
    return order, count.clamp(low, high)


def _torch_select(
    importance: torch.Tensor, threshold: float, low: int, high: int, rows_from: int | None, cols_from: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection's lists in torch (the reference of ``triton_prober.select_lists``): int32 counts
    ``[B, H, Nq]`` and indices ``[B, H, Nq, Nk]`` for clamped counts ``[low, high]``."""
    order, count = _rank_clamped(importance, threshold, low, high)
    return BlockMask.from_ranked(order, count, importance.shape[-1], dense_rows_from=rows_from,
                                 dense_cols_from=cols_from).lists()


def select_blocks(importance: torch.Tensor, threshold: float, min_keep: float, max_keep: float) -> torch.Tensor:
    """``rank_blocks`` as a bool mask ``[..., Nq, Nk]`` (True = kept)."""
    order, count = rank_blocks(importance, threshold, min_keep, max_keep)
    # BlockMask is [B, H, Nq, Nk]: fold whatever leads the rows into one dim and unfold the dense form.
    rows = importance.shape[-2:]
    mask = BlockMask.from_ranked(order.reshape(1, -1, *order.shape[-2:]), count.reshape(1, -1, rows[0]), rows[1])
    return mask.dense().reshape(importance.shape)


def _dense_tail_blocks(q_len: int, k_len: int, block_size: int, tail_tokens: int) -> tuple[int | None, int | None]:
    """First query block and first key block that hold any of the last ``tail_tokens`` tokens (None, None: none)."""
    if tail_tokens <= 0:
        return None, None
    return max(q_len - tail_tokens, 0) // block_size, max(k_len - tail_tokens, 0) // block_size


def _use_fused_prober(q: torch.Tensor, samples: int, backend: str) -> bool:
    """Whether the importance comes from the fused Triton kernel (``backend='triton'`` insists on it)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"prober backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch" or (backend == "auto" and (not q.is_cuda or _FUSED_PROBER_FAILED)):
        return False
    try:
        from .kernels import triton_prober

        supported = triton_prober.supports(q, samples)
    except Exception as err:  # triton missing or failing to initialise
        if backend == "triton":
            raise RuntimeError(f"the fused Triton prober is unavailable: {err!r}") from err
        return False
    if backend == "triton" and not supported:
        raise ValueError(f"the fused Triton prober does not support {q.dtype} {tuple(q.shape)} with s={samples}")
    return supported


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
    backend: str = "auto",
) -> torch.BoolTensor:
    """Adaptive block mask from sampled Q/K tokens.

    Args:
        q: ``[B, H, Lq, D]``; k: ``[B, H, Lk, D]``.
        generator: RNG for the sampled positions; None uses the global RNG (so activation checkpointing, which
            replays the global RNG state, recomputes the same mask). Under ``torch.compile`` create it before the
            compiled call (the graph is guarded on it).
        backend: ``"auto"`` (the fused Triton prober on CUDA when it supports the inputs, else torch),
            ``"torch"`` (the reference) or ``"triton"`` (the fused kernel; also under ``TRITON_INTERPRET=1``).
    Returns:
        bool ``[B, H, ceil(Lq/bs), ceil(Lk/bs)]`` without grad: the dense form of the ``BlockMask`` that ASA builds
        (``AdaptiveBlockSparseAttention.estimate_mask`` returns the object itself).
    """
    mask = _estimate_block_mask(
        q,
        k,
        block_size=block_size,
        samples_per_block=samples_per_block,
        threshold=threshold,
        min_keep=min_keep,
        max_keep=max_keep,
        dense_tail_tokens=dense_tail_tokens,
        rng_key=_generator_key(generator),
        backend=backend,
    )
    return mask.dense()


@torch.no_grad()
def _estimate_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_size: int,
    samples_per_block: int,
    threshold: float,
    min_keep: float,
    max_keep: float,
    dense_tail_tokens: int,
    rng_key: int,
    backend: str,
    heads: tuple[int, int] | None = None,
) -> BlockMask:
    """``estimate_block_mask`` as a ``BlockMask`` built from the ranked blocks (no dense mask), with the random
    source given by key (``GLOBAL_RNG`` or ``SeededGenerators.key``).

    ``heads=(first, total)``: ``q``/``k`` hold heads ``first ... first + H - 1`` of a layer of ``total`` (Ulysses
    context parallelism): positions are drawn for all ``total`` heads and this slice kept, so every process draws
    what one process would, and the mask of a head does not depend on how the heads are split.
    """
    batch, n_heads, q_len, _ = q.shape
    k_len = k.shape[-2]
    first, total = heads if heads is not None else (0, n_heads)
    if first < 0 or first + n_heads > total:
        raise ValueError(f"heads {first}..{first + n_heads - 1} do not lie in a layer of {total} heads")
    q_pos, k_pos = torch.ops.blade.prober_positions(
        q.device, q_len, k_len, block_size, samples_per_block, batch, total, rng_key
    )
    if total != n_heads:
        q_pos, k_pos = (x[:, first : first + n_heads].contiguous() for x in (q_pos, k_pos))
    rows_from, cols_from = _dense_tail_blocks(q_len, k_len, block_size, dense_tail_tokens)
    if _use_fused_prober(q, samples_per_block, backend):
        strict = backend == "triton"
        importance = torch.ops.blade.prober_importance(q, k, q_pos, k_pos, samples_per_block, strict)
        # Selection + the kernels' lists in one launch instead of ~20 small torch ops (issue: prober launches).
        low, high = _clamped_counts(importance.shape[-1], min_keep, max_keep)
        counts, index = torch.ops.blade.prober_select(
            importance, float(threshold), low, high, -1 if rows_from is None else rows_from,
            -1 if cols_from is None else cols_from, strict,
        )
        return BlockMask.from_lists(counts, index)
    importance = block_importance(_gather_tokens(q, q_pos), _gather_tokens(k, k_pos), samples_per_block)
    ranked, counts = rank_blocks(importance, threshold, min_keep, max_keep)
    return BlockMask.from_ranked(
        ranked, counts, importance.shape[-1], dense_rows_from=rows_from, dense_cols_from=cols_from
    )


# Registered once per process (a re-import re-executes this file in the same module namespace).
if not hasattr(torch.ops.blade, "prober_positions"):
    _register_ops()
