"""Training prompt lists for TinyWorld distillation: distinct grammar prompts, held-out prompts excluded.

TDM is data-free, so the student only ever sees prompts. The TinyWorld teacher was trained on a fresh random scene
every sample, while the student's shipped list (`utils/tinyworld_train_prompts.txt`) holds 2,000 prompts: 441 of
the grammar's 450 one-object scenes, but only ~1,560 of its 88,200 two-object scenes. This module draws larger lists
(up to the whole grammar) without replacement, for studies of the prompt set's size.

    python -m blade.tinyworld.prompts --count 20000 --exclude assets/tinyworld/eval_prompts.txt --out prompts.txt

The grammar has 450 one-object and 88,200 two-object scenes (object order matters: it is the drawing order).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from blade.tinyworld.world import (
    BACKGROUNDS,
    COLORS,
    MOTIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    PromptError,
    Scene,
    parse_prompt,
    read_prompts,
)


def all_scene_prompts(num_objects: int) -> list[str]:
    """Every valid prompt of the grammar with `num_objects` objects (1 or 2), in a fixed order. Validity is `Scene`'s
    own (white only on black, two objects of different colours): every combination is offered to it."""
    singles = [ObjectSpec(size=s, color=c, shape=h, motion=m)
               for s, c, h, m in itertools.product(SIZES, COLORS, SHAPES, MOTIONS)]
    prompts = []
    for background in BACKGROUNDS:
        for objects in itertools.product(singles, repeat=num_objects):
            try:
                prompts.append(Scene(objects=objects, background=background).prompt)
            except PromptError:
                continue
    return prompts


def sample_prompts(count: int, seed: int, two_object_share: float = 0.5, exclude: Iterable[str] = ()) -> list[str]:
    """`count` distinct grammar prompts, a `two_object_share` of them with two objects, none in `exclude`.

    Each group is drawn uniformly without replacement; if a group has fewer prompts than asked, all of it is taken
    and the rest comes from the other group. Deterministic for a seed; the result is shuffled.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 0.0 <= two_object_share <= 1.0:
        raise ValueError(f"two_object_share must be in [0, 1], got {two_object_share}")
    excluded = {parse_prompt(p).prompt for p in exclude}
    pools = [[p for p in all_scene_prompts(n) if p not in excluded] for n in (1, 2)]
    available = len(pools[0]) + len(pools[1])
    if count > available:
        raise ValueError(f"the grammar has only {available} prompts outside the excluded ones; asked for {count}")
    want_two = min(round(count * two_object_share), len(pools[1]))
    want_one = min(count - want_two, len(pools[0]))
    want_two = count - want_one
    rng = np.random.default_rng(seed)
    chosen = [pools[0][i] for i in rng.choice(len(pools[0]), want_one, replace=False)]
    chosen += [pools[1][i] for i in rng.choice(len(pools[1]), want_two, replace=False)]
    return [chosen[i] for i in rng.permutation(len(chosen))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--count", type=int, required=True, help="number of distinct prompts to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw")
    parser.add_argument("--two_object_share", type=float, default=0.78,
                        help="share of two-object prompts (0.78: the shipped 2,000-prompt list's share)")
    parser.add_argument("--exclude", nargs="*", default=[],
                        help="grammar prompt files (one a line, # comments) whose prompts must not be drawn, e.g. the "
                        "held-out evaluation prompts")
    parser.add_argument("--out", required=True, help="text file to write, one prompt a line")
    args = parser.parse_args(argv)
    try:
        exclude = [text for f in args.exclude for text, _ in read_prompts(f)]
        prompts = sample_prompts(args.count, args.seed, args.two_object_share, exclude)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    two = sum(" and a " in p for p in prompts)
    print(f"wrote {len(prompts)} prompts ({two} with two objects, {len(exclude)} excluded) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
