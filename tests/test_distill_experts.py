"""TDM distillation of a two-expert pipeline (Wan2.2-T2V-A14B layout) and of a Wan2.2-TI2V-layout pipeline
(expand_timesteps) on tiny random models, on CPU: routing, training through trainer.train, resume, LoRA loading."""

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import blade.distill.trainer as trainer
from blade.api import load_blade_lora
from blade.config import BladeConfig
from blade.distill.experts import ExpertRouter, denoiser, expert_file_name, experts_of
from blade.distill.tdm import expanded_timesteps, wan_family
from blade.pipelines.loading import LORA_WEIGHT_NAME_2, LoraMismatchError
from blade.testing.tiny import (
    build_tiny_cogvideox_pipeline,
    build_tiny_wan22_a14b_pipeline,
    build_tiny_wan22_ti2v_pipeline,
    build_tiny_wan_pipeline,
    save_with_prompt_cache,
)

SMALL = ["--num_frames", "9", "--height", "16", "--width", "16", "--k_step", "2", "--rank", "4", "--lora_alpha", "4",
         "--seed", "3", "--train_batch_size", "2", "--mixed_precision", "no", "--cfg", "3.0", "--validation_steps",
         "0", "--report_to", "none", "--shift", "1.0"]
BOUNDARY = 875.0  # the tiny A14B pipeline's boundary_ratio 0.875 x 1000 train timesteps


def _out(transformer, x, t, e):
    return transformer(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)[0]


def test_router_uses_wanpipelines_boundary_and_splits_mixed_batches():
    pipe = build_tiny_wan22_a14b_pipeline(seed=0)
    router = denoiser(pipe)
    assert isinstance(router, ExpertRouter) and router.boundary == BOUNDARY
    assert [name for name, _ in experts_of(router)] == ["transformer", "transformer_2"]
    assert denoiser(build_tiny_wan_pipeline(seed=0)) is not None and experts_of(pipe.transformer)[0][0] == "transformer"
    # WanPipeline: `t >= boundary_timestep` -> transformer; exactly at the boundary too
    t = torch.tensor([999.0, BOUNDARY, 874.9, 1.0])
    assert router.high_noise(t).tolist() == [True, True, False, False]
    x, e = torch.randn(4, 16, 3, 2, 2), torch.randn(4, 8, 32)
    with torch.no_grad():
        mixed = router(hidden_states=x, timestep=t, encoder_hidden_states=e)[0]
        expected = torch.cat([_out(pipe.transformer, x[:2], t[:2], e[:2]),
                              _out(pipe.transformer_2, x[2:], t[2:], e[2:])])
        assert torch.allclose(mixed, expected, atol=1e-6)
        # a whole batch on one side is that expert's own call, bit for bit
        low = torch.full((4,), 500.0)
        assert torch.equal(router(hidden_states=x, timestep=low, encoder_hidden_states=e)[0],
                           _out(pipe.transformer_2, x, low, e))
    # the order of a mixed batch is restored (low-noise samples first here)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        shuffled = router(hidden_states=x[perm], timestep=t[perm], encoder_hidden_states=e[perm])[0]
    assert torch.allclose(shuffled, mixed[perm], atol=1e-6)


def test_expert_file_names_are_the_loaders():
    assert expert_file_name(trainer.LORA_WEIGHT_NAME, "transformer") == trainer.LORA_WEIGHT_NAME
    assert expert_file_name(trainer.LORA_WEIGHT_NAME, "transformer_2") == LORA_WEIGHT_NAME_2
    assert expert_file_name(trainer.FAKE_WEIGHT_NAME, "transformer_2") == "fake_lora_transformer_2.safetensors"


def test_ti2v_tdm_call_passes_wanpipelines_per_token_timesteps():
    """The TDM family's transformer call on a TI2V pipeline (expand_timesteps) gets the timestep tensor WanPipeline
    builds, and gives the same output as a direct call with it."""
    pipe = build_tiny_wan22_ti2v_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["hidden_states"].clone(), k["timestep"].clone(),
                                     k["encoder_hidden_states"].clone())), with_kwargs=True)
    try:
        with torch.no_grad():
            pipe("a red ball", num_frames=9, height=128, width=128, num_inference_steps=2, guidance_scale=1.0,
                 output_type="latent", max_sequence_length=16, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    x, pipe_timestep, e = seen[0]
    assert pipe_timestep.shape == (1, 3 * 4 * 4)  # one per token: 3 x 8 x 8 latent, patch 2
    t = pipe_timestep[:, 0]
    assert torch.equal(expanded_timesteps(t, x, tuple(pipe.transformer.config.patch_size)), pipe_timestep)

    family = wan_family(pipe)
    x2, t2, e2 = torch.cat([x, x.flip(-1)]), torch.cat([t, t]), torch.cat([e, e])
    with torch.no_grad():
        direct = _out(pipe.transformer, x2, pipe_timestep.expand(2, -1), e2)
        ours = family.call(pipe.transformer, x2, t2, e2)
    assert torch.equal(ours, direct)
    # a Wan2.1-layout pipeline keeps one timestep per sample
    assert family.call is not wan_family(build_tiny_wan_pipeline(seed=0)).call


@pytest.fixture(scope="module")
def a14b_assets(tmp_path_factory):
    return save_with_prompt_cache(build_tiny_wan22_a14b_pipeline(seed=0), tmp_path_factory.mktemp("experts"),
                                  ["a red ball moves left", "a dog runs", "a blue car on the road", "a small cat"])


def _args(assets, out, *extra):
    return trainer.parse_args("wan", ["--pretrained_model_name_or_path", str(assets / "pipe"), "--prompt_dir",
                                      str(assets / "prompts"), "--output_dir", str(out), *SMALL, *extra])


def _files_equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_two_expert_training_routes_resumes_and_loads(a14b_assets, tmp_path, monkeypatch):
    timesteps = {"transformer": [], "transformer_2": []}
    real = trainer.denoiser

    def recording_denoiser(pipe):  # the trainer's model, with a hook per expert recording what it is called at
        model = real(pipe)
        for name, expert in experts_of(model):
            expert.register_forward_pre_hook(
                lambda m, a, k, name=name: timesteps[name].append(k["timestep"].detach().clone()), with_kwargs=True)
        return model

    monkeypatch.setattr(trainer, "denoiser", recording_denoiser)
    full = tmp_path / "full"
    assert trainer.train(_args(a14b_assets, full, "--max_train_steps", "4", "--checkpointing_steps", "2"))[
        "global_step"] == 4
    # K = 2: anchors 999 (transformer) and 499 (transformer_2); tau spans both sides, so both serve fake/teacher
    high, low = torch.cat(timesteps["transformer"]), torch.cat(timesteps["transformer_2"])
    assert (high >= BOUNDARY).all() and (low < BOUNDARY).all()
    assert (high == 999).any() and (low == 499).any() and (high != 999).any() and (low != 499).any()
    # some tau batches held samples of both experts: the router split them (one sample per expert)
    assert any(len(t) == 1 for t in timesteps["transformer"]) and any(len(t) == 1 for t in timesteps["transformer_2"])

    # both experts' student LoRAs trained (B starts at 0), fake files per expert in the checkpoints
    first, second = full / trainer.LORA_WEIGHT_NAME, full / LORA_WEIGHT_NAME_2
    for file in (first, second):
        state = load_file(str(file))
        assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in state
        assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k), file
    assert not _files_equal(first, second)
    assert (full / "checkpoint-4" / "fake_lora_transformer_2.safetensors").is_file()

    # resume from checkpoint-2: bit-identical students and fakes of both experts
    monkeypatch.setattr(trainer, "denoiser", real)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    assert trainer.train(_args(a14b_assets, resumed, "--max_train_steps", "4", "--checkpointing_steps", "2",
                               "--resume_from_checkpoint", "latest"))["global_step"] == 4
    for name in ("pytorch_lora_weights.safetensors", LORA_WEIGHT_NAME_2, "checkpoint-4/fake_lora.safetensors",
                 "checkpoint-4/fake_lora_transformer_2.safetensors"):
        assert _files_equal(full / name, resumed / name), name

    # the folder loads into a stock two-expert pipeline and changes both experts
    pipe = build_tiny_wan22_a14b_pipeline(seed=0)
    x, e = torch.randn(1, 16, 3, 2, 2), torch.randn(1, 8, 32)
    probes = {"transformer": torch.tensor([950.0]), "transformer_2": torch.tensor([300.0])}
    with torch.no_grad():
        before = {n: _out(getattr(pipe, n), x, t, e) for n, t in probes.items()}
        load_blade_lora(pipe, full, fuse=False, asa=False)
        after = {n: _out(getattr(pipe, n), x, t, e) for n, t in probes.items()}
    for name in probes:
        assert not torch.allclose(before[name], after[name]), name

    # the folder records the routing it was trained with; a pipeline routing elsewhere is refused before loading
    assert BladeConfig.load(full).boundary_ratio == pipe.config.boundary_ratio
    other = build_tiny_wan22_a14b_pipeline(seed=0)
    other.register_to_config(boundary_ratio=0.5)
    reference = other.transformer.blocks[0].attn1.to_q.weight.detach().clone()
    with pytest.raises(LoraMismatchError, match="boundary_ratio"):
        load_blade_lora(other, full, fuse=True, asa=False)
    assert torch.equal(other.transformer.blocks[0].attn1.to_q.weight, reference)


def test_two_expert_training_with_asa_patches_both_experts(a14b_assets, tmp_path, monkeypatch):
    handles = []
    real = trainer.apply_sparsity

    def recording_apply_sparsity(*args, **kwargs):
        handle, config = real(*args, **kwargs)
        handles.append(handle)
        return handle, config

    monkeypatch.setattr(trainer, "apply_sparsity", recording_apply_sparsity)
    out = tmp_path / "asa"
    assert trainer.train(_args(a14b_assets, out, "--max_train_steps", "1", "--use_sparsity"))["global_step"] == 1
    assert handles[0].experts == ["transformer", "transformer_2"]
    assert (out / trainer.LORA_WEIGHT_NAME).is_file() and (out / LORA_WEIGHT_NAME_2).is_file()


def test_ti2v_training_step_runs_with_per_token_timesteps(tmp_path, monkeypatch):
    root = save_with_prompt_cache(build_tiny_wan22_ti2v_pipeline(seed=0), tmp_path / "ti2v",
                                  ["a red ball moves left", "a dog runs"])
    shapes = []
    real = trainer.denoiser

    def recording_denoiser(pipe):
        model = real(pipe)
        model.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["timestep"].shape)), with_kwargs=True)
        return model

    monkeypatch.setattr(trainer, "denoiser", recording_denoiser)
    args = trainer.parse_args("wan", ["--pretrained_model_name_or_path", str(root / "pipe"), "--prompt_dir",
                                      str(root / "prompts"), "--output_dir", str(root / "out"), *SMALL,
                                      "--height", "64", "--width", "64", "--max_train_steps", "1"])
    assert trainer.train(args)["global_step"] == 1
    assert shapes and set(shapes) == {(2, 3 * 2 * 2)}  # 64 px / 16 (VAE) / 2 (patch) = 2 x 2 tokens per frame
    assert (root / "out" / trainer.LORA_WEIGHT_NAME).is_file() and not (root / "out" / LORA_WEIGHT_NAME_2).exists()


@pytest.mark.parametrize("build", [build_tiny_wan_pipeline, build_tiny_wan22_ti2v_pipeline,
                                   build_tiny_cogvideox_pipeline])
def test_vae_scales_are_the_pipelines(build):
    """The trainer loads the teacher without its VAE; Family.vae_scales restores the compression the pipeline
    computes from its VAE (else WanPipeline falls back to 8x, wrong for Wan2.2 TI2V's 16x VAE)."""
    from blade.families import get_family
    from blade.pipelines.loading import family_of_transformer

    pipe = build()
    family = get_family(family_of_transformer(pipe.transformer))
    assert family.vae_scales(pipe.vae.config) == (pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal)


def test_guidance_scale_by_hand():
    from blade.distill.tdm import cfg_combine, guidance_scale

    t = torch.tensor([999.0, 875.0, 874.9, 100.0])
    assert guidance_scale(t, 4.0) == 4.0 and guidance_scale(t, 4.0, 4.0, BOUNDARY) == 4.0
    assert guidance_scale(t, 4.0, 3.0, BOUNDARY).tolist() == [4.0, 4.0, 3.0, 3.0]  # WanPipeline: t >= boundary high
    cond, uncond = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    mixed = cfg_combine(cond, uncond, guidance_scale(t, 4.0, 3.0, BOUNDARY))
    want = torch.stack([uncond[i] + s * (cond[i] - uncond[i]) for i, s in enumerate([4.0, 4.0, 3.0, 3.0])])
    assert torch.allclose(mixed, want)


def test_cfg_2_guides_the_low_noise_teacher_and_is_refused_for_one_expert(a14b_assets, tmp_path):
    """The teacher's CFG x0 of a mixed batch with cfg 4 / cfg_2 3 equals, per sample, the one-scale teacher at the
    scale of the sample's expert; --cfg_2 on a one-transformer folder is refused before the model loads."""
    from blade.distill.tdm import TDMConfig, TDMObjective

    pipe = build_tiny_wan22_a14b_pipeline(seed=0)
    router, family = denoiser(pipe), wan_family(pipe, shift=1.0)
    trainer.init_adapters(SimpleNamespace(num_processes=1), router,  # the teacher role switches the adapters off
                          SimpleNamespace(seed=0, rank=4, lora_alpha=4, lora_targets="attn"))
    x = torch.randn(2, 16, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([950, 300])  # one sample per expert
    emb, neg = torch.randn(2, 8, 32), torch.randn(2, 8, 32)

    def teacher_x0(cfg, cfg_2=None):
        config = TDMConfig(k_step=2, cfg=cfg, cfg_2=cfg_2, cfg_boundary=router.boundary)
        return TDMObjective(router, family, config).teacher_cfg_x0(x, t, emb, neg)[0]

    mixed = teacher_x0(4.0, 3.0)
    assert torch.allclose(mixed[0], teacher_x0(4.0)[0], atol=1e-6)
    assert torch.allclose(mixed[1], teacher_x0(3.0)[1], atol=1e-6)
    assert not torch.allclose(mixed[1], teacher_x0(4.0)[1], atol=1e-4)

    one = tmp_path / "one"
    build_tiny_wan_pipeline(seed=0).save_pretrained(one)
    args = trainer.parse_args("wan", ["--pretrained_model_name_or_path", str(one), "--prompt_dir",
                                      str(a14b_assets / "prompts"), "--output_dir", str(tmp_path / "o"), *SMALL,
                                      "--cfg_2", "3.0"])
    with pytest.raises(SystemExit, match="--cfg_2 needs --cfg_boundary"):
        trainer.train(args)
    with pytest.raises(SystemExit, match="drop --cfg_boundary"):  # two experts switch at their own boundary
        trainer.train(_args(a14b_assets, tmp_path / "b", "--cfg_2", "2.0", "--cfg_boundary", "500"))
    out = tmp_path / "two"
    assert trainer.train(_args(a14b_assets, out, "--max_train_steps", "2", "--cfg_2", "2.0"))["global_step"] == 2


def test_guidance_interval_on_one_transformer(tmp_path):
    """--cfg 1 --cfg_2 3.5 --cfg_boundary B on a one-transformer model: the generator's target is the unguided
    teacher at model timesteps >= B and the 3.5-guided one below (each sample of a mixed batch as the one-scale
    teacher at its scale); the trainer takes it, passes B to the objective and records it beside the LoRA; the flags'
    misuses are refused before the model loads."""
    from blade.distill.tdm import TDMConfig, TDMObjective

    pipe = build_tiny_wan_pipeline(seed=0)
    model, family = pipe.transformer, wan_family(pipe, shift=1.0)
    trainer.init_adapters(SimpleNamespace(num_processes=1), model,  # the teacher role switches the adapters off
                          SimpleNamespace(seed=0, rank=4, lora_alpha=4, lora_targets="attn"))
    x = torch.randn(2, 16, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([950, 300])
    emb, neg = torch.randn(2, 8, 32), torch.randn(2, 8, 32)

    def teacher_x0(cfg, cfg_2=None, boundary=None):
        config = TDMConfig(k_step=2, cfg=cfg, cfg_2=cfg_2, cfg_boundary=boundary)
        return TDMObjective(model, family, config).teacher_cfg_x0(x, t, emb, neg)[0]

    interval = teacher_x0(1.0, 3.5, 900.0)
    assert torch.allclose(interval[0], teacher_x0(1.0)[0], atol=1e-6)  # t 950 >= 900: unguided
    assert torch.allclose(interval[1], teacher_x0(3.5)[1], atol=1e-6)  # t 300: guided at 3.5
    assert not torch.allclose(interval[0], teacher_x0(3.5)[0], atol=1e-4)

    assets = save_with_prompt_cache(build_tiny_wan_pipeline(seed=0), tmp_path / "one",
                                    ["a red ball moves left", "a dog runs"])
    seen = {}
    real = trainer.TDMObjective

    def spy(transformer, family, config, *a, **k):
        seen["config"] = config
        return real(transformer, family, config, *a, **k)

    def args(out, *extra):
        return _args(assets, tmp_path / out, "--max_train_steps", "1", *extra)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "TDMObjective", spy)
        assert trainer.train(args("run", "--cfg", "1", "--cfg_2", "3.5", "--cfg_boundary", "900"))["global_step"] == 1
    assert (seen["config"].cfg, seen["config"].cfg_2, seen["config"].cfg_boundary) == (1.0, 3.5, 900.0)
    saved = BladeConfig.load(tmp_path / "run")
    assert (saved.cfg, saved.cfg_2, saved.cfg_boundary) == (1.0, 3.5, 900.0)
    for extra, message in ((["--cfg_boundary", "900"], "--cfg_boundary needs --cfg_2"),
                           (["--cfg_2", "3.5", "--cfg_boundary", "1000"], r"in \(0, 1000\)")):
        with pytest.raises(SystemExit, match=message):
            trainer.train(args("refused", *extra))
        assert not (tmp_path / "refused").exists()  # refused before anything is written


def test_a_checkpoint_missing_an_experts_file_is_named(a14b_assets, tmp_path, monkeypatch):
    """Refused before the model loads, naming the missing expert file."""
    out = tmp_path / "run"
    trainer.train(_args(a14b_assets, out, "--max_train_steps", "1", "--checkpointing_steps", "1"))
    (out / "checkpoint-1" / "fake_lora_transformer_2.safetensors").unlink()
    loaded = []
    monkeypatch.setattr(trainer, "prepare_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(trainer.CheckpointError, match="lacks fake_lora_transformer_2.safetensors"):
        trainer.train(_args(a14b_assets, tmp_path / "again", "--max_train_steps", "2", "--resume_from_checkpoint",
                            str(out / "checkpoint-1")))
    assert not loaded
