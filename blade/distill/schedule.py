"""Noise schedules of the two model families and the student's K-anchor trajectory.

Both schedules write a noisy sample as ``x_t = alpha(t) * x0 + sigma(t) * eps`` for a continuous timestep
``t in [0, 1000]`` and convert a model output into the clean sample ``x0`` and the noise ``eps``:

- ``FlowMatchingSchedule`` (Wan2.1): ``sigma = shift * s / (1 + (shift - 1) * s)``, ``s = t / 1000``,
  ``alpha = 1 - sigma``; the model predicts the velocity ``eps - x0``.
- ``VPredictionDDPMSchedule`` (CogVideoX): ``alpha = sqrt(acp(t))``, ``sigma = sqrt(1 - acp(t))`` with ``acp`` the
  scheduler's ``alphas_cumprod`` (zero-terminal-SNR rescale included), linearly interpolated between integer
  timesteps; the model predicts ``v = alpha * eps - sigma * x0``.

Every coefficient is computed from its closed form (or read from the exact table at integer ``t``): there is no
nearest-timestep lookup that could silently map a timestep to another noise level.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from diffusers.utils.torch_utils import randn_tensor

TimestepLike = Union[float, int, torch.Tensor]
GeneratorLike = Union[torch.Generator, list[torch.Generator], None]


def student_anchors(K: int, T: int = 999) -> list[int]:
    """The student's K anchor timesteps ``T - k * (1000 // K)``, k = 0..K-1 (K = 8: 999, 874, ..., 124)."""
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K}")
    step = 1000 // K
    anchors = [T - k * step for k in range(K)]
    if anchors[-1] < 0:
        raise ValueError(f"K={K} anchors spaced {step} apart do not fit below T={T}")
    return anchors


def _as_float64(t: TimestepLike) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Arithmetic dtype of a step: at least float32 (bf16/fp16 latents are upcast), float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _broadcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample ``[B]`` coefficient reshaped to broadcast against ``x [B, ...]`` in its dtype."""
    coef = coef.to(device=x.device, dtype=x.dtype)
    if coef.ndim == 0:
        return coef
    if coef.ndim != 1 or coef.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"timestep of shape {tuple(coef.shape)} does not match a batch of {x.shape[0]}")
    return coef.view(-1, *([1] * (x.ndim - 1)))


class NoiseSchedule:
    """``x_t = alpha(t) x0 + sigma(t) eps``; subclasses define ``alpha``, ``sigma`` and the model parameterisation.

    ``alpha``/``sigma`` return float64 tensors shaped like ``t``. ``to_x0``/``to_eps``/``to_model_output`` work in at
    least float32 and return that dtype.
    """

    prediction_type: str = ""

    def alpha(self, t: TimestepLike) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: TimestepLike) -> torch.Tensor:
        raise NotImplementedError

    def model_timestep(self, t: TimestepLike) -> torch.Tensor:
        """The timestep value the denoiser is conditioned on at schedule time ``t`` (identity unless overridden)."""
        return _as_float64(t)

    def coefficients(self, t: TimestepLike, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` at ``t`` in ``x``'s compute dtype, broadcastable to ``x``."""
        dtype = _compute_dtype(x)
        ref = x.to(dtype) if x.dtype != dtype else x
        return _broadcast(self.alpha(t), ref), _broadcast(self.sigma(t), ref)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """``alpha(t) * x0 + sigma(t) * noise`` (in ``x0``'s compute dtype)."""
        a, s = self.coefficients(t, x0)
        dtype = a.dtype
        return a * x0.to(dtype) + s * noise.to(dtype)

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        raise NotImplementedError

    def to_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        raise NotImplementedError

    def to_model_output(self, x0: torch.Tensor, eps: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """The model output that ``to_x0``/``to_eps`` map back to ``(x0, eps)`` (e.g. a regression target)."""
        raise NotImplementedError


class FlowMatchingSchedule(NoiseSchedule):
    """Rectified-flow schedule (Wan2.1): ``x_t = (1 - s) x0 + s eps``, ``s = sigma(t)``, output = ``eps - x0``.

    ``sigma(t) = shift * u / (1 + (shift - 1) * u)`` with ``u = t / 1000``. The denoiser is conditioned on
    ``1000 * sigma(t)`` (the diffusers Wan convention); with ``shift = 1`` that is ``t`` itself.
    """

    prediction_type = "flow"

    def __init__(self, shift: float = 1.0):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift = float(shift)

    def __repr__(self) -> str:
        return f"FlowMatchingSchedule(shift={self.shift})"

    def sigma(self, t: TimestepLike) -> torch.Tensor:
        u = _as_float64(t) / 1000.0
        if self.shift == 1.0:
            return u
        return self.shift * u / (1.0 + (self.shift - 1.0) * u)

    def alpha(self, t: TimestepLike) -> torch.Tensor:
        return 1.0 - self.sigma(t)

    def model_timestep(self, t: TimestepLike) -> torch.Tensor:
        if self.shift == 1.0:
            return _as_float64(t)
        return 1000.0 * self.sigma(t)

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """``x0 = x_t - sigma * v``."""
        _, s = self.coefficients(t, x_t)
        return x_t.to(s.dtype) - s * model_output.to(s.dtype)

    def to_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """``eps = x_t + alpha * v`` (= x_t + (1 - sigma) v)."""
        a, _ = self.coefficients(t, x_t)
        return x_t.to(a.dtype) + a * model_output.to(a.dtype)

    def to_model_output(self, x0: torch.Tensor, eps: torch.Tensor, t: TimestepLike = 0) -> torch.Tensor:
        dtype = _compute_dtype(x0)
        return eps.to(dtype) - x0.to(dtype)


class VPredictionDDPMSchedule(NoiseSchedule):
    """Variance-preserving DDPM schedule with v-prediction (CogVideoX): ``alpha = sqrt(acp)``, ``sigma = sqrt(1-acp)``.

    ``alphas_cumprod`` is the exact table of the model's scheduler (index = integer timestep); at a fractional ``t``
    it is linearly interpolated. ``x0`` and ``eps`` are linear combinations of ``x_t`` and ``v`` (no division), so
    the zero-SNR end (``alpha(999) = 0``) is handled exactly.
    """

    prediction_type = "v_prediction"

    def __init__(self, alphas_cumprod: torch.Tensor):
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if acp.numel() < 2:
            raise ValueError("alphas_cumprod needs at least two entries")
        self.alphas_cumprod = acp.clamp(0.0, 1.0)
        # One copy of the table per device: timesteps arrive on the latents' device (CUDA in training), and
        # indexing a CPU table with CUDA indices fails (the CogVideoX trainer's first-step crash).
        self._tables: dict[torch.device, torch.Tensor] = {acp.device: self.alphas_cumprod}

    def __repr__(self) -> str:
        return f"VPredictionDDPMSchedule(num_train_timesteps={self.alphas_cumprod.numel()})"

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> VPredictionDDPMSchedule:
        """Build from a diffusers DDIM/DDPM-style scheduler config (beta schedule, ``snr_shift_scale``, zero-SNR)."""
        from diffusers import CogVideoXDDIMScheduler

        config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        config.setdefault("snr_shift_scale", 1.0)  # the 5B value; CogVideoX's class default is 3.0 (2B)
        scheduler = CogVideoXDDIMScheduler.from_config(config)
        return cls(scheduler.alphas_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def _table_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._tables:
            self._tables[device] = self.alphas_cumprod.to(device)
        return self._tables[device]

    def _acp(self, t: TimestepLike) -> torch.Tensor:
        t = _as_float64(t).clamp(0.0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = torch.clamp(lo + 1, max=self.num_train_timesteps - 1)
        frac = t - lo.to(torch.float64)
        table = self._table_on(t.device)
        return table[lo] + frac * (table[hi] - table[lo])

    def alpha(self, t: TimestepLike) -> torch.Tensor:
        return self._acp(t).sqrt()

    def sigma(self, t: TimestepLike) -> torch.Tensor:
        return (1.0 - self._acp(t)).sqrt()

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """``x0 = alpha * x_t - sigma * v``."""
        a, s = self.coefficients(t, x_t)
        return a * x_t.to(a.dtype) - s * model_output.to(a.dtype)

    def to_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """``eps = sigma * x_t + alpha * v``."""
        a, s = self.coefficients(t, x_t)
        return s * x_t.to(a.dtype) + a * model_output.to(a.dtype)

    def to_model_output(self, x0: torch.Tensor, eps: torch.Tensor, t: TimestepLike) -> torch.Tensor:
        """``v = alpha * eps - sigma * x0``."""
        a, s = self.coefficients(t, x0)
        return a * eps.to(a.dtype) - s * x0.to(a.dtype)


def student_step(
    schedule: NoiseSchedule,
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: TimestepLike,
    t_next: TimestepLike | None,
    eta: float,
    generator: GeneratorLike = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One student step from anchor ``t`` to ``t_next`` (shared by the sampler and the training rollout).

    ``x0 = to_x0(out)``, ``eps = to_eps(out)``, ``noise = eta * eps + sqrt(1 - eta^2) * z`` (z ~ N(0, I) from
    ``generator``), ``x_next = alpha(t_next) * x0 + sigma(t_next) * noise``. With ``t_next=None`` (after the last
    anchor) ``x_next = x0``. Returns ``(x_next, x0)`` in ``x_t``'s dtype.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    x0 = schedule.to_x0(model_output, x_t, t)
    if t_next is None:
        return x0.to(x_t.dtype), x0.to(x_t.dtype)
    eps = schedule.to_eps(model_output, x_t, t)
    noise = eta * eps
    if eta < 1.0:
        z = randn_tensor(tuple(x_t.shape), generator=generator, device=x_t.device, dtype=eps.dtype)
        noise = noise + math.sqrt(1.0 - eta * eta) * z
    x_next = schedule.add_noise(x0, noise, t_next)
    return x_next.to(x_t.dtype), x0.to(x_t.dtype)


# The DDPM schedule of CogVideoX-5B's shipped scheduler (zero terminal SNR, no SNR shift).
COGVIDEOX_5B_DDPM_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "rescale_betas_zero_snr": True,
    "snr_shift_scale": 1.0,
}


def build_schedule(
    prediction_type: str, *, shift: float = 1.0, scheduler_config: Mapping[str, Any] | None = None
) -> NoiseSchedule:
    """``FlowMatchingSchedule(shift)`` for ``"flow"``, else a ``VPredictionDDPMSchedule`` from ``scheduler_config``
    (default: CogVideoX-5B's)."""
    if prediction_type in ("flow", "flow_prediction"):
        return FlowMatchingSchedule(shift)
    if prediction_type == "v_prediction":
        return VPredictionDDPMSchedule.from_scheduler_config(scheduler_config or COGVIDEOX_5B_DDPM_CONFIG)
    raise ValueError(f"unknown prediction_type {prediction_type!r}: expected 'flow' or 'v_prediction'")


__all__: Sequence[str] = (
    "COGVIDEOX_5B_DDPM_CONFIG",
    "FlowMatchingSchedule",
    "NoiseSchedule",
    "VPredictionDDPMSchedule",
    "build_schedule",
    "student_anchors",
    "student_step",
)
