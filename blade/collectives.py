"""One collective over many tensors: flatten them into one buffer, run the collective once, copy the result back.

Shared by the TDM trainer (accelerate: gradient mean, adapter broadcast) and TinyWorld training (torch.distributed
gradient mean): one call per step instead of one per parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


@torch.no_grad()
def collective_in_place(
    tensors: Sequence[torch.Tensor],
    collective: Callable[[torch.Tensor], torch.Tensor],
    dtype: torch.dtype | None = None,
) -> None:
    """Replace every tensor by its slice of ``collective(concatenation of the flattened tensors)``.

    Args:
        tensors: the tensors to update in place (e.g. the gradients, or the parameters, of a model).
        collective: takes the flat ``[N]`` buffer, returns the reduced/broadcast ``[N]`` buffer (the same one
            or a new one).
        dtype: dtype of the buffer (default: that of the first tensor); results are cast back to each tensor's.
    """
    if not tensors:
        return
    dtype = dtype or tensors[0].dtype
    flat = collective(torch.cat([t.reshape(-1).to(dtype) for t in tensors]))
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
