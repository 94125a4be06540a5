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
# target CFG 3.5, bundled 2026-12-06, sampling at keep <= 0.17 with pool window 20 since session 12: these 8 videos
# scored 0.83, 0.45, 0.55, 1.0, 1.0, 0.45, 1.0, 1.0 on CPU, mean 0.79, its 48 videos 0.872; with window 5 and keep
# <= 0.25 (sessions 9-11) 0.81 (0.889 on 48); the call-8 student bundled before it 0.74 on these 8 (0.866 on 48),
# recipe v1's 0.74 (0.750), run 6's 0.68; a CPU with other vector units may round differently and draw other
# videos, hence the margin). The floor sits far above what blank videos would score on these prompts (only the
# background right: ~0.11), so a student that draws nothing fails.
STUDENT_PROMPTS = 8
ADHERENCE_FLOOR = 0.70


def test_bundled_student_samples_at_the_papers_sparsity():
    """The shipped student samples at the paper's Wan clamp (keep <= 0.17 of the key blocks) with pool window 20, so
    its sparsity is >= 0.75 in both forms: block (1 - 0.17 at most kept) and the paper's (1 - density - 1/n, the
    pooled keys counted as attended: 1 - 0.17 - 1/20 = 0.78); the values it trained with stay on record
    (BENCHMARKS.md, "Session 12": the window-5 sampling before it was 0.55 in the paper's form and missed two of
    three fresh 24-prompt draws)."""
    from blade.config import BladeConfig

    config = BladeConfig.load(bundled_pipeline_path().parent / "blade_lora")
    max_keep, window = config.asa["max_keep"], config.asa["pool_size"]
    assert (max_keep, window) == (0.17, 20)
    assert 1 - max_keep >= 0.75 and 1 - max_keep - 1 / window >= 0.75
    assert (config.extra["trained_asa_max_keep"], config.extra["trained_asa_pool_size"]) == (0.25, 30)


@pytest.mark.slow
def test_bundled_student_adherence_stays_above_its_floor():
    from blade.tinyworld.evaluate import evaluate, read_prompts

    lora = bundled_pipeline_path().parent / "blade_lora"
    prompts = read_prompts(ROOT / "assets" / "tinyworld" / "eval_prompts.txt")[:STUDENT_PROMPTS]
    report = evaluate(prompts, [1000], lora=str(lora), device="cpu")
    assert report["settings"]["steps"] == 8 and report["settings"]["attention"] == "asa"
    assert report["sparsity"] >= 0.75 and report["sparsity_paper"] >= 0.75  # ASA active, both forms
    assert report["adherence"] >= ADHERENCE_FLOOR, report["adherence"]
