"""Monkey-patch a diffusers Wan2.1 transformer's self-attention with adaptive block-sparse attention (ASA).

Thin wrapper over ``blade.models.wan`` with the entry points of the BLADE research code; importable by file path::

    spec = importlib.util.spec_from_file_location("modify_wan", "wanx/train/modify_wan.py")
    modify_wan = importlib.util.module_from_spec(spec); spec.loader.exec_module(modify_wan)
    handle = modify_wan.set_adaptive_block_sparse_attn_wanx(pipe.transformer)
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import blade  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from blade.attention import ASAConfig
from blade.models.common import ASAHandle, remove_asa
from blade.models.wan import apply_asa, default_asa_config

__all__ = ["default_asa_config", "set_adaptive_block_sparse_attn_wanx", "unset_adaptive_block_sparse_attn_wanx"]


def set_adaptive_block_sparse_attn_wanx(
    transformer, config: ASAConfig | dict | None = None, dense_steps: int = 0
) -> ASAHandle:
    """Patch every ``attn1`` of a ``WanTransformer3DModel`` with ASA (default: pool 30, keep 5-17%, threshold 0.95).

    Returns the ``ASAHandle`` (``stats()``, ``reset()``, ``enabled``, ``remove()``).
    """
    return apply_asa(transformer, config, dense_steps=dense_steps)


def unset_adaptive_block_sparse_attn_wanx(transformer) -> bool:
    """Restore the stock attention processors; False when the transformer was not patched."""
    return remove_asa(transformer)
