"""Per-sample student step draws (``TDMConfig.step_draw = "sample"``, TDM's and BLADE's released draw) against
hand-derived float64 references, sample by sample."""

import dataclasses
import math

import pytest
import torch

from blade.distill.schedule import COGVIDEOX_5B_DDPM_CONFIG, FlowMatchingSchedule, VPredictionDDPMSchedule
from blade.distill.tdm import StepDraw, TDMConfig, TDMObjective, sample_tau, segment_end
from tests.test_tdm import _calls, _MockObjective

SCHEDULES = [FlowMatchingSchedule(3.0), VPredictionDDPMSchedule.from_scheduler_config(COGVIDEOX_5B_DDPM_CONFIG)]


def _per_sample_draw(obj: TDMObjective, steps: list[int]) -> StepDraw:
    i = torch.tensor(steps)
    return StepDraw(i=i, t_i=torch.tensor([obj.anchors[k] for k in steps]),
                    t_mid=torch.tensor([segment_end(obj.anchors, k) for k in steps]))


def test_per_sample_draws_are_uniform_over_steps_with_their_own_segments():
    obj = _MockObjective((1, 1), TDMConfig(k_step=8, step_draw="sample"))
    draw = obj.draw_step(torch.Generator().manual_seed(0), batch=8000)
    assert draw.per_sample and draw.i.shape == (8000,)
    counts = torch.bincount(draw.i, minlength=8).double()
    assert torch.all((counts - 1000).abs() < 5 * math.sqrt(1000 * 7 / 8))  # binomial sd, 5 sigma
    anchors = [999, 874, 749, 624, 499, 374, 249, 124]
    for k in range(8):
        picked = draw.i == k
        assert torch.all(draw.t_i[picked] == anchors[k])
        assert torch.all(draw.t_mid[picked] == (anchors[k + 1] if k < 7 else 0))
    assert draw.deepest == 7 and draw.step is None
    # the batch draw is unchanged: one int for all
    batch_draw = TDMObjective.draw_step(_MockObjective((1, 1), TDMConfig(k_step=8)), torch.Generator(), batch=5)
    assert isinstance(batch_draw.i, int) and batch_draw.step == batch_draw.i


def test_state_at_gathers_each_samples_own_state():
    states = [torch.full((3, 2), float(k)) + torch.arange(3.0).view(3, 1) * 10 for k in range(5)]
    draw = StepDraw(i=torch.tensor([4, 0, 2]), t_i=torch.zeros(3), t_mid=torch.zeros(3))
    got = TDMObjective.state_at(states, draw)
    assert torch.equal(got, torch.tensor([[4.0, 4.0], [10.0, 10.0], [22.0, 22.0]]))
    assert TDMObjective.state_at(states, StepDraw(i=3, t_i=0, t_mid=0)) is states[3]


@pytest.mark.parametrize("tau_mode", ["to_max", "segment"])
def test_per_sample_tau_stays_in_each_samples_range_and_covers_it(tau_mode):
    t_mid = torch.tensor([874.0, 0.0, 499.0, 124.0]).repeat(2000)
    t_i = torch.tensor([999.0, 124.0, 624.0, 249.0]).repeat(2000)
    tau_max = torch.minimum(torch.full_like(t_i, 979.0), t_i) if tau_mode == "segment" else torch.full_like(t_i, 979)
    tau = sample_tau(t_mid, t_mid.numel(), tau_max, torch.Generator().manual_seed(0))
    assert torch.all(tau == tau.round()) and torch.all(tau > t_mid) and torch.all(tau <= tau_max)
    for k in range(4):  # both ends reached, mean of a discrete uniform
        sel = tau[k::4].double()
        low, high = float(t_mid[k]) + 1, float(tau_max[k])
        assert sel.min() == low and sel.max() == high
        sd = (high - low + 1) / math.sqrt(12 * sel.numel())
        assert abs(sel.mean().item() - (low + high) / 2) < 5 * sd


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_per_sample_segment_matches_a_hand_reference_sample_by_sample(schedule):
    """eta = 1 (no fresh noise in the step): x0 and x_mid from each sample's own anchor; the last step's sample
    keeps x_mid = x0; x_tau = forward diffusion from that sample's t_mid with the generator's first normal draw."""
    steps = [0, 3, 7, 5, 7]
    shape = (len(steps), 2, 3, 4)
    obj = _MockObjective(shape, TDMConfig(k_step=8, eta=1.0, step_draw="sample"))
    obj.family = dataclasses.replace(obj.family, schedule=schedule)
    g = torch.Generator().manual_seed(1)
    x_ti, out = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    draw = _per_sample_draw(obj, steps)
    x0, x_tau, tau = obj._segment(out, x_ti, draw, torch.Generator().manual_seed(2), torch.Generator().manual_seed(3))
    z = torch.randn(shape, generator=torch.Generator().manual_seed(2)).double()
    for b, k in enumerate(steps):
        t, t_mid, tb = float(obj.anchors[k]), float(segment_end(obj.anchors, k)), float(tau[b])
        a_t, s_t = float(schedule.alpha(t)), float(schedule.sigma(t))
        xb, ob = x_ti[b].double(), out[b].double()
        if schedule.prediction_type == "flow":  # v = eps - x0, x = a x0 + s eps with a = 1 - s
            x0_hand, eps_hand = xb - s_t * ob, xb + a_t * ob
        else:  # v = a eps - s x0
            x0_hand, eps_hand = a_t * xb - s_t * ob, s_t * xb + a_t * ob
        a_m, s_m = float(schedule.alpha(t_mid)), float(schedule.sigma(t_mid))
        x_mid = x0_hand if t_mid == 0 else a_m * x0_hand + s_m * eps_hand
        a_tau, s_tau = float(schedule.alpha(tb)), float(schedule.sigma(tb))
        ratio = a_tau / a_m
        want = ratio * x_mid + math.sqrt(max(s_tau**2 - (ratio * s_m) ** 2, 0.0)) * z[b]
        assert torch.allclose(x0[b].double(), x0_hand, atol=1e-5)
        assert torch.allclose(x_tau[b].double(), want, atol=1e-4), (b, k)
        assert t_mid < tb <= 979


def test_generator_loss_with_per_sample_steps_feeds_each_sample_its_anchor():
    """The student is called at each sample's own t_i and its gradient is scaled by its own sigma(t_i) (flow, shift
    1: dx0/dv = -t_i / 1000); the loss is the mean of the per-sample L2 losses by hand."""
    steps = [1, 6, 3]
    shape, cfg_scale = (3, 2, 4, 5), 4.0
    obj = _MockObjective(shape, TDMConfig(k_step=8, cfg=cfg_scale, generator_loss="l2", normalize_generator=False,
                                          step_draw="sample"))
    g = torch.Generator().manual_seed(0)
    x_ti = torch.randn(shape, generator=g)
    draw = _per_sample_draw(obj, steps)
    loss, _ = obj.generator_loss(x_ti, draw, torch.ones(3, 3, 8), -torch.ones(3, 3, 8), g,
                                 torch.Generator().manual_seed(4))
    loss.backward()
    (_, _, ts, _), = _calls(obj, "student")
    assert torch.equal(ts, draw.t_i.float())
    (_, x_tau, tau, _), = _calls(obj, "fake")
    assert torch.all(tau > draw.t_mid)
    x0_teacher, x0_fake = obj.reference_x0(x_tau, tau, cfg_scale)
    d = x0_fake - x0_teacher
    assert loss.item() == pytest.approx(0.5 * d.pow(2).flatten(1).mean(1).mean().item(), rel=1e-4)
    s_i = (draw.t_i.double() / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(obj.delta.grad.double(), -s_i * d / (d[0].numel() * 3), rtol=1e-3, atol=1e-8)


def test_per_sample_draws_refuse_dense_steps():
    with pytest.raises(ValueError, match="step_draw"):
        TDMConfig(k_step=8, dense_steps=1, step_draw="sample")
    with pytest.raises(ValueError, match="step_draw"):
        TDMConfig(step_draw="nope")
