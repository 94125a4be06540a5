"""mp4 export and read-back: frame count, size, pixel fidelity of the lossy codec, atomic writes."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from blade.video import export_mp4, frames_to_uint8, read_mp4


def smooth_clip(frames: int, height: int, width: int) -> np.ndarray:
    """A float clip [F, H, W, 3] in [0, 1]: moving low-frequency colour waves (what H.264 codes well)."""
    t = np.arange(frames)[:, None, None]
    y = np.linspace(0, 1, height)[None, :, None]
    x = np.linspace(0, 1, width)[None, None, :]
    r = 0.5 + 0.4 * np.sin(2 * np.pi * (x + 0.05 * t))
    g = 0.5 + 0.4 * np.cos(2 * np.pi * (y - 0.03 * t))
    b = 0.5 + 0.3 * np.sin(np.pi * (x + y) + 0.2 * t)
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).astype(np.float32)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.mark.parametrize("size", [(128, 128), (100, 60)])
def test_round_trip_keeps_count_size_and_pixels(tmp_path, size):
    height, width = size
    clip = smooth_clip(9, height, width)
    path = export_mp4(clip, tmp_path / "sub" / "clip.mp4", fps=8)
    decoded = read_mp4(path)
    assert decoded.shape == (9, height, width, 3)
    assert decoded.dtype == np.uint8
    assert psnr(decoded, frames_to_uint8(clip)) > 30.0
    # No temporary file left beside the video, and the usual permissions (not mkstemp's 0600).
    assert os.listdir(path.parent) == ["clip.mp4"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_inputs_uint8_tensor_and_pil_agree():
    clip = smooth_clip(3, 16, 32)
    expected = np.round(clip * 255).astype(np.uint8)
    assert np.array_equal(frames_to_uint8(clip), expected)
    assert np.array_equal(frames_to_uint8(torch.from_numpy(clip)), expected)
    assert np.array_equal(frames_to_uint8(expected), expected)
    assert np.array_equal(frames_to_uint8([Image.fromarray(f) for f in expected]), expected)
    with pytest.raises(ValueError):
        frames_to_uint8(np.zeros((3, 16, 16)))


def test_odd_size_is_padded_to_even(tmp_path):
    clip = smooth_clip(5, 31, 45)
    decoded = read_mp4(export_mp4(clip, tmp_path / "odd.mp4", fps=16))
    assert decoded.shape == (5, 32, 46, 3)
    assert psnr(decoded[:, :31, :45], frames_to_uint8(clip)) > 30.0


def test_failed_export_leaves_old_file_untouched(tmp_path):
    path = tmp_path / "keep.mp4"
    export_mp4(smooth_clip(3, 32, 32), path, fps=8)
    before = path.read_bytes()
    with pytest.raises(AssertionError):  # imageio-ffmpeg asserts 1 <= quality <= 10
        export_mp4(smooth_clip(3, 32, 32), path, fps=8, quality=99)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.mp4"]


def test_mp4_falls_back_to_opencv_without_ffmpeg(tmp_path, monkeypatch):
    """As on the GPU machine (no imageio-ffmpeg, OpenCV installed): the mp4 is written by cv2 and plays back."""
    cv2 = pytest.importorskip("cv2", reason="opencv is not installed (optional: the fallback writer)")
    import blade.video as video

    clip = frames_to_uint8(smooth_clip(9, 48, 64))
    monkeypatch.setattr(video, "ffmpeg_available", lambda: False)
    out = export_mp4(clip, tmp_path / "fallback.mp4", fps=8)
    assert out.is_file() and not list(tmp_path.glob(".*partial*"))
    # independent read-back: OpenCV's own capture (and ffmpeg's too, where imageio-ffmpeg is installed)
    capture = cv2.VideoCapture(str(out))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[:, :, ::-1])
    capture.release()
    assert len(frames) == 9 and frames[0].shape == (48, 64, 3)
    assert psnr(np.stack(frames), clip) > 25
    assert np.array_equal(read_mp4(out), np.stack(frames))  # read_mp4 falls back to cv2 as well
    monkeypatch.undo()
    if video.ffmpeg_available():
        back = read_mp4(out)
        assert back.shape == (9, 48, 64, 3) and psnr(back, clip) > 25


def test_mp4_without_ffmpeg_or_opencv_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    import blade.video as video

    monkeypatch.setattr(video, "ffmpeg_available", lambda: False)
    monkeypatch.setitem(sys.modules, "cv2", None)  # its import fails
    with pytest.raises(RuntimeError, match="imageio-ffmpeg"):
        export_mp4(smooth_clip(2, 16, 16), tmp_path / "x.mp4", fps=8)
    assert not list(tmp_path.iterdir())  # nothing left behind
