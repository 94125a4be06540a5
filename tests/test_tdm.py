"""TDM objective pieces (blade/distill/tdm.py) against hand-derived values, and a few CPU iterations."""

import math

import pytest
import torch

from blade.distill import lora
from blade.distill.schedule import COGVIDEOX_5B_DDPM_CONFIG, FlowMatchingSchedule, VPredictionDDPMSchedule
from blade.distill.tdm import (
    TDMConfig,
    TDMObjective,
    default_huber_c,
    fake_score_loss,
    forward_diffuse,
    generator_target,
    pseudo_huber,
    sample_tau,
    segment_end,
    teacher_gap_weight,
    wan_family,
)
from blade.pipelines.tiny import build_tiny_wan_pipeline

SCHEDULES = [FlowMatchingSchedule(1.0), FlowMatchingSchedule(3.0),
             VPredictionDDPMSchedule.from_scheduler_config(COGVIDEOX_5B_DDPM_CONFIG)]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("s,t", [(0.0, 400.0), (124.0, 700.0), (500.0, 979.0)])
def test_forward_diffuse_marginal(schedule, s, t):
    """x_s ~ alpha_s x0 + sigma_s eps, diffused from s to t, must have mean alpha_t x0 and variance sigma_t^2."""
    g = torch.Generator().manual_seed(0)
    n = 50_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    x_s = schedule.add_noise(x0, torch.randn(n, 1, generator=g, dtype=torch.float64), s)
    tt = torch.full((n,), t, dtype=torch.float64)
    x_t = forward_diffuse(schedule, x_s, s, tt, torch.randn(n, 1, generator=g, dtype=torch.float64))
    a_t, s_t = float(schedule.alpha(t)), float(schedule.sigma(t))
    assert abs(x_t.mean().item() - a_t * 0.7) < 5 * s_t / math.sqrt(n) + 1e-9
    assert x_t.var().item() == pytest.approx(s_t**2, rel=0.03)


def test_pseudo_huber_hand_values():
    x = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    target = torch.zeros(2, 2)
    # sample 0: (sqrt(9 + 16) - 4 + sqrt(0 + 16) - 4) / 2 = 0.5 ; sample 1: sqrt(1 + 16) - 4
    assert torch.allclose(pseudo_huber(x, target, 4.0), torch.tensor([0.5, math.sqrt(17) - 4]))
    assert default_huber_c(16 * 21 * 60 * 104, "scaled") == pytest.approx(1e-3 / 128 * math.sqrt(2096640))
    assert default_huber_c(100, "l1") == pytest.approx(1e-3 / 1280)


def test_generator_target_gradient_is_fake_minus_teacher():
    """d/dx0 of the quadratic regime of the loss = (x0_fake - x0_teacher) / (c * n): the DMD score difference."""
    x0 = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    teacher, fake = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    target = generator_target(x0, teacher, fake)
    assert not target.requires_grad
    assert torch.allclose(target, x0.detach() + teacher - fake)
    c = 1e4  # sqrt(d^2 + c^2) - c ~ d^2 / (2c)
    pseudo_huber(x0, target, c).sum().backward()
    assert torch.allclose(x0.grad, (fake - teacher) / (c * 12), rtol=1e-6)


def test_teacher_gap_weight_is_capped():
    x0 = torch.zeros(2, 4)
    teacher = torch.stack([torch.full((4,), 0.5), torch.full((4,), 0.01)])
    assert torch.allclose(teacher_gap_weight(x0, teacher, cap=5.0), torch.tensor([2.0, 5.0]))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_fake_loss_spaces_agree(schedule):
    """Velocity/v MSE == x0 MSE / sigma^2: the two documented weightings are the same loss."""
    g = torch.Generator().manual_seed(1)
    x_tau, out, x0 = (torch.randn(3, 2, 5, generator=g, dtype=torch.float64) for _ in range(3))
    tau = torch.tensor([10.0, 500.0, 900.0], dtype=torch.float64)
    a = fake_score_loss(schedule, out, x_tau, tau, x0, "output")
    b = fake_score_loss(schedule, out, x_tau, tau, x0, "x0")
    assert torch.allclose(a, b, rtol=1e-6)
    if isinstance(schedule, FlowMatchingSchedule) and schedule.shift == 1.0:  # hand form: v = (x_tau - x0) / sigma
        sig = (tau / 1000).view(-1, 1, 1)
        assert torch.allclose(a, ((out - (x_tau - x0) / sig) ** 2).mean())


def test_sample_tau_and_segments():
    anchors = [999, 749, 499, 249]
    assert [segment_end(anchors, i) for i in range(4)] == [749, 499, 249, 0]
    tau = sample_tau(249, 10_000, 979, torch.Generator().manual_seed(0))
    assert tau.min() == 250 and tau.max() == 979 and torch.equal(tau, tau.round())
    with pytest.raises(ValueError):
        sample_tau(979, 1, 979)


def test_tdm_iterations_update_both_adapters_not_base():
    torch.manual_seed(0)
    pipe = build_tiny_wan_pipeline(seed=0)
    tr = pipe.transformer
    base = {k: v.clone() for k, v in tr.state_dict().items()}
    lora.add_student_and_fake(tr, rank=4, alpha=4)
    student0 = [p.detach().clone() for p in lora.adapter_parameters(tr, lora.STUDENT)]
    fake0 = [p.detach().clone() for p in lora.adapter_parameters(tr, lora.FAKE)]
    assert all(torch.equal(a, b) for a, b in zip(student0, fake0))  # fake starts as a copy of the student
    # B = 0 at init: so make the student non-trivial first to check that roles really differ
    family = wan_family(pipe)
    obj = TDMObjective(tr, family, TDMConfig(k_step=2, cfg=3.0, lambda_reg=0.5))
    params_g, params_f = lora.adapter_parameters(tr, lora.STUDENT), lora.adapter_parameters(tr, lora.FAKE)
    opt_g = torch.optim.AdamW(params_g, lr=1e-2, betas=(0.0, 0.95))
    opt_f = torch.optim.AdamW(params_f, lr=1e-2, betas=(0.0, 0.95))
    g, d = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    emb, neg = torch.randn(2, 8, 32, generator=g), torch.zeros(2, 8, 32)
    for _ in range(2):
        noise = torch.randn(family.latent_shape(2, 9, 16, 16), generator=g)
        df, dg = obj.draw_step(d), obj.draw_step(d)
        states = obj.rollout(noise, emb, max(df.i, dg.i), g)
        lf, _ = obj.fake_loss(states[df.i], df, emb, neg, g, d)
        lf.backward()
        assert all(p.grad is None for p in params_g)  # the fake loss never reaches the student
        opt_f.step()
        opt_f.zero_grad()
        lg, _ = obj.generator_loss(states[dg.i], dg, emb, neg, g, d)
        lg.backward()
        assert all(p.grad is None for p in params_f)
        opt_g.step()
        opt_g.zero_grad()
        assert math.isfinite(lf.item()) and math.isfinite(lg.item())
    assert any(not torch.equal(a, b) for a, b in zip(student0, lora.adapter_parameters(tr, lora.STUDENT)))
    assert any(not torch.equal(a, b) for a, b in zip(fake0, lora.adapter_parameters(tr, lora.FAKE)))
    for k, v in tr.state_dict().items():
        key = k.replace(".base_layer", "")
        if "lora_" not in k:
            assert torch.equal(v, base[key]), k
    # teacher role = the untouched base model
    x, t = torch.randn(family.latent_shape(1, 9, 16, 16)), torch.tensor([500.0])
    ref = build_tiny_wan_pipeline(seed=0).transformer
    with torch.no_grad():
        want = ref(hidden_states=x, timestep=t, encoder_hidden_states=emb[:1], return_dict=False)[0]
        assert torch.allclose(obj.predict("teacher", x, t, emb[:1]), want, atol=1e-6)
        assert not torch.allclose(obj.predict("student", x, t, emb[:1]), want, atol=1e-6)
