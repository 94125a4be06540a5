"""benchmarks/train_step.py on a CPU with tiny configs: both families, dense and ASA arms, the JSON and the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_step_benchmark_tiny_cpu(tmp_path):
    out = tmp_path / "train_step.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--tiny", "--device", "cpu",
                           "--steps", "1", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [(r["family"], r["attention"], r["batch"]) for r in rows] == [
        ("wan", "dense", 1), ("wan", "asa", 1), ("cogvideox", "dense", 1), ("cogvideox", "asa", 1)]
    for row in rows:
        for key in ("model", "first step s", "steady step s (median)", "peak GiB", "sparsity"):
            assert key in row, (key, row)
        assert row["first step s"] > 0 and row["steady step s (median)"] > 0 and len(row["steady_steps_s"]) == 1
        assert row["losses_finite"] and len(row["draws_fake_gen"]) == 2
        assert row["peak GiB"] is None  # CPU: no CUDA allocator statistics
        assert 0 <= row["sparsity"] < 1
    for dense, asa in (rows[0:2], rows[2:4]):
        assert dense["sparsity"] == 0 and asa["ASA speedup"] > 0
        assert dense["draws_fake_gen"] == asa["draws_fake_gen"]  # paired arms: same seeds, same draws
    assert data["meta"]["tiny"] is True and data["meta"]["device"] == "cpu"
    table = proc.stdout.strip().splitlines()
    assert table[-6].startswith("| model | attention | batch | first step s | steady step s (median) | peak GiB")
    assert table[-5].startswith("|---|") and all(line.startswith("| ") for line in table[-4:])  # printed last


def test_train_step_benchmark_phases_add_up(tmp_path):
    """--phases: every phase ran, the teacher's share lies inside the generator forward, and the phases do not
    overlap: their sum stays under the step time, the rest ("other": optimizer steps, draws) is >= 0."""
    out = tmp_path / "phases.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--tiny", "--device", "cpu",
                           "--models", "wan", "--attention", "asa", "--steps", "1", "--phases", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row, = json.loads(out.read_text())["rows"]
    phases = row["phases_s"]
    for name in ("rollout", "fake forward", "fake backward", "generator forward", "generator backward"):
        assert phases[name] > 0, name
    assert 0 < phases["teacher (in generator forward)"] <= phases["generator forward"]
    assert 0 <= phases["other"] < row["steady step s (median)"]
