"""Train the TinyWorld miniature: the VAE first, then the teacher (transformer + text encoder), time-boxed.

    python -m blade.tinyworld.train vae --out runs/tw --minutes 3
    python -m blade.tinyworld.train teacher --out runs/tw --minutes 8.5 --resume
    python -m blade.tinyworld.train all --out runs/tw --minutes 8.5          # 30% VAE, 70% teacher
    python -m blade.tinyworld.train check-vae --out runs/tw                   # VAE round-trip adherence

Data is never stored: every batch is a fresh set of random scenes and seeds, rendered on the training device with
`blade.tinyworld.world.render` (and, for the teacher, encoded on the fly by the frozen trained VAE).

Teacher objective: rectified flow exactly as `WanPipeline` samples it. With `s` in (0, 1),
`x_s = (1 - s) x0 + s eps`, the transformer gets `timestep = 1000 s` and predicts the velocity `eps - x0`.
`s` is drawn as `shift(u)` with `u ~ sigmoid(N(0, 1))` (90% of a batch) or `u ~ U(0, 1)` (10%) and
`shift(u) = 3u / (1 + 2u)`, the same shift (flow_shift = 3.0) that the UniPC sampler applies to its uniform grid:
the logit-normal part puts the mass at mid/high noise where layout and motion are decided, the uniform part
keeps the ends of the schedule (first and last sampling steps) trained.

Each stage checkpoints atomically (`DIR/ckpt_{stage}.pt`, tmp + os.replace) every `--ckpt-every-s` seconds and at
the end, and exports `DIR/pipeline/` (a full `WanPipeline.save_pretrained` folder, bf16 weights). `--resume`
continues the stage from its checkpoint (weights, EMA, optimizer, step, RNG states); for the teacher, without a
checkpoint it warm-starts from an exported teacher in `DIR/pipeline` (fresh optimizer).

Several GPUs: launch with `torchrun --nproc_per_node N -m blade.tinyworld.train ...`. Each process renders its own
batches (its own RNG streams), gradients are averaged over the processes after every backward (data parallel, so the
global batch is N x the batch), and process 0 alone logs, checkpoints and exports.

`--latent-reuse R` (teacher) keeps a pool of encoded training latents on the GPU and renders and encodes only 1/R of
each batch fresh: encoding a clip with the causal VAE costs about as much as a teacher step on it, so each clip then
serves about R steps, at different noise levels. The pool is not checkpointed: a resumed run refills it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from blade.collectives import collective_in_place
from blade.tinyworld import metrics, world
from blade.tinyworld import model as tw
from blade.training.runtime import (
    TimeBox,
    atomic_write,
    generator_states,
    replace_folder,
    set_generator_states,
    temporary_folder,
)

# Toy sizes: the real component types, tiny widths and a 5 x 32 x 32 video, so a CPU test runs a few steps.
TOY_VIDEO = {"num_frames": 5, "height": 32, "width": 32}
TOY_VAE = {"base_dim": 8, "num_res_blocks": 1}
TOY_TRANSFORMER = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 24, "ffn_dim": 64, "freq_dim": 32}
FLOW_SHIFT = tw.SCHEDULER_CONFIG["flow_shift"]
FOREGROUND_BOOST = 20.0  # VAE loss weight of object pixels relative to background pixels (see foreground_weight)


@dataclass
class StageSetup:
    """What differs between the real run and `--toy`."""

    video: dict
    vae_overrides: dict
    transformer_overrides: dict
    vae_batch: int
    teacher_batch: int
    warmup_steps: int
    stat_clips: int
    roundtrip_videos: int  # ground-truth videos of the VAE round-trip adherence check


def stage_setup(toy: bool) -> StageSetup:
    if toy:
        return StageSetup(dict(TOY_VIDEO), dict(TOY_VAE), dict(TOY_TRANSFORMER), 1, 2, 2, 2, 1)
    video = {k: tw.TINYWORLD_DEFAULTS[k] for k in ("num_frames", "height", "width")}
    return StageSetup(video, {}, {}, 8, 32, 200, 256, 32)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def sample_videos(
    rng: np.random.Generator, batch: int, video: dict, device: torch.device, two_object_share: float = 0.5
) -> tuple[torch.Tensor, list]:
    """Fresh random scenes and seeds, rendered on `device`; a `two_object_share` of the scenes hold two objects.

    Returns:
        videos [B, 3, F, H, W] in [-1, 1] (the VAE's layout and range) and the B prompts.
    """
    counts = np.where(rng.random(batch) < two_object_share, 2, 1)
    scenes = [world.sample_scene(rng, num_objects=int(n)) for n in counts]
    seeds = rng.integers(0, 2**31 - 1, size=batch).tolist()
    frames = world.render(scenes, seeds, device=device, **video)  # [B, F, 3, H, W] in [0, 1]
    return to_vae_input(frames), [s.prompt for s in scenes]


def to_vae_input(frames: torch.Tensor) -> torch.Tensor:
    """Rendered frames ``[B, F, 3, H, W]`` in [0, 1] -> the VAE's layout and range, ``[B, 3, F, H, W]`` in [-1, 1]."""
    return frames.permute(0, 2, 1, 3, 4).mul(2.0).sub(1.0).contiguous()


def sample_flow_sigmas(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Training noise levels s in (0, 1), [B]: shifted logit-normal (90%) / shifted uniform (10%), see module doc."""
    u_logit = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
    u_unif = torch.rand(batch, generator=generator, device=device)
    pick_uniform = torch.rand(batch, generator=generator, device=device) < 0.1
    u = torch.where(pick_uniform, u_unif, u_logit).clamp(1e-4, 1 - 1e-4)
    return FLOW_SHIFT * u / (1 + (FLOW_SHIFT - 1) * u)


def latent_stats(vae, videos: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of `videos` (each [B, 3, F, H, W]) -> two lists of z_dim."""
    zs = [vae.encode(v).latent_dist.mean.float() for v in videos]  # [B, C, f, h, w]
    z = torch.cat([x.transpose(0, 1).flatten(1) for x in zs], dim=1)  # [C, N]
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-3).tolist()


def vae_clip_frames(requested: int | None, video_frames: int, temporal_factor: int = 4) -> int:
    """Frames per VAE training clip (``--vae-frames``), checked.

    The Wan VAE encodes the first frame alone and then chunks of ``t = temporal_factor`` frames, and decodes latent
    frame by latent frame; each causal convolution reads a cache of the previous chunk's last two frames at its own
    level. At the latent level, latent frame 3 is the first whose cache holds no trace of the lone first frame (latent
    0), so the steady state that every later chunk of a video runs in first appears at ``1 + 3t`` frames. Shorter
    clips leave it untrained. Measured on TinyWorld: a VAE trained on 5-frame clips reconstructed frames 0-4 with a
    mean error of 0.004 and frames 5-16 with 0.28 (worse again from frame 9, the first steady-state chunk). So a clip
    holds at least ``1 + 3t`` frames (or the whole video when it is shorter).
    """
    frames = video_frames if requested is None else int(requested)
    if frames < 1 or (frames - 1) % temporal_factor:
        raise ValueError(f"--vae-frames must be {temporal_factor}k+1 (the VAE's frame rule), got {frames}")
    minimum = min(video_frames, 1 + 3 * temporal_factor)
    if frames < minimum:
        raise ValueError(
            f"--vae-frames {frames} is too short: clips of fewer than {minimum} frames never train the VAE's "
            f"steady-state chunk path, which most frames of every video take; use >= {minimum}"
        )
    return min(frames, video_frames)


@torch.no_grad()
def roundtrip_adherence(vae, video: dict, num_videos: int, seed: int, device: torch.device) -> dict[str, float]:
    """Prompt adherence of ground-truth renders after an encode -> decode round trip through `vae`.

    This is the ceiling of any teacher trained on this VAE's latents: the VAE stage logs it so that a run stops
    training the VAE only once it no longer limits adherence. Also returns the mean absolute RGB error of the first
    ``1 + 4`` frames and of the rest (the two temporal paths of the causal VAE; see `vae_clip_frames`).
    """
    rng = np.random.default_rng(seed)
    adherence, head_err, tail_err = [], [], []
    for _ in range(num_videos):
        scene = world.sample_scene(rng)
        clip_seed = int(rng.integers(0, 2**31 - 1))
        x = to_vae_input(world.render([scene], [clip_seed], device=device, **video))  # [1, 3, F, H, W]
        with autocast(device):
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        err = (rec - x).abs().mean(dim=(0, 1, 3, 4))  # [F]
        head_err.append(err[:5].mean().item())
        tail_err.append(err[5:].mean().item() if err.numel() > 5 else float("nan"))
        frames = rec[0].permute(1, 0, 2, 3).add(1).div(2)  # [F, 3, H, W] in [0, 1]
        adherence.append(metrics.score_video(frames, scene)["adherence"])
    return {
        "adherence": float(np.mean(adherence)),
        "error_first_5_frames": float(np.mean(head_err)),
        "error_later_frames": float(np.nanmean(tail_err)) if video["num_frames"] > 5 else float("nan"),
    }


def normalize_latents(z: torch.Tensor, vae) -> torch.Tensor:
    """(z - mean) / std with the VAE config's statistics: the inverse of what `WanPipeline` applies before decode."""
    mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
    return (z - mean) / std


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, EMA, export
# ---------------------------------------------------------------------------------------------------------------


def atomic_torch_save(obj: dict, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def stage_rngs(np_rng: np.random.Generator, gen: torch.Generator) -> dict:
    """A stage's two streams under the names its checkpoint's "rng" entry keeps them by."""
    return {"numpy": np_rng, "torch": gen}


class EMA:
    """Exponential moving average of parameters (fp32), with the usual warmup `min(decay, (1 + n) / (10 + n))`."""

    def __init__(self, modules: dict[str, torch.nn.Module], decay: float):
        self.decay = decay
        self.shadow = {
            f"{name}.{k}": p.detach().float().clone()
            for name, mod in modules.items()
            for k, p in mod.named_parameters()
        }

    @torch.no_grad()
    def update(self, modules: dict[str, torch.nn.Module], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for name, mod in modules.items():
            for k, p in mod.named_parameters():
                self.shadow[f"{name}.{k}"].lerp_(p.detach().float(), 1 - d)

    def copy_to(self, name: str, module: torch.nn.Module) -> None:
        with torch.no_grad():
            for k, p in module.named_parameters():
                p.copy_(self.shadow[f"{name}.{k}"])


def export_pipeline(out: Path, **components) -> int:
    """Write `out/pipeline` (bf16 weights) atomically: save to a tmp folder, then swap. Returns bytes of weights."""
    final = out / "pipeline"
    tmp = temporary_folder(final)
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = tw.build_pipeline(**components)
    size = tw.save_pipeline(pipe, tmp, dtype=torch.bfloat16)
    replace_folder(tmp, final)
    return size


def read_state(out: Path) -> dict:
    path = out / "train_state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_state(out: Path, **updates) -> None:
    state = {**read_state(out), **updates}
    atomic_write(out / "train_state.json", lambda tmp: tmp.write_text(json.dumps(state, indent=2)))


# ---------------------------------------------------------------------------------------------------------------
# Training loop scaffolding
# ---------------------------------------------------------------------------------------------------------------


class Clock:
    """The stage's time box, periodic logging and checkpoint triggers."""

    def __init__(self, timebox: TimeBox, log_every_s: float, ckpt_every_s: float):
        self.timebox = timebox
        self.log_every_s, self.ckpt_every_s = log_every_s, ckpt_every_s
        self.last_log = self.last_ckpt = self.start = time.time()
        self.samples = 0
        self.loss_sum, self.loss_n = 0.0, 0
        self.data_s = 0.0
        self.metric_sums: dict[str, float] = {}

    def remaining(self, procs: Processes, device: torch.device, step: int, max_steps: int | None) -> float:
        """Seconds left before the deadline, the same on every process (their least); 0 once `max_steps` is reached.

        One collective a step keeps the processes' loops in step and their learning rates equal.
        """
        left = 0.0 if stop_step_reached(step, max_steps) else self.timebox.remaining_s()
        return procs.min(left, device)

    def record(self, loss: float, samples: int, data_s: float, **metrics: float) -> None:
        self.samples += samples
        self.loss_sum += loss
        self.loss_n += 1
        self.data_s += data_s
        for name, value in metrics.items():
            self.metric_sums[name] = self.metric_sums.get(name, 0.0) + value

    def maybe_log(self, stage: str, step: int, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last_log < self.log_every_s or self.loss_n == 0:
            return
        dt = now - self.last_log
        metrics = "".join(f" {name} {total / self.loss_n:.4f}" for name, total in self.metric_sums.items())
        print(
            f"[{stage}] step {step} loss {self.loss_sum / self.loss_n:.4f}{metrics} {self.samples / dt:.1f} samples/s "
            f"data {100 * self.data_s / dt:.0f}% elapsed {now - self.start:.0f}s",
            flush=True,
        )
        self.last_log, self.samples, self.loss_sum, self.loss_n, self.data_s = now, 0, 0.0, 0, 0.0
        self.metric_sums = {}

    def checkpoint_due(self) -> bool:
        if time.time() - self.last_ckpt >= self.ckpt_every_s:
            self.last_ckpt = time.time()
            return True
        return False


def lr_at(step: int, base_lr: float, warmup: int, remaining_s: float = float("inf"), cooldown_s: float = 0.0) -> float:
    """Linear warmup, constant, then (with `cooldown_s`) a linear decay to a tenth over the run's last seconds.

    The run is time-boxed across resumes, so the decay is timed by the wall clock (`remaining_s` before the
    deadline, the same on every process) rather than by a step horizon.
    """
    lr = base_lr * min(1.0, (step + 1) / max(1, warmup))
    if cooldown_s > 0 and remaining_s < cooldown_s:
        lr *= max(0.1, remaining_s / cooldown_s)
    return lr


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@dataclass
class Processes:
    """This process's place in a torchrun launch (rank 0 of 1 when launched plainly)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def min(self, value: float, device: torch.device) -> float:
        """The smallest `value` over the processes (float64: seconds-sized values keep their precision)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return float(t.item())

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over the processes (a parameter without a gradient counts as zero)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

        def mean(flat: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(flat)
            return flat.div_(self.world)

        collective_in_place([p.grad for p in params], mean, dtype=torch.float32)  # one collective for the model

    def broadcast_parameters(self, modules: dict[str, torch.nn.Module]) -> None:
        """Start every process from process 0's weights."""
        if self.world == 1:
            return
        with torch.no_grad():
            for mod in modules.values():
                for t in list(mod.parameters()) + list(mod.buffers()):
                    dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_processes(device_arg: str | None) -> tuple[Processes, torch.device]:
    """Join the torchrun process group when launched by torchrun with several processes; pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if world_size == 1:
        return Processes(), torch.device(device_arg or ("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    return Processes(rank=dist.get_rank(), world=dist.get_world_size()), device


def process_rngs(seed: int, procs: Processes, device: torch.device) -> tuple[np.random.Generator, torch.Generator]:
    """The data / noise RNGs of this process: the plain seed on process 0, distinct streams on the others."""
    if procs.rank == 0:
        return np.random.default_rng(seed), torch.Generator(device=device).manual_seed(seed)
    return (np.random.default_rng([seed, procs.rank]),
            torch.Generator(device=device).manual_seed(seed + 7919 * procs.rank))


class LatentPool:
    """A ring buffer of encoded training latents and their prompts, on the training device (`--latent-reuse`)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.latents: torch.Tensor | None = None  # [capacity, C, f, h, w]
        self.prompts: list[str] = []
        self.size = self.head = 0

    def add(self, latents: torch.Tensor, prompts: list[str]) -> None:
        if self.latents is None:
            self.latents = latents.new_empty((self.capacity, *latents.shape[1:]))
            self.prompts = [""] * self.capacity
        for z, prompt in zip(latents, prompts):
            self.latents[self.head] = z
            self.prompts[self.head] = prompt
            self.head = (self.head + 1) % self.capacity
            self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
        idx = rng.integers(0, self.size, size=n)
        return self.latents[torch.as_tensor(idx, device=self.latents.device)], [self.prompts[i] for i in idx]


def log(procs: Processes, message: str) -> None:
    if procs.is_main:
        print(message, flush=True)


def stop_step_reached(step: int, max_steps: int | None) -> bool:
    return max_steps is not None and step >= max_steps


# ---------------------------------------------------------------------------------------------------------------
# VAE stage
# ---------------------------------------------------------------------------------------------------------------


def vae_loss(vae, x: torch.Tensor, generator: torch.Generator, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground-weighted L1 + 0.1 MSE on pixels + kl_weight * KL (mean per latent element).

    x: [B, 3, F, H, W] in [-1, 1]. Returns the loss and, for the log, the mean L1 error (summed over RGB) on object
    pixels alone: the number that says whether the autoencoder keeps the objects (and their colours).
    """
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(
        posterior.mean.shape, generator=generator, device=x.device, dtype=posterior.mean.dtype
    )
    rec = vae.decode(z).sample.float()
    kl = 0.5 * (posterior.mean.float().pow(2) + posterior.var.float() - 1.0 - posterior.logvar.float()).mean()
    weight = foreground_weight(x)
    error = weight * ((rec - x).abs() + 0.1 * (rec - x).pow(2))
    foreground = (weight > 1.0).squeeze(1)
    object_l1 = (rec - x).abs().sum(dim=1)[foreground].mean() if foreground.any() else rec.new_zeros(())
    return error.mean() / weight.mean() + kl_weight * kl, object_l1.detach()


def foreground_weight(x: torch.Tensor, boost: float = FOREGROUND_BOOST) -> torch.Tensor:
    """Per-pixel loss weight ``[B, 1, F, H, W]``: 1 on the background, ``1 + boost`` on object pixels.

    Objects cover a few percent of a TinyWorld frame; with a plain pixel loss the autoencoder first settles on
    reproducing the flat background (a wide, flat minimum that the first VAE run stayed in), and the objects, which are
    everything the prompts are about, are lost. The background colour is each video's per-channel median.
    """
    background = x.flatten(2).median(dim=-1).values[:, :, None, None, None]  # [B, 3, 1, 1, 1]
    foreground = ((x - background).abs().sum(dim=1, keepdim=True) > 0.1).float()
    return 1.0 + boost * foreground


def train_vae(
    args, setup: StageSetup, timebox: TimeBox, device: torch.device, procs: Processes | None = None
) -> None:
    procs = procs or Processes()
    out = Path(args.out)
    ckpt_path = out / "ckpt_vae.pt"
    vae = tw.build_vae(seed=args.seed, **setup.vae_overrides).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    np_rng, gen = process_rngs(args.seed, procs, device)
    step = 0
    if args.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        vae.load_state_dict(ckpt["vae"])
        opt.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if procs.is_main:
            set_generator_states(ckpt["rng"], stage_rngs(np_rng, gen))
        else:  # the checkpoint holds process 0's streams; the others continue on fresh distinct ones
            np_rng, gen = process_rngs(args.seed + step, procs, device)
        log(procs, f"[vae] resumed from {ckpt_path} at step {step}")
    elif args.resume and read_state(out).get("vae_steps", 0) > 0:
        # Checkpoints (weights + Adam moments) do not travel between GPU machines; the bf16 export does.
        vae.load_state_dict(load_exported(out, "vae").state_dict())
        step = int(read_state(out)["vae_steps"])
        log(procs, f"[vae] no checkpoint: warm start from {out / 'pipeline'} (step {step}, optimizer reset)")
    procs.broadcast_parameters({"vae": vae})
    batch = args.vae_batch_size or setup.vae_batch
    # The VAE is causal and convolutional in time: shorter clips train the same weights for less work, down to 13.
    clip = {**setup.video, "num_frames": vae_clip_frames(args.vae_frames, setup.video["num_frames"])}
    log(procs, f"[vae] {tw.parameter_count(vae) / 1e6:.2f}M params, batch {batch} clips of {clip['num_frames']} "
        f"frames per process x {procs.world} process(es), device {device}")

    def save() -> None:
        rng = generator_states(stage_rngs(np_rng, gen))
        atomic_torch_save({"vae": vae.state_dict(), "optimizer": opt.state_dict(), "rng": rng, "step": step}, ckpt_path)

    clock = Clock(timebox, args.log_every_s, args.ckpt_every_s)
    while (remaining := clock.remaining(procs, device, step, args.max_steps)) > 0:
        t0 = time.time()
        x, _ = sample_videos(np_rng, batch, clip, device)
        data_s = time.time() - t0
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_lr, setup.warmup_steps, remaining, 60.0 * args.cooldown_minutes)
        with autocast(device):
            loss, object_l1 = vae_loss(vae, x, gen, args.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        procs.average_gradients(list(vae.parameters()))
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        clock.record(loss.item(), batch * procs.world, data_s, object_l1=object_l1.item())
        if procs.is_main:
            clock.maybe_log("vae", step)
            if clock.checkpoint_due():
                save()
    if not procs.is_main:
        procs.barrier()  # wait for process 0's export
        return
    clock.maybe_log("vae", step, force=True)
    save()

    # Latent statistics of the trained encoder (posterior means), stored in the config for WanPipeline.
    vae.eval()
    stat_rng = np.random.default_rng(args.seed + 1)
    with torch.no_grad(), autocast(device):
        clips = [sample_videos(stat_rng, min(batch, setup.stat_clips), setup.video, device)[0]
                 for _ in range(max(1, setup.stat_clips // batch))]
        mean, std = latent_stats(vae, clips)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    check = roundtrip_adherence(vae, setup.video, setup.roundtrip_videos, args.seed + 3, device)
    print(
        f"[vae] round trip of {setup.roundtrip_videos} ground-truth videos: adherence {check['adherence']:.3f}, "
        f"mean |error| first 5 frames {check['error_first_5_frames']:.4f}, later {check['error_later_frames']:.4f}",
        flush=True,
    )
    # The folder keeps an already trained teacher (the teacher stage warm-starts from it: a far better start than a
    # fresh one, even though the latents moved a little); otherwise a fresh one completes the folder.
    state = read_state(out)
    teacher_steps = int(state.get("teacher_steps", 0))
    if teacher_steps > 0 and (out / "pipeline" / "transformer").is_dir():
        transformer, text_encoder = load_exported(out, "transformer"), load_exported(out, "text_encoder")
        print(f"[vae] keeping the exported teacher (step {teacher_steps})", flush=True)
    else:
        teacher_steps = 0
        transformer = tw.build_transformer(seed=args.seed, **setup.transformer_overrides)
        text_encoder = tw.build_text_encoder(seed=args.seed)
    size = export_pipeline(
        out, tokenizer=tw.build_tokenizer(), text_encoder=text_encoder, vae=vae.cpu(), transformer=transformer
    )
    write_state(
        out, vae_steps=step, teacher_steps=teacher_steps, toy=args.toy, vae_roundtrip_adherence=check["adherence"]
    )
    print(f"[vae] exported {out / 'pipeline'} ({size / 2**20:.1f} MiB of weights) at step {step}", flush=True)
    procs.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Teacher stage
# ---------------------------------------------------------------------------------------------------------------


def teacher_loss(
    transformer, text_encoder, latents: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Rectified-flow velocity loss. latents: [B, C, f, h, w] normalized; input_ids, mask: [B, S]."""
    b = latents.shape[0]
    s = sample_flow_sigmas(b, generator, latents.device)  # [B]
    eps = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    s_ = s.view(b, 1, 1, 1, 1)
    x_t = (1 - s_) * latents + s_ * eps
    emb = tw.text_embeddings(text_encoder, input_ids, mask)
    pred = transformer(hidden_states=x_t, timestep=s * 1000, encoder_hidden_states=emb, return_dict=False)[0]
    return F.mse_loss(pred.float(), (eps - latents).float())


def drop_prompts(prompts: list[str], rng: np.random.Generator, p: float) -> list[str]:
    """Replace a fraction p of prompts by "" (what WanPipeline encodes for negative_prompt=None), for CFG."""
    keep = rng.random(len(prompts)) >= p
    return [q if k else "" for q, k in zip(prompts, keep)]


def load_frozen_vae(out: Path, device: torch.device):
    """The VAE exactly as the exported pipeline holds it (bf16-rounded weights, fp32 compute)."""
    path = out / "pipeline" / "vae"
    if not path.is_dir():
        raise FileNotFoundError(f"no trained VAE at {path}: run the `vae` stage first")
    vae = load_exported(out, "vae").to(device).eval()
    vae.requires_grad_(False)
    return vae


def train_teacher(
    args, setup: StageSetup, timebox: TimeBox, device: torch.device, procs: Processes | None = None
) -> None:
    procs = procs or Processes()
    out = Path(args.out)
    ckpt_path = out / "ckpt_teacher.pt"
    vae = load_frozen_vae(out, device)
    tokenizer = tw.build_tokenizer()
    transformer = tw.build_transformer(seed=args.seed, **setup.transformer_overrides).to(device).train()
    text_encoder = tw.build_text_encoder(seed=args.seed).to(device).train()
    modules = {"transformer": transformer, "text_encoder": text_encoder}
    np_rng, gen = process_rngs(args.seed + 2, procs, device)
    step = 0
    ckpt = None
    if args.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        transformer.load_state_dict(ckpt["transformer"])
        text_encoder.load_state_dict(ckpt["text_encoder"])
        step = ckpt["step"]
        log(procs, f"[teacher] resumed from {ckpt_path} at step {step}")
    elif args.resume and read_state(out).get("teacher_steps", 0) > 0:
        step = warm_start_from_export(out, transformer, text_encoder)
    procs.broadcast_parameters(modules)

    ema = EMA(modules, args.ema_decay)
    opt = torch.optim.AdamW(
        [
            {"params": list(transformer.parameters()), "base_lr": args.lr},
            {"params": list(text_encoder.parameters()), "base_lr": args.lr * args.text_lr_mult},
        ],
        lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0,
    )
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        ema.shadow = {k: v.to(device) for k, v in ckpt["ema"].items()}
        if procs.is_main:
            set_generator_states(ckpt["rng"], stage_rngs(np_rng, gen))
        else:
            np_rng, gen = process_rngs(args.seed + 2 + step, procs, device)
    if args.compile:
        transformer.compile()

    batch = args.batch_size or setup.teacher_batch
    reuse = max(1, args.latent_reuse)
    pool = LatentPool(capacity=batch * args.pool_batches) if reuse > 1 else None
    log(
        procs,
        f"[teacher] transformer {tw.parameter_count(transformer) / 1e6:.2f}M, text encoder "
        f"{tw.parameter_count(text_encoder) / 1e6:.2f}M params, batch {batch} per process x {procs.world} "
        f"process(es), latent reuse {reuse}, two-object share {args.two_object_share}, device {device}",
    )

    def encode_fresh(n: int) -> tuple[torch.Tensor, list[str]]:
        with torch.no_grad(), autocast(device):
            x, prompts = sample_videos(np_rng, n, setup.video, device, args.two_object_share)
            return normalize_latents(vae.encode(x).latent_dist.mean.float(), vae), prompts

    def next_batch() -> tuple[torch.Tensor, list[str]]:
        if pool is None:
            return encode_fresh(batch)
        if pool.size < pool.capacity // 4:  # fill the pool before drawing from it
            latents, prompts = encode_fresh(batch)
            pool.add(latents, prompts)
            return latents, prompts
        latents, prompts = encode_fresh(max(1, batch // reuse))
        pool.add(latents, prompts)
        old_latents, old_prompts = pool.sample(np_rng, batch - latents.shape[0])
        return torch.cat([latents, old_latents]), prompts + old_prompts

    def save() -> None:
        rng = generator_states(stage_rngs(np_rng, gen))
        atomic_torch_save(
            {
                "transformer": transformer.state_dict(), "text_encoder": text_encoder.state_dict(),
                "ema": ema.shadow, "optimizer": opt.state_dict(), "rng": rng, "step": step,
            },
            ckpt_path,
        )

    clock = Clock(timebox, args.log_every_s, args.ckpt_every_s)
    while (remaining := clock.remaining(procs, device, step, args.max_steps)) > 0:
        t0 = time.time()
        latents, prompts = next_batch()
        ids, mask = tw.encode_prompt_tokens(tokenizer, drop_prompts(prompts, np_rng, args.prompt_dropout))
        data_s = time.time() - t0
        for group in opt.param_groups:
            group["lr"] = lr_at(step, group["base_lr"], setup.warmup_steps, remaining, 60.0 * args.cooldown_minutes)
        with autocast(device):
            loss = teacher_loss(transformer, text_encoder, latents, ids.to(device), mask.to(device), gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for m in modules.values() for p in m.parameters()]
        procs.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema.update(modules, step)
        clock.record(loss.item(), batch * procs.world, data_s)
        if procs.is_main:
            clock.maybe_log("teacher", step)
            if clock.checkpoint_due():
                save()
    if not procs.is_main:
        procs.barrier()
        return
    clock.maybe_log("teacher", step, force=True)
    save()

    # Export the EMA weights.
    export_modules = {name: copy.deepcopy(m).cpu().eval() for name, m in modules.items()}
    for name, m in export_modules.items():
        ema.copy_to(name, m)
    size = export_pipeline(out, tokenizer=tokenizer, vae=vae.cpu(), **export_modules)
    write_state(out, teacher_steps=step, toy=args.toy)
    print(f"[teacher] exported {out / 'pipeline'} ({size / 2**20:.1f} MiB of weights) at step {step}", flush=True)
    procs.barrier()


def load_exported(out: Path, component: str) -> torch.nn.Module:
    """One float32 component (``vae``, ``transformer`` or ``text_encoder``) of the exported ``out/pipeline``."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    cls = {"vae": AutoencoderKLWan, "transformer": WanTransformer3DModel, "text_encoder": UMT5EncoderModel}[component]
    with tw._quiet():
        return cls.from_pretrained(str(out / "pipeline" / component), torch_dtype=torch.float32)


def warm_start_from_export(out: Path, transformer, text_encoder) -> int:
    """Initialize from an exported teacher (EMA weights, bf16-rounded) when no checkpoint travelled along."""
    transformer.load_state_dict(load_exported(out, "transformer").state_dict())
    text_encoder.load_state_dict(load_exported(out, "text_encoder").state_dict())
    step = int(read_state(out)["teacher_steps"])
    print(f"[teacher] no checkpoint: warm start from {out / 'pipeline'} (step {step}, optimizer reset)", flush=True)
    return step


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m blade.tinyworld.train")
    p.add_argument("stage", choices=["vae", "teacher", "all", "check-vae"],
                   help="check-vae: round-trip adherence of DIR/pipeline's VAE on ground-truth videos (no training)")
    p.add_argument("--check-videos", type=int, default=32, help="check-vae: number of ground-truth videos")
    p.add_argument("--out", required=True, help="run folder: checkpoints, train_state.json, pipeline/")
    p.add_argument("--minutes", type=float, default=8.5, help="wall-clock budget, export included")
    p.add_argument("--resume", action="store_true", help="continue from DIR's checkpoint of the stage")
    p.add_argument("--toy", action="store_true", help="tiny widths and 5x32x32 videos (CPU tests)")
    p.add_argument("--max-steps", type=int, default=None, help="stop a stage at this total step count")
    p.add_argument("--vae-share", type=float, default=0.3, help="`all`: fraction of the minutes for the VAE")
    p.add_argument("--batch-size", type=int, default=None, help="teacher batch per process (default 32)")
    p.add_argument("--vae-batch-size", type=int, default=None, help="VAE batch per process (default 8)")
    p.add_argument("--lr", type=float, default=3e-4, help="teacher transformer lr")
    p.add_argument("--text-lr-mult", type=float, default=0.3, help="text encoder lr = lr * this")
    p.add_argument("--vae-lr", type=float, default=3e-4)
    p.add_argument("--vae-frames", type=int, default=None,
                   help="frames per VAE training clip, 4k+1, at least 13 (default: the full video, 17)")
    p.add_argument("--kl-weight", type=float, default=1e-4, help="KL weight (per latent element mean)")
    p.add_argument("--cooldown-minutes", type=float, default=0.0,
                   help="decay the learning rate linearly to a tenth over this run's last MINUTES (0: constant)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--prompt-dropout", type=float, default=0.1)
    p.add_argument("--two-object-share", type=float, default=0.5,
                   help="teacher: fraction of training scenes with two objects (attribute binding is learned there)")
    p.add_argument("--latent-reuse", type=int, default=1,
                   help="teacher: each encoded clip serves about this many steps from a GPU pool (1 = always fresh)")
    p.add_argument("--pool-batches", type=int, default=64, help="teacher: pool capacity in batches (--latent-reuse)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (teacher stage)")
    p.add_argument("--reserve-s", type=float, default=None, help="seconds kept for the export (default 45, toy 0)")
    p.add_argument("--log-every-s", type=float, default=20.0)
    p.add_argument("--ckpt-every-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if not 0.0 <= args.two_object_share <= 1.0:
        p.error(f"--two-object-share must be in [0, 1], got {args.two_object_share}")
    return args


def main(argv: list[str] | None = None) -> None:
    start = time.time()
    args = parse_args(argv)
    procs, device = init_processes(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    Path(args.out).mkdir(parents=True, exist_ok=True)
    setup = stage_setup(args.toy)
    reserve = args.reserve_s if args.reserve_s is not None else (0.0 if args.toy else 45.0)
    end = start + 60.0 * args.minutes - reserve  # time.time() seconds: the stages' boxes end at wall-clock times
    if args.stage == "check-vae":
        vae = load_frozen_vae(Path(args.out), device)
        check = roundtrip_adherence(vae, setup.video, args.check_videos, args.seed + 3, device)
        print(json.dumps({"vae": str(Path(args.out) / "pipeline" / "vae"), "videos": args.check_videos, **check}))
        return
    # SIGTERM / Ctrl-C end a stage like its time box (checkpoint, export) and skip the stages after it
    stopped_by = None
    if args.stage in ("vae", "all"):
        vae_end = start + (end - start) * args.vae_share if args.stage == "all" else end
        box = TimeBox(vae_end, clock=time.time)
        with box.stop_on_signals():
            train_vae(args, setup, box, device, procs)
        stopped_by = box.stopped_by
    if args.stage in ("teacher", "all") and stopped_by is None:
        box = TimeBox(end, clock=time.time)
        with box.stop_on_signals():
            train_teacher(args, setup, box, device, procs)
        stopped_by = box.stopped_by
    if stopped_by is not None:
        log(procs, f"stopped by {stopped_by}: the stage saved its checkpoint; rerun with --resume to continue")
    log(procs, f"done in {time.time() - start:.0f}s")
    if procs.world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
