"""Video export and read-back through imageio-ffmpeg (H.264, yuv420p: plays in browsers and common players).

Where imageio-ffmpeg (or its ffmpeg binary) is unavailable, OpenCV's `cv2.VideoWriter` / `cv2.VideoCapture` are used
instead when cv2 is importable (MPEG-4 part 2, `mp4v`: plays in VLC/ffmpeg-based players, not in every browser).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

__all__ = ["atomic_path", "export_mp4", "ffmpeg_available", "frames_to_uint8", "read_mp4"]


def frames_to_uint8(frames) -> np.ndarray:
    """Normalize a clip to a uint8 array `[F, H, W, 3]`.

    Accepts a float array/tensor `[F, H, W, 3]` with values in [0, 1], a uint8 array/tensor `[F, H, W, 3]`, or a
    list of PIL images / `[H, W, 3]` arrays. Grayscale or RGBA inputs are not accepted: a video here is RGB.
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        frames = frames.float().numpy() if frames.dtype != torch.uint8 else frames.numpy()
    elif isinstance(frames, Sequence) and not isinstance(frames, np.ndarray):
        if len(frames) == 0:
            raise ValueError("cannot export a video with no frames")
        frames = np.stack([np.asarray(f.convert("RGB")) if hasattr(f, "convert") else np.asarray(f) for f in frames])
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected frames of shape [F, H, W, 3] with F >= 1, got {tuple(frames.shape)}")
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if not np.issubdtype(frames.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {frames.dtype}")
    # Round, not truncate: truncation biases every pixel down by half a level.
    return np.ascontiguousarray(np.round(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8))


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p subsamples chroma 2x2, so H and W must be even; replicate the last row/column when they are not."""
    _, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name beside `path`; on success it replaces `path`, on any error it is removed.

    The temporary name keeps `path`'s suffix (ffmpeg picks the container from it). The folder is created if needed,
    and the final file gets the usual permissions (0666 minus the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield tmp_name
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def ffmpeg_available() -> bool:
    """True when imageio-ffmpeg is importable and finds an ffmpeg binary."""
    try:
        import imageio_ffmpeg

        return bool(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError, OSError):
        return False


def _import_cv2():
    try:
        import cv2
    except ImportError:
        raise RuntimeError(
            "cannot write or read mp4: imageio-ffmpeg (or its ffmpeg binary) is unavailable and OpenCV is not "
            "installed; `pip install imageio-ffmpeg` (or opencv-python-headless)"
        ) from None
    return cv2


def _export_cv2(video: np.ndarray, path: str, fps: float) -> None:
    """Write uint8 RGB frames with OpenCV's VideoWriter (mp4v in an mp4 container)."""
    cv2 = _import_cv2()
    height, width = video.shape[1:3]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"cv2.VideoWriter cannot open {path} for mp4v")
    try:
        for frame in video:
            writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # RGB -> BGR
    finally:
        writer.release()


def export_mp4(frames, path: str | os.PathLike, fps: float, *, quality: float = 8.0) -> Path:
    """Write `frames` to an H.264 mp4 at `path`, atomically.

    Args:
        frames: float `[F, H, W, 3]` in [0, 1], uint8 `[F, H, W, 3]`, or a list of PIL images.
        path: destination; its folder is created if needed. An existing file is replaced only once the new one
            is complete (written to a temporary file in the same folder, then `os.replace`d), so a crash never
            leaves a truncated video behind.
        fps: frames per second.
        quality: imageio-ffmpeg quality in [1, 10] (8 maps to x264 CRF 10: near-lossless for small clips).

    Sizes are kept as they are (`macro_block_size=1`, no rescaling to multiples of 16); an odd height or width is
    padded by one replicated row/column because yuv420p needs even sizes. Without imageio-ffmpeg's ffmpeg, the
    video is written by OpenCV (`mp4v`) when cv2 is installed (`quality` then has no effect).
    """
    video = _pad_to_even(frames_to_uint8(frames))
    path = Path(path)
    if not ffmpeg_available():
        with atomic_path(path) as tmp_name:
            _export_cv2(video, tmp_name, fps)
        return path
    import imageio_ffmpeg

    with atomic_path(path) as tmp_name:
        writer = imageio_ffmpeg.write_frames(
            tmp_name,
            size=(video.shape[2], video.shape[1]),
            fps=fps,
            codec="libx264",
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            quality=quality,
            macro_block_size=1,
            output_params=["-movflags", "+faststart"],
        )
        writer.send(None)  # start ffmpeg
        try:
            for frame in video:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()  # flushes, or stops ffmpeg on an error
    return path


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame of a video file into a uint8 array `[F, H, W, 3]` (RGB); through OpenCV when imageio-ffmpeg's
    ffmpeg is unavailable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {path}")
    if not ffmpeg_available():
        cv2 = _import_cv2()
        capture = cv2.VideoCapture(str(path))
        frames = []
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                frames.append(frame[:, :, ::-1])  # BGR -> RGB
        finally:
            capture.release()
        if not frames:
            raise ValueError(f"{path} holds no video frames")
        return np.ascontiguousarray(np.stack(frames))
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(height, width, 3) for buf in reader]
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(frames)
