"""Speed-ups that must not change what the pipeline computes (CPU), and the end-to-end benchmark's smoke run."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from blade.speed import compile_transformer_blocks, repeated_blocks, speed_up_pipeline
from blade.testing.tiny import build_tiny_cogvideox_pipeline, build_tiny_wan_pipeline, tiny_wan_transformer

ROOT = Path(__file__).resolve().parents[1]


def _video(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a red ball rolls left", height=32, width=32, num_frames=9, num_inference_steps=2,
                guidance_scale=5.0, output_type="np", generator=torch.Generator().manual_seed(0))  # fmt: skip
    args.update(kwargs)
    return pipe(**args).frames


def _benchmark_module():
    if "end_to_end" not in sys.modules:  # dataclasses need their module registered
        spec = importlib.util.spec_from_file_location("end_to_end", ROOT / "benchmarks" / "end_to_end.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["end_to_end"] = module
        spec.loader.exec_module(module)
    return sys.modules["end_to_end"]


def _transformer_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 4, 4, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    return dict(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)


@pytest.mark.parametrize("builder", [build_tiny_wan_pipeline, build_tiny_cogvideox_pipeline])
def test_bf16_vae_and_channels_last_keep_the_output(builder):
    small = dict(height=16, width=16, num_frames=5, num_inference_steps=1)
    reference = _video(builder(seed=0), **small)
    pipe = builder(seed=0)
    report = speed_up_pipeline(pipe, vae_dtype=torch.bfloat16, channels_last=True)
    assert pipe.vae.dtype == torch.bfloat16 and report["vae_dtype"] == "bfloat16"
    assert report["cudnn_benchmark"] is False  # CPU: a no-op
    assert report["compile_transformer"] is False and report["vae_channels_last"] is True
    video = _video(pipe, **small)
    assert video.shape == reference.shape and np.isfinite(video).all()
    # bf16 has an 8-bit mantissa (~0.4% rounding per op); pixels live in [0, 1]. The tiny Wan VAE normalises over
    # 3 channels, which amplifies rounding at a few pixels, so compare the mean error (max is ~0.2 there).
    other_seed = _video(builder(seed=0), generator=torch.Generator().manual_seed(1), **small)
    error = np.abs(video - reference).mean()
    assert 0 < error < 1e-2  # > 0: the VAE really ran in bf16
    assert error < 0.25 * np.abs(other_seed - reference).mean()  # still the same video


def test_cogvideox_decode_needs_and_gets_the_latent_cast():
    # CogVideoXPipeline hands transformer-dtype latents to the VAE: without the cast a bf16 VAE fails on fp32 latents
    pipe = build_tiny_cogvideox_pipeline(seed=0)
    pipe.vae.to(torch.bfloat16)
    with pytest.raises(RuntimeError):
        _video(pipe, num_inference_steps=1)


def _decode_eager_then_compiled(vae: torch.nn.Module, z: torch.Tensor, **compile_kwargs):
    """Decode `z` eagerly, then compile `vae`'s decoder (`compile_vae_decoder`) and decode it twice, asserting the
    compiled decoder made exactly three graphs and no graph break. Returns (eager, first compiled, second compiled,
    Wan temporal upsamplers made traceable)."""
    from torch._dynamo.utils import counters

    from blade.speed import compile_vae_decoder

    with torch.no_grad():
        reference = vae.decode(z).sample
    torch._dynamo.reset()
    counters.clear()
    try:
        patched = compile_vae_decoder(vae, **compile_kwargs)
        with torch.no_grad():
            first, second = vae.decode(z).sample, vae.decode(z).sample
        assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]
    finally:
        torch._dynamo.reset()
    return reference, first, second, patched


def _assert_compiled_decoder_makes_three_graphs(vae: torch.nn.Module, z: torch.Tensor) -> None:
    """Compile `vae`'s decoder (eager backend) and decode `z` twice: exactly three graphs, no graph break, and both
    decodes equal to the uncompiled decode."""
    reference, first, second, _ = _decode_eager_then_compiled(vae, z, backend="eager")
    torch.testing.assert_close(first, reference, rtol=0, atol=0)
    torch.testing.assert_close(second, reference, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 3])
def test_compiled_wan_decoder_makes_three_graphs_not_one_per_frame(chunk):
    """The causal Wan decoder runs once per latent frame (or `chunk` frames) with a feature cache: compiled, dynamo
    specialises on the cache's state (empty at the first call, one cached frame at the second, two from then on),
    i.e. three graphs, reused by later calls and later decodes, without graph breaks, with the eager output, on
    every supported torch (`compile_vae_decoder` makes the temporal upsamplers traceable first; unpatched, torch
    2.11 breaks on diffusers' `cache == "Rep"` test and recompiles the causal convolution per channel count: 27
    graphs). The VAE has a different channel count per level: the tests' tiny VAE, one count everywhere, would hide
    the recompiles."""
    from diffusers import AutoencoderKLWan

    from blade.speed import decode_latent_frames_in_chunks

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()  # fmt: skip
    decode_latent_frames_in_chunks(vae, chunk)
    z = torch.randn(1, vae.config.z_dim, 7, 4, 4, generator=torch.Generator().manual_seed(0))
    _assert_compiled_decoder_makes_three_graphs(vae, z)


def test_compiled_cogvideox_decoder_makes_three_graphs_on_every_torch():
    """CogVideoX's decoder runs on batches of two latent frames (the last batch takes the odd one) with a
    convolution cache: compiled, dynamo makes one graph for the first batch (empty cache), one for the middle
    batches and one for the last, reused by a second decode, without graph breaks and with the eager output, on
    torch 2.11 as on 2.13."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4,
                                 norm_num_groups=8, temporal_compression_ratio=4).eval()  # fmt: skip
    z = torch.randn(1, 4, 13, 4, 4, generator=torch.Generator().manual_seed(0))  # [B, C, T, H, W], 13 as at 49 frames
    _assert_compiled_decoder_makes_three_graphs(vae, z)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_gpu_compiled_decoder_matches_eager_bf16(family):
    """What `--compile_vae` runs on a GPU: inductor (the default backend, Triton kernels) compiles the decoder in
    bf16 into three graphs without breaks (Wan: made traceable first, decoding 3 latent frames a call, channels-last,
    as the end-to-end settings), and the decode stays within bf16 rounding of the eager one (full-size timings in
    BENCHMARKS.md)."""
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

    from blade.speed import conv3d_channels_last_, decode_latent_frames_in_chunks

    torch.manual_seed(0)
    if family == "wan":
        vae = AutoencoderKLWan(base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                               temperal_downsample=[False, True, True])  # fmt: skip
        z_channels, frames = 16, 7  # 1 + 4 x 6 = 25 video frames
    else:
        vae = AutoencoderKLCogVideoX(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4,
                                     norm_num_groups=8, temporal_compression_ratio=4)  # fmt: skip
        z_channels, frames = 4, 13  # 49 video frames
    vae = vae.to("cuda", torch.bfloat16).eval()
    if family == "wan":
        decode_latent_frames_in_chunks(vae, 3)
        conv3d_channels_last_(vae)
    z = torch.randn(1, z_channels, frames, 16, 16, generator=torch.Generator().manual_seed(0))
    z = z.to("cuda", torch.bfloat16)
    reference, _, compiled, patched = _decode_eager_then_compiled(vae, z)  # inductor: compile_vae_decoder's default
    assert patched == (2 if family == "wan" else 0)  # Wan's temporal upsamplers made traceable
    reference, compiled = reference.float(), compiled.float()
    assert compiled.shape == reference.shape == (1, 3, 1 + 4 * (frames - 1), 128, 128)
    error = (compiled - reference).abs().max().item()
    assert error <= 0.05 * reference.abs().max().item(), error  # bf16 rounding of fused kernels, not a wrong video


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_postprocess_on_device_returns_the_stock_array(family):
    """`postprocess_video_on_device`: with output_type "np" the pipeline returns the array diffusers' host-side
    post-processing returns, value for value (a bf16 video denormalised in bf16, as diffusers does, then float32),
    shape [B, F, H, W, 3]; other output types keep the stock path."""
    from blade.speed import postprocess_video_on_device

    build = build_tiny_wan_pipeline if family == "wan" else build_tiny_cogvideox_pipeline
    processor = build(seed=0).video_processor
    video = torch.randn(2, 3, 5, 8, 12, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 1.3
    stock_np = processor.postprocess_video(video, output_type="np")
    stock_pt = processor.postprocess_video(video, output_type="pt")
    pipe = types.SimpleNamespace(video_processor=processor)
    assert postprocess_video_on_device(pipe) and postprocess_video_on_device(pipe)  # twice: still one stock path
    def host_path(*args, **kwargs):
        raise AssertionError("the np output went through diffusers' per-batch host post-processing")

    processor.postprocess = host_path  # the stock np path calls it per batch; the device path must not
    fast = processor.postprocess_video(video, output_type="np")
    del processor.postprocess
    assert fast.dtype == stock_np.dtype == np.float32 and fast.shape == stock_np.shape == (2, 5, 8, 12, 3)
    np.testing.assert_array_equal(fast, stock_np)
    assert fast.min() >= 0 and fast.max() <= 1 and (fast == 1).any()  # the clamp was exercised
    assert torch.equal(processor.postprocess_video(video, output_type="pt"), stock_pt)
    assert not postprocess_video_on_device(types.SimpleNamespace())


@pytest.mark.gpu
def test_gpu_postprocess_on_device_copies_into_pinned_memory_and_keeps_each_array():
    """On a GPU the frames reach the host through page-locked memory: the stock array value for value, and a second
    video while the first array is still held gets its own block (the first array unchanged); once the first is
    released, its block may serve again (the caching host allocator), still with the new video's values."""
    from blade.speed import postprocess_video_on_device

    processor = build_tiny_wan_pipeline(seed=0).video_processor
    videos = [torch.randn(1, 3, 9, 64, 96, generator=torch.Generator().manual_seed(k)).to("cuda", torch.bfloat16)
              for k in range(3)]  # fmt: skip
    stock = [processor.postprocess_video(v, output_type="np") for v in videos]
    postprocess_video_on_device(types.SimpleNamespace(video_processor=processor))
    first = processor.postprocess_video(videos[0], output_type="np")
    np.testing.assert_array_equal(first, stock[0])
    second = processor.postprocess_video(videos[1], output_type="np")
    np.testing.assert_array_equal(second, stock[1])
    np.testing.assert_array_equal(first, stock[0])  # not overwritten by the second video
    assert not np.shares_memory(first, second)
    del first
    third = processor.postprocess_video(videos[2], output_type="np")
    np.testing.assert_array_equal(third, stock[2])
    np.testing.assert_array_equal(second, stock[1])


@pytest.mark.parametrize("layout", ["wan2.1", "wan2.2"])
def test_traceable_wan_upsamplers_keep_the_video(layout):
    """`make_wan_decoder_traceable` swaps the temporal upsamplers' forward (first-chunk marker tested by type, not
    by comparing a tensor with "Rep"): float64 video equal to the stock decode's, frame by frame and in chunks of 3
    latent frames, for both Wan VAE layouts; exactly the decoder's "upsample3d" resamplers are patched, a CogVideoX
    VAE is left alone."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    from blade.speed import decode_latent_frames_in_chunks, make_wan_decoder_traceable
    from blade.testing.tiny import tiny_wan22_vae

    vae = (build_tiny_wan_pipeline(seed=0).vae if layout == "wan2.1" else tiny_wan22_vae(seed=0)).double().eval()
    z = torch.randn(1, vae.config.z_dim, 7, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    temporal = [m for m in vae.decoder.modules() if isinstance(m, WanResample) and m.mode == "upsample3d"]
    references = {}
    for chunk in (1, 3):
        decode_latent_frames_in_chunks(vae, chunk)
        with torch.no_grad():
            references[chunk] = vae.decode(z).sample
    assert temporal and make_wan_decoder_traceable(vae) == len(temporal)
    assert all("forward" in vars(m) for m in temporal)  # the instances' own forward, the class untouched
    for chunk in (1, 3):
        decode_latent_frames_in_chunks(vae, chunk)
        with torch.no_grad():
            torch.testing.assert_close(vae.decode(z).sample, references[chunk], rtol=0, atol=0)
    assert make_wan_decoder_traceable(build_tiny_cogvideox_pipeline(seed=0).vae) == 0


@pytest.mark.parametrize("layout", ["wan2.1", "wan2.2"])
def test_chunked_wan_decode_equals_the_stock_decode(layout):
    """Decoding N latent frames per decoder call computes the stock frame-by-frame video (float64: equal to rounding),
    with 1 + ceil((T - 1) / N) decoder calls instead of T; N = 1 is the stock order of calls."""
    from blade.speed import decode_latent_frames_in_chunks
    from blade.testing.tiny import tiny_wan22_vae

    vae = (build_tiny_wan_pipeline(seed=0).vae if layout == "wan2.1" else tiny_wan22_vae(seed=0)).double().eval()
    z = torch.randn(1, vae.config.z_dim, 7, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        reference = vae.decode(z).sample  # 1 + 4 x 6 = 25 frames
    calls = []
    hook = vae.decoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[2]))
    try:
        for chunk in (1, 2, 4, 6, 16):
            calls.clear()
            decode_latent_frames_in_chunks(vae, chunk)
            with torch.no_grad():
                out = vae.decode(z).sample
            torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
            expected = [1] + [min(chunk, 6 - start) for start in range(0, 6, chunk)]
            assert calls == expected, (chunk, calls)
    finally:
        hook.remove()
    assert out.shape == reference.shape and reference.shape[2] == 25


def test_chunked_decode_refuses_what_it_cannot_serve():
    from blade.speed import decode_latent_frames_in_chunks

    with pytest.raises(ValueError, match="AutoencoderKLWan"):
        decode_latent_frames_in_chunks(build_tiny_cogvideox_pipeline(seed=0).vae, 4)
    with pytest.raises(ValueError, match=">= 1"):
        decode_latent_frames_in_chunks(build_tiny_wan_pipeline(seed=0).vae, 0)


def test_vae_decode_benchmark_tiny_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("vae_decode_bench", ROOT / "benchmarks" / "vae_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "vae.json"
    module.main(["--tiny", "--chunks", "3", "--repeats", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [r["chunk"] for r in rows] == [1, 3] and rows[1]["video_frames"] == 21
    assert rows[1]["max_abs_diff_vs_stock"] < 1e-5 and rows[0]["speedup_vs_stock"] == 1.0


def test_compiled_blocks_match_eager_aot_eager_backend():
    model = tiny_wan_transformer(seed=0)
    inputs = _transformer_inputs()
    with torch.no_grad():
        reference = model(**inputs)[0]
        report = compile_transformer_blocks(model, backend="aot_eager")
        out = model(**inputs)[0]
    assert report["transformer_fullgraph"] is True and report["transformer_compiled_blocks"] == 2
    assert all(block._compiled_call_impl is not None for block in repeated_blocks(model))
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_blocks_match_eager_inductor():
    model = tiny_wan_transformer(seed=0)
    inputs = _transformer_inputs()
    pipe = type("P", (), {"transformer": model, "vae": None})()
    with torch.no_grad():
        reference = model(**inputs)[0]
        report = speed_up_pipeline(pipe, compile_transformer=True)
        out = model(**inputs)[0]
    assert report["transformer_fullgraph"] is True
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=0)
    torch._dynamo.reset()


class _GraphBreakingProcessor(WanAttnProcessor):
    """The stock processor plus a deliberate graph break (as data-dependent Python code would cause)."""

    def __call__(self, *args, **kwargs):
        torch._dynamo.graph_break()
        return super().__call__(*args, **kwargs)


def test_graph_break_falls_back_to_non_fullgraph_and_reports_it():
    model = tiny_wan_transformer(seed=0)
    for block in model.blocks:
        block.attn1.set_processor(_GraphBreakingProcessor())
    inputs = _transformer_inputs(1)
    with torch.no_grad():
        reference = model(**inputs)[0]
        report = compile_transformer_blocks(model, backend="eager")
        assert report["transformer_fullgraph"] is True  # decided at the first call, not before
        out = model(**inputs)[0]
        again = model(**inputs)[0]
    assert report["transformer_fullgraph"] is False and report["transformer_compile_mode"] == "graph_breaks"
    assert len(report["transformer_compile_errors"]) == 1
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, reference, atol=1e-5, rtol=0)
    torch._dynamo.reset()


def test_whole_transformer_compile_falls_back_to_regional_on_a_graph_break():
    """compile_scope="transformer" needs one fullgraph graph; a graph break at the first call restores the eager
    forward and compiles the blocks regionally (which then fall back to graph breaks), reporting both."""
    model = tiny_wan_transformer(seed=0)
    for block in model.blocks:
        block.attn1.set_processor(_GraphBreakingProcessor())
    inputs = _transformer_inputs(1)
    pipe = type("P", (), {"transformer": model, "vae": None})()
    with torch.no_grad():
        reference = model(**inputs)[0]
        report = speed_up_pipeline(pipe, compile_transformer=True, compile_scope="transformer",
                                   compile_kwargs={"backend": "eager"})  # fmt: skip
        assert report["transformer_compile_scope"] == "transformer"
        out = model(**inputs)[0]
        again = model(**inputs)[0]
    assert report["transformer_compile_scope"] == "blocks" and "forward" not in vars(model)
    assert report["transformer_compile_errors"][0].startswith("transformer: ")
    assert report["transformer_compile_mode"] == "graph_breaks"
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, reference, atol=1e-5, rtol=0)
    torch._dynamo.reset()


def test_compile_scope_is_checked():
    pipe = type("P", (), {"transformer": tiny_wan_transformer(seed=0), "vae": None})()
    with pytest.raises(ValueError, match="compile_scope"):
        speed_up_pipeline(pipe, compile_transformer=True, compile_scope="model")


def test_fused_qkv_keeps_the_wan_output():
    model = tiny_wan_transformer(seed=0)
    inputs = _transformer_inputs(2)
    pipe = type("P", (), {"transformer": model, "vae": None})()
    with torch.no_grad():
        reference = model(**inputs)[0]
        report = speed_up_pipeline(pipe, fuse_qkv=True)
        out = model(**inputs)[0]
    assert model.blocks[0].attn1.fused_projections and "fused" in report["fuse_qkv"]
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_end_to_end_benchmark_tiny_smoke(tmp_path):
    module = _benchmark_module()
    out = tmp_path / "e2e.json"
    report = module.main(["--family", "wan", "--tiny", "--no_compile", "--postprocess_on_device", "--out", str(out)])
    results = {r["arm"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"baseline", "blade", "dense"}
    assert results["blade"]["speed_up"]["postprocess_on_device"] is True and "speed_up" not in results["baseline"]
    for arm, r in results.items():
        assert "error" not in r, (arm, r.get("error"))
        stages = r["stages"]
        parts = stages["text_encoding_s"] + stages["denoising_s"] + stages["vae_decode_s"] + stages["postprocess_s"]
        assert parts == pytest.approx(stages["total_s"], rel=1e-6)
        assert min(stages.values()) >= 0
    assert results["baseline"]["guidance_scale"] == 5.0 and results["blade"]["guidance_scale"] == 1.0
    assert results["blade"]["lora_layers_fused"] > 0 and "asa_stats" in results["blade"]
    assert "asa_stats" not in results["dense"]
    assert results["blade"]["speedup_total"] == pytest.approx(
        results["baseline"]["stages"]["total_s"] / results["blade"]["stages"]["total_s"]
    )
    assert "| wan | blade |" in report["table"] and report["complete"] is True


def test_end_to_end_offload_idle_expert_on_the_two_expert_model(tmp_path):
    """--offload_idle_expert on the tiny A14B layout: every arm runs with one expert resident, the measured video
    swaps twice (back to the high-noise expert, then to the low-noise one at the boundary)."""
    module = _benchmark_module()
    out = tmp_path / "e2e.json"
    module.main(["--models", "wan2.2-t2v-a14b", "--tiny", "--no_compile", "--offload_idle_expert",
                 "--arms", "baseline,blade", "--out", str(out)])
    for r in json.loads(out.read_text())["results"]:
        assert "error" not in r, r.get("error")
        assert r["offload"]["swaps"] == 3 and r["offload"]["resident"] == "transformer_2"  # warm-up 1 + measured 2
        assert 0 <= r["stages"]["expert_swap_s"] <= r["stages"]["denoising_s"]


def test_extrapolation_scales_the_steps_not_the_expert_swaps():
    module = _benchmark_module()
    stages = {"text_encoding_s": 1.0, "denoising_s": 10.0, "vae_decode_s": 2.0, "postprocess_s": 0.0,
              "total_s": 13.0, "expert_swap_s": 4.0}
    out = module._extrapolate(stages, 2, 50)
    assert out["denoising_s"] == pytest.approx((10.0 - 4.0) / 2 * 50 + 4.0)  # 154 s: 3 s a step, swaps once
    assert out["total_s"] == pytest.approx(1.0 + 154.0 + 2.0)


def test_end_to_end_blade_reuse_arm_probes_every_other_step(tmp_path, monkeypatch):
    """--arms blade,blade_reuse on the tiny Wan pipeline (4 student steps): the reuse arm's handle serves each
    prober mask 2 steps, so over its measured run the prober runs for half the calls the blade arm probes."""
    module = _benchmark_module()
    from blade.attention import AdaptiveBlockSparseAttention

    probes = []
    original = AdaptiveBlockSparseAttention.estimate_mask

    def counting(self, *args, **kwargs):
        probes.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AdaptiveBlockSparseAttention, "estimate_mask", counting)
    counts = {}

    def run_arm(arm, *args, **kwargs):
        probes.clear()
        result = real_run_arm(arm, *args, **kwargs)
        counts[arm] = len(probes)  # warm-up + measured run, 4 steps each
        return result

    real_run_arm = module.run_arm
    monkeypatch.setattr(module, "run_arm", run_arm)
    out = tmp_path / "e2e.json"
    module.main(["--family", "wan", "--tiny", "--no_compile", "--arms", "blade,blade_reuse", "--student_steps", "4",
                 "--out", str(out)])
    results = {r["arm"]: r for r in json.loads(out.read_text())["results"]}
    assert "error" not in results["blade_reuse"] and results["blade_reuse"]["mask_reuse_steps"] == 2
    assert counts["blade"] > 0 and counts["blade_reuse"] * 2 == counts["blade"]
    assert results["blade_reuse"]["asa_stats"]["calls"] == results["blade"]["asa_stats"]["calls"]


def test_end_to_end_report_keeps_the_arms_that_finished_when_a_run_is_cut_off(tmp_path, monkeypatch):
    """A device call's time limit kills the benchmark mid-run: the JSON written after each arm keeps what finished."""
    module = _benchmark_module()
    real_run_arm = module.run_arm

    def run_arm(arm, *rest):
        if arm == "dense":
            raise SystemExit("killed by the call's time limit")  # not an Exception: nothing catches it
        return real_run_arm(arm, *rest)

    monkeypatch.setattr(module, "run_arm", run_arm)
    out = tmp_path / "e2e.json"
    with pytest.raises(SystemExit):
        module.main(["--family", "wan", "--tiny", "--no_compile", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["complete"] is False
    results = {r["arm"]: r for r in report["results"]}
    assert set(results) == {"baseline", "blade"}
    assert results["blade"]["speedup_total"] == pytest.approx(
        results["baseline"]["stages"]["total_s"] / results["blade"]["stages"]["total_s"]
    )
    assert "| wan | blade |" in report["table"]


def test_extrapolation_scales_only_the_denoising_stage():
    module = _benchmark_module()
    stages = dict(text_encoding_s=1.0, denoising_s=5.0, vae_decode_s=3.0, postprocess_s=0.5, total_s=9.5)
    out = module._extrapolate(stages, measured_steps=5, steps=50)
    assert out["denoising_s"] == pytest.approx(50.0) and out["total_s"] == pytest.approx(54.5)
    assert out["vae_decode_s"] == 3.0 and module._extrapolate(stages, 50, 50) == stages


def test_end_to_end_compile_options_reach_torch_compile():
    module = _benchmark_module()
    assert module.compile_kwargs(module.parse_args([])) is None
    args = module.parse_args(["--compile_backend", "aot_eager", "--compile_mode", "reduce-overhead",
                              "--compile_scope", "transformer", "--arms", "baseline,blade"])
    assert module.compile_kwargs(args) == {"backend": "aot_eager", "mode": "reduce-overhead"}
    assert args.compile_scope == "transformer"


@pytest.mark.parametrize("argv", [
    ["--compile_mode", "reduce-overhead"],  # CUDA graphs over regional graphs: refused
    ["--compile_mode", "reduce-overhead", "--compile_scope", "transformer", "--arms", "blade,blade_reuse"],
])  # fmt: skip
def test_end_to_end_refuses_cuda_graph_settings_that_cannot_run(argv, capsys):
    with pytest.raises(SystemExit):
        _benchmark_module().parse_args(argv)
    assert "CUDA graphs" in capsys.readouterr().err


def test_speed_ups_reach_both_experts_of_a_two_expert_pipeline():
    """Wan2.2-A14B runs `transformer_2` for its low-noise steps: QKV fusion and the regional compile reach it too,
    and each expert's output stays its eager output (aot_eager: the traced graph, no codegen)."""
    from blade.testing.tiny import build_tiny_wan22_a14b_pipeline

    pipe = build_tiny_wan22_a14b_pipeline(seed=0)
    inputs = _transformer_inputs(3)
    with torch.no_grad():
        reference = {name: getattr(pipe, name)(**inputs)[0] for name in ("transformer", "transformer_2")}
        report = speed_up_pipeline(pipe, fuse_qkv=True, compile_transformer=True,
                                   compile_kwargs={"backend": "aot_eager"})
        outs = {name: getattr(pipe, name)(**inputs)[0] for name in ("transformer", "transformer_2")}
    for name in ("transformer", "transformer_2"):
        model = getattr(pipe, name)
        assert model.blocks[0].attn1.fused_projections, name
        assert all(block._compiled_call_impl is not None for block in model.blocks), name
        torch.testing.assert_close(outs[name], reference[name], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reference["transformer"], reference["transformer_2"])  # two experts, two weights
    assert report["transformer_compiled_blocks"] == len(pipe.transformer.blocks)
    assert report["transformer_2"]["transformer_compiled_blocks"] == len(pipe.transformer_2.blocks)
    assert report["transformer_2"]["transformer_fullgraph"] is True and "fused" in report["transformer_2"]["fuse_qkv"]
    torch._dynamo.reset()


def test_end_to_end_benchmark_runs_the_two_expert_and_ti2v_models(tmp_path):
    """--models: every expert of Wan2.2-A14B gets the random LoRA (twice the layers of one expert) and ASA (its two
    student steps route to the two experts, one with shift 3 anchors: every layer of both steps runs ASA)."""
    from blade.testing.tiny import build_tiny_wan22_a14b_pipeline

    module = _benchmark_module()
    out = tmp_path / "e2e_models.json"
    module.main(["--models", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b", "--tiny", "--no_compile", "--out", str(out)])
    results = {(r["family"], r["arm"]): r for r in json.loads(out.read_text())["results"]}
    assert all("error" not in r for r in results.values()), results
    pipe = build_tiny_wan22_a14b_pipeline(seed=0)
    layers = pipe.transformer.config.num_layers
    assert pipe.transformer_2.config.num_layers == layers
    per_expert = 4 * 2 * layers  # q, k, v, out of attn1 and attn2 in every block
    assert results[("wan2.2-t2v-a14b", "blade")]["lora_layers_fused"] == 2 * per_expert
    assert results[("wan2.2-t2v-a14b", "blade")]["asa_stats"]["calls"] == 2 * layers  # 2 steps, one expert each
    assert results[("wan2.2-ti2v-5b", "blade")]["lora_layers_fused"] == per_expert
    for name in ("wan2.2-t2v-a14b", "wan2.2-ti2v-5b"):
        assert results[(name, "baseline")]["guidance_scale"] > 1 and results[(name, "blade")]["guidance_scale"] == 1
