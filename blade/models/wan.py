"""ASA for diffusers' ``WanTransformer3DModel`` (Wan2.1, Wan2.2): self-attention (``attn1``) only, cross-attention
stock.

``apply_asa(transformer)`` swaps each block's ``attn1`` processor for ``WanASAProcessor`` and installs the shared
hooks of ``blade.models.common``: the latent grid comes from ``hidden_states [B, C, F, H, W]`` and the patch size,
video tokens are Gilbert-ordered once before the first block (the ``rope`` output follows them) and get the raster
order back after ``proj_out`` (the output norm and projection are token-wise). Wan2.2 TI2V's per-token timesteps
(``expand_timesteps``: ``timestep [B, L]``) are permuted with the tokens before the condition embedder, so the
per-token modulation tables of every block and of the output norm come out in the Gilbert order. A two-expert
pipeline (Wan2.2-A14B) patches each expert with ``share_with`` (``blade.models.apply_asa_pipeline``). (The
student's noise schedule of this family lives in ``blade.distill``, not here.)
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections
from torch import nn

from blade.attention import ASAConfig
from blade.models.common import (
    MODE_OFF,
    ASAHandle,
    ASAState,
    Grid,
    ModelFamily,
    install_asa,
    permute_tokens,
    remove_asa,
    resolve_config,
)
from blade.parallel import heads_to_seq, seq_to_heads, ulysses_group

__all__ = ["WanASAProcessor", "apply_asa", "default_asa_config", "remove_asa", "wan_grid"]


def default_asa_config(**overrides: Any) -> ASAConfig:
    """BLADE's Wan2.1 setting: 128-token blocks, threshold 0.95, keep 5-17% of key blocks, global tokens over 30."""
    values = dict(block_size=128, threshold=0.95, min_keep=0.05, max_keep=0.17, pool_size=30)
    values.update(overrides)
    return ASAConfig(**values)


def wan_grid(hidden_states_shape: torch.Size | tuple[int, ...], patch_size: tuple[int, int, int]) -> Grid:
    """Token grid ``(F, H, W)`` of a Wan latent ``[B, C, F, H, W]`` with patch ``(p_t, p_h, p_w)``."""
    _, _, frames, height, width = hidden_states_shape
    p_t, p_h, p_w = patch_size
    return frames // p_t, height // p_h, width // p_w


def _apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on ``x [B, L, H, D]`` with tables ``[1, L, 1, D]`` (pairs (2i, 2i+1) rotate together)."""
    x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1).flatten(-2)
    return rotated.type_as(x)


class WanASAProcessor(WanAttnProcessor):
    """``WanAttnProcessor`` whose self-attention runs ASA on pre-ordered tokens.

    diffusers' own projections (fused ``to_qkv`` too, and any LoRA on them), QK RMS norms and RoPE are reused; only
    the attention itself is replaced. Cross-attention calls and ASA-off forwards fall through to the stock code.
    Under diffusers' Ulysses context parallelism the processor does the all-to-alls around ASA itself
    (``blade.parallel``), as the stock dispatcher would around its attention.
    """

    def __init__(self, state: ASAState):
        super().__init__()
        self.state = state

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        stock = (
            self.state.processor_mode() == MODE_OFF
            or encoder_hidden_states is not None
            or attention_mask is not None
            or attn.add_k_proj is not None
        )
        if stock:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))  # [B, L, H, D]
        if rotary_emb is not None:
            query = _apply_interleaved_rope(query, *rotary_emb)
            key = _apply_interleaved_rope(key, *rotary_emb)

        # Ulysses context parallelism (diffusers' plan split the tokens): this process's tokens of all heads ->
        # all tokens of its heads, ASA per local head, and back (see blade.parallel).
        ulysses = ulysses_group(self._parallel_config)
        heads = None
        if ulysses is not None:
            heads = ulysses.head_range(attn.heads)
            query, key, value = (seq_to_heads(x, ulysses) for x in (query, key, value))

        out = self.state.attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dense_tail_tokens=0, heads=heads
        ).transpose(1, 2)  # [B, L, H, D]
        if ulysses is not None:
            out = heads_to_seq(out, ulysses)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class WanFamily(ModelFamily):
    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        return transformer.blocks

    def grid(self, transformer: nn.Module, arguments: dict[str, Any]) -> Grid:
        return wan_grid(arguments["hidden_states"].shape, transformer.config.patch_size)

    def rope_module(self, transformer: nn.Module) -> nn.Module:
        return transformer.rope

    def restore_module(self, transformer: nn.Module) -> nn.Module:
        return transformer.proj_out

    def reorder_arguments(self, transformer: nn.Module, arguments: dict[str, Any], ctx) -> bool:
        """Wan2.2 TI2V (``expand_timesteps``): one timestep per video token, ``[B, L]`` in raster order."""
        timestep = arguments.get("timestep")
        if not (torch.is_tensor(timestep) and timestep.ndim == 2):
            return False
        if timestep.shape[1] != ctx.num_video_tokens:
            raise ValueError(
                f"per-token timestep of {timestep.shape[1]} tokens for a latent grid {ctx.grid} of "
                f"{ctx.num_video_tokens}: ASA needs one timestep per video token"
            )
        arguments["timestep"] = permute_tokens(timestep, ctx.perm, 1)
        return True

    def make_processor(self, original: Any, state: ASAState) -> WanASAProcessor:
        processor = WanASAProcessor(state)
        # keep a backend chosen with set_attention_backend for the stock (ASA-off) path
        processor._attention_backend = getattr(original, "_attention_backend", None)
        processor._parallel_config = getattr(original, "_parallel_config", None)
        return processor


def apply_asa(
    transformer: nn.Module,
    config: ASAConfig | dict | None = None,
    *,
    dense_steps: int = 0,
    share_with: ASAHandle | None = None,
) -> ASAHandle:
    """Patch every ``blocks[i].attn1`` of a ``WanTransformer3DModel`` with ASA (see ``blade.models.common``).

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` (LoRA, fused QKV and gradient checkpointing keep working).
        config: ``ASAConfig`` (or a dict of its fields); default ``default_asa_config()``.
        dense_steps: the first sampling steps of each run that stay dense.
        share_with: the handle of the pipeline's other expert (Wan2.2-A14B): one ASA module and step tracker for
            both (``config`` is then that handle's).
    """
    return install_asa(
        transformer,
        WanFamily(),
        resolve_config(config, default_asa_config),
        dense_steps=dense_steps,
        share_with=share_with,
    )
