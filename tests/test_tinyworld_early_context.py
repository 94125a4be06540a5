"""A student's early context (`EarlyContext`: ASA with more global context at its first steps) as the TinyWorld
evaluation samples it, checked against plain evaluations of the same video at fixed settings: no early step = the
evaluation's own settings, all 8 early = the early settings throughout; a LoRA whose blade_config.json stores an early
context samples with it by default and `--early_context_steps 0` turns it off. The bundled student, one video, CPU."""

import json
import shutil
from pathlib import Path

import pytest

from blade.config import BladeConfig
from blade.tinyworld import evaluate

ROOT = Path(__file__).resolve().parents[1]
LORA = ROOT / "assets" / "tinyworld" / "blade_lora"
STUDENT = ["--lora", str(LORA)]
PROMPT = "a large yellow circle moves right on a gray background"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("early")
    prompts = folder / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    stored = folder / "lora_with_early_context"
    shutil.copytree(LORA, stored)
    config = BladeConfig.load(stored)
    BladeConfig.from_dict({**config.to_dict(), "early_context": {"steps": 1, "max_keep": 0.25, "pool_size": 5}}).save(
        stored
    )
    common = ["--prompts", str(prompts), "--seeds", "5", "--device", "cpu"]
    out = {}
    for name, argv in {
        "plain": ["--lora", str(LORA)],
        "plain_w5": ["--lora", str(LORA), "--max_keep", "0.25", "--pool_size", "5"],
        "none_early": ["--lora", str(LORA), "--early_context_steps", "0"],
        "all_early": ["--lora", str(LORA), "--early_context_steps", "8"],
        "first_early": ["--lora", str(LORA), "--early_context_steps", "1"],
        "stored": ["--lora", str(stored)],
        "stored_off": ["--lora", str(stored), "--early_context_steps", "0"],
    }.items():
        assert evaluate.main([*common, *argv, "--out", str(folder / f"{name}.json")]) == 0
        out[name] = json.loads((folder / f"{name}.json").read_text())
    return out


def _same_video(a: dict, b: dict) -> bool:
    keys = ("adherence", "fidelity", "sparsity", "sparsity_paper")
    return all(a[k] == pytest.approx(b[k], abs=1e-12) for k in keys)


def test_early_steps_switch_the_asa_settings(runs):
    assert _same_video(runs["none_early"], runs["plain"])  # no early step: the evaluation's own settings
    assert _same_video(runs["all_early"], runs["plain_w5"])  # all 8 early: keep <= 0.25, window 5 throughout
    first = runs["first_early"]["sparsity_paper"]
    assert runs["plain_w5"]["sparsity_paper"] < first < runs["plain"]["sparsity_paper"]  # a mix of the two
    assert runs["first_early"]["settings"]["early_context"] == {"steps": 1, "max_keep": 0.25, "pool_size": 5}
    assert runs["none_early"]["settings"]["early_context"] is None


def test_a_lora_samples_with_its_stored_early_context(runs):
    assert _same_video(runs["stored"], runs["first_early"])
    assert _same_video(runs["stored_off"], runs["plain"])
    assert runs["stored"]["settings"]["early_context"] == {"steps": 1, "max_keep": 0.25, "pool_size": 5}


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*STUDENT, "--early_max_keep", "0.3"], "number of steps"),
        ([*STUDENT, "--early_context_steps", "1", "--attention", "dense"], "attention is dense"),
        (["--early_context_steps", "1"], "attention is dense"),  # the teacher samples dense
        ([*STUDENT, "--early_context_steps", "-1"], "steps must be an int >= 0"),
        ([*STUDENT, "--early_context_steps", "1", "--early_pool_size", "0"], "pool_size must be an int >= 1"),
        ([*STUDENT, "--early_context_steps", "1", "--early_max_keep", "1.5"], "max_keep must be in (0, 1]"),
    ],
)
def test_bad_early_flags_are_refused_before_loading(tmp_path, capsys, monkeypatch, argv, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    loads = []
    monkeypatch.setattr(evaluate, "load_pipeline", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    code = evaluate.main(["--prompts", str(prompts), "--device", "cpu", "--out", str(tmp_path / "r.json"), *argv])
    assert code == 2 and message in capsys.readouterr().err and not loads
    assert not (tmp_path / "r.json").exists()
