"""One expert on the GPU at a time: idle-expert offload for two-expert pipelines (Wan2.2-T2V-A14B).

Wan2.2-A14B's denoisers are two 14B transformers (``transformer`` for the high-noise steps, ``transformer_2`` for the
low-noise ones, split at the pipeline's ``boundary_ratio``); in bf16 they hold 57 GB of weights, which with the text
encoder and the activations of a 720p video (75,600 tokens) do not fit an 80 GB card. A sampling run calls them in
two contiguous stretches (all high-noise steps, then all low-noise ones; a student's anchors route the same way), so
keeping only the expert being called on the device costs two weight transfers a video, not one per step.

Unlike diffusers' ``enable_model_cpu_offload`` (which moves every component, text encoder and VAE included, through
accelerate hooks with pageable copies) and its group offloading (which moves weights at every forward call, i.e.
every step), this moves only the experts, only when the other one is called, and keeps a pinned host copy of each
made once: offloading an expert is dropping its device tensors (no copy back: inference never changes the weights),
bringing it back is one pinned host-to-device copy per tensor. ``nn.Parameter`` objects keep their identity (only
``.data`` is swapped), so compiled blocks, patched ASA processors and forward hooks stay attached; fuse any LoRA
*before* setting this up, since the host copies are taken once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from blade.families import pipeline_experts

_ALIGN = 64  # bytes: every host copy starts on a 64-byte boundary of its expert's buffer (any dtype's alignment)


@dataclass
class _Slot:
    """One parameter or buffer of an expert, with its host copy."""

    module: torch.nn.Module
    name: str
    is_parameter: bool
    host: torch.Tensor

    def set(self, tensor: torch.Tensor) -> None:
        if self.is_parameter:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor


@dataclass
class ExpertOffload:
    """Handle of `offload_idle_experts`: which expert is resident, how often and how long the swaps took."""

    device: torch.device
    experts: list[tuple[str, torch.nn.Module]]
    resident: str
    swaps: int = 0
    swap_seconds: float = 0.0
    setup_seconds: float = 0.0
    _slots: dict[str, list[_Slot]] = field(default_factory=dict, repr=False)
    _hooks: list[Any] = field(default_factory=list, repr=False)

    def _offload(self, name: str) -> None:
        for slot in self._slots[name]:
            slot.set(slot.host)

    def _onload(self, name: str) -> None:
        copies: dict[int, torch.Tensor] = {}  # a shared (tied) tensor stays shared on the device
        for slot in self._slots[name]:
            if id(slot.host) not in copies:
                copies[id(slot.host)] = slot.host.to(self.device, non_blocking=True, copy=True)
            slot.set(copies[id(slot.host)])

    def activate(self, name: str) -> None:
        """Make expert `name` the resident one (a no-op when it already is): the resident expert's device tensors
        are dropped first, so the two never share the device."""
        if name == self.resident:
            return
        start = time.perf_counter()
        self._offload(self.resident)
        self._onload(name)
        if self.device.type == "cuda":  # the copies are stream-ordered; synchronized only to time them
            torch.cuda.synchronize(self.device)
        self.resident = name
        self.swaps += 1
        self.swap_seconds += time.perf_counter() - start

    def stats(self) -> dict[str, Any]:
        hosts = {id(s.host): s.host for slots in self._slots.values() for s in slots}
        return {"resident": self.resident, "swaps": self.swaps, "swap_seconds": self.swap_seconds,
                "setup_seconds": self.setup_seconds,
                "host_gb": sum(h.numel() * h.element_size() for h in hosts.values()) / 2**30}

    def remove(self, device_resident: bool = True) -> None:
        """Remove the hooks; with `device_resident` every expert is brought back to the device (the state before
        `offload_idle_experts`), otherwise the idle ones stay on the host."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if device_resident:
            for name, _ in self.experts:
                if name != self.resident:
                    self._onload(name)


def _expert_slots(expert: torch.nn.Module, pin: bool) -> list[_Slot]:
    """The expert's parameters and buffers, each with a host copy that is a view into one (pinned) buffer: pinning
    tensor by tensor would round every allocation up to a power of two in torch's host allocator (up to 1.8x the
    weights for the 14B's feed-forward matrices)."""
    entries = [(module, name, kind, tensor)
               for module in expert.modules()
               for kind, tensors in ((True, module._parameters), (False, module._buffers))
               for name, tensor in tensors.items() if tensor is not None]
    offsets: dict[int, int] = {}  # one host copy per tensor, even where two modules share it (tied weights)
    total = 0
    for *_, tensor in entries:
        if id(tensor) not in offsets:
            offsets[id(tensor)] = total
            total += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    flat = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    hosts: dict[int, torch.Tensor] = {}
    slots = []
    for module, name, kind, tensor in entries:
        if id(tensor) not in hosts:
            offset, nbytes = offsets[id(tensor)], tensor.numel() * tensor.element_size()
            hosts[id(tensor)] = flat[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
            hosts[id(tensor)].copy_(tensor.detach())
        slots.append(_Slot(module, name, kind, hosts[id(tensor)]))
    return slots


def offload_idle_experts(
    pipe: Any, device: str | torch.device | None = None, pin_memory: bool | None = None
) -> ExpertOffload:
    """Keep only the expert being called on `device`; the others wait in (pinned) host memory.

    `pipe`: a pipeline with two experts (``transformer`` and ``transformer_2``, weights final: any LoRA fused),
    wherever they are now (a pipeline loaded on the CPU need not fit the device first). `device`: where the experts
    compute (default: the first expert's device). The first expert is made resident; a forward pre-hook on each
    expert swaps it in when it is called. `pin_memory` (default: for a CUDA device) pins the host copies, so a swap
    runs at the host link's full speed. Returns the handle (`stats()`, `remove()`).
    """
    experts = pipeline_experts(pipe)
    if len(experts) < 2:
        raise ValueError("offload_idle_experts needs a pipeline with two experts (transformer and transformer_2); "
                         f"this one has {[name for name, _ in experts]}")
    # a tensor shared by two experts would be taken from the one still computing when the other is offloaded
    seen: set[int] = set()
    for _, model in experts:
        ids = {id(t) for t in (*model.parameters(), *model.buffers())}
        if ids & seen:
            raise ValueError("the experts share parameters or buffers; offloading one would take the other's away")
        seen |= ids
    first_name, first = experts[0]
    device = torch.device(device) if device is not None else next(first.parameters()).device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    pin = device.type == "cuda" if pin_memory is None else pin_memory
    start = time.perf_counter()
    handle = ExpertOffload(device=device, experts=experts, resident=first_name)
    for name, model in experts:  # one expert at a time: its originals go as soon as its host copy exists
        handle._slots[name] = _expert_slots(model, pin)
        if name != first_name:
            handle._offload(name)
    if next(first.parameters()).device != device:  # loaded elsewhere (the CLI loads on the CPU): bring it over
        handle._onload(first_name)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    handle.setup_seconds = time.perf_counter() - start

    for name, model in experts:
        handle._hooks.append(model.register_forward_pre_hook(lambda _module, _args, name=name: handle.activate(name)))
    return handle
