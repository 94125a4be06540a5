"""The inference scripts and the Python API on tiny pipelines saved to disk (offline, CPU).

Two end-to-end runs go through the real scripts as subprocesses; the bad-input cases call the same `main` in
process (they stop before any weight is loaded, so they are cheap).
"""

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from blade.api import asa_handle, enable_asa, generate, load_blade_lora
from blade.distill.sampler import BladeStudentScheduler
from blade.pipelines.loading import LoraMismatchError, load_pipeline
from blade.testing.tiny import (
    build_tiny_cogvideox_pipeline,
    build_tiny_wan_pipeline,
    tiny_cogvideox_transformer,
    tiny_wan_transformer,
)
from blade.video import read_mp4

REPO = Path(__file__).resolve().parents[1]
WAN_SCRIPT = REPO / "wanx" / "train" / "inference.py"
COG_SCRIPT = REPO / "cogvideox" / "train" / "inference.py"

# Small enough for a CPU, large enough for ASA to have several 16-token blocks (9x64x64 -> 3x4x4 = 48 Wan tokens).
WAN_SIZE = ["--num_frames", "9", "--height", "64", "--width", "64"]
COG_SIZE = ["--num_frames", "9", "--height", "32", "--width", "32"]
ASA = {"block_size": 16, "pool_size": 4, "min_keep": 0.3, "max_keep": 0.6, "threshold": 0.9}


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"script_{path.parent.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_lora_one_step(transformer: torch.nn.Module, inputs: dict, rank: int = 4) -> dict:
    """Add a LoRA to every attention projection and take one Adam step on a toy loss; returns its state dict."""
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.05)
    out = transformer(**inputs, return_dict=False)[0]
    out.pow(2).mean().backward()
    optimizer.step()
    return get_peft_model_state_dict(transformer)


def _save_lora(pipeline_cls, state_dict: dict, folder: Path, blade_config: dict | None) -> Path:
    pipeline_cls.save_lora_weights(folder, transformer_lora_layers=state_dict)
    if blade_config is not None:
        (folder / "blade_config.json").write_text(json.dumps(blade_config))
    return folder


def _blade_config(family: str, asa: dict | None) -> dict:
    return {
        "family": family,
        "k_step": 2,
        "anchors": [999, 499],
        "eta": 0.9,
        "prediction_type": "flow" if family == "wan" else "v_prediction",
        "shift": 1.0,
        "asa": asa,
        "dense_steps": 0,
        "lora_rank": 4,
        "lora_alpha": 4,
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny Wan / CogVideoX pipeline folders and LoRAs: matching ones (with blade_config.json) and a mismatched one."""
    root = tmp_path_factory.mktemp("inference")
    wan, cog = build_tiny_wan_pipeline(seed=0), build_tiny_cogvideox_pipeline(seed=0)
    wan.save_pretrained(root / "wan")
    cog.save_pretrained(root / "cogvideox")

    wan_inputs = dict(
        hidden_states=torch.randn(1, 16, 3, 8, 8),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 8, 32),
    )
    wan_lora = _train_lora_one_step(tiny_wan_transformer(seed=0), wan_inputs)
    cog_inputs = dict(
        hidden_states=torch.randn(1, 3, 4, 4, 4),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 16, 32),
    )
    cog_lora = _train_lora_one_step(tiny_cogvideox_transformer(seed=0), cog_inputs)
    wider = tiny_wan_transformer(seed=0, attention_head_dim=32)  # another model size: every projection differs
    wider_lora = _train_lora_one_step(wider, dict(wan_inputs))
    return {
        "root": root,
        "wan": root / "wan",
        "cogvideox": root / "cogvideox",
        "wan_lora": _save_lora(type(wan), wan_lora, root / "wan_lora", _blade_config("wan", ASA)),
        "cog_lora": _save_lora(type(cog), cog_lora, root / "cog_lora", _blade_config("cogvideox", ASA)),
        "wider_lora": _save_lora(type(wan), wider_lora, root / "wider_lora", None),
    }


def _run_script(script: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


def _check_outputs(out_dir: Path, prompts: list[str], shape: tuple[int, ...]) -> list[dict]:
    videos = sorted(out_dir.glob("*.mp4"))
    assert [v.name[:4] for v in videos] == [f"{i:03d}_" for i in range(len(prompts))]
    sidecars = []
    for video, prompt in zip(videos, prompts):
        assert read_mp4(video).shape == shape
        sidecar = json.loads(video.with_suffix(".json").read_text())
        assert sidecar["prompt"] == prompt and sidecar["video"] == video.name
        assert (sidecar["num_frames"], sidecar["height"], sidecar["width"]) == shape[:3]
        assert set(sidecar["timings"]) == {"text_encoding_s", "denoising_s", "transformer_s", "vae_decode_s", "total_s"}
        assert all(v >= 0 for v in sidecar["timings"].values())
        assert sidecar["timings"]["total_s"] >= sidecar["timings"]["vae_decode_s"] > 0
        assert sidecar["versions"]["torch"] == importlib.metadata.version("torch")
        sidecars.append(sidecar)
    return sidecars


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def test_wan_script_with_asa_lora_end_to_end(assets, tmp_path):
    prompts = ["a red ball moves left", "a blue cube jumps"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"# two prompts\n{prompts[0]}\n\n   \n{prompts[1]}\n")
    out_dir = tmp_path / "out"
    args = [
        "--model_path",
        str(assets["wan"]),
        "--lora_path",
        str(assets["wan_lora"]),
        "--prompt_file",
        str(prompt_file),
    ]
    result = _run_script(WAN_SCRIPT, [*args, *WAN_SIZE, "--seed", "7", "--output_dir", str(out_dir),
                                      "--mask_reuse_steps", "2"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    sidecars = _check_outputs(out_dir, prompts, (9, 64, 64, 3))
    for i, sidecar in enumerate(sidecars):
        assert sidecar["seed"] == 7 + i
        assert sidecar["steps"] == 2  # the LoRA's k_step
        assert sidecar["attention"] == "asa"  # auto: the LoRA's blade_config has an ASA config
        assert sidecar["mask_reuse_steps"] == 2
        assert 0.0 <= sidecar["sparsity"] <= 1.0
        assert sidecar["asa_stats"]["total_blocks"] > 0
        assert sidecar["scheduler"] == "BladeStudentScheduler"
        assert sidecar["fps"] == 16 and sidecar["device"] == "cpu" and sidecar["dtype"] == "float32"
        assert Path(sidecar["lora_path"]).name == "pytorch_lora_weights.safetensors"

    # The video holds what the API generates for the same settings (up to the codec).
    pipe = load_pipeline("wan", assets["wan"])
    load_blade_lora(pipe, assets["wan_lora"])
    asa_handle(pipe).mask_reuse_steps = 2
    frames, info = generate(pipe, prompts[1], seed=8, steps=2, guidance_scale=1.0, num_frames=9, height=64, width=64)
    assert info["sparsity"] == pytest.approx(sidecars[1]["sparsity"])
    expected = np.round(frames * 255).astype(np.uint8)
    assert _psnr(read_mp4(out_dir / sidecars[1]["video"]), expected) > 30


def test_cogvideox_script_end_to_end(assets, tmp_path):
    out_dir = tmp_path / "out"
    lora_file = assets["cog_lora"] / "pytorch_lora_weights.safetensors"
    args = ["--model_path", str(assets["cogvideox"]), "--lora_path", str(lora_file), "--prompt", "a cat runs"]
    result = _run_script(COG_SCRIPT, [*args, *COG_SIZE, "--output_dir", str(out_dir)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sidecar,) = _check_outputs(out_dir, ["a cat runs"], (9, 32, 32, 3))
    assert sidecar["attention"] == "asa" and 0.0 <= sidecar["sparsity"] <= 1.0
    assert sidecar["fps"] == 8 and sidecar["seed"] == 42 and sidecar["steps"] == 2
    assert sidecar["transformer_calls"] == 2  # guidance 1: no CFG pass


@pytest.fixture(scope="module")
def wan_pipe(assets):
    pipe = load_pipeline("wan", assets["wan"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, seed: int, size: int = 64) -> np.ndarray:
    frames, _ = generate(
        pipe, "a red ball", seed=seed, steps=2, guidance_scale=1.0, num_frames=9, height=size, width=size
    )
    return frames


def test_seeds_reproduce_with_asa(wan_pipe):
    handle = enable_asa(wan_pipe, ASA)
    try:
        first, again, other = _generate(wan_pipe, 3), _generate(wan_pipe, 3), _generate(wan_pipe, 4)
        assert handle.stats()["total_blocks"] > 0  # ASA did run
    finally:
        handle.remove()
    assert first.shape == (9, 64, 64, 3) and first.dtype == np.float32
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_lora_file_and_folder_load_the_same_and_change_the_output(assets):
    def student(lora_path):
        pipe = load_pipeline("wan", assets["wan"])
        pipe.set_progress_bar_config(disable=True)
        config = load_blade_lora(pipe, lora_path, asa=False)
        assert isinstance(pipe.scheduler, BladeStudentScheduler) and config["k_step"] == 2
        return _generate(pipe, 5, size=32)

    from_folder = student(assets["wan_lora"])
    from_file = student(assets["wan_lora"] / "pytorch_lora_weights.safetensors")
    assert np.array_equal(from_folder, from_file)

    base = load_pipeline("wan", assets["wan"])  # same sampler, no LoRA
    base.set_progress_bar_config(disable=True)
    base.scheduler = BladeStudentScheduler.from_blade_config(_blade_config("wan", None))
    assert np.abs(_generate(base, 5, size=32) - from_folder).max() > 1e-3


def test_mismatched_lora_is_refused_by_the_api(assets, wan_pipe):
    with pytest.raises(LoraMismatchError, match="do not match"):
        load_blade_lora(wan_pipe, assets["wider_lora"])
    assert not hasattr(wan_pipe.transformer, "peft_config")  # nothing was loaded


def _nan_lora(assets, folder: Path) -> Path:
    """The matching Wan LoRA with NaN in one tensor, as a diverged training run would leave it."""
    from safetensors.torch import load_file, save_file

    folder.mkdir()
    state = load_file(str(assets["wan_lora"] / "pytorch_lora_weights.safetensors"))
    key = sorted(state)[0]
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    (folder / "blade_config.json").write_text((assets["wan_lora"] / "blade_config.json").read_text())
    return folder


def test_non_finite_lora_is_refused_by_the_api(assets, wan_pipe, tmp_path):
    from blade.pipelines.loading import LoraError

    folder = _nan_lora(assets, tmp_path / "nan")
    with pytest.raises(LoraError, match="non-finite") as info:
        load_blade_lora(wan_pipe, folder)
    assert str(folder / "pytorch_lora_weights.safetensors") in str(info.value)
    assert not hasattr(wan_pipe.transformer, "peft_config")  # nothing was loaded


# ------------------------------------------------------------------------------------------------ bad inputs


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _bad_cases(assets, tmp: Path) -> dict[str, tuple[list[str], str]]:
    incomplete = tmp / "incomplete"
    incomplete.mkdir()
    for name in ("model_index.json", "transformer", "text_encoder", "tokenizer", "scheduler"):  # no vae/
        (incomplete / name).symlink_to(assets["wan"] / name)
    empty_prompts = tmp / "empty.txt"
    empty_prompts.write_text("\n# only a comment\n   \n")
    corrupt = tmp / "corrupt" / "pytorch_lora_weights.safetensors"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header" + bytes(64))
    bad_config = tmp / "bad_config"
    bad_config.mkdir()
    (bad_config / "pytorch_lora_weights.safetensors").symlink_to(
        assets["wan_lora"] / "pytorch_lora_weights.safetensors"
    )
    (bad_config / "blade_config.json").write_text(json.dumps({**_blade_config("wan", {"block_size": 10}), "eta": 2}))
    wan = ["--model_path", str(assets["wan"])]
    nan_lora = _nan_lora(assets, tmp / "nan_lora")
    return {
        "non-finite lora": ([*wan, "--lora_path", str(nan_lora)], "non-finite values"),
        "missing model": (["--model_path", str(tmp / "nowhere")], "huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B"),
        "incomplete model": (["--model_path", str(incomplete)], "missing vae/"),
        "bad height": ([*wan, "--height", "40"], "--height 40 must be a positive multiple of 16"),
        "bad frames": ([*wan, "--num_frames", "10"], "--num_frames 10 must be 4k+1"),
        "empty prompt file": ([*wan, "--prompt_file", str(empty_prompts)], "holds no prompt"),
        "missing lora": ([*wan, "--lora_path", str(tmp / "no_lora")], "LoRA not found"),
        "corrupt lora": ([*wan, "--lora_path", str(corrupt.parent)], "not a readable safetensors file"),
        "mismatched lora": ([*wan, "--lora_path", str(assets["wider_lora"])], "do not match"),
        "invalid blade_config": ([*wan, "--lora_path", str(bad_config)], "blade_config.json beside"),
        "lora for another family": ([*wan, "--lora_path", str(assets["cog_lora"])], "trained for 'cogvideox'"),
        "steps off the LoRA's K": ([*wan, "--lora_path", str(assets["wan_lora"]), "--steps", "8"], "distilled for 2"),
        "existing output": (wan, "output exists"),
        "mask reuse below 1": ([*wan, "--mask_reuse_steps", "0"], "--mask_reuse_steps must be >= 1"),
        "mask reuse with dense attention": ([*wan, "--attention", "dense", "--mask_reuse_steps", "2"],
                                            "reuses the ASA prober's masks"),
        "asa clamp with dense attention": ([*wan, "--attention", "dense", "--asa_max_keep", "0.2"],
                                           "set the ASA prober"),
        "asa pool window 0": ([*wan, "--attention", "asa", "--asa_pool_size", "0"], "pool_size must be"),
        "asa clamp above 1": ([*wan, "--attention", "asa", "--asa_max_keep", "1.5"], "max_keep"),
        "early context with dense attention": ([*wan, "--attention", "dense", "--early_context_steps", "1"],
                                               "change ASA's settings at the first steps"),
        "early window without steps": ([*wan, "--attention", "asa", "--early_pool_size", "4"], "number of steps"),
        "early window 0": ([*wan, "--attention", "asa", "--early_context_steps", "1", "--early_pool_size", "0"],
                           "pool_size must be"),
        "vae decode chunk 0": ([*wan, "--vae_decode_chunk", "0"], "--vae_decode_chunk must be >= 1"),
        "offload with one expert": ([*wan, "--offload_idle_expert"], "nothing to offload"),
    }


def test_bad_inputs_exit_2_and_write_nothing(assets, tmp_path, capsys):
    wan_script = _load_script(WAN_SCRIPT)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "000_a-dog.mp4").write_bytes(b"an older video")  # what "existing output" must not overwrite
    before = _tree(out_dir)
    for name, (args, message) in _bad_cases(assets, tmp_path).items():
        argv = ["--prompt", "a dog", *WAN_SIZE, "--output_dir", str(out_dir), *args]
        if "--prompt_file" in args:
            argv = argv[2:]
        assert wan_script.main(wan_script.SPEC, argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (name, err)
        assert _tree(out_dir) == before, name


def test_asa_overrides_set_the_clamp_and_the_global_window_of_the_loras_config(assets, tmp_path):
    """--asa_max_keep below one block keeps exactly one block a row (block sparsity 1 - 1/Nk, Nk an integer) and
    --asa_pool_size 4 makes the paper's sparsity the block sparsity less 1/4; the sidecar records both overrides,
    and the LoRA's other ASA fields (its threshold) stay."""
    wan_script = _load_script(WAN_SCRIPT)
    out_dir = tmp_path / "out"
    argv = ["--model_path", str(assets["wan"]), "--lora_path", str(assets["wan_lora"]), "--prompt", "a red ball",
            *WAN_SIZE, "--output_dir", str(out_dir), "--asa_max_keep", "0.01", "--asa_pool_size", "4"]
    assert wan_script.main(wan_script.SPEC, argv) == 0
    sidecar = json.loads(next(out_dir.glob("*.json")).read_text())
    assert sidecar["asa_overrides"] == {"max_keep": 0.01, "pool_size": 4}  # the LoRA's min_keep 0.3 lowered too
    n_k = 1.0 / (1.0 - sidecar["sparsity"])
    assert n_k >= 2 and n_k == pytest.approx(round(n_k), abs=1e-9)
    assert sidecar["asa_stats"]["sparsity_paper"] == pytest.approx(max(0.0, sidecar["sparsity"] - 0.25))
    assert sidecar["blade_config"]["asa"]["threshold"] == ASA["threshold"]


def test_early_context_flags_reach_the_asa_handle_and_the_sidecar(assets, tmp_path, monkeypatch):
    """--early_context_steps 1 with --early_max_keep / --early_pool_size: the handle `enable_asa` returns carries
    that context over the LoRA's config (which stays the main one), the sidecar records it; the model-level switch
    itself is checked in test_models_wan.py."""
    from blade import api
    from blade.attention import EarlyContext

    handles = []
    real_enable = api.enable_asa

    def recording_enable(*args, **kwargs):
        handles.append(real_enable(*args, **kwargs))
        return handles[-1]

    monkeypatch.setattr(api, "enable_asa", recording_enable)
    wan_script = _load_script(WAN_SCRIPT)
    out_dir = tmp_path / "out"
    argv = ["--model_path", str(assets["wan"]), "--lora_path", str(assets["wan_lora"]), "--prompt", "a red ball",
            *WAN_SIZE, "--output_dir", str(out_dir), "--early_context_steps", "1", "--early_max_keep", "0.5",
            "--early_pool_size", "2"]  # fmt: skip
    assert wan_script.main(wan_script.SPEC, argv) == 0
    (handle,) = handles
    assert handle.early_context == EarlyContext(steps=1, max_keep=0.5, pool_size=2)
    assert handle.config.threshold == ASA["threshold"] and handle.config.pool_size == ASA.get("pool_size")
    sidecar = json.loads(next(out_dir.glob("*.json")).read_text())
    assert sidecar["early_context"] == {"steps": 1, "max_keep": 0.5, "pool_size": 2}


def test_speed_flags_use_blade_speed_or_exit_2_without_it(assets, tmp_path, monkeypatch, capsys):
    wan_script = _load_script(WAN_SCRIPT)
    out_dir = tmp_path / "out"
    argv = ["--model_path", str(assets["wan"]), "--prompt", "a dog", "--num_frames", "5", "--height", "32"]
    argv += ["--width", "32", "--steps", "2", "--output_dir", str(out_dir), "--vae_dtype", "bfloat16"]
    argv += ["--channels_last"]
    assert wan_script.main(wan_script.SPEC, argv) == 0, capsys.readouterr().err
    (sidecar,) = _check_outputs(out_dir, ["a dog"], (5, 32, 32, 3))
    assert sidecar["speed"]["vae_dtype"] == "bfloat16" and sidecar["speed"]["compile_transformer"] is False
    assert sidecar["speed"]["vae_channels_last"] is True
    assert sidecar["attention"] == "dense" and sidecar["sparsity"] is None  # auto without a LoRA: dense
    assert sidecar["scheduler"] == "UniPCMultistepScheduler"

    monkeypatch.setitem(sys.modules, "blade.speed", None)  # as if blade/speed.py were absent: its import fails
    assert wan_script.main(wan_script.SPEC, [*argv, "--overwrite", "--compile"]) == 2
    assert "--channels_last / --vae_decode_chunk / --postprocess_on_device need blade.speed" in (
        capsys.readouterr().err
    )
    assert _check_outputs(out_dir, ["a dog"], (5, 32, 32, 3)) == [sidecar]  # untouched


def test_compile_vae_flag_compiles_the_decoder_and_keeps_the_video(assets, tmp_path, monkeypatch, capsys):
    """--compile_vae reaches blade.speed (the sidecar says so, the decoder is compiled once) and the video is the
    stock decode's. The test compiles with aot_eager (same ATen ops, no C++ build on the CPU); the script's own
    default backend, inductor, is what the GPU timing used (BENCHMARKS.md)."""
    from blade import speed

    cog_script = _load_script(COG_SCRIPT)
    compiled = []
    real_compile = speed.compile_vae_decoder

    def compile_with_aot_eager(vae, **kwargs):
        compiled.append(type(vae).__name__)
        return real_compile(vae, backend="aot_eager")

    monkeypatch.setattr(speed, "compile_vae_decoder", compile_with_aot_eager)
    base = ["--model_path", str(assets["cogvideox"]), "--prompt", "a dog", *COG_SIZE, "--seed", "3"]
    assert cog_script.main(cog_script.SPEC, [*base, "--output_dir", str(tmp_path / "stock")]) == 0
    assert compiled == []
    assert cog_script.main(cog_script.SPEC, [*base, "--output_dir", str(tmp_path / "c"), "--compile_vae"]) == 0
    assert compiled == ["AutoencoderKLCogVideoX"], capsys.readouterr().err
    sidecar = json.loads(next((tmp_path / "c").glob("*.json")).read_text())
    assert sidecar["speed"]["compile_vae"] is True and sidecar["speed"]["compile_transformer"] is False
    stock = read_mp4(next((tmp_path / "stock").glob("*.mp4"))).astype(np.int16)
    assert np.abs(read_mp4(next((tmp_path / "c").glob("*.mp4"))).astype(np.int16) - stock).max() <= 2


@pytest.mark.parametrize("script_path", [WAN_SCRIPT, COG_SCRIPT], ids=["wan", "cogvideox"])
def test_postprocess_on_device_writes_the_stock_frames(assets, tmp_path, monkeypatch, script_path):
    """`--postprocess_on_device` hands the mp4 writer the frames diffusers' own post-processing gives, value for value
    (same seed, two runs), and the sidecar says it was on."""
    import blade.video

    script = _load_script(script_path)
    family = "wan" if script_path == WAN_SCRIPT else "cogvideox"
    written = []
    stock_export = blade.video.export_mp4

    def recording_export(frames, path, fps, **kwargs):
        written.append(np.array(frames, copy=True))
        return stock_export(frames, path, fps=fps, **kwargs)

    monkeypatch.setattr(blade.video, "export_mp4", recording_export)
    size = WAN_SIZE if family == "wan" else COG_SIZE
    argv = ["--model_path", str(assets[family]), "--prompt", "a red ball", *size, "--steps", "2", "--seed", "3"]
    assert script.main(script.SPEC, [*argv, "--output_dir", str(tmp_path / "stock")]) == 0
    assert script.main(script.SPEC, [*argv, "--output_dir", str(tmp_path / "dev"), "--postprocess_on_device"]) == 0
    stock, on_device = written
    num_frames, height, width = (int(size[k]) for k in (1, 3, 5))  # the "--num_frames N --height H --width W" list
    assert stock.dtype == on_device.dtype == np.float32 and stock.shape == (num_frames, height, width, 3)
    np.testing.assert_array_equal(on_device, stock)
    sidecar = json.loads(next((tmp_path / "dev").glob("*.json")).read_text())
    assert sidecar["speed"]["postprocess_on_device"] is True


def test_cogvideox_script_refuses_the_wan_vae_decode_chunk(assets, tmp_path, capsys):
    cog_script = _load_script(COG_SCRIPT)
    argv = ["--model_path", str(assets["cogvideox"]), "--prompt", "a dog", *COG_SIZE,
            "--output_dir", str(tmp_path / "o"), "--vae_decode_chunk", "4"]  # fmt: skip
    assert cog_script.main(cog_script.SPEC, argv) == 2
    assert "--vae_decode_chunk is for Wan's causal VAE" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cogvideox_script_requires_model_path(capsys):
    cog_script = _load_script(COG_SCRIPT)
    with pytest.raises(SystemExit) as exit_info:
        cog_script.main(cog_script.SPEC, ["--prompt", "a dog"])
    assert exit_info.value.code == 2
    assert "--model_path" in capsys.readouterr().err


def test_help_documents_every_flag_with_its_default():
    from blade.cli import build_parser

    for script in (WAN_SCRIPT, COG_SCRIPT):
        parser = build_parser(_load_script(script).SPEC)
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and ("default" in action.help.lower() or "required" in action.help), action.dest


# ----------------------------------------------------------------------------------------------------------------
# Issue 15: grammar, output paths and names, LoRA without its JSON, long prompts, float16 on CPU, decode progress
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, bad_word",
    [
        ("a cat surfing a wave", "cat"),
        ("a large purple circle moves right on a black background", "purple"),
        ("a small red circle moves left and a large red square stays still on a black background", "red"),
    ],
)
def test_tinyworld_prompt_outside_the_grammar_exits_2_before_loading(prompt, bad_word, tmp_path, capsys, monkeypatch):
    import blade.pipelines.loading as loading

    wan_script = _load_script(WAN_SCRIPT)
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: pytest.fail("weights loaded"))
    out_dir = tmp_path / "out"
    assert wan_script.main(wan_script.SPEC, ["--prompt", prompt, "--output_dir", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "outside the TinyWorld grammar" in err and repr(bad_word) in err, err
    assert not out_dir.exists()


def test_output_dir_problems_exit_2_before_loading(assets, tmp_path, capsys):
    wan_script = _load_script(WAN_SCRIPT)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = {
        "a file": (a_file, "exists and is not a folder"),
        "under a file": (a_file / "videos", "is a file, not a folder"),
    }
    for name, (out_dir, message) in cases.items():
        argv = ["--model_path", str(assets["wan"]), "--prompt", "a dog", *WAN_SIZE, "--output_dir", str(out_dir)]
        assert wan_script.main(wan_script.SPEC, argv) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (name, err)
    assert a_file.read_text() == "not a folder"
    (tmp_path / "out" / "000_a-dog.mp4").mkdir(parents=True)  # an output path taken by a folder
    argv = ["--model_path", str(assets["wan"]), "--prompt", "a dog", *WAN_SIZE, "--output_dir", str(tmp_path / "out")]
    assert wan_script.main(wan_script.SPEC, [*argv, "--overwrite"]) == 2
    assert "output path is a folder" in capsys.readouterr().err


def test_output_names_never_collide_and_keep_readable_slugs():
    from blade.cli import output_stem

    readme = "a large yellow circle moves right on a gray background"
    assert output_stem(0, readme) == "000_a-large-yellow-circle-moves-right-on-a-gray-background"  # README's name
    assert output_stem(3, "A dog.") == "003_a-dog"
    long_a = "a panda playing guitar in a bamboo forest at sunset with fireflies and a river, then it rains"
    long_b = "a panda playing guitar in a bamboo forest at sunset with fireflies and a river, then it snows"
    stem_a, stem_b = output_stem(0, long_a), output_stem(0, long_b)
    assert stem_a != stem_b and len(stem_a) <= 4 + 60 + 9
    assert stem_a.startswith("000_a-panda-playing-guitar-in-a-bamboo-forest")
    import hashlib

    assert stem_a.endswith("-" + hashlib.sha1(long_a.encode()).hexdigest()[:8])
    assert output_stem(0, "a dog!") != output_stem(0, "a dog?")  # the slug drops punctuation: the hash keeps it


def test_lora_folder_without_blade_config_is_refused_or_explicitly_accepted(assets, tmp_path, capsys):
    wan_script = _load_script(WAN_SCRIPT)
    bare = tmp_path / "bare_lora"
    bare.mkdir()
    (bare / "pytorch_lora_weights.safetensors").write_bytes(
        (assets["wan_lora"] / "pytorch_lora_weights.safetensors").read_bytes()
    )
    out_dir = tmp_path / "out"
    argv = ["--model_path", str(assets["wan"]), "--lora_path", str(bare), "--prompt", "a dog", "--num_frames", "5",
            "--height", "32", "--width", "32", "--steps", "2", "--output_dir", str(out_dir)]
    assert wan_script.main(wan_script.SPEC, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no blade_config.json beside" in err and "--lora_without_config" in err
    assert not out_dir.exists()

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no raw UserWarning either
        assert wan_script.main(wan_script.SPEC, [*argv, "--lora_without_config"]) == 0
    err = capsys.readouterr().err
    assert "warning: no blade_config.json beside" in err and "UniPCMultistepScheduler" in err
    assert "VAE decode" in err  # the decode's progress bar
    (sidecar,) = _check_outputs(out_dir, ["a dog"], (5, 32, 32, 3))
    assert sidecar["blade_config"] is None and sidecar["attention"] == "dense"


def test_long_prompt_and_float16_on_cpu_warn(assets, tmp_path, capsys):
    from blade.cli import build_parser, prepare_job

    wan_script = _load_script(WAN_SCRIPT)
    long_prompt = " ".join(["dog"] * 600)
    argv = ["--model_path", str(assets["wan"]), "--prompt", long_prompt, *WAN_SIZE, "--output_dir",
            str(tmp_path / "out"), "--gpu", "-1"]
    job = prepare_job(wan_script.SPEC, build_parser(wan_script.SPEC).parse_args(argv))
    err = capsys.readouterr().err
    # 600 words + </s> in the tiny word-level tokenizer; WanPipeline's default window is 512 tokens
    assert "warning: prompt 1 is 601 tokens long; the text encoder takes the first 512 tokens" in err, err
    assert "float16" not in err and job.dtype == torch.float32
    job = prepare_job(wan_script.SPEC, build_parser(wan_script.SPEC).parse_args([*argv[:3], "a dog", *argv[4:],
                                                                                   "--dtype", "float16"]))
    err = capsys.readouterr().err
    assert "warning: --dtype float16 on a CPU" in err and "slower" in err and "tokens long" not in err
    assert job.dtype == torch.float16 and not (tmp_path / "out").exists()


def test_vae_decode_progress_counts_wan_latent_frames(wan_pipe, capsys):
    from blade.cli import vae_decode_progress

    latents = torch.randn(1, 16, 3, 8, 8)
    with vae_decode_progress(wan_pipe):
        wan_pipe.vae.decode(latents)
    assert "decode" not in vars(wan_pipe.vae)  # the class's method is back
    err = capsys.readouterr().err
    assert "VAE decode" in err and "3/3" in err, err


def test_wan_script_context_parallel_under_torchrun_matches_one_process(assets, tmp_path):
    """`torchrun --nproc_per_node 2 wanx/train/inference.py --context_parallel` (gloo on CPU, Ulysses over the
    tiny model's 2 heads and 48 tokens, ASA LoRA) writes, from process 0 only, the video one process writes."""
    args = ["--model_path", str(assets["wan"]), "--lora_path", str(assets["wan_lora"]), "--prompt",
            "a red ball moves left", *WAN_SIZE, "--seed", "3"]
    single = _run_script(WAN_SCRIPT, [*args, "--output_dir", str(tmp_path / "one")], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WAN_SCRIPT),
           *args, "--context_parallel", "--output_dir", str(tmp_path / "cp")]
    parallel = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    (one,), (cp,) = sorted((tmp_path / "one").glob("*.mp4")), sorted((tmp_path / "cp").glob("*.mp4"))
    assert one.name == cp.name and len(list((tmp_path / "cp").iterdir())) == 2  # one mp4 + one sidecar
    sidecar = json.loads(cp.with_suffix(".json").read_text())
    assert sidecar["context_parallel"] == 2 and sidecar["attention"] == "asa"
    assert json.loads(one.with_suffix(".json").read_text())["context_parallel"] == 1
    assert _psnr(read_mp4(cp), read_mp4(one)) > 50  # float32 rounding only (identical frames give inf)


def test_context_parallel_refuses_cogvideox_and_a_plain_launch(assets, tmp_path, capsys, monkeypatch):
    cog, wan = _load_script(COG_SCRIPT), _load_script(WAN_SCRIPT)
    common = ["--prompt", "a cat", "--lora_path", "none", "--context_parallel", "--output_dir", str(tmp_path / "o")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cog.main(cog.SPEC, ["--model_path", str(assets["cogvideox"]), *COG_SIZE, *common]) == 2
    assert "supports Wan only" in capsys.readouterr().err
    wan_argv = ["--model_path", str(assets["wan"]), *WAN_SIZE, *common]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert wan.main(wan.SPEC, wan_argv) == 2 and "torchrun" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")  # the tiny model has 2 heads
    assert wan.main(wan.SPEC, wan_argv) == 2 and "divisible" in capsys.readouterr().err
