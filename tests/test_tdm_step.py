"""TDMStep (blade/distill/step.py): what one call consumes, updates and logs, on the tiny Wan transformer (CPU)."""

import argparse
import itertools
from types import SimpleNamespace

import pytest
import torch

from blade.distill import lora
from blade.distill.step import TDMStep
from blade.distill.tdm import TDMConfig, TDMObjective, wan_family
from blade.testing.tiny import build_tiny_wan_pipeline
from blade.training.runtime import NonFiniteError


class _OneProcess(SimpleNamespace):
    """What TDMStep needs of an Accelerator on one CPU process."""

    def __init__(self):
        super().__init__(device=torch.device("cpu"), process_index=0, num_processes=1)

    @staticmethod
    def reduce(tensor, reduction):
        return tensor


def _step(fake_skip=None, **flags) -> tuple[TDMStep, list]:
    pipe = build_tiny_wan_pipeline(seed=0)
    torch.manual_seed(0)
    lora.add_student_and_fake(pipe.transformer, rank=4, alpha=4)
    family = wan_family(pipe)
    objective = TDMObjective(pipe.transformer, family, TDMConfig(k_step=2, cfg=3.0, fake_skip_threshold=fake_skip))
    args = argparse.Namespace(seed=3, learning_rate_g=1e-2, learning_rate_fake=1e-2, lr_scheduler="constant",
                              lr_warmup_steps=0, max_train_steps=10, fake_warmup_steps=0, reflow_steps=0,
                              reflow_weight=0.0, gradient_accumulation_steps=1, fake_updates=1, diag_every=0,
                              ema_decay=0.0, prompt_dir="p", output_dir="o", mixed_precision="no")
    vars(args).update(flags)
    step = TDMStep(args, _OneProcess(), objective, torch.zeros(8, 32), family.latent_shape(2, 9, 16, 16))
    return step, [p.detach().clone() for p in step.params_g + step.params_f]


def _batches(state):
    """An endless prompt stream that advances the micro-step counter as `trainer.prompt_batches` does."""
    g = torch.Generator().manual_seed(0)
    for _ in itertools.count():
        state["micro_step"] += 1
        yield torch.randn(2, 8, 32, generator=g)


def _moved(before, params) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, params))


def test_one_call_is_one_optimizer_step_over_the_accumulated_micro_batches():
    step, before = _step(gradient_accumulation_steps=3, ema_decay=0.5)
    state = {"global_step": 0, "micro_step": 0}
    logs = step(_batches(state), state)
    assert state["micro_step"] == 3 and state["global_step"] == 1 and state["generator_updates"] == 1
    assert logs["phase"] == "tdm" and {"loss_fake", "loss_g", "grad_norm_fake", "grad_norm_g", "lr"} <= logs.keys()
    n = len(step.params_g)
    assert _moved(before[:n], step.params_g) and _moved(before[n:], step.params_f)
    assert _moved(step.ema.shadow, step.params_g)  # the EMA lags the raw student
    with step.averaged_student():
        assert not _moved(step.ema.shadow, step.params_g)
    step.guard_finite(1, logs)  # finite: passes


def test_fake_warmup_leaves_the_student_and_skipped_fake_losses_leave_the_fake():
    step, before = _step(fake_warmup_steps=1)
    state = {"global_step": 0, "micro_step": 0}
    logs = step(_batches(state), state)
    n = len(step.params_g)
    assert logs["phase"] == "fake_warmup" and "loss_g" not in logs and "grad_norm_g" not in logs
    assert not _moved(before[:n], step.params_g) and _moved(before[n:], step.params_f)
    assert state.get("generator_updates", 0) == 0 and logs["generator_updates"] == 0

    step, before = _step(fake_skip=1e-12)  # every fake loss is above it: no fake update, the student still steps
    logs = step(_batches(state := {"global_step": 0, "micro_step": 0}), state)
    assert logs["fake_skipped"] == 1.0 and "grad_norm_fake" not in logs
    assert _moved(before[:n], step.params_g) and not _moved(before[n:], step.params_f)


def test_guard_finite_names_the_step_and_the_cause():
    step, _ = _step()
    state = {"global_step": 0, "micro_step": 0}
    logs = step(_batches(state), state)
    with pytest.raises(NonFiniteError, match="step 1: non-finite loss_g.*diverging training"):
        step.guard_finite(1, {**logs, "loss_g": float("nan")})


def test_reflow_weight_adds_the_weighted_regression_gradient_to_the_generator_step():
    """--reflow_weight w: the student's gradient is the TDM generator gradient plus w times the regression's, taken
    on the same draws (two identical steps, one without the term, then the term alone in the second)."""
    weight = 0.5
    grads, logs = {}, {}
    for w in (weight, 0.0):
        step, _ = _step(reflow_weight=w)
        shape = step.shape
        g = torch.Generator().manual_seed(1)
        step.reflow_pairs = {"noise": torch.randn(4, *shape[1:], generator=g),
                             "x0": torch.randn(4, *shape[1:], generator=g), "emb": torch.randn(4, 8, 32, generator=g)}
        emb = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
        logs[w] = step._tdm_losses(emb, "tdm", sync=False, global_step=0)
        grads[w] = [p.grad.detach().clone() for p in step.params_g]
        if w == 0.0:  # the regression term alone, from the draw generator's state where the weighted run drew it
            for p in step.params_g:
                p.grad = None
            alone = step._reflow_losses(emb)
            regression = [p.grad.detach().clone() for p in step.params_g]
    assert "loss_reflow" in logs[weight] and "loss_reflow" not in logs[0.0]
    assert logs[weight]["loss_g"] == logs[0.0]["loss_g"]  # loss_g stays the TDM term
    assert logs[weight]["loss_reflow"] == pytest.approx(alone["loss_reflow"], rel=1e-6)
    assert any(r.abs().max() > 0 for r in regression)
    for with_term, without, r in zip(grads[weight], grads[0.0], regression):
        torch.testing.assert_close(with_term, without + weight * r, rtol=1e-4, atol=1e-7)
