"""Training augmentations of one 2D slice (Hounsfield units) and its label mask, in numpy.

One random affine (rotation, shear, zoom, translation about the image centre) warps both: bilinear
for the image (outside filled with `fill_hu`, air by default), nearest neighbour for the label.
Then additive Gaussian noise on the image. The paper's "HU clipping" is the window itself: the
pipeline draws a jittered window (level, width) with `jitter_window` and clips to it.
Every draw comes from the given np.random.Generator.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Largest magnitudes; each sample draws uniformly in [-max, max] (zoom: [1 - z, 1 + z]).

    probability: chance that the affine is applied at all (and, separately, the noise).
    translation: fraction of the slice's size (width for x, height for y).
    noise_std_hu: the noise standard deviation is drawn in [0, noise_std_hu] HU.
    """

    probability: float = 0.8
    rotation_deg: float = 15.0
    shear_deg: float = 5.0
    zoom: float = 0.15
    translation: float = 0.1
    noise_std_hu: float = 20.0
    fill_hu: float = -1024.0


def random_affine(rng: np.random.Generator, config: AugmentConfig, shape) -> tuple[np.ndarray, dict]:
    """A 3x3 matrix mapping output pixel (x, y, 1) -> input pixel, and the drawn magnitudes."""
    h, w = shape
    angle = float(rng.uniform(-config.rotation_deg, config.rotation_deg))
    shear = float(rng.uniform(-config.shear_deg, config.shear_deg))
    zoom = float(rng.uniform(1.0 - config.zoom, 1.0 + config.zoom))
    tx = float(rng.uniform(-config.translation, config.translation)) * w
    ty = float(rng.uniform(-config.translation, config.translation)) * h
    a, s = math.radians(angle), math.radians(shear)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    shear_m = np.array([[1.0, math.tan(s)], [0.0, 1.0]])
    forward = rot @ shear_m * zoom  # input -> output about the centre
    inverse = np.linalg.inv(forward)
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    m = np.eye(3)
    m[:2, :2] = inverse
    m[:2, 2] = c - inverse @ (c + np.array([tx, ty]))
    return m, dict(rotation_deg=angle, shear_deg=shear, zoom=zoom, translation_x=tx, translation_y=ty)


def warp(image: np.ndarray, matrix: np.ndarray, *, order: int, fill: float = 0.0) -> np.ndarray:
    """Warps a 2D array: out[y, x] = image at matrix @ (x, y, 1); order 0 nearest, 1 bilinear."""
    h, w = image.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    sx = matrix[0, 0] * xx + matrix[0, 1] * yy + matrix[0, 2]
    sy = matrix[1, 0] * xx + matrix[1, 1] * yy + matrix[1, 2]
    if order == 0:
        ix = np.floor(sx + 0.5).astype(np.int64)
        iy = np.floor(sy + 0.5).astype(np.int64)
        valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        out = np.full((h, w), fill, image.dtype)
        out[valid] = image[iy[valid], ix[valid]]
        return out
    x0 = np.floor(sx).astype(np.int64)
    y0 = np.floor(sy).astype(np.int64)
    fx = (sx - x0).astype(np.float32)
    fy = (sy - y0).astype(np.float32)
    src = image.astype(np.float32)
    out = np.zeros((h, w), np.float32)
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            values = np.where(inside, src[np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)], np.float32(fill))
            out += wx * wy * values
    return out


def augment_slice(
    hu: np.ndarray, label: np.ndarray, rng: np.random.Generator, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(H, W) HU image and (H, W) label -> augmented (image float32, label same dtype, drawn)."""
    hu = np.asarray(hu, np.float32)
    label = np.asarray(label)
    if hu.shape != label.shape:
        raise ValueError(f"image {hu.shape} and label {label.shape} differ in shape")
    drawn: dict = {}
    if rng.uniform() < config.probability:
        matrix, drawn = random_affine(rng, config, hu.shape)
        hu = warp(hu, matrix, order=1, fill=config.fill_hu)
        label = warp(label, matrix, order=0, fill=0)
    if config.noise_std_hu > 0 and rng.uniform() < config.probability:
        std = float(rng.uniform(0.0, config.noise_std_hu))
        hu = hu + rng.normal(0.0, std, size=hu.shape).astype(np.float32)
        drawn["noise_std_hu"] = std
    return hu.astype(np.float32), label, drawn


def jitter_window(level: float, width: float, level_jitter: float, width_jitter: float, rng: np.random.Generator):
    """(level + U(-level_jitter, level_jitter) HU, width * U(1 - width_jitter, 1 + width_jitter))."""
    new_level = level + float(rng.uniform(-level_jitter, level_jitter))
    new_width = max(1.0, width * float(rng.uniform(1.0 - width_jitter, 1.0 + width_jitter)))
    return new_level, new_width
