"""Output locations and written files: checked early, readable by others, failures that say what failed.

Shared by the TDM trainer, the prompt-cache CLI and the loaders:

- `check_output_dir` runs before any model loads, so an output folder that is a file, read-only or on a full disk
  is refused in seconds instead of at the first checkpoint after minutes of training.
- `make_readable` undoes the 0600 mode that safetensors (and `tempfile.mkstemp`) give new files: caches and LoRAs
  on a shared machine must be readable by the other users, as any file created with `open()` would be.
- `describe_write_failure` turns an OSError / torch's `basic_ios::clear` RuntimeError into "no space left" or
  "permission denied" wording.
- `nonfinite_keys` lists the tensors holding NaN or Inf (prompt caches, LoRAs, checkpoints).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["OutputLocationError", "check_output_dir", "describe_write_failure", "make_readable", "nonfinite_keys"]


class OutputLocationError(RuntimeError):
    """An output folder that cannot be created or written, or lacks the space for what will be written there."""


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def check_output_dir(path: str | os.PathLike, need_bytes: int = 0, *, flag: str = "--output_dir") -> Path:
    """Create `path` if needed and check that a file can be written there and that `need_bytes` are free.

    Args:
        path: the folder.
        need_bytes: an estimate of what one save will write (0: no space check).
        flag: the command-line flag named in the message.

    Returns:
        The folder as a Path.

    Raises:
        OutputLocationError: naming the folder and what is wrong (a file, not creatable, not writable, space).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputLocationError(f"{flag} {path} is a file, not a folder: pass a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputLocationError(f"{flag} {path} cannot be created: {err.strerror or err}") from None
    try:  # a real write, not os.access: read-only mounts and ACLs answer only to that
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_", delete=True) as handle:
            handle.write(b"0")
            handle.flush()
    except OSError as err:
        raise OutputLocationError(f"{flag} {path} is not writable: {err.strerror or err}") from None
    if need_bytes > 0:
        free = shutil.disk_usage(path).free
        if free < need_bytes:
            raise OutputLocationError(
                f"{flag} {path} has {_mb(free)} free, but one checkpoint needs about {_mb(need_bytes)}: free some "
                "space or choose another folder"
            )
    return path


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (no file is created in between).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(*paths: str | os.PathLike) -> None:
    """Give files the mode `open()` would have given them (0666 minus the umask) instead of safetensors' 0600.

    Folders are walked; only regular files change.
    """
    mode = 0o666 & ~_umask()
    for root in paths:
        root = Path(root)
        files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else [root]
        for file in files:
            os.chmod(file, mode)


def describe_write_failure(err: BaseException, folder: str | os.PathLike) -> str:
    """What made a write into `folder` fail, in words: no space, permission, or the error itself."""
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied ({err.strerror})"
    try:  # torch.save reports a full disk as "basic_ios::clear: iostream error" or a "PytorchStreamWriter" failure
        free = shutil.disk_usage(Path(folder) if Path(folder).exists() else Path(folder).parent).free
    except OSError:
        free = None
    if free is not None and free < 16 * 2**20:
        return f"probably no space left on the device ({_mb(free)} free): {err}"
    if not os.access(folder if Path(folder).exists() else Path(folder).parent, os.W_OK):
        return f"permission denied: {err}"
    return str(err)


def nonfinite_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf."""
    return [k for k, v in tensors.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
