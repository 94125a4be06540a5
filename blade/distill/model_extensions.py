"""Model-specific additions to the generic distillation trainer, without the trainer knowing the model.

A model folder names its extension module in blade_defaults.json (`"trainer_extension": "<module>"`, read by
``blade.pipelines.hints.read_model_hints``, which also returns it for folders it recognises, e.g. TinyWorld's);
a trainer preset flag (``--tinyworld``) names one directly. The trainer imports the module by name and calls the
`ModelExtension` functions below; it never imports a model package itself.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType
from typing import Any, Protocol, runtime_checkable

__all__ = ["ModelExtension", "ModelExtensionError", "load_extension"]


@runtime_checkable
class ModelExtension(Protocol):
    """What an extension module provides (module-level functions)."""

    def preset_model_path(self) -> str:
        """The model folder a preset flag for this extension trains when no --pretrained_model_name_or_path is given."""

    def defaults(self) -> dict[str, Any]:
        """Video size / fps (any of num_frames, height, width, fps) under a preset flag, below the folder's own."""

    def check_prompt_cache(self, cache) -> None:
        """Refuse a prompt cache (``blade.prompts.PromptEmbeddingCache``) the model's teacher cannot use: raise
        ``PromptCacheError``."""

    def build_monitor(self, args: argparse.Namespace, shape: tuple, device):
        """The in-training evaluator for --eval_every: `monitor(objective, decode) -> dict` of metrics."""


class ModelExtensionError(ValueError):
    """A named trainer extension module that cannot be imported or lacks a required function."""


_REQUIRED = ("preset_model_path", "defaults", "check_prompt_cache", "build_monitor")


def load_extension(name: str) -> ModuleType:
    """Import the extension module `name` and check that it provides every `ModelExtension` function."""
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise ModelExtensionError(f"cannot import trainer extension {name!r}: {err}") from None
    missing = [f for f in _REQUIRED if not callable(getattr(module, f, None))]
    if missing:
        raise ModelExtensionError(f"trainer extension {name!r} lacks {', '.join(missing)}")
    return module
