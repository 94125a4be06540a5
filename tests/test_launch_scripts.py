"""The launch scripts (wanx/train_wanx_tdm.sh, cogvideox/train_tdm_1.sh) and the trainer's size defaults.

- DeepSpeed ZeRO-2 is opt-in (USE_DEEPSPEED=1): checked with a stub `accelerate` on PATH that records its command
  line, and a stub `deepspeed` module that makes `import deepspeed` succeed.
- The trainer takes the video size from the model folder: blade_defaults.json, the older blade_hints.json, or
  TinyWorld's size for a TinyWorld pipeline folder.
- The issue's command, `MODEL_PATH=assets/tinyworld/pipeline NUM_GPUS=1 bash wanx/train_wanx_tdm.sh
  --max_train_steps 1`, runs for real on the CPU (~30 s at batch 1, so CI runs it too).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blade.distill.trainer import parse_args

REPO = Path(__file__).resolve().parents[1]
TINYWORLD = REPO / "assets" / "tinyworld" / "pipeline"
SCRIPTS = {"wan": REPO / "wanx" / "train_wanx_tdm.sh", "cogvideox": REPO / "cogvideox" / "train_tdm_1.sh"}


def _stub_env(tmp_path: Path, with_deepspeed: bool) -> dict[str, str]:
    """PATH with an `accelerate` that prints its arguments; PYTHONPATH with a `deepspeed` stub when asked."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "accelerate"
    stub.write_text('#!/usr/bin/env bash\necho "ACCELERATE $*"\n')
    stub.chmod(0o755)
    python_dir = tmp_path / "py"
    if with_deepspeed:
        (python_dir / "deepspeed").mkdir(parents=True, exist_ok=True)
        (python_dir / "deepspeed" / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "USE_DEEPSPEED"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(python_dir) if with_deepspeed else "", str(REPO)]))
    return env


def _config_of(stdout: str) -> str:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("ACCELERATE ")]
    args = line.split()
    return Path(args[args.index("--config_file") + 1]).name


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_launch_scripts_pick_ddp_unless_deepspeed_is_asked_for(family, tmp_path):
    script = SCRIPTS[family]
    for with_deepspeed in (False, True):
        env = _stub_env(tmp_path, with_deepspeed)
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert _config_of(proc.stdout) == "config_ddp.yaml", (with_deepspeed, proc.stdout)
        if with_deepspeed:  # installed but not used: says why and how to opt in
            assert "USE_DEEPSPEED=1" in proc.stderr and "never run on a GPU" in proc.stderr, proc.stderr
        else:
            assert "deepspeed" not in proc.stderr.lower(), proc.stderr
    proc = subprocess.run(["bash", str(script)], env={**env, "USE_DEEPSPEED": "1"}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert _config_of(proc.stdout) == "config.yaml"
    assert "never run on a GPU" in proc.stderr and proc.stderr.count("\n") == 1  # one line


def _args(family: str, model: Path, *extra: str):
    return parse_args(family, ["--pretrained_model_name_or_path", str(model), "--prompt_dir", "p", "--output_dir",
                               "o", *extra])


def test_trainer_reads_the_video_size_from_the_model_folder(tmp_path):
    # the bundled TinyWorld pipeline: its blade_defaults.json
    args = _args("wan", TINYWORLD)
    assert (args.num_frames, args.height, args.width, args.fps) == (17, 128, 128, 8)
    assert args.tinyworld  # its prompt cache is checked against the TinyWorld teacher's text inputs
    # explicit flags win
    args = _args("wan", TINYWORLD, "--height", "64", "--num_frames", "9")
    assert (args.num_frames, args.height, args.width) == (9, 64, 128)
    # a TinyWorld folder without the file (trained before it existed): recognised by its tokenizer
    old = tmp_path / "old_tinyworld"
    shutil.copytree(TINYWORLD / "tokenizer", old / "tokenizer")
    args = _args("wan", old)
    assert (args.num_frames, args.height, args.width, args.fps) == (17, 128, 128, 8)
    # the older file name is still read; blade_defaults.json wins when both exist
    other = tmp_path / "other"
    other.mkdir()
    (other / "blade_hints.json").write_text(json.dumps({"num_frames": 33, "height": 256, "width": 320, "fps": 12}))
    args = _args("cogvideox", other)
    assert (args.num_frames, args.height, args.width, args.fps) == (33, 256, 320, 12)
    (other / "blade_defaults.json").write_text(json.dumps({"height": 96}))
    args = _args("cogvideox", other)
    assert (args.num_frames, args.height, args.width, args.fps) == (49, 96, 720, 8)  # the rest: CogVideoX's
    # a folder that says nothing keeps the family's published size
    plain = tmp_path / "plain"
    plain.mkdir()
    args = _args("wan", plain)
    assert (args.num_frames, args.height, args.width, args.fps) == (81, 480, 832, 16)
    assert not args.tinyworld
    (plain / "blade_defaults.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="must hold a JSON object"):
        _args("wan", plain)


@pytest.mark.slow
def test_tinyworld_launch_script_trains_one_step_on_cpu(tmp_path):
    """The issue's command on the bundled TinyWorld pipeline, batch 1, one optimizer step, on the CPU."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle moves right on a black background\n"
                       "a small blue square moves up on a gray background\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("USE_DEEPSPEED", None)
    cache = tmp_path / "cache"
    subprocess.run([sys.executable, str(REPO / "utils" / "process_prompts_wanx.py"), "--input_file", str(prompts),
                    "--output_dir", str(cache), "--model_path", str(TINYWORLD), "--max_length", "32",
                    "--negative_prompt", "", "--num_validation", "1"], env=env, check=True, capture_output=True,
                   timeout=300)
    out = tmp_path / "out"
    env.update(MODEL_PATH=str(TINYWORLD), PROMPT_DIR=str(cache), OUTPUT_DIR=str(out), NUM_GPUS="1")
    proc = subprocess.run(
        ["bash", str(SCRIPTS["wan"]), "--max_train_steps", "1", "--train_batch_size", "1",
         "--gradient_accumulation_steps", "1", "--validation_steps", "0", "--report_to", "none",
         "--mixed_precision", "no"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert (out / "checkpoint-1" / "COMPLETE").is_file()
    config = json.loads((out / "blade_config.json").read_text())
    assert (config["num_frames"], config["height"], config["width"]) == (17, 128, 128)  # the folder's own size
    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(torch.isfinite(v).all() for v in lora.values())
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and state["micro_step"] == 1 and state["num_processes"] == 1
