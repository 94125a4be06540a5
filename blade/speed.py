"""Standard inference speed-ups for a diffusers video pipeline that leave what the model computes unchanged.

Everything here is a well-kept, general means (regional `torch.compile`, a lower-precision VAE, cuDNN autotuning,
channels-last 3D convolutions, fused QKV projections): none changes the math beyond floating-point rounding, and
none depends on BLADE. They are applied after `apply_asa` and after any LoRA is fused, and they keep working with
the ASA attention processors patched in.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch

from blade.families import pipeline_experts
from blade.models.common import ASAHandle, get_asa_handle

logger = logging.getLogger(__name__)

# Errors of torch.compile itself (a graph break under `fullgraph=True`, a backend that cannot lower an op ...), as
# opposed to errors of the model code, which must propagate.
try:
    from torch._dynamo.exc import TorchDynamoException as _CompileError
except ImportError:  # pragma: no cover - very old torch
    _CompileError = RuntimeError

# Dynamo recompiles a block when a guarded Python value changes (e.g. a step counter read by a patched processor);
# the default limit (8) would silently leave the blocks uncompiled after a few sampling steps.
RECOMPILE_LIMIT = 64

COMPILE_SCOPES = ("blocks", "transformer")
# torch.compile modes that capture CUDA graphs (inductor's cudagraph trees).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _compile_error_summary(err: Exception) -> tuple[str, str]:
    """(full message, one-line summary for the speed-up report) of a torch.compile error."""
    message = str(err).strip()
    return message, f"{type(err).__name__}: {message.splitlines()[0][:300] if message else ''}"


def _pipeline_device(pipe) -> torch.device:
    for name in ("transformer", "vae", "text_encoder"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            param = next(module.parameters(), None)
            if param is not None:
                return param.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------
# Regional compilation of the transformer blocks
# ----------------------------------------------------------------------------------------------------------------


def repeated_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer's repeated blocks: the classes its `_repeated_blocks` names (diffusers' own list, e.g. Wan),
    else the modules of its `transformer_blocks` / `blocks` list (e.g. CogVideoX, which has no such list)."""
    names = getattr(transformer, "_repeated_blocks", None)
    if names:
        return [m for m in transformer.modules() if m.__class__.__name__ in names]
    for attr in ("transformer_blocks", "blocks"):
        blocks = getattr(transformer, attr, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return list(blocks)
    raise ValueError(f"Cannot find the repeated blocks of {transformer.__class__.__name__}.")


def compile_transformer_blocks(transformer: torch.nn.Module, report: dict[str, Any] | None = None, **kwargs) -> dict:
    """Regional compilation: `torch.compile` each repeated transformer block (the recipe of diffusers'
    `compile_repeated_blocks`), trying `fullgraph=True` first and falling back to `fullgraph=False` on a graph
    break, and to the eager blocks if compilation fails altogether. `kwargs` go to `torch.compile` (e.g. `backend`,
    `mode`). Returns `report`, updated in place on fallback (`transformer_compile_mode`, `..._compile_errors`)."""
    report = {} if report is None else report
    blocks = repeated_blocks(transformer)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    _BlockCompiler(transformer, blocks, report, **kwargs)
    report["transformer_compiled_blocks"] = len(blocks)
    report["transformer_compile_scope"] = "blocks"
    return report


class _BlockCompiler:
    """Compile each block, trying in turn `fullgraph=True`, `fullgraph=False`, and no compile at all; move one rung
    down (for every block, recording why in `report`) when torch.compile fails.

    Whether a block compiles is only known at its first call (e.g. when the ASA processor runs data-dependent
    code), so each block's compiled callable (`nn.Module.compile` stores it in `_compiled_call_impl`) is wrapped:
    the wrapper costs one Python call on the normal path.
    """

    LADDER = ("fullgraph", "graph_breaks", "eager")

    def __init__(self, transformer, blocks: list[torch.nn.Module], report: dict[str, Any], **compile_kwargs):
        self.transformer = transformer
        self.blocks = blocks
        self.report = report
        self.compile_kwargs = compile_kwargs
        self.rung = 0
        self._apply()

    def _apply(self) -> None:
        mode = self.LADDER[self.rung]
        self.report["transformer_fullgraph"] = mode == "fullgraph"
        self.report["transformer_compile_mode"] = mode
        if mode == "eager":
            for block in self.blocks:
                block._compiled_call_impl = None  # back to the plain module call
            return
        fullgraph = mode == "fullgraph"
        if getattr(self.transformer, "_repeated_blocks", None) and hasattr(self.transformer, "compile_repeated_blocks"):
            self.transformer.compile_repeated_blocks(fullgraph=fullgraph, **self.compile_kwargs)  # diffusers' API
        else:
            for block in self.blocks:
                block.compile(fullgraph=fullgraph, **self.compile_kwargs)
        for block in self.blocks:
            block._compiled_call_impl = self._with_fallback(block, block._compiled_call_impl)

    def _with_fallback(self, block: torch.nn.Module, compiled_call):
        rung = self.rung

        def call(*args, **kwargs):
            try:
                return compiled_call(*args, **kwargs)
            except _CompileError as err:
                if self.rung != rung:  # another block already moved down; this is not a compile problem
                    raise
                message, summary = _compile_error_summary(err)
                self.report.setdefault("transformer_compile_errors", []).append(f"{self.LADDER[rung]}: {summary}")
                logger.warning("torch.compile (%s) failed, falling back: %s", self.LADDER[rung], message)
                self.rung += 1
                torch._dynamo.reset()
                self._apply()
                return block(*args, **kwargs)

        return call


# ----------------------------------------------------------------------------------------------------------------
# Whole-transformer compilation (one graph a step: what CUDA graphs need)
# ----------------------------------------------------------------------------------------------------------------


def compile_transformer_forward(transformer: torch.nn.Module, report: dict[str, Any] | None = None,
                                **kwargs) -> dict:
    """`torch.compile(transformer.forward, fullgraph=True)`: the whole denoiser step as one graph.

    Regional compilation (`compile_transformer_blocks`) cannot run under CUDA graphs (`mode="reduce-overhead"`):
    the blocks share one compiled graph, so one block's replay overwrites the output another still reads
    (BENCHMARKS.md, third end-to-end run). One graph per step has no such sharing. `forward` is compiled, not the
    module call, so forward hooks (the ASA step tracker, which reads the timestep on the host) stay eager outside
    the graph. Under `mode="reduce-overhead"` each call starts a new CUDA-graph step and copies out what the graph
    returns and what it leaves on the ASA module (its stats tensors), because the next replay (CFG's second call,
    the next step) reuses that memory.

    If the first call fails to compile, `forward` is restored and the blocks are compiled regionally instead
    (`transformer_compile_scope` in `report` says which one runs, `transformer_compile_errors` why).
    """
    report = {} if report is None else report
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, RECOMPILE_LIMIT)
    eager_forward = transformer.forward  # the bound method (an instance attribute would shadow it below)
    compiled = torch.compile(eager_forward, fullgraph=True, **kwargs)
    cudagraphs = kwargs.get("mode") in CUDA_GRAPH_MODES
    state = {"fallen_back": False}

    def forward(*args, **fkwargs):
        if state["fallen_back"]:
            return eager_forward(*args, **fkwargs)
        handle = get_asa_handle(transformer) if cudagraphs else None
        if handle is not None and handle.removed:
            handle = None
        if cudagraphs:
            _refuse_mask_reuse(handle)
            _refuse_seeded_prober(handle)
            torch.compiler.cudagraph_mark_step_begin()
        try:
            out = compiled(*args, **fkwargs)
        except _CompileError as err:
            message, summary = _compile_error_summary(err)
            report.setdefault("transformer_compile_errors", []).append(f"transformer: {summary}")
            logger.warning("torch.compile of the whole transformer failed, compiling its blocks: %s", message)
            state["fallen_back"] = True
            del transformer.forward  # back to the class's forward
            torch._dynamo.reset()
            report["transformer_compile_scope"] = "blocks"
            compile_transformer_blocks(transformer, report, **kwargs)
            return transformer.forward(*args, **fkwargs)
        if cudagraphs:
            out = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, out)
            _copy_asa_stats_out_of_graph(handle)
        return out

    transformer.forward = forward
    report.update(transformer_compile_scope="transformer", transformer_fullgraph=True,
                  transformer_compile_mode="fullgraph", transformer_compiled_blocks=0)
    return report


def _refuse_mask_reuse(handle: ASAHandle | None) -> None:
    """Mask reuse keeps its masks and slot counter in Python, inside an opaque op; a CUDA-graph replay runs the
    recorded kernels without that Python, so it would silently serve the recorded call's masks."""
    if handle is not None and handle.mask_reuse_steps > 1:
        raise ValueError(
            "mask_reuse_steps > 1 cannot run under CUDA graphs (compile mode 'reduce-overhead'): set "
            "mask_reuse_steps = 1 or compile without CUDA graphs"
        )


def _refuse_seeded_prober(handle: ASAHandle | None) -> None:
    """A seeded prober (``ASAConfig.seed``) draws from private per-device generators; CUDA-graph capture can only
    follow the default generator (the first GPU run, 2026-12-06: "Attempt to increase offset for a CUDA generator
    not in capture mode"). The global RNG is captured graph-safely: each replay draws fresh positions, and
    ``torch.manual_seed`` (which ``api.generate`` calls per video) makes a run repeat."""
    if handle is not None and handle.enabled and handle.config.seed is not None:
        raise ValueError(
            f"a seeded ASA prober (ASAConfig.seed={handle.config.seed}) cannot run under CUDA graphs (compile mode "
            "'reduce-overhead'): its private generator cannot be captured. Use seed=None (the global RNG, seeded per "
            "video by blade.api.generate) or compile without CUDA graphs"
        )


def _copy_asa_stats_out_of_graph(handle: ASAHandle | None) -> None:
    """Clone the ASA module's stats tensors (written inside the graph) so that a CUDA-graph replay cannot
    overwrite them; no-op without ASA."""
    if handle is None:
        return
    asa = handle.asa
    for name in ("_sums", "_last"):
        value = getattr(asa, name, None)
        if torch.is_tensor(value):
            setattr(asa, name, value.clone())


# ----------------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------------


def cast_latents_on_decode(vae: torch.nn.Module) -> None:
    """Make `vae.decode` cast its input latents to the VAE's dtype.

    `WanPipeline` already casts the latents to `vae.dtype` before decoding; `CogVideoXPipeline.decode_latents` does
    not (it passes the transformer-dtype latents), so a VAE in another dtype than the transformer needs this.
    """
    if getattr(vae, "_blade_casts_latents", False):
        return
    decode = vae.decode

    def decode_in_vae_dtype(z: torch.Tensor, *args, **kwargs):
        return decode(z.to(vae.dtype), *args, **kwargs)

    vae.decode = decode_in_vae_dtype
    vae._blade_casts_latents = True


def postprocess_video_on_device(pipe) -> bool:
    """Make the pipeline's ``output_type="np"`` post-processing lay the frames out on the video's device.

    diffusers' `VideoProcessor.postprocess_video` copies the decoded video ``[B, C, F, H, W]`` to the host frame
    batch by frame batch as a permuted (strided) view, converts it to float32 there and stacks the batches with
    NumPy: host-side strided copies of the whole video (0.32-0.35 s of an 81x480x832 Wan video on an H100 host,
    BENCHMARKS.md). Here the same steps run on the video's device (denormalise in the video's dtype, as diffusers
    does, then float32, then ``[B, F, H, W, C]`` contiguous) and one contiguous copy reaches the host: the same array,
    value for value. Other output types keep the stock path. Returns False when the pipeline has no video processor.

    From a CUDA video the copy lands in page-locked host memory (``torch.empty(..., pin_memory=True)``): a copy into
    freshly allocated pageable memory pays the page faults of ~390 MB and the driver's staging (0.22-0.25 s of the
    0.32 s above on an H100; 0.01 s with this copy, BENCHMARKS.md "Wan2.1-1.3B at 21x"), while PyTorch's caching
    host allocator hands a freed pinned block back to the next call, so a session's later videos copy at full bus
    speed (the first pays the allocation). The array owns its block (it keeps the tensor alive): a block is reused
    only after the caller has let go of the array. The cost: that much pinned host memory stays cached by the
    process (``torch.cuda.host_memory_stats()`` shows it).
    """
    processor = getattr(pipe, "video_processor", None)
    if processor is None:
        return False
    stock = getattr(processor, "_blade_stock_postprocess_video", None) or processor.postprocess_video
    processor._blade_stock_postprocess_video = stock

    def postprocess_video(video: torch.Tensor, output_type: str = "np", **kwargs):
        if output_type != "np" or kwargs:
            return stock(video, output_type, **kwargs)
        if processor.config.do_normalize:
            video = processor.denormalize(video)
        frames = video.float().permute(0, 2, 3, 4, 1).contiguous()  # [B, F, H, W, C]
        if frames.device.type != "cuda":
            return frames.cpu().numpy()
        host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
        host.copy_(frames)  # synchronous: the array is complete when it is returned
        return host.numpy()

    processor.postprocess_video = postprocess_video
    return True


@torch.no_grad()
def conv3d_channels_last_(module: torch.nn.Module) -> int:
    """Store the weights of every `nn.Conv3d` in `module` channels-last-3D (NDHWC), so cuDNN picks its NDHWC kernels.
    Only the layout changes; returns the number of convolutions converted. (`module.to(memory_format=...)` would
    also try to convert other 4D/5D parameters, e.g. the Wan VAE's RMS-norm gains, and fail.)"""
    convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv3d)]
    for conv in convs:
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return len(convs)


def decode_latent_frames_in_chunks(vae: torch.nn.Module, latent_frames: int) -> None:
    """Make a Wan VAE (`AutoencoderKLWan`, Wan2.1 and Wan2.2 layouts) decode `latent_frames` latent frames per
    decoder call instead of one.

    The stock `_decode` runs the causal decoder once per latent frame (21 calls for an 81-frame video), each on a
    slab one latent frame deep, carrying the last two frames of every causal convolution's input in a feature cache.
    The decoder's operations are causal in time (convolutions padded on the past side with the cache, the temporal
    upsampler's convolution likewise) or per frame (norms, spatial convolutions and attention), so decoding several
    latent frames per call computes the same video, only in fewer, larger kernels. The first latent frame is still
    decoded alone (`first_chunk`: the temporal upsamplers emit one frame for it, not two). A VAE with tiling enabled
    keeps the stock decode. Call again to change the chunk; `latent_frames=1` is the stock order of calls.
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan, unpatchify
    from diffusers.models.autoencoders.vae import DecoderOutput

    if not isinstance(vae, AutoencoderKLWan):
        raise ValueError(f"chunked decoding is for Wan's causal VAE (AutoencoderKLWan), not {type(vae).__name__}")
    if latent_frames < 1:
        raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
    stock = getattr(vae, "_blade_stock_decode", None) or vae._decode
    vae._blade_stock_decode = stock

    def _decode(z: torch.Tensor, return_dict: bool = True):
        """`z`: latents [B, C, T, H, W] -> video [B, 3, 1 + 4 (T - 1), 8 H, 8 W] (Wan2.2: x16 spatially)."""
        if vae.use_tiling:
            return stock(z, return_dict=return_dict)
        num_frames = z.shape[2]
        vae.clear_cache()
        x = vae.post_quant_conv(z)
        chunks = [(0, 1)] + [(start, min(start + latent_frames, num_frames)) for start in range(1, num_frames,
                                                                                                  latent_frames)]
        outs = []
        for start, stop in chunks:
            vae._conv_idx = [0]
            outs.append(vae.decoder(x[:, :, start:stop], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                    first_chunk=start == 0))
        out = torch.cat(outs, 2)
        if vae.config.patch_size is not None:
            out = unpatchify(out, patch_size=vae.config.patch_size)
        out = torch.clamp(out, min=-1.0, max=1.0)
        vae.clear_cache()
        return DecoderOutput(sample=out) if return_dict else (out,)

    vae._decode = _decode


# diffusers' own marker, kept: the stock forward (e.g. an encoder call between decodes) reads the same cache list.
_FIRST_CHUNK_SEEN = "Rep"


def _temporal_upsample_forward(self, x: torch.Tensor, feat_cache=None, feat_idx=[0]) -> torch.Tensor:  # noqa: B006
    """`WanResample.forward` for the decoder's temporal upsamplers (mode "upsample3d" with a feature cache), with
    the cache's first-chunk marker told apart by type instead of diffusers' ``cache == "Rep"`` test, which compares a
    tensor with a string once the cache holds frames: torch 2.11's dynamo breaks the graph there, torch 2.13's does
    not (BENCHMARKS.md, "Compiling the VAE decoders"). Same computation: the first chunk's frames are not doubled in
    time, the second chunk's temporal convolution sees zeros as its past, later ones the cached frames.
    ``x``: [B, C, T, H, W] -> [B, C', T', 2 H, 2 W] with T' = T on the first chunk, else 2 T."""
    if self.mode != "upsample3d" or feat_cache is None:
        return type(self).forward(self, x, feat_cache, feat_idx)
    b, c, t, h, w = x.shape
    idx = feat_idx[0]
    past = feat_cache[idx]
    feat_idx[0] += 1
    if past is None:  # the first chunk: mark it, no temporal doubling
        feat_cache[idx] = _FIRST_CHUNK_SEEN
    else:
        no_past_yet = isinstance(past, str)  # the chunk right after the first one
        keep = x[:, :, -2:].clone()  # the causal convolution's past for the next chunk: two frames
        if keep.shape[2] < 2:
            previous = torch.zeros_like(keep) if no_past_yet else past[:, :, -1:].to(keep.device)
            keep = torch.cat([previous, keep], dim=2)
        x = self.time_conv(x) if no_past_yet else self.time_conv(x, past)
        feat_cache[idx] = keep
        x = x.reshape(b, 2, c, t, h, w)
        x = torch.stack((x[:, 0], x[:, 1]), 3).reshape(b, c, t * 2, h, w)  # interleave the two output frames
    t = x.shape[2]
    x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # spatial 2x, frame by frame
    return x.view(b, t, x.size(1), x.size(2), x.size(3)).permute(0, 2, 1, 3, 4)


def make_wan_decoder_traceable(vae: torch.nn.Module) -> int:
    """Give a Wan VAE's temporal upsamplers `_temporal_upsample_forward` (same video; no tensor-to-string test for
    dynamo to break on), so `torch.compile` traces the whole decoder on torch 2.11 as on 2.13. Returns how many
    upsamplers were patched; other VAEs are left alone (0)."""
    try:
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample
    except ImportError:
        return 0
    patched = 0
    for module in getattr(vae, "decoder", torch.nn.Module()).modules():
        if isinstance(module, WanResample) and module.mode == "upsample3d":
            module.forward = types.MethodType(_temporal_upsample_forward, module)
            patched += 1
    return patched


def compile_vae_decoder(vae: torch.nn.Module, **kwargs) -> int:
    """`torch.compile` the VAE decoder module; returns how many Wan temporal upsamplers were made traceable first.

    The causal VAEs decode in pieces (Wan: a latent frame or `decode_latent_frames_in_chunks` frames a call;
    CogVideoX: batches of two latent frames) with a feature cache, and dynamo specialises on the cache's state: three
    graphs, reused afterwards, without graph breaks (`tests/test_speed.py`). Wan's decoder gets
    `make_wan_decoder_traceable` first: unpatched, torch 2.11's dynamo breaks its graph on diffusers' `cache == "Rep"`
    test of a tensor and compiles the causal convolution once per channel count (27 graphs on a small 4-level VAE,
    CPU; on an H100 still compiling after 150 s), with it 3 graphs on torch 2.11 as on 2.13. On an H100, after
    ~100 s of compiling, CogVideoX's decoder is 2.09x faster and Wan's (5 latent frames a call) decodes in 0.83 s
    against 1.61 s (BENCHMARKS.md, "Compiling the VAE decoders").
    ``kwargs``: `torch.compile` arguments (e.g. ``backend="aot_eager"`` in tests)."""
    patched = make_wan_decoder_traceable(vae)
    vae.decoder.compile(**kwargs)
    return patched


# ----------------------------------------------------------------------------------------------------------------
# Fused projections
# ----------------------------------------------------------------------------------------------------------------


def fuse_qkv_projections(transformer: torch.nn.Module) -> str:
    """Fuse the Q/K/V projections (one matmul instead of three). Returns what was done.

    Wan's attention modules fuse in place and its processors (stock or ASA, a subclass) read the fused weights.
    CogVideoX's model-level fusion swaps in `FusedCogVideoXAttnProcessor2_0`, which would silently drop patched
    (ASA) processors, so it is only used when every processor is the stock one.
    """
    attention_modules = [m for m in transformer.modules() if hasattr(m, "fuse_projections") and hasattr(m, "to_q")]
    processors = getattr(transformer, "attn_processors", {})
    if processors and all(type(p).__module__.startswith("diffusers.") for p in processors.values()):
        if hasattr(transformer, "fuse_qkv_projections"):
            transformer.fuse_qkv_projections()
            return "fused (diffusers fuse_qkv_projections)"
    if transformer.__class__.__name__.startswith("Wan"):
        for module in attention_modules:
            module.fuse_projections()
        return f"fused in {len(attention_modules)} attention modules"
    return "skipped: patched processors do not read fused projections for this model"


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def speed_up_pipeline(
    pipe,
    *,
    compile_transformer: bool = False,
    vae_dtype: torch.dtype | None = None,
    compile_vae: bool = False,
    channels_last: bool = False,
    cudnn_benchmark: bool = True,
    fuse_qkv: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
    compile_scope: str = "blocks",
    vae_decode_chunk: int | None = None,
    postprocess_on_device: bool = False,
) -> dict[str, Any]:
    """Apply standard speed-ups to a Wan / CogVideoX pipeline in place; returns a dict of what was enabled. The
    transformer speed-ups apply to every denoiser (``transformer_2`` of a two-expert pipeline reports under its name).

    Args:
        compile_transformer: regional `torch.compile` of the repeated transformer blocks (fullgraph if possible;
            the returned dict's `transformer_fullgraph` turns False, with the reason, if a graph break forced the
            fallback at the first call).
        vae_dtype: run the VAE in this dtype (e.g. bf16); the latents are cast to it before decoding.
        compile_vae: `torch.compile` the VAE decoder (experimental: see `compile_vae_decoder`).
        channels_last: channels-last-3D memory format for the VAE's 5D convolution weights (cuDNN NDHWC kernels).
        cudnn_benchmark: let cuDNN autotune convolution algorithms (CUDA only; a no-op elsewhere).
        fuse_qkv: fuse the self-attention Q/K/V projections.
        compile_kwargs: extra `torch.compile` arguments (e.g. `{"backend": "aot_eager"}` in tests).
        compile_scope: "blocks" (regional, the default) or "transformer" (the whole forward as one graph, which
            CUDA graphs, `compile_kwargs={"mode": "reduce-overhead"}`, need; see `compile_transformer_forward`).
        vae_decode_chunk: Wan's VAE decodes this many latent frames per decoder call instead of one (same video;
            see `decode_latent_frames_in_chunks`); None keeps the stock decode.
        postprocess_on_device: ``output_type="np"`` frames laid out on the GPU and copied once (same array; see
            `postprocess_video_on_device`).
    """
    if compile_scope not in COMPILE_SCOPES:
        raise ValueError(f"compile_scope must be one of {COMPILE_SCOPES}, got {compile_scope!r}")
    report: dict[str, Any] = {}
    compile_kwargs = compile_kwargs or {}
    on_cuda = _pipeline_device(pipe).type == "cuda"

    if cudnn_benchmark and on_cuda:
        torch.backends.cudnn.benchmark = True
    report["cudnn_benchmark"] = bool(cudnn_benchmark and on_cuda)

    vae = getattr(pipe, "vae", None)
    if vae is not None and vae_dtype is not None:
        vae.to(dtype=vae_dtype)
        cast_latents_on_decode(vae)
    report["vae_dtype"] = str(vae.dtype).replace("torch.", "") if vae is not None else None

    if vae is not None and channels_last:
        conv3d_channels_last_(vae)
    report["vae_channels_last"] = bool(vae is not None and channels_last)

    if vae is not None and vae_decode_chunk is not None:
        decode_latent_frames_in_chunks(vae, vae_decode_chunk)
    report["vae_decode_chunk"] = vae_decode_chunk if vae is not None else None

    # Every denoiser: a two-expert pipeline (Wan2.2-A14B) runs `transformer_2` for its low-noise steps. The first
    # expert reports at the top level (as for one denoiser), each further one in its own sub-report.
    (_, first), *others = pipeline_experts(pipe)
    if fuse_qkv:
        report["fuse_qkv"] = fuse_qkv_projections(first)
        for name, transformer in others:
            report.setdefault(name, {})["fuse_qkv"] = fuse_qkv_projections(transformer)

    if compile_transformer:
        compile_fn = compile_transformer_forward if compile_scope == "transformer" else compile_transformer_blocks
        compile_fn(first, report, **compile_kwargs)
        for name, transformer in others:
            compile_fn(transformer, report.setdefault(name, {}), **compile_kwargs)
    else:
        report["transformer_fullgraph"] = None
    report["compile_transformer"] = bool(compile_transformer)

    if vae is not None and compile_vae:
        compile_vae_decoder(vae, **compile_kwargs)
    report["compile_vae"] = bool(vae is not None and compile_vae)
    report["postprocess_on_device"] = bool(postprocess_on_device and postprocess_video_on_device(pipe))
    return report
