"""benchmarks/tinyworld_early_context.py switches ASA's settings at the given step: checked against plain
`blade.tinyworld.evaluate` runs of the same video (all steps early = the early settings throughout; none = the
evaluation's own), on the bundled TinyWorld student, one video, CPU."""

import importlib.util
import json
from pathlib import Path

import pytest

from blade.tinyworld import evaluate

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a large yellow circle moves right on a gray background"


def _script():
    spec = importlib.util.spec_from_file_location("early_context", ROOT / "benchmarks" / "tinyworld_early_context.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("early")
    prompts = folder / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    common = ["--prompts", str(prompts), "--seeds", "5", "--lora", str(ROOT / "assets" / "tinyworld" / "blade_lora"),
              "--device", "cpu"]
    out = {}
    for name, argv in {
        "plain": common,
        "plain_w5": [*common, "--max_keep", "0.25", "--pool_size", "5"],
    }.items():
        assert evaluate.main([*argv, "--out", str(folder / f"{name}.json")]) == 0
        out[name] = json.loads((folder / f"{name}.json").read_text())
    script = _script()
    for name, early in {"none_early": 0, "all_early": 8, "first_early": 1}.items():
        assert script.main(["--early_steps", str(early), *common, "--out", str(folder / f"{name}.json")]) == 0
        out[name] = json.loads((folder / f"{name}.json").read_text())
    assert evaluate.configure_attention.__name__ == "configure_attention"  # the patch is undone
    return out


def _same_video(a: dict, b: dict) -> bool:
    keys = ("adherence", "fidelity", "sparsity", "sparsity_paper")
    return all(a[k] == pytest.approx(b[k], abs=1e-12) for k in keys)


def test_early_steps_switch_the_asa_settings(runs):
    assert _same_video(runs["none_early"], runs["plain"])  # no early step: the evaluation's own settings
    assert _same_video(runs["all_early"], runs["plain_w5"])  # all 8 early: keep <= 0.25, window 5 throughout
    first = runs["first_early"]["sparsity_paper"]
    assert runs["plain_w5"]["sparsity_paper"] < first < runs["plain"]["sparsity_paper"]  # a mix of the two
    assert runs["first_early"]["settings"]["early_context"] == {"early_steps": 1, "max_keep": 0.25, "pool_size": 5}
