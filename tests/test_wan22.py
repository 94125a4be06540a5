"""Wan2.2 layouts on tiny random pipelines (CPU): the two-expert A14B pipeline (`transformer` + `transformer_2`,
boundary_ratio 0.875) and the TI2V-5B layout (Wan2.2 VAE: 48 latent channels, 16x16 spatial; `expand_timesteps`).

Every transformer is patched through the public API; keep-all ASA equals the stock pipeline; removal restores it.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from blade.api import asa_handle, disable_asa, enable_asa, generate
from blade.attention import ASAConfig
from blade.families import MODELS, model_of_pipeline, scaled_pool_size
from blade.models import PipelineASAHandle, default_pipeline_asa_config
from blade.models.wan import WanASAProcessor, apply_asa
from blade.testing import full_size
from blade.testing.tiny import (
    build_tiny_wan22_a14b_pipeline,
    build_tiny_wan22_ti2v_pipeline,
    build_tiny_wan_pipeline,
    tiny_wan_transformer,
)

ROOT = Path(__file__).resolve().parents[1]
KEEP_ALL = ASAConfig(block_size=16, threshold=1.0, min_keep=1.0, max_keep=1.0, pool_size=None)
SPARSE = ASAConfig(block_size=16, threshold=0.5, min_keep=0.2, max_keep=0.5, pool_size=8, seed=0)
EXPERTS = ("transformer", "transformer_2")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _latents(pipe, size: int, steps: int = 4, seed: int = 0) -> torch.Tensor:
    """The pipeline's final latents for a fixed prompt/seed (no VAE: exact comparisons)."""
    with torch.no_grad():
        return pipe(
            "a red ball moves left", num_frames=9, height=size, width=size, num_inference_steps=steps,
            guidance_scale=1.0, output_type="latent", max_sequence_length=16,
            generator=torch.Generator().manual_seed(seed),
        ).frames  # fmt: skip


@pytest.fixture(scope="module")
def a14b():
    pipe = build_tiny_wan22_a14b_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ti2v():
    pipe = build_tiny_wan22_ti2v_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _calls_per_expert(pipe) -> tuple[dict, list]:
    calls: dict[str, int] = {}
    hooks = [
        getattr(pipe, name).register_forward_pre_hook(
            lambda m, a, k, name=name: calls.__setitem__(name, calls.get(name, 0) + 1), with_kwargs=True
        )
        for name in EXPERTS
        if getattr(pipe, name, None) is not None
    ]
    return calls, hooks


def test_two_expert_pipeline_patches_both_and_keep_all_equals_stock(a14b):
    assert a14b.config.boundary_ratio == 0.875 and a14b.transformer_2 is not None
    reference = _latents(a14b, 64)
    calls, hooks = _calls_per_expert(a14b)
    try:
        handle = enable_asa(a14b, KEEP_ALL)
        assert isinstance(handle, PipelineASAHandle) and asa_handle(a14b) is handle
        assert handle.experts == list(EXPERTS) and handle.config == KEEP_ALL
        for name in EXPERTS:
            processors = getattr(a14b, name).attn_processors
            assert sum(isinstance(p, WanASAProcessor) for p in processors.values()) == 2  # both attn1
            assert handle[name].asa is handle.asa  # one ASA module (stats) for the pipeline
        patched = _latents(a14b, 64)
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"transformer": 2, "transformer_2": 2}  # 4 steps split at t = 875
    assert rel_err(patched, reference) < 1e-5
    stats = handle.stats()
    assert stats["calls"] == 4 * 2 and stats["sparsity"] == 0.0  # 4 steps x 2 layers, over both experts
    assert handle.step == 3  # one step count over both experts

    disable_asa(a14b)
    assert asa_handle(a14b) is None and handle.removed
    for name in EXPERTS:
        assert all(type(p) is WanAttnProcessor for p in getattr(a14b, name).attn_processors.values())
    assert torch.equal(_latents(a14b, 64), reference)


def test_two_expert_sparse_runs_and_dense_steps_count_over_the_pipeline(a14b):
    reference = _latents(a14b, 64)
    handle = enable_asa(a14b, SPARSE, dense_steps=2)  # steps 0-1 dense (transformer), 2-3 sparse (transformer_2)
    try:
        _latents(a14b, 64)
        stats = handle.stats()
        assert stats["calls"] == 8 and stats["total_blocks"] > 0 and 0.0 < stats["sparsity"] < 1.0
        handle.mask_reuse_steps = 2  # each expert keeps its own layers' masks
        assert all(h.mask_reuse_steps == 2 for h in handle.handles.values())
        handle.reset()
        _latents(a14b, 64)
        assert handle.stats()["calls"] == 8
        handle.enabled = False
        assert all(not h.enabled for h in handle.handles.values())
        assert torch.equal(_latents(a14b, 64), reference)
    finally:
        disable_asa(a14b)


def test_two_expert_early_context_switches_the_shared_config_on_both_experts(a14b):
    """An early context over all 4 steps (steps 0-1 on `transformer`, 2-3 on `transformer_2`) gives exactly the
    latents of the early config enabled throughout, so both experts switch; over none, the main config's."""
    from blade.attention import EarlyContext

    early = EarlyContext(steps=4, max_keep=0.25, pool_size=4)
    try:
        enable_asa(a14b, early.config_for(SPARSE))
        reference_early = _latents(a14b, 64)
        enable_asa(a14b, SPARSE)
        reference_main = _latents(a14b, 64)
        handle = enable_asa(a14b, SPARSE, early_context=early)
        assert all(h.early_context == early for h in handle.handles.values())
        assert torch.equal(_latents(a14b, 64), reference_early)
        assert handle.config == SPARSE
        handle.early_context = None
        handle.reset()
        assert torch.equal(_latents(a14b, 64), reference_main)
        assert not torch.equal(reference_main, reference_early)
    finally:
        disable_asa(a14b)


def test_ti2v_pipeline_keep_all_equals_stock_and_removal_restores(ti2v):
    assert ti2v.config.expand_timesteps and ti2v.vae.config.z_dim == 48 and ti2v.vae_scale_factor_spatial == 16
    reference = _latents(ti2v, 128)  # 3 x 8 x 8 latent, 3 x 4 x 4 = 48 tokens (3 blocks of 16)
    assert reference.shape == (1, 48, 3, 8, 8)
    handle = enable_asa(ti2v, KEEP_ALL)
    assert not isinstance(handle, PipelineASAHandle)  # one transformer: its ASAHandle
    patched = _latents(ti2v, 128)
    assert rel_err(patched, reference) < 1e-5
    assert handle.stats()["calls"] == 4 * 2 and handle.stats()["total_blocks"] > 0
    disable_asa(ti2v)
    assert torch.equal(_latents(ti2v, 128), reference)


def test_ti2v_per_token_timesteps_follow_the_token_order():
    """Per-token timesteps that differ (the image-conditioned first frame of TI2V) must be permuted with the tokens:
    keep-all ASA then equals stock exactly, and the output is in raster order."""
    model = tiny_wan_transformer(in_channels=48, out_channels=48)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 48, 3, 8, 12, generator=g)  # 3 x 4 x 6 = 72 tokens
    e = torch.randn(2, 6, 32, generator=g)
    t = torch.rand(2, 72, generator=g) * 1000  # a different timestep for every token
    with torch.no_grad():
        reference = model(x, t, e, return_dict=False)[0]
        handle = apply_asa(model, KEEP_ALL)
        positional = model(x, t, e, return_dict=False)[0]
        keyword = model(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]
        assert rel_err(positional, reference) < 1e-5 and rel_err(keyword, reference) < 1e-5
        assert handle.stats()["total_blocks"] > 0
        with pytest.raises(ValueError, match="one timestep per video token"):
            model(x, t[:, :10], e, return_dict=False)
        handle.remove()
        assert torch.equal(model(x, t, e, return_dict=False)[0], reference)


def test_generate_times_both_experts(a14b):
    enable_asa(a14b, KEEP_ALL)
    try:
        frames, info = generate(a14b, "a red ball", seed=0, steps=4, guidance_scale=1.0, num_frames=9, height=64,
                                width=64, max_sequence_length=16)  # fmt: skip
    finally:
        disable_asa(a14b)
    assert frames.shape == (9, 64, 64, 3)
    assert info["transformer_calls"] == 4 and info["sparsity"] == 0.0 and info["asa_stats"]["calls"] == 8


def test_modify_script_patches_every_expert_of_a_pipeline(a14b):
    spec = importlib.util.spec_from_file_location("modify_wan_wan22", ROOT / "wanx/train/modify_wan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reference = _latents(a14b, 64, steps=2)
    handle = module.set_adaptive_block_sparse_attn_wanx(a14b, KEEP_ALL.to_dict())
    assert set(handle.handles) == set(EXPERTS)
    for name in EXPERTS:
        assert all(isinstance(getattr(a14b, name).blocks[i].attn1.processor, WanASAProcessor) for i in range(2))
    assert rel_err(_latents(a14b, 64, steps=2), reference) < 1e-5
    assert module.unset_adaptive_block_sparse_attn_wanx(a14b) is True
    assert module.unset_adaptive_block_sparse_attn_wanx(a14b) is False
    assert torch.equal(_latents(a14b, 64, steps=2), reference)


def _fake_pipe(model: str):
    """A stand-in pipeline with the published transformers' configs (no weights): enough for the registry."""
    return SimpleNamespace(**{name: SimpleNamespace(config=full_size.load_config(model, name))
                              for name in full_size.experts(model)})  # fmt: skip


def test_registry_recognises_the_published_models_and_scales_the_pool_window():
    for name in ("wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b", "wan2.1-t2v-1.3b"):
        assert model_of_pipeline(_fake_pipe(name)) is MODELS[name]
    assert model_of_pipeline(SimpleNamespace()) is None
    tokens = {name: MODELS[name].default_tokens() for name in MODELS if MODELS[name].family == "wan"}
    assert tokens == {"wan2.1-t2v-1.3b": 32_760, "wan2.1-t2v-14b": 75_600, "wan2.2-t2v-a14b": 75_600,
                      "wan2.2-ti2v-5b": 27_280}  # fmt: skip
    pools = {name: default_pipeline_asa_config(_fake_pipe(name)).pool_size for name in tokens}
    assert pools == {"wan2.1-t2v-1.3b": 30, "wan2.1-t2v-14b": 69, "wan2.2-t2v-a14b": 69, "wan2.2-ti2v-5b": 25}
    config = default_pipeline_asa_config(_fake_pipe("wan2.2-t2v-a14b"))
    assert (config.block_size, config.threshold, config.min_keep, config.max_keep) == (128, 0.95, 0.05, 0.17)
    assert scaled_pool_size(1) == 1


def test_inference_script_runs_a_two_expert_folder_end_to_end(a14b, tmp_path):
    folder = tmp_path / "wan22_a14b"
    a14b.save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["boundary_ratio"] == 0.875
    out_dir = tmp_path / "out"
    args = ["--model_path", str(folder), "--lora_path", "none", "--prompt", "a red ball moves left", "--num_frames",
            "9", "--height", "64", "--width", "64", "--steps", "4", "--attention", "asa", "--gpu", "-1",
            "--output_dir", str(out_dir)]  # fmt: skip
    result = subprocess.run([sys.executable, str(ROOT / "wanx/train/inference.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (video,) = sorted(out_dir.glob("*.mp4"))
    sidecar = json.loads(video.with_suffix(".json").read_text())
    assert sidecar["attention"] == "asa" and sidecar["transformer_calls"] == 4
    assert sidecar["asa_stats"]["calls"] == 4 * 2  # both experts' self-attention went through ASA
    assert (sidecar["num_frames"], sidecar["height"], sidecar["width"]) == (9, 64, 64)


def test_inference_offload_idle_expert_gives_the_same_video_and_is_refused_for_one_expert(a14b, tmp_path, capsys):
    """--offload_idle_expert (load on the CPU, one expert resident at a time) writes the same video as the run with
    both experts resident; a one-expert folder is refused before any weight is loaded."""
    from blade.cli import ScriptSpec, main

    folder = tmp_path / "wan22_a14b"
    a14b.save_pretrained(folder)
    spec = ScriptSpec(family="wan", description="test")
    common = ["--model_path", str(folder), "--lora_path", "none", "--prompt", "a red ball moves left", "--num_frames",
              "9", "--height", "64", "--width", "64", "--steps", "4", "--attention", "asa", "--gpu", "-1"]  # fmt: skip
    assert main(spec, [*common, "--output_dir", str(tmp_path / "resident")]) == 0
    assert main(spec, [*common, "--output_dir", str(tmp_path / "offload"), "--offload_idle_expert"]) == 0
    (resident,), (offload,) = (sorted((tmp_path / d).glob("*.mp4")) for d in ("resident", "offload"))
    assert json.loads(offload.with_suffix(".json").read_text())["offload_idle_expert"] is True
    import imageio.v3 as iio

    np.testing.assert_array_equal(iio.imread(offload), iio.imread(resident))

    one = tmp_path / "one_expert"
    build_tiny_wan_pipeline(seed=0).save_pretrained(one)
    capsys.readouterr()
    argv = ["--model_path", str(one), "--prompt", "a red ball", "--offload_idle_expert", "--gpu", "-1",
            "--output_dir", str(tmp_path / "refused")]  # fmt: skip
    assert main(spec, argv) == 2
    assert "has one denoiser (transformer), nothing to offload" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_inference_script_size_rules_use_the_wan22_vae(ti2v, tmp_path, capsys):
    from blade.cli import ScriptSpec, main
    from blade.pipelines.loading import video_size_rules

    folder = tmp_path / "ti2v"
    ti2v.save_pretrained(folder)
    assert video_size_rules("wan", folder) == (32, 32, 4)  # VAE 16x16 x patch 2
    spec = ScriptSpec(family="wan", description="test")
    argv = ["--model_path", str(folder), "--prompt", "a red ball", "--num_frames", "9", "--height", "48", "--width",
            "64", "--output_dir", str(tmp_path / "out"), "--gpu", "-1"]  # fmt: skip
    assert main(spec, argv) == 2
    assert "--height 48 must be a positive multiple of 32" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _one_step_lora(seed: int) -> dict:
    """A LoRA on every attention projection of a tiny Wan transformer after one Adam step (its PEFT state dict)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = tiny_wan_transformer(seed=0)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    out = model(torch.randn(1, 16, 3, 8, 8), torch.tensor([500.0]), torch.randn(1, 8, 32), return_dict=False)[0]
    out.pow(2).mean().backward()
    optimizer.step()
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def test_two_expert_student_lora_loads_one_lora_per_expert_and_routes_anchors(tmp_path):
    from diffusers import WanPipeline

    from blade.api import load_blade_lora
    from blade.distill.sampler import BladeStudentScheduler
    from blade.pipelines.loading import LORA_WEIGHT_NAME_2, LoraMismatchError
    from blade.testing.tiny import build_tiny_wan_pipeline

    high, low = _one_step_lora(1), _one_step_lora(2)
    folder = tmp_path / "student"
    WanPipeline.save_lora_weights(folder, transformer_lora_layers=high)
    WanPipeline.save_lora_weights(folder, transformer_lora_layers=low, weight_name=LORA_WEIGHT_NAME_2)
    anchors = [999, 900, 600, 300]  # boundary 875: two anchors for `transformer`, two for `transformer_2`
    (folder / "blade_config.json").write_text(json.dumps({
        "family": "wan", "k_step": 4, "anchors": anchors, "eta": 0.9, "prediction_type": "flow", "shift": 1.0,
        "asa": KEEP_ALL.to_dict(), "dense_steps": 0, "lora_rank": 4, "lora_alpha": 4,
    }))  # fmt: skip

    pipe = build_tiny_wan22_a14b_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    base = {name: getattr(pipe, name).blocks[0].attn1.to_q.weight.detach().clone() for name in EXPERTS}
    config = load_blade_lora(pipe, folder)
    assert isinstance(pipe.scheduler, BladeStudentScheduler) and config.k_step == 4
    assert isinstance(asa_handle(pipe), PipelineASAHandle)  # the LoRA's ASA config on both experts
    for name, lora in (("transformer", high), ("transformer_2", low)):
        delta = getattr(pipe, name).blocks[0].attn1.to_q.weight - base[name]
        expected = lora["blocks.0.attn1.to_q.lora_B.weight"] @ lora["blocks.0.attn1.to_q.lora_A.weight"]
        assert torch.allclose(delta, expected, atol=1e-6), name  # each expert got its own LoRA, fused

    calls, hooks = _calls_per_expert(pipe)
    seen: list[float] = []
    hooks.append(pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(float(k["timestep"].max())), with_kwargs=True))  # fmt: skip
    try:
        frames, info = generate(pipe, "a red ball", seed=0, steps=4, guidance_scale=1.0, num_frames=9, height=64,
                                width=64, max_sequence_length=16)  # fmt: skip
    finally:
        for h in hooks:
            h.remove()
    assert calls == {"transformer": 2, "transformer_2": 2} and seen == [999.0, 900.0]
    assert frames.shape == (9, 64, 64, 3) and info["asa_stats"]["calls"] == 8

    with pytest.raises(LoraMismatchError, match="two experts"):
        load_blade_lora(build_tiny_wan_pipeline(seed=0), folder)


def test_ti2v_student_sampler_runs_with_expanded_timesteps(ti2v):
    from blade.distill.sampler import BladeStudentScheduler

    stock = ti2v.scheduler
    ti2v.scheduler = BladeStudentScheduler(num_anchors=2, eta=0.9, prediction_type="flow")
    seen: list[tuple] = []
    hook = ti2v.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(tuple(k["timestep"].shape)), with_kwargs=True)  # fmt: skip
    try:
        enable_asa(ti2v, SPARSE)
        frames, info = generate(ti2v, "a red ball", seed=0, steps=2, guidance_scale=1.0, num_frames=9, height=128,
                                width=128, max_sequence_length=16)  # fmt: skip
    finally:
        hook.remove()
        disable_asa(ti2v)
        ti2v.scheduler = stock
    assert seen == [(1, 48), (1, 48)]  # one timestep per token (expand_timesteps)
    assert frames.shape == (9, 128, 128, 3) and bool(torch.isfinite(torch.from_numpy(frames)).all())
    assert info["asa_stats"]["total_blocks"] > 0


def test_training_uses_the_asa_config_enable_asa_would_for_the_same_pipeline():
    """One default for training and inference: a published model's student trains with the registry's ASA config
    (pool window scaled with its tokens: 69 for Wan2.1-14B), an unrecognised one (TinyWorld, tiny tests) with the
    family's (30); the trainer's flags override either."""
    from blade.distill.trainer import training_asa_config

    pipe = _fake_pipe("wan2.1-t2v-14b")
    assert training_asa_config("wan", pipe) == default_pipeline_asa_config(pipe)
    assert training_asa_config("wan", pipe).pool_size == 69
    assert training_asa_config("wan", SimpleNamespace()).pool_size == 30
    assert training_asa_config("wan").pool_size == 30
    overridden = training_asa_config("wan", pipe, max_keep=0.25, block_size=64, pool_size=10)
    assert (overridden.max_keep, overridden.min_keep) == (0.25, 0.05)
    assert (overridden.block_size, overridden.pool_size) == (64, 10)
