"""Where in sampling does a TinyWorld video go wrong? Score the x0 prediction of every sampling step.

    python benchmarks/tinyworld_trajectory.py --prompts P.txt --seeds 1000 --lora assets/tinyworld/blade_lora \
        --out trajectory.json

For each (prompt, seed), the video is generated as `python -m blade.tinyworld.evaluate` generates it (the same
pipeline, LoRA, attention, seed, steps and guidance: the final video is the evaluation's), and at every sampling step
(or every `--every`-th) the sampler's prediction of the clean latent, x0, is decoded by the VAE and scored against the
prompt's scene with the evaluation's own metrics: adherence, and per object the number of separate pieces of its
colour (`blobs`) and whether it is drawn more than once (`duplicated`). A student's x0 is its sampler's
(`BladeStudentScheduler`'s `pred_original_sample`); the teacher's (flow-matching UniPC) is x_t - sigma_t * v, its
model output converted at the step's sigma.

The question it answers (issue 16): does an object come out duplicated because the first, high-noise steps lay out
two copies (then the first x0 predictions already hold two pieces), or does a second piece appear late? The JSON
holds every step of every video; the printed table, per step, the mean adherence and duplicated fraction of the x0s,
and how many of the videos whose final frame duplicates an object already did at that step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blade import api  # noqa: E402
from blade.distill.trainer import decode_latents  # noqa: E402
from blade.families import get_family  # noqa: E402
from blade.tinyworld import metrics  # noqa: E402
from blade.tinyworld.evaluate import configure_attention, sampling_settings  # noqa: E402
from blade.tinyworld.model import TINYWORLD_DEFAULTS, load_pipeline  # noqa: E402
from blade.tinyworld.world import read_prompts  # noqa: E402


class X0Recorder:
    """Wraps `pipe.scheduler.step` and keeps the x0 prediction of the steps it is asked for (`[1, C, F, H, W]`)."""

    def __init__(self, scheduler, every: int):
        self.scheduler, self.every = scheduler, every
        self.original = scheduler.step
        self.records: list[tuple[int, float, torch.Tensor]] = []
        self.index = 0
        scheduler.step = self.step

    def step(self, model_output, timestep, sample, *args, **kwargs):
        sigma = None
        if hasattr(self.scheduler, "sigmas") and not hasattr(self.scheduler, "_anchors"):  # the teacher's UniPC
            index = self.scheduler.step_index if self.scheduler.step_index is not None else 0
            sigma = float(self.scheduler.sigmas[index])
        out = self.original(model_output, timestep, sample, *args, **kwargs)
        if self.index % self.every == 0 or self.is_last():
            if sigma is None:  # the student sampler returns its x0
                x0 = out[1] if isinstance(out, tuple) else out.pred_original_sample
            else:  # flow matching: x_t = (1 - sigma) x0 + sigma eps, v = eps - x0
                x0 = sample.float() - sigma * model_output.float()
            self.records.append((self.index, float(timestep), x0.detach().clone()))
        self.index += 1
        return out

    def is_last(self) -> bool:
        return self.index == len(self.scheduler.timesteps) - 1

    def reset(self) -> None:
        self.records, self.index = [], 0

    def remove(self) -> None:
        self.scheduler.step = self.original


def score_step(frames: np.ndarray, scene) -> dict:
    score = metrics.score_video(frames, scene)
    return {"adherence": score["adherence"], "duplicated": score["duplicated"],
            "blobs": [o.get("blobs") for o in score["objects"]]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, help="text file, one grammar prompt a line")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000])
    parser.add_argument("--lora", default=None, help="a BLADE student LoRA folder (default: the teacher)")
    parser.add_argument("--every", type=int, default=None,
                        help="score every N-th step's x0 (and the last); default 1 for a student, 5 for the teacher")
    parser.add_argument("--model", default=None, help="TinyWorld pipeline folder (default: the bundled one)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="JSON report")
    args = parser.parse_args(argv)

    prompts = read_prompts(args.prompts)
    pipe = load_pipeline(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    lora_config = (api.load_blade_lora(pipe, args.lora, asa=False) or None) if args.lora else None
    steps, guidance, attention, dense_steps = sampling_settings(lora_config)  # as the evaluation samples it
    configure_attention(pipe, attention, sparsity=None, dense_steps=dense_steps, lora_config=lora_config)
    every = args.every or (1 if lora_config else 5)
    recorder = X0Recorder(pipe.scheduler, every)
    size = {k: TINYWORLD_DEFAULTS[k] for k in ("num_frames", "height", "width")}
    family = get_family("wan")

    videos = []
    start = time.perf_counter()
    jobs = [(p, s, seed) for p, s in prompts for seed in args.seeds]
    for prompt, scene, seed in tqdm(jobs, desc=f"trajectories ({attention}, {steps} steps)"):
        recorder.reset()
        frames, _ = api.generate(pipe, prompt, seed=seed, steps=steps, guidance_scale=guidance,
                                 max_sequence_length=TINYWORLD_DEFAULTS["max_sequence_length"], **size)
        x0s = torch.cat([x0 for _, _, x0 in recorder.records])
        with torch.no_grad():
            decoded = decode_latents(pipe, family, x0s.to(pipe.vae.dtype))
        per_step = [{"step": i, "timestep": t, **score_step(decoded[j], scene)}
                    for j, (i, t, _) in enumerate(recorder.records)]
        videos.append({"prompt": prompt, "seed": seed, "final": score_step(frames, scene), "steps": per_step})
    recorder.remove()

    dup_final = [v for v in videos if v["final"]["duplicated"] > 0]
    table = ["| step | timestep | x0 adherence | x0 duplicated | of the finally duplicated videos, duplicated here |",
             "|---|---|---|---|---|"]
    for j, record in enumerate(videos[0]["steps"]):
        rows = [v["steps"][j] for v in videos]
        early = sum(v["steps"][j]["duplicated"] > 0 for v in dup_final)
        table.append(f"| {record['step']} | {record['timestep']:.0f} | {np.mean([r['adherence'] for r in rows]):.3f} "
                     f"| {np.mean([r['duplicated'] for r in rows]):.3f} | {early} of {len(dup_final)} |")
    table.append(f"| final video | | {np.mean([v['final']['adherence'] for v in videos]):.3f} | "
                 f"{np.mean([v['final']['duplicated'] for v in videos]):.3f} | |")
    report = {"lora": args.lora, "model": args.model or "bundled", "attention": attention, "steps": steps,
              "guidance": guidance, "every": every,
              "device": args.device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "seconds": time.perf_counter() - start, "table": "\n".join(table), "videos": videos}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(report["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
