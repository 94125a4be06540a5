"""3D generalized Hilbert ("gilbert") ordering of a video token grid.

Block-sparse attention cuts the token sequence into blocks of consecutive tokens. In raster (f, h, w) order a block
of 128 tokens is a thin strip of one row; along a space-filling curve it is a compact 3D chunk, so neighbouring
tokens (which attend strongly to each other) land in the same or in few blocks.

The generalized Hilbert recursion works for any cuboid size, including odd and non-power-of-two sides: a cuboid is
described by an origin and three axis vectors (a = major axis, b, c). The curve enters at the origin and leaves at
the far end of the major axis, ``origin + a - unit(a)``. A cuboid is split into 2, 3 or 5 sub-cuboids whose curves
chain end to start; half lengths are rounded to even numbers where possible so that each sub-curve can end on the
correct side (odd sides force the occasional diagonal step).
"""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np
import torch

Vec = tuple[int, int, int]


def _add(*vs: Vec) -> Vec:
    return (sum(v[0] for v in vs), sum(v[1] for v in vs), sum(v[2] for v in vs))


def _neg(v: Vec) -> Vec:
    return (-v[0], -v[1], -v[2])


def _length(v: Vec) -> int:
    return abs(v[0]) + abs(v[1]) + abs(v[2])  # axis-aligned: one non-zero component


def _unit(v: Vec) -> Vec:
    return tuple((x > 0) - (x < 0) for x in v)


def _scaled(unit: Vec, n: int) -> Vec:
    return (unit[0] * n, unit[1] * n, unit[2] * n)


def _half(v: Vec, force_even: bool) -> Vec:
    """Roughly half of the axis vector ``v`` (same direction); rounded up to an even length when asked."""
    n = _length(v)
    half = n // 2
    if force_even and half % 2 == 1 and n > 2:
        half += 1
    return _scaled(_unit(v), half)


def _line(axis: Vec) -> np.ndarray:
    """Cells of a straight run along ``axis``, relative to its start: int64 ``[n, 3]``."""
    return np.arange(_length(axis), dtype=np.int64)[:, None] * np.asarray(_unit(axis), dtype=np.int64)


def _chain(*parts: tuple[Vec, np.ndarray]) -> np.ndarray:
    """Concatenate sub-curves, each given as (origin, cells relative to that origin)."""
    return np.concatenate([cells + np.asarray(origin, dtype=np.int64) for origin, cells in parts])


_EMPTY = np.zeros((0, 3), dtype=np.int64)


@cache
def _curve2d(a: Vec, b: Vec) -> np.ndarray:
    """Generalized Hilbert curve over the rectangle spanned by ``a`` (major) and ``b``, relative to its origin.

    Starts at the origin and ends at ``a - unit(a)``. Results are cached per shape: sub-rectangles repeat a lot.
    """
    w, h = _length(a), _length(b)
    if w == 0 or h == 0:
        return _EMPTY
    if h == 1:
        return _line(a)
    if w == 1:
        return _line(b)
    ua, ub = _unit(a), _unit(b)
    zero = (0, 0, 0)
    if 2 * w > 3 * h:
        # Long rectangle: two halves along the major axis.
        a2 = _half(a, force_even=True)
        return _chain((zero, _curve2d(a2, b)), (a2, _curve2d(_add(a, _neg(a2)), b)))
    # Squarish: go up b, across a, and back down b.
    a2 = _half(a, force_even=False)
    b2 = _half(b, force_even=True)
    return _chain(
        (zero, _curve2d(b2, a2)),
        (b2, _curve2d(a, _add(b, _neg(b2)))),
        (_add(a, _neg(ua), b2, _neg(ub)), _curve2d(_neg(b2), _neg(_add(a, _neg(a2))))),
    )


@cache
def _curve3d(a: Vec, b: Vec, c: Vec) -> np.ndarray:
    """Generalized Hilbert curve over the cuboid spanned by ``a`` (major), ``b``, ``c``, relative to its origin.

    Starts at the origin and ends at ``a - unit(a)`` (when the parities allow; else one cell off). Cached per shape.
    """
    w, h, d = _length(a), _length(b), _length(c)
    if w == 0 or h == 0 or d == 0:
        return _EMPTY
    # Flat cuboids are 2D problems (or lines).
    if d == 1:
        return _curve2d(a, b)
    if h == 1:
        return _curve2d(a, c)
    if w == 1:
        return _curve2d(b, c) if h >= d else _curve2d(c, b)

    ua, ub, uc = _unit(a), _unit(b), _unit(c)
    a2, b2, c2 = _half(a, True), _half(b, True), _half(c, True)
    a_rest, b_rest, c_rest = _add(a, _neg(a2)), _add(b, _neg(b2)), _add(c, _neg(c2))
    far_a = _add(a, _neg(ua))  # offset of the last cell along a
    zero = (0, 0, 0)

    if 2 * w > 3 * h and 2 * w > 3 * d:
        # Long along a: two halves.
        return _chain((zero, _curve3d(a2, b, c)), (a2, _curve3d(a_rest, b, c)))
    if 3 * h > 4 * d:
        # Thin in c: split a and b only (3 parts), c traversed whole.
        return _chain(
            (zero, _curve3d(b2, c, a2)),
            (b2, _curve3d(a, b_rest, c)),
            (_add(far_a, b2, _neg(ub)), _curve3d(_neg(b2), c, _neg(a_rest))),
        )
    if 3 * d > 4 * h:
        # Thin in b: split a and c only (3 parts).
        return _chain(
            (zero, _curve3d(c2, a2, b)),
            (c2, _curve3d(a, b, c_rest)),
            (_add(far_a, c2, _neg(uc)), _curve3d(_neg(c2), _neg(a_rest), b)),
        )
    # Cube-like: split all three sides (5 parts: octant, slab, slab, slab, octant).
    return _chain(
        (zero, _curve3d(b2, c2, a2)),
        (b2, _curve3d(c, a2, b_rest)),
        (_add(b2, _neg(ub), c, _neg(uc)), _curve3d(a, _neg(b2), _neg(c_rest))),
        (_add(far_a, b2, c, _neg(uc)), _curve3d(_neg(c), _neg(a_rest), b_rest)),
        (_add(far_a, b2, _neg(ub)), _curve3d(_neg(b2), c2, _neg(a_rest))),
    )


def gilbert_curve(frames: int, height: int, width: int) -> np.ndarray:
    """Cells of a ``frames x height x width`` grid in curve order.

    Returns:
        int64 array ``[F*H*W, 3]`` of ``(f, h, w)`` coordinates; consecutive rows are (almost always) face neighbours.
    """
    for name, n in (("frames", frames), ("height", height), ("width", width)):
        if int(n) < 1:
            raise ValueError(f"gilbert_permutation: {name} must be >= 1, got {n}")
    # Vectors are (w, h, f); the longest side is the major axis, as a Hilbert curve on a long box should run lengthwise.
    axes = {"w": (width, 0, 0), "h": (0, height, 0), "f": (0, 0, frames)}
    order = sorted(axes, key=lambda k: -_length(axes[k]))
    xyz = _curve3d(*(axes[k] for k in order))
    return xyz[:, ::-1].copy()  # (f, h, w)


@lru_cache(maxsize=64)
def _cached_permutation(frames: int, height: int, width: int) -> torch.Tensor:
    fhw = gilbert_curve(frames, height, width)
    perm = torch.from_numpy((fhw[:, 0] * height + fhw[:, 1]) * width + fhw[:, 2])
    if perm.numel() != frames * height * width or not torch.equal(
        torch.sort(perm).values, torch.arange(frames * height * width)
    ):
        raise AssertionError(f"gilbert curve is not a permutation for grid {(frames, height, width)}")
    return perm


def gilbert_permutation(frames: int, height: int, width: int) -> torch.LongTensor:
    """Permutation ``p`` of ``range(F*H*W)`` that lists raster-ordered tokens along a 3D generalized Hilbert curve.

    Tokens are indexed in raster order, ``index = f*H*W + h*W + w``; ``x[:, p]`` is the curve order and
    ``y[:, inverse_permutation(p)]`` restores raster order. Cached per grid; a fresh copy is returned each call so
    callers cannot corrupt the cache.
    """
    return _cached_permutation(int(frames), int(height), int(width)).clone()


def inverse_permutation(perm: torch.Tensor) -> torch.LongTensor:
    """Inverse of a permutation: ``inv[perm[i]] = i``, so ``x[..., perm][..., inv] == x``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv
