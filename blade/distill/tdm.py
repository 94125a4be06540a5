"""Sparsity-aware TDM (Trajectory Distribution Matching) objective, schedule-agnostic.

One TDM iteration on a batch of prompt embeddings (see docs in `TDMObjective`):

1. student rollout over the K anchors ``t_0 > ... > t_{K-1}`` from pure noise, with eta re-noising (no grad);
2. pick a step ``i ~ U{0..K-1}``; ``t_mid`` = the next anchor (0 after the last); the student's stochastic step
   from ``x_{t_i}`` gives ``x0`` and ``x_mid``;
3. ``tau ~ U{t_mid+1..tau_max}`` and ``x_tau`` = exact forward diffusion of ``x_mid`` from ``t_mid`` to ``tau``;
4. fake-score update: regress the fake model's clean prediction at ``(x_tau, tau)`` on the (detached) student
   ``x0``, optionally pulled toward the dense teacher (``lambda_reg``);
5. generator update: pseudo-Huber between the student's ``x0`` (with grad) and
   ``stopgrad(x0 + x0_teacher_cfg(x_tau) - x0_fake(x_tau))``.

Latents keep the model's own layout (Wan ``[B, C, F, H, W]``, CogVideoX ``[B, F, C, H, W]``); every schedule
operation is element-wise with per-sample ``[B]`` timesteps, so the layout never matters here. All schedule
arithmetic is float32 (or float64); model calls run in the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from blade.distill import lora
from blade.distill.schedule import (
    FlowMatchingSchedule,
    NoiseSchedule,
    VPredictionDDPMSchedule,
    student_anchors,
    student_step,
)

# ----------------------------------------------------------------------------------------------------------------
# Per-family adapter
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TDMFamily:
    """Everything TDM needs to know about one model family.

    Attributes:
        name: "wan" | "cogvideox".
        schedule: the noise schedule (alpha, sigma, output <-> x0/eps conversions).
        channels_first: Wan latents are [B, C, F, H, W]; CogVideoX latents are [B, F, C, H, W].
        latent_channels, vae_scale_spatial, vae_scale_temporal: latent shape from (frames, height, width).
        fake_loss_space: "output" = MSE between model outputs (Wan: velocity MSE against v = (x_tau - x0)/sigma),
            "x0" = x0-space MSE weighted by 1/sigma_tau^2 (CogVideoX: 1/(1 - acp)). Both weightings are the same
            function of the x0 error (||dx0||^2 / sigma^2) for these two parameterisations; they differ only in
            where the difference is taken numerically, kept as each model's released code computed it.
        huber_mode: "scaled" (c = 1e-3/128 * sqrt(numel), Wan) or "l1" (c = 1e-3 / (128 * sqrt(numel)), CogVideoX;
            effectively an L1 loss).
        normalize_generator: divide the generator loss per sample by mean|x0 - x0_teacher_cfg| (CogVideoX, DMD2-style).
        call: ``call(transformer, x, model_t, emb) -> model output``, x in the family's layout.
        pipeline_class: the diffusers pipeline class (LoRA saving, decoding).
    """

    name: str
    schedule: NoiseSchedule
    channels_first: bool
    latent_channels: int
    vae_scale_spatial: int
    vae_scale_temporal: int
    fake_loss_space: str
    huber_mode: str
    normalize_generator: bool
    call: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    pipeline_class: type
    default_fake_skip: float | None = None
    extras: dict = field(default_factory=dict)

    def latent_shape(self, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        """Shape of the latent video for `num_frames` x `height` x `width` pixels."""
        frames = (num_frames - 1) // self.vae_scale_temporal + 1
        h, w = height // self.vae_scale_spatial, width // self.vae_scale_spatial
        if self.channels_first:
            return (batch, self.latent_channels, frames, h, w)
        return (batch, frames, self.latent_channels, h, w)

    def predict(
        self,
        transformer: torch.nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        emb: torch.Tensor,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Model output (float32) at schedule time `t` [B] for latents `x` and text embeddings `emb` [B, L, D].

        `dtype` is the frozen base weights' dtype (inputs are cast to it; LoRA weights may stay float32).
        """
        dtype = dtype or transformer.dtype
        model_t = self.schedule.model_timestep(t).to(device=x.device, dtype=torch.float32)
        out = self.call(transformer, x.to(dtype), model_t, emb.to(device=x.device, dtype=dtype))
        return out.float()


def _call_wan(transformer, x, model_t, emb):
    return transformer(hidden_states=x, timestep=model_t, encoder_hidden_states=emb, return_dict=False)[0]


def expanded_timesteps(model_t: torch.Tensor, x: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """Per-token timesteps ``[B, L]`` as WanPipeline passes them with ``expand_timesteps`` (Wan2.2 TI2V).

    WanPipeline gives every latent token (``L = F * ceil(H / p_h) * ceil(W / p_w)`` for latents ``[B, C, F, H, W]``,
    its ``mask[0][0][:, ::2, ::2]`` with patch 2) the step's ``t`` (a text-to-video mask is all ones); here each
    sample's own ``model_t [B]`` is repeated over its tokens.
    """
    _, p_h, p_w = patch_size
    frames, height, width = x.shape[2:]
    tokens = frames * -(-height // p_h) * -(-width // p_w)
    return model_t[:, None].expand(x.shape[0], tokens)


def _call_wan_expanded(transformer, x, model_t, emb):
    timestep = expanded_timesteps(model_t, x, tuple(transformer.config.patch_size))
    return _call_wan(transformer, x, timestep, emb)


def wan_family(pipe, shift: float = 1.0) -> TDMFamily:
    """Wan2.1: flow matching (velocity), [B, C, F, H, W] latents, velocity-space fake loss.

    `shift` = 1 puts the K anchors uniformly in sigma (the paper's uniform anchors, the released training code's
    intent); the denoiser is conditioned on 1000 * sigma(t) either way, so no timestep lookup is involved.
    A pipeline with ``expand_timesteps`` (Wan2.2 TI2V) gets one timestep per latent token, as WanPipeline passes it.
    """
    return TDMFamily(
        name="wan",
        schedule=FlowMatchingSchedule(shift),
        channels_first=True,
        latent_channels=pipe.transformer.config.in_channels,
        vae_scale_spatial=int(getattr(pipe, "vae_scale_factor_spatial", 8)),
        vae_scale_temporal=int(getattr(pipe, "vae_scale_factor_temporal", 4)),
        fake_loss_space="output",
        huber_mode="scaled",
        normalize_generator=False,
        call=_call_wan_expanded if getattr(pipe.config, "expand_timesteps", False) else _call_wan,
        pipeline_class=type(pipe),
        default_fake_skip=2.0,
    )


def cogvideox_family(pipe) -> TDMFamily:
    """CogVideoX: v-prediction DDPM, [B, F, C, H, W] latents, x0-space fake loss with weight 1/(1 - acp)."""
    rope_cache: dict[tuple, object] = {}

    def call(transformer, x, model_t, emb):
        rope = None
        if transformer.config.use_rotary_positional_embeddings:
            # The pipeline computes the 3D RoPE tables for its grid; reuse its code, cached per latent shape.
            key = (tuple(x.shape[1:]), x.device)
            if key not in rope_cache:
                h = x.shape[3] * pipe.vae_scale_factor_spatial
                w = x.shape[4] * pipe.vae_scale_factor_spatial
                rope_cache[key] = pipe._prepare_rotary_positional_embeddings(h, w, x.shape[1], x.device)
            rope = rope_cache[key]
        return transformer(
            hidden_states=x, encoder_hidden_states=emb, timestep=model_t, image_rotary_emb=rope, return_dict=False
        )[0]

    return TDMFamily(
        name="cogvideox",
        schedule=VPredictionDDPMSchedule.from_scheduler_config(pipe.scheduler.config),
        channels_first=False,
        latent_channels=pipe.transformer.config.in_channels,
        vae_scale_spatial=int(pipe.vae_scale_factor_spatial),
        vae_scale_temporal=int(pipe.vae_scale_factor_temporal),
        fake_loss_space="x0",
        huber_mode="l1",
        normalize_generator=True,
        call=call,
        pipeline_class=type(pipe),
    )


# ----------------------------------------------------------------------------------------------------------------
# Pieces of the objective (one job each)
# ----------------------------------------------------------------------------------------------------------------


def segment_end(anchors: list[int], i: int) -> int:
    """t_mid: the anchor after `i`, or 0 after the last one."""
    return anchors[i + 1] if i + 1 < len(anchors) else 0


def sample_tau(t_mid: int | torch.Tensor, batch: int, tau_max: int | torch.Tensor,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer tau ~ U{t_mid+1, ..., tau_max} per sample, as float [B] (tau > t_mid: strictly noisier).

    The TDM README's two noise modes are two values of `tau_max`: the released BLADE code's "to the top"
    (``tau_max`` = 979 for every step) and "fully separate" (``tau_max`` = the step's own anchor ``t_i``).
    `t_mid` and `tau_max` may be [B] tensors (per-sample step draws): each sample's own range.
    """
    if not (torch.is_tensor(t_mid) or torch.is_tensor(tau_max)):
        low = t_mid + 1
        if low > tau_max:
            raise ValueError(f"no tau in [{low}, {tau_max}]: tau_max must exceed the segment end {t_mid}")
        return torch.randint(low, tau_max + 1, (batch,), generator=generator).to(torch.float32)
    low = torch.as_tensor(t_mid, dtype=torch.float64).reshape(-1).expand(batch) + 1
    high = torch.as_tensor(tau_max, dtype=torch.float64).reshape(-1).expand(batch)
    if bool((low > high).any()):
        raise ValueError(f"no tau in [t_mid + 1, tau_max] for some sample: t_mid {t_mid}, tau_max {tau_max}")
    u = torch.rand((batch,), generator=generator, dtype=torch.float64)
    return torch.minimum(low + torch.floor(u * (high - low + 1)), high).to(torch.float32)


def forward_diffuse(
    schedule: NoiseSchedule, x_s: torch.Tensor, s: torch.Tensor | float, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Sample q(x_t | x_s) for t > s, exactly for any schedule ``x_t = alpha_t x0 + sigma_t eps``.

    ``x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) z``, which has the
    marginal ``alpha_t x0 + sigma_t eps`` whenever ``x_s`` has ``alpha_s x0 + sigma_s eps``.

    Args:
        x_s: [B, ...] sample at time(s) `s` (scalar or [B]).
        t: [B] target times.
        noise: z ~ N(0, I), shaped like `x_s`.
    """
    a_s, s_s = schedule.coefficients(s, x_s)
    a_t, s_t = schedule.coefficients(t, x_s)
    ratio = a_t / a_s
    std = (s_t**2 - (ratio * s_s) ** 2).clamp_min(0.0).sqrt()
    return ratio * x_s.to(ratio.dtype) + std * noise.to(ratio.dtype)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance ``uncond + scale * (cond - uncond)`` (linear, so valid for outputs or x0); a tensor
    `scale` [B] is one scale per sample."""
    if torch.is_tensor(scale):
        scale = scale.to(device=cond.device, dtype=cond.dtype).view(-1, *([1] * (cond.ndim - 1)))
    return uncond + scale * (cond - uncond)


def guidance_scale(model_t: torch.Tensor, cfg: float, cfg_2: float | None = None,
                   boundary: float | None = None) -> float | torch.Tensor:
    """The teacher's CFG scale at model timesteps `model_t` [B]: `cfg`, except `cfg_2` below `boundary` where given.

    A two-expert Wan2.2 pipeline guides its low-noise expert (`transformer_2`, model timestep < boundary) with its
    own `guidance_scale_2`; WanPipeline uses `guidance_scale` for both when that is None. Returns a float when one
    scale serves every sample, else a [B] tensor.
    """
    if cfg_2 is None or boundary is None or cfg_2 == cfg:
        return cfg
    high = model_t.reshape(-1) >= boundary
    return torch.where(high, torch.tensor(float(cfg)), torch.tensor(float(cfg_2))).to(torch.float32)


def fake_score_loss(
    schedule: NoiseSchedule,
    fake_out: torch.Tensor,
    x_tau: torch.Tensor,
    tau: torch.Tensor,
    x0_target: torch.Tensor,
    space: str,
) -> torch.Tensor:
    """Denoising loss of the fake score at (x_tau, tau) toward the clean target `x0_target` (detached).

    space="output": MSE between `fake_out` and the model output that maps (x_tau, tau) to `x0_target` (Wan:
    velocity ``(x_tau - x0)/sigma_tau``). space="x0": ``mean((x0_fake - x0_target)^2) / sigma_tau^2`` per sample
    (CogVideoX: 1/(1 - acp)). Returns a scalar (mean over batch).
    """
    x0_target = x0_target.detach()
    x0_target = x0_target.to(torch.promote_types(x0_target.dtype, torch.float32))
    if space == "output":
        a, s = schedule.coefficients(tau, x_tau)
        eps_target = (x_tau.to(a.dtype) - a * x0_target) / s
        target = schedule.to_model_output(x0_target, eps_target, tau)
        return F.mse_loss(fake_out.to(target.dtype), target)
    if space == "x0":
        x0_fake = schedule.to_x0(fake_out, x_tau, tau)
        per_sample = ((x0_fake - x0_target) ** 2).flatten(1).mean(1)
        weight = 1.0 / schedule.sigma(tau).to(per_sample).pow(2).clamp_min(1e-8)
        return (weight * per_sample).mean()
    raise ValueError(f"unknown fake_loss_space {space!r}")


def default_huber_c(numel_per_sample: int, mode: str) -> float:
    """Pseudo-Huber c of the released trainers: "scaled" 1e-3/128 * sqrt(n) (Wan 480p: ~0.011), "l1"
    1e-3 / (128 * sqrt(n)) (CogVideoX: ~5e-9, i.e. an L1 loss)."""
    if mode == "scaled":
        return 1e-3 / 128 * math.sqrt(numel_per_sample)
    if mode == "l1":
        return 1e-3 / (128 * math.sqrt(numel_per_sample))
    raise ValueError(f"unknown huber mode {mode!r}")


def pseudo_huber(x: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample ``mean(sqrt((x - target)^2 + c^2) - c)`` over all but the batch dim: [B]."""
    diff = (x.float() - target.float()).flatten(1)
    return (torch.sqrt(diff**2 + c * c) - c).mean(1)


def generator_target(x0: torch.Tensor, x0_teacher: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """TDM/DMD regression target ``stopgrad(x0 + x0_teacher_cfg - x0_fake)``: its gradient is (fake - real) score."""
    return (x0.detach() + x0_teacher - x0_fake).detach()


def teacher_gap_weight(x0: torch.Tensor, x0_teacher: torch.Tensor, cap: float = 5.0) -> torch.Tensor:
    """DMD2-style per-sample normaliser 1 / mean|x0 - x0_teacher_cfg|, capped at `cap`: [B] (no grad)."""
    gap = (x0.detach().float() - x0_teacher.float()).abs().flatten(1).mean(1)
    return (1.0 / gap.clamp_min(1e-12)).clamp(max=cap)


# ----------------------------------------------------------------------------------------------------------------
# The objective with its three roles on one transformer
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TDMConfig:
    """Hyperparameters of the objective (paper / released defaults in the trainer's per-family table)."""

    k_step: int = 8
    eta: float = 0.9
    cfg: float = 5.0
    lambda_reg: float = 0.0
    tau_max: int = 979
    huber_c: float | None = None  # None: the family's default from the latent size
    normalize_cap: float = 5.0
    fake_skip_threshold: float | None = None  # skip the fake step when its loss exceeds this (released Wan: 2.0)
    tau_mode: str = "to_max"  # "to_max": tau in (t_mid, tau_max] (released BLADE); "segment": (t_mid, t_i] (TDM)
    generator_loss: str = "huber"  # "huber": pseudo-Huber (released); "l2": squared error (DMD2)
    normalize_generator: bool | None = None  # per-sample 1/mean|x0 - teacher| (None: the family's default)
    cfg_2: float | None = None  # two-expert models: the teacher's scale below cfg_boundary (None: cfg everywhere)
    cfg_boundary: float | None = None  # model timestep where cfg_2 takes over (the expert router's boundary)
    fake_attention: str = "asa"  # "asa": the fake runs the student's sparse attention (released); "dense": full
    # The first student steps that run dense (ASA off), as the sampler's ``dense_steps``; the fake matching one of
    # those steps' segments runs dense too. Set here, by step index, not by the ASA handle's step tracker, which
    # infers the step from the order of timesteps and cannot follow training's out-of-order forwards.
    dense_steps: int = 0
    # "batch": one student step index per update, shared by the batch (the default); "sample": one per sample, as
    # TDM's and BLADE's released trainers draw it, so every update carries all steps' gradients (Adam runs with
    # beta1 = 0 here: no momentum averages the steps across updates). No gain on TinyWorld (study call 6).
    step_draw: str = "batch"

    def guidance(self, model_t: torch.Tensor) -> float | torch.Tensor:
        """The teacher's CFG scale at model timesteps `model_t` [B] (`guidance_scale`)."""
        return guidance_scale(model_t, self.cfg, self.cfg_2, self.cfg_boundary)

    @property
    def unconditional_needed(self) -> bool:
        """Whether any CFG scale differs from 1 (else the unconditional forward is skipped)."""
        return self.cfg != 1.0 or (self.cfg_2 is not None and self.cfg_2 != 1.0)

    def __post_init__(self) -> None:
        if self.tau_mode not in ("to_max", "segment"):
            raise ValueError(f"tau_mode must be 'to_max' or 'segment', got {self.tau_mode!r}")
        if self.generator_loss not in ("huber", "l2"):
            raise ValueError(f"generator_loss must be 'huber' or 'l2', got {self.generator_loss!r}")
        if self.fake_attention not in ("asa", "dense"):
            raise ValueError(f"fake_attention must be 'asa' or 'dense', got {self.fake_attention!r}")
        if not 0 <= self.dense_steps <= self.k_step:
            raise ValueError(f"dense_steps must be in [0, k_step={self.k_step}], got {self.dense_steps}")
        if self.step_draw not in ("batch", "sample"):
            raise ValueError(f"step_draw must be 'batch' or 'sample', got {self.step_draw!r}")
        if self.step_draw == "sample" and self.dense_steps > 0:
            # One forward serves the whole batch, so its attention cannot be dense for some samples only.
            raise ValueError("dense_steps > 0 needs step_draw 'batch': per-sample step draws would mix dense and "
                             "sparse steps in one forward")


@dataclass
class StepDraw:
    """The random choices of one update: the student step index and its segment (anchor ``t_i``, segment end
    ``t_mid``), one int each when the batch shares one step, or [B] tensors (per-sample draws)."""

    i: int | torch.Tensor
    t_i: int | torch.Tensor
    t_mid: int | torch.Tensor

    @property
    def per_sample(self) -> bool:
        return torch.is_tensor(self.i)

    @property
    def deepest(self) -> int:
        """The deepest step index drawn: how far the rollout must go."""
        return int(self.i.max()) if self.per_sample else self.i

    @property
    def step(self) -> int | None:
        """The student step every sample shares (decides the attention under ``dense_steps``); None when mixed."""
        if not self.per_sample:
            return self.i
        return int(self.i[0]) if bool((self.i == self.i[0]).all()) else None


class TDMObjective:
    """TDM losses for a transformer carrying the "student" and "fake" LoRA adapters (see `blade.distill.lora`), or
    an `ExpertRouter` (`blade.distill.experts`) whose experts carry them, called as one transformer.

    Roles on the one base model:
      student = adapter "student", ASA on (when an ASA handle is given) except at its first ``config.dense_steps``;
      fake    = adapter "fake",    ASA as the student's at the step it matches (off with ``fake_attention == "dense"``);
      teacher = adapters disabled, ASA off (dense), CFG with the negative embedding.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        family: TDMFamily,
        config: TDMConfig,
        asa_handle=None,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        model_dtype: torch.dtype | None = None,
    ):
        self.transformer = transformer
        self.family = family
        self.config = config
        self.asa = asa_handle
        self.autocast = autocast
        self.anchors = student_anchors(config.k_step)
        self.model_dtype = model_dtype

    # ---- roles ---------------------------------------------------------------------------------------------

    @contextmanager
    def role(self, name: str, step: int | None = None) -> Iterator[None]:
        """Switch the shared transformer to "student", "fake" or "teacher" for the block; `step`: the student step
        the forward serves (its index in the anchors), which decides the attention under ``config.dense_steps``."""
        if name == "teacher":
            # Restore the attention the active role had (not simply ASA on): a dense fake's loss may call the
            # teacher before its backward, whose checkpointed recompute must see the fake's own attention again.
            was_enabled = self.asa.enabled if self.asa is not None else None
            if self.asa is not None:
                self.asa.enabled = False
            try:
                with lora.adapters_disabled(self.transformer), self.autocast():
                    yield
            finally:
                if self.asa is not None:
                    self.asa.enabled = was_enabled
            return
        self._activate(name, step)
        with self.autocast():
            yield

    def sparse(self, name: str, step: int | None = None) -> bool:
        """Whether role "student" or "fake" runs ASA for student step `step` (None: a forward tied to no step)."""
        if self.asa is None or (name == "fake" and self.config.fake_attention == "dense"):
            return False
        return step is None or step >= self.config.dense_steps

    def _activate(self, name: str, step: int | None = None) -> None:
        """Leave the transformer in the "student" or "fake" configuration (its adapter active, ASA per `sparse`).

        A loss must leave its own role active: gradient checkpointing recomputes the blocks during `backward` with
        whatever adapter is active then, and a wrong one silently corrupts the gradient (same shapes, no error).
        """
        lora.activate(self.transformer, lora.STUDENT if name == "student" else lora.FAKE)
        if self.asa is not None:
            self.asa.enabled = self.sparse(name, step)

    def predict(self, role: str, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                step: int | None = None) -> torch.Tensor:
        with self.role(role, step):
            return self.family.predict(self.transformer, x, t, emb, self.model_dtype)

    def teacher_cfg_x0(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, neg: torch.Tensor):
        """(x0 of the CFG teacher, x0 of the conditional teacher) at (x, t); no grad. Two forwards (as Wan's
        pipeline does) keep peak memory at one batch."""
        with torch.no_grad():
            cond = self.predict("teacher", x, t, emb)
            uncond = self.predict("teacher", x, t, neg) if self.config.unconditional_needed else cond
        sched = self.family.schedule
        scale = self.config.guidance(sched.model_timestep(t))
        return sched.to_x0(cfg_combine(cond, uncond, scale), x, t), sched.to_x0(cond, x, t)

    # ---- random draws --------------------------------------------------------------------------------------

    def draw_step(self, generator: torch.Generator | None, batch: int = 1) -> StepDraw:
        """The step index of the next update: one for the batch, or one per sample (``config.step_draw``)."""
        if self.config.step_draw == "sample":
            i = torch.randint(0, len(self.anchors), (batch,), generator=generator)
            ends = [segment_end(self.anchors, k) for k in range(len(self.anchors))]
            return StepDraw(i=i, t_i=torch.tensor(self.anchors)[i], t_mid=torch.tensor(ends)[i])
        i = int(torch.randint(0, len(self.anchors), (1,), generator=generator))
        return StepDraw(i=i, t_i=self.anchors[i], t_mid=segment_end(self.anchors, i))

    @staticmethod
    def state_at(states: list[torch.Tensor], draw: StepDraw) -> torch.Tensor:
        """x_{t_i} of each sample from a rollout's states ``[x_{t_0}, ...]``: [B, ...]."""
        if not draw.per_sample:
            return states[draw.i]
        return torch.stack([states[int(k)][b] for b, k in enumerate(draw.i)])

    def _times(self, value: float | torch.Tensor, batch: int, device) -> torch.Tensor:
        """Timesteps [B] (float32) on `device`: one value for all, or a [B] tensor of per-sample values."""
        if torch.is_tensor(value):
            return value.to(device=device, dtype=torch.float32).reshape(batch)
        return torch.full((batch,), float(value), device=device)

    # ---- rollout ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def rollout(
        self, noise: torch.Tensor, emb: torch.Tensor, upto: int, generator: torch.Generator | None
    ) -> list[torch.Tensor]:
        """Student states ``[x_{t_0}, ..., x_{t_upto}]`` from ``x_{t_0} = noise`` (eta re-noising, no grad)."""
        if self.asa is not None and hasattr(self.asa, "reset"):
            self.asa.reset()
        states = [noise]
        for k in range(upto):
            t = self._times(self.anchors[k], noise.shape[0], noise.device)
            out = self.predict("student", states[-1], t, emb, step=k)
            t_next = self._times(self.anchors[k + 1], noise.shape[0], noise.device)
            x_next, _ = student_step(self.family.schedule, out, states[-1], t, t_next, self.config.eta, generator)
            states.append(x_next.float())
        return states

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, emb: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The student's full K-step sample (x0 after the last anchor), as the 8-step sampler runs it."""
        states = self.rollout(noise, emb, len(self.anchors) - 1, generator)
        t = self._times(self.anchors[-1], noise.shape[0], noise.device)
        out = self.predict("student", states[-1], t, emb, step=len(self.anchors) - 1)
        x0, _ = student_step(self.family.schedule, out, states[-1], t, None, self.config.eta, generator)
        return x0

    def _segment(self, out, x_ti, draw: StepDraw, generator, tau_generator):
        """From the student's output at x_{t_i}: (x0 [detached], x_tau, tau); x_mid is never differentiated."""
        batch, device = x_ti.shape[0], x_ti.device
        sched = self.family.schedule
        t_i = self._times(draw.t_i, batch, device)
        if draw.per_sample:
            return self._segment_per_sample(out, x_ti, draw, t_i, generator, tau_generator)
        t_mid = None if draw.t_mid == 0 else self._times(draw.t_mid, batch, device)
        with torch.no_grad():
            x_mid, x0 = student_step(sched, out.detach(), x_ti, t_i, t_mid, self.config.eta, generator)
            tau_max = self.config.tau_max if self.config.tau_mode == "to_max" else min(draw.t_i, self.config.tau_max)
            tau = sample_tau(draw.t_mid, batch, tau_max, tau_generator).to(device)
            z = torch.randn(x_ti.shape, generator=generator, device=device, dtype=torch.float32)
            x_tau = forward_diffuse(sched, x_mid.float(), float(draw.t_mid), tau, z)
        return x0.float(), x_tau, tau

    @torch.no_grad()
    def _segment_per_sample(self, out, x_ti, draw: StepDraw, t_i, generator, tau_generator):
        """`_segment` with each sample at its own step: the last step's samples (``t_mid`` = 0) take x_mid = x0 (a
        DDPM table's t = 0 is not exactly clean), every sample its own tau range."""
        batch, device = x_ti.shape[0], x_ti.device
        sched = self.family.schedule
        t_mid = self._times(draw.t_mid, batch, device)
        x_mid, x0 = student_step(sched, out.detach(), x_ti, t_i, t_mid, self.config.eta, generator)
        last = (t_mid == 0).view(-1, *([1] * (x_ti.ndim - 1)))
        x_mid = torch.where(last, x0, x_mid)
        tau_max = torch.full((batch,), float(self.config.tau_max))
        if self.config.tau_mode == "segment":
            tau_max = torch.minimum(tau_max, draw.t_i.to(torch.float32))
        tau = sample_tau(draw.t_mid, batch, tau_max, tau_generator).to(device)
        z = torch.randn(x_ti.shape, generator=generator, device=device, dtype=torch.float32)
        x_tau = forward_diffuse(sched, x_mid.float(), t_mid, tau, z)
        return x0.float(), x_tau, tau

    # ---- losses ---------------------------------------------------------------------------------------------

    def fake_loss(
        self, x_ti, draw: StepDraw, emb, neg, generator, tau_generator, diagnose: bool = False
    ) -> tuple[torch.Tensor, dict]:
        """Fake-score loss (grad flows into the "fake" adapter only). Call `backward` on it before any other forward
        of the transformer (the fake adapter is left active for a gradient-checkpointed backward).

        The batch is a fresh student rollout, so the loss before this update is the fake score's denoising error on
        samples it has not trained on. With `diagnose`, the logs also hold the (conditional, dense) teacher's error
        on the same noisy samples and targets, ``loss_teacher_dsm``: a fake that tracks the student denoises its
        samples better than the teacher does (ratio < 1); a lagging fake does not. Under ASA it also logs
        ``fake_asa_error`` (see `_fake_asa_error`).
        """
        t_i = self._times(draw.t_i, x_ti.shape[0], x_ti.device)
        with torch.no_grad():
            out = self.predict("student", x_ti, t_i, emb, step=draw.step)
        x0, x_tau, tau = self._segment(out, x_ti, draw, generator, tau_generator)
        fake_out = self.predict("fake", x_tau, tau, emb, step=draw.step)
        sched, space = self.family.schedule, self.family.fake_loss_space
        loss = fake_score_loss(sched, fake_out, x_tau, tau, x0, space)
        logs = {"loss_fake_dsm": loss.detach()}
        teacher_out = None
        if self.config.lambda_reg > 0 or diagnose:
            with torch.no_grad():
                teacher_out = self.predict("teacher", x_tau, tau, emb)
        if diagnose:
            logs["loss_teacher_dsm"] = fake_score_loss(sched, teacher_out, x_tau, tau, x0, space).detach()
            if self.asa is not None:
                logs["fake_asa_error"] = self._fake_asa_error(fake_out, x_tau, tau, emb, draw.step)
        if self.config.lambda_reg > 0:
            x0_teacher = sched.to_x0(teacher_out, x_tau, tau)
            reg = fake_score_loss(sched, fake_out, x_tau, tau, x0_teacher, space)
            logs["loss_fake_reg"] = reg.detach()
            loss = loss + self.config.lambda_reg * reg
        self._activate("fake", draw.step)  # for a checkpointed backward (see `_activate`)
        return loss, logs

    def _fake_asa_error(self, fake_out: torch.Tensor, x_tau: torch.Tensor, tau: torch.Tensor,
                        emb: torch.Tensor, step: int | None) -> torch.Tensor:
        """mean |x0 of the fake with ASA - x0 of the fake dense| on the fake's batch (one extra forward, no grad, with
        the fake's attention switched): how much of the generator's signal (``score_gap`` = |fake - teacher|) is the
        sparse attention's own error rather than the student's mismatch, whichever attention the fake trains with."""
        sched = self.family.schedule
        self._activate("fake", step)
        trained_sparse = self.asa.enabled
        self.asa.enabled = not trained_sparse
        try:
            with torch.no_grad(), self.autocast():
                other = self.family.predict(self.transformer, x_tau, tau, emb, self.model_dtype)
        finally:
            self.asa.enabled = trained_sparse
        return (sched.to_x0(fake_out.detach(), x_tau, tau) - sched.to_x0(other, x_tau, tau)).abs().mean()

    def generator_loss(self, x_ti, draw: StepDraw, emb, neg, generator, tau_generator) -> tuple[torch.Tensor, dict]:
        """Generator loss (grad flows into the "student" adapter through its x0 at x_{t_i} only). Call `backward` on
        it before any other forward of the transformer (the student adapter is left active, see `_activate`)."""
        sched = self.family.schedule
        t_i = self._times(draw.t_i, x_ti.shape[0], x_ti.device)
        out = self.predict("student", x_ti, t_i, emb, step=draw.step)
        x0 = sched.to_x0(out, x_ti, t_i)
        _, x_tau, tau = self._segment(out, x_ti, draw, generator, tau_generator)
        x0_teacher, _ = self.teacher_cfg_x0(x_tau, tau, emb, neg)
        with torch.no_grad():
            x0_fake = sched.to_x0(self.predict("fake", x_tau, tau, emb, step=draw.step), x_tau, tau)
        target = generator_target(x0, x0_teacher, x0_fake)
        if self.config.generator_loss == "l2":
            # DMD2: 0.5 * ||x0 - target||^2, whose gradient is the score difference itself (not its sign).
            per_sample = 0.5 * (x0.float() - target.float()).pow(2).flatten(1).mean(1)
        else:
            c = self.config.huber_c
            if c is None:
                c = default_huber_c(x0[0].numel(), self.family.huber_mode)
            per_sample = pseudo_huber(x0, target, c)
        normalize = self.config.normalize_generator
        if normalize is None:
            normalize = self.family.normalize_generator
        if normalize:
            per_sample = per_sample * teacher_gap_weight(x0, x0_teacher, self.config.normalize_cap)
        # The fake ran last: switch back, or a checkpointed backward recomputes the student with the fake adapter.
        self._activate("student", draw.step)
        score_gap = (x0_fake - x0_teacher).abs().mean()  # |fake - real| in x0 space: the size of the update signal
        return per_sample.mean(), {"teacher_gap": (x0.detach() - x0_teacher).abs().mean(), "score_gap": score_gap}
