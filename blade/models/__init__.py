"""Per-family adapters that plug adaptive block-sparse attention into diffusers transformers.

``blade.models.wan.apply_asa`` (``WanTransformer3DModel``) and ``blade.models.cogvideox.apply_asa``
(``CogVideoXTransformer3DModel``) return an ``ASAHandle``; ``apply_asa`` here dispatches on the transformer class,
``apply_asa_pipeline`` patches every denoiser of a pipeline (Wan2.2-A14B: ``transformer`` and ``transformer_2``).
"""

from __future__ import annotations

from torch import nn

from blade.attention import ASAConfig
from blade.families import FAMILIES, get_family, model_of_pipeline, pipeline_experts
from blade.models.common import ASAHandle, PipelineASAHandle, get_asa_handle, remove_asa

__all__ = [
    "ASAHandle",
    "PipelineASAHandle",
    "apply_asa",
    "apply_asa_pipeline",
    "default_pipeline_asa_config",
    "get_asa_handle",
    "model_family",
    "remove_asa",
    "remove_asa_pipeline",
]


def model_family(transformer: nn.Module) -> str:
    """``"wan"`` or ``"cogvideox"`` for a diffusers transformer (its class name's prefix), else a ValueError."""
    name = type(transformer).__name__
    for family in FAMILIES.values():
        if name.startswith(family.transformer_class.removesuffix("Transformer3DModel")):
            return family.name
    raise ValueError(f"no ASA adapter for {name}: expected a WanTransformer3DModel or a CogVideoXTransformer3DModel")


def apply_asa(transformer: nn.Module, config: ASAConfig | dict | None = None, *, dense_steps: int = 0) -> ASAHandle:
    """Patch a Wan or CogVideoX transformer with ASA (the family's default config when ``config`` is None)."""
    adapter = get_family(model_family(transformer)).adapter()
    return adapter.apply_asa(transformer, config, dense_steps=dense_steps)


def default_pipeline_asa_config(pipe) -> ASAConfig | None:
    """The registry's ASA default for the published model a pipeline has the architecture of
    (``blade.families.ModelSpec.asa_defaults``), or None (then the family's default applies)."""
    spec = model_of_pipeline(pipe)
    return ASAConfig(**spec.asa_defaults()) if spec is not None else None


def apply_asa_pipeline(
    pipe, config: ASAConfig | dict | None = None, *, dense_steps: int = 0
) -> ASAHandle | PipelineASAHandle:
    """Patch every denoiser of ``pipe`` (``transformer`` and, when present, ``transformer_2``) with ASA.

    ``config`` None: the registry's default for a recognised published model (pool window scaled with its default
    video's token count), else the family's default. One denoiser: its ``ASAHandle``; two: a ``PipelineASAHandle``
    over both (one shared ASA module and step tracker), whose ``handles`` name each expert.
    """
    experts = pipeline_experts(pipe)
    if not experts:
        raise ValueError(f"{type(pipe).__name__} has no transformer to patch")
    if config is None:
        config = default_pipeline_asa_config(pipe)
    handles: dict[str, ASAHandle] = {}
    try:
        for name, transformer in experts:
            adapter = get_family(model_family(transformer)).adapter()
            if handles:
                handles[name] = adapter.apply_asa(
                    transformer, config, dense_steps=dense_steps, share_with=next(iter(handles.values()))
                )
            else:
                handles[name] = adapter.apply_asa(transformer, config, dense_steps=dense_steps)
    except Exception:
        for handle in handles.values():
            handle.remove()
        raise
    if len(handles) == 1:
        return next(iter(handles.values()))
    return PipelineASAHandle(handles)


def remove_asa_pipeline(pipe) -> bool:
    """Remove ASA from every denoiser of ``pipe``; False when none was patched."""
    removed = [remove_asa(transformer) for _, transformer in pipeline_experts(pipe)]
    return any(removed)
