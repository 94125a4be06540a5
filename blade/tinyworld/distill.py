"""TinyWorld's extension of the distillation trainer (``blade.distill.model_extensions.ModelExtension``).

The trainer loads this module by name (``blade.pipelines.hints.TINYWORLD_EXTENSION``) for a TinyWorld model folder
or under its `--tinyworld` preset; it does not import blade.tinyworld itself.
"""

from __future__ import annotations

import argparse
from typing import Any

from blade.prompts import PromptCacheError, PromptEmbeddingCache

__all__ = ["build_monitor", "check_prompt_cache", "check_tinyworld_prompt_cache", "defaults", "preset_model_path"]


def preset_model_path() -> str:
    """`--tinyworld` without --pretrained_model_name_or_path: the bundled pipeline, assets/tinyworld/pipeline."""
    from blade.tinyworld.model import bundled_pipeline_path

    return str(bundled_pipeline_path())


def defaults() -> dict[str, Any]:
    """`--tinyworld`'s video size and fps (below an explicit flag and the model folder's blade_defaults.json)."""
    from blade.tinyworld.model import TINYWORLD_DEFAULTS

    return {k: TINYWORLD_DEFAULTS[k] for k in ("num_frames", "height", "width", "fps")}


def check_tinyworld_prompt_cache(cache: PromptEmbeddingCache) -> None:
    """Refuse a prompt cache that feeds the TinyWorld teacher text inputs it was never trained on.

    The teacher learned CFG's unconditional branch from the empty prompt "" and saw text padded to 32 tokens.
    Wan's default negative prompt is out of TinyWorld's vocabulary (~77 `<unk>` tokens): with it the CFG direction
    is ~3x larger and the teacher's CFG targets are saturated; 512-token padding also shifts the cross-attention.
    """
    from blade.tinyworld.model import TINYWORLD_DEFAULTS

    problems = []
    negative = (cache.index.get("negative") or {}).get("prompt")
    if negative:
        problems.append(f"its negative prompt is {negative[:40]!r}... instead of the empty prompt")
    want = TINYWORLD_DEFAULTS["max_sequence_length"]
    if cache.max_length is not None and cache.max_length != want:
        problems.append(f"it was encoded at {cache.max_length} text tokens instead of {want}")
    if problems:
        raise PromptCacheError(
            f"{cache.directory} does not match the TinyWorld teacher: {'; '.join(problems)}. Re-encode the prompts "
            f"with utils/process_prompts_wanx.py ... --negative_prompt '' --max_length {want}."
        )


check_prompt_cache = check_tinyworld_prompt_cache


def build_monitor(args: argparse.Namespace, shape: tuple, device):
    """The in-training evaluator for --eval_every (the world's metrics need its grammar)."""
    from blade.tinyworld.model import bundled_pipeline_path
    from blade.tinyworld.monitor import TinyWorldMonitor
    from blade.tinyworld.world import read_prompts

    prompts_file = args.eval_prompts or bundled_pipeline_path().parent / "eval_prompts.txt"
    prompts = [text for text, _ in read_prompts(prompts_file)]  # grammar-checked, errors name the line
    return TinyWorldMonitor(args.pretrained_model_name_or_path, prompts, args.eval_seeds,
                            tuple(shape[1:]), (args.num_frames, args.height, args.width), device,
                            batch_size=max(args.train_batch_size, 8))
