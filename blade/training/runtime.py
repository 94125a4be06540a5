"""The training runtime both trainers share: RNG states, atomic checkpoint writes, resume, the time box.

Used by the TDM trainer (`blade.distill.trainer`) and TinyWorld's VAE / teacher trainer (`blade.tinyworld.train`).
It knows no model, optimizer or process group: each trainer decides what its checkpoint holds and how its processes
agree; this module owns how every random stream is captured and put back (so that a resumed run is bit-identical to
an uninterrupted one) and how a checkpoint reaches the disk without ever leaving a half-written one that looks whole.

Checkpoint folders (TDM): written into ``checkpoint-N.tmp``, fsynced, sealed with a ``COMPLETE`` marker written
last, then renamed to ``checkpoint-N``; only sealed folders are resumed from (`find_latest_checkpoint`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "COMPLETE_MARKER", "CheckpointError", "NonFiniteError", "TimeBox", "atomic_write", "checkpoint_folder",
    "find_latest_checkpoint", "fresh_folder", "generator_states", "previous_checkpoint", "replace_folder",
    "resolve_resume", "rng_state", "seal_folder", "seed_everything", "set_generator_states", "set_rng_state",
    "temporary_folder",
]

COMPLETE_MARKER = "COMPLETE"

RandomStream = torch.Generator | np.random.Generator


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from (incomplete, corrupt, mismatched), or a save that failed."""


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss, gradient or weight: stopped before any checkpoint could hold it."""


# ----------------------------------------------------------------------------------------------------------------
# RNG states
# ----------------------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed the global python, numpy and torch (CPU and every CUDA device) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def generator_states(generators: Mapping[str, RandomStream]) -> dict[str, Any]:
    """The state of each named private stream (a torch.Generator or a numpy Generator), by the same names."""
    return {name: _get_state(g) for name, g in generators.items()}


def set_generator_states(states: Mapping[str, Any], generators: Mapping[str, RandomStream]) -> None:
    """Put back the states `generator_states` captured (a missing name is a KeyError: another run's file)."""
    for name, g in generators.items():
        _set_state(g, states[name])


def rng_state(generators: Mapping[str, RandomStream]) -> dict:
    """Every RNG a training step can draw from: the global python / numpy / torch / CUDA ones and the named streams.

    The global ones matter even when the trainer draws only from its own generators: libraries draw from them
    (PEFT's LoRA init, ASA's prober with seed None, dropout).
    """
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": generator_states(generators),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generators: Mapping[str, RandomStream]) -> None:
    """Restore what `rng_state` captured (CUDA only when both the file and this machine have it)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    set_generator_states(state["generators"], generators)


def _get_state(g: RandomStream) -> Any:
    return g.bit_generator.state if isinstance(g, np.random.Generator) else g.get_state()


def _set_state(g: RandomStream, state: Any) -> None:
    if isinstance(g, np.random.Generator):
        g.bit_generator.state = state
    else:
        g.set_state(state.cpu())  # a checkpoint loaded with map_location=cuda moved the state tensor


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into ``path.tmp``, then rename it over `path`: readers see the old file or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def checkpoint_folder(output_dir: Path, step: int) -> Path:
    """``output_dir/checkpoint-<step>``: the name `find_latest_checkpoint` looks for."""
    return output_dir / f"checkpoint-{step}"


def temporary_folder(final: Path) -> Path:
    """Where `final` is written before `replace_folder` moves it into place (``<final>.tmp``)."""
    return final.with_name(final.name + ".tmp")


def fresh_folder(path: Path) -> Path:
    """An empty folder at `path` (a leftover of an interrupted write is removed first)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def seal_folder(folder: Path, note: str) -> None:
    """fsync every file of `folder`, then write the COMPLETE marker (holding `note`) last and fsync again.

    The marker's presence is the promise that everything else is on disk: a crash before it leaves a folder that is
    never resumed from.
    """
    _fsync_tree(folder)
    (folder / COMPLETE_MARKER).write_text(note)
    _fsync_tree(folder)


def replace_folder(src: Path, dst: Path) -> None:
    """Move the finished folder `src` to `dst`, replacing an older `dst` (kept as ``<dst>.old`` until the move)."""
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------------------------------------------


def find_latest_checkpoint(output_dir: Path, below: int | None = None) -> Path | None:
    """The sealed checkpoint-N with the largest N (folders without the marker are ignored), N < `below` if given."""
    found = []
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name.split("-", 1)[1]
        if suffix.isdigit() and (below is None or int(suffix) < below) and (path / COMPLETE_MARKER).is_file():
            found.append((int(suffix), path))
    return max(found)[1] if found else None


def previous_checkpoint(path: Path) -> Path | None:
    """The sealed checkpoint-N beside `path` with the largest N below `path`'s (None if there is none)."""
    suffix = path.name.split("-", 1)[-1].removesuffix(".tmp")
    return find_latest_checkpoint(path.parent, below=int(suffix) if suffix.isdigit() else None)


def resolve_resume(spec: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder a ``--resume_from_checkpoint`` value names: None (no resume), "latest" (the newest
    sealed one in `output_dir`, None when there is none yet) or a folder path."""
    if not spec:
        return None
    return find_latest_checkpoint(output_dir) if spec == "latest" else Path(spec)


# ----------------------------------------------------------------------------------------------------------------
# The time box
# ----------------------------------------------------------------------------------------------------------------


class TimeBox:
    """A wall-clock budget that ends at `deadline` (seconds of `clock`); without one it never expires.

    Trainers check it once per optimizer step and stop cleanly (with a checkpoint) once it has expired on any
    process; the agreement is theirs (each has its own collectives).
    """

    def __init__(self, deadline: float = math.inf, clock: Callable[[], float] = time.monotonic):
        self.deadline, self.clock = deadline, clock
        self.stopped_by: str | None = None  # the signal's name once `stop_on_signals` caught one

    @classmethod
    def of_minutes(cls, minutes: float | None, clock: Callable[[], float] = time.monotonic) -> TimeBox:
        """A box of `minutes` from now (None: no box)."""
        return cls(math.inf if minutes is None else clock() + 60.0 * minutes, clock)

    def remaining_s(self, now: float | None = None) -> float:
        """Seconds left (0 once expired)."""
        return max(0.0, self.deadline - (self.clock() if now is None else now))

    def expired(self, now: float | None = None) -> bool:
        return (self.clock() if now is None else now) > self.deadline

    @contextmanager
    def stop_on_signals(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
                        repeat_aborts: tuple[int, ...] = (signal.SIGINT,)) -> Iterator[None]:
        """While inside: `signals` expire the box instead of killing the process.

        A cluster's preemption notice (SLURM, Kubernetes and ``timeout`` send SIGTERM, then SIGKILL after a grace
        period) or a Ctrl-C then ends the run at its next optimizer step with a checkpoint and the LoRA written,
        instead of losing the steps since the last periodic checkpoint. A signal in `repeat_aborts` is one-shot:
        its handler puts the previous one back, so a second Ctrl-C aborts at once. Any other (SIGTERM) stays caught:
        a stop notice often arrives more than once (GNU ``timeout`` signals its child and then the child's whole
        process group, and a wrapper script may forward it again), and a repeat must not kill the run while it
        writes its checkpoint; the grace period's SIGKILL is the hard stop. Outside the main thread (where Python
        cannot install handlers) this does nothing.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in signals}

        def expire(signum: int, frame) -> None:
            name = signal.Signals(signum).name
            if self.stopped_by is not None and signum not in repeat_aborts:
                logging.getLogger(__name__).warning("%s received again: already stopping at the end of this step",
                                                    name)
                return
            self.deadline = -math.inf
            self.stopped_by = self.stopped_by or name  # the first cause is the one reported
            if signum in repeat_aborts:
                signal.signal(signum, previous[signum])
            logging.getLogger(__name__).warning(
                "%s received: stopping at the end of this step with a checkpoint%s", name,
                " (send it again to stop at once)" if signum in repeat_aborts else "")

        for sig in signals:
            signal.signal(sig, expire)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
