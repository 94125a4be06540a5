"""Idle-expert offload (`blade.offload`) on the tiny two-expert A14B pipeline: the same latents as the pipeline with
both experts resident, only the expert being called holds device tensors, two swaps a video, hooks removed cleanly."""

import pytest
import torch

from blade.api import disable_asa, enable_asa
from blade.attention import ASAConfig
from blade.offload import offload_idle_experts
from blade.testing.tiny import build_tiny_wan22_a14b_pipeline, build_tiny_wan_pipeline

SPARSE = ASAConfig(block_size=16, threshold=0.5, min_keep=0.2, max_keep=0.5, pool_size=8, seed=0)


def _latents(pipe, steps: int = 4, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return pipe(
            "a red ball moves left", num_frames=9, height=64, width=64, num_inference_steps=steps,
            guidance_scale=1.0, output_type="latent", max_sequence_length=16,
            generator=torch.Generator().manual_seed(seed),
        ).frames  # fmt: skip


def _on_host(handle, name: str) -> bool:
    """Every tensor of expert `name` is its host copy (offloaded); False when none is (resident)."""
    flags = {slot.module._parameters[slot.name].data_ptr() == slot.host.data_ptr() if slot.is_parameter
             else slot.module._buffers[slot.name] is slot.host for slot in handle._slots[name]}
    assert len(flags) == 1, "an expert is either wholly offloaded or wholly resident"
    return flags.pop()


def _pipe(device="cpu"):
    pipe = build_tiny_wan22_a14b_pipeline(seed=0).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_offload_keeps_one_expert_resident_and_the_output_unchanged():
    pipe = _pipe()
    reference = _latents(pipe)
    params = [p for _, model in (("t", pipe.transformer), ("t2", pipe.transformer_2)) for p in model.parameters()]
    handle = offload_idle_experts(pipe)
    assert handle.resident == "transformer"
    assert not _on_host(handle, "transformer") and _on_host(handle, "transformer_2")
    assert not handle._slots["transformer"][0].host.is_pinned()  # pinned only for a CUDA device

    out = _latents(pipe)  # 4 steps at boundary 0.875: the high-noise expert first, then the low-noise one
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    assert handle.resident == "transformer_2" and handle.swaps == 1
    assert _on_host(handle, "transformer") and not _on_host(handle, "transformer_2")
    # the Parameter objects themselves are kept: hooks, compiled blocks and optimizers that hold them stay valid
    assert [p for model in (pipe.transformer, pipe.transformer_2) for p in model.parameters()] == params

    torch.testing.assert_close(_latents(pipe, seed=0), reference, rtol=0, atol=0)  # a second video: 2 swaps more
    assert handle.swaps == 3
    stats = handle.stats()
    assert stats["swaps"] == 3 and stats["resident"] == "transformer_2" and stats["host_gb"] > 0

    handle.remove()  # both back on the device, no more swaps
    assert not _on_host(handle, "transformer") and not _on_host(handle, "transformer_2")
    torch.testing.assert_close(_latents(pipe), reference, rtol=0, atol=0)
    assert handle.swaps == 3


def test_offload_under_asa_on_both_experts_matches_resident_asa():
    pipe = _pipe()
    enable_asa(pipe, SPARSE)
    reference = _latents(pipe)
    disable_asa(pipe)
    enable_asa(pipe, SPARSE)
    handle = offload_idle_experts(pipe)
    torch.testing.assert_close(_latents(pipe), reference, rtol=0, atol=0)
    assert handle.swaps == 1
    handle.remove()
    disable_asa(pipe)


def test_a_tied_weight_gets_one_host_copy_and_stays_tied():
    pipe = _pipe()
    attn = pipe.transformer_2.blocks[0].attn1
    attn.to_k.weight = attn.to_q.weight  # tied inside one expert
    untied = offload_idle_experts(_pipe()).stats()["host_gb"]
    handle = offload_idle_experts(pipe)
    assert handle.stats()["host_gb"] == pytest.approx(untied - attn.to_q.weight.numel() * 4 / 2**30, rel=1e-6)
    _latents(pipe)  # swaps transformer_2 in
    assert handle.resident == "transformer_2" and attn.to_k.weight is attn.to_q.weight
    assert attn.to_k.weight.data_ptr() == attn.to_q.weight.data_ptr()


def test_offload_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="two experts"):
        offload_idle_experts(build_tiny_wan_pipeline(seed=0))
    pipe = build_tiny_wan22_a14b_pipeline(seed=0)
    pipe.transformer_2.proj_out = pipe.transformer.proj_out  # a shared module
    with pytest.raises(ValueError, match="share"):
        offload_idle_experts(pipe)


@pytest.mark.gpu
def test_gpu_offload_frees_the_idle_expert_and_matches_resident():
    device = torch.device("cuda")
    pipe = _pipe(device)
    reference = _latents(pipe)
    expert_bytes = sum(p.numel() * p.element_size() for p in pipe.transformer_2.parameters())
    before = torch.cuda.memory_allocated(device)
    handle = offload_idle_experts(pipe)
    assert handle._slots["transformer_2"][0].host.is_pinned()
    assert next(pipe.transformer_2.parameters()).device.type == "cpu"
    assert before - torch.cuda.memory_allocated(device) >= expert_bytes
    torch.testing.assert_close(_latents(pipe), reference, rtol=0, atol=0)
    assert next(pipe.transformer.parameters()).device.type == "cpu"
    assert next(pipe.transformer_2.parameters()).device == torch.device("cuda", torch.cuda.current_device())
    handle.remove()
    assert all(p.is_cuda for model in (pipe.transformer, pipe.transformer_2) for p in model.parameters())


@pytest.mark.gpu
def test_gpu_offload_from_a_pipeline_loaded_on_the_cpu():
    """The CLI's route: the pipeline on the CPU, everything but the experts moved to the GPU, the first expert made
    resident by `offload_idle_experts(pipe, "cuda")`: the same latents as the pipeline wholly on the GPU."""
    reference = _latents(_pipe("cuda"))
    pipe = _pipe("cpu")
    for name in ("text_encoder", "vae"):
        getattr(pipe, name).to("cuda")
    handle = offload_idle_experts(pipe, "cuda")
    assert next(pipe.transformer.parameters()).is_cuda and not next(pipe.transformer_2.parameters()).is_cuda
    torch.testing.assert_close(_latents(pipe), reference, rtol=0, atol=0)
    assert handle.swaps == 1
