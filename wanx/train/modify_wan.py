"""Monkey-patch a diffusers Wan transformer's self-attention with adaptive block-sparse attention (ASA).

Takes one ``WanTransformer3DModel`` (Wan2.1, Wan2.2-TI2V) or a whole ``WanPipeline``: then every expert is patched
(Wan2.2-A14B: ``transformer`` and ``transformer_2``) and the pipeline-wide handle comes back.

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
from blade.models import apply_asa_pipeline, remove_asa_pipeline
from blade.models.common import ASAHandle, PipelineASAHandle, remove_asa
from blade.models.wan import apply_asa, default_asa_config

__all__ = ["default_asa_config", "set_adaptive_block_sparse_attn_wanx", "unset_adaptive_block_sparse_attn_wanx"]


def _is_pipeline(obj) -> bool:
    return hasattr(obj, "transformer") and not hasattr(obj, "blocks")


def set_adaptive_block_sparse_attn_wanx(
    transformer, config: ASAConfig | dict | None = None, dense_steps: int = 0
) -> ASAHandle | PipelineASAHandle:
    """Patch every ``attn1`` of a ``WanTransformer3DModel`` with ASA (default: pool 30, keep 5-17%, threshold 0.95).

    ``transformer`` may also be a ``WanPipeline``: every expert is patched (``transformer`` and ``transformer_2``),
    with the registry's default for a recognised published model when ``config`` is None.

    Returns the ``ASAHandle`` (``stats()``, ``reset()``, ``enabled``, ``remove()``), or for a two-expert pipeline
    a ``PipelineASAHandle`` (the same, over both; ``handles`` names each expert).
    """
    if _is_pipeline(transformer):
        return apply_asa_pipeline(transformer, config, dense_steps=dense_steps)
    return apply_asa(transformer, config, dense_steps=dense_steps)


def unset_adaptive_block_sparse_attn_wanx(transformer) -> bool:
    """Restore the stock attention processors (of every expert, for a pipeline); False when nothing was patched."""
    if _is_pipeline(transformer):
        return remove_asa_pipeline(transformer)
    return remove_asa(transformer)
