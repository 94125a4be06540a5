"""TinyWorld metrics, computed from decoded RGB frames only (no learned model).

Frames are float `[F, 3, H, W]` in [0, 1] or uint8 `[F, H, W, 3]` (torch or numpy); both are accepted everywhere.

Segmentation. Every pixel is labelled with its nearest palette entry (the 8 object colors and the 2 backgrounds,
Euclidean RGB distance). The video's background is the background entry that labels more pixels. An object of
color c is the set of pixels labelled c within `COLOR_THRESHOLD` of c, cleaned by a 3x3 morphological opening
(which drops isolated pixels and the anti-aliased rims of other objects). A frame "finds" the object when its mask
has at least `MIN_AREA_FRACTION` of a small object's area. If an expected color is not found, the object is looked
for among the remaining foreground pixels (farther than `FOREGROUND_THRESHOLD` from the background, not within a
pixel of another found object), so that a wrongly colored object fails only its color check.

`score_video` checks, per expected object i (`object{i}.{attr}`), and once per scene:
- present: found in at least `PRESENT_FRACTION` of the frames;
- color: the dominant nearest color label of the object's pixels is the expected color;
- shape: median fill ratio of the bounding box (area / box area) classified with the thresholds
  `SHAPE_FILL_THRESHOLDS` (triangle ~0.5 < 0.64 <= circle ~0.79 < 0.89 <= square ~1.0);
- size: median area below or above the geometric mean of the two size classes' areas (all shapes of one size class
  have the same area in the renderer);
- motion: least-squares line through the centroids over the frames (velocity in px/frame). "stays still" needs
  |v| < `STILL_MAX_SPEED` x world speed; a moving object needs its speed along the expected direction within
  `MOVING_SPEED_RANGE` x world speed and its cross speed below `MAX_CROSS_SPEED` x world speed;
- background: the detected background is the expected one.
An absent object fails all its checks. `adherence` = fraction of checks that pass.

Not a check (adherence is unchanged by it): per object, `blobs` = the median over the frames that find it of the
number of connected pieces of its mask of at least the finding area (4-connected); an object drawn more times than
the prompt names its color (blobs > that count) is *duplicated*. `score_video` returns `duplicated` = the fraction of
the scene's objects that are; a few-step student that hedges between layouts draws two copies where the prompt asks
for one, which the checks above see only through a broken fill ratio.

`stability` (lower is better) = mean over the found objects of (coefficient of variation of the object's area over
the frames + Euclidean std over the frames of the object's mean RGB); the two parts are reported as
`stability_area` and `stability_color`. None when no object is found.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from blade.tinyworld.world import (
    BACKGROUND_RGB,
    BACKGROUNDS,
    COLOR_RGB,
    COLORS,
    HEIGHT,
    MOTION_DIRECTION,
    SPEED_PX_PER_FRAME,
    WIDTH,
    Scene,
    expected_area,
)

COLOR_THRESHOLD = 0.3  # max RGB distance of an object pixel to its palette color (palette entries are >= 0.5 apart)
FOREGROUND_THRESHOLD = 0.25  # min RGB distance of a foreground pixel to the background color
MIN_AREA_FRACTION = 0.25  # a frame finds an object with at least this fraction of a small object's area
PRESENT_FRACTION = 0.8
SHAPE_FILL_THRESHOLDS = (0.64, 0.89)  # triangle | circle | square
STILL_MAX_SPEED = 0.3  # fractions of the world speed
MOVING_SPEED_RANGE = (0.5, 1.5)
MAX_CROSS_SPEED = 0.5
FIDELITY_BACKGROUND_WEIGHT = 0.25

_PALETTE_NAMES = COLORS + BACKGROUNDS
_PALETTE = torch.tensor([COLOR_RGB[c] for c in COLORS] + [BACKGROUND_RGB[b] for b in BACKGROUNDS])  # [P, 3]
_ATTRIBUTES = ("present", "color", "shape", "size", "motion")


# ---------------------------------------------------------------------------------------------------------------
# Frames and segmentation
# ---------------------------------------------------------------------------------------------------------------


def to_float_frames(frames) -> torch.Tensor:
    """float32 [F, 3, H, W] in [0, 1] from float [F, 3, H, W] / [F, H, W, 3] or uint8 [F, H, W, 3] (torch or numpy)."""
    x = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    x = x.detach().cpu()
    if x.ndim != 4:
        raise ValueError(f"expected frames of shape [F, 3, H, W] or [F, H, W, 3], got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    return x.float().clamp(0.0, 1.0).contiguous()


def _scale(frames: torch.Tensor) -> float:
    return min(frames.shape[-2], frames.shape[-1]) / min(HEIGHT, WIDTH)


def _nearest(frames: torch.Tensor, colors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest of colors [P, 3] for every pixel of [F, 3, H, W]: (index int64 [F, H, W], RGB distance [F, H, W]).

    A running minimum over the few colors (no [F, P, H, W] temporary); ties go to the earlier color."""
    best, index = None, None
    for p, rgb in enumerate(colors):
        d = (frames - rgb.view(1, 3, 1, 1)).square_().sum(dim=1)  # [F, H, W]
        if best is None:
            best, index = d, torch.zeros_like(d, dtype=torch.long)
        else:
            closer = d < best
            best = torch.where(closer, d, best)
            index = index.masked_fill(closer, p)
    return index, best.sqrt()


def _palette_labels(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest palette entry per pixel: labels int64 [F, H, W] (index into `_PALETTE_NAMES`) and distance [F, H, W]."""
    return _nearest(frames, _PALETTE)


def _spread3(mask: torch.Tensor, dim: int, op, pad_value: bool) -> torch.Tensor:
    """op (logical and/or) of each pixel with its two neighbours along dim of bool [F, H, W]."""
    pad = [0, 0, 0, 0]
    pad[2 * (2 - dim):2 * (2 - dim) + 2] = [1, 1]  # F.pad lists the last dim first
    padded = F.pad(mask, pad, value=pad_value)
    n = mask.shape[dim]
    return op(op(padded.narrow(dim, 0, n), padded.narrow(dim, 1, n)), padded.narrow(dim, 2, n))


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """3x3 binary erosion of bool [F, H, W] (outside the frame counts as set, so the border does not erode)."""
    return _spread3(_spread3(mask, 1, torch.logical_and, True), 2, torch.logical_and, True)


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    """3x3 binary dilation of bool [F, H, W]."""
    return _spread3(_spread3(mask, 1, torch.logical_or, False), 2, torch.logical_or, False)


def _opening(mask: torch.Tensor) -> torch.Tensor:
    """3x3 binary opening of bool [F, H, W]: removes specks and one-pixel rims, keeps solid shapes."""
    return _dilate(_erode(mask))


def _detect_background(labels: torch.Tensor) -> str:
    counts = [(labels == len(COLORS) + i).sum().item() for i in range(len(BACKGROUNDS))]
    return BACKGROUNDS[int(np.argmax(counts))]


def _color_mask(frames: torch.Tensor, labels: torch.Tensor, dist: torch.Tensor, color: str) -> torch.Tensor:
    return _opening((labels == COLORS.index(color)) & (dist < COLOR_THRESHOLD))


def _min_area(frames: torch.Tensor) -> float:
    return MIN_AREA_FRACTION * expected_area("small", _scale(frames))


def _found_frames(mask: torch.Tensor, min_area: float) -> torch.Tensor:
    return mask.sum(dim=(1, 2)) >= min_area


def _segment_objects(frames: torch.Tensor, scene_colors: Sequence[str]) -> tuple[list[torch.Tensor], str]:
    """Masks bool [F, H, W] of the expected objects (by color, with the fallback described in the module docstring)
    and the detected background name."""
    labels, dist = _palette_labels(frames)
    background = _detect_background(labels)
    min_area = _min_area(frames)
    masks = [_color_mask(frames, labels, dist, c) for c in scene_colors]
    present = [_found_frames(m, min_area).float().mean().item() >= PRESENT_FRACTION for m in masks]
    missing = [i for i, p in enumerate(present) if not p]
    if not missing:
        return masks, background

    bg_rgb = torch.tensor([BACKGROUND_RGB[background]])
    foreground = _nearest(frames, bg_rgb)[1] > FOREGROUND_THRESHOLD  # [F, H, W]
    for i, p in enumerate(present):
        if p:
            foreground &= ~_dilate(masks[i])
    # The remaining foreground, split by nearest object color; missing objects take the most common colors in order.
    color_labels = _nearest(frames, _PALETTE[: len(COLORS)])[0]  # [F, H, W]
    if len(missing) == 1:
        masks[missing[0]] = _opening(foreground)
    else:
        counts = torch.bincount(color_labels[foreground], minlength=len(COLORS))
        for i, label in zip(missing, counts.argsort(descending=True).tolist()):
            masks[i] = _opening(foreground & (color_labels == label))
    return masks, background


# ---------------------------------------------------------------------------------------------------------------
# Per-object measurements
# ---------------------------------------------------------------------------------------------------------------


def _count_blobs(mask: torch.Tensor, min_area: float) -> torch.Tensor:
    """Connected pieces (4-connectivity) of at least `min_area` pixels in each frame of bool mask [F, H, W] -> [F].

    Label propagation with pointer jumping: every mask pixel starts with its own flat index, takes the largest label
    among itself and its masked 4-neighbours, then the label of the pixel its label names (a jump keeps it inside its
    piece); when nothing changes every piece carries one label, its largest index.
    """
    if not mask.any():
        return torch.zeros(mask.shape[0], dtype=torch.long)
    rows, cols = torch.nonzero(mask.any(dim=(0, 2)))[:, 0], torch.nonzero(mask.any(dim=(0, 1)))[:, 0]
    mask = mask[:, rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]  # the pieces' box: fewer pixels to propagate over
    num_frames, h, w = mask.shape
    n = h * w
    index = torch.arange(n, dtype=torch.long).expand(num_frames, n)
    flat_mask = mask.reshape(num_frames, n)
    labels = torch.where(flat_mask, index, -1)
    while True:
        grid = F.pad(labels.reshape(num_frames, h, w), (1, 1, 1, 1), value=-1)
        neighbours = torch.stack([grid[:, 1:-1, :-2], grid[:, 1:-1, 2:], grid[:, :-2, 1:-1], grid[:, 2:, 1:-1]])
        grown = torch.maximum(labels, neighbours.amax(dim=0).reshape(num_frames, n))
        grown = torch.where(flat_mask, grown, -1)
        for _ in range(2):  # pointer jumps
            grown = torch.where(flat_mask, torch.gather(grown, 1, grown.clamp_min(0)), -1)
        if torch.equal(grown, labels):
            break
        labels = grown
    keys = (labels + torch.arange(num_frames)[:, None] * n)[flat_mask]
    sizes = torch.bincount(keys, minlength=num_frames * n).reshape(num_frames, n)
    return (sizes >= max(min_area, 1)).sum(dim=1)


def _measure(frames: torch.Tensor, mask: torch.Tensor) -> dict:
    """Per-object features over the frames that find it.

    Returns a dict: found_fraction, found (bool [F]), area (float [F]), fill (float [F]), centroid ([F, 2] x, y),
    mean_rgb ([F, 3]), dominant_color (palette color name or None), velocity ((vx, vy) px/frame or None).
    """
    num_frames, h, w = mask.shape
    found = _found_frames(mask, _min_area(frames))
    m = mask.float()
    area = m.sum(dim=(1, 2))  # [F]
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    safe = area.clamp_min(1.0)
    centroid = torch.stack([(m.sum(1) * xs).sum(1) / safe, (m.sum(2) * ys).sum(1) / safe], dim=1)  # [F, 2]
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # [F, H], [F, W]
    box_h = _extent(rows)
    box_w = _extent(cols)
    fill = area / (box_h * box_w).clamp_min(1.0)
    mean_rgb = (frames * m[:, None]).sum(dim=(2, 3)) / safe[:, None]  # [F, 3]

    dominant = None
    if found.any():
        pix = frames.permute(0, 2, 3, 1)[mask & found[:, None, None]]  # [N, 3]
        nearest = torch.cdist(pix, _PALETTE[: len(COLORS)]).argmin(dim=1)
        dominant = COLORS[int(torch.bincount(nearest, minlength=len(COLORS)).argmax())]
    velocity = _fit_velocity(centroid[found], torch.nonzero(found)[:, 0].float()) if found.sum() >= 2 else None
    return {
        "found_fraction": found.float().mean().item(),
        "found": found,
        "area": area,
        "fill": fill,
        "centroid": centroid,
        "mean_rgb": mean_rgb,
        "dominant_color": dominant,
        "velocity": velocity,
    }


def _extent(occupied: torch.Tensor) -> torch.Tensor:
    """Length of the span from the first to the last True along the last dim; [F, N] -> [F] (0 if none)."""
    idx = torch.arange(occupied.shape[1], dtype=torch.float32)
    first = torch.where(occupied, idx, math.inf).amin(dim=1)
    last = torch.where(occupied, idx, -math.inf).amax(dim=1)
    return torch.where(occupied.any(dim=1), last - first + 1.0, torch.zeros_like(first))


def _fit_velocity(centroid: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
    """Least-squares slope of centroid [N, 2] against frame index t [N]: (vx, vy) in px/frame."""
    tc = t - t.mean()
    slope = (tc[:, None] * (centroid - centroid.mean(dim=0))).sum(dim=0) / (tc * tc).sum()
    return float(slope[0]), float(slope[1])


def _classify_shape(fill: float) -> str:
    low, high = SHAPE_FILL_THRESHOLDS
    return "triangle" if fill < low else ("circle" if fill < high else "square")


def _classify_size(area: float, scale: float) -> str:
    split = math.sqrt(expected_area("small", scale) * expected_area("large", scale))
    return "small" if area < split else "large"


def _motion_ok(velocity: tuple[float, float], motion: str, speed: float) -> bool:
    v = np.asarray(velocity)
    d = np.asarray(MOTION_DIRECTION[motion])
    if not d.any():
        return bool(np.linalg.norm(v) < STILL_MAX_SPEED * speed)
    along = float(v @ d)
    cross = float(np.linalg.norm(v - along * d))
    lo, hi = MOVING_SPEED_RANGE
    return lo * speed <= along <= hi * speed and cross < MAX_CROSS_SPEED * speed


# ---------------------------------------------------------------------------------------------------------------
# Public metrics
# ---------------------------------------------------------------------------------------------------------------


def score_video(frames, scene: Scene) -> dict:
    """Prompt adherence and temporal stability of one video against its scene (see the module docstring).

    Returns:
        dict with `checks` ({name: bool}), `adherence` (fraction of passing checks), `stability`,
        `stability_area`, `stability_color` (None when no object is found), `detected_background`, and per object
        `objects` (measured shape / size / velocity / color, for inspection).
    """
    frames = to_float_frames(frames)
    scale = _scale(frames)
    masks, background = _segment_objects(frames, [o.color for o in scene.objects])
    checks: dict[str, bool] = {}
    objects, area_cv, color_std, duplicated = [], [], [], []
    for i, (obj, mask) in enumerate(zip(scene.objects, masks)):
        m = _measure(frames, mask)
        present = m["found_fraction"] >= PRESENT_FRACTION and m["velocity"] is not None
        found = m["found"]
        info = {"found_fraction": m["found_fraction"]}
        if found.any():
            area, fill = m["area"][found].median().item(), m["fill"][found].median().item()
            info.update(area=area, fill_ratio=fill, shape=_classify_shape(fill), size=_classify_size(area, scale),
                        color=m["dominant_color"], velocity=m["velocity"],
                        blobs=int(_count_blobs(mask[found], _min_area(frames)).median().item()))
            same_color = sum(o.color == obj.color for o in scene.objects)
            duplicated.append(info["blobs"] > same_color)
            areas, rgb = m["area"][found], m["mean_rgb"][found]
            area_cv.append((areas.std(unbiased=False) / areas.mean()).item())
            color_std.append(rgb.var(dim=0, unbiased=False).sum().sqrt().item())
        checks[f"object{i}.present"] = present
        checks[f"object{i}.color"] = present and info["color"] == obj.color
        checks[f"object{i}.shape"] = present and info["shape"] == obj.shape
        checks[f"object{i}.size"] = present and info["size"] == obj.size
        checks[f"object{i}.motion"] = present and _motion_ok(m["velocity"], obj.motion, SPEED_PX_PER_FRAME * scale)
        objects.append(info)
    checks["background"] = background == scene.background

    stability_area = float(np.mean(area_cv)) if area_cv else None
    stability_color = float(np.mean(color_std)) if color_std else None
    return {
        "prompt": scene.prompt,
        "checks": checks,
        "adherence": sum(checks.values()) / len(checks),
        "stability": None if stability_area is None else stability_area + stability_color,
        "stability_area": stability_area,
        "stability_color": stability_color,
        "detected_background": background,
        "duplicated": sum(duplicated) / len(scene.objects),
        "objects": objects,
    }


def _object_colors_in(frames: torch.Tensor, labels: torch.Tensor, dist: torch.Tensor) -> list[str]:
    """Palette colors that cover an object's worth of pixels in at least half of the frames of a clean render."""
    close = labels.masked_fill(dist >= COLOR_THRESHOLD, len(_PALETTE_NAMES))  # [F, H, W]; far pixels: no color
    per_frame = torch.stack([torch.bincount(f.flatten(), minlength=len(_PALETTE_NAMES) + 1) for f in close])
    found = (per_frame[:, : len(COLORS)] >= _min_area(frames)).float().mean(dim=0)  # [len(COLORS)]
    return [c for c, share in zip(COLORS, found.tolist()) if share >= 0.5]


def fidelity_distance(frames, reference_frames, scene: Scene | None = None) -> float:
    """Distance between a generated video and the ground-truth render of the same prompt and seed; 0 = perfect.

    Start positions are not compared (a model sees the prompt, not the renderer's seed): only features that every
    correct video shares with its ground truth. Objects are the reference's object colors (or `scene`'s). For each,
    in both videos, with the color segmentation of the module docstring:
      p = fraction of frames that find it, a = median area, s = median fill ratio, c = mean RGB,
      v = fitted velocity (px/frame).
    Per object, d_obj = mean of five terms in [0, 1]:
      |p_gen - p_ref|;
      min(1, |ln(a_gen / a_ref)| / ln(A_large / A_small))   (a size-class swap costs 1);
      min(1, |s_gen - s_ref| / 0.25)                         (s = median bounding-box fill ratio, the shape cue;
                                                              0.25 ~ the triangle-circle gap);
      min(1, ||c_gen - c_ref|| / 0.5)                       (0.5 = smallest palette distance);
      min(1, ||v_gen - v_ref|| / world speed);
    the last four are 1 when the generated video finds the object in fewer than 2 frames (8 numbers per object:
    p, a, s, c, v).
    Background term d_bg = min(1, ||median RGB_gen - median RGB_ref|| / ||gray - black||) over all pixels.

        fidelity = mean over objects of d_obj + FIDELITY_BACKGROUND_WEIGHT * d_bg

    A perfect render scores 0 (about 0.01 for another seed of the same prompt), a blank video with the right
    background scores 1, and the range is [0, 1.25].
    """
    gen, ref = to_float_frames(frames), to_float_frames(reference_frames)
    if gen.shape != ref.shape:
        raise ValueError(f"frames {tuple(gen.shape)} and reference {tuple(ref.shape)} differ in shape")
    gen_labels, gen_dist = _palette_labels(gen)
    ref_labels, ref_dist = _palette_labels(ref)
    colors = [o.color for o in scene.objects] if scene is not None else _object_colors_in(ref, ref_labels, ref_dist)
    scale = _scale(ref)
    speed = SPEED_PX_PER_FRAME * scale
    size_log_ratio = math.log(expected_area("large", scale) / expected_area("small", scale))

    terms = []
    for color in colors:
        g = _measure(gen, _color_mask(gen, gen_labels, gen_dist, color))
        r = _measure(ref, _color_mask(ref, ref_labels, ref_dist, color))
        presence = abs(g["found_fraction"] - r["found_fraction"])
        if g["velocity"] is None or r["velocity"] is None:
            terms.append((presence + 4.0) / 5.0)
            continue
        g_area, r_area = g["area"][g["found"]].median().item(), r["area"][r["found"]].median().item()
        area = min(1.0, abs(math.log(g_area / r_area)) / size_log_ratio)
        g_fill, r_fill = g["fill"][g["found"]].median().item(), r["fill"][r["found"]].median().item()
        shape = min(1.0, abs(g_fill - r_fill) / 0.25)
        g_rgb, r_rgb = g["mean_rgb"][g["found"]].mean(0), r["mean_rgb"][r["found"]].mean(0)
        color_term = min(1.0, torch.linalg.vector_norm(g_rgb - r_rgb).item() / 0.5)
        velocity = min(1.0, float(np.linalg.norm(np.subtract(g["velocity"], r["velocity"]))) / speed)
        terms.append((presence + area + shape + color_term + velocity) / 5.0)

    bg_gap = torch.linalg.vector_norm(torch.tensor(BACKGROUND_RGB["gray"]) - torch.tensor(BACKGROUND_RGB["black"]))
    bg_diff = torch.linalg.vector_norm(_median_rgb(gen) - _median_rgb(ref))
    d_bg = min(1.0, (bg_diff / bg_gap).item())
    d_obj = float(np.mean(terms)) if terms else 0.0
    return d_obj + FIDELITY_BACKGROUND_WEIGHT * d_bg


def _median_rgb(frames: torch.Tensor) -> torch.Tensor:
    """Per-channel median over all pixels of all frames: [3]."""
    return frames.transpose(0, 1).flatten(1).median(dim=1).values


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB over all frames, pixels and channels, data range 1 (inf if identical)."""
    x, y = to_float_frames(_as_4d(a)).double(), to_float_frames(_as_4d(b)).double()
    mse = torch.mean((x - y) ** 2).item()
    return math.inf if mse == 0.0 else 10.0 * math.log10(1.0 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # [size, size]


def ssim(a, b, *, window_size: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) over frames and RGB channels, data range 1.

    Gaussian 11x11 window with sigma 1.5, K1 = 0.01, K2 = 0.03, statistics over the valid window positions only (no
    padding), computed in float64.
    """
    x, y = to_float_frames(_as_4d(a)).double(), to_float_frames(_as_4d(b)).double()
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    n, c, h, w = x.shape
    x, y = x.reshape(n * c, 1, h, w), y.reshape(n * c, 1, h, w)
    window = _gaussian_window(window_size, sigma)[None, None]
    c1, c2 = 0.01**2, 0.03**2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean().item()


def _as_4d(frames):
    """Lets psnr/ssim take a single image ([3, H, W] / [H, W, 3]) as well as a video."""
    return frames[None] if frames.ndim == 3 else frames


def summarize(reports: list[dict]) -> dict:
    """Means over per-video reports: every numeric top-level field (None skipped) and the accuracy per attribute
    (`attribute_accuracy`: present / color / shape / size / motion over all objects, and background)."""
    summary: dict = {"num_videos": len(reports)}
    keys = sorted({k for r in reports for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for key in keys:
        values = [float(r[key]) for r in reports if isinstance(r.get(key), (int, float)) and r[key] is not None]
        values = [v for v in values if math.isfinite(v)]
        summary[key] = float(np.mean(values)) if values else None
    per_attribute: dict[str, list[bool]] = {}
    for r in reports:
        for name, ok in r.get("checks", {}).items():
            per_attribute.setdefault(name.split(".")[-1], []).append(bool(ok))
    if per_attribute:
        summary["attribute_accuracy"] = {k: float(np.mean(v)) for k, v in per_attribute.items()}
    return summary

