"""One optimizer step of sparsity-aware TDM distillation: `TDMStep`, the body of the trainer's loop.

`logs = step(batches, state)` takes micro-batches of prompt embeddings up to the gradient-accumulation boundary,
runs the phase's losses with their backward passes, steps the fake-score and student optimizers, updates the
student EMA and advances ``state["global_step"]``. The phases, by optimizer step (`training_phase`):

- "reflow" (first ``--reflow_steps``): the student regresses onto the teacher's ODE samples (`blade.distill.reflow`);
- "fake_warmup" (next ``--fake_warmup_steps``): only the fake score trains, on fresh student rollouts;
- "tdm": ``--fake_updates`` fake-score updates, then one generator update, on one student rollout (with
  ``--reflow_weight`` the generator's loss also holds the weighted regression onto the teacher's ODE samples).

Bit-identical resume depends on the order of the random draws, so it is fixed here: noise (noise generator), the
fake draws then the generator draw (draw generator), the rollout, then each loss's own draws in call order (the
regression term's pair and anchor draws come last).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blade.collectives import collective_in_place
from blade.distill import lora
from blade.distill.reflow import reflow_loss
from blade.distill.tdm import TDMObjective
from blade.training.runtime import CheckpointError, NonFiniteError, find_latest_checkpoint

__all__ = ["StudentEMA", "TDMStep", "make_schedulers", "optimizer_step", "sync_gradients", "training_phase"]


def training_phase(args, global_step: int) -> str:
    """"reflow" for the first --reflow_steps, then "fake_warmup" for --fake_warmup_steps, then "tdm"."""
    if global_step < args.reflow_steps:
        return "reflow"
    if global_step < args.reflow_steps + args.fake_warmup_steps:
        return "fake_warmup"
    return "tdm"


# ----------------------------------------------------------------------------------------------------------------
# Optimizers (no DDP wrapper: one base transformer carries both adapters, see blade.distill.trainer)
# ----------------------------------------------------------------------------------------------------------------


def adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """The released recipe's optimizer for either LoRA (beta1 = 0: no momentum across the alternating updates)."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.0, 0.95), weight_decay=1e-4, eps=1e-8)


def make_schedulers(args, opt_g: torch.optim.Optimizer, opt_f: torch.optim.Optimizer):
    """(student, fake) learning-rate schedulers: --lr_scheduler for the student, constant for the fake score."""
    from diffusers.optimization import get_scheduler

    # The student's schedule runs over its own updates: fake-only warm-up steps do not step it.
    extra = {"num_cycles": 1} if args.lr_scheduler == "cosine_with_restarts" else {}
    sched_g = get_scheduler(args.lr_scheduler, optimizer=opt_g, num_warmup_steps=args.lr_warmup_steps,
                            num_training_steps=max(1, args.max_train_steps - args.fake_warmup_steps), **extra)
    sched_f = get_scheduler("constant", optimizer=opt_f)
    return sched_g, sched_f


def sync_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average the LoRA gradients over processes (a missing grad counts as zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if accelerator.num_processes == 1:
        return
    collective_in_place([p.grad for p in params], lambda flat: accelerator.reduce(flat, reduction="mean"))


def optimizer_step(accelerator, optimizer, scheduler, params, max_grad_norm: float = 1.0) -> float:
    """Average the gradients over processes, clip, step the optimizer and its scheduler; returns the grad norm."""
    sync_gradients(accelerator, params)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


class StudentEMA:
    """Exponential moving average of the student LoRA parameters (fp32 shadow), swapped in to save or evaluate."""

    FILE = "student_ema.safetensors"

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema_decay must be in (0, 1), got {decay}")
        self.params, self.decay = params, decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, saved):
                    p.copy_(v)

    def save(self, folder: Path) -> None:
        save_file({str(i): s.cpu().contiguous() for i, s in enumerate(self.shadow)}, str(folder / self.FILE))

    def load(self, folder: Path) -> None:
        path = folder / self.FILE
        if not path.is_file():
            raise CheckpointError(f"{folder} has no {self.FILE}: it was written without --ema_decay")
        tensors = load_file(str(path))
        for i, s in enumerate(self.shadow):
            s.copy_(tensors[str(i)].to(s.device))


# ----------------------------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------------------------


class TDMStep:
    """Everything one optimizer step changes or draws from, and the step itself.

    Holds the objective (one transformer: student, fake and teacher roles), the two LoRA optimizers and their
    learning-rate schedulers (`optimizers` / `schedulers`, keys "g" and "fake"), the student EMA (or None), and the
    private random streams (`generators`: "noise" on the device, "draw" on the CPU; seeded per process) that the
    checkpoint saves with the optimizers.

    Args:
        args: the trainer's flags (learning rates, phases, --fake_updates, accumulation, --diag_every, ...).
        accelerator: for the device, process index and the cross-process reductions.
        objective: the TDM losses on the transformer carrying the "student" and "fake" adapters.
        neg: [L, D] negative-prompt embedding (the teacher's CFG), on the device.
        shape: latent shape of one micro-batch (its batch size is taken from each batch of embeddings).
    """

    def __init__(self, args: argparse.Namespace, accelerator, objective: TDMObjective, neg: torch.Tensor,
                 shape: tuple[int, ...]):
        self.args, self.accelerator, self.objective = args, accelerator, objective
        self.neg, self.shape = neg, shape
        self.device = accelerator.device
        self.accum = args.gradient_accumulation_steps
        self.params_g = lora.adapter_parameters(objective.transformer, lora.STUDENT)
        self.params_f = lora.adapter_parameters(objective.transformer, lora.FAKE)
        opt_g, opt_f = adamw(self.params_g, args.learning_rate_g), adamw(self.params_f, args.learning_rate_fake)
        sched_g, sched_f = make_schedulers(args, opt_g, opt_f)
        self.optimizers = {"g": opt_g, "fake": opt_f}
        self.schedulers = {"g": sched_g, "fake": sched_f}
        self.ema = StudentEMA(self.params_g, args.ema_decay) if args.ema_decay > 0 else None
        rank = accelerator.process_index
        self.generators = {
            "noise": torch.Generator(self.device).manual_seed(args.seed * 1000 + rank),
            "draw": torch.Generator().manual_seed(args.seed * 1000 + 500 + rank),
        }
        self.reflow_pairs: dict[str, torch.Tensor] | None = None  # {"noise", "x0", "emb"}: set for --reflow_steps
        self.last_batch: torch.Tensor | None = None  # the step's last micro-batch (the NaN guard names its cause)
        self._fake_backwards = 0  # fake losses back-propagated since the last fake optimizer step

    def __call__(self, batches: Iterator[torch.Tensor], state: dict) -> dict:
        """One optimizer step on the next micro-batches of `batches`; returns its logs (the last micro-batch's losses).

        ``state`` is the trainer's position: "micro_step" (advanced by the batch stream) marks the accumulation
        boundary, "global_step" and "generator_updates" are advanced here.
        """
        phase = training_phase(self.args, state["global_step"])
        sync = False
        while not sync:
            emb = next(batches).to(self.device)
            sync = state["micro_step"] % self.accum == 0
            logs = {"phase": phase}
            if phase == "reflow":
                logs.update(self._reflow_losses(emb))
                logs["loss_g"] = logs["loss_reflow"]
            else:
                logs.update(self._tdm_losses(emb, phase, sync, state["global_step"]))
        self.last_batch = emb
        if phase != "fake_warmup":
            opt_g, sched_g = self.optimizers["g"], self.schedulers["g"]
            logs["grad_norm_g"] = optimizer_step(self.accelerator, opt_g, sched_g, self.params_g)
            state["generator_updates"] = state.get("generator_updates", 0) + 1
            if self.ema is not None:
                self.ema.update()
        state["global_step"] += 1
        logs.update({"generator_updates": state.get("generator_updates", 0),
                     "lr": self.schedulers["g"].get_last_lr()[0], "lr_fake": self.schedulers["fake"].get_last_lr()[0]})
        return logs

    def _backward(self, loss: torch.Tensor) -> None:
        # Right after the loss, before any other forward: each loss leaves its own adapter active, and a
        # gradient-checkpointed backward recomputes the blocks with whatever adapter is active then.
        (loss / self.accum).backward()

    def _reflow_losses(self, emb: torch.Tensor, weight: float = 1.0) -> dict:
        """The student's regression onto the teacher's ODE pairs (the pool, not `emb`: the loader only paces the
        epoch, with the same prompts in a seeded order), back-propagated with `weight`. Logs the unweighted
        ``loss_reflow``; in the "reflow" phase (weight 1) it is also the generator's ``loss_g``."""
        pairs, draw_gen = self.reflow_pairs, self.generators["draw"]
        pick = torch.randint(0, pairs["x0"].shape[0], (emb.shape[0],), generator=draw_gen)
        loss, extra = reflow_loss(self.objective, pairs["x0"][pick], pairs["noise"][pick], pairs["emb"][pick],
                                  draw_gen)
        self._backward(weight * loss)
        return {k: float(v) for k, v in extra.items()}

    def _tdm_losses(self, emb: torch.Tensor, phase: str, sync: bool, global_step: int) -> dict:
        """One student rollout; --fake_updates fake-score losses (each stepped at `sync`), then the generator loss
        (phase "tdm"). The fake draws come before the generator's: the rollout goes as deep as the deepest."""
        objective, args = self.objective, self.args
        noise_gen, draw_gen = self.generators["noise"], self.generators["draw"]
        batch = emb.shape[0]
        negb = self.neg.unsqueeze(0).expand(batch, -1, -1)
        noise = torch.randn((batch, *self.shape[1:]), generator=noise_gen, device=self.device)
        draws_f = [objective.draw_step(draw_gen, batch) for _ in range(args.fake_updates)]
        draw_g = objective.draw_step(draw_gen, batch) if phase == "tdm" else None
        deepest = max(d.deepest for d in (*draws_f, draw_g) if d is not None)
        states = objective.rollout(noise, emb, deepest, noise_gen)
        diagnose = args.diag_every > 0 and (global_step + 1) % args.diag_every == 0
        logs = {}
        for r, draw_f in enumerate(draws_f):
            loss_f, extra = objective.fake_loss(objective.state_at(states, draw_f), draw_f, emb, negb, noise_gen,
                                                draw_gen, diagnose=diagnose and r == 0)
            threshold = objective.config.fake_skip_threshold
            skip = threshold is not None and float(loss_f.detach()) > threshold
            if not skip:
                self._backward(loss_f)
                self._fake_backwards += 1
            if r == 0:
                logs.update({"loss_fake": float(loss_f.detach()), "fake_skipped": float(skip),
                             **{k: float(v) for k, v in extra.items()}})
            if sync:
                norm = self._fake_update()
                if norm is not None:
                    logs["grad_norm_fake"] = norm
        if draw_g is not None:
            x_ti = objective.state_at(states, draw_g)
            loss_g, extra_g = objective.generator_loss(x_ti, draw_g, emb, negb, noise_gen, draw_gen)
            self._backward(loss_g)
            logs.update({"loss_g": float(loss_g.detach()), **{k: float(v) for k, v in extra_g.items()}})
            if args.reflow_weight > 0:  # a second backward into the same student gradients, before the optimizer step
                logs.update(self._reflow_losses(emb, args.reflow_weight))
        return logs

    def _fake_update(self) -> float | None:
        """Step the fake score (its grad norm), or drop its gradients (None) when every process skipped its loss:
        the decision is shared so that the processes stay in lockstep."""
        count = torch.tensor(float(self._fake_backwards), device=self.device)
        self._fake_backwards = 0
        opt_f, sched_f = self.optimizers["fake"], self.schedulers["fake"]
        if float(self.accelerator.reduce(count, reduction="sum")) > 0:
            return optimizer_step(self.accelerator, opt_f, sched_f, self.params_f)
        opt_f.zero_grad(set_to_none=True)
        return None

    def averaged_student(self) -> AbstractContextManager:
        """The student weights to save or evaluate: the EMA's swapped in (with --ema_decay), else the raw ones."""
        return self.ema.swapped_in() if self.ema is not None else nullcontext()

    def guard_finite(self, step: int, logs: dict) -> None:
        """Stop at the first non-finite loss, gradient norm or LoRA weight, before the step's checkpoint is written.

        Every process takes the same decision (one max-reduce of a flag), so none waits forever at a collective.
        The message names the step, what went non-finite, the likely cause and the checkpoint to go back to.
        """
        args, emb = self.args, self.last_batch
        watched = ("loss_fake", "loss_g", "grad_norm_g", "grad_norm_fake")
        bad = [k for k in watched if k in logs and not math.isfinite(logs[k])]
        for name, params in (("student", self.params_g), ("fake", self.params_f)):
            if params and not bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all()):
                bad.append(f"{name} LoRA weights")
        flag = torch.tensor(float(bool(bad)), device=self.device)
        if float(self.accelerator.reduce(flag, reduction="max")) == 0:
            return
        emb_max = float(emb.detach().float().abs().max()) if emb.numel() else 0.0
        if not math.isfinite(emb_max):
            cause = f"non-finite prompt embeddings (corrupt prompt cache {args.prompt_dir}: re-run the prompt CLI)"
        elif emb_max > 1e4:
            cause = (f"prompt embeddings with huge values (max |x| = {emb_max:.3g}; a corrupt prompt cache "
                     f"{args.prompt_dir}? re-run the prompt CLI)")
        elif args.mixed_precision == "fp16":
            cause = "fp16 overflow (try --mixed_precision bf16)"
        else:
            cause = (f"diverging training (learning rates {args.learning_rate_g:g} / {args.learning_rate_fake:g} too "
                     "high?)")
        latest = find_latest_checkpoint(Path(args.output_dir))
        back = (f"the last complete checkpoint is {latest} (written before this step; resume from it with "
                "--resume_from_checkpoint)" if latest else "no checkpoint was written")
        raise NonFiniteError(
            f"step {step}: non-finite {', '.join(bad) or 'values on another process'}; likely cause: {cause}. "
            f"Training stopped without saving this step: {back}"
        )
