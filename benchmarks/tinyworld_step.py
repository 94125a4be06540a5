"""Where a TinyWorld teacher training step spends its time, eager and compiled (a GPU benchmark).

    python benchmarks/tinyworld_step.py --device cuda --out step.json [--profile]

Times, at the training sizes (`blade.tinyworld.train`'s defaults): rendering the fresh clips, encoding them with the
VAE, and one optimizer step of the transformer + text encoder (forward, backward, AdamW) in bf16 autocast, first
eager and then with `transformer.compile()` (what `--compile` does). Prints a markdown table and writes JSON whose
`faster` names the quicker transformer mode (when it says "compile", train with `--compile`, or `COMPILE=1` in
`benchmarks/gpu_tinyworld.sh`).
`--profile` adds the top GPU kernels of an eager step (torch.profiler). Weights are random: time does not depend on
them. `--toy` runs the toy sizes (CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from blade.tinyworld import model as tw
from blade.tinyworld import train


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=None, help="teacher batch (default: the training default)")
    parser.add_argument("--fresh", type=int, default=None, help="clips rendered + encoded a step (default batch/4)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--no-compile", action="store_true", help="time the eager step only")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of an eager step")
    parser.add_argument("--toy", action="store_true", help="toy sizes (a CPU smoke test)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    setup = train.stage_setup(args.toy)
    batch = args.batch or setup.teacher_batch
    fresh = args.fresh or max(1, batch // 4)
    torch.backends.cuda.matmul.allow_tf32 = True
    vae = tw.build_vae(**setup.vae_overrides).to(device).eval().requires_grad_(False)
    transformer = tw.build_transformer(**setup.transformer_overrides).to(device).train()
    text_encoder = tw.build_text_encoder().to(device).train()
    tokenizer = tw.build_tokenizer()
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    rng = np.random.default_rng(0)
    gen = torch.Generator(device).manual_seed(0)

    clips, prompts = train.sample_videos(rng, fresh, setup.video, device)
    with torch.no_grad(), train.autocast(device):
        latents = vae.encode(clips).latent_dist.mean.float()
    latents = latents.repeat((batch + fresh - 1) // fresh, 1, 1, 1, 1)[:batch]
    ids, mask = tw.encode_prompt_tokens(tokenizer, (prompts * batch)[:batch])
    ids, mask = ids.to(device), mask.to(device)

    def render() -> None:
        train.sample_videos(rng, fresh, setup.video, device)

    def encode() -> None:
        with torch.no_grad(), train.autocast(device):
            vae.encode(clips)

    def step() -> None:
        with train.autocast(device):
            loss = train.teacher_loss(transformer, text_encoder, latents, ids, mask, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    tokens = latents[0, 0].numel()
    rows = {
        "render": seconds_per_call(render, device, args.repeats),
        "vae_encode": seconds_per_call(encode, device, args.repeats),
        "step_eager": seconds_per_call(step, device, args.repeats),
    }
    profile_table = None
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                step()
            synchronize(device)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        profile_table = prof.key_averages().table(sort_by=sort, row_limit=20)
        print(profile_table)
    if not args.no_compile:
        transformer.compile()
        t0 = time.perf_counter()
        step()
        synchronize(device)
        rows["compile_first_step"] = time.perf_counter() - t0
        rows["step_compiled"] = seconds_per_call(step, device, args.repeats)
    faster = "compile" if rows.get("step_compiled", float("inf")) < 0.9 * rows["step_eager"] else "eager"

    print(f"| part ({batch} clips x {tokens} tokens a step, {fresh} fresh) | ms |")
    print("|---|---:|")
    for name, seconds in rows.items():
        print(f"| {name} | {1000 * seconds:.1f} |")
    print(f"faster transformer mode: {faster}")
    if args.out:
        report = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "batch": batch, "fresh": fresh, "tokens_per_clip": tokens,
            "seconds": rows, "faster": faster, "profile": profile_table,
        }
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
