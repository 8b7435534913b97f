"""Simulated user prompts from a ground-truth 2D mask (RadSAM section 3.2), in numpy.

Every function takes a `np.random.Generator`, so a seed fixes every draw. Masks are (H, W) with
rows = y and columns = x; points are (x, y) = (column, row) pixel indices and boxes are
x0, y0, x1, y1 with x1/y1 the last covered column/row (inclusive), in the frame of the mask given.

- `positive_point`: uniform over the mask's pixels.
- `jittered_box`: the bounding box, each side moved outwards by a uniform draw in `jitter_range`
  pixels (negative values shrink it), clipped to the image and kept non-empty.
- `perturb_mask`: a noisy BINARY copy (rotation, isotropic scaling, translation, erosion, dilation),
  each magnitude drawn per sample; the drawn values come back for tests and logging. The paper
  lists the magnitudes (5 deg, 10 %, 15 %, 5 and 5 steps) without saying how they apply; this
  project's reading: translation is a fraction of the object's bounding box, rotation and scaling
  are about the object's centroid, and every sample gets an erosion then a dilation, each of 0..5
  steps drawn uniformly (steps at a 256-pixel mask, see `steps_scale`).
- `correction_points`: uniform among error pixels (false negative -> label 1, false positive -> 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class MaskPerturbation:
    """Largest magnitudes of the mask-prompt noise; each sample draws uniformly below them.

    rotation_deg: rotation about the object's centroid, in [-rotation_deg, rotation_deg].
    scale: isotropic scaling about the centroid by a factor in [1 - scale, 1 + scale].
    translation: shift along x in [-t, t] * (object's bounding-box width) and along y in
      [-t, t] * (bounding-box height): "15%" is relative to the object's extent on that axis.
    erosion_steps / dilation_steps: integer steps drawn in 0..max, each a 3x3 `structure` erosion /
      dilation (one pixel per step); erosion first, then dilation; erosion stops before it would
      erase the object.
    steps_scale: multiplies the drawn steps (rounded) before applying them, so magnitudes given at
      SAM's 256-pixel mask prompt can be used on a smaller mask (mask_size / 256).
    """

    rotation_deg: float = 5.0
    scale: float = 0.10
    translation: float = 0.15
    erosion_steps: int = 5
    dilation_steps: int = 5
    structure: str = "cross"  # "cross" (4-neighbour) or "square" (8-neighbour)
    steps_scale: float = 1.0


# ----------------------------------------------------------------------------------- morphology


def _shifts(structure: str):
    if structure == "cross":
        return [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if structure == "square":
        return [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    raise ValueError(f"structure must be 'cross' or 'square', got {structure!r}")


def _shift(mask: np.ndarray, dy: int, dx: int, fill: bool) -> np.ndarray:
    """mask shifted by (dy, dx): out[y, x] = mask[y - dy, x - dx], `fill` where that is outside."""
    out = np.full_like(mask, fill)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def dilate(mask: np.ndarray, steps: int = 1, structure: str = "cross") -> np.ndarray:
    """Binary dilation by `steps` iterations of a 3x3 cross/square (pixels outside count as 0)."""
    m = np.asarray(mask, bool)
    for _ in range(int(steps)):
        out = m.copy()
        for dy, dx in _shifts(structure):
            out |= _shift(m, dy, dx, False)
        m = out
    return m


def erode(mask: np.ndarray, steps: int = 1, structure: str = "cross") -> np.ndarray:
    """Binary erosion by `steps` iterations of a 3x3 cross/square. Pixels outside the image count as
    object, so an object cut by the image border does not shrink from that side."""
    m = np.asarray(mask, bool)
    for _ in range(int(steps)):
        out = m.copy()
        for dy, dx in _shifts(structure):
            out &= _shift(m, dy, dx, True)
        m = out
    return m


# ------------------------------------------------------------------------------ basic prompts


def bounding_box(mask: np.ndarray) -> np.ndarray:
    """x0, y0, x1, y1 (inclusive pixel indices) of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("bounding_box of an empty mask")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def positive_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(x, y) of a pixel drawn uniformly among the mask's pixels."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("positive_point of an empty mask")
    i = rng.integers(ys.size)
    return np.array([xs[i], ys[i]], np.float32)


def jittered_box(
    mask: np.ndarray,
    rng: np.random.Generator,
    jitter_range: tuple[float, float] = (-5.0, 20.0),
) -> tuple[np.ndarray, np.ndarray]:
    """(box, drawn jitter (4,)): each side of the bounding box moves outwards by U(lo, hi) pixels.

    Jitter is in the mask's own pixels (scale a 1024-input range by S / 1024 before calling). The box
    is clipped to the image and a side never crosses the opposite one.
    """
    lo, hi = float(jitter_range[0]), float(jitter_range[1])
    if lo > hi:
        raise ValueError(f"jitter_range must be (lo, hi) with lo <= hi, got {jitter_range}")
    box = bounding_box(mask)
    jitter = rng.uniform(lo, hi, size=4).astype(np.float32)
    h, w = mask.shape
    x0 = np.clip(box[0] - jitter[0], 0, w - 1)
    y0 = np.clip(box[1] - jitter[1], 0, h - 1)
    x1 = np.clip(box[2] + jitter[2], 0, w - 1)
    y1 = np.clip(box[3] + jitter[3], 0, h - 1)
    # A negative jitter larger than the object would flip the box: collapse it onto the centre.
    if x0 > x1:
        x0 = x1 = (box[0] + box[2]) / 2
    if y0 > y1:
        y0 = y1 = (box[1] + box[3]) / 2
    return np.array([x0, y0, x1, y1], np.float32), jitter


def correction_points(
    prediction: np.ndarray,
    target: np.ndarray,
    rng: np.random.Generator,
    num_points: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to `num_points` points drawn uniformly (without replacement) among error pixels.

    Returns (points (n, 2) (x, y), labels (n,)) with n = min(num_points, number of errors): label 1
    for a false negative (object missed: add it), 0 for a false positive (remove it).
    """
    prediction = np.asarray(prediction, bool)
    target = np.asarray(target, bool)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
    ys, xs = np.nonzero(prediction != target)
    n = min(int(num_points), ys.size)
    if n == 0:
        return np.zeros((0, 2), np.float32), np.zeros((0,), np.int32)
    pick = rng.choice(ys.size, size=n, replace=False)
    points = np.stack([xs[pick], ys[pick]], axis=1).astype(np.float32)
    labels = target[ys[pick], xs[pick]].astype(np.int32)
    return points, labels


# ------------------------------------------------------------------------------ mask perturbation


def affine_warp_mask(mask: np.ndarray, angle_deg: float, scale: float, shift_xy, center_xy) -> np.ndarray:
    """Nearest-neighbour warp: rotate by angle and scale about center, then shift (pixels)."""
    h, w = mask.shape
    theta = math.radians(angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    cx, cy = float(center_xy[0]), float(center_xy[1])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Inverse map: source = R^-1 (dest - center - shift) / scale + center.
    dx = xx - cx - float(shift_xy[0])
    dy = yy - cy - float(shift_xy[1])
    sx = (cos * dx + sin * dy) / scale + cx
    sy = (-sin * dx + cos * dy) / scale + cy
    ix = np.floor(sx + 0.5).astype(np.int64)
    iy = np.floor(sy + 0.5).astype(np.int64)
    valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    out = np.zeros((h, w), bool)
    out[valid] = np.asarray(mask, bool)[iy[valid], ix[valid]]
    return out


def perturb_mask(
    mask: np.ndarray,
    rng: np.random.Generator,
    config: Optional[MaskPerturbation] = None,
) -> tuple[np.ndarray, dict]:
    """A noisy binary copy of a non-empty `mask` and the magnitudes drawn for it.

    Order: rotation + scaling + translation in one nearest-neighbour warp about the centroid, then
    erosion, then dilation. Returned magnitudes: rotation_deg, scale (factor), translation_x/_y (as
    fractions of the bounding-box width/height), shift_x/_y (pixels), erosion_steps, dilation_steps
    (drawn), erosion_applied (after the keep-non-empty guard and steps_scale), dilation_applied.
    An empty mask comes back unchanged.
    """
    config = config or MaskPerturbation()
    mask = np.asarray(mask, bool)
    angle = float(rng.uniform(-config.rotation_deg, config.rotation_deg))
    scale = float(rng.uniform(1.0 - config.scale, 1.0 + config.scale))
    tx, ty = (float(v) for v in rng.uniform(-config.translation, config.translation, size=2))
    erosion = int(rng.integers(0, config.erosion_steps + 1))
    dilation = int(rng.integers(0, config.dilation_steps + 1))
    drawn = dict(rotation_deg=angle, scale=scale, translation_x=tx, translation_y=ty,
                 erosion_steps=erosion, dilation_steps=dilation)
    if not mask.any():
        drawn.update(shift_x=0.0, shift_y=0.0, erosion_applied=0, dilation_applied=0)
        return mask.copy(), drawn
    ys, xs = np.nonzero(mask)
    width = float(xs.max() - xs.min() + 1)
    height = float(ys.max() - ys.min() + 1)
    shift = (tx * width, ty * height)
    out = affine_warp_mask(mask, angle, scale, shift, (xs.mean(), ys.mean()))
    if not out.any():  # a tiny object can fall between sampling points: keep the unwarped one
        out = mask.copy()
    applied_erosion = 0
    for _ in range(int(round(erosion * config.steps_scale))):
        eroded = erode(out, 1, config.structure)
        if not eroded.any():
            break
        out = eroded
        applied_erosion += 1
    applied_dilation = int(round(dilation * config.steps_scale))
    out = dilate(out, applied_dilation, config.structure)
    drawn.update(shift_x=shift[0], shift_y=shift[1], erosion_applied=applied_erosion, dilation_applied=applied_dilation)
    return out, drawn


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
