"""Per-family adapters that plug adaptive block-sparse attention into diffusers transformers.

``blade.models.wan.apply_asa`` (``WanTransformer3DModel``) and ``blade.models.cogvideox.apply_asa``
(``CogVideoXTransformer3DModel``) return an ``ASAHandle``; ``apply_asa`` here dispatches on the transformer class.
"""

from __future__ import annotations

from torch import nn

from blade.attention import ASAConfig
from blade.families import FAMILIES, get_family
from blade.models.common import ASAHandle, get_asa_handle, remove_asa

__all__ = ["ASAHandle", "apply_asa", "get_asa_handle", "model_family", "remove_asa"]


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
