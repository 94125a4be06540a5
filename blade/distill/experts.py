"""The denoiser TDM trains: one transformer, or a two-expert pipeline's experts behind one router.

Wan2.2-T2V-A14B has two denoisers: ``transformer`` serves the noisy half of the trajectory (model timestep
``t >= boundary_ratio * num_train_timesteps``) and ``transformer_2`` the rest, exactly WanPipeline's rule (it
compares the scheduler timestep, i.e. what the transformer is conditioned on, with ``boundary_ratio *
scheduler.config.num_train_timesteps``). ``ExpertRouter`` owns both and is called like one transformer, so the TDM
objective (``blade.distill.tdm``) stays expert-agnostic: every call at noise level t (student anchors, fake score
and teacher at tau) reaches the expert that owns t. TDM draws tau per sample, so one batch may hold samples of both
experts; the router then splits the batch, runs each expert on its samples and puts the outputs back in order.

The LoRA helpers of ``blade.distill.lora`` work on the router unchanged: it forwards ``set_adapter`` /
``disable_adapters`` / ``enable_adapters`` to every expert, and its modules (hence the adapters' parameters) are
the experts' in order, ``transformer`` first. Saving is per expert (``experts_of``, ``expert_file_name``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from blade.families import pipeline_experts

__all__ = ["ExpertRouter", "denoiser", "expert_file_name", "experts_of"]


class ExpertRouter(torch.nn.Module):
    """Two denoisers called as one: ``transformer`` for timesteps ``>= boundary``, ``transformer_2`` below.

    Args:
        transformer: the high-noise expert.
        transformer_2: the low-noise expert.
        boundary: the model timestep where ``transformer_2`` takes over (WanPipeline: ``boundary_ratio *
            num_train_timesteps``, 875.0 for Wan2.2-A14B).
    """

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module, boundary: float):
        super().__init__()
        # A ModuleDict keeps the order: modules(), and so the LoRA parameter lists, walk `transformer` first.
        self.experts = torch.nn.ModuleDict({"transformer": transformer, "transformer_2": transformer_2})
        self.boundary = float(boundary)

    # ---- what callers read from a transformer ----------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.experts["transformer"].dtype

    @property
    def config(self) -> Any:
        return self.experts["transformer"].config

    # ---- PEFT / diffusers switches, applied to every expert ----------------------------------------------------

    def set_adapter(self, name: str) -> None:
        for expert in self.experts.values():
            expert.set_adapter(name)

    def disable_adapters(self) -> None:
        for expert in self.experts.values():
            expert.disable_adapters()

    def enable_adapters(self) -> None:
        for expert in self.experts.values():
            expert.enable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        for expert in self.experts.values():
            expert.enable_gradient_checkpointing()

    # ---- routing -----------------------------------------------------------------------------------------------

    def high_noise(self, timestep: torch.Tensor) -> torch.Tensor:
        """``[B]`` bool: the samples ``transformer`` serves. ``timestep`` is ``[B]`` or per token ``[B, L]``
        (``expand_timesteps``: the sample's t on its noisy tokens, so the row's maximum is its t)."""
        per_sample = timestep.reshape(timestep.shape[0], -1).amax(dim=1)
        return per_sample >= self.boundary

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False, **kwargs: Any) -> tuple[torch.Tensor]:
        """The owning expert's output ``(out [B, ...],)``; a batch of both experts is split and reassembled.

        Other keyword arguments go to both experts unsliced (they must not be per-sample).
        """
        if return_dict:
            raise ValueError("ExpertRouter returns a tuple (return_dict=False)")
        high = self.high_noise(timestep)
        parts, order = [], []
        for name, mask in (("transformer", high), ("transformer_2", ~high)):
            if not bool(mask.any()):
                continue
            if bool(mask.all()):  # the usual case (one anchor per batch): no indexing, the expert's own output
                return self.experts[name](hidden_states=hidden_states, timestep=timestep,
                                          encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)
            index = mask.nonzero().squeeze(1)
            parts.append(self.experts[name](hidden_states=hidden_states[index], timestep=timestep[index],
                                            encoder_hidden_states=encoder_hidden_states[index], return_dict=False,
                                            **kwargs)[0])
            order.append(index)
        # Outputs in expert order -> batch order (index_select keeps the graph for the fake/generator losses).
        inverse = torch.argsort(torch.cat(order))
        return (torch.cat(parts).index_select(0, inverse),)


def denoiser(pipe: Any) -> torch.nn.Module:
    """The model TDM trains: ``pipe.transformer``, or an ``ExpertRouter`` over ``transformer`` and
    ``transformer_2`` with WanPipeline's boundary (``boundary_ratio * scheduler.config.num_train_timesteps``)."""
    experts = pipeline_experts(pipe)
    if len(experts) == 1:
        return experts[0][1]
    ratio = getattr(pipe.config, "boundary_ratio", None)
    if ratio is None:  # WanPipeline would never call transformer_2: nothing to distil there
        raise ValueError(f"{type(pipe).__name__} has a transformer_2 but no boundary_ratio: WanPipeline would only "
                         "use `transformer`")
    return ExpertRouter(experts[0][1], experts[1][1], ratio * pipe.scheduler.config.num_train_timesteps)


def experts_of(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``[(pipeline attribute, transformer), ...]`` of a ``denoiser``: the router's experts, else the transformer."""
    if isinstance(model, ExpertRouter):
        return list(model.experts.items())
    return [("transformer", model)]


def expert_file_name(name: str, expert: str) -> str:
    """The file of ``expert``'s part of a per-expert file ``name``: ``name`` itself for ``transformer``, else the
    expert's name before the suffix (``pytorch_lora_weights_transformer_2.safetensors``, the name that
    ``blade.pipelines.loading.expert_lora_files`` and ``blade.api.load_blade_lora`` read)."""
    if expert == "transformer":
        return name
    path = Path(name)
    return f"{path.stem}_{expert}{path.suffix}"
