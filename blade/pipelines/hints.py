"""Per-model-folder defaults (video size, fps, text length) that a diffusers folder does not carry itself.

A model folder may hold `blade_defaults.json` (the name the inference scripts always read) with any of
`num_frames`, `height`, `width`, `fps`, `max_sequence_length`, and `"tinyworld": true` for a TinyWorld pipeline
(prompts must follow its grammar), and `"trainer_extension": "<module>"` naming the module that extends the
distillation trainer for this model (``blade.distill.model_extensions``; a TinyWorld folder gets
`TINYWORLD_EXTENSION`). `blade_hints.json`, the name the trainer read before, is still read when
`blade_defaults.json` is absent. A TinyWorld pipeline folder without either file (trained before the file existed)
is recognised by its word-level tokenizer over exactly the TinyWorld vocabulary, and gets TinyWorld's defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "EXTENSION_KEY",
    "HINT_KEYS",
    "LEGACY_HINTS_FILE",
    "MODEL_HINTS_FILE",
    "ModelHintsError",
    "TINYWORLD_EXTENSION",
    "is_tinyworld_tokenizer",
    "read_model_hints",
    "tinyworld_hints",
]

MODEL_HINTS_FILE = "blade_defaults.json"
LEGACY_HINTS_FILE = "blade_hints.json"
HINT_KEYS = ("num_frames", "height", "width", "fps", "max_sequence_length")
EXTENSION_KEY = "trainer_extension"  # the folder's trainer extension module (blade.distill.model_extensions)
TINYWORLD_EXTENSION = "blade.tinyworld.distill"


class ModelHintsError(ValueError):
    """A model folder's blade_defaults.json / blade_hints.json that cannot be read."""


def tinyworld_hints() -> dict[str, Any]:
    """TinyWorld's video size, fps and text length, with `"tinyworld": True` and its trainer extension."""
    from blade.tinyworld.model import TINYWORLD_DEFAULTS

    return {**{k: TINYWORLD_DEFAULTS[k] for k in HINT_KEYS}, "tinyworld": True, EXTENSION_KEY: TINYWORLD_EXTENSION}


def is_tinyworld_tokenizer(model_path: str | os.PathLike) -> bool:
    """True when `model_path/tokenizer/tokenizer.json` is a word-level tokenizer over exactly TinyWorld's words."""
    path = Path(model_path) / "tokenizer" / "tokenizer.json"
    try:
        if path.stat().st_size > 1_000_000:  # a real T5 tokenizer (megabytes): not TinyWorld's
            return False
        model = json.loads(path.read_text(encoding="utf-8")).get("model") or {}
    except (OSError, ValueError):
        return False
    if model.get("type") != "WordLevel" or not isinstance(model.get("vocab"), dict):
        return False
    from blade.tinyworld.model import build_tokenizer

    return set(model["vocab"]) == set(build_tokenizer().get_vocab())


def read_model_hints(model_path: str | os.PathLike) -> dict[str, Any]:
    """The folder's defaults: blade_defaults.json, else blade_hints.json, else TinyWorld's for a TinyWorld folder.

    Returns:
        A dict with any of HINT_KEYS, `"tinyworld"` (bool) and EXTENSION_KEY (a module name); `{}` when the
        folder says nothing.

    Raises:
        ModelHintsError: the file exists but is not a JSON object.
    """
    folder = Path(model_path)
    for name in (MODEL_HINTS_FILE, LEGACY_HINTS_FILE):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ModelHintsError(f"cannot read {path}: {err}") from None
        if not isinstance(data, dict):
            raise ModelHintsError(f"{path} must hold a JSON object, got {type(data).__name__}")
        hints = {k: data[k] for k in HINT_KEYS if k in data}
        extension = data.get(EXTENSION_KEY)
        if extension is not None:
            if not isinstance(extension, str) or not extension:
                raise ModelHintsError(f"{path}: {EXTENSION_KEY!r} must name a Python module, got {extension!r}")
            hints[EXTENSION_KEY] = extension
        if data.get("tinyworld"):
            hints = {**tinyworld_hints(), **hints}
        return hints
    if is_tinyworld_tokenizer(folder):
        return tinyworld_hints()
    return {}
