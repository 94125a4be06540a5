"""benchmarks/tinyworld_paired.py: the paired comparison and issue 16's target line, on hand-made reports."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tinyworld_paired.py"
spec = importlib.util.spec_from_file_location("tinyworld_paired", SCRIPT)
paired = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired)


def _report(path: Path, rows) -> str:
    videos = [{"prompt": p, "seed": s, "adherence": a, "fidelity": f, "duplicated": d} for p, s, a, f, d in rows]
    path.write_text(json.dumps({"videos": videos}))
    return str(path)


def test_pairs_by_prompt_and_seed_and_checks_the_target(tmp_path, capsys):
    teacher = [_report(tmp_path / "t1.json", [("a", 1, 1.0, 0.10, 0.0), ("b", 1, 0.8, 0.20, 0.0)]),
               _report(tmp_path / "t2.json", [("a", 2, 0.6, 0.30, 0.5)])]
    # the student's videos in another order: pairing is by (prompt, seed), not by position
    student = _report(tmp_path / "s.json", [("b", 1, 0.8, 0.25, 0.5), ("a", 2, 0.5, 0.30, 0.0),
                                            ("a", 1, 0.9, 0.10, 0.0)])
    out = tmp_path / "r.json"
    assert paired.main(["--teacher", *teacher, "--student", f"s={student}", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["s"]
    # by hand: differences 0.0, -0.1, -0.1 -> mean -1/15, sample sd 0.057735, se 0.033333
    assert r["videos"] == 3 and r["paired_difference"] == pytest.approx(-0.2 / 3)
    assert r["paired_standard_error"] == pytest.approx(0.0577350 / 3 ** 0.5, rel=1e-5)
    assert r["adherence"] == pytest.approx(2.2 / 3) and r["teacher_adherence"] == pytest.approx(0.8)
    assert r["fidelity_ratio"] == pytest.approx((0.65 / 3) / 0.2) and r["duplicated"] == pytest.approx(0.5 / 3)
    # adherence 0.7333 < 0.78 (missed by 0.0467); fidelity 0.2167 <= 0.24 (met)
    assert not r["adherence_met"] and r["fidelity_met"]
    assert "missed: adherence by 0.0467" in capsys.readouterr().out


def test_a_student_video_without_its_teacher_video_is_an_error(tmp_path):
    teacher = _report(tmp_path / "t.json", [("a", 1, 1.0, 0.1, 0.0)])
    student = _report(tmp_path / "s.json", [("a", 2, 1.0, 0.1, 0.0)])
    with pytest.raises(ValueError, match="no teacher video"):
        paired.main(["--teacher", teacher, "--student", f"s={student}"])


def test_paired_difference_of_any_field_and_the_chart_script(tmp_path):
    """paired_difference on `duplicated` by hand, and benchmarks/plot_eval_reports.py writes its PNG from the same
    pairing (and refuses a student video without its teacher video)."""
    teacher = paired.load_videos([_report(tmp_path / "t.json", [("a", 1, 1.0, 0.1, 0.0), ("b", 1, 0.8, 0.2, 0.5),
                                                                ("c", 1, 0.9, 0.2, 0.0)])])
    student_path = _report(tmp_path / "s.json", [("a", 1, 0.9, 0.1, 0.5), ("b", 1, 0.8, 0.2, 0.5),
                                                 ("c", 1, 0.9, 0.2, 1.0)])
    # differences 0.5, 0.0, 1.0: mean 0.5, sample sd 0.5, se 0.5 / sqrt(3)
    mean, se = paired.paired_difference(teacher, paired.load_videos([student_path]), "duplicated")
    assert mean == pytest.approx(0.5) and se == pytest.approx(0.5 / 3 ** 0.5)

    plot_spec = importlib.util.spec_from_file_location("plot_eval_reports", SCRIPT.parent / "plot_eval_reports.py")
    plot = importlib.util.module_from_spec(plot_spec)
    plot_spec.loader.exec_module(plot)
    out = tmp_path / "chart.png"
    plot.main(["--teacher", str(tmp_path / "t.json"), "--reports", f"s={student_path}", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # pooled sets: the teacher's and the student's videos split over two reports each give the same pairing
    teacher_2 = _report(tmp_path / "t2.json", [("d", 2, 0.6, 0.3, 1.0)])
    student_2 = _report(tmp_path / "s2.json", [("d", 2, 1.0, 0.3, 0.0)])
    rows = plot.main(["--teacher", str(tmp_path / "t.json"), teacher_2, "--reports", f"s={student_path},{student_2}",
                      "--out", str(out)])
    # adherence 0.9, 0.8, 0.9, 1.0 against 1.0, 0.8, 0.9, 0.6: means 0.9 and 0.825
    assert rows["s"]["adherence"][:2] == pytest.approx((0.9, 0.825))
    stray = _report(tmp_path / "x.json", [("z", 9, 0.5, 0.1, 0.0)])
    with pytest.raises(ValueError, match="no teacher video"):
        plot.main(["--teacher", str(tmp_path / "t.json"), "--reports", f"x={stray}", "--out", str(out)])


def test_sparsity_columns_are_per_video_means_and_absent_from_older_reports(tmp_path, capsys):
    """Block and paper sparsity are averaged over the paired videos (by hand); a report without them shows '-'."""
    teacher = _report(tmp_path / "t.json", [("a", 1, 1.0, 0.1, 0.0), ("b", 1, 1.0, 0.1, 0.0)])
    videos = [{"prompt": "a", "seed": 1, "adherence": 1.0, "fidelity": 0.1, "sparsity": 0.80, "sparsity_paper": 0.76},
              {"prompt": "b", "seed": 1, "adherence": 1.0, "fidelity": 0.1, "sparsity": 0.70, "sparsity_paper": 0.50}]
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"videos": videos}))
    old = _report(tmp_path / "old.json", [("a", 1, 1.0, 0.1, 0.0)])
    out = tmp_path / "r.json"
    assert paired.main(["--teacher", teacher, "--student", f"new={new}", f"old={old}", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["new"]["sparsity"] == pytest.approx(0.75) and r["new"]["sparsity_paper"] == pytest.approx(0.63)
    assert "sparsity" not in r["old"]
    lines = capsys.readouterr().out.splitlines()
    assert "| 0.750 / 0.630 |" in lines[2] and "| - / - |" in lines[3]
