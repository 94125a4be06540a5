"""Gilbert (3D generalized Hilbert) permutation: validity, locality and caching."""

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
]


def curve_coordinates(perm, frames, height, width):
    """(f, h, w) of each position along the curve, from raster indices."""
    return torch.stack([perm // (height * width), (perm // width) % height, perm % width], dim=1)


@pytest.mark.parametrize("grid", GRIDS)
def test_is_permutation_with_local_steps(grid):
    frames, height, width = grid
    n = frames * height * width
    perm = gilbert_permutation(*grid)
    assert perm.dtype == torch.long and perm.shape == (n,)
    assert torch.equal(torch.sort(perm).values, torch.arange(n))
    if n == 1:
        return
    steps = (curve_coordinates(perm, *grid)[1:] - curve_coordinates(perm, *grid)[:-1]).abs()
    assert steps.max() <= 2, "a step longer than 2 cells along an axis"
    face_share = (steps.sum(dim=1) == 1).float().mean().item()
    assert face_share >= 0.92
    if 1 in grid or all(s % 2 == 0 for s in grid):
        assert face_share == 1.0  # flat or even grids have a perfect curve


@pytest.mark.parametrize("grid", [(21, 30, 52), (13, 30, 45), (16, 30, 52), (21, 60, 104), (1, 60, 104)])
def test_face_neighbour_share_on_video_grids(grid):
    perm = gilbert_permutation(*grid)
    coords = curve_coordinates(perm, *grid)
    steps = (coords[1:] - coords[:-1]).abs().sum(dim=1)
    assert (steps == 1).float().mean().item() >= 0.99


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
