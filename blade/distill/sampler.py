"""The distilled student's K-step sampler as a diffusers scheduler.

``BladeStudentScheduler`` visits exactly the K anchor timesteps the student was trained on (999, 874, ..., 124 for
K = 8) and applies the training rule at each (``blade.distill.schedule.student_step``): predict ``x0``, re-noise to
the next anchor with ``eta * eps + sqrt(1 - eta^2) * z``. It drops into ``WanPipeline`` and ``CogVideoXPipeline``
unchanged (``pipe.scheduler = BladeStudentScheduler.from_blade_config(cfg)``, ``guidance_scale=1.0``).

Sampling on other timesteps than the trained anchors was a bug of the released code (UniPC / DPM timesteps at
inference vs uniform anchors in training); ``set_timesteps`` therefore refuses a step count other than K unless
explicit ``timesteps`` are given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from blade.config import PREDICTION_TYPES, BladeConfig
from blade.distill.schedule import (
    FlowMatchingSchedule,
    NoiseSchedule,
    VPredictionDDPMSchedule,
    student_anchors,
    student_step,
)

_PREDICTION_ALIASES = PREDICTION_TYPES


@dataclass
class BladeStudentSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample at the next anchor ``[B, ...]``; ``pred_original_sample``: the x0 prediction."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


class BladeStudentScheduler(SchedulerMixin, ConfigMixin):
    """Few-step sampler over the student's anchor timesteps.

    Args:
        num_anchors: K, the number of student steps (anchors ``999 - k * (1000 // K)``).
        eta: share of the predicted noise kept when re-noising (``0`` = fresh noise, ``1`` = deterministic DDIM).
        prediction_type: ``"flow"`` (Wan, velocity) or ``"v_prediction"`` (CogVideoX).
        shift: flow-matching sigma shift (``1.0``: ``sigma = t / 1000``).
        num_train_timesteps: length of the training time axis.
        anchors: explicit anchor timesteps (descending), overriding the uniform ones.
        beta_start, beta_end, beta_schedule, rescale_betas_zero_snr, snr_shift_scale: the DDPM noise schedule for
            ``"v_prediction"`` (defaults: CogVideoX-5B).
    """

    order = 1
    _compatibles: list[str] = []

    @register_to_config
    def __init__(
        self,
        num_anchors: int = 8,
        eta: float = 0.9,
        prediction_type: str = "flow",
        shift: float = 1.0,
        num_train_timesteps: int = 1000,
        anchors: Sequence[int] | None = None,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        rescale_betas_zero_snr: bool = True,
        snr_shift_scale: float = 1.0,
    ):
        if prediction_type not in _PREDICTION_ALIASES:
            raise ValueError(f"prediction_type must be 'flow' or 'v_prediction', got {prediction_type!r}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if anchors is not None and len(anchors) != num_anchors:
            raise ValueError(f"{len(anchors)} anchors given for num_anchors={num_anchors}")
        self.schedule = self._build_schedule()
        self.init_noise_sigma = 1.0
        self._generator: torch.Generator | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self.num_inference_steps: int | None = None
        self._set_anchor_timesteps(self.trained_anchors, device=None)

    # ----------------------------------------------------------------------------------------------- construction
    def _build_schedule(self) -> NoiseSchedule:
        if _PREDICTION_ALIASES[self.config.prediction_type] == "flow":
            return FlowMatchingSchedule(self.config.shift)
        return VPredictionDDPMSchedule.from_scheduler_config(
            {
                "num_train_timesteps": self.config.num_train_timesteps,
                "beta_start": self.config.beta_start,
                "beta_end": self.config.beta_end,
                "beta_schedule": self.config.beta_schedule,
                "rescale_betas_zero_snr": self.config.rescale_betas_zero_snr,
                "snr_shift_scale": self.config.snr_shift_scale,
            }
        )

    @classmethod
    def from_blade_config(
        cls, blade_config: BladeConfig | Mapping[str, Any], **overrides: Any
    ) -> BladeStudentScheduler:
        """Build from a BLADE LoRA folder's ``blade_config.json`` (a ``BladeConfig`` or its JSON object)."""
        config = BladeConfig.from_dict(blade_config)
        kwargs: dict[str, Any] = {
            "num_anchors": config.num_anchors,
            "eta": float(config.eta),
            "prediction_type": config.resolved_prediction_type,
            "shift": float(config.shift or 1.0),
        }
        if config.anchors:
            kwargs["anchors"] = [int(a) for a in config.anchors]
        for key in ("beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr", "snr_shift_scale"):
            if key in config.extra:
                kwargs[key] = config.extra[key]
        kwargs.update(overrides)
        return cls(**kwargs)

    # ------------------------------------------------------------------------------------------------- timesteps
    @property
    def trained_anchors(self) -> list[int]:
        """The anchors the student was trained on (schedule time ``t``)."""
        if self.config.anchors is not None:
            return [int(a) for a in self.config.anchors]
        return student_anchors(self.config.num_anchors, T=self.config.num_train_timesteps - 1)

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_generator(self, generator: torch.Generator | None) -> None:
        """Generator for the re-noising draws when the pipeline's ``step`` call passes none (``WanPipeline``)."""
        self._generator = generator

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        """Use the trained anchors as timesteps; ``num_inference_steps`` must equal ``num_anchors``.

        Explicit ``timesteps`` (descending schedule times) override the anchors deliberately.
        """
        if timesteps is not None:
            anchors = [float(t) for t in timesteps]
            if any(b >= a for a, b in zip(anchors, anchors[1:])):
                raise ValueError(f"timesteps must be strictly decreasing, got {anchors}")
        else:
            k = self.config.num_anchors
            if num_inference_steps is not None and num_inference_steps != k:
                raise ValueError(
                    f"This BLADE student was distilled for {k} steps on the anchors {self.trained_anchors}; "
                    f"num_inference_steps={num_inference_steps} would sample on timesteps it was not trained on. "
                    f"Pass num_inference_steps={k} (or explicit `timesteps` to override on purpose)."
                )
            anchors = self.trained_anchors
        self._set_anchor_timesteps(anchors, device)

    def _set_anchor_timesteps(self, anchors: Sequence[float], device: str | torch.device | None) -> None:
        anchor_t = torch.tensor([float(a) for a in anchors], dtype=torch.float64)
        # `timesteps` are what the transformer is conditioned on; with shift 1 (and for DDPM) the anchors themselves.
        self._anchors = anchor_t
        self.timesteps = self.schedule.model_timestep(anchor_t).to(dtype=torch.float32, device=device)
        sigmas = self.schedule.sigma(anchor_t).to(torch.float32)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)  # read by WanPipeline's cache context
        self.num_inference_steps = len(anchors)
        self._step_index = None
        self._begin_index = None

    def _index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        matches = (self.timesteps.detach().cpu().double() - value).abs() <= 1e-3
        if not bool(matches.any()):
            raise ValueError(f"timestep {value} is not one of the sampler's timesteps {self.timesteps.tolist()}")
        return int(matches.nonzero()[0, 0])

    # ---------------------------------------------------------------------------------------------------- step
    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> Union[BladeStudentSchedulerOutput, tuple[torch.Tensor, torch.Tensor]]:
        """Student step from the anchor ``timestep`` to the next one (the last one returns the ``x0`` prediction).

        Returns ``BladeStudentSchedulerOutput(prev_sample, pred_original_sample)`` (a diffusers ``SchedulerOutput``
        with the ``x0`` prediction added) or the tuple ``(prev_sample, x0)``.
        """
        index = self._index_for_timestep(timestep)
        t = self._anchors[index]
        t_next = self._anchors[index + 1] if index + 1 < len(self._anchors) else None
        generator = generator if generator is not None else self._generator
        prev_sample, x0 = student_step(
            self.schedule, model_output, sample, t, t_next, float(self.config.eta), generator=generator
        )
        self._step_index = index + 1
        if not return_dict:
            return prev_sample, x0
        return BladeStudentSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Diffuse clean samples to the given schedule times (``alpha * x0 + sigma * noise``)."""
        return self.schedule.add_noise(original_samples, noise, timesteps).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
