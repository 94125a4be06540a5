"""Full-size TDM train-step time and peak memory, dense student vs ASA student, on one GPU (issue 15).

    python benchmarks/train_step.py --models wan cogvideox --steps 3 --out out/train_step.json
    python benchmarks/train_step.py --models wan --batch 1 5            # + the paper's 5 videos per GPU
    python benchmarks/train_step.py --tiny --device cpu --steps 1       # tiny configs: the CPU test of this script

Models: the published transformer (Wan2.1-T2V-1.3B at 81x480x832 = 32,760 video tokens; CogVideoX-5B at 49x480x720
= 17,550 video + 226 text tokens) with random weights from `blade.testing.full_size`, bf16, no VAE and no text
encoder: the prompt embeddings are random, of the real width and length (Wan 512x4096, CogVideoX 226x4096), as the
trainer reads them from the prompt cache.

Each step is the trainer's iteration (`blade/distill/trainer.py::train`), driven with the trainer's own pieces:
`init_adapters` (student + fake LoRA, rank 64, fp32), `apply_sparsity`, `TDMObjective` (rollout, fake loss +
backward, fake optimizer step, generator loss + backward, generator optimizer step via `optimizer_step`), the
trainer's AdamW settings and LR schedulers, `--gradient_checkpointing`, bf16 autocast, the trainer's default flags
(K 8, eta 0.9, the family's cfg and lambda_reg). The trainer itself logs `step_time`/`peak_memory_gib` only to its
tracker; calling the pieces directly gives every step's time without a tensorboard round trip.

Dense and ASA arms run on the same transformer with the same initial LoRA weights and the same seeds, hence the same
step draws (rollout lengths), so their step times are paired: the ASA speedup is the ratio of the summed timed
steps. Step 1 of each arm is reported apart ("first step": CUDA/Triton warm-up, autotuning); "steady" is the median of
the following `--steps` steps. Peak memory is `torch.cuda.max_memory_allocated` over the arm (weights included).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from blade.distill import lora  # noqa: E402
from blade.distill import trainer as tr  # noqa: E402
from blade.distill.tdm import TDMConfig, TDMObjective  # noqa: E402
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


def run_arm(pipe, family: str, attention: str, batch: int, args, device, dtype, snapshot) -> dict:
    """1 + args.steps trainer iterations of one arm; returns its row (times, peak memory, sparsity, draws)."""
    transformer = pipe.transformer
    ns = SimpleNamespace(lr_scheduler="cosine_with_restarts", lr_warmup_steps=5, fake_warmup_steps=0, family=family,
                         shift=1.0 if get_family(family).flow_shift else None, max_train_steps=300,
                         **{k: v for k, v in tr.FAMILY_DEFAULTS[family].items() if k in ("cfg", "lambda_reg")})
    handle = tr.apply_sparsity(transformer, family, dense_steps=0)[0] if attention == "asa" else None
    lora.load_adapter_state_dict(transformer, lora.STUDENT, snapshot[lora.STUDENT])
    lora.load_adapter_state_dict(transformer, lora.FAKE, snapshot[lora.FAKE])
    family_obj = tr.build_family(pipe, ns)
    config = TDMConfig(k_step=8, eta=0.9, cfg=ns.cfg, lambda_reg=ns.lambda_reg, tau_max=979)
    if dtype == torch.float32:
        from contextlib import nullcontext as autocast
    else:
        def autocast():
            return torch.autocast(device.type, dtype=dtype)
    objective = TDMObjective(transformer, family_obj, config, handle, autocast=autocast, model_dtype=dtype)
    params_g = lora.adapter_parameters(transformer, lora.STUDENT)
    params_f = lora.adapter_parameters(transformer, lora.FAKE)
    opt_g = torch.optim.AdamW(params_g, lr=1e-4, betas=(0.0, 0.95), weight_decay=1e-4, eps=1e-8)  # as the trainer
    opt_f = torch.optim.AdamW(params_f, lr=5e-4, betas=(0.0, 0.95), weight_decay=1e-4, eps=1e-8)
    sched_g, sched_f = tr._make_schedulers(ns, opt_g, opt_f)
    accelerator = SimpleNamespace(num_processes=1)  # what optimizer_step needs of it on one process

    noise_gen = torch.Generator(device).manual_seed(args.seed * 1000)
    draw_gen = torch.Generator().manual_seed(args.seed * 1000 + 500)
    emb_gen = torch.Generator(device).manual_seed(args.seed + 7)
    length, width = text_shape(family, transformer, args.tiny)
    emb = torch.randn(batch, length, width, generator=emb_gen, device=device) * 0.1
    negb = (torch.randn(length, width, generator=emb_gen, device=device) * 0.1).unsqueeze(0).expand(batch, -1, -1)
    frames, height, width_px = args.size or (TINY_SIZE if args.tiny else FULL_SIZE)[family]
    shape = family_obj.latent_shape(batch, frames, height, width_px)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, sparsities, draws, losses = [], [], [], []
    for _ in range(1 + args.steps):  # the body of trainer.train's loop (accumulation 1, one process)
        start = _sync(device)
        noise = torch.randn(shape, generator=noise_gen, device=device)
        draw_f, draw_g = objective.draw_step(draw_gen), objective.draw_step(draw_gen)
        states = objective.rollout(noise, emb, max(draw_f.i, draw_g.i), noise_gen)
        loss_f, _ = objective.fake_loss(states[draw_f.i], draw_f, emb, negb, noise_gen, draw_gen)
        loss_f.backward()
        tr.optimizer_step(accelerator, opt_f, sched_f, params_f)
        loss_g, _ = objective.generator_loss(states[draw_g.i], draw_g, emb, negb, noise_gen, draw_gen)
        loss_g.backward()
        tr.optimizer_step(accelerator, opt_g, sched_g, params_g)
        del states, noise
        times.append(_sync(device) - start)
        draws.append([draw_f.i, draw_g.i])
        losses.append([float(loss_f.detach()), float(loss_g.detach())])
        if handle is not None:
            sparsities.append(float((handle.stats() or {}).get("sparsity", 0.0)))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if handle is not None:
        handle.remove()
    del opt_g, opt_f, objective
    gc.collect()
    steady = times[1:]
    return {
        "model": MODEL_NAMES[family] + (" (tiny)" if args.tiny else ""),
        "family": family, "attention": attention, "batch": batch,
        "size": [frames, height, width_px], "latent_shape": list(shape),
        "first step s": round(times[0], 3),
        "steady step s (median)": round(statistics.median(steady), 3),
        "steady_steps_s": [round(t, 3) for t in steady],
        "peak GiB": round(peak, 2) if peak is not None else None,
        "sparsity": round(statistics.mean(sparsities[1:] or sparsities), 4) if sparsities else 0.0,
        "draws_fake_gen": draws, "losses_fake_gen": losses,
        "losses_finite": all(map(lambda x: x == x and abs(x) != float("inf"), sum(losses, []))),
    }


def run_model(family: str, args, device, dtype) -> list[dict]:
    pipe = build_pipe(family, args, device, dtype)
    transformer = pipe.transformer
    tr.init_adapters(SimpleNamespace(num_processes=1), transformer, SimpleNamespace(seed=args.seed, rank=args.rank,
                                                                                    lora_alpha=args.rank,
                                                                                    lora_targets=args.lora_targets))
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
                row = run_arm(pipe, family, attention, batch, args, device, dtype, snapshot)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available (use --tiny --device cpu for a CPU check)")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype] if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
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
        rows += run_model(family, args, device, dtype)
        write_json()
    print(json.dumps(meta))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
