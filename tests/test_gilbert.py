"""Gilbert (3D generalized Hilbert) permutation: validity, locality and caching."""

import random
import time

import pytest
import torch

from blade.attention import gilbert_permutation, inverse_permutation

GRIDS = [
    (21, 30, 52),  # Wan latent grid (after patchify)
    (13, 30, 45),  # CogVideoX
    (16, 30, 52),
    (1, 30, 52),  # single frame
    (21, 1, 52),
    (21, 30, 1),
    (1, 1, 7),
    (1, 1, 1),
    (3, 5, 7),
    (5, 5, 5),
    (7, 9, 11),
    (4, 4, 4),
    (2, 3, 4),
    (11, 11, 11),
    (9, 17, 33),
    (3, 3, 3),
    (1, 5, 7),  # flat with odd sides
]
VIDEO_GRIDS = [(21, 30, 52), (13, 30, 45), (16, 30, 52), (21, 60, 104), (1, 60, 104)]
THIN_GRIDS = [(1, 80, 80), (2, 50, 60), (3, 41, 47), (63, 2, 47), (57, 61, 3), (64, 1, 97)]
HARD_GRIDS = [(9, 33, 32), (43, 5, 37), (59, 5, 33), (27, 31, 7), (64, 64, 64), (63, 63, 63)]


def random_grids(count, seed=0):
    """Seeded random grids of more than 5,000 cells with sides in 1..64."""
    rng = random.Random(seed)
    grids = []
    while len(grids) < count:
        grid = tuple(rng.randint(1, 64) for _ in range(3))
        if grid[0] * grid[1] * grid[2] > 5000:
            grids.append(grid)
    return grids


def curve_coordinates(perm, frames, height, width):
    """(f, h, w) of each position along the curve, from raster indices."""
    return torch.stack([perm // (height * width), (perm // width) % height, perm % width], dim=1)


def curve_steps(grid):
    """Per-axis absolute steps between consecutive curve cells, ``[F*H*W - 1, 3]``; checks it is a permutation."""
    n = grid[0] * grid[1] * grid[2]
    perm = gilbert_permutation(*grid)
    assert perm.dtype == torch.long and perm.shape == (n,)
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    coords = curve_coordinates(perm, *grid)
    return (coords[1:] - coords[:-1]).abs()


def face_share(steps):
    return (steps.sum(dim=1) == 1).float().mean().item()


@pytest.mark.parametrize("grid", GRIDS)
def test_is_permutation_with_local_steps(grid):
    steps = curve_steps(grid)
    if steps.numel() == 0:
        return
    assert steps.max() <= 1, "odd sides may force a diagonal step, never a jump (the spec allows up to 2 cells)"
    assert face_share(steps) >= 0.92
    if 1 in grid or all(s % 2 == 0 for s in grid):
        assert face_share(steps) == 1.0  # flat or even grids have a perfect curve


@pytest.mark.parametrize("grid", [(a, b, c) for a in (3, 5, 7) for b in (3, 5, 9) for c in (5, 7, 11)])
def test_small_odd_grids_are_mostly_face_connected(grid):
    steps = curve_steps(grid)
    assert steps.max() <= 1 and face_share(steps) >= 0.92


@pytest.mark.parametrize("grid", VIDEO_GRIDS + THIN_GRIDS + HARD_GRIDS)
def test_face_neighbour_share_on_named_grids(grid):
    steps = curve_steps(grid)
    assert steps.max() <= 1
    assert face_share(steps) >= 0.99


def test_face_neighbour_share_on_random_grids():
    failures = {}
    for grid in random_grids(40):
        steps = curve_steps(grid)
        share = face_share(steps)
        if steps.max() > 1 or share < 0.99:
            failures[grid] = (share, steps.max().item())
    assert not failures, f"grids below 99% face steps or with long steps: {failures}"


def run_extents(coords, run):
    """Bounding-box side lengths of each run of ``run`` consecutive cells: ``[n_runs, 3]``."""
    n = coords.shape[0] // run * run
    chunks = coords[:n].view(-1, run, 3)
    return chunks.amax(dim=1) - chunks.amin(dim=1) + 1


@pytest.mark.parametrize("grid", [(21, 30, 52), (13, 30, 45)])
def test_runs_of_128_are_compact_chunks(grid):
    perm = gilbert_permutation(*grid)
    curve = run_extents(curve_coordinates(perm, *grid), 128)
    raster = run_extents(curve_coordinates(torch.arange(perm.numel()), *grid), 128)
    # A raster run is a strip one frame thick and a full row long; a curve run is a small 3D chunk.
    assert (raster.min(dim=1).values == 1).float().mean() > 0.9 and (raster.max(dim=1).values == grid[2]).all()
    assert (curve.min(dim=1).values >= 2).float().mean() >= 0.95  # thick in every direction
    assert curve.max(dim=1).values.float().median() <= 8
    assert curve.max() <= 16
    assert curve.prod(dim=1).float().median() <= 3 * 128  # little slack inside the bounding box


@pytest.mark.parametrize("grid", random_grids(8, seed=1) + THIN_GRIDS + [(64, 64, 64)])
def test_runs_of_128_are_compact_on_any_grid(grid):
    extents = run_extents(curve_coordinates(gilbert_permutation(*grid), *grid), 128).sort(dim=1).values
    assert (extents[:, 1] >= 2).all()  # never a strip: thick in at least two directions
    if min(grid) >= 4:
        assert (extents[:, 0] >= 2).float().mean() >= 0.95  # and in all three where the grid allows
    assert extents[:, 2].float().median() <= (16 if min(grid) == 1 else 12)  # a flat chunk is about 8 x 16
    assert extents.prod(dim=1).float().median() <= 3 * 128


def test_inverse_and_cache_safety():
    grid = (5, 6, 7)
    perm = gilbert_permutation(*grid)
    inv = inverse_permutation(perm)
    x = torch.randn(2, 210, 3)
    assert torch.equal(x[:, perm][:, inv], x)
    assert torch.equal(inv[perm], torch.arange(210))
    perm[:] = 0  # corrupting the returned tensor must not corrupt the cache
    assert torch.equal(torch.sort(gilbert_permutation(*grid)).values, torch.arange(210))


def test_fast_for_wan_grid():
    start = time.perf_counter()
    gilbert_permutation(20, 31, 53)  # uncached size
    assert time.perf_counter() - start < 1.5  # generous for a loaded CI machine


def test_rejects_empty_grid():
    with pytest.raises(ValueError, match="frames"):
        gilbert_permutation(0, 3, 3)
