"""Table of the distillation study's evaluation curves: adherence (fidelity) of each run at each evaluated step.

    python benchmarks/study_table.py runs/study [--every 100]

Reads RUN/<name>/eval.jsonl (the trainer's --eval_every records; a resumed run's later record of a step wins) and
RUN/<name>/logs.jsonl (steps reached, mean step time, last losses) of every run folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_jsonl(path: Path) -> dict[int, dict]:
    records: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[int(record["step"])] = record
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the study's run folder (one sub-folder per run)")
    parser.add_argument("--every", type=int, default=100, help="show the evaluations at multiples of this step")
    args = parser.parse_args()
    runs = sorted(p for p in Path(args.run).iterdir() if (p / "eval.jsonl").is_file())
    evals = {p.name: read_jsonl(p / "eval.jsonl") for p in runs}
    logs = {p.name: read_jsonl(p / "logs.jsonl") for p in runs}
    steps = sorted({s for e in evals.values() for s in e if s % args.every == 0})
    print("| run | " + " | ".join(f"step {s}" for s in steps) + " | last (step) | s/step |")
    print("|---|" + "---|" * (len(steps) + 2))
    for name in evals:
        def cell(record: dict | None) -> str:
            if not record:
                return ""
            return f"{record['eval_adherence']:.3f} ({record['eval_fidelity']:.3f})"
        last_step = max(evals[name]) if evals[name] else 0
        times = [r.get("step_time", 0.0) for r in logs[name].values()]
        speed = sorted(times)[len(times) // 2] if times else float("nan")
        row = [cell(evals[name].get(s)) for s in steps] + [f"{cell(evals[name].get(last_step))} ({last_step})",
                                                            f"{speed:.3f}"]
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
