"""In-training evaluation of a TinyWorld student: adherence and fidelity of its K-step samples on a fixed prompt set.

The distillation trainer calls a monitor every ``--eval_every`` optimizer steps (TinyWorld models only). It samples
with the objective's own K-step rollout (the same sampler as inference, to 5e-6), in batches, decodes with the
pipeline's VAE and scores each video against the known world (`blade.tinyworld.metrics`). The noise of every
(prompt, seed) is fixed for the whole run, so successive points of a learning curve differ only by the weights.

It draws from private generators under a forked RNG: training is bit-identical with or without it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from blade.tinyworld import metrics
from blade.tinyworld.world import parse_prompt, render_prompt


class TinyWorldMonitor:
    """Scores the student on ``prompts x seeds``; ``__call__(objective, decode) -> {"adherence", "fidelity", ...}``.

    Args:
        model_path: the TinyWorld pipeline folder (its tokenizer and text encoder embed the prompts once).
        prompts: grammar prompts.
        seeds: each prompt runs with each seed (the seed fixes the noise and names the ground-truth render).
        latent_shape: ``(C, F, h, w)`` of one latent video; frames/height/width of the decoded video for truth.
        device: where sampling runs.
        batch_size: videos sampled at once.
    """

    def __init__(self, model_path: str | Path, prompts: list[str], seeds: list[int], latent_shape: tuple[int, ...],
                 video_size: tuple[int, int, int], device: torch.device, batch_size: int = 16):
        from blade.tinyworld.model import TINYWORLD_DEFAULTS, encode_prompt_tokens, load_pipeline, text_embeddings

        self.jobs = [(p, s) for p in prompts for s in seeds]
        self.scenes = [parse_prompt(p) for p, _ in self.jobs]
        self.device, self.batch_size = device, batch_size
        pipe = load_pipeline(model_path)
        ids, mask = encode_prompt_tokens(pipe.tokenizer, prompts, TINYWORLD_DEFAULTS["max_sequence_length"])
        with torch.no_grad():
            emb = text_embeddings(pipe.text_encoder, ids, mask)  # [P, L, D]
        index = {p: i for i, p in enumerate(prompts)}
        self.embeddings = torch.stack([emb[index[p]] for p, _ in self.jobs])  # [N, L, D], CPU
        frames, height, width = video_size
        self.truth = [render_prompt(p, s, num_frames=frames, height=height, width=width) for p, s in self.jobs]
        # Fixed noise per video: a generator seeded by the video's seed and position, on the CPU (device-independent).
        self.noise = torch.stack([
            torch.randn(latent_shape, generator=torch.Generator().manual_seed(10_000 * s + j))
            for j, (_, s) in enumerate(self.jobs)
        ])
        self.eta_seed = 1234

    @torch.no_grad()
    def __call__(self, objective, decode) -> dict:
        """Sample, decode (``decode(latents) -> frames [B, F, H, W, 3] in [0, 1]``) and score every video."""
        devices = [self.device] if self.device.type == "cuda" else []
        scores = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.eta_seed)  # the ASA prober's draws, when its seed is None
            generator = torch.Generator(self.device).manual_seed(self.eta_seed)
            for start in range(0, len(self.jobs), self.batch_size):
                stop = min(start + self.batch_size, len(self.jobs))
                noise = self.noise[start:stop].to(self.device)
                emb = self.embeddings[start:stop].to(self.device)
                x0 = objective.sample(noise, emb, generator)
                frames = decode(x0)
                for j, video in enumerate(frames):
                    scene = self.scenes[start + j]
                    score = metrics.score_video(video, scene)
                    scores.append({"adherence": score["adherence"], "stability": score["stability"],
                                   "fidelity": metrics.fidelity_distance(video, self.truth[start + j], scene),
                                   "duplicated": score["duplicated"], "checks": score.get("checks", {})})
        summary = metrics.summarize(scores)
        out = {key: summary.get(key) for key in ("adherence", "stability", "fidelity", "duplicated", "num_videos")}
        out.update({f"acc_{k}": v for k, v in summary.get("attribute_accuracy", {}).items()})
        return out
