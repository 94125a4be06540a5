"""ASA in diffusers' CogVideoXTransformer3DModel: text at the dense tail, exactness vs stock, hooks, modify script."""

import importlib.util
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed

from blade.attention import AdaptiveBlockSparseAttention, ASAConfig
from blade.models.cogvideox import CogVideoXASAProcessor, apply_asa, cogvideox_grid, default_asa_config
from blade.testing.tiny import build_tiny_cogvideox_pipeline, tiny_cogvideox_transformer

ROOT = Path(__file__).resolve().parents[1]
KEEP_ALL = ASAConfig(block_size=16, threshold=1.0, min_keep=1.0, max_keep=1.0, pool_size=None)


def sparse_config(seed=None):
    return ASAConfig(block_size=16, threshold=0.5, min_keep=0.2, max_keep=0.5, pool_size=8, seed=seed)



def inputs(frames, height, width, batch=2, text=7, patch_t=None, seed=0):
    """Latent [B, F, 4, H, W], text [B, text, 32], timestep [B] and RoPE tables for the token grid."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, 4, height, width, generator=g)
    e = torch.randn(batch, text, 32, generator=g)
    gf, gh, gw = (frames // patch_t if patch_t else frames), height // 2, width // 2
    rope = get_3d_rotary_pos_embed(16, ((0, 0), (gh, gw)), (gh, gw), gf)  # ([F*H*W, 16], [F*H*W, 16])
    return x, e, torch.full((batch,), 500.0), rope


def run(model, x, e, t, rope, keyword=False):
    if keyword:
        return model(hidden_states=x, encoder_hidden_states=e, timestep=t, image_rotary_emb=rope, return_dict=False)[0]
    return model(x, e, t, None, None, rope, return_dict=False)[0]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "frames,height,width,text",
    [(1, 6, 10, 7), (3, 10, 6, 16), (2, 8, 14, 7)],  # token grids 1x3x5, 3x5x3, 2x4x7
)
def test_keep_all_equals_stock(frames, height, width, text):
    model = tiny_cogvideox_transformer()
    x, e, t, rope = inputs(frames, height, width, text=text)
    with torch.no_grad():
        reference = run(model, x, e, t, rope)
        handle = apply_asa(model, KEEP_ALL)
        assert rel_err(run(model, x, e, t, rope), reference) < 1e-5
        assert rel_err(run(model, x, e, t, rope, keyword=True), reference) < 1e-5
        assert handle.stats()["sparsity"] == 0.0 and handle.stats()["calls"] == 2 * len(model.transformer_blocks)
        handle.remove()
        assert torch.equal(run(model, x, e, t, rope), reference)
    assert all(type(p) is CogVideoXAttnProcessor2_0 for p in model.attn_processors.values())


def test_keep_all_equals_stock_without_rope_and_with_temporal_patch():
    model = tiny_cogvideox_transformer(use_rotary_positional_embeddings=False)  # 2B layout: sincos positions
    x, e, t, _ = inputs(3, 6, 8, text=16)  # its positional table needs exactly max_text_seq_length text tokens
    with torch.no_grad():
        reference = run(model, x, e, t, None)
        apply_asa(model, KEEP_ALL)
        assert rel_err(run(model, x, e, t, None), reference) < 1e-5

    model = tiny_cogvideox_transformer(patch_size_t=2)  # CogVideoX 1.5 layout: frames patched in pairs
    x, e, t, rope = inputs(4, 6, 8, patch_t=2)
    assert cogvideox_grid(x.shape, 2, 2) == (2, 3, 4)
    with torch.no_grad():
        reference = run(model, x, e, t, rope)
        apply_asa(model, KEEP_ALL)
        assert rel_err(run(model, x, e, t, rope), reference) < 1e-5


class ReorderInsideASA(CogVideoXAttnProcessor2_0):
    """Reference: [video (raster), text] with stock projections, norms and RoPE; ASA reorders and keeps text dense."""

    def __init__(self, asa, grid):
        super().__init__()
        self.asa, self.grid = asa, grid

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        n_video, n_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        joint = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        b = joint.shape[0]
        q, k, v = (
            proj(joint).view(b, -1, attn.heads, 16).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        q, k = attn.norm_q(q), attn.norm_k(k)
        q = torch.cat([apply_rotary_emb(q[:, :, :n_video], image_rotary_emb), q[:, :, n_video:]], dim=2)
        k = torch.cat([apply_rotary_emb(k[:, :, :n_video], image_rotary_emb), k[:, :, n_video:]], dim=2)
        out = self.asa(q, k, v, grid=self.grid)  # text tail dense by the contract
        out = attn.to_out[0](out.transpose(1, 2).reshape(b, -1, attn.heads * 16))
        return out.split([n_video, n_text], dim=1)


@pytest.mark.parametrize("text", [7, 16])
def test_sparse_matches_per_layer_reordering(text):
    x, e, t, rope = inputs(3, 10, 12, text=text)  # 3 x 5 x 6 = 90 video tokens + text
    model = tiny_cogvideox_transformer()
    grid = cogvideox_grid(x.shape, 2)
    reference_asa = AdaptiveBlockSparseAttention(sparse_config(seed=5))
    for block in model.transformer_blocks:
        block.attn1.set_processor(ReorderInsideASA(reference_asa, grid))
    with torch.no_grad():
        reference = run(model, x, e, t, rope)

    model = tiny_cogvideox_transformer()
    handle = apply_asa(model, sparse_config(seed=5))
    with torch.no_grad():
        out = run(model, x, e, t, rope, keyword=True)
    assert rel_err(out, reference) < 1e-5
    assert handle.stats()["sparsity"] > 0.1
    assert handle.stats()["sparsity"] == pytest.approx(reference_asa.stats()["sparsity"])


def test_gradient_checkpointing_same_output_and_grads():
    x, e, t, rope = inputs(2, 6, 8)
    x_other, e_other, t_other, rope_other = inputs(1, 4, 4, seed=1)

    def loss_and_grads(patched):
        model = tiny_cogvideox_transformer().train()
        model.enable_gradient_checkpointing()
        if patched:
            apply_asa(model, KEEP_ALL)
        out = run(model, x, e, t, rope)
        with torch.no_grad():  # another grid in between the forward and its recomputation
            run(model, x_other, e_other, t_other, rope_other)
        out.square().mean().backward()
        return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_grads = loss_and_grads(False)
    out, grads = loss_and_grads(True)
    assert rel_err(out, ref_out) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert torch.allclose(grad, ref_grads[name], rtol=1e-4, atol=1e-6), name


def test_pipeline_batched_cfg_keep_all_equals_stock():
    kwargs = dict(
        prompt="a red ball moves left",
        height=48,
        width=80,
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=6.0,
        max_sequence_length=16,
        output_type="latent",
    )
    pipe = build_tiny_cogvideox_pipeline()
    reference = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    handle = apply_asa(pipe.transformer, KEEP_ALL)
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert rel_err(out, reference) < 1e-5
    handle.remove()
    handle = apply_asa(pipe.transformer, sparse_config(), dense_steps=1)
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert torch.isfinite(out).all() and handle.step == 1
    assert 0 < handle.stats()["sparsity"] < 1


def test_processor_types_and_default_config():
    model = tiny_cogvideox_transformer()
    apply_asa(model)
    assert all(type(p) is CogVideoXASAProcessor for p in model.attn_processors.values())
    cfg = default_asa_config()
    assert (cfg.block_size, cfg.pool_size, cfg.threshold, cfg.min_keep, cfg.max_keep) == (128, 15, 0.95, 0.05, 0.10)


def test_modify_script_loads_by_file_path():
    path = ROOT / "cogvideox/train/modify_cogvideo.py"
    spec = importlib.util.spec_from_file_location("modify_cogvideo_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = tiny_cogvideox_transformer()
    x, e, t, rope = inputs(1, 4, 6)
    with torch.no_grad():
        reference = run(model, x, e, t, rope)
        handle = module.set_block_sparse_attn_cogvideox(model, KEEP_ALL)
        assert handle.enabled
        assert rel_err(run(model, x, e, t, rope), reference) < 1e-5
        assert module.unset_block_sparse_attn_cogvideox(model) is True
        assert torch.equal(run(model, x, e, t, rope), reference)


def test_tiny_pipeline_is_deterministic_and_round_trips(tmp_path):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    pipe, same = build_tiny_cogvideox_pipeline(seed=0), build_tiny_cogvideox_pipeline(seed=0)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(same, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    cfg = pipe.scheduler.config
    assert isinstance(pipe.scheduler, CogVideoXDDIMScheduler)
    assert (cfg.prediction_type, cfg.rescale_betas_zero_snr, cfg.timestep_spacing) == ("v_prediction", True, "trailing")
    pipe.save_pretrained(tmp_path)
    loaded = CogVideoXPipeline.from_pretrained(tmp_path)
    kwargs = dict(
        prompt="a red ball",
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=2,
        max_sequence_length=16,
        output_type="np",
    )
    video = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 9, 32, 32, 3)
    again = loaded(**kwargs, generator=torch.Generator().manual_seed(0)).frames
    assert abs(video - again).max() < 1e-4
