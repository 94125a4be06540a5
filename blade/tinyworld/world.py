"""TinyWorld: the procedurally rendered world the miniature model is trained on, and whose ground truth is known.

Prompt grammar (one or two objects, whitespace and case tolerant, trailing period allowed)::

    a {size} {color} {shape} {motion} [and a {size} {color} {shape} {motion}] on a {background} background

- size: small, large
- color: red, green, blue, yellow, magenta, cyan, orange, white (white only on a black background)
- shape: circle, square, triangle
- motion: moves left, moves right, moves up, moves down, stays still
- background: black, gray
- two objects never share a color.

Rendering: `render(scenes, seeds)` draws a batch of videos `[B, F, 3, H, W]` in one vectorized torch pass.
Every shape is drawn from its signed distance (in pixels) with a one-pixel anti-aliasing ramp. All shapes of one
size class have the same area (pi * radius^2), so the size is readable from the area alone and the shape from the
fill ratio of the bounding box (circle pi/4, square 1, triangle 1/2). Objects move at `SPEED_PX_PER_FRAME` along
their motion direction; their start positions are drawn from `numpy.random.default_rng(seed)` so that the whole
motion stays in frame and two objects never overlap by more than a sliver. Geometry (radii, speed, margins) scales
with `min(height, width) / 128`, so the default 128x128 video uses the values below exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------------
# Fixed video format and world constants
# ---------------------------------------------------------------------------------------------------------------

HEIGHT = 128
WIDTH = 128
NUM_FRAMES = 17  # 4k + 1 frames, Wan's VAE rule
FPS = 8

SPEED_PX_PER_FRAME = 3.0  # speed of every moving object at the reference 128 px resolution
RADII = {"small": 12.0, "large": 22.0}  # equal-area radius per size class; areas 452 vs 1521 px (3.4x apart)
MARGIN_PX = 2.0  # distance between a shape's bounding box and the frame border, at every frame
MIN_GAP_PX = 2.0  # wanted gap between the two objects' shapes, at every frame
_LAYOUT_CANDIDATES = 64  # start positions tried at once per round
_LAYOUT_ROUNDS = 8
_RENDER_CHUNK = 256  # scenes rendered per vectorized pass

SIZES = ("small", "large")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan", "orange", "white")
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("moves left", "moves right", "moves up", "moves down", "stays still")
BACKGROUNDS = ("black", "gray")

# Exact RGB in [0, 1]. Every pair of palette entries (colors and backgrounds) is at least 0.5 apart in RGB.
COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
    "orange": (1.0, 0.5, 0.0),
    "white": (1.0, 1.0, 1.0),
}
BACKGROUND_RGB: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
}

# Unit velocity (dx, dy) per motion phrase; image y grows downwards, so "up" is -y.
MOTION_DIRECTION: dict[str, tuple[float, float]] = {
    "moves left": (-1.0, 0.0),
    "moves right": (1.0, 0.0),
    "moves up": (0.0, -1.0),
    "moves down": (0.0, 1.0),
    "stays still": (0.0, 0.0),
}

_MOTION_ALIASES = {"left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down",
                   "still": "stays still"}
_SHAPE_ID = {name: i for i, name in enumerate(SHAPES)}


class PromptError(ValueError):
    """A prompt (or scene) outside the TinyWorld grammar; the message names the bad word and what was expected."""


# ---------------------------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene. `motion` is the full phrase ("moves left", ..., "stays still")."""

    size: str
    color: str
    shape: str
    motion: str

    def __post_init__(self):
        motion = _MOTION_ALIASES.get(self.motion, self.motion)
        object.__setattr__(self, "motion", motion)
        for kind, value, options in (
            ("size", self.size, SIZES),
            ("color", self.color, COLORS),
            ("shape", self.shape, SHAPES),
            ("motion", self.motion, MOTIONS),
        ):
            if value not in options:
                raise PromptError(f"unknown {kind} {value!r}; expected one of: {', '.join(options)}")

    @property
    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} {self.motion}"


@dataclass(frozen=True)
class Scene:
    """One or two objects (drawn in this order, the later on top) on a background."""

    objects: tuple[ObjectSpec, ...]
    background: str

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= 2:
            raise PromptError(f"a scene has one or two objects, got {len(self.objects)}")
        if self.background not in BACKGROUNDS:
            raise PromptError(f"unknown background {self.background!r}; expected one of: {', '.join(BACKGROUNDS)}")
        if self.background == "gray" and any(o.color == "white" for o in self.objects):
            raise PromptError("color 'white' is not allowed on a gray background")
        if len(self.objects) == 2 and self.objects[0].color == self.objects[1].color:
            raise PromptError(f"two objects share the color {self.objects[0].color!r}; they must differ")

    @property
    def prompt(self) -> str:
        """Canonical prompt, e.g. 'a large red circle moves left on a black background'."""
        return " and ".join(o.phrase for o in self.objects) + f" on a {self.background} background"


def all_words() -> list[str]:
    """The grammar's vocabulary, in a fixed order (for the word-level tokenizer)."""
    words = ["a", "and", "on", "background", "moves", "stays", "still", "left", "right", "up", "down"]
    words += list(SIZES) + list(COLORS) + list(SHAPES) + list(BACKGROUNDS)
    return words


# ---------------------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------------------


class _Words:
    """Cursor over the prompt's words that raises `PromptError` naming the word and what was expected."""

    def __init__(self, words: list[str]):
        self.words = words
        self.pos = 0  # 0-based index of the next word

    def _next(self, what: str) -> str:
        if self.pos >= len(self.words):
            raise PromptError(f"prompt ended after word {len(self.words)}; expected {what}")
        word = self.words[self.pos]
        self.pos += 1
        return word

    def expect(self, *keywords: str) -> str:
        what = " or ".join(repr(k) for k in keywords)
        word = self._next(what)
        if word not in keywords:
            raise PromptError(f"unexpected word {word!r} at word {self.pos}; expected {what}")
        return word

    def choose(self, kind: str, options: Sequence[str]) -> str:
        what = f"a {kind} (one of: {', '.join(options)})"
        word = self._next(what)
        if word not in options:
            raise PromptError(f"unknown {kind} {word!r} at word {self.pos}; expected one of: {', '.join(options)}")
        return word


def _parse_object(words: _Words) -> tuple[ObjectSpec, int]:
    """Parse 'a {size} {color} {shape} {motion}'; returns the object and the 1-based index of its color word."""
    words.expect("a")
    size = words.choose("size", SIZES)
    color = words.choose("color", COLORS)
    color_pos = words.pos
    shape = words.choose("shape", SHAPES)
    verb = words.choose("motion", ("moves", "stays"))
    if verb == "moves":
        motion = "moves " + words.choose("direction", ("left", "right", "up", "down"))
    else:
        motion = "stays " + words.choose("word", ("still",))
    return ObjectSpec(size=size, color=color, shape=shape, motion=motion), color_pos


def parse_prompt(text: str) -> Scene:
    """Parse a TinyWorld prompt into a `Scene`; raises `PromptError` naming the first bad word."""
    cleaned = text.strip().lower()
    if cleaned.endswith("."):
        cleaned = cleaned[:-1]
    if not cleaned.split():
        raise PromptError(
            "empty prompt; expected: a {size} {color} {shape} {motion} [and a {size} {color} {shape} {motion}] "
            "on a {background} background"
        )
    words = _Words(cleaned.split())
    objects = [_parse_object(words)]
    if words.expect("and", "on") == "and":
        objects.append(_parse_object(words))
        words.expect("on")
    words.expect("a")
    background = words.choose("background", BACKGROUNDS)
    words.expect("background")
    if words.pos < len(words.words):
        raise PromptError(f"unexpected word {words.words[words.pos]!r} at word {words.pos + 1}; expected end of prompt")

    if len(objects) == 2 and objects[0][0].color == objects[1][0].color:
        color, pos = objects[1][0].color, objects[1][1]
        raise PromptError(
            f"color {color!r} at word {pos} is already used by the first object; two objects must have different colors"
        )
    if background == "gray":
        for obj, pos in objects:
            if obj.color == "white":
                raise PromptError(f"color 'white' at word {pos} is not allowed on a gray background (only on black)")
    return Scene(objects=tuple(obj for obj, _ in objects), background=background)


def read_prompts(path: str | Path) -> list[tuple[str, Scene]]:
    """Prompts of a file (one a line; blank lines and ``#`` comments skipped), each parsed by the world's grammar.

    Raises ``PromptError`` naming the line and the bad word, and ``ValueError`` for a file with no prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            prompts.append((text, parse_prompt(text)))
        except PromptError as err:
            raise PromptError(f"{path}:{number}: {err}") from None
    if not prompts:
        raise ValueError(f"{path} holds no prompt (blank lines and # comments are skipped)")
    return prompts


def sample_scene(rng: np.random.Generator, num_objects: int | None = None) -> Scene:
    """Draw a scene: the number of objects is uniform in {1, 2} (unless given), then the scene is uniform over the
    grammar's valid scenes with that many objects (rejection sampling of independent uniform words)."""
    n = int(rng.integers(1, 3)) if num_objects is None else num_objects
    while True:
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        objects = tuple(
            ObjectSpec(
                size=SIZES[rng.integers(len(SIZES))],
                color=COLORS[rng.integers(len(COLORS))],
                shape=SHAPES[rng.integers(len(SHAPES))],
                motion=MOTIONS[rng.integers(len(MOTIONS))],
            )
            for _ in range(n)
        )
        if background == "gray" and any(o.color == "white" for o in objects):
            continue
        if n == 2 and objects[0].color == objects[1].color:
            continue
        return Scene(objects=objects, background=background)


# ---------------------------------------------------------------------------------------------------------------
# Geometry and layout (CPU, numpy, per scene)
# ---------------------------------------------------------------------------------------------------------------


def geometry_scale(height: int, width: int) -> float:
    """Factor applied to radii, speed and margins for a video of this size (1.0 at 128 px)."""
    return min(height, width) / min(HEIGHT, WIDTH)


def half_extents(shape: str, size: str, scale: float = 1.0) -> tuple[float, float]:
    """Half width and half height of the shape's bounding box, in pixels. Every shape has area pi * r^2.

    circle: radius r. square: half side r * sqrt(pi) / 2. triangle (equilateral, pointing up): side
    s = r * sqrt(4 pi / sqrt(3)), half width s / 2, half height sqrt(3) s / 4.
    """
    r = RADII[size] * scale
    if shape == "circle":
        return r, r
    if shape == "square":
        a = r * math.sqrt(math.pi) / 2.0
        return a, a
    side = r * math.sqrt(4.0 * math.pi / math.sqrt(3.0))
    return side / 2.0, side * math.sqrt(3.0) / 4.0


def expected_area(size: str, scale: float = 1.0) -> float:
    """Area in pixels of any shape of this size class."""
    return math.pi * (RADII[size] * scale) ** 2


def _start_range(half: float, velocity: float, extent: int, steps: int, margin: float) -> tuple[float, float]:
    """Interval of start centers along one axis that keeps the box inside the frame for all `steps` moves."""
    travel = velocity * steps
    lo = margin + half + max(0.0, -travel)
    hi = extent - margin - half - max(0.0, travel)
    return lo, hi


def _support(shape: str, hx: float, hy: float, axes: np.ndarray) -> np.ndarray:
    """Support function max_{p in shape} <u, p> of a centered shape for unit axes u [A, 2]; returns [A]."""
    ux, uy = axes[:, 0], axes[:, 1]
    if shape == "circle":
        return np.full(len(axes), hx)
    if shape == "square":
        return hx * np.abs(ux) + hy * np.abs(uy)
    return np.maximum(-uy * hy, hx * np.abs(ux) + uy * hy)  # vertices (0, -hy) and (+-hx, hy)


def _separation_axes(num: int = 64) -> np.ndarray:
    """Unit directions [A, 2], a fan of `num` angles; with num divisible by 4 it holds the square's edge normals and
    the triangle's base normal (its slanted edge normals are added per pair in `_separation`)."""
    angles = np.linspace(0.0, 2.0 * math.pi, num, endpoint=False)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


_AXES = _separation_axes()


def _separation(d: np.ndarray, shapes: tuple[str, str], halves: list[np.ndarray]) -> np.ndarray:
    """Signed gap in pixels between two convex shapes whose centers differ by d = c1 - c0 [..., 2].

    Separating-axis test over a set of directions: max_u (<u, d> - h0(u) - h1(-u)) is the distance between the
    shapes when they are apart and minus the penetration depth when they overlap (exact for the axes included).
    """
    axes = _AXES
    (hx0, hy0), (hx1, hy1) = halves
    for shape, hx, hy in ((shapes[0], hx0, hy0), (shapes[1], hx1, hy1)):
        if shape == "triangle":
            n = np.array([[2 * hy, -hx], [-2 * hy, -hx]]) / math.hypot(2 * hy, hx)
            axes = np.concatenate([axes, n, -n])
    reach = _support(shapes[0], hx0, hy0, axes) + _support(shapes[1], hx1, hy1, -axes)  # [A]
    return (d @ axes.T - reach).max(axis=-1)


def layout_scene(scene: Scene, seed: int, *, num_frames: int = NUM_FRAMES, height: int = HEIGHT,
                 width: int = WIDTH) -> np.ndarray:
    """Start centers of the scene's objects, drawn from `numpy.random.default_rng(seed)`.

    Each start is uniform over the positions that keep the object's whole motion inside the frame. With two
    objects, candidates are drawn in rounds of `_LAYOUT_CANDIDATES`; the first whose shapes stay `MIN_GAP_PX` apart
    at every frame is taken. If none in `_LAYOUT_ROUNDS` rounds does (tight combinations such as two large crossing
    triangles), the candidate with the largest closest approach is taken, so the overlap is as small as possible.

    Returns:
        float64 array [N, 2] of (x, y) start centers in pixels (pixel i covers [i, i + 1]).
    """
    scale = geometry_scale(height, width)
    steps = num_frames - 1
    rng = np.random.default_rng(seed)
    halves, velocities, lows, highs = [], [], [], []
    for obj in scene.objects:
        hx, hy = half_extents(obj.shape, obj.size, scale)
        vx, vy = (d * SPEED_PX_PER_FRAME * scale for d in MOTION_DIRECTION[obj.motion])
        (lx, hix), (ly, hiy) = (_start_range(hx, vx, width, steps, MARGIN_PX * scale),
                                _start_range(hy, vy, height, steps, MARGIN_PX * scale))
        if hix < lx or hiy < ly:
            raise ValueError(f"{obj.phrase!r} does not fit a {height}x{width} video of {num_frames} frames")
        halves.append(np.array([hx, hy]))
        velocities.append(np.array([vx, vy]))
        lows.append(np.array([lx, ly]))
        highs.append(np.array([hix, hiy]))
    lows, highs = np.stack(lows), np.stack(highs)  # [N, 2]

    if len(scene.objects) == 1:
        return lows + (highs - lows) * rng.random((1, 2))

    t = np.arange(num_frames, dtype=np.float64)[:, None]  # [F, 1]
    shapes = (scene.objects[0].shape, scene.objects[1].shape)
    best, best_gap = None, -math.inf
    for _ in range(_LAYOUT_ROUNDS):
        starts = lows + (highs - lows) * rng.random((_LAYOUT_CANDIDATES, 2, 2))  # [K, N, 2]
        d = (starts[:, None, 1] - starts[:, None, 0]) + t * (velocities[1] - velocities[0])  # [K, F, 2]
        gap = _separation(d, shapes, halves).min(axis=1)  # [K] closest approach over the frames
        ok = np.flatnonzero(gap >= MIN_GAP_PX * scale)
        if len(ok):
            return starts[ok[0]]
        k = int(np.argmax(gap))
        if gap[k] > best_gap:
            best, best_gap = starts[k], float(gap[k])
    return best


# ---------------------------------------------------------------------------------------------------------------
# Renderer (torch, vectorized over scenes, objects, frames and pixels)
# ---------------------------------------------------------------------------------------------------------------


def _scene_tensors(scenes: Sequence[Scene], seeds: Sequence[int], num_frames: int, height: int, width: int):
    """Per-object parameters, padded to two objects: centers [B, 2, 2], velocity [B, 2, 2], half extents
    [B, 2, 2], shape id [B, 2], color [B, 2, 3], valid [B, 2], background color [B, 3] (all float64/int64 numpy)."""
    b = len(scenes)
    scale = geometry_scale(height, width)
    start = np.zeros((b, 2, 2))
    velocity = np.zeros((b, 2, 2))
    half = np.ones((b, 2, 2))
    shape_id = np.zeros((b, 2), dtype=np.int64)
    color = np.zeros((b, 2, 3))
    valid = np.zeros((b, 2))
    background = np.zeros((b, 3))
    for i, (scene, seed) in enumerate(zip(scenes, seeds, strict=True)):
        n = len(scene.objects)
        start[i, :n] = layout_scene(scene, int(seed), num_frames=num_frames, height=height, width=width)
        background[i] = BACKGROUND_RGB[scene.background]
        for j, obj in enumerate(scene.objects):
            velocity[i, j] = [d * SPEED_PX_PER_FRAME * scale for d in MOTION_DIRECTION[obj.motion]]
            half[i, j] = half_extents(obj.shape, obj.size, scale)
            shape_id[i, j] = _SHAPE_ID[obj.shape]
            color[i, j] = COLOR_RGB[obj.color]
            valid[i, j] = 1.0
    return start, velocity, half, shape_id, color, valid, background


def _circle_sdf(dx: torch.Tensor, dy: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(dx * dx + dy * dy) - hx


def _square_sdf(dx: torch.Tensor, dy: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    return torch.maximum(dx.abs() - hx, dy.abs() - hy)


def _triangle_sdf(dx: torch.Tensor, dy: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    # Apex (0, -hy), base corners (+-hx, hy): intersection of three half planes. The max of the signed line
    # distances is exact inside and near the edges, which is all the one-pixel anti-aliasing ramp needs.
    norm = torch.sqrt(4.0 * hy * hy + hx * hx)
    side = (2.0 * hy / norm) * dx.abs() - (hx / norm) * dy - hx * hy / norm  # both slanted edges, mirrored in x
    return torch.maximum(side, dy - hy)


_SDF = (_circle_sdf, _square_sdf, _triangle_sdf)  # indexed by shape id


def _signed_distance(dx: torch.Tensor, dy: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor, shape_id: torch.Tensor,
                     shapes_present: Sequence[int]) -> torch.Tensor:
    """Signed distance in pixels (negative inside) of each object's shape.

    Args:
        dx: [B, F, 1, W] pixel x minus object center x. dy: [B, F, H, 1] likewise for y.
        hx, hy, shape_id: [B, 1, 1, 1] half extents and shape index of the object.
        shapes_present: the shape ids in the batch (known on the host), so absent shapes cost nothing.
    Returns:
        [B, F, H, W].
    """
    sdf = None
    for sid in shapes_present:
        d = _SDF[sid](dx, dy, hx, hy)
        sdf = d if sdf is None else torch.where(shape_id == sid, d, sdf)
    return sdf


def render(scenes: Sequence[Scene], seeds: Sequence[int], *, num_frames: int = NUM_FRAMES, height: int = HEIGHT,
           width: int = WIDTH, device: str | torch.device = "cpu") -> torch.Tensor:
    """Render a batch of TinyWorld videos; deterministic for each (scene, seed).

    Objects are composited in scene order over the background with coverage clamp(0.5 - sdf, 0, 1).

    Returns:
        float32 tensor [B, F, 3, H, W] in [0, 1].
    """
    scenes, seeds = list(scenes), [int(s) for s in seeds]
    if len(scenes) != len(seeds):
        raise ValueError(f"got {len(scenes)} scenes and {len(seeds)} seeds")
    device = torch.device(device)
    if len(scenes) > _RENDER_CHUNK:  # bound the temporaries ([chunk, F, H, W] per shape) on big batches
        return torch.cat([
            render(scenes[i:i + _RENDER_CHUNK], seeds[i:i + _RENDER_CHUNK], num_frames=num_frames, height=height,
                   width=width, device=device)
            for i in range(0, len(scenes), _RENDER_CHUNK)
        ])
    params = _scene_tensors(scenes, seeds, num_frames, height, width)
    slot_shapes = [sorted(set(params[3][params[5][:, j] > 0, j].tolist())) for j in range(2)]  # shape ids per slot
    start, velocity, half, shape_id, color, valid, background = (
        torch.as_tensor(p, device=device) for p in params
    )
    start, velocity, half, color, valid, background = (
        p.to(torch.float32) for p in (start, velocity, half, color, valid, background)
    )
    b = len(scenes)
    t = torch.arange(num_frames, device=device, dtype=torch.float32)
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5  # pixel centers
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5

    video = background.view(b, 1, 3, 1, 1).expand(b, num_frames, 3, height, width).contiguous()
    for j in range(2):
        if not slot_shapes[j]:  # no scene has a second object
            continue
        centers = start[:, j, None, :] + t[None, :, None] * velocity[:, j, None, :]  # [B, F, 2]
        dx = xs.view(1, 1, 1, width) - centers[..., 0, None, None]  # [B, F, 1, W]
        dy = ys.view(1, 1, height, 1) - centers[..., 1, None, None]  # [B, F, H, 1]
        sdf = _signed_distance(
            dx, dy, half[:, j, 0].view(b, 1, 1, 1), half[:, j, 1].view(b, 1, 1, 1), shape_id[:, j].view(b, 1, 1, 1),
            slot_shapes[j],
        )
        coverage = (0.5 - sdf).clamp_(0.0, 1.0).mul_(valid[:, j].view(b, 1, 1, 1))  # [B, F, H, W]
        video.lerp_(color[:, j].view(b, 1, 3, 1, 1), coverage.unsqueeze(2))
    return video.clamp_(0.0, 1.0)


def render_prompt(prompt: str, seed: int, *, num_frames: int = NUM_FRAMES, height: int = HEIGHT, width: int = WIDTH,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """Render one prompt: float32 [F, 3, H, W] in [0, 1]."""
    scene = parse_prompt(prompt)
    return render([scene], [seed], num_frames=num_frames, height=height, width=width, device=device)[0]
