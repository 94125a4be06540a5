"""The model-family registry: what BLADE knows about each supported video model, in one place.

``FAMILIES["wan"]`` / ``FAMILIES["cogvideox"]`` (``get_family(name)``) hold the diffusers classes, the published
default size and fps, where to download the model, the student's prediction type, the TDM recipe defaults (CFG,
lambda_reg) and the module with the family's ASA adapter. Code that needs a per-family fact asks the registry
instead of testing the family name; ``blade.pipelines.loading.FamilySpec`` / ``FAMILIES`` are these same objects.

Still outside the registry (see docs/internals.md): the prompt-encoding defaults ``blade.prompt_cli.WAN`` /
``COGVIDEOX`` and the inference scripts' ``blade.cli.ScriptSpec``; the TDM adapters ``blade.distill.tdm.wan_family`` /
``cogvideox_family`` are named here (``Family.tdm_family``) and built through ``Family.build_tdm_family``.

``MODELS`` (``get_model``) holds the published models of each family; ``model_of_pipeline`` (a loaded pipeline) and
``model_of_folder`` (a diffusers folder's config JSON only, no weights) recognise them, so the inference scripts and
the trainer take a recognised model's default video (``ModelSpec.video_defaults``) instead of the family's.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

__all__ = ["FAMILIES", "MODELS", "Family", "ModelSpec", "get_family", "get_model", "model_of_folder",
           "model_of_pipeline", "video_defaults"]


def _wan_vae_scales(vae: Mapping[str, Any]) -> tuple[int, int]:
    # WanPipeline sizes latents from these two VAE config fields (class defaults 8 and 4).
    return int(vae.get("scale_factor_spatial", 8)), int(vae.get("scale_factor_temporal", 4))


def _wan_size_rules(vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> tuple[int, int, int]:
    spatial, temporal = _wan_vae_scales(vae)
    _, patch_h, patch_w = transformer.get("patch_size", (1, 2, 2))
    return spatial * patch_h, spatial * patch_w, temporal


def _cogvideox_vae_scales(vae: Mapping[str, Any]) -> tuple[int, int]:
    return 2 ** (len(vae.get("block_out_channels", (128, 256, 256, 512))) - 1), int(
        vae.get("temporal_compression_ratio", 4))


def _cogvideox_size_rules(vae: Mapping[str, Any], transformer: Mapping[str, Any]) -> tuple[int, int, int]:
    spatial, temporal = _cogvideox_vae_scales(vae)
    patch_h = patch_w = int(transformer.get("patch_size", 2))
    return spatial * patch_h, spatial * patch_w, temporal


# Wan2.1's standard negative prompt (the text its reference sampler uses for CFG), in diffusers' English wording.
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)


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
    tdm_family: str = ""  # "module:function" building the TDM adapter (schedule, latent layout) from a pipeline
    prompt_script: str = ""  # utils/process_prompts_<name>.py encodes this family's prompt cache
    text_width_key: str = "text_dim"  # the transformer config's key for the text-embedding width
    text_max_length: int = 512  # text tokens per prompt of the published models (the prompt cache's default)
    negative_prompt: str = ""  # the reference sampler's negative prompt (CFG), the prompt cache's default
    prompt_list: str | None = None  # the prompt-encoding script's default input, relative to the repository root
    context_parallel: bool = False  # diffusers has a context-parallel plan for its attention (Ulysses + ASA)
    # Trainer preset flags of models of this architecture: (flag, trainer extension module, --help text). A preset
    # only names the extension (``blade.distill.model_extensions``), which provides the model path and video size.
    trainer_presets: tuple[tuple[str, str, str], ...] = ()
    vae_float32: bool = False  # the model card runs the VAE in float32 (else in the pipeline's dtype)
    # the VAE can decode several latent frames per decoder call (blade.speed.decode_latent_frames_in_chunks)
    vae_decode_chunks: bool = False
    size_rules_fn: Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[int, int, int]] | None = field(
        default=None, repr=False, compare=False
    )
    vae_scales_fn: Callable[[Mapping[str, Any]], tuple[int, int]] | None = field(default=None, repr=False,
                                                                                  compare=False)

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

    def build_tdm_family(self, pipe, shift: float | None = None):
        """The TDM adapter of a loaded pipeline (``blade.distill.tdm.TDMFamily``); ``shift`` for flow-shift families
        (None: the pipeline scheduler's own flow shift, else 1.0)."""
        module, name = self.tdm_family.split(":")
        builder = getattr(importlib.import_module(module), name)
        if not self.flow_shift:
            return builder(pipe)
        if shift is None:
            shift = scheduler_flow_shift(getattr(getattr(pipe, "scheduler", None), "config", None)) or 1.0
        return builder(pipe, shift=shift)

    def size_rules(self, vae_config: Mapping[str, Any], transformer_config: Mapping[str, Any]) -> tuple[int, int, int]:
        """``(height_multiple, width_multiple, frame_step)`` from the VAE and transformer configs."""
        return self.size_rules_fn(vae_config, transformer_config)

    def vae_scales(self, vae_config: Mapping[str, Any]) -> tuple[int, int]:
        """``(spatial, temporal)`` compression of the VAE config, as the pipeline computes them from its VAE."""
        return self.vae_scales_fn(vae_config)

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
        # The generator's target at CFG 3.5, below Wan's own sampling scale 5.0 (the paper's Wan value): on TinyWorld
        # all three students trained so (two ASA seeds, one dense) met the quality target on 72 held-out videos, one
        # of four at 5.0; fewer duplicated objects, fidelity 1.06-1.13x the teacher's instead of 1.17-1.29x
        # (BENCHMARKS.md, distillation study, calls 10-11). The paper's CogVideoX recipe already sits below its
        # sampling scale (3.5 vs 6.0). Not measured at full size; --cfg 5.0 restores the paper's Wan value.
        cfg=3.5,
        lambda_reg=0.0,
        adapter_module="blade.models.wan",
        tdm_family="blade.distill.tdm:wan_family",
        prompt_script="wanx",
        text_width_key="text_dim",
        text_max_length=512,
        negative_prompt=WAN_NEGATIVE_PROMPT,
        prompt_list="utils/all_dimension_aug_wanx.txt",
        context_parallel=True,
        trainer_presets=(("tinyworld", "blade.tinyworld.distill",
                          "TinyWorld preset: model assets/tinyworld/pipeline and its video size."),),
        vae_float32=True,
        vae_decode_chunks=True,
        size_rules_fn=_wan_size_rules,
        vae_scales_fn=_wan_vae_scales,
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
        tdm_family="blade.distill.tdm:cogvideox_family",
        prompt_script="cogvideox",
        text_width_key="text_embed_dim",
        text_max_length=226,
        size_rules_fn=_cogvideox_size_rules,
        vae_scales_fn=_cogvideox_vae_scales,
    ),
}


def get_family(name: str) -> Family:
    """The registered family ``name``; a ValueError naming the known ones otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


# ----------------------------------------------------------------------------------------------------------------
# Published models (one family can have several): configs under blade/configs/<config_dir>, default video, experts
# ----------------------------------------------------------------------------------------------------------------

#: Wan2.1-1.3B at its default video (81 x 480 x 832) has 21 x 30 x 52 = 32,760 tokens; BLADE's Wan setting (global
#: tokens over windows of 30, keep 5-17% of key blocks, threshold 0.95) was chosen there.
REFERENCE_TOKENS = 32_760
REFERENCE_POOL_SIZE = 30


def scaled_pool_size(tokens: int) -> int:
    """The global-token pool window for a ``tokens``-token video: BLADE's Wan window (30 at 32,760 tokens) scaled
    with the token count, so the number of global tokens (~1,100) and their share of each query's keys stay as
    tuned. Measured on TinyWorld (5,120 tokens): windows 30 / 10 / 5 / 3 at sampling, 5 (this rule's 1,024 global
    tokens) the best; a student trained with Wan's unscaled 30 reached its teacher on the pooled sets sampled with 5
    (BENCHMARKS.md, "Study call 13"); not yet measured at full size."""
    return max(1, round(REFERENCE_POOL_SIZE * tokens / REFERENCE_TOKENS))


@dataclass(frozen=True)
class ModelSpec:
    """One published model of a family: its packaged configs, pipeline specifics and default video."""

    name: str  # also the folder under blade/configs/
    family: str
    hub_id: str
    num_attention_heads: int  # with num_layers, in_channels and the experts: how a loaded pipeline is recognised
    num_layers: int
    in_channels: int
    default_num_frames: int
    default_height: int
    default_width: int
    fps: int
    experts: tuple[str, ...] = ("transformer",)  # pipeline attributes holding a denoiser
    boundary_ratio: float | None = None  # WanPipeline: `transformer` serves t >= ratio * 1000, `transformer_2` the rest
    expand_timesteps: bool = False  # WanPipeline (Wan2.2 TI2V): one timestep per latent token
    spatial_compression: int = 8  # VAE (x patch 2 gives the token grid)
    temporal_compression: int = 4
    # The stock model's classifier-free guidance scale (the inference scripts' default when no student LoRA is
    # given): the pipeline class's own default in diffusers 0.42.1 (WanPipeline 5.0, CogVideoXPipeline 6.0), except
    # Wan2.2-A14B: 4.0, the high-noise value of Wan2.2's release (not checked against its model card here).
    guidance_scale: float = 5.0

    def video_defaults(self) -> dict[str, int]:
        """The default video: ``{"num_frames", "height", "width", "fps"}``."""
        return {"num_frames": self.default_num_frames, "height": self.default_height, "width": self.default_width,
                "fps": self.fps}

    def default_tokens(self) -> int:
        """Video tokens of one transformer forward at the default video size."""
        frames = (self.default_num_frames - 1) // self.temporal_compression + 1
        patch = 2 * self.spatial_compression
        return frames * (self.default_height // patch) * (self.default_width // patch)

    def asa_defaults(self) -> dict[str, Any]:
        """The ASAConfig fields BLADE uses for this model by default (see ``scaled_pool_size``): Wan2.1-1.3B's block
        size, threshold and keep clamps, the pool window scaled with the default video's token count."""
        return dict(block_size=128, threshold=0.95, min_keep=0.05, max_keep=0.17,
                    pool_size=scaled_pool_size(self.default_tokens()))


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("wan2.1-t2v-1.3b", "wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 12, 30, 16, 81, 480, 832, 16),
        ModelSpec("wan2.1-t2v-14b", "wan", "Wan-AI/Wan2.1-T2V-14B-Diffusers", 40, 40, 16, 81, 720, 1280, 16),
        ModelSpec("wan2.2-t2v-a14b", "wan", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", 40, 40, 16, 81, 720, 1280, 16,
                  experts=("transformer", "transformer_2"), boundary_ratio=0.875, guidance_scale=4.0),
        ModelSpec("wan2.2-ti2v-5b", "wan", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", 24, 30, 48, 121, 704, 1280, 24,
                  expand_timesteps=True, spatial_compression=16),
        ModelSpec("cogvideox-5b", "cogvideox", "THUDM/CogVideoX-5b", 48, 42, 16, 49, 480, 720, 8,
                  guidance_scale=6.0),
    )
}


def get_model(name: str) -> ModelSpec:
    """The registered model ``name``; a ValueError naming the known ones otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def pipeline_experts(pipe: Any) -> list[tuple[str, Any]]:
    """``[(attribute, transformer), ...]`` of the pipeline's denoisers that are present (``transformer_2`` too).

    Each model once: a ``transformer_2`` that is the ``transformer`` itself (one model serving WanPipeline's two
    stages, as a guidance interval sets it up: ``blade.tinyworld.evaluate.set_guidance_interval``) is not a second
    expert, so it is patched, timed and counted once.
    """
    experts: list[tuple[str, Any]] = []
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name, None)
        if model is not None and all(model is not seen for _, seen in experts):
            experts.append((name, model))
    return experts


def _match(experts: tuple[str, ...], config: Mapping[str, Any]) -> ModelSpec | None:
    for spec in MODELS.values():
        if (
            spec.experts == experts
            and config.get("num_attention_heads") == spec.num_attention_heads
            and config.get("num_layers") == spec.num_layers
            and config.get("in_channels") == spec.in_channels
        ):
            return spec
    return None


def model_of_pipeline(pipe: Any) -> ModelSpec | None:
    """The published model a loaded pipeline has the architecture of (heads, layers, input channels, experts), or
    None (e.g. a tiny test model, or a model with another depth)."""
    experts = tuple(name for name, _ in pipeline_experts(pipe))
    if not experts:
        return None
    return _match(experts, getattr(pipe, experts[0]).config)


def read_json(path: os.PathLike) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (the callers' checks report those)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def folder_experts(model_path: str | os.PathLike) -> tuple[str, ...]:
    """The denoisers a pipeline folder holds, from its JSON only: ``("transformer", "transformer_2")`` when
    model_index.json lists a second expert (or, without that entry, when ``transformer_2/config.json`` exists),
    else ``("transformer",)``."""
    root = os.fspath(model_path)
    index = read_json(os.path.join(root, "model_index.json"))
    entry = index.get("transformer_2") if isinstance(index, dict) else None
    if isinstance(entry, list):
        second = len(entry) == 2 and entry[1] is not None
    else:
        second = os.path.isfile(os.path.join(root, "transformer_2", "config.json"))
    return ("transformer", "transformer_2") if second else ("transformer",)


def model_of_folder(model_path: str | os.PathLike, family: str | None = None) -> ModelSpec | None:
    """The published model a diffusers pipeline folder holds, from its JSON only (no weight is read), or None.

    The same test as ``model_of_pipeline``: ``transformer/config.json``'s heads, layers and input channels, and the
    experts present (``transformer_2`` when model_index.json lists it, or, without that entry, when
    ``transformer_2/config.json`` exists). With ``family``, a model of another family counts as unrecognised.
    An unreadable or missing file gives None, never an error (the folder checks report those).
    """
    root = os.fspath(model_path)
    config = read_json(os.path.join(root, "transformer", "config.json"))
    if not isinstance(config, dict):
        return None
    spec = _match(folder_experts(root), config)
    if spec is not None and family is not None and spec.family != family:
        return None
    return spec


def scheduler_flow_shift(config: Mapping[str, Any] | None) -> float | None:
    """The flow shift a scheduler config samples with (UniPC's ``flow_shift``, FlowMatchEuler's ``shift``), or None
    when it has none."""
    if config is None or not hasattr(config, "get"):
        return None
    for key in ("flow_shift", "shift"):
        value = config.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def folder_flow_shift(model_path: str | os.PathLike) -> float | None:
    """``scheduler_flow_shift`` of a pipeline folder's ``scheduler/scheduler_config.json`` (JSON only; None when the
    file is missing or unreadable)."""
    config = read_json(os.path.join(os.fspath(model_path), "scheduler", "scheduler_config.json"))
    return scheduler_flow_shift(config) if isinstance(config, dict) else None


def video_defaults(family: str, model_path: str | os.PathLike | None = None) -> tuple[dict[str, int], ModelSpec | None]:
    """The default video of a ``family`` model folder, before its own blade_defaults.json and any flag: the
    recognised published model's (``model_of_folder``), else the family's.

    Returns:
        ``({"num_frames", "height", "width", "fps"}, the recognised ModelSpec or None)``.
    """
    fam = get_family(family)
    defaults = {"num_frames": fam.default_num_frames, "height": fam.default_height, "width": fam.default_width,
                "fps": fam.fps}
    model = model_of_folder(model_path, family) if model_path is not None else None
    if model is not None:
        defaults.update(model.video_defaults())
    return defaults, model
