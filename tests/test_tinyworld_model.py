"""TinyWorld model builders and training loop (CPU, toy sizes).

References: diffusers' stock `WanPipeline` prompt encoding and UniPC flow sampler, hand-derived token ids, and an
uninterrupted training run as the reference for resume.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from blade.tinyworld import model as tw
from blade.tinyworld import train
from blade.tinyworld.world import all_words, parse_prompt

PROMPT = "a small red circle moves left and a large blue square stays still on a gray background"


def _toy_pipeline():
    return tw.build_pipeline(
        vae=tw.build_vae(**train.TOY_VAE), transformer=tw.build_transformer(**train.TOY_TRANSFORMER)
    )


def test_tokenizer_ids_and_roundtrip(tmp_path):
    tok = tw.build_tokenizer()
    vocab = tok.get_vocab()
    assert (vocab["<pad>"], vocab["</s>"], vocab["<unk>"]) == (0, 1, 2)
    assert set(all_words()) <= set(vocab) and len(vocab) <= tw.TEXT_VOCAB_SIZE
    expected = [vocab[w] for w in PROMPT.split()] + [1]
    assert tok(PROMPT).input_ids == expected
    assert tok(PROMPT.upper()).input_ids == expected  # lower-cased
    assert tok("").input_ids == [1]  # the negative prompt WanPipeline uses: just </s>
    assert tok("a purple circle").input_ids == [vocab["a"], 2, vocab["circle"], 1]
    ids, mask = tw.encode_prompt_tokens(tok, [PROMPT, ""])
    assert ids.shape == (2, 32) and mask.sum(1).tolist() == [len(expected), 1]
    assert ids[1, 1:].eq(0).all()  # right padding with <pad> = 0

    tok.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert loaded(PROMPT).input_ids == expected and loaded.pad_token_id == 0


def test_text_embeddings_match_wan_pipeline():
    """Training's prompt embeddings equal what WanPipeline feeds the transformer (padding rows zeroed)."""
    pipe = _toy_pipeline()
    prompts = [PROMPT, ""]
    ids, mask = tw.encode_prompt_tokens(pipe.tokenizer, prompts, 32)
    with torch.no_grad():  # as inside WanPipeline.__call__
        ref, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=32, device="cpu")
        ours = tw.text_embeddings(pipe.text_encoder, ids, mask)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert ours[1, 1:].abs().sum() == 0 and ours[1, 0].abs().sum() > 0


def test_training_noise_matches_sampler_convention():
    """x_t = (1-s) x0 + s eps with timestep 1000 s and target eps - x0 is what UniPC(flow) inverts to x0."""
    sched = tw.build_scheduler()
    sched.set_timesteps(50)
    # The sampler feeds the transformer int(1000 s) (int64 timesteps); training uses the continuous 1000 s.
    gap = sched.sigmas[:-1] * 1000 - sched.timesteps.float()
    assert gap.min() >= -1e-3 and gap.max() < 1
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 5, 4, 4, generator=g), torch.randn(2, 16, 5, 4, 4, generator=g)
    i = 20
    s = sched.sigmas[i]
    x_t = (1 - s) * x0 + s * eps
    sched._init_step_index(sched.timesteps[i])
    x0_pred = sched.convert_model_output(eps - x0, sample=x_t)
    torch.testing.assert_close(x0_pred, x0, rtol=1e-5, atol=1e-5)


def test_flow_sigma_distribution():
    # Both mixture parts have median u = 0.5, so the median of s is shift(0.5) = 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    s = train.sample_flow_sigmas(40000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert 0 < s.min() and s.max() < 1
    assert abs(s.median().item() - 0.75) < 0.01
    assert (s > 0.5).float().mean() > 0.75  # mass at mid/high noise


@pytest.mark.parametrize("share, expected", [(0.0, 1), (1.0, 2)])
def test_two_object_share_sets_the_object_count(share, expected):
    rng = np.random.default_rng(0)
    _, prompts = train.sample_videos(rng, 6, train.TOY_VIDEO, torch.device("cpu"), two_object_share=share)
    assert [len(parse_prompt(p).objects) for p in prompts] == [expected] * 6


def test_two_object_share_outside_0_1_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["teacher", "--out", "x", "--two-object-share", "1.5"])
    assert "--two-object-share must be in [0, 1]" in capsys.readouterr().err


def test_two_object_share_mixes_at_the_requested_rate():
    rng = np.random.default_rng(1)
    _, prompts = train.sample_videos(rng, 200, {**train.TOY_VIDEO, "num_frames": 1}, torch.device("cpu"), 0.8)
    share = sum(" and " in p for p in prompts) / 200
    assert abs(share - 0.8) < 0.08


def test_latent_stats_normalize():
    vae = tw.build_vae(**train.TOY_VAE)
    rng = np.random.default_rng(0)
    clips = [train.sample_videos(rng, 2, train.TOY_VIDEO, torch.device("cpu"))[0] for _ in range(2)]
    assert clips[0].shape == (2, 3, 5, 32, 32) and clips[0].min() >= -1 and clips[0].max() <= 1
    with torch.no_grad():
        mean, std = train.latent_stats(vae, clips)
        vae.register_to_config(latents_mean=mean, latents_std=std)
        z = torch.cat([vae.encode(c).latent_dist.mean for c in clips]).double()
        zn = train.normalize_latents(z, vae)
    ref_mean = z.transpose(0, 1).flatten(1).mean(1)
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), ref_mean, rtol=1e-4, atol=1e-5)
    per_channel = zn.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(16, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(per_channel.std(1), torch.ones(16, dtype=torch.float64), rtol=0, atol=1e-3)


def test_load_pipeline_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="No TinyWorld pipeline"):
        tw.load_pipeline(tmp_path / "nope")
    assert tw.bundled_pipeline_path().parts[-3:] == ("assets", "tinyworld", "pipeline")


def _run(*argv):
    train.main([*argv, "--toy", "--minutes", "10", "--log-every-s", "1000"])


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_toy_training_resume_and_export(tmp_path):
    ref, split = tmp_path / "ref", tmp_path / "split"
    # VAE: 2 uninterrupted steps vs 1 step + resume to 2.
    _run("vae", "--out", str(ref), "--max-steps", "2")
    _run("vae", "--out", str(split), "--max-steps", "1")
    assert _ckpt(split / "ckpt_vae.pt")["step"] == 1
    _run("vae", "--out", str(split), "--max-steps", "2", "--resume")
    a, b = _ckpt(ref / "ckpt_vae.pt"), _ckpt(split / "ckpt_vae.pt")
    assert a["step"] == b["step"] == 2
    _assert_same_state(a["vae"], b["vae"])

    # Teacher on the same exported VAE: 2 uninterrupted steps vs 1 + resume.
    shutil.rmtree(split / "pipeline")
    shutil.copytree(ref / "pipeline", split / "pipeline")
    _run("teacher", "--out", str(ref), "--max-steps", "2")
    _run("teacher", "--out", str(split), "--max-steps", "1")
    _run("teacher", "--out", str(split), "--max-steps", "2", "--resume")
    a, b = _ckpt(ref / "ckpt_teacher.pt"), _ckpt(split / "ckpt_teacher.pt")
    assert a["step"] == b["step"] == 2
    _assert_same_state(a["transformer"], b["transformer"])
    _assert_same_state(a["text_encoder"], b["text_encoder"])
    _assert_same_state(a["ema"], b["ema"])
    assert train.read_state(ref)["teacher_steps"] == 2

    # The export is a stock WanPipeline folder; bf16 weights are the EMA's, rounded.
    pipe = tw.load_pipeline(ref / "pipeline")
    assert isinstance(pipe.scheduler, type(tw.build_scheduler()))
    assert pipe.vae.config.scale_factor_spatial == 4 and pipe.vae.config.scale_factor_temporal == 4
    assert pipe.vae.config.latents_std != [1.0] * 16  # statistics of the trained encoder were stored
    ema_w = a["ema"]["transformer.proj_out.weight"]
    torch.testing.assert_close(pipe.transformer.proj_out.weight, ema_w.bfloat16().float(), rtol=0, atol=0)
    video = pipe(
        PROMPT, num_frames=5, height=32, width=32, num_inference_steps=2, guidance_scale=5.0,
        max_sequence_length=32, output_type="np", generator=torch.Generator().manual_seed(0),
    ).frames
    assert video.shape == (1, 5, 32, 32, 3) and np.isfinite(video).all()


def test_sigterm_ends_the_stage_with_a_checkpoint_and_skips_the_next(tmp_path, monkeypatch, capsys):
    """A preemption notice during the VAE stage's first step of 3 ("all"): the stage stops after that step with its
    checkpoint, the teacher stage does not start, the handler is put back, and --resume continues the VAE."""
    import signal

    out, real_record, calls = tmp_path / "run", train.Clock.record, []

    def record_then_preempt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)
        return real_record(self, *args, **kwargs)

    monkeypatch.setattr(train.Clock, "record", record_then_preempt)
    before = signal.getsignal(signal.SIGTERM)
    _run("all", "--out", str(out), "--max-steps", "3")
    assert signal.getsignal(signal.SIGTERM) is before
    assert _ckpt(out / "ckpt_vae.pt")["step"] == 1 and not (out / "ckpt_teacher.pt").exists()
    assert "stopped by SIGTERM" in capsys.readouterr().out
    monkeypatch.setattr(train.Clock, "record", real_record)
    _run("vae", "--out", str(out), "--max-steps", "3", "--resume")
    assert _ckpt(out / "ckpt_vae.pt")["step"] == 3


def test_vae_warm_start_from_export_without_checkpoint(tmp_path):
    """Checkpoints stay on the GPU machine; the exported bf16 VAE is what travels and what training resumes from."""
    out = tmp_path / "run"
    _run("vae", "--out", str(out), "--max-steps", "1")
    exported = tw.load_pipeline(out / "pipeline").vae.state_dict()
    (out / "ckpt_vae.pt").unlink()
    _run("vae", "--out", str(out), "--max-steps", "1", "--resume")  # already at step 1: no training step
    assert train.read_state(out)["vae_steps"] == 1
    resumed = _ckpt(out / "ckpt_vae.pt")
    assert resumed["step"] == 1
    for name, weight in exported.items():  # started from the export, not from a fresh initialization
        torch.testing.assert_close(resumed["vae"][name].bfloat16().float(), weight.float(), rtol=0, atol=0, msg=name)


def test_foreground_weight_marks_exactly_the_object_pixels():
    video = torch.zeros(1, 3, 2, 8, 8)  # black background
    video[:, 0, :, 2:4, 5:7] = 1.0  # a red 2x2 patch in both frames
    video = video * 2 - 1  # the VAE's [-1, 1] range
    weight = train.foreground_weight(video, boost=20.0)
    assert weight.shape == (1, 1, 2, 8, 8)
    expected = torch.ones(1, 1, 2, 8, 8)
    expected[..., 2:4, 5:7] = 21.0
    assert torch.equal(weight, expected)


def _average_gradients_worker(rank: int, world: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    procs = train.Processes(rank=rank, world=world)
    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(4))
    a.grad = torch.full((2, 3), float(rank + 1))
    b.grad = torch.arange(4.0) * (rank + 1) if rank == 0 else None  # no gradient on rank 1: counts as zero
    procs.average_gradients([a, b])
    results[rank] = (a.grad.clone(), b.grad.clone(), procs.min(10.0 + rank, torch.device("cpu")))
    dist.destroy_process_group()


def test_average_gradients_over_two_processes(tmp_path):
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_average_gradients_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in range(2):
        a_grad, b_grad, least = results[rank]
        torch.testing.assert_close(a_grad, torch.full((2, 3), 1.5))  # (1 + 2) / 2
        torch.testing.assert_close(b_grad, torch.arange(4.0) / 2)  # (g + 0) / 2
        assert least == 10.0  # rank 0's smaller value reaches rank 1 too


def test_torchrun_two_processes_train_both_stages(tmp_path):
    """`torchrun --nproc_per_node 2` (gloo on CPU) runs the VAE and teacher stages and process 0 exports."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "blade.tinyworld.train", "all",
        "--toy", "--out", str(out), "--max-steps", "2", "--device", "cpu", "--latent-reuse", "2", "--pool-batches",
        "2", "--log-every-s", "0",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 process(es)" in result.stdout
    state = train.read_state(out)
    assert state["vae_steps"] == 2 and state["teacher_steps"] == 2
    assert _ckpt(out / "ckpt_teacher.pt")["step"] == 2
    tw.load_pipeline(out / "pipeline")


def test_vae_clip_frames_cover_the_chunk_after_chunk_path():
    assert train.vae_clip_frames(None, 17) == 17
    assert train.vae_clip_frames(13, 17) == 13  # first frame + three 4-frame chunks: the steady state is reached
    assert train.vae_clip_frames(33, 17) == 17
    assert train.vae_clip_frames(None, 5) == 5  # a video shorter than 13 frames trains whole
    for too_short in (5, 9):
        with pytest.raises(ValueError, match="too short"):
            train.vae_clip_frames(too_short, 17)
    with pytest.raises(ValueError, match="4k\\+1"):
        train.vae_clip_frames(8, 17)


def test_roundtrip_adherence_of_an_identity_vae_is_the_metric_on_ground_truth():
    """With a VAE whose encode -> decode returns its input, the check reduces to scoring ground-truth renders."""

    class Identity:
        def encode(self, x):
            return type("Out", (), {"latent_dist": type("Dist", (), {"mean": x})()})()

        def decode(self, z):
            return type("Out", (), {"sample": z})()

    video = {"num_frames": 9, "height": 64, "width": 64}
    check = train.roundtrip_adherence(Identity(), video, num_videos=3, seed=0, device=torch.device("cpu"))
    assert check["adherence"] >= 0.98
    assert check["error_first_5_frames"] == 0.0 and check["error_later_frames"] == 0.0


def test_vae_stage_keeps_an_exported_teacher(tmp_path, capsys):
    out = tmp_path / "run"
    _run("vae", "--out", str(out), "--max-steps", "1")
    _run("teacher", "--out", str(out), "--max-steps", "1")
    teacher = tw.load_pipeline(out / "pipeline").transformer.state_dict()
    _run("vae", "--out", str(out), "--max-steps", "2", "--resume")
    state = train.read_state(out)
    assert state["vae_steps"] == 2 and state["teacher_steps"] == 1 and "vae_roundtrip_adherence" in state
    kept = tw.load_pipeline(out / "pipeline").transformer.state_dict()
    _assert_same_state(teacher, kept)

    capsys.readouterr()
    train.main(["check-vae", "--out", str(out), "--toy", "--check-videos", "1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["videos"] == 1 and 0.0 <= report["adherence"] <= 1.0 and report["error_first_5_frames"] > 0


def test_learning_rate_warmup_constant_and_timed_cooldown():
    # Warmup: (step + 1) / warmup of the base rate.
    assert train.lr_at(0, 1e-3, 10) == pytest.approx(1e-4)
    assert train.lr_at(9, 1e-3, 10) == pytest.approx(1e-3)
    # No cooldown asked: constant however close the deadline.
    assert train.lr_at(500, 1e-3, 10, remaining_s=1.0) == pytest.approx(1e-3)
    # Cooldown of 120 s: full rate before it, linear in the remaining time inside it, floored at a tenth.
    assert train.lr_at(500, 1e-3, 10, remaining_s=300.0, cooldown_s=120.0) == pytest.approx(1e-3)
    assert train.lr_at(500, 1e-3, 10, remaining_s=60.0, cooldown_s=120.0) == pytest.approx(5e-4)
    assert train.lr_at(500, 1e-3, 10, remaining_s=3.0, cooldown_s=120.0) == pytest.approx(1e-4)
