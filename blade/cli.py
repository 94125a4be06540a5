"""The 8-step inference command shared by `wanx/train/inference.py` and `cogvideox/train/inference.py`.

Everything that can be checked without loading weights is checked first (prompts, model folder, sizes, LoRA file,
its keys against the transformer's config, output files), so a bad input costs seconds, exits with code 2 and
writes nothing. Then the pipeline loads, the LoRA is applied, and each prompt gives `NNN_slug.mp4` plus a JSON
sidecar `NNN_slug.json` (settings, realized sparsity, per-stage timings, versions, device).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blade.attention.asa import ASAConfig, EarlyContext
from blade.config import BladeConfig
from blade.families import ModelSpec, folder_experts, get_family, pipeline_experts, video_defaults
from blade.pipelines.hints import (
    HINT_KEYS,
    MODEL_HINTS_FILE,  # noqa: F401 - re-exported (its name before the move)
    ModelHintsError,
    read_model_hints,
)
from blade.pipelines.loading import (
    FAMILIES,
    LoraError,
    ModelFolderError,
    check_lora_finite,
    check_lora_keys,
    check_model_folder,
    empty_transformer,
    read_lora_state_dict,
    resolve_lora,
    video_size_rules,
)

__all__ = ["CLIError", "ScriptSpec", "build_parser", "main", "output_stem", "read_prompts", "slugify"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# HINT_KEYS / MODEL_HINTS_FILE (blade_defaults.json, optional in a model folder; the older blade_hints.json is read
# too): see blade.pipelines.hints.


class CLIError(ValueError):
    """A bad command line: reported as `error: ...` with exit code 2."""


@dataclass(frozen=True)
class ScriptSpec:
    """What a model folder's inference script fixes: the family, its default model and help texts.

    `default_model_hints` (any of HINT_KEYS) apply when the model is `default_model_path`; `default_model_missing`
    replaces the download hint when that default folder is missing.
    """

    family: str
    description: str
    default_model_path: Path | None = None
    default_model_hints: dict[str, Any] = field(default_factory=dict)
    default_model_missing: str | None = None
    model_help: str = "local diffusers pipeline folder"
    default_lora_path: Path | None = None  # used with the default model when --lora_path is not given


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def build_parser(spec: ScriptSpec) -> argparse.ArgumentParser:
    family = FAMILIES[spec.family]
    p = argparse.ArgumentParser(description=spec.description)
    model_default = str(spec.default_model_path) if spec.default_model_path else None
    p.add_argument(
        "--model_path",
        default=model_default,
        required=model_default is None,
        help=f"{spec.model_help}; never downloaded. {family.download_hint()}"
        + (" (required)" if model_default is None else ""),
    )
    p.add_argument(
        "--lora_path",
        default=None,
        help="BLADE student LoRA: the .safetensors file or its folder; a blade_config.json beside it sets the "
        "sampler (K anchors, eta) and the ASA config. 'none' runs the base model with its own scheduler. Default: "
        + (f"{spec.default_lora_path} with the default model, else none" if spec.default_lora_path else "none"),
    )
    p.add_argument(
        "--lora_without_config",
        action="store_true",
        help="accept a LoRA that has no blade_config.json beside it: it then samples with the pipeline's own "
        "scheduler and --steps, dense unless --attention asa (default: off, such a LoRA is refused)",
    )
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="the text prompt (one of --prompt / --prompt_file is required)")
    prompts.add_argument(
        "--prompt_file",
        help="a text file with one prompt a line; blank lines and lines starting with # are skipped (one of "
        "--prompt / --prompt_file is required)",
    )
    p.add_argument(
        "--negative_prompt",
        default=None,
        help="negative prompt, used only when guidance_scale > 1 (default: the pipeline's)",
    )
    p.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help=f"frames per video, 4k+1 (default: the model's, see below; {spec.family}: "
        f"{family.default_num_frames}, TinyWorld: 17)",
    )
    p.add_argument(
        "--height", type=int, default=None, help=f"video height (default: the model's; {family.default_height})"
    )
    p.add_argument(
        "--width", type=int, default=None, help=f"video width (default: the model's; {family.default_width})"
    )
    p.add_argument(
        "--fps",
        type=float,
        default=None,
        help=f"frame rate of the written mp4 (default: the model's; {family.fps}). 'The model's' size and fps, "
        "highest first: the LoRA's blade_config.json, the model folder's blade_defaults.json, the published model "
        "the folder's configs match (blade.families.MODELS, e.g. Wan2.1-14B 81x720x1280 at 16 fps, Wan2.2-TI2V-5B "
        f"121x704x1280 at 24 fps), else the {spec.family} family's",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps (default: the LoRA's k_step from blade_config.json, else 8); a student LoRA only "
        "runs at the K it was distilled for",
    )
    p.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance; 1 = off (default: 1 with a student LoRA, as distilled students run; "
        "without one, the recognised published model's stock value, e.g. Wan2.1 5.0, Wan2.2-A14B 4.0, CogVideoX-5B "
        "6.0, else 1). The stock model samples with its folder's scheduler (its flow_shift); a student with the "
        "sampler of its blade_config.json",
    )
    p.add_argument("--seed", type=int, default=42, help="random seed; prompt i uses seed + i (default: 42)")
    p.add_argument(
        "--attention",
        choices=("auto", "asa", "dense"),
        default="auto",
        help="self-attention: 'asa' (adaptive block-sparse; the LoRA's ASA config, else the family default), "
        "'dense', or 'auto' = asa when the LoRA's blade_config.json has an ASA config, else dense (default: auto)",
    )
    p.add_argument(
        "--dense_steps",
        type=int,
        default=None,
        help="with ASA, run the first N steps dense (default: the LoRA's dense_steps, else 0)",
    )
    p.add_argument(
        "--mask_reuse_steps",
        type=int,
        default=1,
        help="with ASA, each prober mask serves N sampling steps, layer by layer (1: a fresh mask every step; "
        "BENCHMARKS.md, 'Mask reuse', measures what 2 costs on TinyWorld) (default: 1)",
    )
    p.add_argument(
        "--asa_max_keep",
        type=float,
        default=None,
        help="with ASA, the prober's largest kept fraction of a query block row, in place of the LoRA's (or the "
        "default) config (its min_keep lowered to it if above); with --asa_pool_size it picks the operating "
        "point, e.g. 0.20 with 30 samples the bundled TinyWorld student at the paper's sparsity "
        "1 - density - 1/n = 0.77 (BENCHMARKS.md, 'Session 10') (default: the config's)",
    )
    p.add_argument(
        "--asa_pool_size",
        type=int,
        default=None,
        help="with ASA, the global-token pool window (mean-pooled keys over N tokens; a smaller N gives more global "
        "tokens and a lower paper sparsity) in place of the config's (default: the config's)",
    )
    p.add_argument(
        "--early_context_steps",
        type=int,
        default=None,
        help="with ASA, the first N sampling steps run with more global context (--early_max_keep, "
        "--early_pool_size over the config), where the video is laid out; 0 turns it off (default: the LoRA's "
        "early_context, else 0; on TinyWorld's bundled student it did not help: BENCHMARKS.md, 'Session 14')",
    )
    p.add_argument(
        "--early_max_keep",
        type=float,
        default=None,
        help="the prober's largest kept fraction at the early steps (default: the LoRA's early_context, else 0.25)",
    )
    p.add_argument(
        "--early_pool_size",
        type=int,
        default=None,
        help="the global-token pool window at the early steps (default: the LoRA's early_context, else 5)",
    )
    p.add_argument(
        "--gpu", type=int, default=0, help="CUDA device index; -1 (or no CUDA available) runs on the CPU (default: 0)"
    )
    p.add_argument(
        "--context_parallel",
        action="store_true",
        help="Ulysses context parallelism over the N processes of `torchrun --nproc_per_node N <script> ...` "
        "(Wan only; N must divide the attention heads and the video tokens): each process holds 1/N of the tokens, "
        "process i uses GPU i (CPUs: gloo), process 0 writes the outputs; --gpu is ignored (default: off)",
    )
    p.add_argument(
        "--offload_idle_expert",
        action="store_true",
        help="two-expert models (Wan2.2-T2V-A14B): load on the CPU and keep only the expert being called on the GPU, "
        "the other in pinned host memory (two swaps of ~28 GB a video, a few seconds each); lets the 14B pair run on "
        "an 80 GB card (default: off, both experts on the GPU)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="weights and compute dtype (default: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the transformer's repeated blocks, via blade.speed (default: off)",
    )
    p.add_argument(
        "--compile_vae",
        action="store_true",
        help="torch.compile the VAE decoder (same video up to bf16 rounding): on an H100 CogVideoX's decodes 2.1x "
        "faster, Wan's ~2x with --vae_decode_chunk 5, after ~100 s of compiling once per process, so it pays over "
        "several videos; more GPU memory (default: off, the stock decode)",
    )
    p.add_argument(
        "--vae_dtype",
        choices=tuple(DTYPES),
        default=None,
        help="VAE decode dtype, with blade.speed's faster decode (default: the pipeline's dtype, stock decode)",
    )
    p.add_argument(
        "--channels_last",
        action="store_true",
        help="store the VAE's 3D convolutions channels-last (NDHWC): faster Wan decode on Hopper, slower "
        "CogVideoX decode (BENCHMARKS.md) (default: off)",
    )
    p.add_argument(
        "--vae_decode_chunk",
        type=int,
        default=None,
        metavar="N",
        help="Wan only: the VAE decodes N latent frames per decoder call instead of one (the same video in fewer, "
        "larger kernels; memory grows with N) (default: the stock one-frame-at-a-time decode)",
    )
    p.add_argument(
        "--postprocess_on_device",
        action="store_true",
        help="lay the decoded frames out on the GPU and copy them to the host once, into pinned memory (the same "
        "frames; 0.32 s -> 0.01 s for an 81x480x832 Wan video on an H100, after the first video; keeps that much "
        "pinned host memory cached) (default: off, diffusers' post-processing)",
    )
    p.add_argument(
        "--output_dir", default="outputs", help="folder for the videos and their JSON sidecars (default: outputs)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing output files instead of stopping (default: off)"
    )
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts from --prompt or --prompt_file (one a line; blank lines and `#` comments skipped)."""
    if args.prompt is not None:
        if not args.prompt.strip():
            raise CLIError("--prompt is empty")
        return [args.prompt.strip()]
    path = Path(args.prompt_file)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"cannot read --prompt_file {path}: {err}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise CLIError(f"--prompt_file {path} holds no prompt (only blank or # lines)")
    return prompts


def slugify(text: str, max_len: int = 60) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "video"


def output_stem(index: int, prompt: str, max_len: int = 60) -> str:
    """`NNN_slug`, plus `-` and 8 hex digits of the prompt's SHA-1 when the slug loses anything of the prompt.

    A prompt of lower-case words, digits and single spaces (case and an end period aside) keeps its plain slug
    (`000_a-dog`); a longer one (cut at `max_len`) or one with other characters gets the hash, so two prompts that
    differ only past the cut or in punctuation never share a file name.
    """
    slug = slugify(prompt, max_len)
    plain = " ".join(prompt.strip().lower().removesuffix(".").split())
    if plain.replace(" ", "-") != slug:
        slug = f"{slug}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"
    return f"{index:03d}_{slug}"


# ----------------------------------------------------------------------------------------------------------------
# Validation (no weights loaded)
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Job:
    """Everything resolved from the command line before any weight is loaded."""

    family: str
    model_path: Path
    prompts: list[str]
    device: torch.device
    dtype: torch.dtype
    num_frames: int
    height: int
    width: int
    fps: float
    guidance_scale: float
    model: ModelSpec | None  # the published model the folder's configs match (blade.families.MODELS)
    steps: int
    attention: str  # "asa" | "dense"
    dense_steps: int
    mask_reuse_steps: int  # sampling steps one ASA prober mask serves (1: fresh every step)
    asa_overrides: dict[str, Any]  # ASAConfig fields replaced at sampling (--asa_max_keep, --asa_pool_size)
    early_context: EarlyContext | None  # more global context at the first steps (--early_context_steps ...)
    lora_file: Path | None
    blade_config: BladeConfig | None
    pipeline_kwargs: dict[str, Any]
    outputs: list[tuple[Path, Path]]  # (mp4, json) per prompt
    world: int = 1  # processes of a --context_parallel launch
    rank: int = 0
    offload_idle_expert: bool = False  # --offload_idle_expert: one expert on the device at a time


def _resolve_device(gpu: int) -> torch.device:
    if gpu < 0 or not torch.cuda.is_available():
        return torch.device("cpu")
    if gpu >= torch.cuda.device_count():
        raise CLIError(f"--gpu {gpu}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device("cuda", gpu)


def _model_hints(spec: ScriptSpec, model_path: Path) -> dict[str, Any]:
    """Defaults for sizes / fps / text length (and `"tinyworld"`): the model folder's blade_defaults.json (or
    blade_hints.json; TinyWorld's for a TinyWorld folder), else the script's hints for its default model."""
    try:
        hints = read_model_hints(model_path)
    except ModelHintsError as err:
        raise CLIError(str(err)) from None
    if hints:
        return hints
    if _is_default_model(spec, model_path):
        return {k: v for k, v in spec.default_model_hints.items() if k in (*HINT_KEYS, "tinyworld")}
    return {}


def _check_tinyworld_prompts(prompts: list[str]) -> None:
    """TinyWorld only knows its grammar: refuse any other prompt, naming the bad word (as `evaluate` does)."""
    from blade.tinyworld.world import PromptError, parse_prompt

    for i, prompt in enumerate(prompts):
        try:
            parse_prompt(prompt)
        except PromptError as err:
            where = f"prompt {i + 1} " if len(prompts) > 1 else "the prompt "
            raise CLIError(f"{where}{prompt!r} is outside the TinyWorld grammar: {err}") from None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _warn_long_prompts(family: str, model_path: Path, prompts: list[str], max_length: int | None) -> None:
    """Warn for each prompt longer than the text encoder's window (the pipeline cuts it there, silently)."""
    pipeline_cls = get_family(family).pipeline_cls()
    if max_length is None:
        max_length = inspect.signature(pipeline_cls.__call__).parameters["max_sequence_length"].default
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_path / "tokenizer"), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - a tokenizer we cannot load here only costs the warning
        _warn(f"cannot load {model_path / 'tokenizer'} to check prompt lengths ({type(err).__name__}: {err})")
        return
    for i, prompt in enumerate(prompts):
        n = len(tokenizer(prompt, add_special_tokens=True).input_ids)
        if n > max_length:
            _warn(f"prompt {i + 1} is {n} tokens long; the text encoder takes the first {max_length} tokens "
                  f"(max_sequence_length), the rest is cut")


def _is_default_model(spec: ScriptSpec, model_path: Path) -> bool:
    return spec.default_model_path is not None and model_path.resolve() == Path(spec.default_model_path).resolve()


def _check_size(family: str, model_path: Path, num_frames: int, height: int, width: int) -> None:
    mult_h, mult_w, frame_step = video_size_rules(family, model_path)
    problems = []
    if height <= 0 or height % mult_h:
        problems.append(f"--height {height} must be a positive multiple of {mult_h}")
    if width <= 0 or width % mult_w:
        problems.append(f"--width {width} must be a positive multiple of {mult_w}")
    if num_frames <= 0 or (num_frames - 1) % frame_step:
        problems.append(f"--num_frames {num_frames} must be {frame_step}k+1 (e.g. {frame_step * 4 + 1})")
    if problems:
        raise CLIError(f"this {family} model cannot take that size: " + "; ".join(problems))


def _check_lora(family: str, model_path: Path, lora_path: str) -> tuple[Path, BladeConfig | None]:
    """Resolve the LoRA (its blade_config.json is validated as it is read) and check its keys against the
    transformer built from config.json on the meta device."""
    lora_file, blade_config = resolve_lora(lora_path)
    if blade_config is not None and blade_config.family not in (None, family):
        raise LoraError(f"{lora_file} was trained for {blade_config.family!r}, not {family!r}")
    if blade_config is not None:
        _check_blade_config(blade_config, lora_file)
    state_dict, _ = read_lora_state_dict(family, lora_file)
    check_lora_finite(state_dict, lora_file)  # a diverged run's LoRA renders black videos: refuse before loading
    check_lora_keys(empty_transformer(family, model_path), state_dict)
    return lora_file, blade_config


def _check_blade_config(config: BladeConfig, lora_file: Path) -> None:
    """Build the student sampler once, so a config the sampler refuses fails before any weight loads."""
    from blade.distill.sampler import BladeStudentScheduler

    try:
        BladeStudentScheduler.from_blade_config(config)
    except (TypeError, ValueError) as err:
        raise LoraError(f"blade_config.json beside {lora_file} is invalid: {err}") from None


# The flags served by blade.speed: what `_speed_flags` tests and what the refusal without blade.speed names.
SPEED_FLAGS = ("compile", "compile_vae", "vae_dtype", "channels_last", "vae_decode_chunk", "postprocess_on_device")


def _speed_flags(args: argparse.Namespace) -> bool:
    """Whether any flag served by blade.speed is set."""
    return any(getattr(args, name) for name in SPEED_FLAGS)


def _check_speed_flags(args: argparse.Namespace) -> None:
    if not _speed_flags(args):
        return
    try:
        from blade.speed import speed_up_pipeline  # noqa: F401
    except ImportError as err:
        flags = " / ".join(f"--{name}" for name in SPEED_FLAGS)
        raise CLIError(f"{flags} need blade.speed, which cannot be imported: {err}") from None


def _check_output_dir(output_dir: Path) -> None:
    """Refuse an --output_dir that is a file, sits under a file, or cannot be created or written to."""
    if output_dir.exists() and not output_dir.is_dir():
        raise CLIError(f"--output_dir {output_dir} exists and is not a folder")
    ancestor = output_dir
    while not ancestor.exists():  # the nearest existing folder above it, where it would be created
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise CLIError(f"--output_dir {output_dir}: {ancestor} is a file, not a folder")
    if ancestor.exists() and not os.access(ancestor, os.W_OK | os.X_OK):
        what = "is not writable" if ancestor == output_dir else f"cannot be created: {ancestor} is not writable"
        raise CLIError(f"--output_dir {output_dir} {what}")


def _output_paths(output_dir: Path, prompts: list[str], overwrite: bool) -> list[tuple[Path, Path]]:
    _check_output_dir(output_dir)
    outputs = []
    for i, prompt in enumerate(prompts):
        stem = output_stem(i, prompt)
        outputs.append((output_dir / f"{stem}.mp4", output_dir / f"{stem}.json"))
    folders = [str(p) for pair in outputs for p in pair if p.is_dir()]
    if folders:
        raise CLIError(f"output path is a folder: {', '.join(folders[:3])}")
    existing = [str(p) for pair in outputs for p in pair if p.exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise CLIError(f"output exists: {', '.join(existing[:3])}{more} (pass --overwrite or another --output_dir)")
    return outputs


def prepare_job(spec: ScriptSpec, args: argparse.Namespace) -> Job:
    """Validate the command line against the model folder and LoRA without loading any weight."""
    prompts = read_prompts(args)
    outputs_dir = Path(args.output_dir)
    _check_output_dir(outputs_dir)  # before anything slow: a bad output folder must not cost a whole generation
    model_path = Path(args.model_path)
    hint = spec.default_model_missing if _is_default_model(spec, model_path) else None
    check_model_folder(spec.family, model_path, hint=hint)
    model_hints = _model_hints(spec, model_path)
    if model_hints.get("tinyworld"):
        _check_tinyworld_prompts(prompts)
    lora_path = args.lora_path
    if lora_path is None and spec.default_lora_path is not None and _is_default_model(spec, model_path):
        lora_path = str(spec.default_lora_path) if Path(spec.default_lora_path).exists() else None
    if lora_path is not None and lora_path.lower() == "none":
        lora_path = None
    lora_file, blade_config = _check_lora(spec.family, model_path, lora_path) if lora_path else (None, None)
    if lora_file is not None and blade_config is None and not args.lora_without_config:
        raise LoraError(
            f"no blade_config.json beside {lora_file}: without it the student's sampler (K anchors, eta) and ASA "
            "config are unknown, and it would sample with the pipeline's own scheduler. Use the folder the trainer "
            "wrote (it has blade_config.json), or pass --lora_without_config to run it that way anyway"
        )
    cfg = blade_config or BladeConfig()

    # explicit flag > the LoRA's blade_config.json > the folder's blade_defaults.json > the recognised published
    # model's defaults > the family's
    hints = {**model_hints, **{k: cfg[k] for k in HINT_KEYS if cfg.get(k) is not None}}
    base, model = video_defaults(spec.family, model_path)
    resolved = {key: getattr(args, key) if getattr(args, key) is not None else hints.get(key, default)
                for key, default in base.items()}
    num_frames, height, width = (int(resolved[key]) for key in ("num_frames", "height", "width"))
    fps = float(resolved["fps"])
    if args.fps is not None and not args.fps > 0:
        raise CLIError(f"--fps must be positive, got {args.fps:g}")
    if args.guidance_scale is not None:
        guidance_scale = args.guidance_scale
    else:
        guidance_scale = model.guidance_scale if (model is not None and lora_file is None) else 1.0
    _check_size(spec.family, model_path, num_frames, height, width)

    k_step = cfg.k_step
    steps = args.steps if args.steps is not None else int(k_step or 8)
    if steps <= 0:
        raise CLIError(f"--steps must be positive, got {steps}")
    if k_step is not None and steps != int(k_step):
        raise CLIError(f"--steps {steps}: this LoRA was distilled for {k_step} steps (its blade_config.json k_step)")
    attention = args.attention if args.attention != "auto" else ("asa" if cfg.asa else "dense")
    dense_steps = args.dense_steps if args.dense_steps is not None else cfg.dense_steps
    if dense_steps < 0:
        raise CLIError(f"--dense_steps must be >= 0, got {dense_steps}")
    if args.mask_reuse_steps < 1:
        raise CLIError(f"--mask_reuse_steps must be >= 1, got {args.mask_reuse_steps}")
    if args.mask_reuse_steps > 1 and attention != "asa":
        raise CLIError("--mask_reuse_steps reuses the ASA prober's masks; this run's attention is dense "
                       "(pass --attention asa, or drop --mask_reuse_steps)")
    asa_overrides = _asa_overrides(args, attention)
    early_context = _early_context(args, cfg, attention)
    if args.vae_decode_chunk is not None:
        if not get_family(spec.family).vae_decode_chunks:
            raise CLIError(f"--vae_decode_chunk is for Wan's causal VAE; the {spec.family} VAE decodes its own way "
                           "(drop the flag)")
        if args.vae_decode_chunk < 1:
            raise CLIError(f"--vae_decode_chunk must be >= 1, got {args.vae_decode_chunk}")
    _check_speed_flags(args)

    if args.offload_idle_expert:
        experts = folder_experts(model_path)
        if len(experts) < 2:
            raise CLIError(f"--offload_idle_expert: {model_path} has one denoiser ({experts[0]}), nothing to offload; "
                           "it is for two-expert models such as Wan2.2-T2V-A14B (drop the flag)")
        if args.context_parallel:
            raise CLIError("--offload_idle_expert with --context_parallel is not supported: each process would hold "
                           "both experts' host copies; drop one of the two flags")
    world, rank = 1, 0
    if args.context_parallel:
        world, rank = _check_context_parallel(spec.family, model_path, num_frames, height, width)
        local = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = _resolve_device(args.gpu)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if dtype == torch.float16 and device.type == "cpu":
        _warn("--dtype float16 on a CPU: the VAE decode runs ~180x slower than in float32 (no fast float16 "
              "kernels on CPUs); use float32 (the CPU default) or bfloat16")
    pipeline_kwargs = {}
    if "max_sequence_length" in hints:  # TinyWorld trains with 32 text tokens, not Wan's 512
        pipeline_kwargs["max_sequence_length"] = int(hints["max_sequence_length"])
    outputs = _output_paths(outputs_dir, prompts, args.overwrite)
    _warn_long_prompts(spec.family, model_path, prompts, pipeline_kwargs.get("max_sequence_length"))
    return Job(
        family=spec.family,
        model_path=model_path,
        prompts=prompts,
        device=device,
        dtype=dtype,
        num_frames=num_frames,
        height=height,
        width=width,
        fps=fps,
        guidance_scale=guidance_scale,
        model=model,
        steps=steps,
        attention=attention,
        dense_steps=dense_steps,
        mask_reuse_steps=args.mask_reuse_steps,
        asa_overrides=asa_overrides,
        early_context=early_context,
        lora_file=lora_file,
        blade_config=blade_config,
        pipeline_kwargs=pipeline_kwargs,
        outputs=outputs,
        world=world,
        rank=rank,
        offload_idle_expert=args.offload_idle_expert,
    )


def _asa_overrides(args: argparse.Namespace, attention: str) -> dict[str, Any]:
    """The ASAConfig fields --asa_max_keep / --asa_pool_size replace, checked before any weights load."""
    overrides = {name: value for name, value in (("max_keep", args.asa_max_keep), ("pool_size", args.asa_pool_size))
                 if value is not None}
    if not overrides:
        return {}
    if attention != "asa":
        raise CLIError(f"--asa_max_keep / --asa_pool_size set the ASA prober and its global tokens; this run's "
                       f"attention is {attention} (pass --attention asa, or drop them)")
    try:  # the config's own range checks, on its defaults
        ASAConfig().with_sampling_overrides(**overrides)
    except ValueError as err:
        raise CLIError(f"--asa_max_keep / --asa_pool_size: {err}") from None
    return overrides


def _early_context(args: argparse.Namespace, cfg: BladeConfig, attention: str) -> EarlyContext | None:
    """The early steps' context: the LoRA's ``early_context`` with the --early_... flags over it
    (``EarlyContext.resolve``), checked before any weights load."""
    flags = {"steps": args.early_context_steps, "max_keep": args.early_max_keep, "pool_size": args.early_pool_size}
    try:
        return EarlyContext.resolve(cfg.early_context_config(), attention=attention, **flags)
    except ValueError as err:
        raise CLIError(f"--early_context_steps / --early_max_keep / --early_pool_size: {err}") from None


def _check_context_parallel(family: str, model_path: Path, num_frames: int, height: int, width: int) -> tuple[int, int]:
    """``(world size, rank)`` of the torchrun launch ``--context_parallel`` runs in, after checking that the
    family supports it and that the processes divide the heads and the video tokens evenly."""
    if not get_family(family).context_parallel:
        raise CLIError(
            f"--context_parallel supports Wan only: diffusers has no context-parallel plan for the {family} "
            "transformer's attention processor"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        raise CLIError("--context_parallel: launch the script with `torchrun --nproc_per_node N` (N >= 2)")
    config = json.loads((model_path / "transformer" / "config.json").read_text())
    heads = int(config["num_attention_heads"])
    p_t, p_h, p_w = config.get("patch_size", (1, 2, 2))
    tokens = ((num_frames - 1) // 4 + 1) // p_t * (height // 8 // p_h) * (width // 8 // p_w)
    if heads % world or tokens % world:
        raise CLIError(
            f"--context_parallel over {world} processes needs the {heads} attention heads and the {tokens} video "
            "tokens divisible by it"
        )
    return world, int(os.environ.get("RANK", "0"))


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


def build_pipeline(job: Job, args: argparse.Namespace) -> tuple[Any, dict[str, Any] | None]:
    """Load the pipeline, apply the LoRA (+ student sampler), ASA and the optional speed-ups.

    Returns:
        The pipeline and blade.speed's report of what it enabled (None without --compile / --vae_dtype).
    """
    from blade.api import enable_asa, load_blade_lora
    from blade.pipelines.loading import load_pipeline

    # with --offload_idle_expert the pipeline is loaded on the CPU: both experts need not fit the device at once
    pipe = load_pipeline(job.family, job.model_path, dtype=job.dtype,
                         device="cpu" if job.offload_idle_expert else job.device)
    if job.lora_file is not None:
        with warnings.catch_warnings():  # a LoRA without blade_config.json was accepted with --lora_without_config
            warnings.filterwarnings("ignore", message="no blade_config.json beside")
            load_blade_lora(pipe, job.lora_file, fuse=True, asa=False)  # ASA below, with the CLI's dense_steps
        if job.blade_config is None:
            _warn(f"no blade_config.json beside {job.lora_file} (--lora_without_config): sampling with "
                  f"{type(pipe.scheduler).__name__}, {job.steps} steps, {job.attention} attention")
    if job.attention == "asa":
        config = job.blade_config.asa_config() if job.blade_config else None
        if job.asa_overrides:
            from blade.models import default_pipeline_asa_config

            base = config or default_pipeline_asa_config(pipe) or get_family(job.family).adapter().default_asa_config()
            config = base.with_sampling_overrides(**job.asa_overrides)
        handle = enable_asa(pipe, config, dense_steps=job.dense_steps, early_context=job.early_context)
        handle.mask_reuse_steps = job.mask_reuse_steps
    if job.offload_idle_expert:  # after the LoRA is fused: the host copies are taken once
        from blade.offload import offload_idle_experts

        experts = {id(model) for _, model in pipeline_experts(pipe)}
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module) and id(module) not in experts:
                module.to(job.device)
        offload_idle_experts(pipe, job.device)
    if job.world > 1:
        from blade.parallel import enable_context_parallel

        for _, transformer in pipeline_experts(pipe):
            enable_context_parallel(transformer, job.world)
    speed_report = None
    if _speed_flags(args):
        from blade.speed import speed_up_pipeline

        vae_dtype = DTYPES[args.vae_dtype] if args.vae_dtype else None
        speed_report = speed_up_pipeline(
            pipe, compile_transformer=args.compile, vae_dtype=vae_dtype, compile_vae=args.compile_vae,
            channels_last=args.channels_last, vae_decode_chunk=args.vae_decode_chunk,
            postprocess_on_device=args.postprocess_on_device,
        )
    return pipe, speed_report


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    import blade

    out = {"python": platform.python_version(), "blade": blade.__version__}
    for name in ("torch", "diffusers", "transformers", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"


def _write_json_atomic(data: dict[str, Any], path: Path) -> None:
    from blade.video import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")


@contextmanager
def vae_decode_progress(pipe: Any) -> Iterator[None]:
    """Show a tqdm bar while `pipe.vae.decode` runs: one tick per call of the VAE's decoder module.

    Wan's VAE runs its decoder once per latent frame (the bar then knows its total); CogVideoX's once per batch of
    latent frames. The bar lives on stderr and closes with each decode.
    """
    from tqdm.auto import tqdm

    vae = pipe.vae
    decoder = getattr(vae, "decoder", None)
    if decoder is None or not hasattr(vae, "decode"):
        yield
        return
    state: dict[str, Any] = {}
    original = vae.decode

    def decode(z, *args, **kwargs):
        frames = z.shape[2] if getattr(z, "ndim", 0) == 5 and type(vae).__name__ == "AutoencoderKLWan" else None
        unit = "frame" if frames else "call"
        with tqdm(total=frames, desc="VAE decode", unit=unit, leave=False, mininterval=0, miniters=1) as bar:
            state["bar"] = bar
            try:
                return original(z, *args, **kwargs)
            finally:
                state.pop("bar", None)

    def tick(module, inputs, output):
        if "bar" in state:
            state["bar"].update(1)

    hook = decoder.register_forward_hook(tick)
    vae.decode = decode
    try:
        yield
    finally:
        hook.remove()
        del vae.decode  # back to the class's method


def run(job: Job, args: argparse.Namespace) -> None:
    """Generate every prompt; under ``--context_parallel`` inside the torchrun process group."""
    if job.world > 1:
        import torch.distributed as dist

        if job.device.type == "cuda":
            torch.cuda.set_device(job.device)
        dist.init_process_group("nccl" if job.device.type == "cuda" else "gloo")
        try:
            _run(job, args)
        finally:
            dist.destroy_process_group()
    else:
        _run(job, args)


def _run(job: Job, args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from blade.api import generate
    from blade.video import export_mp4

    pipe, speed_report = build_pipeline(job, args)
    versions, device_name = _versions(), _device_name(job.device)
    writer = job.rank == 0  # under --context_parallel every process computes the same video; process 0 writes it
    for i, (prompt, (video_path, sidecar_path)) in enumerate(
        tqdm(list(zip(job.prompts, job.outputs)), desc="prompts", unit="video", disable=not writer)
    ):
        seed = args.seed + i
        with vae_decode_progress(pipe):
            frames, info = generate(
                pipe,
                prompt,
                seed=seed,
                steps=job.steps,
                guidance_scale=job.guidance_scale,
                num_frames=job.num_frames,
                height=job.height,
                width=job.width,
                negative_prompt=args.negative_prompt,
                **job.pipeline_kwargs,
            )
        if not writer:
            continue
        export_mp4(frames, video_path, fps=job.fps)
        sidecar = {
            "video": video_path.name,
            "prompt": prompt,
            "negative_prompt": args.negative_prompt,
            "seed": seed,
            "steps": job.steps,
            "guidance_scale": job.guidance_scale,
            "num_frames": int(frames.shape[0]),
            "height": int(frames.shape[1]),
            "width": int(frames.shape[2]),
            "fps": job.fps,
            "attention": job.attention,
            "dense_steps": job.dense_steps if job.attention == "asa" else None,
            "mask_reuse_steps": job.mask_reuse_steps if job.attention == "asa" else None,
            "asa_overrides": job.asa_overrides or None,  # --asa_max_keep / --asa_pool_size over blade_config's
            "early_context": job.early_context.to_dict() if job.early_context else None,
            "sparsity": info["sparsity"],
            "asa_stats": info["asa_stats"],
            "timings": info["timings"],
            "transformer_calls": info["transformer_calls"],
            "family": job.family,
            "model": job.model.name if job.model is not None else None,
            "model_path": str(job.model_path),
            "lora_path": str(job.lora_file) if job.lora_file else None,
            "blade_config": job.blade_config.to_dict() if job.blade_config is not None else None,
            "scheduler": type(pipe.scheduler).__name__,
            "dtype": str(job.dtype).removeprefix("torch."),
            "speed": speed_report,
            "device": device_name,
            # Ulysses processes; ASA stats (sparsity) are then those of process 0's heads
            "context_parallel": job.world,
            "offload_idle_expert": job.offload_idle_expert,  # expert swaps are inside the denoise timing
            "versions": versions,
        }
        _write_json_atomic(sidecar, sidecar_path)
        tqdm.write(f"wrote {video_path} ({info['timings']['total_s']:.1f} s)")


def main(spec: ScriptSpec, argv: Sequence[str] | None = None) -> int:
    """Parse, validate (exit code 2 on a bad input, nothing written), then generate. Returns the exit code."""
    args = build_parser(spec).parse_args(argv)
    try:
        job = prepare_job(spec, args)
        run(job, args)
    except (CLIError, ModelFolderError, LoraError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
