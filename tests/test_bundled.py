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


# Regression guard for the shipped BLADE student (not a timing): its adherence on the first held-out prompts must
# stay above a floor set below what it measured (BENCHMARKS.md, TinyWorld Table 1: the study's call-10 ASA student,
# target CFG 3.5, bundled 2026-12-06, sampling with pool window 5 since study call 13: these 8 videos scored
# 0.83, 0.91, 0.27, 1.0, 1.0, 0.45, 1.0, 1.0 on CPU, mean 0.81, its 48 videos 0.889; with its trained window 30 0.79
# (0.872 on 48); the call-8 student bundled before it 0.74 on these 8 (0.866 on 48), recipe v1's 0.74 (0.750), run
# 6's 0.68; a CPU with other vector units may round differently and draw other videos, hence the margin; the floor
# was 0.65 before call 13). The floor sits far above what blank videos would score on these prompts (only the
# background right: ~0.11), so a student that draws nothing fails.
STUDENT_PROMPTS = 8
ADHERENCE_FLOOR = 0.70


def test_bundled_student_samples_with_tinyworld_global_token_count():
    """The shipped student samples with the pool window that gives TinyWorld's 5,120 tokens the ~1,100 global tokens
    of the full-size setting (5, not Wan's 30: BENCHMARKS.md, call 13), and keeps the window it trained with on
    record."""
    from blade.config import BladeConfig
    from blade.families import scaled_pool_size
    from blade.tinyworld.model import VIDEO_TOKENS

    config = BladeConfig.load(bundled_pipeline_path().parent / "blade_lora")
    assert VIDEO_TOKENS == 40 * 128  # 5 latent frames x 32 x 32, patch 1
    assert config.asa["pool_size"] == scaled_pool_size(VIDEO_TOKENS) == 5
    assert config.extra["trained_asa_pool_size"] == 30


@pytest.mark.slow
def test_bundled_student_adherence_stays_above_its_floor():
    from blade.tinyworld.evaluate import evaluate, read_prompts

    lora = bundled_pipeline_path().parent / "blade_lora"
    prompts = read_prompts(ROOT / "assets" / "tinyworld" / "eval_prompts.txt")[:STUDENT_PROMPTS]
    report = evaluate(prompts, [1000], lora=str(lora), device="cpu")
    assert report["settings"]["steps"] == 8 and report["settings"]["attention"] == "asa"
    assert report["sparsity"] >= 0.75  # ASA active at the student's trained sparsity
    assert report["adherence"] >= ADHERENCE_FLOOR, report["adherence"]
