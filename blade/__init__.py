"""BLADE: adaptive block-sparse attention and sparsity-aware step distillation for video diffusion transformers.

The short API (loaded on first use, so `import blade` stays light)::

    from blade import enable_asa, disable_asa, load_blade_lora, generate
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("enable_asa", "disable_asa", "load_blade_lora", "generate", "asa_handle")
__all__ = [*_API, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from blade import api

        return getattr(api, name)
    raise AttributeError(f"module 'blade' has no attribute {name!r}")
