"""Trajectory regression onto the teacher's ODE solution: the control for TDM, and an optional warm-up phase.

Data-free, like TDM: the teacher's own sampler (its pipeline scheduler, e.g. 50 UniPC steps, with CFG) runs from
seeded noise ``z`` and cached prompt embeddings and gives pairs ``(z, x0_T(z))``. Along the line
``x_t = alpha_t x0_T + sigma_t z`` a deterministic (eta = 0) student step lands exactly on the next anchor's point of
the same line when its x0 prediction is exact (its implied noise is then ``z``), so regressing the student's x0 at
each anchor onto ``x0_T`` teaches it the teacher's ODE map in K steps (the rectified-flow "reflow" coupling used by
InstaFlow, written here for any ``x_t = alpha x0 + sigma eps`` schedule).

Sample with ``eta = 0``: the stochastic re-noising of the TDM sampler leaves the line this student was trained on.
"""

from __future__ import annotations

import copy

import torch

from blade.distill.tdm import TDMObjective, cfg_combine, guidance_scale


@torch.no_grad()
def teacher_ode_pairs(
    objective: TDMObjective,
    scheduler,
    noise: torch.Tensor,
    emb: torch.Tensor,
    neg: torch.Tensor,
    num_steps: int,
    cfg: float,
    batch_size: int = 32,
    cfg_2: float | None = None,
    boundary: float | None = None,
) -> torch.Tensor:
    """The teacher's CFG sample ``x0_T`` [N, ...] from each noise ``z`` [N, ...] (float32), ``num_steps`` of its
    scheduler (a diffusers scheduler, copied per batch: multistep solvers keep state). With `cfg_2` and `boundary`
    (two-expert models) the steps below the boundary use `cfg_2`, as WanPipeline's `guidance_scale_2`.

    Args:
        emb: [N, L, D] prompt embeddings; neg: [L, D] negative/unconditional embedding.
    """
    transformer, family = objective.transformer, objective.family
    dtype = objective.model_dtype or transformer.dtype
    out = torch.empty_like(noise, dtype=torch.float32)
    for start in range(0, noise.shape[0], batch_size):
        stop = min(start + batch_size, noise.shape[0])
        sched = copy.deepcopy(scheduler)
        sched.set_timesteps(num_steps, device=noise.device)
        x = noise[start:stop].float() * float(getattr(sched, "init_noise_sigma", 1.0))
        e = emb[start:stop].to(device=noise.device, dtype=dtype)
        n = neg.to(device=noise.device, dtype=dtype).unsqueeze(0).expand_as(e)
        for t in sched.timesteps:
            model_t = t.expand(x.shape[0]).to(device=noise.device, dtype=torch.float32)
            x_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            with objective.role("teacher"):
                cond = family.call(transformer, x_in.to(dtype), model_t, e).float()
                scale = guidance_scale(model_t, cfg, cfg_2, boundary)
                guided = torch.is_tensor(scale) or scale != 1.0
                uncond = family.call(transformer, x_in.to(dtype), model_t, n).float() if guided else cond
            x = sched.step(cfg_combine(cond, uncond, scale), t, x, return_dict=False)[0].float()
        out[start:stop] = x
    return out


def reflow_loss(
    objective: TDMObjective,
    x0_teacher: torch.Tensor,
    noise: torch.Tensor,
    emb: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, dict]:
    """Per-sample anchor ``t_i`` ~ U(anchors), ``x_t`` on the line, MSE of the student's x0 against ``x0_T``.

    Gradient reaches the "student" adapter only (the active role is left at "student" for a checkpointed backward).
    Args: x0_teacher, noise: [B, ...] latents; emb: [B, L, D].
    """
    batch, device = x0_teacher.shape[0], x0_teacher.device
    sched = objective.family.schedule
    anchors = torch.tensor(objective.anchors, dtype=torch.float32)
    index = torch.randint(0, len(objective.anchors), (batch,), generator=generator)
    t = anchors[index].to(device)
    x_t = sched.add_noise(x0_teacher.float(), noise.float(), t)
    out = objective.predict("student", x_t, t, emb)
    x0 = sched.to_x0(out, x_t, t)
    per_sample = (x0 - x0_teacher.float()).pow(2).flatten(1).mean(1)
    return per_sample.mean(), {"loss_reflow": per_sample.detach().mean()}
