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
