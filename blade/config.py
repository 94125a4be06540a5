"""The BLADE LoRA folder's ``blade_config.json``: one type that writes and reads it.

A trained student LoRA folder holds ``pytorch_lora_weights.safetensors`` and ``blade_config.json`` with what inference
needs to sample as the student was trained (K, the anchor timesteps, eta, the noise schedule, the ASA config) and
what it was trained at (LoRA rank, CFG, video size). The trainer writes it (``BladeConfig.save``); the inference CLI,
``blade.api.load_blade_lora``, ``BladeStudentScheduler.from_blade_config`` and TinyWorld's ``evaluate`` read it
(``BladeConfig.load`` / ``BladeConfig.from_dict``), so the defaults for keys an older file lacks live here only.

Older files keep loading: every key is optional, unknown keys are kept (``extra``) and written back on ``save``.
A ``BladeConfig`` also reads as a mapping of its JSON keys (``config["k_step"]``, ``config.get("asa")``), as the
plain dict ``load_blade_lora`` returned before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_NAME", "PREDICTION_TYPES", "BladeConfig", "BladeConfigError"]

CONFIG_NAME = "blade_config.json"
# Accepted spellings of the student's prediction type -> the sampler's name for it.
PREDICTION_TYPES = {"flow": "flow", "flow_prediction": "flow", "v_prediction": "v_prediction"}
DEFAULT_ETA = 0.9


class BladeConfigError(ValueError):
    """A blade_config.json (or a dict meant as one) that cannot be used; the message says which key and why."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


LORA_TARGET_PRESETS = ("attn", "attn_ffn", "all")  # blade.distill.lora's presets (no import: config stays light)
# fields newer than the files already in use: written only when set
_WRITTEN_WHEN_SET = ("lora_targets", "cfg_2", "cfg_boundary", "boundary_ratio", "early_context")


@dataclass(eq=True)
class BladeConfig(Mapping):
    """What a BLADE student LoRA was trained with; the content of its folder's ``blade_config.json``.

    Attributes:
        family: the model family the LoRA was trained for (``"wan"``, ``"cogvideox"``); None in hand-written files.
        k_step: K, the number of student steps; None = the anchors' count, else 8.
        anchors: the K anchor timesteps (descending); None = uniform ``999 - k * (1000 // K)``.
        eta: share of the predicted noise kept when re-noising between student steps.
        prediction_type: ``"flow"`` (Wan) or ``"v_prediction"`` (CogVideoX); None = from the family.
        shift: flow-matching sigma shift (Wan); None = 1.0.
        asa: the ``ASAConfig`` fields as a dict, or None for a dense student.
        dense_steps: leading student steps run with dense attention.
        early_context: the ``EarlyContext`` fields as a dict (``{"steps": 1, "max_keep": 0.25, "pool_size": 5}``):
            the first sampling steps run ASA with more global context; None = every sparse step runs ``asa``.
        lora_rank, lora_alpha, cfg, num_frames, height, width, fps: what the student was trained at.
        lora_targets: the trainer's ``--lora_targets`` preset (``"attn"``, ``"attn_ffn"``, ``"all"``); the LoRA file's
            keys say the same, this names the choice. cfg_2: the teacher's low-noise-expert guidance (two experts),
            or with ``cfg_boundary`` (one transformer) its guidance below that model timestep (a guidance interval).
            boundary_ratio: a two-expert student's routing (WanPipeline's ``boundary_ratio``: anchors at
            ``t >= boundary_ratio * 1000`` go to ``transformer``), which the pipeline it is loaded into must share.
            These four and ``early_context`` are written only when set, so files from before them round-trip
            unchanged.
        extra: keys this type does not know (kept, and written back by ``save``), e.g. the DDPM ``beta_*`` keys.
    """

    family: str | None = None
    k_step: int | None = None
    anchors: list[int] | None = None
    eta: float = DEFAULT_ETA
    prediction_type: str | None = None
    shift: float | None = None
    asa: dict[str, Any] | None = None
    dense_steps: int = 0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    cfg: float | None = None
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: float | None = None
    lora_targets: str | None = None
    cfg_2: float | None = None
    cfg_boundary: float | None = None
    boundary_ratio: float | None = None
    early_context: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise BladeConfigError("; ".join(problems))

    def _problems(self) -> Iterator[str]:
        if self.family is not None and not isinstance(self.family, str):
            yield f"family must be a string, got {self.family!r}"
        if self.k_step is not None and (not _is_int(self.k_step) or self.k_step < 1):
            yield f"k_step must be an int >= 1, got {self.k_step!r}"
        if self.anchors is not None:
            if not isinstance(self.anchors, (list, tuple)) or not all(_is_int(a) for a in self.anchors):
                yield f"anchors must be a list of ints, got {self.anchors!r}"
            elif self.k_step and len(self.anchors) != self.k_step:
                yield f"{len(self.anchors)} anchors given for k_step={self.k_step}"
        if not _is_number(self.eta) or not 0.0 <= self.eta <= 1.0:
            yield f"eta must be in [0, 1], got {self.eta!r}"
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            yield f"prediction_type must be 'flow' or 'v_prediction', got {self.prediction_type!r}"
        if self.shift is not None and (not _is_number(self.shift) or self.shift <= 0):
            yield f"shift must be a positive number or null, got {self.shift!r}"
        if self.asa is not None:
            if not isinstance(self.asa, Mapping):
                yield f"asa must be an object of ASAConfig fields or null, got {self.asa!r}"
            else:
                from blade.attention.asa import ASAConfig

                try:
                    ASAConfig.from_dict(dict(self.asa))
                except (TypeError, ValueError) as err:
                    yield f"asa: {err}"
        if self.early_context is not None:
            if self.asa is None:
                yield "early_context needs asa (it changes ASA's settings at the first steps); set asa or drop it"
            elif not isinstance(self.early_context, Mapping):
                yield f"early_context must be an object of EarlyContext fields or null, got {self.early_context!r}"
            else:
                from blade.attention.asa import ASAConfig, EarlyContext

                try:  # the early steps' config must be valid too (e.g. a max_keep that ASAConfig refuses)
                    EarlyContext.from_dict(dict(self.early_context)).config_for(ASAConfig.from_dict(dict(self.asa)))
                except (TypeError, ValueError) as err:
                    yield f"early_context: {err}"
        if not _is_int(self.dense_steps) or self.dense_steps < 0:
            yield f"dense_steps must be an int >= 0, got {self.dense_steps!r}"
        for name in ("num_frames", "height", "width", "lora_rank"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                yield f"{name} must be an int >= 1 or null, got {value!r}"
        if self.lora_targets is not None and self.lora_targets not in LORA_TARGET_PRESETS:
            yield f"lora_targets must be one of {list(LORA_TARGET_PRESETS)} or null, got {self.lora_targets!r}"
        for name in ("fps", "lora_alpha", "cfg", "cfg_2", "cfg_boundary"):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                yield f"{name} must be a number or null, got {value!r}"
        if self.boundary_ratio is not None and not (_is_number(self.boundary_ratio) and 0 < self.boundary_ratio < 1):
            yield f"boundary_ratio must be a number in (0, 1) or null, got {self.boundary_ratio!r}"
        if not isinstance(self.extra, dict):
            yield f"extra must be a dict, got {type(self.extra).__name__}"

    # ------------------------------------------------------------------------------------------------- derived
    @property
    def resolved_prediction_type(self) -> str:
        """The sampler's prediction type: the stored one, else (older files) the family's."""
        if self.prediction_type is not None:
            return PREDICTION_TYPES[self.prediction_type]
        from blade.families import FAMILIES

        family = FAMILIES.get(self.family) if self.family is not None else None
        return family.prediction_type if family is not None else "flow"

    @property
    def num_anchors(self) -> int:
        """K for the sampler: ``k_step``, else the anchors' count, else 8."""
        return int(self.k_step or (len(self.anchors) if self.anchors else 8))

    def asa_config(self):
        """The stored ``ASAConfig`` (``blade.attention.ASAConfig``), or None for a dense student."""
        if not self.asa:
            return None
        from blade.attention.asa import ASAConfig

        return ASAConfig.from_dict(dict(self.asa))

    def early_context_config(self):
        """The stored ``EarlyContext`` (``blade.attention.EarlyContext``), or None."""
        if not self.early_context:
            return None
        from blade.attention.asa import EarlyContext

        return EarlyContext.from_dict(dict(self.early_context))

    # ---------------------------------------------------------------------------------------------- dict / JSON
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BladeConfig:
        """From the JSON object (unknown keys go to ``extra``); raises BladeConfigError when a value is unusable."""
        if isinstance(data, BladeConfig):
            return data
        if not isinstance(data, Mapping):
            raise BladeConfigError(f"a BLADE config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        if isinstance(kwargs.get("anchors"), tuple):
            kwargs["anchors"] = list(kwargs["anchors"])
        return cls(**kwargs, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: every field in declaration order, then the unknown keys read with it."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name != "extra" and not (f.name in _WRITTEN_WHEN_SET and getattr(self, f.name) is None)}
        if out["anchors"] is not None:
            out["anchors"] = [int(a) for a in out["anchors"]]
        if out["asa"] is not None:
            out["asa"] = dict(out["asa"])
        if out.get("early_context") is not None:
            out["early_context"] = dict(out["early_context"])
        return {**out, **self.extra}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``folder/blade_config.json``; returns its path."""
        path = Path(folder) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> BladeConfig:
        """Read a ``blade_config.json`` file, or the one in a folder.

        Raises:
            FileNotFoundError: no such file.
            BladeConfigError: not JSON, not a JSON object, or a value that cannot be used (the message names the file).
        """
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}") from None
        try:
            data = json.loads(text)
        except ValueError as err:
            raise BladeConfigError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise BladeConfigError(f"{path} should hold a JSON object, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except BladeConfigError as err:
            raise BladeConfigError(f"{path}: {err}") from None

    # ---------------------------------------------------------------------- read-only mapping of the JSON keys
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
