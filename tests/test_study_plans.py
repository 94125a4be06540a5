"""Every distillation-study plan (benchmarks/study_plans/*.txt) is a valid trainer command line.

A plan's run is the study script's common flags followed by the run's own; a typo or a removed flag would otherwise
surface only on the GPU machine, after the device call has started. Parsed here with the trainer's own parser and
checks (`blade.distill.trainer.parse_args`), no model loaded.
"""

import re
import shlex
from pathlib import Path

import pytest

from blade.distill.trainer import parse_args

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "tinyworld_study.sh"
PLANS = sorted((ROOT / "benchmarks" / "study_plans").glob("*.txt"))


def _common_flags(run: str) -> list[str]:
    """The trainer flags tinyworld_study.sh gives every run, its shell variables filled in."""
    text = STUDY.read_text()
    match = re.search(r"train_wanx_tdm\.py(.*?)\$flags", text, re.S)
    assert match, "tinyworld_study.sh no longer launches train_wanx_tdm.py with $flags last"
    line = match.group(1).replace("\\\n", " ")
    for var, value in (("${EVAL_SEEDS:-1000 1001}", "1000 1001"), ('"$MODEL"', "assets/tinyworld/pipeline"),
                       ('"$RUN/prompts"', f"{run}/prompts"), ('"$RUN/$name"', f"{run}/x"),
                       ('"$EVAL_EVERY"', "50"), ('"$MINUTES"', "8")):
        line = line.replace(var, value)
    assert "$" not in line, f"an unfilled shell variable in the study's trainer flags: {line}"
    return shlex.split(line)


def _runs(plan: Path) -> list[tuple[str, str]]:
    runs = []
    for line in plan.read_text().splitlines():
        name, _, flags = line.strip().partition(" ")
        if name and not name.startswith("#"):
            runs.append((name, flags))
    return runs


def test_the_study_script_is_parsed():
    flags = _common_flags("runs/study")
    assert flags[0] == "--tinyworld" and "--max_train_minutes" in flags and "--eval_every" in flags


@pytest.mark.parametrize("plan", PLANS, ids=[p.stem for p in PLANS])
def test_every_run_of_the_plan_parses(plan):
    runs = _runs(plan)
    assert runs, f"{plan.name} has no run"
    assert len({name for name, _ in runs}) == len(runs), f"{plan.name}: two runs share a name (one output folder)"
    for name, flags in runs:
        argv = _common_flags("runs/study") + shlex.split(flags.replace("{RUN}", "runs/study"))
        args = parse_args("wan", argv)
        assert args.tinyworld and args.max_train_steps >= 1, name
