"""The bundled TinyWorld pipeline: it exists, stays within the size budget, and the README's main command runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blade.tinyworld.model import TINYWORLD_DEFAULTS, bundled_pipeline_path
from blade.video import read_mp4

ROOT = Path(__file__).resolve().parents[1]
MAX_BUNDLE_BYTES = 30 * 2**20  # TINYWORLD.md: base pipeline + LoRA at most 30 MB


def test_bundle_size_budget():
    weights = list((ROOT / "assets" / "tinyworld").rglob("*.safetensors"))
    assert bundled_pipeline_path().is_dir() and weights
    assert sum(f.stat().st_size for f in weights) <= MAX_BUNDLE_BYTES


@pytest.mark.slow
def test_main_command_generates_a_playable_video(tmp_path):
    """`python wanx/train/inference.py --prompt ...` with every default (steps reduced to keep CI short)."""
    prompt = "a small green square moves up on a gray background"
    cmd = [sys.executable, str(ROOT / "wanx/train/inference.py"), "--prompt", prompt, "--output_dir", str(tmp_path)]
    lora = bundled_pipeline_path().parent / "blade_lora"
    if not lora.exists():  # the teacher alone: any step count works
        cmd += ["--steps", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    [video] = tmp_path.glob("*.mp4")
    frames = read_mp4(video)
    assert frames.shape == (TINYWORLD_DEFAULTS["num_frames"], TINYWORLD_DEFAULTS["height"],
                            TINYWORLD_DEFAULTS["width"], 3)
    sidecar = json.loads(video.with_suffix(".json").read_text())
    assert sidecar["prompt"] == prompt and sidecar["model_path"] == str(bundled_pipeline_path())
