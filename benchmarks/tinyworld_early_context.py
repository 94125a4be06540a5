"""A TinyWorld student sampled with more global context at its first steps (issue 16, session 13 lead).

    python benchmarks/tinyworld_early_context.py --early_steps 1 [--early_max_keep 0.25 --early_pool_size 5] \\
        --prompts assets/tinyworld/eval_prompts.txt --seeds 1000 1001 --lora assets/tinyworld/blade_lora \\
        --max_keep 0.15 --device cpu --out report.json

Everything after this script's own three flags is `python -m blade.tinyworld.evaluate`'s command line (same videos,
metrics and report). The student's first ``--early_steps`` sampling steps run ASA at ``--early_max_keep`` with pool
window ``--early_pool_size`` (more global tokens: the layout steps, where the x0 trajectories show the duplicated
objects appear); the later steps at the evaluation's own ASA settings (the LoRA's, or ``--max_keep`` /
``--pool_size``). The report's sparsity averages over all calls, so it counts the early steps' lower sparsity.
A study tool, not a sampler option: the switch is a forward pre-hook registered after ASA's own (which advances the
step), changing the shared ASA module's config for the call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import blade.tinyworld.evaluate as evaluation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    parser.add_argument("--early_steps", type=int, required=True, help="leading sampling steps with the early ASA")
    parser.add_argument("--early_max_keep", type=float, default=0.25, help="early steps' kept fraction (0.25)")
    parser.add_argument("--early_pool_size", type=int, default=5, help="early steps' pool window (5)")
    parser.add_argument("-h", "--help", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.help:
        parser.print_help()
        return 0
    if args.early_steps < 0:
        parser.error(f"--early_steps must be >= 0, got {args.early_steps}")
    configure = evaluation.configure_attention

    def configure_with_early_context(pipe, mode, **kwargs):
        handle = configure(pipe, mode, **kwargs)
        if handle is not None and mode == "asa":
            late = handle.config
            early = late.with_sampling_overrides(max_keep=args.early_max_keep, pool_size=args.early_pool_size)
            state = handle._state

            def pick_config(module, hook_args, hook_kwargs):  # ASA's own pre-hook has advanced the step
                state.asa.config = early if state.tracker.step < args.early_steps else late

            handle._transformer.register_forward_pre_hook(pick_config, with_kwargs=True)
        return handle

    evaluation.configure_attention = configure_with_early_context
    try:
        code = evaluation.main(rest)
    finally:
        evaluation.configure_attention = configure
    path = evaluation.build_parser().parse_known_args(rest)[0].out  # where the evaluation wrote its report
    if code == 0 and path:  # the report says how its videos were sampled
        report = json.loads(Path(path).read_text())
        report["settings"]["early_context"] = {"early_steps": args.early_steps, "max_keep": args.early_max_keep,
                                               "pool_size": args.early_pool_size}
        Path(path).write_text(json.dumps(report, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
