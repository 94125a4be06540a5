"""The model-family registry: what BLADE knows about each supported video model, in one place.

``FAMILIES["wan"]`` / ``FAMILIES["cogvideox"]`` (``get_family(name)``) hold the diffusers classes, the published
default size and fps, where to download the model, the student's prediction type, the TDM recipe defaults (CFG,
lambda_reg) and the module with the family's ASA adapter. Code that needs a per-family fact asks the registry
instead of testing the family name; ``blade.pipelines.loading.FamilySpec`` / ``FAMILIES`` are these same objects.

Still outside the registry (see docs/internals.md): the TDM schedule builders ``blade.distill.tdm.wan_family`` /
``cogvideox_family``, the prompt-encoding defaults ``blade.prompt_cli.WAN`` / ``COGVIDEOX``, the inference scripts'
``blade.cli.ScriptSpec`` and a few name tests in ``blade/distill/trainer.py``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["FAMILIES", "Family", "get_family"]


def _wan_size_rules(vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> tuple[int, int, int]:
    # WanPipeline sizes latents from these two VAE config fields (class defaults 8 and 4).
    spatial, temporal = int(vae.get("scale_factor_spatial", 8)), int(vae.get("scale_factor_temporal", 4))
    _, patch_h, patch_w = transformer.get("patch_size", (1, 2, 2))
    return spatial * patch_h, spatial * patch_w, temporal


def _cogvideox_size_rules(vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> tuple[int, int, int]:
    spatial = 2 ** (len(vae.get("block_out_channels", (128, 256, 256, 512))) - 1)
    temporal = int(vae.get("temporal_compression_ratio", 4))
    patch_h = patch_w = int(transformer.get("patch_size", 2))
    return spatial * patch_h, spatial * patch_w, temporal


@dataclass(frozen=True)
class Family:
    """Everything the loaders, the CLIs, the trainer and the LoRA config need to know about one model family."""

    name: str
    pipeline_class: str  # diffusers class name, as in model_index.json
    transformer_class: str
    default_num_frames: int
    default_height: int
    default_width: int
    fps: int
    download_name: str  # local folder name suggested to the user
    hub_id: str
    prediction_type: str = "flow"  # the student's: "flow" (velocity) or "v_prediction"
    flow_shift: bool = False  # the student's anchor schedule takes a flow shift (--shift)
    cfg: float = 5.0  # the teacher's guidance scale in TDM (released launch scripts)
    lambda_reg: float = 0.0  # TDM's fake-score regulariser weight
    adapter_module: str = ""  # the module with apply_asa / default_asa_config for this family
    size_rules_fn: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[int, int, int]] | None = field(
        default=None, repr=False, compare=False
    )

    def download_hint(self) -> str:
        return (
            f"Download {self.download_name} from Hugging Face ({self.hub_id}), e.g. with "
            f"`huggingface-cli download {self.hub_id} --local-dir ./{self.download_name}`, then pass "
            f"--model_path ./{self.download_name}."
        )

    def pipeline_cls(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def transformer_cls(self):
        import diffusers

        return getattr(diffusers, self.transformer_class)

    def adapter(self) -> ModuleType:
        """The family's ASA adapter module (imported lazily: it pulls in the attention kernels)."""
        return importlib.import_module(self.adapter_module)

    def size_rules(self, vae_config: Mapping[str, Any], transformer_config: Mapping[str, Any]) -> tuple[int, int, int]:
        """``(height_multiple, width_multiple, frame_step)`` from the VAE and transformer configs."""
        return self.size_rules_fn(vae_config, transformer_config)

    def training_defaults(self) -> dict[str, Any]:
        """The TDM trainer's per-family defaults: size, fps, CFG, lambda_reg."""
        return {"num_frames": self.default_num_frames, "height": self.default_height, "width": self.default_width,
                "fps": self.fps, "cfg": self.cfg, "lambda_reg": self.lambda_reg}


FAMILIES: dict[str, Family] = {
    "wan": Family(
        name="wan",
        pipeline_class="WanPipeline",
        transformer_class="WanTransformer3DModel",
        default_num_frames=81,
        default_height=480,
        default_width=832,
        fps=16,
        download_name="Wan2.1-T2V-1.3B-Diffusers",
        hub_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        prediction_type="flow",
        flow_shift=True,
        cfg=5.0,
        lambda_reg=0.0,
        adapter_module="blade.models.wan",
        size_rules_fn=_wan_size_rules,
    ),
    "cogvideox": Family(
        name="cogvideox",
        pipeline_class="CogVideoXPipeline",
        transformer_class="CogVideoXTransformer3DModel",
        default_num_frames=49,
        default_height=480,
        default_width=720,
        fps=8,
        download_name="CogVideoX-5b",
        hub_id="THUDM/CogVideoX-5b",
        prediction_type="v_prediction",
        flow_shift=False,
        cfg=3.5,
        lambda_reg=0.5,
        adapter_module="blade.models.cogvideox",
        size_rules_fn=_cogvideox_size_rules,
    ),
}


def get_family(name: str) -> Family:
    """The registered family ``name``; a ValueError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]
