"""The short Python API on top of a stock diffusers pipeline.

```python
from diffusers import WanPipeline
from blade.api import generate, load_blade_lora

pipe = WanPipeline.from_pretrained("./Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16).to("cuda")
config = load_blade_lora(pipe, "./blade_wan_lora")  # LoRA + 8-step student sampler + ASA, from blade_config.json
frames, info = generate(pipe, "a cat walks on the grass", seed=0, steps=8, guidance_scale=1.0,
                        num_frames=81, height=480, width=832)
```

`generate` runs the pipeline's own `__call__`; it only times the stages (text encoding, denoising, VAE decode) by
wrapping `pipe.encode_prompt`, the transformer's forward and `pipe.vae.decode` for the duration of the call.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch

from blade.config import BladeConfig
from blade.families import get_family, pipeline_experts
from blade.pipelines.loading import (
    LORA_WEIGHT_NAME_2,
    LoraMismatchError,
    expert_lora_files,
    family_of_transformer,
    load_blade_lora_weights,
    resolve_lora,
)

__all__ = ["disable_asa", "enable_asa", "generate", "load_blade_lora", "asa_handle"]

_HANDLE_ATTR = "_blade_asa_handle"
_ADAPTER_NAME = "blade"


# ----------------------------------------------------------------------------------------------------------------
# ASA
# ----------------------------------------------------------------------------------------------------------------


def _family_module(family: str):
    """`blade.models.wan` or `blade.models.cogvideox` (imported lazily: they pull in the attention kernels)."""
    return get_family(family).adapter()


def asa_handle(pipe):
    """The handle installed by `enable_asa`, or None: an `ASAHandle`, or for a two-expert pipeline (Wan2.2-A14B) a
    `PipelineASAHandle` whose `.handles` / `.experts` name both patched transformers."""
    return getattr(pipe, _HANDLE_ATTR, None)


def enable_asa(pipe, config: Any = None, dense_steps: int = 0, early_context: Any = None):
    """Patch every transformer of the pipeline with adaptive block-sparse attention (ASA) in every self-attention.

    Args:
        pipe: a `WanPipeline` (Wan2.1, Wan2.2-TI2V, or Wan2.2-A14B with `transformer` and `transformer_2`: both
            experts are patched) or a `CogVideoXPipeline` (the family is read from the transformer's class).
        config: an `ASAConfig`, a dict of its fields, or None for the default: the registry's for a recognised
            published model (`blade.families.MODELS`, pool window scaled with its default video's token count),
            else the family's.
        dense_steps: the first `dense_steps` sampling steps run dense attention (counted over the whole pipeline).
        early_context: an `EarlyContext` (or a dict of its fields): its first `steps` sampling steps run ASA with
            its `max_keep` / `pool_size` over `config` (more global context where the video is laid out); None: off.

    Returns:
        The `ASAHandle` (`.stats()`, `.reset()`, `.enabled`, `.remove()`), or for two experts a `PipelineASAHandle`
        with the same methods over both plus `.handles` (`{"transformer": ..., "transformer_2": ...}`). A previous
        handle is removed first.
    """
    from blade.models import apply_asa_pipeline

    disable_asa(pipe)
    for _, transformer in pipeline_experts(pipe):
        family_of_transformer(transformer)  # a clear TypeError for an unsupported transformer
    handle = apply_asa_pipeline(pipe, config, dense_steps=dense_steps)
    if early_context is not None:
        handle.early_context = early_context
    setattr(pipe, _HANDLE_ATTR, handle)
    return handle


def disable_asa(pipe) -> None:
    """Restore the stock attention processors (a no-op when ASA is not enabled)."""
    handle = asa_handle(pipe)
    if handle is not None:
        handle.remove()
        setattr(pipe, _HANDLE_ATTR, None)


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------


def load_blade_lora(pipe, path: str | os.PathLike, *, fuse: bool = True, asa: bool = True) -> BladeConfig | dict:
    """Load a BLADE student LoRA into `pipe` and set the pipeline up to sample as the student was trained.

    A two-expert student (Wan2.2-A14B) has one LoRA per expert in the folder: `pytorch_lora_weights.safetensors`
    for `transformer` (high noise) and `pytorch_lora_weights_transformer_2.safetensors` for `transformer_2`, both
    in the diffusers format (the second is loaded with `load_into_transformer_2=True`). The student sampler's
    anchors are then routed by the pipeline itself: anchors at t >= boundary_ratio x 1000 to `transformer`, the
    rest to `transformer_2`.

    Args:
        pipe: a `WanPipeline` (one or two experts) or `CogVideoXPipeline`.
        path: the LoRA .safetensors file or its folder (with `blade_config.json` beside it).
        fuse: fuse the LoRA into the base weights (no LoRA overhead at inference) and drop the adapter.
        asa: enable ASA with the config stored in blade_config.json when it has one (`"asa"` not null).

    Returns:
        The blade_config.json content as a `blade.config.BladeConfig` (which also reads as a mapping of the JSON
        keys, e.g. `config["k_step"]`), or `{}` when the folder has none: the stock scheduler is then kept.

    Raises:
        LoraNotFoundError, LoraError, LoraMismatchError (from `blade.pipelines.loading`); LoraError also for a
        blade_config.json that BladeConfig refuses, before any weight loads.
    """
    weights, config = resolve_lora(path)
    files = expert_lora_files(weights)
    if "transformer_2" in files and getattr(pipe, "transformer_2", None) is None:
        raise LoraMismatchError(
            f"{weights.parent} holds a LoRA for two experts (transformer, transformer_2) but {type(pipe).__name__} "
            "has one transformer: load it into a Wan2.2-A14B pipeline"
        )
    if "transformer_2" not in files and getattr(pipe, "transformer_2", None) is not None:
        warnings.warn(f"no {LORA_WEIGHT_NAME_2} beside {weights}: the LoRA goes into `transformer` only; "
                      "`transformer_2` keeps its base weights", stacklevel=2)
    trained_ratio = config.boundary_ratio if config is not None else None
    pipe_ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if trained_ratio is not None and pipe_ratio is not None and abs(float(pipe_ratio) - trained_ratio) > 1e-9:
        raise LoraMismatchError(  # before any weight loads: a different routing sends anchors to the wrong expert
            f"{weights.parent} was trained with boundary_ratio {trained_ratio} (anchors at t >= {trained_ratio} x "
            f"1000 to `transformer`), but this pipeline routes at {pipe_ratio}: load the model folder the student was "
            f"trained from, or set `pipe.register_to_config(boundary_ratio={trained_ratio})` first"
        )
    adapters = {expert: _ADAPTER_NAME if expert == "transformer" else f"{_ADAPTER_NAME}_2" for expert in files}
    for expert, file in files.items():
        load_blade_lora_weights(pipe, file, adapter_name=adapters[expert], expert=expert)
    if fuse:
        for expert, adapter in adapters.items():
            pipe.fuse_lora(components=[expert], lora_scale=1.0, adapter_names=[adapter])
        pipe.unload_lora_weights()  # keeps the fused weights, removes the LoRA layers
    if config is None:
        warnings.warn(f"no blade_config.json beside {weights}: keeping the pipeline's scheduler", stacklevel=2)
        return {}
    from blade.distill.sampler import BladeStudentScheduler

    pipe.scheduler = BladeStudentScheduler.from_blade_config(config)
    if asa and config.asa:
        early = config.early_context_config()
        enable_asa(pipe, config.asa_config(), dense_steps=config.dense_steps, early_context=early)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Generation with per-stage timings
# ----------------------------------------------------------------------------------------------------------------


class _StageClock:
    """Accumulates wall time per stage; synchronizes CUDA at every boundary so GPU work lands in its stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.marks: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds
        self.calls[stage] = self.calls.get(stage, 0) + 1

    def timed(self, stage: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = self.now()
            self.marks.setdefault(f"{stage}_first_start", start)
            try:
                return fn(*args, **kwargs)
            finally:
                end = self.now()
                self.marks[f"{stage}_last_end"] = end
                self.add(stage, end - start)

        return wrapper


@contextmanager
def _wrapped_attr(obj: Any, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace the bound method `obj.name` by `wrap(obj.name)` on the instance, restoring it exactly afterwards."""
    had_instance_attr = name in vars(obj)
    previous = vars(obj).get(name)
    object.__setattr__(obj, name, wrap(getattr(obj, name)))
    try:
        yield
    finally:
        if had_instance_attr:
            object.__setattr__(obj, name, previous)
        else:
            object.__delattr__(obj, name)


@contextmanager
def _timed_transformer(transformer: torch.nn.Module, clock: _StageClock) -> Iterator[None]:
    """Time every transformer forward with hooks (works with compiled blocks; no method replacement)."""
    starts: list[float] = []

    def pre_hook(module, args, kwargs):
        starts.append(clock.now())

    def post_hook(module, args, kwargs, output):
        clock.add("transformer", clock.now() - starts.pop())

    handles = [
        transformer.register_forward_pre_hook(pre_hook, with_kwargs=True),
        transformer.register_forward_hook(post_hook, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _timed_transformers(pipe, clock: _StageClock) -> Iterator[None]:
    """`_timed_transformer` on every denoiser of the pipeline (both experts of Wan2.2-A14B)."""
    with ExitStack() as stack:
        for _, transformer in pipeline_experts(pipe):
            stack.enter_context(_timed_transformer(transformer, clock))
        yield


def _pipeline_device(pipe) -> torch.device:
    return torch.device(getattr(pipe, "_execution_device", None) or pipe.device)


def _seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


@contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global RNG for one generation and restore it afterwards.

    Whatever draws from the global RNG during sampling (ASA's block prober when its config has no seed) then
    repeats for the same seed, without disturbing the caller's random state.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def generate(
    pipe,
    prompt: str,
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    num_frames: int,
    height: int,
    width: int,
    negative_prompt: str | None = None,
    **pipeline_kwargs: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Generate one video with the pipeline's own `__call__`, timing each stage.

    Args:
        pipe: a (possibly ASA-patched, LoRA-loaded) `WanPipeline` or `CogVideoXPipeline`.
        prompt, negative_prompt: the text prompts.
        seed: seeds the initial noise (a `torch.Generator` on the pipeline's device), the student sampler's
            re-noising draws and, for the duration of the call, torch's global RNG (ASA's prober draws from it), so
            the same seed gives the same video.
        steps, guidance_scale, num_frames, height, width: as in the pipeline (`guidance_scale <= 1`: no CFG).
        **pipeline_kwargs: passed on to the pipeline (e.g. `max_sequence_length`).

    Returns:
        `frames`: float32 `[F, H, W, 3]` in [0, 1];
        `info`: `{"timings": {"text_encoding_s", "denoising_s", "transformer_s", "vae_decode_s", "total_s"},
        "transformer_calls": int, "sparsity": float | None, "asa_stats": dict | None}`. `denoising_s` runs from
        the end of text encoding to the start of the VAE decode (transformer calls + scheduler steps).
    """
    device = _pipeline_device(pipe)
    clock = _StageClock(device)
    generator = _seeded_generator(seed, device)
    if hasattr(pipe.scheduler, "set_generator"):  # WanPipeline passes no generator to scheduler.step
        pipe.scheduler.set_generator(_seeded_generator(seed, device))
    handle = asa_handle(pipe)
    if handle is not None:
        handle.reset()

    start = clock.now()
    with (
        _seeded_global_rng(seed, device),
        _wrapped_attr(pipe, "encode_prompt", lambda fn: clock.timed("text_encoding", fn)),
        _wrapped_attr(pipe.vae, "decode", lambda fn: clock.timed("vae_decode", fn)),
        _timed_transformers(pipe, clock),
    ):
        output = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            num_frames=num_frames,
            height=height,
            width=width,
            generator=generator,
            output_type="np",
            **pipeline_kwargs,
        )
    total = clock.now() - start

    frames = np.asarray(output.frames[0], dtype=np.float32)  # [F, H, W, 3]
    encode_end = clock.marks.get("text_encoding_last_end", start)
    decode_start = clock.marks.get("vae_decode_first_start", start + total)
    timings = {
        "text_encoding_s": clock.seconds.get("text_encoding", 0.0),
        "denoising_s": max(0.0, decode_start - encode_end),
        "transformer_s": clock.seconds.get("transformer", 0.0),
        "vae_decode_s": clock.seconds.get("vae_decode", 0.0),
        "total_s": total,
    }
    info: dict[str, Any] = {
        "timings": timings,
        "transformer_calls": clock.calls.get("transformer", 0),
        "sparsity": None,
        "asa_stats": None,
    }
    if handle is not None and handle.enabled:
        stats = handle.stats()
        info["asa_stats"] = stats
        # No sparse call at all (every step dense, or a video shorter than one block): nothing was skipped.
        info["sparsity"] = float(stats["sparsity"]) if stats.get("total_blocks") else 0.0
    return frames, info
