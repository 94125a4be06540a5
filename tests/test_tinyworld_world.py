"""TinyWorld grammar, parser, scene sampling and renderer."""

import math

import numpy as np
import pytest
import torch

from blade.tinyworld import world
from blade.tinyworld.world import (
    BACKGROUND_RGB,
    COLOR_RGB,
    COLORS,
    MOTION_DIRECTION,
    MOTIONS,
    NUM_FRAMES,
    SHAPES,
    SIZES,
    SPEED_PX_PER_FRAME,
    ObjectSpec,
    PromptError,
    Scene,
    all_words,
    half_extents,
    layout_scene,
    parse_prompt,
    render,
    render_prompt,
    sample_scene,
)

# ---------------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------------


def test_parse_one_and_two_objects():
    scene = parse_prompt("a large red circle moves left on a black background")
    assert scene == Scene((ObjectSpec("large", "red", "circle", "moves left"),), "black")
    scene = parse_prompt("a small blue triangle stays still and a large white square moves up on a black background")
    assert scene.objects == (
        ObjectSpec("small", "blue", "triangle", "stays still"),
        ObjectSpec("large", "white", "square", "moves up"),
    )
    assert scene.background == "black"


def test_parse_is_whitespace_case_and_period_tolerant():
    messy = "  A   Small CYAN square\tmoves DOWN on a Gray background. "
    assert parse_prompt(messy) == Scene((ObjectSpec("small", "cyan", "square", "moves down"),), "gray")


def test_every_word_combination_round_trips():
    for size in SIZES:
        for color in COLORS:
            for shape in SHAPES:
                for motion in MOTIONS:
                    obj = ObjectSpec(size, color, shape, motion)
                    scene = Scene((obj,), "black")
                    assert parse_prompt(scene.prompt) == scene
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng)
        assert parse_prompt(scene.prompt) == scene
        assert parse_prompt(scene.prompt.upper() + ".") == scene


@pytest.mark.parametrize(
    "prompt, fragments",
    [
        ("a large purple circle moves left on a black background", ["'purple'", "word 3", "color", "red, green"]),
        ("a huge red circle moves left on a black background", ["'huge'", "word 2", "small, large"]),
        ("a large red hexagon moves left on a black background", ["'hexagon'", "word 4", "circle"]),
        ("a large red circle moves sideways on a black background", ["'sideways'", "word 6", "left"]),
        ("a large red circle stays put on a black background", ["'put'", "word 6", "still"]),
        ("a large red circle jumps on a black background", ["'jumps'", "word 5", "moves"]),
        ("a large red circle moves left on a blue background", ["'blue'", "word 9", "black, gray"]),
        ("the large red circle moves left on a black background", ["'the'", "word 1", "'a'"]),
        ("a large red circle moves left in a black background", ["'in'", "word 7", "'on'"]),
        ("a large red circle moves left on a black background please", ["'please'", "word 11", "end"]),
        ("a large red circle moves left on a black", ["ended", "'background'"]),
        ("a large red circle", ["ended", "motion"]),
        ("a large white circle moves left on a gray background", ["'white'", "word 3", "gray"]),
        ("a small red circle stays still and a large red square moves up on a black background",
         ["'red'", "word 10", "different"]),
        ("a small red circle stays still and a large blue square moves up and a small green circle stays still "
         "on a black background", ["'and'", "word 14", "'on'"]),
        ("", ["empty"]),
        ("   . ", ["empty"]),
    ],
)
def test_parse_rejects_with_named_word(prompt, fragments):
    with pytest.raises(PromptError) as info:
        parse_prompt(prompt)
    assert isinstance(info.value, ValueError)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_scene_validation():
    with pytest.raises(PromptError):
        Scene((ObjectSpec("small", "white", "circle", "stays still"),), "gray")
    with pytest.raises(PromptError):
        Scene((ObjectSpec("small", "red", "circle", "stays still"), ObjectSpec("large", "red", "square", "moves up")),
              "black")
    with pytest.raises(PromptError):
        ObjectSpec("small", "purple", "circle", "stays still")
    assert ObjectSpec("small", "red", "circle", "left").motion == "moves left"  # short motion words are accepted


def test_all_words_is_exactly_the_vocabulary_of_the_prompts():
    words = all_words()
    assert len(words) == len(set(words))
    rng = np.random.default_rng(1)
    used = set()
    for _ in range(500):
        used |= set(sample_scene(rng).prompt.split())
    assert used == set(words)


def test_sample_scene_is_valid_and_covers_the_grammar():
    rng = np.random.default_rng(2)
    scenes = [sample_scene(rng) for _ in range(2000)]
    counts = [len(s.objects) for s in scenes]
    assert 0.4 < counts.count(1) / len(scenes) < 0.6
    for s in scenes:
        assert not (s.background == "gray" and any(o.color == "white" for o in s.objects))
        assert len({o.color for o in s.objects}) == len(s.objects)
    objects = [o for s in scenes for o in s.objects]
    for attr, options in (("size", SIZES), ("color", COLORS), ("shape", SHAPES), ("motion", MOTIONS)):
        seen = [getattr(o, attr) for o in objects]
        for option in options:  # roughly uniform: each value within 40% of its even share (white: black only)
            if option == "white":
                assert seen.count(option) > 0
                continue
            assert abs(seen.count(option) / len(seen) - 1 / len(options)) < 0.4 / len(options), (attr, option)
    assert [sample_scene(np.random.default_rng(5)) for _ in range(3)] == [sample_scene(np.random.default_rng(5))] * 3


# ---------------------------------------------------------------------------------------------------------------
# Renderer
# ---------------------------------------------------------------------------------------------------------------


def _reference_coverage(shape: str, center: np.ndarray, half: tuple[float, float], height: int, width: int,
                        samples: int = 8) -> np.ndarray:
    """Pixel coverage [H, W] of a shape by point sampling (samples^2 points a pixel), independent of the SDFs."""
    offsets = (np.arange(samples) + 0.5) / samples
    ys = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)  # [H * S]
    xs = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    px, py = xs[None, :] - center[0], ys[:, None] - center[1]  # [1, W*S], [H*S, 1]
    hx, hy = half
    if shape == "circle":
        inside = px**2 + py**2 <= hx**2
    elif shape == "square":
        inside = (np.abs(px) <= hx) & (np.abs(py) <= hy)
    else:  # apex (0, -hy), base corners (+-hx, hy): inside when below both slanted edges and above the base
        inside = (py <= hy) & (np.abs(px) <= hx * (py + hy) / (2 * hy))
    return inside.reshape(height, samples, width, samples).mean(axis=(1, 3))


@pytest.mark.parametrize("shape", SHAPES)
def test_render_matches_point_sampled_shapes(shape):
    scene = Scene((ObjectSpec("large", "white", shape, "moves right"),), "black")
    seed = 11
    video = render([scene], [seed])[0]  # [F, 3, H, W]
    start = layout_scene(scene, seed)[0]
    half = half_extents(shape, "large")
    for f in (0, NUM_FRAMES - 1):
        center = start + f * SPEED_PX_PER_FRAME * np.array(MOTION_DIRECTION["moves right"])
        ref = _reference_coverage(shape, center, half, video.shape[-2], video.shape[-1])
        got = video[f, 0].double().numpy()  # white on black: the red channel is the coverage
        assert np.abs(got - ref).mean() < 2e-3
        assert np.abs(got - ref).max() < 0.35  # the 1-px ramp differs from box filtering only at edges and corners
        assert got.sum() == pytest.approx(math.pi * 22.0**2, rel=0.02)  # every shape has area pi r^2


def test_render_shape_range_dtype_and_colors():
    scenes = [parse_prompt("a small orange square stays still and a large cyan circle moves down on a gray background"),
              parse_prompt("a large magenta triangle moves left on a black background")]
    video = render(scenes, [0, 1])
    assert video.shape == (2, NUM_FRAMES, 3, 128, 128) and video.dtype == torch.float32
    assert video.min() >= 0 and video.max() <= 1
    for b, scene in enumerate(scenes):
        frames = video[b].permute(0, 2, 3, 1).reshape(-1, 3)
        for color in [o.color for o in scene.objects] + [None]:
            rgb = torch.tensor(COLOR_RGB[color] if color else BACKGROUND_RGB[scene.background])
            exact = (frames - rgb).abs().amax(dim=1) < 1e-6
            assert exact.sum() > (100 if color else 5000)  # solid interiors are the exact palette color


def test_render_is_deterministic_and_batch_independent():
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng) for _ in range(4)]
    seeds = [7, 8, 9, 7]
    batch = render(scenes, seeds)
    assert torch.equal(batch, render(scenes, seeds))
    assert torch.equal(batch[2], render([scenes[2]], [seeds[2]])[0])
    assert torch.equal(batch[0], render_prompt(scenes[0].prompt, seeds[0]))
    assert not torch.equal(render([scenes[0]], [1]), render([scenes[0]], [2]))  # the seed moves the start


def _object_mask(video: torch.Tensor, color: str) -> torch.Tensor:
    """Pixels within 0.3 of the color: [F, H, W]."""
    rgb = torch.tensor(COLOR_RGB[color]).view(1, 3, 1, 1)
    return (video - rgb).norm(dim=1) < 0.3


@pytest.mark.parametrize("motion", MOTIONS)
def test_motion_direction_speed_and_in_frame(motion):
    scene = Scene((ObjectSpec("large", "green", "square", motion),), "black")
    for video in render([scene, scene], [0, 1]):
        mask = _object_mask(video, "green").float()
        area = mask.sum(dim=(1, 2))
        assert torch.all((area - area[0]).abs() < 0.03 * area[0])  # never clipped by the border
        border = torch.cat([mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]], dim=1)
        assert border.sum() == 0
        ys, xs = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
        cx = (mask * xs).sum(dim=(1, 2)) / area
        cy = (mask * ys).sum(dim=(1, 2)) / area
        step = torch.stack([cx[-1] - cx[0], cy[-1] - cy[0]]) / (NUM_FRAMES - 1)
        expected = SPEED_PX_PER_FRAME * torch.tensor(MOTION_DIRECTION[motion])
        assert torch.allclose(step, expected, atol=0.05)


def test_layouts_keep_every_motion_in_frame():
    rng = np.random.default_rng(4)
    for seed in range(300):
        scene = sample_scene(rng)
        starts = layout_scene(scene, seed)
        for obj, start in zip(scene.objects, starts):
            hx, hy = half_extents(obj.shape, obj.size)
            v = SPEED_PX_PER_FRAME * np.array(MOTION_DIRECTION[obj.motion])
            for f in (0, NUM_FRAMES - 1):
                x, y = start + f * v
                assert hx <= x <= 128 - hx and hy <= y <= 128 - hy


def test_two_objects_do_not_overlap():
    """Objects rendered alone (same layout) and point-sampled: their coverages hardly intersect, for crowded
    scenes of two large objects with crossing motions."""
    rng = np.random.default_rng(5)
    worst = []
    for seed in range(40):
        motions = rng.choice(MOTIONS, size=2, replace=True)
        shapes = rng.choice(SHAPES, size=2)
        scene = Scene((ObjectSpec("large", "red", str(shapes[0]), str(motions[0])),
                       ObjectSpec("large", "blue", str(shapes[1]), str(motions[1]))), "black")
        starts = layout_scene(scene, seed)
        overlap = 0.0
        for f in (0, 4, 8, 12, 16):
            cov = [
                _reference_coverage(o.shape, s + f * SPEED_PX_PER_FRAME * np.array(MOTION_DIRECTION[o.motion]),
                                    half_extents(o.shape, o.size), 128, 128, samples=2)
                for o, s in zip(scene.objects, starts)
            ]
            overlap = max(overlap, float(np.minimum(cov[0], cov[1]).sum() / cov[0].sum()))
        worst.append(overlap)
    assert max(worst) < 0.02  # at most a sliver
    assert np.mean(np.array(worst) == 0.0) > 0.9  # and almost always none


def test_render_draws_later_objects_on_top(monkeypatch):
    scene = parse_prompt("a large red square stays still and a large blue circle stays still on a black background")
    monkeypatch.setattr(world, "layout_scene", lambda *args, **kwargs: np.array([[64.0, 64.0], [64.0, 64.0]]))
    frame = render([scene], [0])[0, 0]
    assert torch.equal(frame[:, 64, 64], torch.tensor(COLOR_RGB["blue"]))  # the second object covers the first
    corner = 64 - int(half_extents("square", "large")[0]) + 1  # square corners stick out of the circle
    assert torch.equal(frame[:, corner, corner], torch.tensor(COLOR_RGB["red"]))


def test_render_rejects_mismatched_inputs():
    scene = parse_prompt("a large red square stays still on a black background")
    with pytest.raises(ValueError):
        render([scene], [0, 1])
    with pytest.raises(ValueError):  # a large object moving for 100 frames cannot stay in frame
        render([Scene((ObjectSpec("large", "red", "square", "moves left"),), "black")], [0], num_frames=101)


def test_geometry_scales_with_resolution():
    scene = Scene((ObjectSpec("small", "yellow", "circle", "moves up"),), "gray")
    video = render([scene], [0], height=64, width=64, num_frames=9)
    assert video.shape == (1, 9, 3, 64, 64)
    area = _object_mask(video[0], "yellow").sum(dim=(1, 2)).float()
    assert torch.allclose(area, torch.full_like(area, math.pi * 6.0**2), rtol=0.1)
    assert world.geometry_scale(64, 64) == 0.5
