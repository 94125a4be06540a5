"""Evaluate a TinyWorld model (teacher or BLADE student) on grammar prompts: adherence, stability, fidelity, sparsity.

Usage::

    python -m blade.tinyworld.evaluate --prompts prompts.txt --seeds 0 1 2 --steps 50 --guidance 5.0 \\
        --attention dense --out teacher.json
    python -m blade.tinyworld.evaluate --prompts prompts.txt --seeds 0 1 2 --lora assets/tinyworld/blade_lora \\
        --out student.json
    python -m blade.tinyworld.evaluate --prompts prompts.txt --seeds 0 1 --steps 50 --guidance 5.0 \\
        --attention window --sparsity 0.75 --compare_dense --out window75.json

Every prompt is run with every seed; the seed fixes the initial noise and names the ground-truth render that the
fidelity distance compares against. Without ``--lora`` the model is the bare teacher with the pipeline's own
scheduler; with ``--lora`` it is the student, with the sampler (K anchors, eta) and the ASA configuration read from
the LoRA folder's ``blade_config.json``.

Attention modes: ``dense`` (stock), ``asa`` (the adaptive prober; with ``--sparsity`` its keep count is pinned to
``1 - sparsity`` of the key blocks, without global tokens, for equal-sparsity comparisons), ``window`` (a static local
3D window, like Sliding Tile Attention) and ``random`` (random key blocks), the last two at ``--sparsity``.
``--compare_dense`` also runs the dense model with the same noise and reports PSNR/SSIM against it (the paper's
Table 3).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from blade import api
from blade.attention.asa import EarlyContext
from blade.attention.static_masks import random_block_mask, window_block_mask
from blade.config import BladeConfig
from blade.models.mask_reuse import check_mask_reuse_steps
from blade.models.wan import default_asa_config
from blade.pipelines.loading import resolve_lora
from blade.tinyworld import metrics
from blade.tinyworld.model import TINYWORLD_DEFAULTS, load_pipeline
from blade.tinyworld.world import PromptError, Scene, read_prompts, render_prompt

ATTENTION_MODES = ("dense", "asa", "window", "random")
PSNR_CAP_DB = 100.0  # identical videos have infinite PSNR; capped so that means and JSON stay finite


def sampling_settings(
    lora_config: BladeConfig | None,
    steps: int | None = None,
    guidance: float | None = None,
    attention: str | None = None,
    dense_steps: int | None = None,
) -> tuple[int, float, str, int]:
    """``(steps, guidance, attention, dense_steps)``: each given value, else how the model samples by default: a
    student LoRA as it was distilled (its K, no CFG, ASA when its config has one, its dense first steps), the teacher
    with TinyWorld's 50 steps and CFG, dense."""
    if steps is None:
        steps = int(lora_config.k_step or 8) if lora_config else TINYWORLD_DEFAULTS["num_inference_steps"]
    if guidance is None:
        guidance = 1.0 if lora_config else TINYWORLD_DEFAULTS["guidance_scale"]
    if attention is None:
        attention = "asa" if lora_config and lora_config.asa else "dense"
    if dense_steps is None:
        dense_steps = lora_config.dense_steps if lora_config else 0
    return steps, guidance, attention, dense_steps


def resolve_early_context(
    lora: str | None, attention: str | None, steps: int | None, max_keep: float | None, pool_size: int | None
) -> EarlyContext | None:
    """The early context to sample with (before anything loads): the LoRA's stored one with the given fields over
    it (``EarlyContext.resolve``) when the evaluation samples with ASA, else None; the fields without ASA, or values
    the context refuses, are a ValueError."""
    stored = resolve_lora(lora)[1] if lora else None
    attention = sampling_settings(stored, attention=attention)[2]
    return EarlyContext.resolve(stored.early_context_config() if stored else None, attention=attention, steps=steps,
                                max_keep=max_keep, pool_size=pool_size)


def configure_attention(
    pipe, mode: str, *, sparsity: float | None, dense_steps: int, lora_config: BladeConfig | None,
    mask_reuse_steps: int = 1, pool_size: int | None = None, max_keep: float | None = None,
    early_context: EarlyContext | None = None, samples_per_block: int | None = None,
) -> Any:
    """Set the pipeline's self-attention to ``mode``; returns the ASA handle (None for dense).

    ``mask_reuse_steps`` (ASA only): the prober's masks serve that many sampling steps (``ASAHandle``).
    ``pool_size`` (ASA only): the global-token pool window in place of the LoRA's (or the default config's), to ask
    at inference alone whether a student wants more or less global context than it was distilled with.
    ``max_keep`` (ASA only): the prober's largest kept fraction of a query block row in place of the config's, to
    sample a student sparser (or denser) than it was distilled (min_keep is lowered to it if above).
    ``early_context`` (ASA only): the first steps' overrides of the resulting config (``EarlyContext``).
    ``samples_per_block`` (ASA only): tokens the prober samples per block in place of the config's (16), to ask whether
    a finer importance estimate selects better blocks (a prober cost about (samples / block size)^2 of dense Q K^T)."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {ATTENTION_MODES}")
    if mode in ("window", "random") and sparsity is None:
        raise ValueError(f"--attention {mode} needs --sparsity")
    if pool_size is not None and mode != "asa":
        raise ValueError(f"--pool_size applies to ASA's global tokens (--attention asa), not {mode}")
    if max_keep is not None and (mode != "asa" or sparsity is not None):
        raise ValueError(f"--max_keep is the ASA prober's clamp (--attention asa without --sparsity, which pins both "
                         f"clamps), not {mode} with sparsity {sparsity}")
    if samples_per_block is not None and mode != "asa":
        raise ValueError(f"--samples_per_block sets the ASA prober's sampled tokens (--attention asa), not {mode}")
    if early_context is not None and mode != "asa":
        raise ValueError(f"an early context changes ASA's first steps (--attention asa), not {mode}")
    if mode == "dense":
        api.disable_asa(pipe)
        return None

    config = (lora_config.asa_config() if lora_config else None) or default_asa_config()
    if sparsity is not None:  # pinned keep count, plain ASA: equal sparsity across the compared methods
        keep = 1.0 - sparsity
        config = replace(config, min_keep=keep, max_keep=keep, threshold=1.0, pool_size=None)
    # after the pinning: a pool asked for gives global tokens even with --sparsity (ASAConfig validates both)
    config = config.with_sampling_overrides(max_keep=max_keep, pool_size=pool_size,
                                            samples_per_block=samples_per_block)
    api.disable_asa(pipe)
    handle = api.enable_asa(pipe, config, dense_steps=dense_steps, early_context=early_context)
    if mask_reuse_steps != 1:
        if mode != "asa":
            raise ValueError(f"--mask_reuse_steps applies to the prober's masks (--attention asa), not {mode}")
        handle.mask_reuse_steps = mask_reuse_steps
    block = config.block_size
    if mode == "window":
        handle.mask_provider = lambda q, k, grid, tail: window_block_mask(
            grid, sparsity=sparsity, block_size=block, tail_tokens=tail, device=q.device
        )
    elif mode == "random":
        # Drawn from the global RNG, which `api.generate` seeds per video: reproducible for a seed.
        handle.mask_provider = lambda q, k, grid, tail: random_block_mask(
            q.shape[0], q.shape[1], q.shape[-2], sparsity=sparsity, block_size=block, tail_tokens=tail,
            device=q.device,
        )
    return handle


NO_GUIDANCE_ABOVE_ONE = 1.0 + 1e-6  # WanPipeline turns CFG off for both stages when its first scale is <= 1


def set_guidance_interval(pipe, boundary: float) -> None:
    """Guide the teacher with two scales split at model timestep `boundary`, WanPipeline's own two-stage rule on one
    transformer: `guidance_scale` at t >= boundary (high noise), `guidance_scale_2` below.

    The pipeline's second stage is the same transformer (`transformer_2` registered as it, `boundary_ratio` =
    boundary / num_train_timesteps), so nothing of the sampling changes but the scale per step. A first scale of 1
    (no guidance at high noise) is passed as 1 + 1e-6 (`NO_GUIDANCE_ABOVE_ONE`): WanPipeline decides whether to run
    the unconditional branch from its first scale alone, and 1e-6 of the guidance direction is far below bf16/fp32
    rounding of the result.
    """
    train_steps = pipe.scheduler.config.num_train_timesteps
    if not 0 < boundary < train_steps:
        raise ValueError(f"the guidance boundary is a model timestep in (0, {train_steps}), got {boundary}")
    if getattr(pipe, "transformer_2", None) is not None and pipe.transformer_2 is not pipe.transformer:
        raise ValueError("this pipeline has two experts: its guidance already switches at their boundary")
    pipe.register_modules(transformer_2=pipe.transformer)
    pipe.register_to_config(boundary_ratio=boundary / train_steps)


def _jsonable_objects(objects: list[dict]) -> list[dict]:
    """`metrics.score_video`'s per-object measurements as JSON values (floats rounded to 4 digits, tuples as lists)."""
    def value(v):
        if isinstance(v, (tuple, list)):
            return [value(x) for x in v]
        return round(float(v), 4) if isinstance(v, (float, np.floating)) else v

    return [{k: value(v) for k, v in obj.items()} for obj in objects]


def evaluate(
    prompts: list[tuple[str, Scene]],
    seeds: list[int],
    *,
    steps: int | None = None,
    guidance: float | None = None,
    attention: str | None = None,
    sparsity: float | None = None,
    lora: str | None = None,
    model: str | None = None,
    device: str = "cpu",
    dense_steps: int | None = None,
    mask_reuse_steps: int = 1,
    compare_dense: bool = False,
    save_videos: str | None = None,
    dense_cache: dict | None = None,
    guidance_2: float | None = None,
    guidance_boundary: float | None = None,
    pool_size: int | None = None,
    max_keep: float | None = None,
    early_steps: int | None = None,
    early_max_keep: float | None = None,
    early_pool_size: int | None = None,
    samples_per_block: int | None = None,
) -> dict[str, Any]:
    """Generate every (prompt, seed) video and score it; returns the report (see the module docstring).

    ``guidance_2`` with ``guidance_boundary`` (the teacher only): a guidance interval, ``guidance`` at model timesteps
    >= the boundary and ``guidance_2`` below (``set_guidance_interval``; the trainer's --cfg_2 / --cfg_boundary).

    ``early_steps`` / ``early_max_keep`` / ``early_pool_size`` (ASA only): the student's first steps with more global
    context, over the LoRA's own ``early_context`` (``EarlyContext.resolve``; ``early_steps=0`` turns it off).

    ``dense_cache``: with ``compare_dense``, a dict that keeps the dense reference videos between calls (keyed by
    model, LoRA, prompt, seed, steps and guidance), so comparing several attention modes renders each reference once.
    """
    check_mask_reuse_steps(mask_reuse_steps)  # before any loading
    if pool_size is not None and (attention not in (None, "asa") or isinstance(pool_size, bool) or pool_size < 1):
        raise ValueError(f"--pool_size is ASA's global-token window, an int >= 1 with --attention asa; got "
                         f"{pool_size!r} with --attention {attention}")
    if max_keep is not None and (attention not in (None, "asa") or not 0.0 < max_keep <= 1.0):
        raise ValueError(f"--max_keep is the ASA prober's largest kept fraction, in (0, 1] with --attention asa; got "
                         f"{max_keep!r} with --attention {attention}")
    if samples_per_block is not None and (attention not in (None, "asa") or isinstance(samples_per_block, bool)
                                          or samples_per_block < 1):
        raise ValueError(f"--samples_per_block is the ASA prober's sampled tokens per block, an int >= 1 with "
                         f"--attention asa; got {samples_per_block!r} with --attention {attention}")
    if (guidance_2 is None) != (guidance_boundary is None):
        raise ValueError("a guidance interval needs both guidance_2 and guidance_boundary")
    if guidance_2 is not None and lora:
        raise ValueError("a guidance interval is for the teacher: a BLADE student samples without CFG")
    early_context = resolve_early_context(lora, attention, early_steps, early_max_keep, early_pool_size)
    pipe = load_pipeline(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    lora_config = (api.load_blade_lora(pipe, lora, asa=False) or None) if lora else None
    steps, guidance, attention, dense_steps = sampling_settings(lora_config, steps, guidance, attention, dense_steps)
    size = {k: TINYWORLD_DEFAULTS[k] for k in ("num_frames", "height", "width")}
    extra = {"max_sequence_length": TINYWORLD_DEFAULTS["max_sequence_length"]}
    guidance_first = guidance
    if guidance_2 is not None:
        set_guidance_interval(pipe, guidance_boundary)
        extra["guidance_scale_2"] = guidance_2
        if guidance <= 1.0 < guidance_2:
            guidance_first = NO_GUIDANCE_ABOVE_ONE

    def run(prompt: str, seed: int) -> tuple[np.ndarray, dict]:
        return api.generate(pipe, prompt, seed=seed, steps=steps, guidance_scale=guidance_first, **size, **extra)

    videos_dir = Path(save_videos) if save_videos else None
    if videos_dir:
        videos_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(p, s, seed) for p, s in prompts for seed in seeds]

    dense_frames: dict[tuple, np.ndarray] = {} if dense_cache is None else dense_cache

    def dense_key(prompt: str, seed: int) -> tuple:
        return str(model), str(lora), prompt, seed, steps, guidance, guidance_2, guidance_boundary

    if compare_dense:
        configure_attention(pipe, "dense", sparsity=None, dense_steps=0, lora_config=lora_config)
        for prompt, _, seed in tqdm(jobs, desc="dense reference"):
            if dense_key(prompt, seed) not in dense_frames:
                dense_frames[dense_key(prompt, seed)] = run(prompt, seed)[0]
    configure_attention(pipe, attention, sparsity=sparsity, dense_steps=dense_steps, lora_config=lora_config,
                        mask_reuse_steps=mask_reuse_steps, pool_size=pool_size, max_keep=max_keep,
                        early_context=early_context, samples_per_block=samples_per_block)

    videos = []
    for index, (prompt, scene, seed) in enumerate(tqdm(jobs, desc=f"evaluate ({attention})")):
        frames, info = run(prompt, seed)
        truth = render_prompt(prompt, seed, num_frames=frames.shape[0], height=frames.shape[1], width=frames.shape[2])
        score = metrics.score_video(frames, scene)
        entry = {
            "prompt": prompt,
            "seed": seed,
            "adherence": score["adherence"],
            "stability": score["stability"],
            "fidelity": metrics.fidelity_distance(frames, truth, scene),
            "duplicated": score["duplicated"],  # fraction of the prompt's objects drawn more than once (not a check)
            "sparsity": info["sparsity"] if info["sparsity"] is not None else 0.0,
            # the paper's form, 1 - density - 1/n: the pooled global keys count as attended (0 for dense)
            "sparsity_paper": (info.get("asa_stats") or {}).get("sparsity_paper", 0.0),
            "seconds": info["timings"]["total_s"],
            "checks": score.get("checks", {}),
            # what the checks measured, per object (fill ratio: the shape cue; area; velocity; colour): why one failed
            "objects": _jsonable_objects(score.get("objects", [])),
        }
        if compare_dense:
            reference = dense_frames[dense_key(prompt, seed)]
            entry["psnr"] = min(metrics.psnr(frames, reference), PSNR_CAP_DB)
            entry["ssim"] = metrics.ssim(frames, reference)
        if videos_dir:
            from blade.video import export_mp4

            export_mp4(frames, videos_dir / f"{index:03d}_seed{seed}.mp4", fps=TINYWORLD_DEFAULTS["fps"])
        videos.append(entry)

    summary = metrics.summarize(videos)
    report: dict[str, Any] = {
        "adherence": summary.get("adherence"),
        "stability": summary.get("stability"),
        "fidelity": summary.get("fidelity"),
        "sparsity": summary.get("sparsity"),
        "sparsity_paper": summary.get("sparsity_paper"),
        "duplicated": summary.get("duplicated"),
    }
    if compare_dense:
        report["psnr"] = summary.get("psnr")
        report["ssim"] = summary.get("ssim")
    report.update(
        {
            "seconds_per_video": summary.get("seconds"),
            "attribute_accuracy": summary.get("attribute_accuracy"),
            "num_videos": len(videos),
            "settings": {
                "steps": steps,
                "guidance": guidance,
                "guidance_2": guidance_2,
                "guidance_boundary": guidance_boundary,
                "attention": attention,
                "requested_sparsity": sparsity,
                "dense_steps": dense_steps,
                "mask_reuse_steps": mask_reuse_steps,
                "pool_size_override": pool_size,
                "max_keep_override": max_keep,
                "samples_per_block_override": samples_per_block,
                "early_context": early_context.to_dict() if early_context else None,
                "lora": str(lora) if lora else None,
                "model": str(model) if model else "bundled",
                "device": device,
                "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"),
            },
            "videos": videos,
        }
    )
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m blade.tinyworld.evaluate",
        description="Score TinyWorld videos (teacher, or a BLADE student with --lora) against the known world.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--prompts", required=True, help="text file, one grammar prompt a line (# comments skipped)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; every prompt runs with each")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the LoRA's K, else 50 for the teacher)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: 1 with --lora, else 5.0)")
    parser.add_argument("--guidance_2", type=float, default=None,
                        help="the teacher's guidance below --guidance_boundary (a guidance interval: --guidance at "
                             "model timesteps >= the boundary, e.g. --guidance 1 --guidance_2 3.5 --guidance_boundary "
                             "900 guides only below t 900)")
    parser.add_argument("--guidance_boundary", type=float, default=None,
                        help="model timestep where --guidance_2 takes over (with --guidance_2)")
    parser.add_argument("--attention", choices=ATTENTION_MODES, default=None,
                        help="self-attention: stock dense, adaptive ASA, static local window, or random blocks "
                             "(default: asa when the LoRA's blade_config.json has an ASA config, else dense)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="target self-attention sparsity for window/random (and pinned ASA), e.g. 0.75")
    parser.add_argument("--dense_steps", type=int, default=None,
                        help="run the first N sampling steps dense (default: the LoRA's dense_steps, else 0)")
    parser.add_argument("--mask_reuse_steps", type=int, default=1,
                        help="with ASA, each prober mask serves N sampling steps (1: a fresh mask every step)")
    parser.add_argument("--pool_size", type=int, default=None,
                        help="with ASA, the global-token pool window (mean-pooled keys over windows of N tokens) in "
                             "place of the LoRA's or the default config's: a smaller N gives more global tokens")
    parser.add_argument("--max_keep", type=float, default=None,
                        help="with ASA, the prober's largest kept fraction of a query block row (e.g. 0.17, the "
                             "paper's Wan clamp) in place of the LoRA's or the default config's")
    parser.add_argument("--samples_per_block", type=int, default=None,
                        help="with ASA, tokens the prober samples per block to estimate block importance (default: "
                             "the LoRA's or the default config's, 16); more cost more (~(samples / block size)^2 of "
                             "dense Q K^T) and estimate finer")
    parser.add_argument("--early_context_steps", type=int, default=None,
                        help="with ASA, the first N sampling steps run with more global context (--early_max_keep, "
                             "--early_pool_size over the config); 0 turns it off (default: the LoRA's early_context)")
    parser.add_argument("--early_max_keep", type=float, default=None,
                        help="the prober's largest kept fraction at the early steps (default: the LoRA's, else 0.25)")
    parser.add_argument("--early_pool_size", type=int, default=None,
                        help="the global-token pool window at the early steps (default: the LoRA's, else 5)")
    parser.add_argument("--lora", default=None, help="BLADE LoRA (.safetensors or its folder with blade_config.json)")
    parser.add_argument("--model", default=None, help="TinyWorld pipeline folder (default: the bundled one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--compare_dense", action="store_true",
                        help="also run dense with the same noise and report PSNR/SSIM against it")
    parser.add_argument("--save_videos", default=None, help="folder to write each generated video as mp4")
    parser.add_argument("--out", required=True, help="path of the JSON report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        prompts = read_prompts(args.prompts)
        if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
            raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
        report = evaluate(
            prompts, args.seeds, steps=args.steps, guidance=args.guidance, attention=args.attention,
            sparsity=args.sparsity, lora=args.lora, model=args.model, device=args.device,
            dense_steps=args.dense_steps, mask_reuse_steps=args.mask_reuse_steps, compare_dense=args.compare_dense,
            save_videos=args.save_videos, guidance_2=args.guidance_2, guidance_boundary=args.guidance_boundary,
            pool_size=args.pool_size, max_keep=args.max_keep, early_steps=args.early_context_steps,
            early_max_keep=args.early_max_keep, early_pool_size=args.early_pool_size,
            samples_per_block=args.samples_per_block,
        )
    except (PromptError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    names = ("adherence", "stability", "fidelity", "sparsity", "sparsity_paper", "psnr", "ssim")
    shown = {k: report[k] for k in names if k in report}
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in shown.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
