"""End-to-end text-to-video speed: the stock pipelines against BLADE, at full size with random weights.

Arms, per family (Wan2.1-T2V-1.3B at 480x832x81, CogVideoX-5B at 480x720x49), all in one process:

- ``baseline``: the stock pipeline as its model card runs it. Wan: 50 UniPC steps, CFG 5.0, bf16 transformer and
  text encoder, float32 VAE, default SDPA. CogVideoX: 50 DDIM steps, CFG 6.0 (batched cond/uncond), everything bf16.
  ``--baseline_steps N`` measures N real steps and scales the denoising stage linearly to 50 (a step costs the same
  at every timestep); the JSON and the table mark such figures as extrapolated.
- ``blade``: the 8-step student (``BladeStudentScheduler``), guidance 1 (one forward a step), ASA with the family's
  default clamps (``apply_asa``), a random rank-64 LoRA fused into the weights, and ``speed_up_pipeline``
  (regionally compiled transformer blocks, bf16 VAE, cuDNN autotuning).
- ``dense``: the same student without ASA.
- ``blade_reuse`` (not run unless named in ``--arms``): ``blade`` with each prober mask serving
  ``--mask_reuse_steps`` sampling steps (``ASAHandle.mask_reuse_steps``; its quality cost is measured on TinyWorld
  in BENCHMARKS.md, "Mask reuse").

Fusing a LoRA is weight arithmetic only (``W <- W + (alpha / r) B A`` once, then the adapter layers are removed), so
the fused student runs exactly the base architecture: the random LoRA here only shows that nothing is left behind.

Each arm runs once as a warm-up (compilation, autotuning, allocator growth; its wall time is reported as
``warmup_s``), then once measured. Stages: text encoding (tokenizer + encoder calls, both prompts for CFG),
denoising (from the end of text encoding to the start of the VAE decode: transformer + scheduler), VAE decode, and
post-processing to numpy. GPU work is synchronized only at these stage boundaries.

Recommended run on one H100 (both families in ~4-6 minutes):

    python benchmarks/end_to_end.py --family both --baseline_steps 5 --out benchmarks/results/end_to_end.json

CPU smoke test (tiny random pipelines, 2 steps): ``python benchmarks/end_to_end.py --family wan --tiny``.

The newer models (issue: Wan2.2 and the 14B models) run with ``--models NAME ...`` (``wan2.1-t2v-14b``,
``wan2.2-t2v-a14b``, ``wan2.2-ti2v-5b``, also the two above by model name): each at its registry video size and stock
CFG (``blade.families.get_model``), every expert of a two-expert pipeline with the random LoRA, ASA
(``apply_asa_pipeline``: the model's default config) and the speed-ups; the student's anchors take the stock
scheduler's flow shift, so a two-expert pipeline routes them as a trained student's. Wan2.2-A14B's two 14B experts
(~57 GB in bf16) plus the text encoder need more than an 80 GB card at 720p: run it on an H200, or on an 80 GB card
with ``--offload_idle_expert`` (``blade.offload``: only the expert being called stays on the GPU, the other waits in
pinned host memory; two swaps a video, timed inside the denoise stage and reported as ``expert_swap_s``).

    python benchmarks/end_to_end.py --models wan2.1-t2v-14b --baseline_steps 2 --out e2e_14b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blade.families import get_family, get_model, pipeline_experts, scheduler_flow_shift  # noqa: E402
from blade.offload import offload_idle_experts  # noqa: E402
from blade.speed import COMPILE_SCOPES, CUDA_GRAPH_MODES, speed_up_pipeline  # noqa: E402
from blade.testing import full_size, tiny  # noqa: E402

ARMS = ("baseline", "blade", "dense", "blade_reuse")
DEFAULT_ARMS = ARMS[:3]
PROMPT = "A red fox runs through fresh snow in a pine forest at sunrise, cinematic lighting, slow motion"
NEGATIVE_PROMPT = "blurry, low quality, distorted"
_START = time.perf_counter()


@dataclass
class FamilySpec:
    """How the model card runs a family, and the size of its video."""

    height: int
    width: int
    num_frames: int
    steps: int
    guidance_scale: float
    prediction_type: str  # of the student sampler


FULL_SPECS = {
    "wan": FamilySpec(height=480, width=832, num_frames=81, steps=50, guidance_scale=5.0, prediction_type="flow"),
    "cogvideox": FamilySpec(
        height=480, width=720, num_frames=49, steps=50, guidance_scale=6.0, prediction_type="v_prediction"
    ),
}
TINY_SPECS = {
    "wan": FamilySpec(height=32, width=32, num_frames=9, steps=2, guidance_scale=5.0, prediction_type="flow"),
    "cogvideox": FamilySpec(
        height=32, width=32, num_frames=9, steps=2, guidance_scale=6.0, prediction_type="v_prediction"
    ),
}


def model_spec(name: str, tiny: bool) -> FamilySpec:
    """A registry model's stock run (`--models`): its default video and CFG, 50 steps; `tiny`: 2 steps at 9x32x32."""
    model = get_model(name)
    prediction_type = get_family(model.family).prediction_type
    if tiny:
        return FamilySpec(height=32, width=32, num_frames=9, steps=2, guidance_scale=model.guidance_scale,
                          prediction_type=prediction_type)
    video = model.video_defaults()
    return FamilySpec(height=video["height"], width=video["width"], num_frames=video["num_frames"], steps=50,
                      guidance_scale=model.guidance_scale, prediction_type=prediction_type)


TINY_MODEL_BUILDERS = {"wan2.2-t2v-a14b": tiny.build_tiny_wan22_a14b_pipeline,
                       "wan2.2-ti2v-5b": tiny.build_tiny_wan22_ti2v_pipeline}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _START:6.1f}s] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------------


class PipelineFactory:
    """Builds a fresh pipeline per arm (transformer, VAE, scheduler) around one shared text encoder.

    Rebuilding is cheap (random weights are allocated on the device) and keeps the arms independent: no compiled
    graph, patched processor or changed VAE dtype leaks from one arm into the next.
    """

    def __init__(self, family: str, device: torch.device, dtype: torch.dtype, tiny: bool):
        """`family`: "wan" / "cogvideox" or a registry model name (`--models`)."""
        self.family, self.device, self.dtype, self.tiny = family, device, dtype, tiny
        if tiny:
            pipe = self._tiny_pipeline()
            self.shared = {"text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer}
        else:
            self.shared = {
                "text_encoder": full_size.build_text_encoder(family, device, dtype),
                "tokenizer": full_size.build_tokenizer(family),
            }

    def _tiny_pipeline(self):
        if self.family in TINY_MODEL_BUILDERS:
            return TINY_MODEL_BUILDERS[self.family](seed=0).to(self.device, self.dtype)
        return tiny.build_tiny_pipeline(full_size.family_of(self.family), seed=0).to(self.device, self.dtype)

    def pipeline(self):
        if self.tiny:
            pipe = self._tiny_pipeline()
            pipe.register_modules(**self.shared)
            return pipe
        # every expert, the documented VAE dtype and the pipeline's own config; the shared text encoder swapped in
        pipe = full_size.build_full_size_pipeline(self.family, self.device, self.dtype, text_encoder=False)
        pipe.register_modules(**self.shared)
        return pipe


def student_scheduler(family: str, stock_scheduler, num_steps: int, prediction_type: str):
    """The BLADE student sampler (K anchors, eta 0.9); CogVideoX's reads the DDPM betas of the stock config."""
    from blade.distill.sampler import BladeStudentScheduler

    kwargs: dict[str, Any] = {"num_anchors": num_steps, "eta": 0.9, "prediction_type": prediction_type}
    if prediction_type == "flow":  # the trainer's default: the anchors at the stock scheduler's own flow shift
        kwargs["shift"] = scheduler_flow_shift(stock_scheduler.config) or 1.0
    if prediction_type == "v_prediction":
        for key in ("beta_start", "beta_end", "beta_schedule", "rescale_betas_zero_snr", "snr_shift_scale"):
            if key in stock_scheduler.config:
                kwargs[key] = stock_scheduler.config[key]
    return BladeStudentScheduler(**kwargs)


@torch.no_grad()
def fuse_random_lora(transformer: torch.nn.Module, rank: int = 64, seed: int = 0) -> int:
    """Add a rank-`rank` PEFT LoRA with random A and B to the attention projections, fuse it, unload the adapter.

    Returns the number of fused layers. After this the transformer has exactly its stock modules again.
    """
    from peft.tuners.lora import LoraLayer

    from blade.distill.lora import lora_config

    transformer.add_adapter(lora_config(rank=rank, alpha=rank), adapter_name="random_student")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        for mats in (layer.lora_A, layer.lora_B):  # peft starts B at zero; a real student's B is not
            weight = mats["random_student"].weight
            weight.copy_(torch.randn(weight.shape, generator=generator).mul_(0.01).to(weight))
    transformer.fuse_lora(lora_scale=1.0)
    transformer.unload_lora()
    return len(layers)


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


class StageTimer:
    """Marks stage boundaries of one pipeline call: end of the last text-encoder call, start and end of the VAE
    decode. Synchronizes the device at those points only."""

    def __init__(self, pipe, device: torch.device):
        self.device = device
        self.marks: dict[str, float] = {}
        self._handles = []
        if pipe.text_encoder is not None:
            self._handles.append(pipe.text_encoder.register_forward_hook(lambda *_: self.mark("text_end")))
        vae = pipe.vae
        self._vae, self._decode = vae, vae.decode

        def timed_decode(*args, **kwargs):
            self.mark("decode_start")
            out = self._decode(*args, **kwargs)
            self.mark("decode_end")
            return out

        vae.decode = timed_decode

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mark(self, name: str) -> None:
        self.sync()
        self.marks[name] = time.perf_counter()

    def run(self, pipe, **kwargs) -> dict[str, float]:
        self.marks.clear()
        self.mark("start")
        pipe(**kwargs)
        self.mark("end")
        m = self.marks
        text_end = m.get("text_end", m["start"])
        return {
            "text_encoding_s": text_end - m["start"],
            "denoising_s": m["decode_start"] - text_end,
            "vae_decode_s": m["decode_end"] - m["decode_start"],
            "postprocess_s": m["end"] - m["decode_end"],
            "total_s": m["end"] - m["start"],
        }

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._vae.decode = self._decode


def _peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------------------------
# Arms
# ----------------------------------------------------------------------------------------------------------------


def compile_kwargs(args) -> dict[str, Any] | None:
    """`torch.compile` options of the student arms from `--compile_backend` / `--compile_mode` (None: defaults)."""
    kwargs = {name: value for name, value in (("backend", args.compile_backend), ("mode", args.compile_mode)) if value}
    return kwargs or None


def run_arm(arm: str, family: str, spec: FamilySpec, factory: PipelineFactory, args) -> dict[str, Any]:
    device = factory.device
    result: dict[str, Any] = {"arm": arm, "family": family}
    log(f"{family}/{arm}: building the pipeline")
    pipe = factory.pipeline()
    pipe.set_progress_bar_config(disable=True)
    handle = None
    call: dict[str, Any] = dict(
        prompt=PROMPT, height=spec.height, width=spec.width, num_frames=spec.num_frames, output_type="np"
    )
    if arm == "baseline":
        torch.backends.cudnn.benchmark = False  # the stock default; an earlier arm may have turned it on
        steps = args.baseline_steps or spec.steps
        call.update(negative_prompt=NEGATIVE_PROMPT, guidance_scale=spec.guidance_scale)
        warmup_steps = min(2, steps)
        result.update(steps=spec.steps, measured_steps=steps, guidance_scale=spec.guidance_scale)
    else:
        steps = args.student_steps
        pipe.scheduler = student_scheduler(family, pipe.scheduler, steps, spec.prediction_type)
        call.update(guidance_scale=1.0)
        warmup_steps = steps
        result.update(steps=steps, measured_steps=steps, guidance_scale=1.0)
        result["lora_layers_fused"] = sum(fuse_random_lora(transformer, rank=args.lora_rank, seed=k)
                                          for k, (_, transformer) in enumerate(pipeline_experts(pipe)))
        if arm in ("blade", "blade_reuse"):
            handle = _apply_asa(family, pipe)
            result["asa_config"] = _jsonable(vars(handle.config)) if hasattr(handle.config, "__dict__") else None
            if arm == "blade_reuse":
                handle.mask_reuse_steps = result["mask_reuse_steps"] = args.mask_reuse_steps
        vae_chunks = get_family(full_size.family_of(family)).vae_decode_chunks  # Wan only (the family registry)
        result["speed_up"] = speed_up_pipeline(
            pipe,
            compile_transformer=not args.no_compile,
            vae_dtype=torch.bfloat16,
            compile_vae=args.compile_vae,
            channels_last=args.channels_last,
            cudnn_benchmark=True,
            fuse_qkv=args.fuse_qkv,
            compile_kwargs=compile_kwargs(args),
            compile_scope=args.compile_scope,
            vae_decode_chunk=args.vae_decode_chunk if vae_chunks else None,
            postprocess_on_device=args.postprocess_on_device,
        )
    offload = None
    if args.offload_idle_expert and len(pipeline_experts(pipe)) > 1:
        offload = offload_idle_experts(pipe)
        log(f"{family}/{arm}: idle expert offloaded ({offload.stats()['host_gb']:.1f} GB pinned host copies, "
            f"{offload.setup_seconds:.1f} s)")
    timer = StageTimer(pipe, device)
    try:
        log(f"{family}/{arm}: warm-up run ({warmup_steps} steps)")
        t0 = time.perf_counter()
        pipe(**call, num_inference_steps=warmup_steps)
        timer.sync()
        result["warmup_s"] = time.perf_counter() - t0
        if handle is not None:
            handle.reset()
        _reset_peak_memory(device)
        log(f"{family}/{arm}: measured run ({steps} steps)")
        swap_before = offload.swap_seconds if offload is not None else 0.0
        stages = timer.run(pipe, **call, num_inference_steps=steps)
        if offload is not None:  # inside the denoise stage; a video swaps the same whatever its step count
            stages["expert_swap_s"] = offload.swap_seconds - swap_before
            result["offload"] = offload.stats()
        result["peak_memory_gb"] = _peak_memory_gb(device)
        result["measured"] = stages
        result["stages"] = _extrapolate(stages, steps, result["steps"])
        result["extrapolated"] = steps != result["steps"]
        # compile time is what the warm-up took beyond a measured run of the same number of steps
        per_step = stages["denoising_s"] / steps
        result["compile_and_warmup_overhead_s"] = result["warmup_s"] - (
            stages["total_s"] - stages["denoising_s"] + per_step * warmup_steps
        )
        if handle is not None:
            result["asa_stats"] = _jsonable(handle.stats())
        if "speed_up" in result:
            result["speed_up"] = _jsonable(result["speed_up"])
        log(
            f"{family}/{arm}: total {stages['total_s']:.2f} s" + (" (extrapolated)" * result["extrapolated"])
            + f" = text {stages['text_encoding_s']:.2f} + denoise {stages['denoising_s']:.2f}"
            + f" + VAE decode {stages['vae_decode_s']:.2f} + postprocess {stages['postprocess_s']:.2f}"
        )
    finally:
        timer.remove()
        if offload is not None:
            offload.remove(device_resident=False)
        del pipe, handle, offload
        _free(device)
    return result


def _apply_asa(family: str, pipe):
    """ASA on the pipeline's denoisers: the family's default clamps for "wan" / "cogvideox" (the figures recorded
    so far), the registry model's default config on every expert for a model name."""
    if family in ("wan", "cogvideox"):
        return get_family(family).adapter().apply_asa(pipe.transformer)
    from blade.models import apply_asa_pipeline

    return apply_asa_pipeline(pipe)


def _extrapolate(stages: dict[str, float], measured_steps: int, steps: int) -> dict[str, float]:
    """Scale the denoising stage linearly from `measured_steps` to `steps` (every step costs the same); expert swaps
    (`expert_swap_s`, idle-expert offload) happen twice a video whatever its step count, so they are not scaled."""
    if measured_steps == steps:
        return dict(stages)
    out = dict(stages)
    swap = stages.get("expert_swap_s", 0.0)
    out["denoising_s"] = (stages["denoising_s"] - swap) / measured_steps * steps + swap
    out["total_s"] = stages["total_s"] - stages["denoising_s"] + out["denoising_s"]
    return out


def _free(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        getattr(torch._C, "_host_emptyCache", lambda: None)()  # pinned host copies of an offloaded expert


def run_family(
    family: str, args, device: torch.device, on_arm: Callable[[list[dict[str, Any]]], None] | None = None
) -> list[dict[str, Any]]:
    """Every arm of one model; ``on_arm(results so far)`` after each, so a run cut off by a time limit keeps them."""
    spec = (TINY_SPECS if args.tiny else FULL_SPECS)[family] if family in FULL_SPECS else model_spec(family, args.tiny)
    dtype = torch.float32 if args.tiny and device.type == "cpu" else torch.bfloat16
    log(f"{family}: building the shared text encoder")
    factory = PipelineFactory(family, device, dtype, args.tiny)
    results = []
    for arm in args.arms:
        try:
            results.append(run_arm(arm, family, spec, factory, args))
        except Exception as err:  # one failing arm must not take the others down
            log(f"{family}/{arm}: FAILED: {type(err).__name__}: {err}")
            traceback.print_exc()
            results.append({"arm": arm, "family": family, "error": f"{type(err).__name__}: {err}"})
            _free(device)
        _add_speedups(results)
        if on_arm is not None:
            on_arm(results)
    del factory
    _free(device)
    return results


def _add_speedups(results: list[dict[str, Any]]) -> None:
    base = next((r for r in results if r["arm"] == "baseline" and "stages" in r), None)
    if base is None:
        return
    for r in results:
        if "stages" in r:
            r["speedup_total"] = base["stages"]["total_s"] / r["stages"]["total_s"]
            r["speedup_denoising"] = base["stages"]["denoising_s"] / r["stages"]["denoising_s"]


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def markdown_table(results: list[dict[str, Any]]) -> str:
    header = (
        "| family | arm | steps | CFG | text (s) | denoise (s) | VAE decode (s) | total (s) | peak mem (GB) "
        "| sparsity | speedup (total / denoise) | warm-up (s) | fullgraph |"
    )
    lines = [header, "|" + "---|" * 13]
    for r in results:
        if "stages" not in r:
            lines.append(f"| {r['family']} | {r['arm']} | failed: {r.get('error', '?')[:80]} |" + " |" * 10)
            continue
        s = r["stages"]
        mark = "*" if r.get("extrapolated") else ""
        steps = f"{r['steps']}" + (f" ({r['measured_steps']} measured)" if r.get("extrapolated") else "")
        sparsity = r.get("asa_stats", {}).get("sparsity")
        speedup = f"{r['speedup_total']:.1f}x / {r['speedup_denoising']:.1f}x" if "speedup_total" in r else "-"
        mem = f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") is not None else "-"
        fullgraph = r.get("speed_up", {}).get("transformer_fullgraph")
        swap = f" (swaps {s['expert_swap_s']:.2f})" if "expert_swap_s" in s else ""
        lines.append(
            f"| {r['family']} | {r['arm']} | {steps} | {r['guidance_scale']:g} | {s['text_encoding_s']:.2f} "
            f"| {s['denoising_s']:.2f}{mark}{swap} | {s['vae_decode_s']:.2f} | {s['total_s']:.2f}{mark} | {mem} "
            f"| {'-' if sparsity is None else f'{sparsity:.3f}'} | {speedup} | {r['warmup_s']:.1f} "
            f"| {'-' if fullgraph is None else fullgraph} |"
        )
    lines.append("")
    lines.append("`*` extrapolated: denoising measured over the stated number of steps, scaled linearly to 50 (expert "
                 "swaps of --offload_idle_expert, inside the denoise figure, are not scaled).")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["wan", "cogvideox", "both"], default="both")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(full_size.MODEL_DIRS),
                        help="registry models to run instead of --family (e.g. wan2.1-t2v-14b wan2.2-ti2v-5b), each "
                        "at its default video size and stock CFG")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help="comma-separated subset of " + ",".join(ARMS))
    parser.add_argument("--mask_reuse_steps", type=int, default=2,
                        help="the blade_reuse arm: sampling steps each ASA prober mask serves")
    parser.add_argument(
        "--baseline_steps",
        type=int,
        default=None,
        help="denoising steps to actually run for the baseline (default: all 50); the denoise stage is scaled to 50",
    )
    parser.add_argument("--student_steps", type=int, default=None, help="K of the student (default 8; tiny: 2)")
    parser.add_argument("--lora_rank", type=int, default=64)
    parser.add_argument("--no_compile", action="store_true", help="do not compile the transformer blocks")
    parser.add_argument("--compile_backend", default=None, help="torch.compile backend (default inductor)")
    parser.add_argument(
        "--compile_mode",
        default=None,
        help="torch.compile mode of the student arms, e.g. 'reduce-overhead' (CUDA graphs: removes per-kernel launch "
        "cost; needs --compile_scope transformer)",
    )
    parser.add_argument(
        "--compile_scope", choices=COMPILE_SCOPES, default="blocks",
        help="what one compiled graph covers: 'blocks' (regional, each transformer block) or 'transformer' (the "
        "whole denoiser step, what CUDA graphs need)",
    )
    parser.add_argument(
        "--compile_vae", action="store_true",
        help="the student arms also compile the VAE decoder (~100 s of compiling in the warm-up; H100, 2026-12-07: "
             "CogVideoX's decode 2.27 -> 1.11 s, Wan's 0.83 s with --vae_decode_chunk 5 --channels_last; "
             "BENCHMARKS.md); the baseline keeps the stock decode",
    )
    parser.add_argument("--channels_last", action="store_true", help="channels-last-3D VAE convolutions")
    parser.add_argument(
        "--postprocess_on_device", action="store_true",
        help="the student arms lay the output frames out on the GPU and copy them to the host once (the same "
        "array; blade.speed.postprocess_video_on_device) instead of diffusers' host-side strided copies; the "
        "baseline keeps the stock post-processing",
    )
    parser.add_argument(
        "--vae_decode_chunk", type=int, default=None, metavar="N",
        help="the student arms' Wan VAE decodes N latent frames per decoder call instead of one (same video; "
             "blade.speed.decode_latent_frames_in_chunks); the baseline keeps the stock decode",
    )
    parser.add_argument("--fuse_qkv", action="store_true", help="fuse the Q/K/V projections")
    parser.add_argument(
        "--offload_idle_expert", action="store_true",
        help="two-expert models (Wan2.2-A14B): keep only the expert being called on the GPU, the other in pinned host "
             "memory (blade.offload; every arm, so an 80 GB card runs the pair at 720p); swaps timed as expert_swap_s",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny random pipelines (CPU smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {ARMS}")
    if args.mask_reuse_steps < 1:
        parser.error(f"--mask_reuse_steps must be >= 1, got {args.mask_reuse_steps}")
    cudagraphs = args.compile_mode in CUDA_GRAPH_MODES
    if cudagraphs and args.compile_scope != "transformer":
        parser.error(f"--compile_mode {args.compile_mode} (CUDA graphs) needs --compile_scope transformer: regional "
                     "graphs overwrite each other's outputs under CUDA graphs")
    if cudagraphs and "blade_reuse" in args.arms and args.mask_reuse_steps > 1:
        parser.error("the blade_reuse arm (mask reuse) cannot run under CUDA graphs: drop it from --arms or the mode")
    if args.student_steps is None:
        args.student_steps = 2 if args.tiny else 8
    if args.tiny and args.baseline_steps is None:
        args.baseline_steps = 2
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # e.g. the "keep in float32" notice of `vae.to(bf16)`
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    families = args.models or (["wan", "cogvideox"] if args.family == "both" else [args.family])
    log(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"torch {torch.__version__}, families {families}, arms {args.arms}"
    )
    results: list[dict[str, Any]] = []

    def write_report(rows: list[dict[str, Any]], complete: bool) -> dict[str, Any]:
        report = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "tiny": args.tiny,
            "complete": complete,  # False: written after an arm, the run was still going (or was cut off there)
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "results": _jsonable(rows),
            "table": markdown_table(rows),
        }
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2))
        return report

    for family in families:
        try:
            results.extend(run_family(family, args, device, on_arm=lambda rows: write_report(results + rows, False)))
        except Exception as err:
            log(f"{family}: FAILED before the arms ran: {type(err).__name__}: {err}")
            traceback.print_exc()
            results.append({"arm": "all", "family": family, "error": f"{type(err).__name__}: {err}"})
            _free(device)
    report = write_report(results, True)
    print(report["table"], flush=True)
    if args.out:
        log(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
