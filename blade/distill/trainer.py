"""The accelerate training loop of sparsity-aware TDM distillation, shared by both model folders.

`wanx/train/train_wanx_tdm.py` and `cogvideox/train/train_cogvideo_tdm.py` only call `main("wan")` /
`main("cogvideox")`. This module owns the flags, the checks before the model loads, the model setup, the checkpoint
contents and `train()`'s loop; one optimizer step is `blade.distill.step.TDMStep`, and RNG states, sealed checkpoint
folders, resume and the time box are the shared `blade.training.runtime`. Design notes:

- One frozen base transformer carries two LoRA adapters ("student", "fake"); the teacher is the base with adapters
  disabled and ASA off. Because the three roles share one module, it is not wrapped in DDP (DDP's gradient hooks
  cannot follow adapter switching); the trainer all-reduces the LoRA gradients itself before each optimizer step.
- A two-expert pipeline (Wan2.2-T2V-A14B: `transformer` + `transformer_2`) is distilled as a whole: both experts
  carry the student and fake adapters, and `blade.distill.experts.ExpertRouter` sends every call at noise level t
  to the expert that owns t (WanPipeline's boundary rule). The optimizers hold both experts' adapters; checkpoints
  and the final LoRA folder hold one file per expert (`*_transformer_2.safetensors` beside the first).
- Prompts are sharded over processes with a seeded per-epoch permutation: each prompt is used once per epoch (the
  released code re-read overlapping windows of prompts). The sampler is resumable mid-epoch.
- Checkpoints are atomic (`checkpoint-N.tmp` -> fsync -> `COMPLETE` marker -> `os.replace`) and hold everything
  needed for a bit-identical resume: both LoRAs (fp32), optimizer + LR-scheduler states, step/epoch position and
  every RNG state (python, numpy, torch, CUDA, the trainer's generators).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from blade.attention.asa import ASAConfig
from blade.collectives import collective_in_place
from blade.config import CONFIG_NAME, BladeConfig  # noqa: F401 - CONFIG_NAME re-exported (its name before the move)
from blade.distill import lora
from blade.distill.experts import denoiser, expert_file_name, experts_of
from blade.distill.model_extensions import ModelExtensionError, load_extension

# StudentEMA, training_phase, optimizer_step, sync_gradients and _make_schedulers lived here: still importable from
# here (tests, benchmarks/train_step.py).
from blade.distill.step import StudentEMA, TDMStep, optimizer_step, sync_gradients, training_phase  # noqa: F401
from blade.distill.step import make_schedulers as _make_schedulers  # noqa: F401
from blade.distill.tdm import TDMConfig, TDMFamily, TDMObjective
from blade.families import FAMILIES, folder_experts, folder_flow_shift, get_family, read_json, video_defaults
from blade.outputs import OutputLocationError, check_output_dir, describe_write_failure, make_readable, nonfinite_keys
from blade.pipelines.hints import EXTENSION_KEY, TINYWORLD_EXTENSION, ModelHintsError, read_model_hints
from blade.pipelines.loading import LORA_WEIGHT_NAME, LoraError, ModelFolderError
from blade.prompts import PromptCacheError, PromptEmbeddingCache
from blade.training.runtime import (
    COMPLETE_MARKER,
    CheckpointError,
    NonFiniteError,
    TimeBox,
    checkpoint_folder,
    find_latest_checkpoint,
    fresh_folder,
    previous_checkpoint,
    replace_folder,
    resolve_resume,
    rng_state,
    seal_folder,
    seed_everything,
    set_rng_state,
    temporary_folder,
)

logger = logging.getLogger("blade.trainer")

FAKE_WEIGHT_NAME = "fake_lora.safetensors"
# CONFIG_NAME (blade_config.json) and its content: blade.config.BladeConfig. A model folder's size hints are read by
# blade.pipelines.hints (blade_defaults.json; the trainer writes no hints file).

# Per-family defaults: paper / released launch scripts (shared/reference/method_blade_tdm.md, section 2), owned by
# the family registry (blade.families).
FAMILY_DEFAULTS = {name: family.training_defaults() for name, family in FAMILIES.items()}


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def build_parser(family: str) -> argparse.ArgumentParser:
    """The command line of both entry points (released flag names, per-family defaults)."""
    d = FAMILY_DEFAULTS[family]
    p = argparse.ArgumentParser(
        description=f"Sparsity-aware TDM distillation of a {family} video model into an 8-step LoRA student. A "
                    "two-expert model (Wan2.2-T2V-A14B) trains both experts: each network call goes to the expert "
                    "owning its noise level (t >= boundary_ratio * 1000: transformer, else transformer_2), and the "
                    "LoRA folder holds one file per expert.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Local diffusers pipeline folder of the teacher (no hub download).")
    p.add_argument("--prompt_dir", default=None, help="Prompt-embedding cache from utils/process_prompts_*.py.")
    p.add_argument("--output_dir", required=True, help="Checkpoints, final LoRA, validation videos, logs.")
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder.")
    p.add_argument("--seed", type=int, default=42, help="Seed of noise, step/tau draws and prompt order.")
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Autocast precision; the frozen base is stored in it, LoRA weights stay fp32. "
                   "Default: bf16 on CUDA, no on CPU.")
    p.add_argument("--train_batch_size", type=int, default=1, help="Videos per process per micro-step.")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps per optimizer step.")
    p.add_argument("--learning_rate", type=float, default=1e-4, help="Base learning rate.")
    p.add_argument("--learning_rate_g", type=float, default=None,
                   help="Student (generator) learning rate; defaults to --learning_rate.")
    p.add_argument("--learning_rate_fake", type=float, default=5e-4, help="Fake-score learning rate.")
    p.add_argument("--lambda_reg", type=float, default=d["lambda_reg"],
                   help="Weight of ||fake - teacher(no CFG)||^2 in the fake-score loss.")
    p.add_argument("--k_step", type=int, default=8, help="Student steps K (anchors 999 - k*1000//K).")
    p.add_argument("--cfg", type=float, default=d["cfg"],
                   help="Teacher classifier-free guidance scale in TDM (the family's released recipe value, for "
                   "every model of the family).")
    p.add_argument("--cfg_2", type=float, default=None,
                   help="Two-expert models (Wan2.2-T2V-A14B): the teacher's guidance scale for the low-noise expert "
                   "(transformer_2), as WanPipeline's guidance_scale_2 (default: --cfg for both experts). One "
                   "transformer: the scale below --cfg_boundary (a guidance interval).")
    p.add_argument("--cfg_boundary", type=float, default=None,
                   help="One-transformer models, with --cfg_2: a guidance interval in the generator's target, --cfg at "
                   "model timesteps >= this (high noise, where the layout is decided) and --cfg_2 below, e.g. --cfg 1 "
                   "--cfg_2 3.5 --cfg_boundary 900 (no guidance above t 900). Two-expert models switch at their "
                   "experts' boundary instead.")
    p.add_argument("--eta", type=float, default=0.9, help="Student re-noising: eta*eps + sqrt(1-eta^2)*z.")
    p.add_argument("--tau_max", type=int, default=979, help="Largest diffusion time of the fake/teacher scores.")
    p.add_argument("--use_sparsity", action="store_true",
                   help="Adaptive block-sparse attention (ASA) in the student and fake score; the teacher stays dense.")
    p.add_argument("--dense_steps", type=int, default=0,
                   help="First student steps that run dense (ASA off) in training (the fake score matching them too) "
                        "and in the saved sampler config.")
    p.add_argument("--asa_max_keep", type=float, default=None,
                   help="Largest share of key blocks ASA keeps per query block (default: the family's, 0.17 = "
                   "sparsity >= 0.83); e.g. 0.25 for sparsity >= 0.75. Saved in blade_config.json for inference "
                   "(the inference scripts' --asa_max_keep overrides it). On TinyWorld, training at 0.25 and "
                   "sampling at 0.17 beat training at 0.17 by 0.030 +- 0.011 adherence on 192 GPU videos and "
                   "0.007 +- 0.011 on 176 CPU videos (one training seed each; BENCHMARKS.md, 'Session 16'); not "
                   "measured at full size.")
    p.add_argument("--asa_block_size", type=int, default=None,
                   help="Tokens per ASA block, a multiple of 16 (default: the family's, 128). Smaller blocks select "
                   "more finely on short videos (TinyWorld's 5,120 tokens are 40 blocks of 128, a full-size Wan video "
                   "256). Saved in blade_config.json for inference.")
    p.add_argument("--asa_pool_size", type=int, default=None,
                   help="Video tokens mean-pooled into one global token that every query attends to (default: what "
                   "enable_asa uses for the model: a published model's window scaled with its default video's tokens, "
                   "e.g. 69 for Wan2.1-14B at 720p, ~1,100 global tokens; else the family's, 30: 171 on TinyWorld's "
                   "5,120). Smaller windows give more global context at more cost (TinyWorld's measurements of the "
                   "window: BENCHMARKS.md, study call 13). Saved in blade_config.json.")
    p.add_argument("--fake_attention", choices=["asa", "dense"], default="asa",
                   help="Attention of the fake score under --use_sparsity: asa = the student's sparse attention (the "
                   "released code copies the sparse student); dense = full attention, so that fake - teacher holds "
                   "no sparse-attention error of the fake's own, only the student's mismatch (slower steps).")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (student and fake).")
    p.add_argument("--lora_alpha", type=int, default=64, help="LoRA alpha.")
    p.add_argument("--lora_targets", choices=[*lora.TARGET_PRESETS, lora.ALL_LINEAR], default="all",
                   help="Linear layers with a LoRA (student and fake): all = every Linear of the transformer (the "
                   "distillation study's recipe: more capacity, a better student); attn = every attention projection "
                   "(the released recipe); attn_ffn = the attention projections and both feed-forward layers.")
    p.add_argument("--max_train_steps", type=int, default=300, help="Optimizer steps.")
    p.add_argument("--checkpointing_steps", type=int, default=15, help="Checkpoint every N optimizer steps.")
    p.add_argument("--validation_steps", type=int, default=None,
                   help="Validation videos every N steps (default: at each checkpoint; 0 disables).")
    p.add_argument("--num_validation_videos", type=int, default=2, help="Validation prompts rendered each time.")
    p.add_argument("--max_train_minutes", type=float, default=None,
                   help="Time box: stop cleanly with a checkpoint after this many minutes (SIGTERM or Ctrl-C "
                        "stop the same way at any time; a second one stops at once).")
    p.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward.")
    p.add_argument("--enable_slicing", action="store_true", help="VAE slicing for validation decoding.")
    p.add_argument("--enable_tiling", action="store_true", help="VAE tiling for validation decoding.")
    model_default = ("the model folder's blade_defaults.json, else the published model its configs match "
                     "(blade.families.MODELS, e.g. Wan2.1-14B 81x720x1280, Wan2.2-TI2V-5B 121x704x1280 at 24 fps), "
                     "else the family's")
    p.add_argument("--num_frames", type=int, default=None,
                   help=f"Video frames (default: {model_default}: {d['num_frames']}).")
    p.add_argument("--height", type=int, default=None, help=f"Video height (default: as --num_frames; {d['height']}).")
    p.add_argument("--width", type=int, default=None, help=f"Video width (default: as --num_frames; {d['width']}).")
    p.add_argument("--fps", type=int, default=None,
                   help=f"Validation video fps (default: as --num_frames; {d['fps']}).")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    p.add_argument("--fake_loss_skip", type=float, default=None,
                   help="Skip the fake update when its loss exceeds this (released Wan code: 2.0; default off).")
    p.add_argument("--huber_c", type=float, default=None, help="Pseudo-Huber c (default: the family's rule).")
    p.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"], help="Logger.")
    # Recipe options studied for issue 16 (BENCHMARKS.md, "Distillation study"); defaults keep the released recipe.
    p.add_argument("--lr_scheduler", default="cosine_with_restarts",
                   choices=["cosine_with_restarts", "cosine", "linear", "constant", "constant_with_warmup"],
                   help="Student learning-rate schedule over --max_train_steps (released: one cosine cycle).")
    p.add_argument("--lr_warmup_steps", type=int, default=5, help="Student learning-rate warm-up steps.")
    p.add_argument("--fake_updates", type=int, default=1,
                   help="Fake-score optimizer steps per generator step (DMD2's two-time-scale rule uses 5), each on "
                   "a fresh step/tau draw of the same rollout; > 1 needs --gradient_accumulation_steps 1.")
    p.add_argument("--tau_mode", default="to_max", choices=["to_max", "segment"],
                   help="tau range of the fake/teacher scores: (t_mid, tau_max] (released BLADE) or the step's own "
                   "segment (t_mid, t_i] (TDM's 'fully separate' mode).")
    p.add_argument("--step_draw", default="batch", choices=["batch", "sample"],
                   help="Student step index of an update: one for the whole batch (default), or one per sample as "
                   "TDM's and BLADE's released trainers draw it (every update then trains all steps; no gain on "
                   "TinyWorld, BENCHMARKS.md call 6; not with --dense_steps).")
    # Default changed from the released code's pseudo-Huber (near L1 at these sizes, so a sign gradient) after the
    # TinyWorld study (BENCHMARKS.md, "Distillation study"): squared error with DMD2's per-sample normalisation was
    # the strongest single change of the screen. `--generator_loss huber --normalize_generator auto` is the paper's.
    p.add_argument("--generator_loss", default="l2", choices=["huber", "l2"],
                   help="Generator regression toward stopgrad(x0 + teacher_cfg - fake): squared error (DMD2) or "
                   "pseudo-Huber (the released code; near L1 at these sizes).")
    p.add_argument("--normalize_generator", default="on", choices=["auto", "on", "off"],
                   help="Divide the generator loss per sample by mean|x0 - teacher_cfg| (DMD2); auto = the released "
                   "code's per-family choice (on for CogVideoX, off for Wan).")
    p.add_argument("--ema_decay", type=float, default=0.0,
                   help="EMA of the student LoRA (0 = off); the saved LoRA and the in-training evaluation use it "
                   "(the raw student is evaluated too, and saved in OUTPUT_DIR/raw_student/).")
    p.add_argument("--reflow_steps", type=int, default=0,
                   help="First N optimizer steps regress the student onto the teacher's ODE solution from the same "
                   "noise (data-free pairs from the prompt cache, sample with --eta 0); a number >= "
                   "--max_train_steps gives the plain-distillation control.")
    p.add_argument("--reflow_weight", type=float, default=0.0,
                   help="During TDM, also regress the student onto the teacher's ODE samples (the --reflow_steps "
                   "pairs) with this weight beside the distribution-matching loss, as DMD (Yin et al. 2024) pairs "
                   "its matching loss with a regression loss (0 = off). Why: a student regressed onto the teacher's "
                   "samples keeps the teacher's layout, TDM alone adds duplicated objects (BENCHMARKS.md call 10).")
    p.add_argument("--reflow_pairs", type=int, default=1024,
                   help="(noise, teacher sample) pairs for --reflow_steps and --reflow_weight.")
    p.add_argument("--reflow_teacher_steps", type=int, default=50,
                   help="Steps of the teacher's own scheduler for the reflow pairs (with --cfg).")
    p.add_argument("--fake_warmup_steps", type=int, default=0,
                   help="Optimizer steps that train only the fake score (after any reflow phase), before TDM.")
    p.add_argument("--diag_every", type=int, default=0,
                   help="Every N steps also log the dense teacher's denoising error on the fake's batch (0 = off).")
    p.add_argument("--eval_every", type=int, default=0,
                   help="Models with a trainer extension (TinyWorld): score the student's samples every N steps "
                   "(TinyWorld: adherence, fidelity) into output_dir/logs.jsonl (0 = off).")
    p.add_argument("--eval_prompts", default=None,
                   help="Grammar prompts for --eval_every (default: assets/tinyworld/eval_prompts.txt).")
    p.add_argument("--eval_seeds", type=int, nargs="+", default=[1000], help="Seeds for --eval_every.")
    if get_family(family).flow_shift:
        p.add_argument("--shift", type=float, default=None,
                       help="Flow shift of the student's anchor schedule (default: the model folder's scheduler "
                       "flow_shift, e.g. 3.0 for Wan2.1 and TinyWorld, else 1.0; 1.0 = anchors uniform in sigma, as "
                       "the released BLADE trains). With 3.0 the 8 anchors sit at the noise levels of the teacher's "
                       "own 8-step UniPC schedule (BENCHMARKS.md, distillation study, call 6).")
    for flag, _, help_text in get_family(family).trainer_presets:  # e.g. --tinyworld (a Wan-architecture model)
        p.add_argument(f"--{flag}", action="store_true", help=help_text)
    return p


def preset_extension(args: argparse.Namespace) -> str | None:
    """The trainer extension module named by the preset flag given (e.g. --tinyworld), or None."""
    chosen = [module for flag, module, _ in get_family(args.family).trainer_presets if getattr(args, flag, False)]
    return chosen[0] if chosen else None


def parse_args(family: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and fill the size defaults: explicit flag > the model folder's blade_defaults.json (or blade_hints.json;
    TinyWorld's size for a TinyWorld folder) > a preset flag's (--tinyworld) > the published model the folder's
    configs match (``blade.families.model_of_folder``; JSON only) > the family's.

    Also sets `args.model_extension`: the trainer extension module (``blade.distill.model_extensions``) the model
    folder names (or that its recognised kind has), else the preset flag's, else None.
    """
    parser = build_parser(family)
    args = parser.parse_args(argv)
    args.family = family
    validate_args(parser, args)
    # a preset flag (--tinyworld) only names a trainer extension module, which provides its model path and size
    preset_module = preset_extension(args)
    preset = load_extension(preset_module) if preset_module else None
    if preset is not None and args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = preset.preset_model_path()
    if args.pretrained_model_name_or_path is None:
        raise SystemExit("error: --pretrained_model_name_or_path is required")
    defaults, _ = video_defaults(family, args.pretrained_model_name_or_path)
    if preset is not None:
        defaults.update({k: v for k, v in preset.defaults().items() if k in ("num_frames", "height", "width", "fps")})
    # The model folder's own size: blade_defaults.json (or the older blade_hints.json), or TinyWorld's for a
    # TinyWorld pipeline folder (recognised by its tokenizer), so MODEL_PATH=assets/tinyworld/pipeline just works.
    try:
        hints = read_model_hints(args.pretrained_model_name_or_path)
    except ModelHintsError as err:
        raise SystemExit(f"error: {err}") from None
    defaults.update({k: hints[k] for k in ("num_frames", "height", "width", "fps") if k in hints})
    args.model_extension = hints.get(EXTENSION_KEY) or preset_module
    if args.model_extension is not None:
        try:
            load_extension(args.model_extension)  # a bad module name fails here, not after the model loads
        except ModelExtensionError as err:
            raise SystemExit(f"error: {err}") from None
    elif args.eval_every > 0:
        raise SystemExit(f"error: --eval_every needs a model with a trainer extension (e.g. TinyWorld); "
                         f"{args.pretrained_model_name_or_path} names none ('{EXTENSION_KEY}' in its "
                         "blade_defaults.json)")
    for flag, module, _ in get_family(family).trainer_presets:  # a preset flag also reports its model found without it
        setattr(args, flag, args.model_extension == module)
    for key in ("num_frames", "height", "width", "fps"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if get_family(family).flow_shift and args.shift is None:
        args.shift = folder_flow_shift(args.pretrained_model_name_or_path) or 1.0
    if args.prompt_dir is None:
        raise SystemExit("error: --prompt_dir is required (run utils/process_prompts_*.py first)")
    return fill_derived_flags(args)


def fill_derived_flags(args: argparse.Namespace) -> argparse.Namespace:
    """The flags whose default depends on others (student lr, validation cadence, precision) or on the family (the
    flow shift exists only where the family takes one); also what code building its own flags calls."""
    if args.learning_rate_g is None:
        args.learning_rate_g = args.learning_rate
    if args.validation_steps is None:
        args.validation_steps = args.checkpointing_steps
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    if not hasattr(args, "shift"):
        args.shift = None
    return args


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse impossible numeric flags at parse time (argparse error: usage + one line, exit 2).

    Without this, zeros surface as ZeroDivisionError mid-run (batch size, accumulation, checkpointing), a PEFT error
    (rank 0), a ValueError at the first fake step (tau_max), or an untrained LoRA saved with exit 0 (no steps).
    Size flags left at None are filled from the model folder / family later and not checked here.
    """
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    def finite(name: str) -> bool:
        value = getattr(args, name)
        return value is None or math.isfinite(value)

    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "rank", "lora_alpha",
                 "max_train_steps", "k_step", "fake_updates", "reflow_pairs", "reflow_teacher_steps"):
        need(getattr(args, name) >= 1, f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("num_frames", "height", "width", "fps"):
        value = getattr(args, name)
        need(value is None or value >= 1, f"--{name} must be >= 1, got {value}")
    need(args.fake_updates == 1 or args.gradient_accumulation_steps == 1,
         "--fake_updates > 1 needs --gradient_accumulation_steps 1 (one fake optimizer step per fake batch)")
    need(finite("ema_decay") and 0.0 <= args.ema_decay < 1.0, f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    for name in ("validation_steps", "num_validation_videos", "dataloader_num_workers", "dense_steps",
                 "lr_warmup_steps", "reflow_steps", "fake_warmup_steps", "diag_every", "eval_every"):
        value = getattr(args, name)
        need(value is None or value >= 0, f"--{name} must be >= 0, got {value}")
    for name in ("learning_rate", "learning_rate_g", "learning_rate_fake", "lambda_reg", "cfg", "cfg_2",
                 "cfg_boundary", "reflow_weight"):
        value = getattr(args, name)
        need(value is None or (math.isfinite(value) and value >= 0), f"--{name} must be a finite number >= 0, "
             f"got {value}")
    need(args.asa_max_keep is None or (math.isfinite(args.asa_max_keep) and 0.0 < args.asa_max_keep <= 1.0),
         f"--asa_max_keep must be in (0, 1], got {args.asa_max_keep}")
    need(args.asa_block_size is None or (args.asa_block_size > 0 and args.asa_block_size % 16 == 0),
         f"--asa_block_size must be a positive multiple of 16, got {args.asa_block_size}")
    need(args.asa_pool_size is None or args.asa_pool_size >= 1,
         f"--asa_pool_size must be >= 1, got {args.asa_pool_size}")
    need(args.step_draw == "batch" or not (args.use_sparsity and args.dense_steps),
         "--step_draw sample cannot go with --dense_steps: one forward serves the whole batch, so it cannot run dense "
         "for the samples at a dense step only; use --step_draw batch with --dense_steps")
    need(args.fake_attention == "asa" or args.use_sparsity,
         "--fake_attention dense changes nothing without --use_sparsity (the fake is dense already); drop it or add "
         "--use_sparsity")
    for name in ("max_train_minutes", "fake_loss_skip", "huber_c", "shift"):
        value = getattr(args, name, None)
        need(value is None or (math.isfinite(value) and value > 0),
             f"--{name} must be a finite number > 0, got {value}")
    need(finite("eta") and 0.0 <= args.eta <= 1.0, f"--eta must be in [0, 1], got {args.eta}")
    need(0 <= args.seed < 2**32 - 2**16, f"--seed must be in [0, 2**32 - 65536), got {args.seed}")  # numpy's range
    if args.k_step >= 1:
        need(args.k_step <= 1000, f"--k_step must be <= 1000, got {args.k_step}")
        # tau is drawn in (t_mid, tau_max]; the largest segment end is the second anchor 999 - 1000 // K.
        last_mid = 999 - 1000 // args.k_step if args.k_step >= 2 else 0
        need(last_mid < args.tau_max <= 999,
             f"--tau_max must be in [{last_mid + 1}, 999] for --k_step {args.k_step}, got {args.tau_max}")
        need(args.dense_steps <= args.k_step, f"--dense_steps ({args.dense_steps}) exceeds --k_step ({args.k_step})")
    if args.prompt_dir is None:
        problems.append("--prompt_dir is required (run utils/process_prompts_*.py first)")
    if args.pretrained_model_name_or_path is None and not any(
            getattr(args, flag, False) for flag, _, _ in get_family(args.family).trainer_presets):
        problems.append("--pretrained_model_name_or_path is required")
    if problems:
        parser.error("; ".join(problems))


# ----------------------------------------------------------------------------------------------------------------
# Data: each prompt once per epoch, sharded over processes, resumable mid-epoch
# ----------------------------------------------------------------------------------------------------------------


class ShardedEpochBatchSampler(Sampler):
    """Batches of prompt indices for one process: a seeded permutation per epoch, split round-robin over processes
    (padded by wrapping so every process gets as many batches), then chunked; `start_batch` skips batches already
    consumed (resume)."""

    def __init__(self, num_items: int, batch_size: int, num_replicas: int, rank: int, seed: int):
        self.num_items, self.batch_size = num_items, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _shard(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.num_items, generator=g).tolist()
        total = math.ceil(self.num_items / self.num_replicas) * self.num_replicas
        perm = (perm * math.ceil(total / max(len(perm), 1)))[:total]
        return perm[self.rank :: self.num_replicas]

    def batches_per_epoch(self) -> int:
        return math.ceil(math.ceil(self.num_items / self.num_replicas) / self.batch_size)

    def __iter__(self):
        shard = self._shard()
        for b in range(self.start_batch, self.batches_per_epoch()):
            yield shard[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.batches_per_epoch() - self.start_batch


def loader_generator(seed: int, epoch: int) -> torch.Generator:
    """The DataLoader's private generator for one epoch.

    Creating a DataLoader iterator draws its workers' base seed from a generator: torch's global one unless the
    loader has its own. A resumed run creates one iterator more than the uninterrupted run (at the resume point),
    so drawing from the global RNG would shift every later global draw, e.g. ASA's prober (seed None) sample
    positions, and the resumed run would diverge. A private generator seeded by (seed, epoch) keeps the global
    stream untouched and gives workers the same base seed in both runs.
    """
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def check_prompt_cache(cache: PromptEmbeddingCache, args: argparse.Namespace) -> None:
    """The cache must have been encoded for this family and the model's text width, in one dtype and one shape.

    A mismatch would otherwise fail deep in the model with a matrix-shape error (or, for mixed dtypes/shapes, in the
    DataLoader's collate) after the model has loaded. Only index.json is read (shapes and dtypes are recorded there).
    """
    from blade.pipelines.loading import check_model_folder, read_component_config

    model = Path(args.pretrained_model_name_or_path)
    check_model_folder(args.family, model)  # ModelFolderError naming what is missing, before anything else
    where = f"prompt cache {cache.directory}"
    script = f"utils/process_prompts_{get_family(args.family).prompt_script}.py"
    redo = f"re-encode the prompts with {script} --model_path {model}"
    if cache.family is not None and cache.family != args.family:
        raise PromptCacheError(f"{where} was encoded for {cache.family!r}, this trainer is {args.family!r}: {redo}")
    config = read_component_config(model, "transformer")
    width = config.get(get_family(args.family).text_width_key)
    entries = list(cache.entries)
    negative = cache.index.get("negative")
    if negative is None:
        raise PromptCacheError(f"{where} holds no negative-prompt embedding (CFG needs it): {redo}")
    shapes = {tuple(e.get("shape", ())) for e in entries + [negative]}
    dtypes = {e.get("dtype") for e in entries + [negative]}
    if len(shapes) > 1:
        raise PromptCacheError(f"{where} mixes embedding shapes {sorted(shapes)} (prompts and negative): {redo}")
    (shape,) = shapes
    if width is not None and shape and shape[-1] != width:
        raise PromptCacheError(
            f"{where} holds {shape[-1]}-wide text embeddings, the transformer in {model} takes {width} "
            f"(another text encoder or model?): {redo}"
        )
    recorded = cache.index.get("dtype")
    if len(dtypes) > 1 or (recorded is not None and dtypes != {recorded}):
        raise PromptCacheError(
            f"{where} mixes dtypes {sorted(d for d in dtypes if d)} (its index says {recorded}): it was extended by a "
            f"run with another --dtype; {redo} into a new folder"
        )


def estimate_checkpoint_bytes(args: argparse.Namespace) -> int:
    """About what one checkpoint + the final LoRA take on disk, from the transformer config (no weights read).

    fp32 student + fake LoRAs (4 bytes x rank x (in + out) per targeted Linear, each), AdamW's two moments for
    both, and the final student copy: 7 adapter sizes, plus 10% and 1 MiB for JSON, RNG states and headers. A
    two-expert folder (`transformer_2/config.json`) counts twice (same architecture, both experts are trained).
    """
    from blade.pipelines.loading import empty_transformer

    transformer = empty_transformer(args.family, args.pretrained_model_name_or_path)
    targets = lora.target_modules(transformer, args.lora_targets)
    params = 0
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and lora.is_target(name, targets):
            params += args.rank * (module.in_features + module.out_features)
    params *= len(folder_experts(args.pretrained_model_name_or_path))  # every expert is trained
    return int(7 * 4 * params * 1.1) + 2**20


def check_before_model_load(cache: PromptEmbeddingCache, args: argparse.Namespace) -> None:
    """Everything that can be refused in seconds, before the model loads: the prompt cache against the model, the
    output folder (creatable, writable, room for one checkpoint), and an explicit checkpoint to resume from."""
    check_prompt_cache(cache, args)
    experts = folder_experts(args.pretrained_model_name_or_path)
    check_guidance_interval(args, len(experts))
    check_output_dir(args.output_dir, estimate_checkpoint_bytes(args))
    resume = args.resume_from_checkpoint
    if resume and resume != "latest":
        check_checkpoint(Path(resume), experts)
    path = resolve_resume(resume, Path(args.output_dir))
    if path is not None:
        check_resume_recipe(path, args)


def check_guidance_interval(args: argparse.Namespace, num_experts: int) -> None:
    """--cfg_2 / --cfg_boundary against the model: a two-expert model switches guidance at its experts' boundary
    (--cfg_2 alone); one transformer needs both flags (a guidance interval) or neither."""
    boundary = args.cfg_boundary
    if num_experts > 1:
        if boundary is not None:
            raise SystemExit(f"error: {args.pretrained_model_name_or_path} has two experts; its guidance switches to "
                             f"--cfg_2 at their boundary (boundary_ratio): drop --cfg_boundary")
        return
    if args.cfg_2 is not None and boundary is None:
        raise SystemExit(f"error: {args.pretrained_model_name_or_path} has one transformer: --cfg_2 needs "
                         f"--cfg_boundary T (--cfg at model timesteps >= T, --cfg_2 below), or use --cfg alone")
    if boundary is not None and args.cfg_2 is None:
        raise SystemExit("error: --cfg_boundary needs --cfg_2, the guidance scale below the boundary")
    if boundary is not None and not 0 < boundary < 1000:
        raise SystemExit(f"error: --cfg_boundary is a model timestep in (0, 1000), got {boundary}")


def check_resume_recipe(path: Path, args: argparse.Namespace) -> None:
    """Refuse to resume a checkpoint whose student sampler (K, eta, flow shift) or generator target (its guidance:
    --cfg, --cfg_2, --cfg_boundary) differs from this run's flags: the LoRA would go on training for other anchors or
    toward another target without a word. Matters most for defaults that moved: ``--shift`` became the model folder's
    flow shift on 2026-12-06 (runs started before trained with 1.0), Wan's ``--cfg`` became 3.5 the same day (5.0
    before)."""
    saved = read_json(path / CONFIG_NAME)
    if not isinstance(saved, dict):
        return  # an older checkpoint without the file: nothing to compare
    now = {"k_step": args.k_step, "eta": args.eta, "shift": getattr(args, "shift", None), "cfg": args.cfg,
           "cfg_2": args.cfg_2, "cfg_boundary": args.cfg_boundary}
    differ = [f"--{key} {saved[key]} (this run: {now[key]})" for key in now
              if saved.get(key) is not None and now[key] is not None and float(saved[key]) != float(now[key])]
    if differ:
        raise CheckpointError(f"checkpoint {path} was trained with {', '.join(differ)}; resuming would change the "
                              f"student's sampler or its target mid-run. Pass "
                              f"{' '.join(d.split(' (')[0] for d in differ)} to resume it, or start a new --output_dir")


# ----------------------------------------------------------------------------------------------------------------
# Model setup
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(model_path: str, family: str, dtype: torch.dtype, with_vae: bool):
    """The teacher pipeline without its text encoder (prompts are pre-encoded); clear error when missing."""

    from blade.pipelines.loading import check_model_folder

    path = Path(model_path)
    check_model_folder(family, path)  # ModelFolderError (a FileNotFoundError) naming what is missing
    from blade.pipelines.loading import read_component_config

    fam = get_family(family)
    extra = {} if with_vae and (path / "vae").is_dir() else {"vae": None}
    pipe = fam.pipeline_cls().from_pretrained(str(path), text_encoder=None, tokenizer=None, torch_dtype=dtype,
                                              local_files_only=True, **extra)
    if pipe.vae is None and (path / "vae" / "config.json").is_file():
        # Without its VAE the pipeline falls back to 8x spatial / 4x temporal compression, which sizes the latents
        # wrongly for other VAEs (Wan2.2 TI2V: 16x): take the factors from the VAE config, as the pipeline would.
        spatial, temporal = fam.vae_scales(read_component_config(path, "vae"))
        pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal = spatial, temporal
    return pipe


def build_family(pipe, args) -> TDMFamily:
    return get_family(args.family).build_tdm_family(pipe, shift=args.shift)


def training_asa_config(family: str, pipe=None, max_keep: float | None = None, block_size: int | None = None,
                        pool_size: int | None = None) -> ASAConfig:
    """The ASA config a student trains with (and its blade_config.json records for inference): `enable_asa`'s
    default for the same pipeline (the registry's for a recognised published model, its pool window scaled with the
    default video's token count; else the family's), then the given overrides."""
    from blade.models import default_pipeline_asa_config

    config = (default_pipeline_asa_config(pipe) if pipe is not None else None) or get_family(
        family).adapter().default_asa_config()
    if max_keep is not None:
        config = dataclasses.replace(config, max_keep=max_keep, min_keep=min(config.min_keep, max_keep))
    if block_size is not None:
        config = dataclasses.replace(config, block_size=block_size)
    if pool_size is not None:
        config = dataclasses.replace(config, pool_size=pool_size)
    return config


def apply_sparsity(transformer, family: str, max_keep: float | None = None, pipe=None,
                   block_size: int | None = None, pool_size: int | None = None):
    """Patch the transformer's self-attention with ASA for training; returns (handle, config as a dict). The config:
    `training_asa_config` (the default `enable_asa` would use on `pipe`, with `max_keep`, `block_size`, `pool_size`
    overriding it).

    The handle's own ``dense_steps`` stays 0: its tracker infers the sampling step from the order of timesteps,
    which training's forwards (rollout, fake at a random tau, teacher, generator) do not follow; the objective
    switches ASA per forward by the student step it serves (``TDMConfig.dense_steps``).

    With `pipe` of two experts, both are patched (one shared ASA module and step tracker, a `PipelineASAHandle`).
    """
    adapter = get_family(family).adapter()
    config = training_asa_config(family, pipe, max_keep, block_size, pool_size)
    if pipe is not None and getattr(pipe, "transformer_2", None) is not None:
        from blade.models import apply_asa_pipeline

        handle = apply_asa_pipeline(pipe, config, dense_steps=0)
    else:
        handle = adapter.apply_asa(transformer, config, dense_steps=0)
    cfg_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    return handle, cfg_dict


def blade_config(args, family: TDMFamily, objective: TDMObjective, asa_config: dict | None,
                 boundary_ratio: float | None = None) -> BladeConfig:
    """The blade_config.json written beside every LoRA (docs/internals.md, "BLADE LoRA folder"); `boundary_ratio`:
    a two-expert pipeline's routing, which inference checks."""
    return BladeConfig(
        family=family.name,
        k_step=args.k_step,
        anchors=[int(a) for a in objective.anchors],
        eta=args.eta,
        prediction_type=family.schedule.prediction_type,
        shift=family.schedule.shift if get_family(family.name).flow_shift else None,  # the shift trained with
        asa=asa_config,
        dense_steps=objective.config.dense_steps,
        lora_rank=args.rank,
        lora_alpha=args.lora_alpha,
        cfg=args.cfg,
        cfg_2=args.cfg_2,
        cfg_boundary=args.cfg_boundary,
        boundary_ratio=boundary_ratio,
        lora_targets=args.lora_targets,
        num_frames=args.num_frames,
        height=args.height,
        width=args.width,
        fps=args.fps,
    )


# ----------------------------------------------------------------------------------------------------------------
# Adapters on every process (no DDP wrapper, see module docstring; the optimizer step is blade.distill.step's)
# ----------------------------------------------------------------------------------------------------------------


def init_adapters(accelerator, transformer: torch.nn.Module, args) -> None:
    """Add the student and fake LoRA adapters (float32) to the transformer (to every expert of an `ExpertRouter`,
    `transformer` first), identical on every process.

    PEFT draws the LoRA A matrices from torch's global generator, whose state differs between processes unless it is
    seeded here; with different initial weights the processes would train different students from the same averaged
    gradients (and only process 0's would be saved). So: seed, then also copy process 0's values to the others.
    """
    torch.manual_seed(args.seed)
    for _, expert in experts_of(transformer):
        lora.add_student_and_fake(expert, args.rank, args.lora_alpha, lora.target_modules(expert, args.lora_targets))
        lora.cast_lora_to(expert, torch.float32)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        params = lora.adapter_parameters(transformer, lora.STUDENT) + lora.adapter_parameters(transformer, lora.FAKE)
        collective_in_place(params, lambda flat: broadcast(flat, from_process=0))


def check_replicas_agree(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Raise if the processes' copies of the trainable weights differ (they must: same start, same averaged updates).

    One small all-gather of three checksums per process, at checkpoints only.
    """
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().reshape(-1).double() for p in params])
    weights = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64).remainder_(7).add_(1)
    sums = torch.stack([flat.sum(), flat.square().sum(), (flat * weights).sum()])[None]  # [1, 3]
    gathered = accelerator.gather(sums)  # [processes, 3]
    spread = (gathered - gathered[:1]).abs().max()
    if spread > 1e-6 * gathered[0].abs().max().clamp_min(1.0):
        raise RuntimeError(f"the LoRA weights differ between processes (checksums {gathered.tolist()}): the "
                           "processes are no longer training the same model")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _write_lora_folder(folder: Path, family: TDMFamily, transformer, config: BladeConfig) -> None:
    """Student LoRA in diffusers format (loadable by `pipe.load_lora_weights`) + blade_config.json, readable by all.

    One file per expert, each with `transformer.`-prefixed keys: diffusers' WanLoraLoaderMixin saves only
    `transformer` layers and loads a file into `transformer_2` with `load_into_transformer_2=True`, which is how
    `blade.api.load_blade_lora` reads `pytorch_lora_weights_transformer_2.safetensors`.
    """
    states = {}
    for expert_name, expert in experts_of(transformer):
        state = lora.adapter_state_dict(expert, lora.STUDENT)
        state = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in state.items()}
        name = expert_file_name(LORA_WEIGHT_NAME, expert_name)
        bad = nonfinite_keys(state)
        if bad:  # last line of defence: never write a LoRA that renders black videos
            raise NonFiniteError(f"refusing to save {folder / name}: {len(bad)} of {len(state)} student LoRA "
                                 f"tensors hold NaN/Inf (e.g. {bad[0]})")
        states[name] = state
    for name, state in states.items():  # nothing is written unless every expert is finite
        family.pipeline_class.save_lora_weights(
            str(folder), transformer_lora_layers=state, weight_name=name, safe_serialization=True
        )
    make_readable(*(folder / name for name in states), config.save(folder))  # safetensors writes 0600


# With --ema_decay the LoRA in output_dir is the average; the raw student's LoRA goes in this subfolder.
RAW_STUDENT_FOLDER = "raw_student"


def save_lora_folder(folder: Path, family: TDMFamily, transformer, config: BladeConfig) -> None:
    """The final student LoRA folder; a failed write says what failed (space, permission)."""
    try:
        _write_lora_folder(folder, family, transformer, config)
    except (OSError, RuntimeError, SafetensorError) as err:
        if isinstance(err, NonFiniteError):
            raise
        raise CheckpointError(
            f"saving the student LoRA to {folder} failed: {describe_write_failure(err, folder)}. The checkpoint-N "
            "folders already written are intact."
        ) from err


def save_checkpoint(accelerator, output_dir: Path, step: int, transformer, family, optimizers: dict,
                    schedulers: dict, trainer_state: dict, generators: dict, config: BladeConfig, ema=None) -> Path:
    """Write output_dir/checkpoint-`step` atomically (every rank writes its own RNG state)."""
    final = checkpoint_folder(output_dir, step)
    tmp = temporary_folder(final)
    with _save_errors(output_dir, tmp, step):
        if accelerator.is_main_process:
            fresh_folder(tmp)
        accelerator.wait_for_everyone()
        torch.save(rng_state(generators), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _save_errors(output_dir, tmp, step):
            _write_checkpoint_files(tmp, step, transformer, family, optimizers, schedulers, trainer_state, config,
                                    accelerator.num_processes, ema)
        replace_folder(tmp, final)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def _save_errors(output_dir: Path, tmp: Path, step: int):
    """Turn a failed write into a CheckpointError that says what failed and that the previous checkpoint is intact.

    The half-written folder is removed (it has no COMPLETE marker, so it would never be trusted, but it takes
    space the user needs back).
    """
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:
        if isinstance(err, (NonFiniteError, CheckpointError)):
            raise
        why = describe_write_failure(err, tmp if tmp.exists() else output_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = find_latest_checkpoint(output_dir)
        intact = (f"the previous checkpoint {previous} is intact: resume from it with --resume_from_checkpoint "
                  "latest once fixed" if previous else "no earlier checkpoint exists")
        raise CheckpointError(f"saving checkpoint-{step} into {output_dir} failed: {why}; {intact}") from err


def _write_checkpoint_files(tmp: Path, step: int, transformer, family, optimizers: dict, schedulers: dict,
                            trainer_state: dict, config: BladeConfig, num_processes: int, ema=None) -> None:
    """The main process's part of a checkpoint, into the temporary folder; COMPLETE is written last."""
    _write_lora_folder(tmp, family, transformer, config)
    for expert_name, expert in experts_of(transformer):
        fake = lora.adapter_state_dict(expert, lora.FAKE)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in fake.items()},
                  str(tmp / expert_file_name(FAKE_WEIGHT_NAME, expert_name)))
    if ema is not None:
        ema.save(tmp)
    torch.save(
        {
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
        },
        tmp / "optimizer.pt",
    )
    (tmp / "trainer_state.json").write_text(
        json.dumps({**trainer_state, "num_processes": num_processes}, indent=1)
    )
    make_readable(tmp)  # safetensors writes 0600: a shared machine's other users must be able to read it
    seal_folder(tmp, f"step {step}\n")  # COMPLETE, written last: its presence means "all there"


def _resume_advice(path: Path) -> str:
    """What to do when `path` cannot be resumed from: the previous complete checkpoint, or a fresh start."""
    previous = previous_checkpoint(path)
    if previous is not None:
        return f"resume from the previous complete checkpoint with --resume_from_checkpoint {previous}"
    return (f"no earlier complete checkpoint exists beside it: start again without --resume_from_checkpoint "
            f"(or remove {path})")


def check_checkpoint(path: Path, experts: tuple[str, ...] = ("transformer",)) -> None:
    """Refuse a folder that is not a complete checkpoint (of a run training `experts`), with a clear message."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker): it was interrupted while being "
            "written. Resume from an earlier checkpoint-N folder (or 'latest', which skips incomplete ones); "
            f"{_resume_advice(path)}."
        )
    per_expert = [expert_file_name(name, expert) for expert in experts for name in (LORA_WEIGHT_NAME, FAKE_WEIGHT_NAME)]
    for name in (*per_expert, "optimizer.pt", "trainer_state.json"):
        if not (path / name).is_file():
            hint = (" (a checkpoint of a one-transformer run cannot resume a two-expert one)"
                    if name.endswith("_transformer_2.safetensors") else "")
            raise CheckpointError(f"checkpoint {path} lacks {name}{hint}; it is corrupt: {_resume_advice(path)}")


_LOAD_ERRORS = (SafetensorError, ValueError, RuntimeError, OSError, EOFError, KeyError, TypeError,
                pickle.UnpicklingError)


def _load_checkpoint_file(path: Path, name: str, loader):
    """`loader(path / name)`, or a CheckpointError naming the file and the checkpoint to fall back to."""
    try:
        value = loader(path / name)
    except _LOAD_ERRORS as err:
        raise CheckpointError(
            f"cannot load checkpoint {path}: {name} is corrupt or truncated ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); {_resume_advice(path)}"
        ) from err
    if isinstance(value, dict) and name.endswith(".safetensors"):
        bad = nonfinite_keys(value)
        if bad:
            raise CheckpointError(
                f"cannot load checkpoint {path}: {name} holds NaN/Inf in {len(bad)} tensor(s) (e.g. {bad[0]}); "
                f"{_resume_advice(path)}"
            )
    return value


def load_checkpoint(accelerator, path: Path, transformer, optimizers: dict, schedulers: dict,
                    generators: dict) -> dict:
    """Restore LoRAs, optimizer/scheduler states and RNG states; returns the trainer state (step, epoch...).

    Every file is read before anything is restored, and a bad one is named with the checkpoint to fall back to.
    """
    experts = experts_of(transformer)
    check_checkpoint(path, tuple(name for name, _ in experts))
    student = {name: _load_checkpoint_file(path, expert_file_name(LORA_WEIGHT_NAME, name), lambda f: load_file(str(f)))
               for name, _ in experts}
    fake = {name: _load_checkpoint_file(path, expert_file_name(FAKE_WEIGHT_NAME, name), lambda f: load_file(str(f)))
            for name, _ in experts}
    states = _load_checkpoint_file(path, "optimizer.pt",
                                   lambda f: torch.load(f, map_location="cpu", weights_only=False))
    trainer_state = _load_checkpoint_file(path, "trainer_state.json", lambda f: json.loads(f.read_text()))
    rng_name = f"rng_state_{accelerator.process_index}.pt"
    rng = (_load_checkpoint_file(path, rng_name, lambda f: torch.load(f, map_location="cpu", weights_only=False))
           if (path / rng_name).is_file() else None)

    def restore(_path: Path) -> None:
        prefix = "transformer."  # every expert's file: see _write_lora_folder
        for name, expert in experts:
            lora.load_adapter_state_dict(
                expert, lora.STUDENT, {k[len(prefix):]: v for k, v in student[name].items() if k.startswith(prefix)}
            )
            lora.load_adapter_state_dict(expert, lora.FAKE, fake[name])
        for k, o in optimizers.items():
            o.load_state_dict(states["optimizers"][k])
        for k, s in schedulers.items():
            s.load_state_dict(states["schedulers"][k])
        if rng is not None:
            set_rng_state(rng, generators)

    # A mismatched (rather than corrupt) file fails here: another rank / model / optimizer layout.
    try:
        restore(path)
    except _LOAD_ERRORS as err:
        raise CheckpointError(
            f"cannot load checkpoint {path}: its LoRA / optimizer / RNG states do not fit this run (another model, "
            f"--rank, --lora_targets or flags?): {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; "
            f"{_resume_advice(path)}"
        ) from err
    if trainer_state.get("num_processes", 1) != accelerator.num_processes:
        logger.warning("checkpoint written with %s processes, resuming with %s: the run is not bit-identical",
                       trainer_state.get("num_processes"), accelerator.num_processes)
    return trainer_state


# ----------------------------------------------------------------------------------------------------------------
# Validation videos
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_latents(pipe, family: TDMFamily, latents: torch.Tensor) -> np.ndarray:
    """Latents -> frames [B, F, H, W, 3] in [0, 1], as the pipeline decodes them."""
    vae = pipe.vae
    if not hasattr(pipe, "decode_latents"):  # WanPipeline: normalised latents, decoded inline in its __call__
        z = latents.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        video = vae.decode(z * std + mean, return_dict=False)[0]
    else:
        video = pipe.decode_latents(latents.to(vae.dtype))
    return pipe.video_processor.postprocess_video(video, output_type="np")


def run_validation(pipe, objective: TDMObjective, cache: PromptEmbeddingCache, args, step: int, device) -> None:
    """Student K-step samples of the fixed validation prompts -> output_dir/validation/step-N/*.mp4."""
    from blade.video import export_mp4

    prompts = cache.validation()[: args.num_validation_videos]
    if not prompts:
        return
    out_dir = Path(args.output_dir) / "validation" / f"step-{step}"
    # A private RNG stream: validation must not perturb training (resume equivalence).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for j, (_text, emb) in enumerate(prompts):
            g = torch.Generator(device).manual_seed(args.seed + j)
            shape = objective.family.latent_shape(1, args.num_frames, args.height, args.width)
            noise = torch.randn(shape, generator=g, device=device)
            x0 = objective.sample(noise, emb[None].to(device), g)
            frames = decode_latents(pipe, objective.family, x0)[0]
            export_mp4(frames, out_dir / f"{j:02d}.mp4", fps=args.fps)
    (out_dir / "prompts.txt").write_text("\n".join(t for t, _ in prompts) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON line per record (a resumed run appends; readers keep the last record of a step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def make_reflow_pairs(args, objective: TDMObjective, pipe, cache: PromptEmbeddingCache, neg: torch.Tensor,
                      shape: tuple, device: torch.device, rank: int) -> dict[str, torch.Tensor]:
    """The teacher's ODE samples for --reflow_steps and --reflow_weight: {"noise", "x0", "emb"} [N, ...] on `device`.

    Made once (seeded: prompt choice and noise) and kept in output_dir/reflow_pairs_<rank>.pt, so a resumed run
    reuses the same pairs instead of sampling the teacher again.
    """
    from blade.distill.reflow import teacher_ode_pairs

    path = Path(args.output_dir) / f"reflow_pairs_{rank}.pt"
    key = {"n": args.reflow_pairs, "steps": args.reflow_teacher_steps, "cfg": args.cfg, "seed": args.seed}
    if args.cfg_2 is not None:  # (only then: pairs cached before --cfg_2 existed keep their key)
        key["cfg_2"] = args.cfg_2
    if args.cfg_boundary is not None:
        key["cfg_boundary"] = args.cfg_boundary
    if path.is_file():
        stored = torch.load(path, map_location=device, weights_only=True)
        if stored.get("key") == key:
            return stored
    g = torch.Generator().manual_seed(args.seed * 7919 + rank)
    pick = torch.randint(0, len(cache), (args.reflow_pairs,), generator=g).tolist()
    emb = torch.stack([cache[i] for i in pick]).to(device)
    noise = torch.randn((args.reflow_pairs, *shape[1:]), generator=g).to(device)
    logger.info("sampling %d teacher ODE pairs (%d steps, cfg %s)", args.reflow_pairs, args.reflow_teacher_steps,
                args.cfg)
    x0 = teacher_ode_pairs(objective, pipe.scheduler, noise, emb, neg, args.reflow_teacher_steps, args.cfg,
                           batch_size=max(args.train_batch_size, 64), cfg_2=objective.config.cfg_2,
                           boundary=objective.config.cfg_boundary)
    pairs = {"noise": noise, "x0": x0, "emb": emb, "key": key}
    torch.save({k: (v.cpu() if torch.is_tensor(v) else v) for k, v in pairs.items()}, path)
    return pairs


def __getattr__(name: str):
    """`check_tinyworld_prompt_cache`, which moved to TinyWorld's trainer extension: still importable from here."""
    if name == "check_tinyworld_prompt_cache":
        return load_extension(TINYWORLD_EXTENSION).check_prompt_cache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_extension(args: argparse.Namespace):
    """The model's trainer extension module (``blade.distill.model_extensions``), or None."""
    return load_extension(args.model_extension) if args.model_extension else None


def build_monitor(args, shape: tuple, device: torch.device):
    """The in-training evaluator for --eval_every, from the model's trainer extension (TinyWorld's metrics need its
    grammar)."""
    extension = model_extension(args)
    if extension is None:
        raise ModelExtensionError(
            f"--eval_every needs a model with a trainer extension (e.g. TinyWorld); "
            f"{args.pretrained_model_name_or_path} names none ('{EXTENSION_KEY}' in its blade_defaults.json)"
        )
    return extension.build_monitor(args, shape, device)


def make_accelerator(args: argparse.Namespace, output_dir: Path):
    """The Accelerator of this launch (mixed precision, accumulation, tracker), refusing a launch it misreads."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # multi-process CPU runs (gloo) need this to see their process group
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:  # e.g. DeepSpeed on a CPU-only host: every rank would act as rank 0
        raise RuntimeError(
            f"accelerate sees {accelerator.num_processes} process(es) but the launcher started {launched}: every "
            "process would write the same checkpoints. Use train/config_ddp.yaml on this host."
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        logger.warning("DeepSpeed config detected: it provides the processes; the LoRA optimizers are this "
                       "trainer's own (one shared base transformer cannot be a DeepSpeed engine per role).")
    return accelerator


def prepare_model(args: argparse.Namespace, accelerator, weight_dtype: torch.dtype):
    """The teacher pipeline on the device with the student and fake adapters (and ASA with --use_sparsity), on
    every expert of a two-expert pipeline.

    Returns:
        (pipe, the denoiser TDM calls: the transformer or an `ExpertRouter` over both experts, TDMFamily, ASA handle
        or None, ASA config dict or None).
    """
    device = accelerator.device
    want_vae = (args.validation_steps > 0 or args.eval_every > 0) and accelerator.is_main_process
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.family, weight_dtype, with_vae=want_vae)
    if pipe.vae is not None:
        pipe.vae.to(device)
        if args.enable_slicing:
            pipe.vae.enable_slicing()
        if args.enable_tiling:
            pipe.vae.enable_tiling()
    transformer = denoiser(pipe).to(device)
    family = build_family(pipe, args)
    asa_handle, asa_config = None, None
    if args.use_sparsity:
        asa_handle, asa_config = apply_sparsity(pipe.transformer, args.family, args.asa_max_keep,
                                                pipe=pipe, block_size=args.asa_block_size,
                                                pool_size=args.asa_pool_size)
    init_adapters(accelerator, transformer, args)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    return pipe, transformer, family, asa_handle, asa_config


def tdm_config(args: argparse.Namespace, boundary: float | None = None) -> TDMConfig:
    """The objective's hyperparameters from the flags (`boundary`: the model timestep where --cfg_2 starts, a
    two-expert model's or --cfg_boundary)."""
    return TDMConfig(k_step=args.k_step, eta=args.eta, cfg=args.cfg, cfg_2=args.cfg_2, cfg_boundary=boundary,
                     lambda_reg=args.lambda_reg,
                     tau_max=args.tau_max, huber_c=args.huber_c, fake_skip_threshold=args.fake_loss_skip,
                     tau_mode=args.tau_mode, generator_loss=args.generator_loss, fake_attention=args.fake_attention,
                     dense_steps=args.dense_steps if args.use_sparsity else 0,
                     step_draw=args.step_draw,
                     normalize_generator={"auto": None, "on": True, "off": False}[args.normalize_generator])


def prompt_batches(cache: PromptEmbeddingCache, sampler: ShardedEpochBatchSampler, state: dict,
                   args: argparse.Namespace) -> Iterator[torch.Tensor]:
    """Micro-batches of prompt embeddings, epoch after epoch, without end.

    The position ("epoch", "batch_in_epoch", "micro_step") is kept in `state`, which every checkpoint holds: a
    resumed run continues mid-epoch with the same batches.
    """
    while True:
        sampler.set_epoch(state["epoch"], state["batch_in_epoch"])
        loader = DataLoader(cache, batch_sampler=sampler, num_workers=args.dataloader_num_workers,
                            generator=loader_generator(args.seed, state["epoch"]))
        for emb in loader:
            state["batch_in_epoch"] += 1
            state["micro_step"] += 1
            yield emb
        state["epoch"] += 1
        state["batch_in_epoch"] = 0


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on one (a max-reduce): decisions that must not split the group."""
    return float(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="max")) > 0


def step_telemetry(step_time: float, device: torch.device, asa_handle) -> dict:
    """The step's wall time, this process's peak memory (CUDA) and ASA's measured sparsity (with --use_sparsity)."""
    logs = {"step_time": step_time}
    if device.type == "cuda":  # this process's peak since the start (all adapters, activations, optimizer)
        logs["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    stats = (asa_handle.stats() or {}) if asa_handle is not None else {}
    if "sparsity" in stats:
        logs["sparsity"] = float(stats["sparsity"])
    return logs


def train(args: argparse.Namespace) -> dict:
    """Run TDM distillation; returns a summary (final step, losses, output paths; ``stopped_by`` the signal's name
    when SIGTERM or Ctrl-C ended it early: it then stopped at a step boundary with a checkpoint)."""
    timebox = TimeBox.of_minutes(args.max_train_minutes)  # counts everything: loading, reflow pairs, evaluation
    with timebox.stop_on_signals():  # a preemption notice or Ctrl-C ends the run like the time box: nothing is lost
        summary = _train(args, timebox)
    return {**summary, "stopped_by": timebox.stopped_by} if timebox.stopped_by else summary


def _train(args: argparse.Namespace, timebox: TimeBox) -> dict:
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)
    device, rank = accelerator.device, accelerator.process_index
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)

    cache = PromptEmbeddingCache(args.prompt_dir)  # clear error for a missing / empty folder, before model loading
    extension = model_extension(args)
    if extension is not None:  # e.g. TinyWorld: the teacher's own text inputs (empty negative, 32 tokens)
        extension.check_prompt_cache(cache)
    check_before_model_load(cache, args)  # prompt cache vs model, output folder, resume folder: before loading
    output_dir.mkdir(parents=True, exist_ok=True)
    pipe, transformer, family, asa_handle, asa_config = prepare_model(args, accelerator, weight_dtype)
    autocast = accelerator.autocast if accelerator.mixed_precision != "no" else nullcontext
    guidance_boundary = getattr(transformer, "boundary", None)  # two experts: guidance switches with the expert
    if guidance_boundary is None:
        guidance_boundary = args.cfg_boundary
    objective = TDMObjective(transformer, family, tdm_config(args, guidance_boundary),
                             asa_handle, autocast=autocast,
                             model_dtype=weight_dtype)
    two_experts = len(experts_of(transformer)) > 1
    config_json = blade_config(args, family, objective, asa_config,
                               boundary_ratio=float(pipe.config.boundary_ratio) if two_experts else None)
    neg = cache.negative().to(device)
    shape = family.latent_shape(args.train_batch_size, args.num_frames, args.height, args.width)
    tdm = TDMStep(args, accelerator, objective, neg, shape)  # optimizers, schedulers, EMA, seeded generators
    seed_everything(args.seed + rank)

    sampler = ShardedEpochBatchSampler(len(cache), args.train_batch_size, accelerator.num_processes, rank, args.seed)
    state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0, "micro_step": 0}
    path = resolve_resume(args.resume_from_checkpoint, output_dir)
    if path is not None:
        state.update(load_checkpoint(accelerator, path, transformer, tdm.optimizers, tdm.schedulers, tdm.generators))
        if tdm.ema is not None:
            tdm.ema.load(path)
        logger.info("resumed from %s at step %d", path, state["global_step"])
    elif args.resume_from_checkpoint:
        logger.info("no complete checkpoint in %s: starting from scratch", output_dir)

    if args.report_to != "none":
        accelerator.init_trackers("blade_tdm", config={k: v for k, v in vars(args).items()
                                                       if isinstance(v, (int, float, str, bool))})
    if args.reflow_steps or args.reflow_weight > 0:
        tdm.reflow_pairs = make_reflow_pairs(args, objective, pipe, cache, neg, shape, device, rank)
    monitor = build_monitor(args, shape, device) if accelerator.is_main_process and args.eval_every > 0 else None

    def evaluate_student(step: int) -> dict:
        decode = lambda x0: decode_latents(pipe, family, x0)  # noqa: E731
        with tdm.averaged_student():
            result = monitor(objective, decode)
        record = {"step": step, **{f"eval_{k}": v for k, v in result.items()}}
        if tdm.ema is not None:  # the raw weights too: what the average gains is the difference
            record.update({f"eval_raw_{k}": v for k, v in monitor(objective, decode).items()})
        append_jsonl(output_dir / "eval.jsonl", record)
        logger.info("step %d: %s", step, record)
        return record

    if monitor is not None and state["global_step"] == 0:
        evaluate_student(0)
    progress = tqdm(total=args.max_train_steps, initial=state["global_step"], desc="TDM",
                    disable=not accelerator.is_local_main_process)
    batches = prompt_batches(cache, sampler, state, args)
    last_ckpt, logs, step_start = None, {}, time.monotonic()

    while state["global_step"] < args.max_train_steps:
        logs = tdm(batches, state)  # one optimizer step: micro-batches, losses, backward, updates
        step, now = state["global_step"], time.monotonic()
        logs.update(step_telemetry(now - step_start, device, asa_handle))
        step_start = now
        if monitor is not None and step % args.eval_every == 0:
            logs.update({k: v for k, v in evaluate_student(step).items() if k != "step"})
        if accelerator.is_main_process:
            append_jsonl(output_dir / "logs.jsonl", {"step": step, **logs})
        if args.report_to != "none":
            accelerator.log({k: v for k, v in logs.items() if isinstance(v, (int, float))}, step=step)
        progress.update(1)
        progress.set_postfix({k: f"{logs[k]:.4g}" for k in ("loss_g", "loss_fake") if k in logs})

        stop = any_process(accelerator, timebox.expired(now)) or step >= args.max_train_steps
        tdm.guard_finite(step, logs)  # after the step's record is written, before any checkpoint holds it
        if step % args.checkpointing_steps == 0 or stop:
            check_replicas_agree(accelerator, tdm.params_g + tdm.params_f)
            last_ckpt = save_checkpoint(accelerator, output_dir, step, transformer, family, tdm.optimizers,
                                        tdm.schedulers, dict(state), tdm.generators, config_json, tdm.ema)
        if args.validation_steps > 0 and step % args.validation_steps == 0 and pipe.vae is not None:
            with tdm.averaged_student():
                run_validation(pipe, objective, cache, args, step, device)
        if stop:
            break
    batches.close()  # ends the epoch's DataLoader (and its workers) now, not at garbage collection

    if accelerator.is_main_process:
        with tdm.averaged_student():
            save_lora_folder(output_dir, family, transformer, config_json)
        if tdm.ema is not None:  # the raw weights beside the average, so the two can be compared on the same eval
            save_lora_folder(output_dir / RAW_STUDENT_FOLDER, family, transformer, config_json)
    accelerator.wait_for_everyone()
    progress.close()
    if args.report_to != "none":
        accelerator.end_training()
    return {"global_step": state["global_step"], "last_checkpoint": str(last_ckpt) if last_ckpt else None,
            "output_dir": str(output_dir), **logs}


# The trainer's own errors: one line `error: ...` and exit status 2, like the prompt and inference CLIs.
USER_ERRORS = (CheckpointError, NonFiniteError, PromptCacheError, ModelFolderError, OutputLocationError, LoraError,
               ModelExtensionError)


def main(family: str, argv: list[str] | None = None) -> dict:
    """Entry point of both launch scripts: parse (argparse errors exit 2), train, log a summary.

    Raises:
        SystemExit(2): after printing `error: <one line>` for an input, checkpoint, output or non-finite problem.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(family, argv)
    try:
        summary = train(args)
    except USER_ERRORS as err:
        for bar in list(getattr(tqdm, "_instances", ())):  # end an open progress bar's line: the error is its own
            bar.close()
        print("error: " + " ".join(str(err).split()), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per launch, not one per process
        logger.info("done: %s", summary)
    return summary
