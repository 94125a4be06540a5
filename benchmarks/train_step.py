"""Full-size TDM train-step time and peak memory, dense student vs ASA student, on one GPU (issue 15).

    python benchmarks/train_step.py --models wan cogvideox --steps 3 --out out/train_step.json
    python benchmarks/train_step.py --models wan --batch 1 5            # + the paper's 5 videos per GPU
    python benchmarks/train_step.py --tiny --device cpu --steps 1       # tiny configs: the CPU test of this script

Models: the published transformer (Wan2.1-T2V-1.3B at 81x480x832 = 32,760 video tokens; CogVideoX-5B at 49x480x720
= 17,550 video + 226 text tokens) with random weights from `blade.testing.full_size`, bf16, no VAE and no text
encoder: the prompt embeddings are random, of the real width and length (Wan 512x4096, CogVideoX 226x4096), as the
trainer reads them from the prompt cache.

Each timed step is one call of the trainer's `blade.distill.step.TDMStep` (`trainer.train` calls the same object
once per optimizer step): the student rollout, the fake-score loss + backward + optimizer step, the generator loss +
backward + optimizer step, with the trainer's AdamW settings, LR schedulers and seeded noise/draw generators. It is
built as the trainer builds it: the trainer's own flags (`trainer.build_parser` defaults, so a new trainer flag comes
with its default; the benchmark sets the seed, batch, LoRA rank/targets, size, `--gradient_checkpointing` and the
mixed precision), `init_adapters` (student + fake LoRA, rank 64, fp32), `apply_sparsity`, `TDMObjective` with
`trainer.tdm_config` (K 8, eta 0.9, the family's cfg and lambda_reg, the trainer's generator loss), and a one-process
`accelerate.Accelerator` whose autocast is the trainer's (bf16 on CUDA). The prompt batches are one random embedding
repeated. The trainer itself logs `step_time`/`peak_memory_gib` only to its tracker; calling `TDMStep` directly gives
every step's time without a tensorboard round trip.

Dense and ASA arms run on the same transformer with the same initial LoRA weights and the same seeds, hence the same
step draws (rollout lengths), so their step times are paired: the ASA speedup is the ratio of the summed timed
steps. `draws_fake_gen` holds each step's [fake, generator] step indices, recorded by wrapping the objective's
`draw_step` (TDMStep's logs do not carry them); `losses_fake_gen` holds each step's `loss_fake` and `loss_g` from
TDMStep's logs. Step 1 of each arm is reported apart ("first step": CUDA/Triton warm-up, autotuning); "steady" is the
median of the following `--steps` steps. Peak memory is `torch.cuda.max_memory_allocated` over the arm's steps
(weights, optimizer state and activations).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from blade.distill import lora  # noqa: E402
from blade.distill import trainer as tr  # noqa: E402
from blade.distill.step import TDMStep  # noqa: E402
from blade.distill.tdm import TDMObjective  # noqa: E402
from blade.families import get_family  # noqa: E402

FULL_SIZE = {"wan": (81, 480, 832), "cogvideox": (49, 480, 720)}
TINY_SIZE = {"wan": (9, 128, 128), "cogvideox": (9, 128, 128)}  # 192 video tokens: 2 ASA blocks
MODEL_NAMES = {"wan": "Wan2.1-T2V-1.3B", "cogvideox": "CogVideoX-5B"}
COLUMNS = ("model", "attention", "batch", "first step s", "steady step s (median)", "peak GiB", "sparsity",
           "ASA speedup")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=("wan", "cogvideox"), default=["wan", "cogvideox"])
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step, per arm")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="videos per step (one row pair per value)")
    p.add_argument("--attention", nargs="+", choices=("dense", "asa"), default=["dense", "asa"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configs (blade.testing.tiny), for a CPU check")
    p.add_argument("--num_layers", type=int, default=None, help="override the transformer depth (dry runs)")
    p.add_argument("--size", type=int, nargs=3, metavar=("FRAMES", "HEIGHT", "WIDTH"), default=None,
                   help="video size (default: the family's published 81x480x832 / 49x480x720)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (and alpha)")
    p.add_argument("--lora_targets", choices=("attn", "attn_ffn", "all"), default="all",
                   help="Linear layers with a LoRA, as the trainer's flag (its default: all)")
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="base weights + autocast (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--phases", action="store_true",
                   help="also time the step's phases (student rollout, fake and generator forwards and backwards, "
                   "the teacher's share of the generator forward, optimizer steps), synchronizing the device "
                   "between them: a row's 'phases_s' (mean per steady step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def build_pipe(family: str, args, device: torch.device, dtype: torch.dtype):
    """A pipeline object carrying only the transformer and scheduler (what the TDM objective needs)."""
    if args.tiny:
        from blade.testing import tiny

        overrides = {"num_layers": args.num_layers} if args.num_layers else {}
        pipe = tiny.build_tiny_pipeline(family, seed=0, **overrides)
        pipe.transformer.to(device=device, dtype=dtype).requires_grad_(False)
        return pipe
    from blade.testing import full_size

    transformer = full_size.build_transformer(family, device, dtype, num_layers=args.num_layers)
    return full_size.PIPELINE_CLASSES[family](tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                                              scheduler=full_size.build_scheduler(family))


def text_shape(family: str, transformer, tiny: bool) -> tuple[int, int]:
    cfg = transformer.config
    width = cfg[get_family(family).text_width_key]
    # tiny: CogVideoX's transformer fixes its text length (max_text_seq_length), Wan's takes any (8 here)
    length = cfg.get("max_text_seq_length", 8) if tiny else get_family(family).text_max_length
    return length, width


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def trainer_args(family: str, args, batch: int, dtype: torch.dtype) -> argparse.Namespace:
    """The trainer's flags for this arm: its parser's defaults (new flags come with theirs), the benchmark's
    seed, batch, LoRA and size, and the fill-ins of `trainer.parse_args` (which also wants a model folder and a
    prompt cache this benchmark does not have)."""
    frames, height, width_px = args.size or (TINY_SIZE if args.tiny else FULL_SIZE)[family]
    parser = tr.build_parser(family)
    # placeholders for the folders: nothing is read from or written to them (random weights, random embeddings)
    argv = ["--pretrained_model_name_or_path", "(random weights)", "--prompt_dir", "(random embeddings)",
            "--output_dir", "(none)", "--seed", str(args.seed), "--train_batch_size", str(batch),
            "--rank", str(args.rank), "--lora_alpha", str(args.rank), "--lora_targets", args.lora_targets,
            "--mixed_precision", "bf16" if dtype == torch.bfloat16 else "no", "--report_to", "none",
            "--num_frames", str(frames), "--height", str(height), "--width", str(width_px), "--validation_steps", "0"]
    if not args.no_gradient_checkpointing:
        argv.append("--gradient_checkpointing")
    ns = parser.parse_args(argv)
    ns.family = family
    tr.validate_args(parser, ns)
    ns.model_extension = None
    return tr.fill_derived_flags(ns)


class _RecordingDraws:
    """Wraps `objective.draw_step` to record each draw's step index (TDMStep's logs do not carry the draws)."""

    def __init__(self, draw_step):
        self.draw_step, self.indices = draw_step, []

    def __call__(self, generator, batch: int = 1):
        draw = self.draw_step(generator, batch)
        self.indices.append(draw.i if isinstance(draw.i, int) else draw.i.tolist())  # per-sample draws: a list
        return draw


class _PhaseClock:
    """Device-synchronized seconds per phase of `TDMStep` calls, by wrapping the objective's and the step's methods
    on these instances: rollout, fake / generator forward (their loss functions), the backward after each (named by
    the forward before it), and the teacher's CFG forwards inside the generator forward (also counted there)."""

    PHASES = ("rollout", "fake forward", "fake backward", "generator forward", "generator backward",
              "teacher (in generator forward)")

    def __init__(self, device: torch.device, objective: TDMObjective, tdm: TDMStep):
        self.device, self.seconds, self.last = device, dict.fromkeys(self.PHASES, 0.0), "fake"
        objective.rollout = self._timed("rollout", objective.rollout)
        objective.fake_loss = self._timed("fake forward", objective.fake_loss, then="fake")
        objective.generator_loss = self._timed("generator forward", objective.generator_loss, then="generator")
        objective.teacher_cfg_x0 = self._timed("teacher (in generator forward)", objective.teacher_cfg_x0)
        backward = tdm._backward
        tdm._backward = lambda loss: self._run(f"{self.last} backward", backward, loss)

    def _run(self, phase: str, fn, *args, **kwargs):
        start = _sync(self.device)
        try:
            return fn(*args, **kwargs)
        finally:
            self.seconds[phase] += _sync(self.device) - start

    def _timed(self, phase: str, fn, then: str | None = None):
        def timed(*args, **kwargs):
            if then is not None:
                self.last = then
            return self._run(phase, fn, *args, **kwargs)

        return timed

    def take(self) -> dict[str, float]:
        """The seconds since the last call, and start over."""
        taken, self.seconds = self.seconds, dict.fromkeys(self.PHASES, 0.0)
        return taken


def run_arm(pipe, family: str, attention: str, batch: int, args, device, dtype, snapshot, accelerator) -> dict:
    """1 + args.steps calls of the trainer's `TDMStep` on one arm; returns its row (times, peak memory, sparsity,
    draws)."""
    transformer = pipe.transformer
    ns = trainer_args(family, args, batch, dtype)
    handle = tr.apply_sparsity(transformer, family)[0] if attention == "asa" else None
    lora.load_adapter_state_dict(transformer, lora.STUDENT, snapshot[lora.STUDENT])
    lora.load_adapter_state_dict(transformer, lora.FAKE, snapshot[lora.FAKE])
    family_obj = tr.build_family(pipe, ns)
    autocast = accelerator.autocast if accelerator.mixed_precision != "no" else nullcontext  # as trainer.train
    objective = TDMObjective(transformer, family_obj, tr.tdm_config(ns), handle, autocast=autocast,
                             model_dtype=dtype)
    recorder = objective.draw_step = _RecordingDraws(objective.draw_step)

    emb_gen = torch.Generator(device).manual_seed(args.seed + 7)
    length, width = text_shape(family, transformer, args.tiny)
    emb = torch.randn(batch, length, width, generator=emb_gen, device=device) * 0.1
    neg = torch.randn(length, width, generator=emb_gen, device=device) * 0.1
    shape = family_obj.latent_shape(batch, ns.num_frames, ns.height, ns.width)
    tdm = TDMStep(ns, accelerator, objective, neg, shape)  # optimizers, schedulers, seeded generators: the trainer's
    clock = _PhaseClock(device, objective, tdm) if args.phases else None
    state = {"global_step": 0, "epoch": 0, "batch_in_epoch": 0, "micro_step": 0}

    def batches():  # the trainer's prompt_batches, without the loader: the same random embeddings every micro-step
        while True:
            state["batch_in_epoch"] += 1
            state["micro_step"] += 1
            yield emb

    stream = batches()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, sparsities, draws, losses, phases = [], [], [], [], []
    for _ in range(1 + args.steps):
        drawn = len(recorder.indices)
        start = _sync(device)
        logs = tdm(stream, state)  # one optimizer step, exactly the trainer's
        times.append(_sync(device) - start)
        if clock is not None:
            phases.append(clock.take())
        draws.append(recorder.indices[drawn:])
        losses.append([logs["loss_fake"], logs["loss_g"]])
        if handle is not None:
            sparsities.append(float((handle.stats() or {}).get("sparsity", 0.0)))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    stream.close()
    if handle is not None:
        handle.remove()
    del tdm, objective
    gc.collect()
    steady = times[1:]
    extra = {}
    if phases:  # mean over the steady steps; "other" = optimizer steps, draws, noise (step minus the timed phases)
        mean = {name: statistics.mean(p[name] for p in phases[1:]) for name in _PhaseClock.PHASES}
        timed = sum(v for k, v in mean.items() if not k.startswith("teacher"))
        extra["phases_s"] = {**{k: round(v, 3) for k, v in mean.items()},
                             "other": round(statistics.mean(steady) - timed, 3)}
    return {
        "model": MODEL_NAMES[family] + (" (tiny)" if args.tiny else ""),
        "family": family, "attention": attention, "batch": batch,
        "size": [ns.num_frames, ns.height, ns.width], "latent_shape": list(shape),
        "first step s": round(times[0], 3),
        "steady step s (median)": round(statistics.median(steady), 3),
        "steady_steps_s": [round(t, 3) for t in steady],
        "peak GiB": round(peak, 2) if peak is not None else None,
        "sparsity": round(statistics.mean(sparsities[1:] or sparsities), 4) if sparsities else 0.0,
        "draws_fake_gen": draws, "losses_fake_gen": losses,
        "losses_finite": all(map(lambda x: x == x and abs(x) != float("inf"), sum(losses, []))),
        **extra,
    }


def run_model(family: str, args, device, dtype, accelerator) -> list[dict]:
    pipe = build_pipe(family, args, device, dtype)
    transformer = pipe.transformer
    tr.init_adapters(accelerator, transformer, trainer_args(family, args, args.batch[0], dtype))
    if not args.no_gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    snapshot = {name: {k: v.detach().clone() for k, v in lora.adapter_state_dict(transformer, name).items()}
                for name in (lora.STUDENT, lora.FAKE)}
    rows = []
    for batch in args.batch:
        arm_rows = {}
        for attention in args.attention:
            print(f"[train_step] {family} batch {batch} {attention} ...", flush=True)
            try:
                row = run_arm(pipe, family, attention, batch, args, device, dtype, snapshot, accelerator)
            except torch.cuda.OutOfMemoryError as err:
                row = {"model": MODEL_NAMES[family], "family": family, "attention": attention, "batch": batch,
                       "error": f"out of memory: {str(err).splitlines()[0]}"}
                tr.lora.activate(transformer, lora.STUDENT)
                from blade.models.common import remove_asa

                remove_asa(transformer)
                gc.collect()
                torch.cuda.empty_cache()
            print(f"[train_step] {json.dumps(row)}", flush=True)
            arm_rows[attention] = row
            rows.append(row)
        dense, asa = arm_rows.get("dense"), arm_rows.get("asa")
        if dense and asa and "error" not in dense and "error" not in asa:
            # paired: same seeds -> same draws -> same rollout lengths in both arms
            asa["ASA speedup"] = round(sum(dense["steady_steps_s"]) / sum(asa["steady_steps_s"]), 3)
    del pipe, transformer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def markdown_table(rows: list[dict]) -> str:
    def cell(row, col):
        if "error" in row and col not in ("model", "attention", "batch"):
            return row["error"] if col == "first step s" else ""
        value = row.get(col)
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def make_accelerator(device: torch.device, dtype: torch.dtype):
    """One process's `accelerate.Accelerator`, as the trainer's `make_accelerator` builds it (its autocast, its
    device; one process, so its reductions are copies), on `device`."""
    from accelerate import Accelerator

    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    if accelerator.device.type != device.type or accelerator.num_processes != 1:
        raise SystemExit(f"error: accelerate picked {accelerator.device} x {accelerator.num_processes} processes "
                         f"for --device {device}: run this benchmark as one plain process")
    return accelerator


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available (use --tiny --device cpu for a CPU check)")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    accelerator = make_accelerator(device, dtype)
    import importlib.metadata as md

    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "diffusers": md.version("diffusers"), "dtype": str(dtype),
            "gradient_checkpointing": not args.no_gradient_checkpointing, "rank": args.rank,
            "lora_targets": args.lora_targets, "steps": args.steps, "tiny": args.tiny, "num_layers": args.num_layers,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows = []

    def write_json() -> None:  # after every model: a run stopped by a time limit keeps what it measured
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")

    for family in args.models:
        rows += run_model(family, args, device, dtype, accelerator)
        write_json()
    print(json.dumps(meta))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
