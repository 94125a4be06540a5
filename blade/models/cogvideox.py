"""ASA for diffusers' ``CogVideoXTransformer3DModel``: the joint text+video self-attention (``attn1``).

The stock processor attends over ``[text, video]``. ``CogVideoXASAProcessor`` attends over ``[video, text]``: the
video tokens (already Gilbert-ordered by the shared hooks, their ``image_rotary_emb`` with them) form the sparse
blocks and the text tokens, whatever their number, sit at the tail and stay dense in both directions. The grid comes
from ``hidden_states [B, F, C, H, W]`` with ``patch_size`` (and ``patch_size_t`` when set). (The student's noise
schedule of this family lives in ``blade.distill``, not here.)
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from blade.attention import ASAConfig
from blade.models.common import (
    MODE_OFF,
    ASAHandle,
    ASAState,
    Grid,
    ModelFamily,
    install_asa,
    remove_asa,
    resolve_config,
)

__all__ = [
    "CogVideoXASAProcessor",
    "apply_asa",
    "cogvideox_grid",
    "default_asa_config",
    "remove_asa",
]


def default_asa_config(**overrides: Any) -> ASAConfig:
    """BLADE's CogVideoX setting: 128-token blocks, threshold 0.95, keep 5-10% of key blocks, global tokens over 15."""
    values = dict(block_size=128, threshold=0.95, min_keep=0.05, max_keep=0.10, pool_size=15)
    values.update(overrides)
    return ASAConfig(**values)


def cogvideox_grid(
    hidden_states_shape: torch.Size | tuple[int, ...], patch_size: int, patch_size_t: int | None = None
) -> Grid:
    """Token grid ``(F, H, W)`` of a CogVideoX latent ``[B, F, C, H, W]`` (frames first)."""
    _, frames, _, height, width = hidden_states_shape
    if patch_size_t is not None:
        frames = frames // patch_size_t
    return frames, height // patch_size, width // patch_size


def _qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
        return attn.to_qkv(x).chunk(3, dim=-1)
    return attn.to_q(x), attn.to_k(x), attn.to_v(x)


class CogVideoXASAProcessor(CogVideoXAttnProcessor2_0):
    """``CogVideoXAttnProcessor2_0`` with ASA over ``[video (Gilbert order), text (dense tail)]``.

    Projections (and LoRA on them), the per-head QK LayerNorms and RoPE on the video part are diffusers' own; the
    output is split back into ``(video, text)`` like the stock processor's.
    """

    def __init__(self, state: ASAState):
        super().__init__()
        self.state = state

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.state.processor_mode() == MODE_OFF or attention_mask is not None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        batch, n_video, _ = hidden_states.shape
        n_text = encoder_hidden_states.size(1)
        joint = torch.cat([hidden_states, encoder_hidden_states], dim=1)  # [B, L_video + L_text, C]

        query, key, value = (x.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for x in _qkv(attn, joint))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # video tokens only, now at the head of the sequence
            query = torch.cat([apply_rotary_emb(query[:, :, :n_video], image_rotary_emb), query[:, :, n_video:]], 2)
            if not attn.is_cross_attention:
                key = torch.cat([apply_rotary_emb(key[:, :, :n_video], image_rotary_emb), key[:, :, n_video:]], 2)

        out = self.state.attention(query, key, value, dense_tail_tokens=n_text)  # [B, H, L, D]
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        video, text = out.split([n_video, n_text], dim=1)
        return video, text


class CogVideoXFamily(ModelFamily):
    rope_arg = "image_rotary_emb"

    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        return transformer.transformer_blocks

    def grid(self, transformer: nn.Module, arguments: dict[str, Any]) -> Grid:
        cfg = transformer.config
        return cogvideox_grid(arguments["hidden_states"].shape, cfg.patch_size, cfg.patch_size_t)

    def make_processor(self, original: Any, state: ASAState) -> CogVideoXASAProcessor:
        return CogVideoXASAProcessor(state)


def apply_asa(transformer: nn.Module, config: ASAConfig | dict | None = None, *, dense_steps: int = 0) -> ASAHandle:
    """Patch every ``transformer_blocks[i].attn1`` of a ``CogVideoXTransformer3DModel`` with ASA.

    Args:
        transformer: a diffusers ``CogVideoXTransformer3DModel`` (LoRA and gradient checkpointing keep working).
        config: ``ASAConfig`` (or a dict of its fields); default ``default_asa_config()``.
        dense_steps: the first sampling steps of each run that stay dense.
    """
    return install_asa(
        transformer, CogVideoXFamily(), resolve_config(config, default_asa_config), dense_steps=dense_steps
    )
