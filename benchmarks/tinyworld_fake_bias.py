"""How much of TDM's first generator signal is the fake score's own sparse-attention error (issue 16).

The released recipe copies the sparse student into the fake score, so at the start of training the fake is the base
model with ASA and the generator's update direction, ``x0_fake - x0_teacher_cfg``, splits into

    (x0_asa - x0_dense)   the fake's sparse-attention error: not a property of the student's distribution
  + (x0_dense - x0_cfg)   the pull toward the CFG teacher: the signal distillation is meant to follow

(x0 = the base model's clean prediction at noise level tau; the teacher is dense). On rendered TinyWorld videos (the
teacher's own training data, so no sampler is involved), noised to each tau, this prints the mean absolute size of
both parts and their cosine, for each ASA setting. CPU is fine (a few minutes):

    python benchmarks/tinyworld_fake_bias.py --prompts assets/tinyworld/eval_prompts.txt --max_prompts 8 --out bias.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from blade import api
from blade.distill.tdm import wan_family
from blade.models.wan import default_asa_config
from blade.tinyworld.model import TINYWORLD_DEFAULTS, load_pipeline
from blade.tinyworld.train import normalize_latents, to_vae_input
from blade.tinyworld.world import read_prompts, render_prompt


def clean_latents(pipe, prompt: str, seed: int) -> torch.Tensor:
    """The rendered video of `prompt` encoded as the teacher saw its data: normalised latents [1, C, f, h, w]."""
    frames = render_prompt(prompt, seed)  # [F, 3, H, W] in [0, 1]
    with torch.no_grad():
        z = pipe.vae.encode(to_vae_input(frames[None])).latent_dist.mean
    return normalize_latents(z.float(), pipe.vae)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, help="TinyWorld prompt file")
    parser.add_argument("--max_prompts", type=int, default=8, help="first N prompts")
    parser.add_argument("--seed", type=int, default=1000, help="render and noise seed")
    parser.add_argument("--taus", type=int, nargs="+", default=[250, 500, 750, 950], help="noise levels (of 1000)")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.17, 0.25], help="ASA max_keep values")
    parser.add_argument("--block_sizes", type=int, nargs="+", default=[128, 64], help="ASA block sizes")
    parser.add_argument("--cfg", type=float, default=5.0, help="the teacher's guidance scale in the target")
    parser.add_argument("--model", default=None, help="TinyWorld pipeline folder (default: the bundled one)")
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args()
    if args.max_prompts < 1 or not args.taus or any(not 0 < t < 1000 for t in args.taus):
        parser.error("--max_prompts must be >= 1 and every --taus value in (0, 1000)")

    start = time.perf_counter()
    torch.manual_seed(args.seed)  # the prober's draws
    pipe = load_pipeline(args.model)
    family = wan_family(pipe)
    transformer = pipe.transformer.eval()
    prompts = [prompt for prompt, _ in read_prompts(args.prompts)][: args.max_prompts]
    settings = [(keep, block) for block in args.block_sizes for keep in args.keeps]
    sums = {(s, tau): torch.zeros(4, dtype=torch.float64) for s in settings for tau in args.taus}
    handle = None
    for prompt in prompts:
        with torch.no_grad():
            emb, neg = pipe.encode_prompt(prompt, negative_prompt="", do_classifier_free_guidance=True,
                                          max_sequence_length=TINYWORLD_DEFAULTS["max_sequence_length"])
        x0 = clean_latents(pipe, prompt, args.seed)
        for tau in args.taus:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(args.seed + tau))
            t = torch.tensor([float(tau)])
            x_tau = family.schedule.add_noise(x0, noise, t).float()

            def x0_of(e: torch.Tensor, x_tau: torch.Tensor = x_tau, t: torch.Tensor = t) -> torch.Tensor:
                with torch.no_grad():
                    return family.schedule.to_x0(family.predict(transformer, x_tau, t, e), x_tau, t)

            api.disable_asa(pipe)
            dense, uncond = x0_of(emb), x0_of(neg)
            teacher = uncond + args.cfg * (dense - uncond)
            pull = dense - teacher
            for keep, block in settings:
                config = dataclasses.replace(default_asa_config(), max_keep=keep, block_size=block)
                api.disable_asa(pipe)
                handle = api.enable_asa(pipe, config)
                error = x0_of(emb) - dense
                cosine = torch.nn.functional.cosine_similarity(error.flatten(), pull.flatten(), dim=0)
                sums[(keep, block), tau] += torch.tensor(
                    [error.abs().mean().item(), pull.abs().mean().item(), cosine.item(),
                     handle.stats()["sparsity"]], dtype=torch.float64)
    api.disable_asa(pipe)

    rows = []
    for (keep, block), tau in sums:
        err, pull, cos, sparsity = (sums[(keep, block), tau] / len(prompts)).tolist()
        rows.append({"max_keep": keep, "block_size": block, "tau": tau, "asa_error": err, "cfg_pull": pull,
                     "error_over_pull": err / pull, "cosine": cos, "sparsity": sparsity})
    print("| block | max_keep | tau | sparsity | mean abs ASA error | mean abs CFG pull | ratio | cosine |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['block_size']} | {r['max_keep']} | {r['tau']} | {r['sparsity']:.3f} | {r['asa_error']:.4f} | "
              f"{r['cfg_pull']:.4f} | {r['error_over_pull']:.2f} | {r['cosine']:+.2f} |")
    facts = {"prompts": args.prompts, "max_prompts": len(prompts), "seed": args.seed, "cfg": args.cfg,
             "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - start}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"facts": facts, "rows": rows}, f, indent=1)
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
