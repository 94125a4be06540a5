"""The distillation study's recipe options (issue 16) against hand-derived values and stock diffusers sampling."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from blade.distill import lora
from blade.distill.reflow import reflow_loss, teacher_ode_pairs
from blade.distill.tdm import TDMConfig, TDMObjective, sample_tau, teacher_gap_weight, wan_family
from blade.distill.trainer import StudentEMA, training_phase
from blade.testing.tiny import build_tiny_wan_pipeline
from tests.test_tdm import _calls, _MockObjective, _tiny_with_distinct_adapters

ROOT = Path(__file__).resolve().parents[1]


def test_l2_generator_loss_with_normalisation_by_hand():
    """0.5 * mean((x0 - target)^2) per sample, times 1 / mean|x0 - teacher_cfg| (capped): DMD2's loss; its gradient is
    the score difference (fake - teacher) itself, not its sign."""
    shape, cfg_scale = (2, 3, 4, 5), 4.0
    config = TDMConfig(k_step=8, cfg=cfg_scale, generator_loss="l2", normalize_generator=True, normalize_cap=50.0)
    obj = _MockObjective(shape, config)
    g = torch.Generator().manual_seed(0)
    x_ti = torch.randn(shape, generator=g)
    emb, neg = torch.ones(2, 3, 8), -torch.ones(2, 3, 8)
    draw = obj.draw_step(torch.Generator().manual_seed(3))
    loss, logs = obj.generator_loss(x_ti, draw, emb, neg, g, torch.Generator().manual_seed(4))
    loss.backward()
    (_, x_tau, tau, _), = _calls(obj, "fake")
    x_ti, s_i = x_ti.double(), draw.t_i / 1000
    x0 = x_ti - s_i * 0.4 * x_ti  # the mock student: v = 0.4 x
    x0_teacher, x0_fake = obj.reference_x0(x_tau, tau, cfg_scale)
    d = x0_fake - x0_teacher
    weight = 1.0 / (x0 - x0_teacher).abs().flatten(1).mean(1)
    want = (weight * 0.5 * d.pow(2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    n = d[0].numel()
    grad_x0 = weight.view(-1, 1, 1, 1) * d / (n * shape[0])
    assert torch.allclose(obj.delta.grad.double(), -s_i * grad_x0, rtol=1e-3, atol=1e-8)
    assert logs["score_gap"].item() == pytest.approx(d.abs().mean().item(), rel=1e-4)
    # the weight helper agrees with the hand value (cap far above)
    assert torch.allclose(teacher_gap_weight(x0, x0_teacher, cap=50.0).double(), weight, rtol=1e-5)


def test_tau_mode_segment_keeps_tau_in_the_step_segment():
    obj = _MockObjective((2, 3, 4, 5), TDMConfig(k_step=8, tau_mode="segment"))
    g = torch.Generator().manual_seed(0)
    for seed in range(6):
        draw = obj.draw_step(torch.Generator().manual_seed(seed))
        obj.calls.clear()
        obj.fake_loss(torch.randn(2, 3, 4, 5, generator=g), draw, torch.ones(2, 3, 8), -torch.ones(2, 3, 8), g,
                      torch.Generator().manual_seed(seed))
        (_, _, tau, _), = _calls(obj, "fake")
        assert torch.all(tau > draw.t_mid) and torch.all(tau <= draw.t_i)
    with pytest.raises(ValueError, match="tau_mode"):
        TDMConfig(tau_mode="nope")
    assert sample_tau(874, 1000, 999, torch.Generator().manual_seed(0)).min() >= 875


def test_fake_loss_diagnose_logs_the_teacher_error_on_the_same_batch():
    obj = _MockObjective((2, 3, 4, 5), TDMConfig(k_step=8))
    g = torch.Generator().manual_seed(2)
    x_ti = torch.randn(2, 3, 4, 5, generator=g)
    draw = obj.draw_step(torch.Generator().manual_seed(1))
    _, logs = obj.fake_loss(x_ti, draw, torch.ones(2, 3, 8), -torch.ones(2, 3, 8), g, torch.Generator(), diagnose=True)
    (_, x_tau, tau, _), = _calls(obj, "fake")
    (_, xt, tt, et), = _calls(obj, "teacher")  # conditional teacher, on the fake's own noisy samples
    assert torch.equal(xt, x_tau) and torch.equal(tt, tau) and et.mean() == 1
    x_tau, s_tau = x_tau.double(), (tau.double() / 1000).view(-1, 1, 1, 1)
    x0 = x_ti.double() - draw.t_i / 1000 * 0.4 * x_ti.double()
    want = ((0.2 * x_tau + 1.0 - (x_tau - x0) / s_tau) ** 2).mean()  # velocity error of v = 0.2 x + mean(emb)
    assert logs["loss_teacher_dsm"].item() == pytest.approx(want.item(), rel=1e-4)


def _tiny_objective(fake_attention: str, asa: bool, checkpointing: bool = False) -> TDMObjective:
    """test_tdm's tiny Wan with distinct adapters, with or without ASA, and its objective."""
    return _tiny_with_distinct_adapters(checkpointing, asa=asa, fake_attention=fake_attention)[1]


def test_dense_fake_attention_runs_the_fake_dense_and_the_student_sparse():
    """--fake_attention dense: the fake's prediction equals the same weights with no ASA at all (768 tokens = 6 key
    blocks, ASA keeps 2: the sparse fake differs), the student's stays the sparse one, and the fake's gradient through
    checkpointed blocks (recomputed in backward after the teacher ran) equals the plain backward's."""
    dense_fake, sparse_fake = _tiny_objective("dense", asa=True), _tiny_objective("asa", asa=True)
    no_asa = _tiny_objective("asa", asa=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(dense_fake.family.latent_shape(1, 9, 256, 256), generator=g)
    emb = torch.randn(1, 8, 32, generator=g)
    t = torch.tensor([600.0])
    with torch.no_grad():
        reference = {role: no_asa.predict(role, x, t, emb) for role in ("student", "fake")}
        def student_of(obj):  # the prober samples from the global RNG (ASAConfig.seed None): same draws for both
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(5)
                return obj.predict("student", x, t, emb)

        student = student_of(dense_fake)
        assert torch.allclose(student, student_of(sparse_fake), atol=1e-6)
        assert not torch.allclose(student, reference["student"], atol=1e-3)
        assert torch.allclose(dense_fake.predict("fake", x, t, emb), reference["fake"], atol=1e-5)
        assert not torch.allclose(sparse_fake.predict("fake", x, t, emb), reference["fake"], atol=1e-3)
        assert torch.allclose(dense_fake.predict("fake", x, t, emb), reference["fake"], atol=1e-5)  # after a switch
    with pytest.raises(ValueError, match="fake_attention"):
        TDMConfig(fake_attention="flash")

    def fake_grads(obj):
        d = torch.Generator().manual_seed(1)
        torch.manual_seed(5)  # the student's sparse rollout inside the loss: the same prober draws for both
        loss, _ = obj.fake_loss(x, obj.draw_step(d), emb, torch.zeros_like(emb), torch.Generator().manual_seed(2), d,
                                diagnose=True)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in lora.adapter_parameters(obj.transformer, lora.FAKE)])

    with torch.random.fork_rng(devices=[]):
        plain = fake_grads(_tiny_objective("dense", asa=True))
        checkpointed = fake_grads(_tiny_objective("dense", asa=True, checkpointing=True))
    assert plain.abs().sum() > 0 and torch.allclose(plain, checkpointed, rtol=1e-4, atol=1e-7)


def test_diagnose_logs_the_fakes_own_sparse_attention_error():
    """fake_asa_error = mean |x0 of the fake with ASA - x0 of the fake dense| on the fake loss's own batch, recomputed
    by hand from the same draws (the prober's global-RNG draws replayed in the same order: student, then sparse fake),
    whichever attention the fake trains with; absent without ASA."""
    g = torch.Generator().manual_seed(0)
    obj = _tiny_objective("dense", asa=True)
    x = torch.randn(obj.family.latent_shape(1, 9, 256, 256), generator=g)
    emb = torch.randn(1, 8, 32, generator=g)
    draw = obj.draw_step(torch.Generator().manual_seed(1))
    sched = obj.family.schedule

    def run(o):
        torch.manual_seed(5)
        return o.fake_loss(x, draw, emb, torch.zeros_like(emb), torch.Generator().manual_seed(2),
                           torch.Generator().manual_seed(3), diagnose=True)[1]

    with torch.random.fork_rng(devices=[]):
        logged = run(obj)["fake_asa_error"]
        ref = _tiny_objective("asa", asa=True)  # its "fake" role is the sparse fake
        torch.manual_seed(5)
        with torch.no_grad():
            t_i = torch.full((1,), float(draw.t_i))
            out = ref.predict("student", x, t_i, emb)
            draws = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
            _, x_tau, tau = ref._segment(out, x, draw, *draws)
            sparse = sched.to_x0(ref.predict("fake", x_tau, tau, emb), x_tau, tau)
            dense = sched.to_x0(_tiny_objective("asa", asa=False).predict("fake", x_tau, tau, emb), x_tau, tau)
        assert logged.item() == pytest.approx((sparse - dense).abs().mean().item(), rel=1e-4)
        assert logged.item() > 1e-3
        assert "fake_asa_error" in run(_tiny_objective("asa", asa=True))
        assert "fake_asa_error" not in run(_tiny_objective("asa", asa=False))


def test_training_phases_in_order():
    args = SimpleNamespace(reflow_steps=2, fake_warmup_steps=3)
    assert [training_phase(args, s) for s in range(7)] == ["reflow"] * 2 + ["fake_warmup"] * 3 + ["tdm"] * 2
    assert training_phase(SimpleNamespace(reflow_steps=0, fake_warmup_steps=0), 0) == "tdm"


def test_student_ema_by_hand_and_swap_restores():
    p = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    ema = StudentEMA([p], decay=0.9)
    with torch.no_grad():
        p.copy_(torch.tensor([1.0, 3.0]))
    ema.update()
    assert torch.allclose(ema.shadow[0], torch.tensor([0.1, 1.2]))  # 0.9 * old + 0.1 * new
    with ema.swapped_in():
        assert torch.allclose(p, torch.tensor([0.1, 1.2]))
    assert torch.equal(p.detach(), torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError):
        StudentEMA([p], decay=1.0)


def test_teacher_ode_pairs_equal_the_stock_pipeline_sampler():
    """The reflow pairs are the teacher's own sample: WanPipeline from the same latents, embeddings, steps and CFG."""
    pipe = build_tiny_wan_pipeline(seed=0)
    lora.add_student_and_fake(pipe.transformer, rank=4, alpha=4)  # the teacher role is the base, adapters off
    obj = TDMObjective(pipe.transformer, wan_family(pipe), TDMConfig(k_step=4))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 16, 3, 2, 2, generator=g)
    emb, neg = torch.randn(2, 8, 32, generator=g), torch.randn(8, 32, generator=g)
    ours = teacher_ode_pairs(obj, pipe.scheduler, noise, emb, neg, num_steps=5, cfg=3.0, batch_size=1)
    with lora.adapters_disabled(pipe.transformer):
        stock = pipe(prompt_embeds=emb, negative_prompt_embeds=neg.expand(2, -1, -1), latents=noise.clone(),
                     num_inference_steps=5, guidance_scale=3.0, height=16, width=16, num_frames=9,
                     output_type="latent").frames
    torch.testing.assert_close(ours, stock.float(), rtol=1e-4, atol=1e-5)


def test_reflow_loss_regresses_x0_on_the_noise_to_sample_line():
    obj = _MockObjective((3, 2, 4), TDMConfig(k_step=8))
    g = torch.Generator().manual_seed(0)
    x0_t, z = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    loss, _ = reflow_loss(obj, x0_t, z, torch.ones(3, 2, 8), torch.Generator().manual_seed(7))
    (_, x_t, t, _), = _calls(obj, "student")
    s = (t.double() / 1000).view(-1, 1, 1)
    assert all(float(v) in obj.anchors for v in t)
    torch.testing.assert_close(x_t.double(), (1 - s) * x0_t.double() + s * z.double())  # on the line
    x0_student = x_t.double() - s * 0.4 * x_t.double()
    assert loss.item() == pytest.approx(((x0_student - x0_t.double()) ** 2).mean().item(), rel=1e-5)


@pytest.mark.slow
def test_trainer_runs_the_phases_and_evaluates_on_tinyworld(tmp_path):
    """A reflow step, a fake warm-up step and two TDM steps (2 fake updates, EMA, L2 loss, ASA, the regression term
    beside TDM) on the bundled TinyWorld model at a tiny video size; logs.jsonl records each phase, eval.jsonl the
    evaluations."""
    from blade.distill.trainer import main
    from blade.prompt_cli import WAN
    from blade.prompt_cli import main as encode_main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a large red circle moves right on a black background\n"
                       "a small blue square stays still on a gray background\n")
    model = ROOT / "assets" / "tinyworld" / "pipeline"
    assert encode_main(WAN, ["--input_file", str(prompts), "--output_dir", str(tmp_path / "cache"),
                               "--model_path", str(model), "--max_length", "32", "--negative_prompt", "",
                               "--num_validation", "1", "--device", "cpu"]) == 0
    out = tmp_path / "run"
    main("wan", ["--pretrained_model_name_or_path", str(model), "--prompt_dir", str(tmp_path / "cache"),
                 "--output_dir", str(out), "--num_frames", "5", "--height", "32", "--width", "32",
                 "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "4",
                 "--validation_steps", "0", "--report_to", "none", "--reflow_steps", "1", "--reflow_pairs", "2",
                 "--reflow_teacher_steps", "2", "--reflow_weight", "0.5", "--fake_warmup_steps", "1",
                 "--fake_updates", "2",
                 "--ema_decay", "0.5", "--use_sparsity", "--eval_every", "2", "--eval_prompts", str(prompts),
                 "--diag_every", "1"])
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in logs] == ["reflow", "fake_warmup", "tdm", "tdm"]
    assert [r["generator_updates"] for r in logs] == [1, 1, 2, 3]
    assert "loss_reflow" in logs[0] and "grad_norm_fake" not in logs[0]
    assert all("loss_reflow" in logs[i] for i in (2, 3))  # --reflow_weight: the regression beside TDM
    assert "grad_norm_fake" in logs[1] and "loss_g" not in logs[1]
    assert all(math.isfinite(logs[i][k]) for i in (2, 3) for k in ("loss_g", "loss_fake", "loss_teacher_dsm"))
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert all(0.0 <= e["eval_adherence"] <= 1.0 and "eval_raw_adherence" in e for e in evals)
    assert (out / "checkpoint-4" / StudentEMA.FILE).is_file() and (out / "reflow_pairs_0.pt").is_file()
    # the LoRA in the run folder is the average, raw_student/ the raw weights: different tensors, same keys
    from safetensors.torch import load_file

    from blade.distill.trainer import RAW_STUDENT_FOLDER
    averaged = load_file(str(out / "pytorch_lora_weights.safetensors"))
    raw = load_file(str(out / RAW_STUDENT_FOLDER / "pytorch_lora_weights.safetensors"))
    assert averaged.keys() == raw.keys() and (out / RAW_STUDENT_FOLDER / "blade_config.json").is_file()
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw)
