"""``BlockMask``: which key blocks each query block attends to, built once per attention call.

In the spirit of FlexAttention (one attention function, one mask object): the prober, the static masks and the
callers of ``block_sparse_attention`` hand over one object, and every backend takes the form it needs from it.
It has two forms, each derived from the other on demand and cached on the object:

- lists (what the sparse kernels walk): ``kv_num_blocks`` int32 ``[B, H, nQ]``, the number of kept key blocks of
  each (batch, head, query block), and ``kv_indices`` int32 ``[B, H, nQ, nK]``, those key blocks first, in
  increasing order, then padding (entries past the count lie in ``[0, nK)`` and mean nothing);
- dense: bool ``[B, H, nQ, nK]``, True = attend (what the reference backend and the static masks use).

``B`` and ``H`` may be 1 (broadcast over batch / heads). Kept indices are increasing because the Triton kernel
peels a ragged last key block off the end of the list, and one order for everyone makes every backend walk the
blocks in the same order whatever built the mask.

There is one dense -> lists conversion (``dense_to_lists``, a stable sort; the Triton backend may pass its own
faster builder of the same lists) and one lists -> dense conversion (``lists_to_dense``, a scatter). The prober
builds the lists from its ranked blocks directly (``BlockMask.from_ranked``), with no dense mask in between.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Lists = tuple[torch.Tensor, torch.Tensor]

__all__ = ["BlockMask", "as_block_mask", "dense_to_lists", "lists_to_dense"]


def dense_to_lists(dense: torch.Tensor) -> Lists:
    """The lists of a bool mask ``[..., nQ, nK]``: counts int32 ``[..., nQ]``, indices int32 ``[..., nQ, nK]``
    (kept columns first, increasing, then the dropped ones, increasing). Vectorised: a stable sort per row."""
    flat = dense.to(torch.int8)
    counts = flat.sum(-1, dtype=torch.int32)
    index = torch.sort(flat, dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return counts, index.contiguous()


def lists_to_dense(counts: torch.Tensor, index: torch.Tensor, num_k_blocks: int) -> torch.Tensor:
    """Bool ``[..., nQ, num_k_blocks]`` of lists ``counts [..., nQ]``, ``index [..., nQ, W]`` (padding ignored)."""
    valid = torch.arange(index.shape[-1], device=index.device) < counts.unsqueeze(-1)
    # Padding is written (as False) to one extra column that is cut off afterwards.
    target = torch.where(valid, index.long(), num_k_blocks)
    dense = torch.zeros((*index.shape[:-1], num_k_blocks + 1), dtype=torch.bool, device=index.device)
    return dense.scatter(-1, target, valid)[..., :num_k_blocks]


def _ranked_to_lists(
    ranked: torch.Tensor,
    counts: torch.Tensor,
    num_k_blocks: int,
    dense_rows_from: int | None,
    dense_cols_from: int | None,
) -> Lists:
    """Lists of the first ``counts`` entries of each row of ``ranked``, plus dense tail rows / columns.

    Args:
        ranked: int ``[..., nQ, W]`` distinct key-block indices per row (e.g. by decreasing importance), ``W <= nK``.
        counts: int ``[..., nQ]``: how many leading entries of each row are kept.
        dense_rows_from / dense_cols_from: query / key blocks from this one on are kept whole (rows: every key
            block; columns: seen by every query block); None: no dense tail.
    """
    width = ranked.shape[-1]
    keep = torch.arange(width, device=ranked.device) < counts.unsqueeze(-1)
    n_tail_cols = 0
    if dense_cols_from is not None:
        keep = keep & (ranked < dense_cols_from)  # tail columns are appended below, once
        n_tail_cols = num_k_blocks - dense_cols_from
    # Dropped entries get the out-of-range key nK and sort after every kept one.
    kept = torch.where(keep, ranked, num_k_blocks).sort(dim=-1).values
    kept = F.pad(kept, (0, num_k_blocks - width), value=num_k_blocks)
    n_kept = keep.sum(-1, keepdim=True)
    slot = torch.arange(num_k_blocks, device=ranked.device)
    index = torch.where(slot < n_kept, kept, 0)
    if n_tail_cols:
        # The tail columns are the highest indices: appended after the kept ones, the list stays increasing.
        tail = dense_cols_from + slot - n_kept
        index = torch.where((slot >= n_kept) & (slot < n_kept + n_tail_cols), tail, index)
    count = n_kept.squeeze(-1) + n_tail_cols
    if dense_rows_from is not None:
        dense_row = torch.arange(counts.shape[-1], device=ranked.device) >= dense_rows_from  # [nQ]
        index = torch.where(dense_row[:, None], slot, index)
        count = torch.where(dense_row, num_k_blocks, count)
    return count.to(torch.int32), index.to(torch.int32)


class BlockMask:
    """Kept key blocks per (batch, head, query block); see the module docstring for the two forms.

    Build it with ``from_dense`` (a bool mask), ``from_lists`` or ``from_ranked`` (the prober's ranked blocks and
    counts). Read it with ``dense()`` (bool ``[B, H, nQ, nK]``) and ``lists()`` (``kv_num_blocks`` int32
    ``[B, H, nQ]``, ``kv_indices`` int32 ``[B, H, nQ, nK]``), both cached; ``shape`` is ``(B, H, nQ, nK)``.
    """

    def __init__(
        self,
        dense: torch.Tensor | None = None,
        kv_num_blocks: torch.Tensor | None = None,
        kv_indices: torch.Tensor | None = None,
    ):
        if dense is None and (kv_num_blocks is None or kv_indices is None):
            raise ValueError("BlockMask needs a dense mask or both kv_num_blocks and kv_indices")
        self._dense = dense
        self._counts = kv_num_blocks
        self._indices = kv_indices

    # ------------------------------------------------------------------------------------------- constructors
    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> BlockMask:
        """From a bool ``[B|1, H|1, nQ, nK]`` mask (True = attend); the lists are built when first asked for."""
        if dense.dtype != torch.bool or dense.dim() != 4:
            raise ValueError(f"block_mask must be a 4-D bool tensor, got {dense.dtype} {tuple(dense.shape)}")
        return cls(dense=dense)

    @classmethod
    def from_lists(cls, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> BlockMask:
        """From ``kv_num_blocks`` int32 ``[B, H, nQ]`` and ``kv_indices`` int32 ``[B, H, nQ, nK]`` (kept first,
        increasing)."""
        if kv_indices.dim() != 4 or tuple(kv_num_blocks.shape) != tuple(kv_indices.shape[:-1]):
            raise ValueError(
                f"kv_indices must be [B, H, nQ, nK] and kv_num_blocks [B, H, nQ]; got {tuple(kv_indices.shape)}, "
                f"{tuple(kv_num_blocks.shape)}"
            )
        return cls(kv_num_blocks=kv_num_blocks, kv_indices=kv_indices)

    @classmethod
    def from_ranked(
        cls,
        ranked: torch.Tensor,
        counts: torch.Tensor,
        num_k_blocks: int,
        *,
        dense_rows_from: int | None = None,
        dense_cols_from: int | None = None,
    ) -> BlockMask:
        """From per-row ranked key blocks: the first ``counts`` of ``ranked`` are kept (no dense mask is built).

        Args:
            ranked: int ``[B, H, nQ, K]`` distinct key-block indices per row, ``K <= num_k_blocks`` (the prober's
                top blocks by importance).
            counts: int ``[B, H, nQ]`` kept entries per row.
            dense_rows_from, dense_cols_from: query / key blocks from these on are kept whole (a dense tail of
                text tokens), or None.
        """
        count, index = _ranked_to_lists(ranked, counts, num_k_blocks, dense_rows_from, dense_cols_from)
        return cls(kv_num_blocks=count, kv_indices=index)

    # ------------------------------------------------------------------------------------------------- forms
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B|1, H|1, nQ, nK)``."""
        return tuple((self._dense if self._dense is not None else self._indices).shape)

    @property
    def device(self) -> torch.device:
        return (self._dense if self._dense is not None else self._indices).device

    def dense(self) -> torch.Tensor:
        """Bool ``[B|1, H|1, nQ, nK]``, True = attend (built from the lists at the first call, then cached)."""
        if self._dense is None:
            self._dense = lists_to_dense(self._counts, self._indices, self._indices.shape[-1])
        return self._dense

    def lists(self, builder: Callable[[torch.Tensor], Lists] | None = None) -> Lists:
        """``kv_num_blocks`` int32 ``[B|1, H|1, nQ]`` and ``kv_indices`` int32 ``[B|1, H|1, nQ, nK]``.

        ``builder``: a faster implementation of ``dense_to_lists`` (the Triton backend's), used only when the
        lists have to be built from the dense form. Cached.
        """
        if self._counts is None:
            self._counts, self._indices = (builder or dense_to_lists)(self._dense)
        return self._counts, self._indices

    def kept_blocks(self, batch: int, heads: int) -> torch.Tensor:
        """Kept (query block, key block) pairs over ``batch x heads`` (int64 0-d tensor; no host sync)."""
        if self._counts is not None:
            return self._counts.expand(batch, heads, -1).sum()
        return self._dense.expand(batch, heads, -1, -1).sum()

    # ----------------------------------------------------------------------------------------------- helpers
    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BlockMask:
        """A BlockMask with ``fn`` applied to every form present (each form keeps its leading dims first)."""
        apply = lambda t: None if t is None else fn(t)  # noqa: E731
        out = BlockMask.__new__(BlockMask)
        out._dense, out._counts, out._indices = apply(self._dense), apply(self._counts), apply(self._indices)
        return out

    def to(self, device: torch.device | str) -> BlockMask:
        """The mask on ``device`` (self when it is there already)."""
        if self.device == torch.device(device):
            return self
        return self._map(lambda t: t.to(device))

    def select_heads(self, first: int, count: int) -> BlockMask:
        """Heads ``first ... first + count - 1`` (one process's heads under Ulysses context parallelism); a mask
        broadcast over heads is returned as it is."""
        if self.shape[1] == 1:
            return self
        return self._map(lambda t: t[:, first : first + count])

    def __repr__(self) -> str:
        forms = [name for name, t in (("dense", self._dense), ("lists", self._counts)) if t is not None]
        return f"BlockMask(shape={self.shape}, forms={forms})"


def as_block_mask(mask: BlockMask | torch.Tensor) -> BlockMask:
    """``mask`` itself, or a bool ``[B|1, H|1, nQ, nK]`` tensor wrapped (backward compatibility of the kernels)."""
    if isinstance(mask, BlockMask):
        return mask
    if torch.is_tensor(mask):
        return BlockMask.from_dense(mask)
    raise TypeError(f"block_mask must be a BlockMask or a bool tensor, got {type(mask).__name__}")
