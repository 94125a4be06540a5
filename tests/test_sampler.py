"""Noise schedules, the student step and BladeStudentScheduler (alone and inside the tiny Wan / CogVideoX pipelines)."""

import math

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler

from blade.distill.sampler import BladeStudentScheduler
from blade.distill.schedule import (
    COGVIDEOX_5B_DDPM_CONFIG,
    FlowMatchingSchedule,
    VPredictionDDPMSchedule,
    build_schedule,
    student_anchors,
    student_step,
)

ANCHORS_8 = [999, 874, 749, 624, 499, 374, 249, 124]  # 999 - 125 k



def _cog_ddim() -> CogVideoXDDIMScheduler:
    return CogVideoXDDIMScheduler(
        **COGVIDEOX_5B_DDPM_CONFIG, prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False
    )


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_student_anchors():
    assert student_anchors(8) == ANCHORS_8
    assert student_anchors(4) == [999, 749, 499, 249]
    assert student_anchors(1) == [999]
    with pytest.raises(ValueError):
        student_anchors(0)


def test_flow_sigma_exact_at_every_anchor():
    flow = FlowMatchingSchedule(shift=1.0)
    for t in ANCHORS_8:
        assert flow.sigma(t).item() == t / 1000  # exactly, no table lookup
        assert flow.alpha(t).item() == 1 - t / 1000
        assert flow.model_timestep(t).item() == t
    # shift 3 at s = 0.5: 3 * 0.5 / (1 + 2 * 0.5) = 0.75; s = 0.124: 0.372 / 1.248
    shifted = FlowMatchingSchedule(shift=3.0)
    assert shifted.sigma(500).item() == pytest.approx(0.75, abs=1e-15)
    assert shifted.sigma(124).item() == pytest.approx(0.372 / 1.248, abs=1e-15)
    assert shifted.model_timestep(500).item() == pytest.approx(750.0, abs=1e-9)


def test_ddpm_coefficients_match_scheduler_table():
    reference = _cog_ddim().alphas_cumprod.double()
    ddpm = VPredictionDDPMSchedule.from_scheduler_config(COGVIDEOX_5B_DDPM_CONFIG)
    for t in ANCHORS_8 + [0, 1, 500]:
        assert ddpm.alpha(t).item() ** 2 == pytest.approx(reference[t].item(), abs=1e-14)
        assert ddpm.sigma(t).item() ** 2 == pytest.approx(1 - reference[t].item(), abs=1e-14)
    assert ddpm.alpha(999).item() == pytest.approx(0.0, abs=1e-12)  # zero terminal SNR
    mid = 0.5 * (reference[500] + reference[501]).item()
    assert ddpm.alpha(500.5).item() ** 2 == pytest.approx(mid, abs=1e-14)
    # per-sample timesteps
    t = torch.tensor([999.0, 124.0])
    assert torch.allclose(ddpm.alpha(t) ** 2, reference[[999, 124]], atol=1e-14)


@pytest.mark.parametrize("schedule", [FlowMatchingSchedule(1.0), FlowMatchingSchedule(3.0), "ddpm"])
def test_conversions_round_trip(schedule):
    if schedule == "ddpm":
        schedule = VPredictionDDPMSchedule.from_scheduler_config(COGVIDEOX_5B_DDPM_CONFIG)
    x0, eps = _randn(2, 3, 4, seed=1), _randn(2, 3, 4, seed=2)
    for t in [999, 874, 124, torch.tensor([999.0, 250.5])]:
        x_t = schedule.add_noise(x0, eps, t)
        out = schedule.to_model_output(x0, eps, t)
        torch.testing.assert_close(schedule.to_x0(out, x_t, t), x0, atol=1e-12, rtol=0)
        torch.testing.assert_close(schedule.to_eps(out, x_t, t), eps, atol=1e-12, rtol=0)


def test_flow_parameterisation_by_hand():
    flow = FlowMatchingSchedule(1.0)
    x0, eps = _randn(5, seed=3), _randn(5, seed=4)
    x_t = flow.add_noise(x0, eps, 374)
    torch.testing.assert_close(x_t, 0.626 * x0 + 0.374 * eps, atol=1e-15, rtol=0)
    torch.testing.assert_close(flow.to_model_output(x0, eps, 374), eps - x0)


def test_deterministic_step_equals_euler_and_ddim():
    """eta = 1 is the deterministic step: Euler for flow matching, CogVideoX's DDIM (eta 0) for v-prediction."""
    x_t, out = _randn(1, 4, 3, seed=5), _randn(1, 4, 3, seed=6)
    flow = FlowMatchingSchedule(1.0)
    x_next, _ = student_step(flow, out, x_t, 874, 749, eta=1.0)
    torch.testing.assert_close(x_next, x_t + (0.749 - 0.874) * out, atol=1e-12, rtol=0)

    ddim = _cog_ddim()
    ddim.set_timesteps(8)
    assert ddim.timesteps.tolist() == ANCHORS_8
    ddpm = VPredictionDDPMSchedule.from_scheduler_config(COGVIDEOX_5B_DDPM_CONFIG)
    for t, t_next in [(999, 874), (499, 374)]:
        expected = ddim.step(out, t, x_t, eta=0.0).prev_sample
        x_next, x0 = student_step(ddpm, out, x_t, t, t_next, eta=1.0)
        torch.testing.assert_close(x_next, expected.double(), atol=1e-10, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.9])
@pytest.mark.parametrize("family", ["flow", "ddpm"])
def test_stochastic_step_by_hand(eta, family):
    x_t, out = _randn(2, 3, 5, seed=7), _randn(2, 3, 5, seed=8)
    acp = _cog_ddim().alphas_cumprod.double()
    if family == "flow":
        schedule = FlowMatchingSchedule(1.0)
        s, s_next = 0.874, 0.749
        x0, eps = x_t - s * out, x_t + (1 - s) * out
        a_next = 1 - s_next
    else:
        schedule = VPredictionDDPMSchedule.from_scheduler_config(COGVIDEOX_5B_DDPM_CONFIG)
        a, s = acp[874].sqrt(), (1 - acp[874]).sqrt()
        a_next, s_next = acp[749].sqrt(), (1 - acp[749]).sqrt()
        x0, eps = a * x_t - s * out, s * x_t + a * out
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    expected = a_next * x0 + s_next * (eta * eps + math.sqrt(1 - eta**2) * z)
    x_next, pred_x0 = student_step(schedule, out, x_t, 874, 749, eta, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(pred_x0, x0, atol=1e-12, rtol=0)
    torch.testing.assert_close(x_next, expected, atol=1e-12, rtol=0)
    # the last anchor returns x0
    last, last_x0 = student_step(schedule, out, x_t, 124, None, eta)
    torch.testing.assert_close(last, last_x0)


def test_bf16_inputs_compute_in_float32_and_keep_dtype():
    flow = FlowMatchingSchedule(1.0)
    x_t, out = _randn(4, 8, seed=9).bfloat16(), _randn(4, 8, seed=10).bfloat16()
    x_next, x0 = student_step(flow, out, x_t, 999, 874, eta=1.0)
    assert x_next.dtype == torch.bfloat16 and x0.dtype == torch.bfloat16
    ref = x_t.float() + (0.874 - 0.999) * out.float()
    torch.testing.assert_close(x_next.float(), ref, atol=2e-2, rtol=0)


def test_scheduler_timesteps_and_mismatch_error():
    sched = BladeStudentScheduler(num_anchors=8)
    sched.set_timesteps(8, device="cpu")
    assert sched.timesteps.tolist() == ANCHORS_8
    assert sched.sigmas.tolist() == pytest.approx([t / 1000 for t in ANCHORS_8] + [0.0])
    with pytest.raises(ValueError, match="distilled for 8 steps"):
        sched.set_timesteps(50)
    with pytest.raises(ValueError, match="not one of"):
        sched.step(torch.zeros(1, 2), torch.tensor(500.0), torch.zeros(1, 2))
    sched.set_timesteps(timesteps=[999, 500])  # explicit override on purpose
    assert sched.timesteps.tolist() == [999, 500]
    assert sched.init_noise_sigma == 1.0 and sched.order == 1
    x = _randn(1, 2, seed=1)
    assert sched.scale_model_input(x, 999) is x


def test_scheduler_step_matches_student_step_and_roundtrips(tmp_path):
    sched = BladeStudentScheduler.from_blade_config({"family": "cogvideox", "k_step": 8, "eta": 0.9})
    assert sched.config.prediction_type == "v_prediction"
    sched.set_timesteps(8)
    x_t, out = _randn(1, 3, 4, seed=1, dtype=torch.float32), _randn(1, 3, 4, seed=2, dtype=torch.float32)
    res = sched.step(out, sched.timesteps[2], x_t, generator=torch.Generator().manual_seed(3))
    ref = student_step(sched.schedule, out, x_t, 749, 624, 0.9, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(res.prev_sample, ref[0])
    torch.testing.assert_close(res.pred_original_sample, ref[1])
    # set_generator is used when step() gets none
    sched.set_generator(torch.Generator().manual_seed(3))
    torch.testing.assert_close(sched.step(out, 749, x_t, return_dict=False)[0], ref[0])

    sched.save_pretrained(tmp_path)
    loaded = BladeStudentScheduler.from_pretrained(tmp_path)
    assert loaded.config.prediction_type == "v_prediction" and loaded.config.num_anchors == 8
    torch.testing.assert_close(loaded.schedule.alphas_cumprod, sched.schedule.alphas_cumprod)


def _record_timesteps(transformer):
    """Record the timestep of every transformer call (the pipelines pass it as a keyword)."""
    calls = []
    handle = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["timestep"].tolist()), with_kwargs=True
    )
    return calls, handle


def test_inside_wan_pipeline():
    from blade.testing.tiny import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline()
    pipe.scheduler = BladeStudentScheduler(num_anchors=8, eta=0.9)
    calls, handle = _record_timesteps(pipe.transformer)
    kwargs = dict(prompt="a red ball", height=16, width=16, num_frames=9, num_inference_steps=8, max_sequence_length=16)
    latents = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(0))

    pipe.scheduler.set_generator(torch.Generator().manual_seed(1))
    out = pipe(**kwargs, guidance_scale=1.0, latents=latents.clone(), output_type="latent").frames
    assert calls == [[float(t)] for t in ANCHORS_8]
    handle.remove()

    # the same rollout by hand with the transformer and the student step
    with torch.no_grad():
        embeds = pipe.encode_prompt("a red ball", do_classifier_free_guidance=False, max_sequence_length=16)[0]
        x, gen = latents.clone(), torch.Generator().manual_seed(1)
        for i, t in enumerate(ANCHORS_8):
            v = pipe.transformer(x, torch.tensor([float(t)]), embeds, return_dict=False)[0]
            t_next = ANCHORS_8[i + 1] if i + 1 < 8 else None
            x, _ = student_step(pipe.scheduler.schedule, v, x, t, t_next, 0.9, generator=gen)
    torch.testing.assert_close(out, x)

    with pytest.raises(ValueError, match="distilled for 8 steps"):
        pipe(**{**kwargs, "num_inference_steps": 50}, guidance_scale=1.0, output_type="latent")

    calls, handle = _record_timesteps(pipe.transformer)  # CFG: two forwards per anchor
    pipe(**kwargs, guidance_scale=5.0, output_type="latent")
    assert calls == [[float(t)] for t in ANCHORS_8 for _ in range(2)]


def test_inside_cogvideox_pipeline():
    from blade.testing.tiny import build_tiny_cogvideox_pipeline

    pipe = build_tiny_cogvideox_pipeline()
    pipe.scheduler = BladeStudentScheduler.from_blade_config(
        {"family": "cogvideox", "k_step": 4, "anchors": [999, 749, 499, 249], "eta": 0.9}
    )
    calls, _ = _record_timesteps(pipe.transformer)
    kwargs = dict(prompt="a red ball", height=32, width=32, num_frames=9, max_sequence_length=16)
    out1 = pipe(
        **kwargs,
        num_inference_steps=4,
        guidance_scale=6.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames
    assert calls == [[float(t)] * 2 for t in [999, 749, 499, 249]]  # batched CFG
    out2 = pipe(
        **kwargs,
        num_inference_steps=4,
        guidance_scale=6.0,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).frames
    torch.testing.assert_close(out1, out2)  # the pipeline's generator drives the re-noising
    assert torch.isfinite(out1).all()
    with pytest.raises(ValueError, match="distilled for 4 steps"):
        pipe(**kwargs, num_inference_steps=50, output_type="latent")


@pytest.mark.parametrize("prediction_type", ["flow", "v_prediction"])
def test_schedule_follows_the_device_of_its_timesteps(prediction_type):
    """Coefficients, conversions and forward diffusion run on the timesteps' device (regression: the CogVideoX
    trainer crashed at its first CUDA step indexing the CPU ``alphas_cumprod`` table with CUDA timesteps). The
    meta device stands in for a second device: any CPU tensor met on the way raises."""
    from blade.distill.tdm import forward_diffuse

    schedule = build_schedule(prediction_type)
    t = torch.tensor([10.5, 874.0], device="meta")
    x = torch.empty(2, 3, 4, device="meta")
    assert schedule.alpha(t).device.type == "meta" and schedule.sigma(t).device.type == "meta"
    assert schedule.to_x0(x, x, t).device.type == "meta"
    assert schedule.to_eps(x, x, t).device.type == "meta"
    assert forward_diffuse(schedule, x, t * 0.5, t, x).device.type == "meta"
    # The CPU result is unchanged by the per-device tables.
    ref = build_schedule(prediction_type)
    cpu_t = torch.tensor([10.5, 874.0])
    torch.testing.assert_close(schedule.alpha(cpu_t), ref.alpha(cpu_t), rtol=0, atol=0)
