"""benchmarks/tinyworld_trajectory.py on the bundled TinyWorld student (CPU, one video)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_student_trajectory_scores_every_step_and_its_last_x0_is_the_video(tmp_path):
    """The student's last step returns its x0 as the sample, so the last recorded x0, decoded, is the video the
    pipeline returned: its scores must equal the final video's (the recorder reads the sampler's own x0)."""
    script = ROOT / "benchmarks" / "tinyworld_trajectory.py"
    spec = importlib.util.spec_from_file_location("tinyworld_trajectory", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a large yellow circle moves right on a gray background\n")
    out = tmp_path / "t.json"
    assert module.main(["--prompts", str(prompts), "--seeds", "42", "--lora",
                        str(ROOT / "assets" / "tinyworld" / "blade_lora"), "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (video,) = report["videos"]
    assert [s["step"] for s in video["steps"]] == list(range(8)) and report["attention"] == "asa"
    assert video["steps"][-1]["adherence"] == video["final"]["adherence"]
    assert video["steps"][-1]["blobs"] == video["final"]["blobs"]
    assert all(len(s["blobs"]) == 1 for s in video["steps"])  # one object in the prompt
