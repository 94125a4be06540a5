"""Monkey-patch a diffusers CogVideoX transformer's joint self-attention with adaptive block-sparse attention (ASA).

Thin wrapper over ``blade.models.cogvideox`` with the entry points of the BLADE research code; importable by file
path::

    spec = importlib.util.spec_from_file_location("modify_cogvideo", "cogvideox/train/modify_cogvideo.py")
    modify_cogvideo = importlib.util.module_from_spec(spec); spec.loader.exec_module(modify_cogvideo)
    handle = modify_cogvideo.set_block_sparse_attn_cogvideox(pipe.transformer)
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import blade  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from blade.attention import ASAConfig
from blade.models.cogvideox import apply_asa, default_asa_config
from blade.models.common import ASAHandle, remove_asa

__all__ = ["default_asa_config", "set_block_sparse_attn_cogvideox", "unset_block_sparse_attn_cogvideox"]


def set_block_sparse_attn_cogvideox(
    transformer, config: ASAConfig | dict | None = None, dense_steps: int = 0
) -> ASAHandle:
    """Patch every ``attn1`` of a ``CogVideoXTransformer3DModel`` with ASA (default: pool 15, keep 5-10%, threshold
    0.95); text tokens stay dense. Returns the ``ASAHandle``."""
    return apply_asa(transformer, config, dense_steps=dense_steps)


def unset_block_sparse_attn_cogvideox(transformer) -> bool:
    """Restore the stock attention processors; False when the transformer was not patched."""
    return remove_asa(transformer)
