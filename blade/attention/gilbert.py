"""3D generalized Hilbert ("gilbert") ordering of a video token grid.

Block-sparse attention cuts the token sequence into blocks of consecutive tokens. In raster (f, h, w) order a block
of 128 tokens is a thin strip of one row; along a space-filling curve it is a compact 3D chunk, so neighbouring
tokens (which attend strongly to each other) land in the same or in few blocks.

The generalized Hilbert recursion works for any cuboid size, including odd and non-power-of-two sides. A cuboid of
sides ``(w, h, d)`` along its local axes ``(a, b, c)`` is walked from its origin corner to (ideally) the far end of
the major axis, local cell ``(w - 1, 0, 0)``. Depending on its aspect ratio it is split into 2, 3 or 5 sub-cuboids,
each with its own local axes, whose curves chain end to start.

Odd sides make a perfect chain (face neighbours only) impossible in places. Instead of a fixed rounding of the half
lengths, each cuboid shape searches the split points next to the half and both orientations of each sub-cuboid's
two minor axes, and keeps, for every end cell it can reach next to its target, the plan with the fewest non-face
steps (ties: fewest 2-cell steps, then the most even splits). The curve of a cuboid depends only on its sides, so
plans are memoized per shape: a 64^3 grid needs about a thousand shapes (~0.2 s). On every grid of more than 5,000
cells with sides up to 64 this gives >= 99.6% face-neighbour steps, and no step is longer than a diagonal.
"""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np
import torch

Vec = tuple[int, int, int]
Axes = tuple[Vec, Vec, Vec]  # a sub-cuboid's local (major, second, third) unit axes in its parent's frame
Part = tuple[Vec, Axes, Vec, bool]  # (origin corner, axes, sides, may its two minor axes be swapped)
Plan = tuple[tuple[bool, Vec], ...]  # per part: (minor axes swapped, which of its end cells it uses)

_E1, _E2, _E3 = (1, 0, 0), (0, 1, 0), (0, 0, 1)
_N1, _N2, _N3 = (-1, 0, 0), (0, -1, 0), (0, 0, -1)
_ZERO = (0, 0, 0)

# The cost of a plan packed in one int, compared lexicographically: non-face steps, then steps of two cells along an
# axis, then the summed deviation of the splits from exact halves (even splits give the most compact chunks).
_NON_FACE = 1 << 40
_LONG = 1 << 30
_UNEVEN = 1
_INFEASIBLE = 1 << 60

# Per cuboid sides: {end cell: (cost, decomposition index, plan)}; grows with the distinct shapes ever requested.
_PLANS: dict[Vec, dict[Vec, tuple[int, int, Plan]]] = {}


def _rotate(axes: Axes, p: Vec) -> Vec:
    """Offset in the parent frame of the local cell ``p`` of a sub-cuboid with local ``axes``."""
    return tuple(p[0] * axes[0][i] + p[1] * axes[1][i] + p[2] * axes[2][i] for i in range(3))


@cache
def _step_cost(dx: int, dy: int, dz: int) -> int:
    """Cost of a step by ``(dx, dy, dz)`` between consecutive cells of the curve."""
    dx, dy, dz = abs(dx), abs(dy), abs(dz)
    if dx + dy + dz == 1:
        return 0
    longest = max(dx, dy, dz)
    if longest == 1:
        return _NON_FACE
    if longest == 2:
        return _NON_FACE + _LONG
    return _INFEASIBLE


def _split_points(n: int) -> list[int]:
    """Candidate lengths of the first piece when cutting a side of length ``n`` in two: the half and one more.

    Together they offer both parity patterns of the two pieces, which is what decides where a chain needs diagonals.
    """
    return [k for k in (n // 2, n // 2 + 1) if 1 <= k <= n - 1]


def _uneven(n: int, first: int) -> int:
    return _UNEVEN * abs(2 * first - n)


def _halves(w: int, h: int, d: int) -> list[tuple[int, list[Part]]]:
    """Long along ``a``: two halves along ``a``."""
    axes = (_E1, _E2, _E3)
    return [
        (_uneven(w, w1), [(_ZERO, axes, (w1, h, d), True), ((w1, 0, 0), axes, (w - w1, h, d), True)])
        for w1 in _split_points(w)
    ]


def _thin_c(w: int, h: int, d: int) -> list[tuple[int, list[Part]]]:
    """Thin in ``c``: split ``a`` and ``b`` (up ``b``, across ``a``, back down ``b``); ``c`` is traversed whole."""
    out = []
    for w1 in _split_points(w):
        for h1 in _split_points(h):
            parts = [
                (_ZERO, (_E2, _E3, _E1), (h1, d, w1), True),
                ((0, h1, 0), (_E1, _E2, _E3), (w, h - h1, d), True),
                ((w - 1, h1 - 1, 0), (_N2, _E3, _N1), (h1, d, w - w1), True),
            ]
            out.append((_uneven(w, w1) + _uneven(h, h1), parts))
    return out


def _thin_b(w: int, h: int, d: int) -> list[tuple[int, list[Part]]]:
    """Thin in ``b``: split ``a`` and ``c`` (up ``c``, across ``a``, back down ``c``); ``b`` is traversed whole."""
    out = []
    for w1 in _split_points(w):
        for d1 in _split_points(d):
            parts = [
                (_ZERO, (_E3, _E1, _E2), (d1, w1, h), True),
                ((0, 0, d1), (_E1, _E2, _E3), (w, h, d - d1), True),
                ((w - 1, 0, d1 - 1), (_N3, _N1, _E2), (d1, w - w1, h), True),
            ]
            out.append((_uneven(w, w1) + _uneven(d, d1), parts))
    return out


def _octants(w: int, h: int, d: int) -> list[tuple[int, list[Part]]]:
    """Cube-like: split all three sides (5 parts: octant, slab, slab, slab, octant)."""
    out = []
    for w1 in _split_points(w):
        for h1 in _split_points(h):
            for d1 in _split_points(d):
                w2, h2, d2 = w - w1, h - h1, d - d1
                parts = [
                    (_ZERO, (_E2, _E3, _E1), (h1, d1, w1), True),
                    ((0, h1, 0), (_E3, _E1, _E2), (d, w1, h2), True),
                    ((0, h1 - 1, d - 1), (_E1, _N2, _N3), (w, h1, d2), True),
                    ((w - 1, h1, d - 1), (_N3, _N1, _E2), (d, w2, h2), True),
                    ((w - 1, h1 - 1, 0), (_N2, _E3, _N1), (h1, d1, w2), True),
                ]
                out.append((_uneven(w, w1) + _uneven(h, h1) + _uneven(d, d1), parts))
    return out


def _flat_loop(h: int, d: int) -> list[tuple[int, list[Part]]]:
    """A ``1 x h x d`` slab (major side 1) should end next to its start: out along one edge, back over the rest.

    Plain 2D walks (ending far away) are offered too; they only win where the parent can absorb a short jump.
    """
    out = [(0, [(_ZERO, (_E2, _E3, _E1), (h, d, 1), False)]), (0, [(_ZERO, (_E3, _E2, _E1), (d, h, 1), False)])]
    if h >= 2 and d >= 2:
        up_b = [(_ZERO, (_E2, _E1, _E3), (h, 1, 1), False), ((0, h - 1, 1), (_N2, _E3, _E1), (h, d - 1, 1), True)]
        up_c = [(_ZERO, (_E3, _E1, _E2), (d, 1, 1), False), ((0, 1, d - 1), (_N3, _E2, _E1), (d, h - 1, 1), True)]
        out += [(0, up_b), (0, up_c)]
    return out


@cache
def _decompositions(w: int, h: int, d: int) -> list[tuple[int, list[Part]]]:
    """Candidate ``(uneven-split cost, parts)`` of a cuboid; the kind follows its aspect ratio, as published."""
    if w == 1:
        if h == 1:
            return [(0, [(_ZERO, (_E3, _E1, _E2), (d, 1, 1), False)])]
        if d == 1:
            return [(0, [(_ZERO, (_E2, _E1, _E3), (h, 1, 1), False)])]
        return _flat_loop(h, d)
    if 2 * w > 3 * h and 2 * w > 3 * d:
        return _halves(w, h, d)
    if 3 * h > 4 * d:
        return _thin_c(w, h, d)
    if 3 * d > 4 * h:
        return _thin_b(w, h, d)
    return _octants(w, h, d)


def _oriented(axes: Axes, sides: Vec, swapped: bool) -> tuple[Axes, Vec]:
    """Swapping a part's two minor axes keeps its start and target end: a free choice for the search."""
    if not swapped:
        return axes, sides
    return (axes[0], axes[2], axes[1]), (sides[0], sides[2], sides[1])


@cache
def _part_options(axes: Axes, sides: Vec, may_swap: bool) -> tuple[tuple[int, Vec, bool, Vec], ...]:
    """Every way to walk one part: ``(cost, end offset from the part's origin in the parent frame, swapped, end)``."""
    options = []
    for swapped in (False, True) if may_swap and sides[1] != sides[2] else (False,):
        ax, sub = _oriented(axes, sides, swapped)
        for end, (cost, _, _) in _solve(sub).items():
            options.append((cost, _rotate(ax, end), swapped, end))
    return tuple(options)


def _solve(sides: Vec) -> dict[Vec, tuple[int, int, Plan]]:
    """Cheapest plans of a cuboid, per end cell near its target ``(w - 1, 0, 0)``; memoized per shape."""
    if sides in _PLANS:
        return _PLANS[sides]
    w, h, d = sides
    if h == 1 and d == 1:
        _PLANS[sides] = {(w - 1, 0, 0): (0, -1, ())}
        return _PLANS[sides]
    best: dict[Vec, tuple[int, int, Plan]] = {}
    for index, (cost, parts) in enumerate(_decompositions(w, h, d)):
        # Parts before the last only need the cheapest walk including the step into the next part's origin; the
        # last part's end is the cuboid's end, so each of its options yields a plan.
        plan = []
        for (origin, axes, part_sides, may_swap), nxt in zip(parts[:-1], parts[1:]):
            gx, gy, gz = nxt[0][0] - origin[0], nxt[0][1] - origin[1], nxt[0][2] - origin[2]
            c, swapped, end = min(
                (c + _step_cost(gx - off[0], gy - off[1], gz - off[2]), swapped, end)
                for c, off, swapped, end in _part_options(axes, part_sides, may_swap)
            )
            cost += c
            plan.append((swapped, end))
        origin, axes, part_sides, may_swap = parts[-1]
        for c, off, swapped, end in _part_options(axes, part_sides, may_swap):
            cuboid_end = (origin[0] + off[0], origin[1] + off[1], origin[2] + off[2])
            if cuboid_end not in best or cost + c < best[cuboid_end][0]:
                best[cuboid_end] = (cost + c, index, (*plan, (swapped, end)))
    # Keep the cheapest plan, plus ends near the target as cheap as it up to tie-breaks: an end one non-face step
    # dearer can at best tie by saving the step into the next part.
    low = min(v[0] for v in best.values())
    _PLANS[sides] = {
        end: v
        for end, v in best.items()
        if v[0] == low or (v[0] < low + _NON_FACE and max(abs(end[0] - w + 1), end[1], end[2]) <= 2)
    }
    return _PLANS[sides]


@cache
def _frame(axes: Axes) -> tuple[list[int], np.ndarray]:
    """``axes`` as a signed permutation: parent coordinate ``j`` is ``sign[j] * local[source[j]]``."""
    source = [next(i for i in range(3) if axes[i][j]) for j in range(3)]
    return source, np.array([axes[source[j]][j] for j in range(3)], dtype=np.int64)


def _walk(sides: Vec, end: Vec) -> np.ndarray:
    """Cells of a cuboid in curve order for its plan ending at ``end``: int64 ``[w*h*d, 3]``, local coordinates."""
    if sides[0] * sides[1] * sides[2] <= 1024:
        return _walk_small(sides, end)  # small cuboids recur many times within and across grids
    return _walk_uncached(sides, end)


@lru_cache(maxsize=1024)
def _walk_small(sides: Vec, end: Vec) -> np.ndarray:
    cells = _walk_uncached(sides, end)
    cells.flags.writeable = False
    return cells


def _walk_uncached(sides: Vec, end: Vec) -> np.ndarray:
    w, h, d = sides
    _, index, plan = _PLANS[sides][end]
    if index < 0:  # a line along the major axis
        cells = np.zeros((w, 3), dtype=np.int64)
        cells[:, 0] = np.arange(w)
        return cells
    pieces = []
    for (origin, axes, part_sides, _), (swapped, part_end) in zip(_decompositions(w, h, d)[index][1], plan):
        ax, sub = _oriented(axes, part_sides, swapped)
        source, sign = _frame(ax)
        pieces.append(_walk(sub, part_end)[:, source] * sign + np.asarray(origin, dtype=np.int64))
    return np.concatenate(pieces)


def gilbert_curve(frames: int, height: int, width: int) -> np.ndarray:
    """Cells of a ``frames x height x width`` grid in curve order.

    Returns:
        int64 array ``[F*H*W, 3]`` of ``(f, h, w)`` coordinates; consecutive rows are (almost always) face neighbours.
    """
    sizes = (int(frames), int(height), int(width))
    for name, n in zip(("frames", "height", "width"), sizes):
        if n < 1:
            raise ValueError(f"gilbert_permutation: {name} must be >= 1, got {n}")
    # The longest side is the major axis: a Hilbert curve on a long box should run lengthwise.
    order = sorted(range(3), key=lambda k: -sizes[k])
    sides = tuple(sizes[k] for k in order)
    plans = _solve(sides)
    end = min(plans, key=lambda e: plans[e][0])  # the whole grid's curve may end anywhere
    if plans[end][0] >= _INFEASIBLE:
        raise AssertionError(f"gilbert curve for grid {sizes} needs a step longer than 2 cells")
    local = _walk(sides, end)
    fhw = np.empty_like(local)
    fhw[:, order] = local
    return fhw


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
