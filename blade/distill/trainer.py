"""The accelerate training loop of sparsity-aware TDM distillation, shared by both model folders.

`wanx/train/train_wanx_tdm.py` and `cogvideox/train/train_cogvideo_tdm.py` only call `main("wan")` /
`main("cogvideox")`. Design notes:

- One frozen base transformer carries two LoRA adapters ("student", "fake"); the teacher is the base with adapters
  disabled and ASA off. Because the three roles share one module, it is not wrapped in DDP (DDP's gradient hooks
  cannot follow adapter switching); the trainer all-reduces the LoRA gradients itself before each optimizer step.
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
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from blade.collectives import collective_in_place
from blade.distill import lora
from blade.distill.tdm import TDMConfig, TDMFamily, TDMObjective, cogvideox_family, wan_family
from blade.pipelines.hints import LEGACY_HINTS_FILE, ModelHintsError, read_model_hints
from blade.prompts import PromptCacheError, PromptEmbeddingCache

logger = logging.getLogger("blade.trainer")

COMPLETE_MARKER = "COMPLETE"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FAKE_WEIGHT_NAME = "fake_lora.safetensors"
CONFIG_NAME = "blade_config.json"
HINTS_NAME = LEGACY_HINTS_FILE  # older name of a model folder's defaults; blade_defaults.json is read first

# Per-family defaults: paper / released launch scripts (shared/reference/method_blade_tdm.md, section 2).
FAMILY_DEFAULTS = {
    "wan": {"num_frames": 81, "height": 480, "width": 832, "fps": 16, "cfg": 5.0, "lambda_reg": 0.0},
    "cogvideox": {"num_frames": 49, "height": 480, "width": 720, "fps": 8, "cfg": 3.5, "lambda_reg": 0.5},
}


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from (incomplete, corrupt, mismatched)."""


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


def build_parser(family: str) -> argparse.ArgumentParser:
    """The command line of both entry points (released flag names, per-family defaults)."""
    d = FAMILY_DEFAULTS[family]
    p = argparse.ArgumentParser(
        description=f"Sparsity-aware TDM distillation of a {family} video model into an 8-step LoRA student.",
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
    p.add_argument("--cfg", type=float, default=d["cfg"], help="Teacher classifier-free guidance scale.")
    p.add_argument("--eta", type=float, default=0.9, help="Student re-noising: eta*eps + sqrt(1-eta^2)*z.")
    p.add_argument("--tau_max", type=int, default=979, help="Largest diffusion time of the fake/teacher scores.")
    p.add_argument("--use_sparsity", action="store_true",
                   help="Adaptive block-sparse attention (ASA) in the student and fake score; the teacher stays dense.")
    p.add_argument("--dense_steps", type=int, default=0, help="First student steps that run dense (ASA off).")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (student and fake).")
    p.add_argument("--lora_alpha", type=int, default=64, help="LoRA alpha.")
    p.add_argument("--max_train_steps", type=int, default=300, help="Optimizer steps.")
    p.add_argument("--checkpointing_steps", type=int, default=15, help="Checkpoint every N optimizer steps.")
    p.add_argument("--validation_steps", type=int, default=None,
                   help="Validation videos every N steps (default: at each checkpoint; 0 disables).")
    p.add_argument("--num_validation_videos", type=int, default=2, help="Validation prompts rendered each time.")
    p.add_argument("--max_train_minutes", type=float, default=None,
                   help="Time box: stop cleanly with a checkpoint after this many minutes.")
    p.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward.")
    p.add_argument("--enable_slicing", action="store_true", help="VAE slicing for validation decoding.")
    p.add_argument("--enable_tiling", action="store_true", help="VAE tiling for validation decoding.")
    p.add_argument("--num_frames", type=int, default=None, help=f"Video frames (default {d['num_frames']}).")
    p.add_argument("--height", type=int, default=None, help=f"Video height (default {d['height']}).")
    p.add_argument("--width", type=int, default=None, help=f"Video width (default {d['width']}).")
    p.add_argument("--fps", type=int, default=None, help=f"Validation video fps (default {d['fps']}).")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    p.add_argument("--fake_loss_skip", type=float, default=None,
                   help="Skip the fake update when its loss exceeds this (released Wan code: 2.0; default off).")
    p.add_argument("--huber_c", type=float, default=None, help="Pseudo-Huber c (default: the family's rule).")
    p.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"], help="Logger.")
    if family == "wan":
        p.add_argument("--shift", type=float, default=1.0,
                       help="Flow shift of the student's anchor schedule (1.0 = anchors uniform in sigma).")
        p.add_argument("--tinyworld", action="store_true",
                       help="TinyWorld preset: model assets/tinyworld/pipeline and its video size.")
    return p


def parse_args(family: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and fill the size defaults: explicit flag > the model folder's blade_defaults.json (or blade_hints.json;
    TinyWorld's size for a TinyWorld folder) > the --tinyworld preset > the family's."""
    args = build_parser(family).parse_args(argv)
    args.family = family
    defaults = dict(FAMILY_DEFAULTS[family])
    if getattr(args, "tinyworld", False):
        from blade.tinyworld.model import TINYWORLD_DEFAULTS, bundled_pipeline_path

        defaults.update({k: TINYWORLD_DEFAULTS[k] for k in ("num_frames", "height", "width", "fps")})
        if args.pretrained_model_name_or_path is None:
            args.pretrained_model_name_or_path = str(bundled_pipeline_path())
    if args.pretrained_model_name_or_path is None:
        raise SystemExit("error: --pretrained_model_name_or_path is required")
    # The model folder's own size: blade_defaults.json (or the older blade_hints.json), or TinyWorld's for a
    # TinyWorld pipeline folder (recognised by its tokenizer), so MODEL_PATH=assets/tinyworld/pipeline just works.
    try:
        hints = read_model_hints(args.pretrained_model_name_or_path)
    except ModelHintsError as err:
        raise SystemExit(f"error: {err}") from None
    defaults.update({k: hints[k] for k in ("num_frames", "height", "width", "fps") if k in hints})
    if hints.get("tinyworld") and hasattr(args, "tinyworld"):
        args.tinyworld = True  # its prompt cache is then checked against the TinyWorld teacher's text inputs
    for key in ("num_frames", "height", "width", "fps"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.learning_rate_g is None:
        args.learning_rate_g = args.learning_rate
    if args.validation_steps is None:
        args.validation_steps = args.checkpointing_steps
    if args.prompt_dir is None:
        raise SystemExit("error: --prompt_dir is required (run utils/process_prompts_*.py first)")
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    if not hasattr(args, "shift"):
        args.shift = None
    return args


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


def check_tinyworld_prompt_cache(cache: PromptEmbeddingCache) -> None:
    """Refuse a prompt cache that feeds the TinyWorld teacher text inputs it was never trained on.

    The teacher learned CFG's unconditional branch from the empty prompt "" and saw text padded to 32 tokens.
    Wan's default negative prompt is out of TinyWorld's vocabulary (~77 `<unk>` tokens): with it the CFG direction
    is ~3x larger and the teacher's CFG targets are saturated; 512-token padding also shifts the cross-attention.
    """
    from blade.tinyworld.model import TINYWORLD_DEFAULTS

    problems = []
    negative = (cache.index.get("negative") or {}).get("prompt")
    if negative:
        problems.append(f"its negative prompt is {negative[:40]!r}... instead of the empty prompt")
    want = TINYWORLD_DEFAULTS["max_sequence_length"]
    if cache.max_length is not None and cache.max_length != want:
        problems.append(f"it was encoded at {cache.max_length} text tokens instead of {want}")
    if problems:
        raise PromptCacheError(
            f"{cache.directory} does not match the TinyWorld teacher: {'; '.join(problems)}. Re-encode the prompts "
            f"with utils/process_prompts_wanx.py ... --negative_prompt '' --max_length {want}."
        )


# ----------------------------------------------------------------------------------------------------------------
# Model setup
# ----------------------------------------------------------------------------------------------------------------


def load_pipeline(model_path: str, family: str, dtype: torch.dtype, with_vae: bool):
    """The teacher pipeline without its text encoder (prompts are pre-encoded); clear error when missing."""
    import diffusers

    from blade.pipelines.loading import check_model_folder

    path = Path(model_path)
    check_model_folder(family, path)  # ModelFolderError (a FileNotFoundError) naming what is missing
    cls = diffusers.WanPipeline if family == "wan" else diffusers.CogVideoXPipeline
    extra = {} if with_vae and (path / "vae").is_dir() else {"vae": None}
    return cls.from_pretrained(str(path), text_encoder=None, tokenizer=None, torch_dtype=dtype,
                               local_files_only=True, **extra)


def build_family(pipe, args) -> TDMFamily:
    return wan_family(pipe, shift=args.shift) if args.family == "wan" else cogvideox_family(pipe)


def apply_sparsity(transformer, family: str, dense_steps: int):
    """Patch the transformer's self-attention with ASA; returns (handle, config as a dict)."""
    if family == "wan":
        from blade.models import wan as adapter
    else:
        from blade.models import cogvideox as adapter
    config = adapter.default_asa_config()
    handle = adapter.apply_asa(transformer, config, dense_steps=dense_steps)
    cfg_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config))
    return handle, cfg_dict


def blade_config(args, family: TDMFamily, objective: TDMObjective, asa_config: dict | None) -> dict:
    """The JSON written beside every LoRA (docs/internals.md, "BLADE LoRA folder")."""
    return {
        "family": family.name,
        "k_step": args.k_step,
        "anchors": list(objective.anchors),
        "eta": args.eta,
        "prediction_type": family.schedule.prediction_type,
        "shift": args.shift if family.name == "wan" else None,
        "asa": asa_config,
        "dense_steps": args.dense_steps if asa_config is not None else 0,
        "lora_rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "cfg": args.cfg,
        "num_frames": args.num_frames,
        "height": args.height,
        "width": args.width,
        "fps": args.fps,
    }


# ----------------------------------------------------------------------------------------------------------------
# Gradient sync + optimizer step (no DDP wrapper, see module docstring)
# ----------------------------------------------------------------------------------------------------------------


def init_adapters(accelerator, transformer: torch.nn.Module, args) -> None:
    """Add the student and fake LoRA adapters (float32), identical on every process.

    PEFT draws the LoRA A matrices from torch's global generator, whose state differs between processes unless it is
    seeded here; with different initial weights the processes would train different students from the same averaged
    gradients (and only process 0's would be saved). So: seed, then also copy process 0's values to the others.
    """
    torch.manual_seed(args.seed)
    lora.add_student_and_fake(transformer, args.rank, args.lora_alpha)
    lora.cast_lora_to(transformer, torch.float32)
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


def sync_gradients(accelerator, params: list[torch.nn.Parameter]) -> None:
    """Average the LoRA gradients over processes (a missing grad counts as zeros)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if accelerator.num_processes == 1:
        return
    collective_in_place([p.grad for p in params], lambda flat: accelerator.reduce(flat, reduction="mean"))


def optimizer_step(accelerator, optimizer, scheduler, params, max_grad_norm: float = 1.0) -> float:
    sync_gradients(accelerator, params)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in generators.items():
        g.set_state(state["generators"][k])


def save_lora_folder(folder: Path, family: TDMFamily, transformer, config: dict) -> None:
    """Student LoRA in diffusers format (loadable by `pipe.load_lora_weights`) + blade_config.json."""
    state = lora.adapter_state_dict(transformer, lora.STUDENT)
    state = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in state.items()}
    family.pipeline_class.save_lora_weights(
        str(folder), transformer_lora_layers=state, weight_name=LORA_WEIGHT_NAME, safe_serialization=True
    )
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=1))


def save_checkpoint(accelerator, output_dir: Path, step: int, transformer, family, optimizers: dict,
                    schedulers: dict, trainer_state: dict, generators: dict, config: dict) -> Path:
    """Write output_dir/checkpoint-`step` atomically (every rank writes its own RNG state)."""
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(generators), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_lora_folder(tmp, family, transformer, config)
        fake = lora.adapter_state_dict(transformer, lora.FAKE)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in fake.items()}, str(tmp / FAKE_WEIGHT_NAME))
        torch.save(
            {
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
            },
            tmp / "optimizer.pt",
        )
        (tmp / "trainer_state.json").write_text(
            json.dumps({**trainer_state, "num_processes": accelerator.num_processes}, indent=1)
        )
        _fsync_tree(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"step {step}\n")  # written last: its presence means "all there"
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def find_latest_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint-N with the largest N (folders without the marker are ignored)."""
    found = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and (path / COMPLETE_MARKER).is_file():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def check_checkpoint(path: Path) -> None:
    """Refuse a folder that is not a complete checkpoint, with a clear message."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker): it was interrupted while being "
            "written. Resume from an earlier checkpoint-N folder (or 'latest', which skips incomplete ones)."
        )
    for name in (LORA_WEIGHT_NAME, FAKE_WEIGHT_NAME, "optimizer.pt", "trainer_state.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {path} lacks {name}; it is corrupt")


def load_checkpoint(accelerator, path: Path, transformer, optimizers: dict, schedulers: dict,
                    generators: dict) -> dict:
    """Restore LoRAs, optimizer/scheduler states and RNG states; returns the trainer state (step, epoch...)."""
    check_checkpoint(path)
    try:
        student = load_file(str(path / LORA_WEIGHT_NAME))
        prefix = "transformer."
        lora.load_adapter_state_dict(
            transformer, lora.STUDENT, {k[len(prefix):]: v for k, v in student.items() if k.startswith(prefix)}
        )
        lora.load_adapter_state_dict(transformer, lora.FAKE, load_file(str(path / FAKE_WEIGHT_NAME)))
        states = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        trainer_state = json.loads((path / "trainer_state.json").read_text())
    except (ValueError, RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot load checkpoint {path}: {err}") from err
    for k, o in optimizers.items():
        o.load_state_dict(states["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(states["schedulers"][k])
    if trainer_state.get("num_processes", 1) != accelerator.num_processes:
        logger.warning("checkpoint written with %s processes, resuming with %s: the run is not bit-identical",
                       trainer_state.get("num_processes"), accelerator.num_processes)
    rng_path = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_path.is_file():
        set_rng_state(torch.load(rng_path, map_location="cpu", weights_only=False), generators)
    return trainer_state


# ----------------------------------------------------------------------------------------------------------------
# Validation videos
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_latents(pipe, family: TDMFamily, latents: torch.Tensor) -> np.ndarray:
    """Latents -> frames [B, F, H, W, 3] in [0, 1], as the pipeline decodes them."""
    vae = pipe.vae
    if family.name == "wan":
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


def _make_schedulers(args, opt_g, opt_f):
    from diffusers.optimization import get_scheduler

    sched_g = get_scheduler("cosine_with_restarts", optimizer=opt_g, num_warmup_steps=5,
                            num_training_steps=args.max_train_steps, num_cycles=1)
    sched_f = get_scheduler("constant", optimizer=opt_f)
    return sched_g, sched_f


def train(args: argparse.Namespace) -> dict:
    """Run TDM distillation; returns a summary (final step, losses, output paths)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration

    output_dir = Path(args.output_dir)
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
    device = accelerator.device
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)

    cache = PromptEmbeddingCache(args.prompt_dir)  # clear error for a missing / empty folder, before model loading
    if getattr(args, "tinyworld", False):
        check_tinyworld_prompt_cache(cache)
    want_vae = args.validation_steps > 0 and accelerator.is_main_process
    pipe = load_pipeline(args.pretrained_model_name_or_path, args.family, weight_dtype, with_vae=want_vae)
    if pipe.vae is not None:
        pipe.vae.to(device)
        if args.enable_slicing:
            pipe.vae.enable_slicing()
        if args.enable_tiling:
            pipe.vae.enable_tiling()
    transformer = pipe.transformer.to(device)
    family = build_family(pipe, args)

    asa_handle, asa_config = None, None
    if args.use_sparsity:
        asa_handle, asa_config = apply_sparsity(transformer, args.family, args.dense_steps)
    init_adapters(accelerator, transformer, args)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()

    tdm_config = TDMConfig(k_step=args.k_step, eta=args.eta, cfg=args.cfg, lambda_reg=args.lambda_reg,
                           tau_max=args.tau_max, huber_c=args.huber_c, fake_skip_threshold=args.fake_loss_skip)
    autocast = accelerator.autocast if accelerator.mixed_precision != "no" else nullcontext
    objective = TDMObjective(transformer, family, tdm_config, asa_handle, autocast=autocast, model_dtype=weight_dtype)
    config_json = blade_config(args, family, objective, asa_config)

    params_g = lora.adapter_parameters(transformer, lora.STUDENT)
    params_f = lora.adapter_parameters(transformer, lora.FAKE)
    opt_g = torch.optim.AdamW(params_g, lr=args.learning_rate_g, betas=(0.0, 0.95), weight_decay=1e-4, eps=1e-8)
    opt_f = torch.optim.AdamW(params_f, lr=args.learning_rate_fake, betas=(0.0, 0.95), weight_decay=1e-4, eps=1e-8)
    sched_g, sched_f = _make_schedulers(args, opt_g, opt_f)
    optimizers, schedulers = {"g": opt_g, "fake": opt_f}, {"g": sched_g, "fake": sched_f}

    rank = accelerator.process_index
    noise_gen = torch.Generator(device).manual_seed(args.seed * 1000 + rank)
    draw_gen = torch.Generator().manual_seed(args.seed * 1000 + 500 + rank)
    generators = {"noise": noise_gen, "draw": draw_gen}
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    sampler = ShardedEpochBatchSampler(len(cache), args.train_batch_size, accelerator.num_processes, rank, args.seed)
    state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0, "micro_step": 0}
    if args.resume_from_checkpoint:
        path = (find_latest_checkpoint(output_dir) if args.resume_from_checkpoint == "latest"
                else Path(args.resume_from_checkpoint))
        if path is None:
            logger.info("no complete checkpoint in %s: starting from scratch", output_dir)
        else:
            state.update(load_checkpoint(accelerator, path, transformer, optimizers, schedulers, generators))
            logger.info("resumed from %s at step %d", path, state["global_step"])

    if args.report_to != "none":
        accelerator.init_trackers("blade_tdm", config={k: v for k, v in vars(args).items()
                                                       if isinstance(v, (int, float, str, bool))})
    neg = cache.negative().to(device)
    shape = family.latent_shape(args.train_batch_size, args.num_frames, args.height, args.width)
    accum = args.gradient_accumulation_steps
    start_time = time.monotonic()
    progress = tqdm(total=args.max_train_steps, initial=state["global_step"], desc="TDM",
                    disable=not accelerator.is_local_main_process)
    last_ckpt, logs, stop = None, {}, False
    fake_stepped = torch.zeros((), device=device)
    step_start = time.monotonic()

    while state["global_step"] < args.max_train_steps and not stop:
        sampler.set_epoch(state["epoch"], state["batch_in_epoch"])
        loader = DataLoader(cache, batch_sampler=sampler, num_workers=args.dataloader_num_workers)
        for emb in loader:
            state["batch_in_epoch"] += 1
            state["micro_step"] += 1
            emb = emb.to(device)
            batch = emb.shape[0]
            negb = neg.unsqueeze(0).expand(batch, -1, -1)
            noise = torch.randn((batch, *shape[1:]), generator=noise_gen, device=device)
            draw_f, draw_g = objective.draw_step(draw_gen), objective.draw_step(draw_gen)
            states = objective.rollout(noise, emb, max(draw_f.i, draw_g.i), noise_gen)

            loss_f, extra = objective.fake_loss(states[draw_f.i], draw_f, emb, negb, noise_gen, draw_gen)
            threshold = tdm_config.fake_skip_threshold
            skip = threshold is not None and float(loss_f.detach()) > threshold
            if not skip:
                (loss_f / accum).backward()
                fake_stepped += 1
            sync = state["micro_step"] % accum == 0
            if sync:
                # Skip the fake step only when every process skipped it (keeps the processes in lockstep).
                if float(accelerator.reduce(fake_stepped.clone(), reduction="sum")) > 0:
                    optimizer_step(accelerator, opt_f, sched_f, params_f)
                else:
                    opt_f.zero_grad(set_to_none=True)
                fake_stepped.zero_()

            loss_g, extra_g = objective.generator_loss(states[draw_g.i], draw_g, emb, negb, noise_gen, draw_gen)
            (loss_g / accum).backward()
            logs = {"loss_fake": float(loss_f.detach()), "loss_g": float(loss_g.detach()), "fake_skipped": float(skip),
                    **{k: float(v) for k, v in {**extra, **extra_g}.items()}}
            if not sync:
                continue
            grad_norm = optimizer_step(accelerator, opt_g, sched_g, params_g)
            state["global_step"] += 1
            step = state["global_step"]
            now = time.monotonic()
            logs.update({"grad_norm_g": grad_norm, "lr": sched_g.get_last_lr()[0], "lr_fake": sched_f.get_last_lr()[0],
                         "step_time": now - step_start})
            if device.type == "cuda":  # this process's peak since the start (all adapters, activations, optimizer)
                logs["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            step_start = now
            if asa_handle is not None:
                stats = asa_handle.stats() or {}
                if "sparsity" in stats:
                    logs["sparsity"] = float(stats["sparsity"])
            if args.report_to != "none":
                accelerator.log(logs, step=step)
            progress.update(1)
            progress.set_postfix(loss_g=f"{logs['loss_g']:.4g}", loss_fake=f"{logs['loss_fake']:.4g}")

            out_of_time = torch.tensor(
                float(args.max_train_minutes is not None and (now - start_time) / 60 > args.max_train_minutes),
                device=device,
            )
            stop = float(accelerator.reduce(out_of_time, reduction="max")) > 0 or step >= args.max_train_steps
            if step % args.checkpointing_steps == 0 or stop:
                check_replicas_agree(accelerator, params_g + params_f)
                last_ckpt = save_checkpoint(accelerator, output_dir, step, transformer, family, optimizers,
                                            schedulers, dict(state), generators, config_json)
            if args.validation_steps > 0 and step % args.validation_steps == 0 and pipe.vae is not None:
                run_validation(pipe, objective, cache, args, step, device)
            if stop:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0

    if accelerator.is_main_process:
        save_lora_folder(output_dir, family, transformer, config_json)
    accelerator.wait_for_everyone()
    progress.close()
    if args.report_to != "none":
        accelerator.end_training()
    return {"global_step": state["global_step"], "last_checkpoint": str(last_ckpt) if last_ckpt else None,
            "output_dir": str(output_dir), **logs}


def main(family: str, argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(family, argv)
    summary = train(args)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per launch, not one per process
        logger.info("done: %s", summary)
    return summary
