"""Full-size configs and the random-weight pipeline builder (CPU, shrunk depth)."""

import json

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import T5Config, UMT5Config

from blade.testing import full_size

# Hand-copied from shared/reference/full_size_configs.md (the published component configs).
PUBLISHED = {
    ("wan", "transformer"): dict(
        patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
    ),
    ("wan", "vae"): dict(
        base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0, scale_factor_spatial=8, scale_factor_temporal=4,
    ),
    ("wan", "text_encoder"): dict(
        d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=256384,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
    ),
    ("wan", "scheduler"): dict(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000,
        solver_order=2,
    ),
    ("cogvideox", "transformer"): dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=42, patch_size=2,
        text_embed_dim=4096, time_embed_dim=512, max_text_seq_length=226, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False, sample_frames=49, sample_height=60, sample_width=90,
        attention_bias=True, norm_eps=1e-5, activation_fn="gelu-approximate", spatial_interpolation_scale=1.875,
        temporal_interpolation_scale=1.0, temporal_compression_ratio=4,
    ),
    ("cogvideox", "vae"): dict(
        block_out_channels=[128, 256, 256, 512], latent_channels=16, layers_per_block=3, norm_num_groups=32,
        temporal_compression_ratio=4, scaling_factor=0.7,
    ),
    ("cogvideox", "text_encoder"): dict(
        d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
        feed_forward_proj="gated-gelu",
    ),
    ("cogvideox", "scheduler"): dict(
        prediction_type="v_prediction", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        rescale_betas_zero_snr=True, timestep_spacing="trailing", snr_shift_scale=1.0, num_train_timesteps=1000,
    ),
}  # fmt: skip

CLASSES = {
    ("wan", "transformer"): WanTransformer3DModel,
    ("wan", "vae"): AutoencoderKLWan,
    ("wan", "text_encoder"): UMT5Config,
    ("wan", "scheduler"): UniPCMultistepScheduler,
    ("cogvideox", "transformer"): CogVideoXTransformer3DModel,
    ("cogvideox", "vae"): AutoencoderKLCogVideoX,
    ("cogvideox", "text_encoder"): T5Config,
    ("cogvideox", "scheduler"): CogVideoXDDIMScheduler,
}

# A text encoder small enough for a CPU test; d_model stays 4096 (the transformers' text_dim).
SMALL_TEXT_ENCODER = dict(num_layers=1, d_ff=64, num_heads=2, vocab_size=1000)


def _normalise(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("family, component", sorted(PUBLISHED))
def test_config_loads_into_its_class_with_published_values(family, component):
    cls = CLASSES[(family, component)]
    raw = full_size.load_config(family, component)
    if component == "text_encoder":
        config = cls.from_dict(raw).to_dict()
    else:
        assert raw["_class_name"] == cls.__name__
        with init_empty_weights():  # build the real class (parameters on meta: no memory)
            config = dict(cls.from_config(raw).config)
    for key, expected in PUBLISHED[(family, component)].items():
        assert _normalise(config[key]) == expected, (family, component, key)


def test_config_files_are_plain_json_per_component():
    for family in full_size.FAMILY_DIRS:
        for component in full_size.COMPONENTS:
            path = full_size.config_path(family, component)
            assert path.name == "config.json" and path.parent.name == component
            json.loads(path.read_text())  # valid JSON
    with pytest.raises(ValueError, match="Unknown family"):
        full_size.load_config("sd3", "vae")


def test_wan_transformer_param_count_matches_the_published_1_3b_model():
    # Counted on the meta device: no memory. Wan2.1-T2V-1.3B has ~1.42e9 parameters (1.3B-class).
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(full_size.load_config("wan", "transformer"))
    assert 1.35e9 < sum(p.numel() for p in model.parameters()) < 1.5e9


def test_random_weights_are_small_nonzero_normals_and_keep_fp32_modules():
    model = full_size.build_transformer("wan", "cpu", torch.bfloat16, num_layers=1)
    weight = model.blocks[0].attn1.to_q.weight
    assert weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
    assert (weight != 0).float().mean() > 0.99
    assert abs(weight.float().std().item() - full_size.INIT_STD) < 0.002
    # diffusers keeps these in float32 when loading with torch_dtype=bf16; so do we
    assert model.scale_shift_table.dtype == torch.float32
    assert model.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    # RoPE tables are buffers computed at construction: real values, not meta, not random
    assert not model.rope.freqs_cos.is_meta and model.rope.freqs_cos[0, 0].item() == pytest.approx(1.0)


def test_text_encoder_keeps_tied_embeddings_tied():
    encoder = full_size.build_text_encoder("wan", "cpu", torch.float32, overrides=SMALL_TEXT_ENCODER)
    assert encoder.encoder.embed_tokens.weight is encoder.shared.weight
    assert encoder.config.d_model == 4096


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_tokenizer_pads_to_the_real_max_length(family):
    tokenizer = full_size.build_tokenizer(family)
    max_len = full_size.MAX_SEQUENCE_LENGTH[family]
    ids = tokenizer(["a cat", "a dog on the moon"], padding="max_length", max_length=max_len, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")  # fmt: skip
    assert ids.input_ids.shape == (2, max_len) and tokenizer.model_max_length == max_len
    assert ids.attention_mask.sum(1).tolist() == [3, 6]  # words + </s>
    assert ids.input_ids[0, 2].item() == 1 and ids.input_ids[0, 3].item() == 0  # eos then pad, as T5


@pytest.mark.parametrize(
    "family, pipeline_cls",
    [("wan", WanPipeline), pytest.param("cogvideox", CogVideoXPipeline, marks=pytest.mark.slow)],  # ~15 s on CPU
)
def test_build_full_size_pipeline_runs_on_cpu_with_one_layer(family, pipeline_cls):
    pipe = full_size.build_full_size_pipeline(
        family, "cpu", torch.float32, num_layers=1, text_encoder_overrides=SMALL_TEXT_ENCODER
    )
    assert isinstance(pipe, pipeline_cls)
    assert pipe.transformer.config.num_layers == 1
    assert pipe.text_encoder.config.vocab_size == SMALL_TEXT_ENCODER["vocab_size"]
    width = 1536 if family == "wan" else 3072  # full width is kept
    assert pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim == width
    pipe.set_progress_bar_config(disable=True)
    video = pipe(
        "a cat", height=16, width=16, num_frames=1, num_inference_steps=1, guidance_scale=5.0, output_type="np",
        max_sequence_length=16, generator=torch.Generator().manual_seed(0),
    ).frames  # fmt: skip
    assert video.shape == (1, 1, 16, 16, 3) and torch.isfinite(torch.from_numpy(video)).all()


def test_default_vae_dtypes_follow_the_model_cards():
    assert full_size.default_vae_dtype("wan", torch.bfloat16) == torch.float32
    assert full_size.default_vae_dtype("cogvideox", torch.bfloat16) == torch.bfloat16


# Issue 19's table (the models' published architectures); other fields as Wan2.1-1.3B (blade/configs/NOTES.md).
NEW_MODELS = {
    "wan2.1-t2v-14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
                           in_channels=16, out_channels=16),
    "wan2.2-t2v-a14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40,
                            in_channels=16, out_channels=16),
    "wan2.2-ti2v-5b": dict(num_attention_heads=24, attention_head_dim=128, ffn_dim=14336, num_layers=30,
                           in_channels=48, out_channels=48),
}  # fmt: skip


@pytest.mark.parametrize("model", sorted(NEW_MODELS))
def test_new_wan_configs_hold_the_published_architectures(model):
    experts = full_size.experts(model)
    assert experts == (("transformer", "transformer_2") if model == "wan2.2-t2v-a14b" else ("transformer",))
    for expert in experts:
        with init_empty_weights():
            transformer = WanTransformer3DModel.from_config(full_size.load_config(model, expert))
        for key, value in NEW_MODELS[model].items():
            assert transformer.config[key] == value, (model, expert, key)
        params = sum(p.numel() for p in transformer.parameters())
        assert (14.0e9 < params < 14.5e9) if "14b" in model else (4.9e9 < params < 5.1e9), params
    with init_empty_weights():
        vae = AutoencoderKLWan.from_config(full_size.load_config(model, "vae"))
    z, spatial = (48, 16) if model == "wan2.2-ti2v-5b" else (16, 8)
    assert (vae.config.z_dim, vae.config.scale_factor_spatial, vae.config.scale_factor_temporal) == (z, spatial, 4)
    assert len(vae.config.latents_mean) == len(vae.config.latents_std) == z
    assert full_size.pipeline_config(model) == {
        "boundary_ratio": 0.875 if model == "wan2.2-t2v-a14b" else None,
        "expand_timesteps": model == "wan2.2-ti2v-5b",
    }
    assert UMT5Config.from_dict(full_size.load_config(model, "text_encoder")).d_model == 4096
    scheduler = full_size.build_scheduler(model)
    assert scheduler.config.flow_shift == (5.0 if model == "wan2.2-ti2v-5b" else 3.0)
    with pytest.raises(ValueError, match="Unknown component"):
        full_size.config_path(model, "transformer_3")


def test_ti2v_transformer_builds_at_one_layer_with_the_published_width():
    model = full_size.build_transformer("wan2.2-ti2v-5b", "cpu", torch.bfloat16, num_layers=1)
    assert model.config.num_layers == 1 and model.config.in_channels == 48
    assert model.blocks[0].attn1.to_q.weight.shape == (3072, 3072)
    x = torch.randn(1, 48, 2, 4, 4, dtype=torch.bfloat16)
    out = model(x, torch.full((1, 8), 500.0), torch.randn(1, 4, 4096, dtype=torch.bfloat16), return_dict=False)[0]
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


@pytest.mark.slow  # ~0.8B parameters of random bf16 weights
def test_a14b_pipeline_builds_both_experts_at_one_layer():
    pipe = full_size.build_full_size_pipeline(
        "wan2.2-t2v-a14b", "cpu", torch.bfloat16, num_layers=1, text_encoder_overrides=SMALL_TEXT_ENCODER
    )
    assert isinstance(pipe, WanPipeline) and pipe.config.boundary_ratio == 0.875
    assert pipe.transformer.config.num_layers == pipe.transformer_2.config.num_layers == 1
    a, b = pipe.transformer.blocks[0].attn1.to_q.weight, pipe.transformer_2.blocks[0].attn1.to_q.weight
    assert a.shape == b.shape == (5120, 5120) and not torch.equal(a, b)  # two experts, own weights
