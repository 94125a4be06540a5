"""Average the weight updates of several BLADE student LoRAs (a weight-space ensemble of students trained from the
same base with different seeds), written as one LoRA folder that every loader reads.

    python benchmarks/average_loras.py --loras RUN_A RUN_B --out AVERAGED

Each LoRA i adds dW_i = B_i A_i (scale alpha / rank = 1 in BLADE's folders) to a Linear. The mean
(1/N) sum_i B_i A_i is exactly the rank-(N r) LoRA with A = [A_1; ...; A_N] (rows stacked) and
B = [B_1, ..., B_N] / N (columns side by side): no approximation, N times the rank. Averaging A and B separately would
not be the average update (the students' A are different random draws). The folders must hold students of one
recipe (same blade_config.json apart from nothing; the rank must equal alpha in each), else the average is refused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blade.config import CONFIG_NAME as CONFIG
from blade.pipelines.loading import LORA_WEIGHT_NAME as WEIGHTS


def average_lora_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`{name.lora_A.weight: [N r, in], name.lora_B.weight: [out, N r]}`: the LoRA whose update B A is the mean of
    the inputs' updates (each `lora_A` `[r, in]`, `lora_B` `[out, r]`, scale 1)."""
    keys = set(states[0])
    if any(set(s) != keys for s in states[1:]):
        raise ValueError("the LoRAs adapt different layers")
    n = len(states)
    out = {}
    for key in sorted(keys):
        if key.endswith("lora_A.weight"):
            out[key] = torch.cat([s[key] for s in states], dim=0)
        elif key.endswith("lora_B.weight"):
            out[key] = torch.cat([s[key] for s in states], dim=1) / n
        else:
            raise ValueError(f"unexpected key {key!r} (expected lora_A / lora_B weights)")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loras", nargs="+", required=True, help="student LoRA folders (blade_config.json + weights)")
    parser.add_argument("--out", required=True, help="folder to write the averaged LoRA to (must not exist)")
    args = parser.parse_args(argv)
    if len(args.loras) < 2:
        parser.error("--loras needs at least two folders")
    out = Path(args.out)
    if out.exists():
        parser.error(f"--out {out} exists; choose a new folder")
    configs = [json.loads((Path(f) / CONFIG).read_text()) for f in args.loras]
    for folder, config in zip(args.loras[1:], configs[1:]):
        if config != configs[0]:
            diff = sorted(k for k in set(config) | set(configs[0]) if config.get(k) != configs[0].get(k))
            parser.error(f"{folder}'s {CONFIG} differs from {args.loras[0]}'s in {diff}: not one recipe")
    rank, alpha = configs[0].get("lora_rank"), configs[0].get("lora_alpha")
    if rank != alpha:
        parser.error(f"lora_rank {rank} != lora_alpha {alpha}: only scale-1 LoRAs are averaged")
    states = [load_file(str(Path(f) / WEIGHTS)) for f in args.loras]
    averaged = average_lora_states(states)
    out.mkdir(parents=True)
    save_file(averaged, str(out / WEIGHTS))
    config = dict(configs[0], lora_rank=rank * len(states), lora_alpha=alpha * len(states))
    (out / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote the mean of {len(states)} LoRAs (rank {rank * len(states)}) to {out}")


if __name__ == "__main__":
    main()
