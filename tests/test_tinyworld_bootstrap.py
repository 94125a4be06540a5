"""benchmarks/tinyworld_bootstrap.py: one-draw pass rates of issue 16's check against hand-enumerated probabilities."""

import importlib.util
import json
import random
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tinyworld_bootstrap.py"
spec = importlib.util.spec_from_file_location("tinyworld_bootstrap", SCRIPT)
bootstrap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bootstrap)

DRAWS = 20000
TOL = 0.015  # > 4 binomial standard deviations at 20,000 draws (sd <= 0.0036)

# (student adherence, teacher adherence, student fidelity, teacher fidelity)
A = (1.0, 0.5, 0.1, 0.1)  # adherence met alone (1.0 >= 0.48)
B = (0.0, 1.0, 0.1, 0.1)  # adherence missed alone
C = (0.9, 0.9, 0.3, 0.2)  # fidelity ratio 1.5: missed alone
D = (0.9, 0.9, 0.1, 0.2)  # fidelity ratio 0.5: met alone


def test_adherence_pass_rate_matches_the_enumerated_probability():
    rng = random.Random(0)
    # n = 1: half the draws are A -> 1/2
    assert bootstrap.pass_rates([A, B], 1, DRAWS, rng)["pass"] == pytest.approx(0.5, abs=TOL)
    # n = 2 (4 equally likely ordered draws): AA passes; AB means 0.5 vs 0.75 - 0.02 misses; BB misses -> 1/4
    assert bootstrap.pass_rates([A, B], 2, DRAWS, rng)["pass"] == pytest.approx(0.25, abs=TOL)
    # shifted by +0.5: AB 1.0 vs 0.73 passes, BB 0.5 vs 0.98 misses -> 3/4
    shifted = bootstrap.pass_rates([A, B], 2, DRAWS, rng, adherence_shift=0.5)
    assert shifted["pass"] == pytest.approx(0.75, abs=TOL)
    assert shifted["fidelity_pass"] == 1.0  # equal fidelities: ratio 1.0 <= 1.2 on every draw


def test_level_student_swaps_each_pair_with_probability_one_half():
    rng = random.Random(1)
    # n = 1: A as drawn passes, A swapped (0.5 vs 1.0) misses, B as drawn misses, B swapped (1.0 vs 0.0) passes -> 1/2
    assert bootstrap.pass_rates([A, B], 1, DRAWS, rng, swap=True)["pass"] == pytest.approx(0.5, abs=TOL)
    # one pair only: as drawn it always passes, swapped it never does -> 1/2 (without swap: 1)
    assert bootstrap.pass_rates([A], 1, DRAWS, rng, swap=True)["pass"] == pytest.approx(0.5, abs=TOL)
    assert bootstrap.pass_rates([A], 1, 50, rng)["pass"] == 1.0


def test_fidelity_pass_rate_and_ratio_spread():
    r = bootstrap.pass_rates([C, D], 2, DRAWS, random.Random(2))
    # CC ratio 1.5 misses (1/4); CD 0.2 / 0.2 = 1.0 and DD 0.5 pass (3/4); adherence equal on every draw
    assert r["fidelity_pass"] == pytest.approx(0.75, abs=TOL) and r["adherence_pass"] == 1.0
    assert r["pass"] == r["fidelity_pass"]
    # the ratio over draws: 1.5 (1/4), 1.0 (1/2), 0.5 (1/4) -> mean 1.0, sd sqrt(0.125)
    assert r["fidelity_ratio_mean"] == pytest.approx(1.0, abs=0.01)
    assert r["fidelity_ratio_sd"] == pytest.approx(0.125 ** 0.5, abs=0.01)


def _report(path: Path, rows) -> str:
    videos = [{"prompt": p, "seed": s, "adherence": a, "fidelity": f} for p, s, a, f in rows]
    path.write_text(json.dumps({"videos": videos}))
    return str(path)


def test_cli_pairs_by_prompt_and_seed_and_is_reproducible(tmp_path, capsys):
    teacher = _report(tmp_path / "t.json", [("p", 1, A[1], A[3]), ("q", 1, B[1], B[3])])
    student = _report(tmp_path / "s.json", [("q", 1, B[0], B[2]), ("p", 1, A[0], A[2])])  # order differs
    outs = []
    for k in range(2):
        out = tmp_path / f"r{k}.json"
        args = ["--teacher", teacher, "--student", student, "--sizes", "1", "2", "--draws", "4000", "--json", str(out)]
        assert bootstrap.main(args) == 0
        outs.append(json.loads(out.read_text()))
    assert outs[0] == outs[1]  # same seed, same draws
    arms = outs[0]["arms"]
    assert outs[0]["paired_videos"] == 2 and set(arms) == {"student", "level", "student+0.05"}
    assert arms["student"][1]["videos"] == 2 and arms["student"][1]["pass"] == pytest.approx(0.25, abs=0.05)
    assert "| level | 1 |" in capsys.readouterr().out


def test_a_student_video_without_its_teacher_video_is_an_error(tmp_path):
    teacher = _report(tmp_path / "t.json", [("p", 1, 0.5, 0.1)])
    student = _report(tmp_path / "s.json", [("p", 2, 0.5, 0.1)])
    with pytest.raises(ValueError, match="no teacher video"):
        bootstrap.main(["--teacher", teacher, "--student", student, "--draws", "10"])
