"""TDM objective pieces (blade/distill/tdm.py) against hand-derived values, and a few CPU iterations."""

import dataclasses
import math

import pytest
import torch

from blade.distill import lora
from blade.distill.schedule import COGVIDEOX_5B_DDPM_CONFIG, FlowMatchingSchedule, VPredictionDDPMSchedule
from blade.distill.tdm import (
    StepDraw,
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
from blade.testing.tiny import build_tiny_wan_pipeline

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


# ----------------------------------------------------------------------------------------------------------------
# Wiring of the objective against hand-derived references (a mock transformer per role, flow matching, shift 1)
# ----------------------------------------------------------------------------------------------------------------


class _MockObjective(TDMObjective):
    """TDMObjective whose roles are closed-form velocity fields: the wiring is checked, not the network.

    student: v = 0.4 x + delta (delta a zero leaf: its grad is dL/dv_student); teacher: v = 0.2 x + mean(emb)
    (cond and negative embeddings differ in mean); fake: v = -0.3 x + 0.1.
    """

    def __init__(self, shape, config):
        family = dataclasses.replace(wan_family(build_tiny_wan_pipeline(seed=0)), call=None)
        super().__init__(torch.nn.Identity(), family, config)
        self.delta = torch.zeros(shape, requires_grad=True)
        self.calls = []

    def _activate(self, name, step=None):
        pass

    @staticmethod
    def reference_x0(x_tau, tau, cfg_scale):
        """Hand reference in float64 of the CFG teacher's and the fake's x0 at (x_tau, tau), for emb = 1, neg = -1:
        x0 = x - s v (flow matching, s = t / 1000)."""
        x_tau, s_tau = x_tau.double(), (tau.double() / 1000).view(-1, *([1] * (x_tau.ndim - 1)))
        x0_teacher = x_tau - s_tau * (0.2 * x_tau - 1 + cfg_scale * 2.0)  # uncond + cfg * (cond - uncond)
        x0_fake = x_tau - s_tau * (-0.3 * x_tau + 0.1)
        return x0_teacher, x0_fake

    def predict(self, role, x, t, emb, step=None):
        self.calls.append((role, x.detach().clone(), t.detach().clone(), emb))
        if role == "student":
            return 0.4 * x + self.delta
        if role == "teacher":
            return 0.2 * x + emb.mean()
        return -0.3 * x + 0.1


def _calls(obj, role):
    return [c for c in obj.calls if c[0] == role]


def test_generator_loss_wiring_and_sign():
    shape, cfg_scale, c = (2, 3, 4, 5), 4.0, 0.05
    obj = _MockObjective(shape, TDMConfig(k_step=8, cfg=cfg_scale, huber_c=c))
    g = torch.Generator().manual_seed(0)
    x_ti = torch.randn(shape, generator=g)
    emb, neg = torch.ones(2, 3, 8), -torch.ones(2, 3, 8)
    draw = obj.draw_step(torch.Generator().manual_seed(3))
    loss, _ = obj.generator_loss(x_ti, draw, emb, neg, g, torch.Generator().manual_seed(4))
    loss.backward()

    (_, xs, ts, es), = _calls(obj, "student")
    assert torch.equal(xs, x_ti) and torch.all(ts == draw.t_i) and es is emb
    (_, x_tau, tau, ef), = _calls(obj, "fake")
    teacher = _calls(obj, "teacher")
    assert [t[3] for t in teacher] == [emb, neg]  # conditional, then the negative embedding
    assert all(torch.equal(t[1], x_tau) and torch.equal(t[2], tau) for t in teacher) and ef is emb
    assert torch.all(tau > draw.t_mid) and torch.all(tau <= 979)

    s_i = draw.t_i / 1000
    x0_teacher, x0_fake = obj.reference_x0(x_tau, tau, cfg_scale)
    d = x0_fake - x0_teacher  # x0 - stopgrad(x0 + teacher - fake)
    n = d[0].numel()
    want = (torch.sqrt(d**2 + c * c) - c).flatten(1).mean(1).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    grad_x0 = d / torch.sqrt(d**2 + c * c) / (n * shape[0])  # dL/dx0: along (fake - teacher), so descent -> teacher
    assert torch.allclose(obj.delta.grad.double(), -s_i * grad_x0, rtol=1e-3, atol=1e-7)


def test_fake_loss_target_is_student_x0():
    shape = (2, 3, 4, 5)
    obj = _MockObjective(shape, TDMConfig(k_step=8, cfg=4.0))
    g = torch.Generator().manual_seed(1)
    x_ti = torch.randn(shape, generator=g)
    draw = obj.draw_step(torch.Generator().manual_seed(5))
    loss, _ = obj.fake_loss(x_ti, draw, torch.ones(2, 3, 8), -torch.ones(2, 3, 8), g, torch.Generator())
    assert [c[0] for c in obj.calls] == ["student", "fake"]  # lambda_reg = 0: no teacher
    (_, x_tau, tau, _), = _calls(obj, "fake")
    x_tau = x_tau.double()
    x0 = x_ti.double() - draw.t_i / 1000 * 0.4 * x_ti.double()
    s_tau = (tau.double() / 1000).view(-1, 1, 1, 1)
    want = ((-0.3 * x_tau + 0.1 - (x_tau - x0) / s_tau) ** 2).mean()  # velocity target (x_tau - x0) / sigma
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)


@pytest.mark.parametrize("i", [2, 7])
def test_segment_x_tau_distribution(i):
    """x_mid = (1-s_m) x0 + s_m (eta eps + sqrt(1-eta^2) z1), then q(x_tau | x_mid): mean and variance by hand."""
    eta, n = 0.9, 200_000
    obj = _MockObjective((1, n), TDMConfig(k_step=8, eta=eta))
    g = torch.Generator().manual_seed(2)
    x_ti = torch.randn(1, n, generator=g)
    out = 0.4 * x_ti
    draw = StepDraw(i=i, t_i=obj.anchors[i], t_mid=segment_end(obj.anchors, i))
    x0, x_tau, tau = obj._segment(out, x_ti, draw, g, torch.Generator().manual_seed(6))
    s_i, s_m, s_t = draw.t_i / 1000, draw.t_mid / 1000, tau.item() / 1000
    xd = x_ti.double()
    x0_hand = xd - s_i * 0.4 * xd
    eps_hand = xd + (1 - s_i) * 0.4 * xd
    assert torch.allclose(x0.double(), x0_hand, atol=1e-5)
    r = (1 - s_t) / (1 - s_m)
    mean = (1 - s_t) * x0_hand + r * s_m * eta * eps_hand
    z = (x_tau.double() - mean) / math.sqrt(s_t**2 - (r * s_m * eta) ** 2)
    assert abs(z.mean().item()) < 0.02 and z.var().item() == pytest.approx(1.0, abs=0.02)


def test_family_feeds_model_timestep():
    """The transformer is conditioned on 1000 * sigma(t) (= t at shift 1), the teacher's training convention."""
    seen = []
    pipe = build_tiny_wan_pipeline(seed=0)
    for shift in (1.0, 3.0):
        fam = dataclasses.replace(wan_family(pipe, shift=shift), call=lambda tr, x, mt, e: seen.append(mt) or x)
        fam.predict(pipe.transformer, torch.zeros(2, 16, 1, 2, 2), torch.tensor([874.0, 124.0]), torch.zeros(2, 3, 32))
    assert torch.allclose(seen[0], torch.tensor([874.0, 124.0]))
    u = torch.tensor([0.874, 0.124])
    assert torch.allclose(seen[1], 1000 * 3 * u / (1 + 2 * u))


# ----------------------------------------------------------------------------------------------------------------
# Adapter switching on the real (tiny) transformer
# ----------------------------------------------------------------------------------------------------------------


def _tiny_with_distinct_adapters(gradient_checkpointing: bool, asa: bool = False, fake_attention: str = "asa",
                                 asa_block_size: int | None = None, dense_steps: int = 0):
    """Tiny Wan with student/fake adapters perturbed apart (as after some training) and an objective on it whose
    fake loss also calls the teacher (lambda_reg) before its backward. With `asa`, ASA is applied as the trainer
    applies it (before the adapters, the handle's own dense_steps 0) and handed to the objective."""
    from blade.distill.trainer import apply_sparsity

    pipe = build_tiny_wan_pipeline(seed=0)
    tr = pipe.transformer
    handle = apply_sparsity(tr, "wan", block_size=asa_block_size)[0] if asa else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # PEFT's gaussian A init draws from the global RNG
        lora.add_student_and_fake(tr, rank=4, alpha=8)
    with torch.no_grad():
        for seed, name in ((7, lora.STUDENT), (8, lora.FAKE)):
            g = torch.Generator().manual_seed(seed)
            for p in lora.adapter_parameters(tr, name):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    if gradient_checkpointing:
        tr.enable_gradient_checkpointing()
    tr.train()
    config = TDMConfig(k_step=2, cfg=3.0, lambda_reg=0.5, fake_attention=fake_attention, dense_steps=dense_steps)
    return pipe, TDMObjective(tr, wan_family(pipe), config, asa_handle=handle)


def _adapter_grads(obj, loss_fn, name):
    g, d = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    emb, neg = torch.randn(2, 8, 32, generator=g), torch.zeros(2, 8, 32)
    x = torch.randn(obj.family.latent_shape(2, 9, 16, 16), generator=g)
    loss, _ = getattr(obj, loss_fn)(x, obj.draw_step(d), emb, neg, g, d)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in lora.adapter_parameters(obj.transformer, name)])
    obj.transformer.zero_grad(set_to_none=True)
    return grads


def test_gradient_checkpointing_keeps_each_loss_on_its_adapter():
    """Checkpointed blocks are recomputed in backward with the adapter active *then*; the generator loss runs the
    fake last, so without switching back its student gradient was computed through the fake adapter (~10x off)."""
    _, plain = _tiny_with_distinct_adapters(False)
    _, ckpt = _tiny_with_distinct_adapters(True)
    for loss_fn, name in (("generator_loss", lora.STUDENT), ("fake_loss", lora.FAKE)):
        a, b = _adapter_grads(plain, loss_fn, name), _adapter_grads(ckpt, loss_fn, name)
        assert a.abs().sum() > 0 and torch.allclose(a, b, rtol=1e-4, atol=1e-7), loss_fn


def test_roles_switch_what_runs():
    pipe, obj = _tiny_with_distinct_adapters(False)
    tr = obj.transformer
    q = tr.blocks[0].attn1.to_q
    assert q.scaling[lora.STUDENT] == q.scaling[lora.FAKE] == 8 / 4  # alpha / r
    assert isinstance(q.lora_dropout[lora.STUDENT], torch.nn.Identity)
    params_g, params_f = lora.adapter_parameters(tr, lora.STUDENT), lora.adapter_parameters(tr, lora.FAKE)
    trainable = {id(p) for p in tr.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params_g} | {id(p) for p in params_f}
    assert not {id(p) for p in params_g} & {id(p) for p in params_f}

    g = torch.Generator().manual_seed(0)
    x, t, emb = torch.randn(1, 16, 3, 2, 2, generator=g), torch.tensor([500.0]), torch.randn(1, 8, 32, generator=g)
    ref = build_tiny_wan_pipeline(seed=0).transformer
    with torch.no_grad():
        base = ref(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]

        def run(role):
            return obj.predict(role, x, t, emb)

        student, teacher, fake = run("student"), run("teacher"), run("fake")
        assert torch.allclose(teacher, base, atol=1e-6)
        assert not torch.allclose(student, base, atol=1e-3) and not torch.allclose(fake, base, atol=1e-3)
        assert not torch.allclose(student, fake, atol=1e-3)
        assert torch.equal(run("student"), student) and torch.equal(run("teacher"), teacher)  # switching back


def test_student_sampler_equals_training_rule():
    """WanPipeline + BladeStudentScheduler (what inference runs) == TDMObjective.sample (the training rollout)."""
    from blade.distill.sampler import BladeStudentScheduler

    pipe, obj = _tiny_with_distinct_adapters(False)
    lora.activate(obj.transformer, lora.STUDENT)
    pipe.scheduler = BladeStudentScheduler(num_anchors=2, eta=0.9)
    g = torch.Generator().manual_seed(0)
    noise, emb = torch.randn(1, 16, 3, 2, 2, generator=g), torch.randn(1, 8, 32, generator=g)
    pipe.scheduler.set_generator(torch.Generator().manual_seed(11))
    with torch.no_grad():
        got = pipe(prompt_embeds=emb, guidance_scale=1.0, num_inference_steps=2, latents=noise.clone(),
                   num_frames=9, height=16, width=16, output_type="latent", return_dict=False)[0]
    want = obj.sample(noise, emb, torch.Generator().manual_seed(11))
    assert torch.allclose(got.float(), want, atol=1e-5)


def test_dense_steps_in_training_follow_the_student_step():
    """TDMConfig.dense_steps = 1 (K = 2): the objective's sample runs its first step dense and the second sparse,
    exactly as inference does (WanPipeline + BladeStudentScheduler + the ASA handle's dense_steps = 1); the fake
    matching step 0 runs dense and the fake matching step 1 sparse, whatever tau (the handle's tracker, which infers
    the step from timestep order, would have followed the order of training's forwards instead)."""
    from blade.distill.sampler import BladeStudentScheduler

    pipe, obj = _tiny_with_distinct_adapters(False, asa=True, asa_block_size=16, dense_steps=1)
    handle = obj.asa
    g = torch.Generator().manual_seed(0)
    noise, emb = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)

    def sample_training(dense_steps: int) -> torch.Tensor:
        obj.config = dataclasses.replace(obj.config, dense_steps=dense_steps)
        torch.manual_seed(3)  # the prober's draws
        with torch.no_grad():
            return obj.sample(noise, emb, torch.Generator().manual_seed(11))

    want, all_sparse, all_dense = sample_training(1), sample_training(0), sample_training(2)
    assert not torch.allclose(want, all_sparse, atol=1e-4) and not torch.allclose(want, all_dense, atol=1e-4)

    lora.activate(obj.transformer, lora.STUDENT)
    handle.enabled, handle.dense_steps = True, 1
    handle.reset()
    pipe.scheduler = BladeStudentScheduler(num_anchors=2, eta=0.9)
    pipe.scheduler.set_generator(torch.Generator().manual_seed(11))
    torch.manual_seed(3)
    with torch.no_grad():
        got = pipe(prompt_embeds=emb, guidance_scale=1.0, num_inference_steps=2, latents=noise.clone(),
                   num_frames=9, height=64, width=64, output_type="latent", return_dict=False)[0]
    assert handle.stats()["sparsity"] > 0
    assert torch.allclose(got.float(), want, atol=1e-5)

    handle.dense_steps = 0
    obj.config = dataclasses.replace(obj.config, dense_steps=1)
    neg = torch.zeros_like(emb)
    for i, sparse_calls in ((0, False), (1, True)):
        draw = StepDraw(i=i, t_i=obj.anchors[i], t_mid=segment_end(obj.anchors, i))
        x_ti = torch.randn(noise.shape, generator=g)
        handle.reset()
        obj.fake_loss(x_ti, draw, emb, neg, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
        assert (handle.stats()["calls"] > 0) == sparse_calls, i


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_default_anchors_sit_at_the_teachers_own_k_step_timesteps(family, tmp_path):
    """With the trainer's default shift (the folder's flow_shift), the student's 8 anchors condition the transformer at
    the model timesteps of the teacher scheduler's own 8-step schedule, as diffusers sets it (within rounding): UniPC
    shift 3 for Wan (999, 954, 900, ...), DDIM trailing for CogVideoX (999, 874, ...)."""
    from blade.families import get_family, scheduler_flow_shift
    from blade.testing.tiny import build_tiny_cogvideox_pipeline

    pipe = build_tiny_wan_pipeline(seed=0) if family == "wan" else build_tiny_cogvideox_pipeline(seed=0)
    tdm_family = get_family(family).build_tdm_family(pipe)  # shift None: the pipeline scheduler's
    if family == "wan":
        assert tdm_family.schedule.shift == scheduler_flow_shift(pipe.scheduler.config) == 3.0
    objective = TDMObjective(torch.nn.Identity(), tdm_family, TDMConfig(k_step=8))
    anchors = torch.tensor(objective.anchors, dtype=torch.float64)
    model_t = tdm_family.schedule.model_timestep(anchors) if family == "wan" else anchors
    pipe.scheduler.set_timesteps(8)
    stock = pipe.scheduler.timesteps.double()
    assert torch.allclose(model_t.double(), stock, atol=3.0), (model_t, stock)
