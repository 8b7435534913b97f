"""Pre- and post-processing between CT/MR slices and the model's square input, in jnp so it runs on device.

Conventions: a 2D image is (H, W) = (rows, columns); a point is (x, y) = (column, row). For a volume
array (X, Y, Z) the axial slice k is shown as `array[:, :, k].T`, so x indexes the first array axis
and y the second, as `radsam segment` documents.

Slices arrive in the units of ModelConfig.intensity: CT Hounsfield units, or MR volumes rescaled by
their own percentiles (radsam_jax/intensity.py); the window (ModelConfig.ct_window) is in those units.

Two input conventions:
- "sam": resize the longest side to S (new side = int(old * S / longest + 0.5)), normalise with the
  ImageNet mean/std on the 0..255 scale, zero-pad bottom/right to S x S.
- "medsam": resize straight to S x S and min-max scale each image to [0, 1]; masks come back through
  a sigmoid at 0.5 instead of logits at 0.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from radsam_jax.model.config import DEFAULT_CT_WINDOW, PREPROCESSING_MODES, ModelConfig

def window_ct(hu, level: float = DEFAULT_CT_WINDOW[0], width: float = DEFAULT_CT_WINDOW[1]):
    """Hounsfield units -> 0..255 float through a window (level, width), clipped."""
    lo = level - width / 2.0
    return jnp.clip((jnp.asarray(hu, jnp.float32) - lo) / width, 0.0, 1.0) * 255.0


def to_rgb(gray):
    """(..., H, W) -> (..., H, W, 3): SAM expects three channels; CT repeats the grey one."""
    return jnp.repeat(jnp.asarray(gray)[..., None], 3, axis=-1)


def resized_shape(height: int, width: int, target: int) -> tuple[int, int]:
    """ResizeLongestSide's output size: new side = int(old * target / longest + 0.5)."""
    scale = target / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


class Geometry(NamedTuple):
    """How an (H, W) image maps into the model input: the resized (h, w) before padding."""

    original: tuple[int, int]
    resized: tuple[int, int]
    image_size: int

    @property
    def scale_xy(self) -> np.ndarray:
        return np.array([self.resized[1] / self.original[1], self.resized[0] / self.original[0]], np.float32)


def geometry(config: ModelConfig, height: int, width: int) -> Geometry:
    for name, n in (("height", height), ("width", width)):
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"geometry: {name} must be a positive integer (pixels), got {n!r}")
    s = config.image_size
    resized = (s, s) if config.preprocessing == "medsam" else resized_shape(height, width, s)
    return Geometry((height, width), resized, s)


def preprocess_images(images_0_255, config: ModelConfig):
    """(B, H, W, 3) on the 0..255 scale -> (B, S, S, 3) model input, per config.preprocessing.

    Resizing is bilinear with antialiasing (SAM resizes with PIL, which antialiases when shrinking).
    """
    images = jnp.asarray(images_0_255, jnp.float32)
    b, h, w, _ = images.shape
    geo = geometry(config, h, w)
    x = jax.image.resize(images, (b, *geo.resized, 3), "linear", antialias=True)
    if config.preprocessing == "medsam":
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        hi = x.max(axis=(1, 2, 3), keepdims=True)
        return (x - lo) / jnp.maximum(hi - lo, 1e-8)
    x = (x - jnp.asarray(config.pixel_mean)) / jnp.asarray(config.pixel_std)
    s = config.image_size
    return jnp.pad(x, ((0, 0), (0, s - geo.resized[0]), (0, s - geo.resized[1]), (0, 0)))


def preprocess_ct_slices(hu_slices, config: ModelConfig, window=None):
    """(B, H, W) slices -> (B, S, S, 3) model input (window, grey to RGB, resize, normalise); window
    (level, width), default the one the model was trained with (config.ct_window). The slices are in
    the units of config.intensity: Hounsfield units for "hu"; for "percentile" (MRI) slices of
    `radsam_jax.intensity.volume_intensities(volume, "percentile")`, taken over the whole volume."""
    if np.ndim(hu_slices) != 3:
        raise ValueError(f"hu_slices must have shape (N, H, W) (a batch of slices; one slice: x[None]), "
                         f"got shape {np.shape(hu_slices)}")
    return preprocess_images(to_rgb(window_ct(hu_slices, *(config.ct_window if window is None else window))), config)


def points_to_input(points, geo: Geometry) -> np.ndarray:
    """(..., 2) (x, y) original pixels -> model-input pixels (host arrays: prompts are small)."""
    if np.ndim(points) < 1 or np.shape(points)[-1] != 2:
        raise ValueError(f"points must have shape (..., 2) (x, y), got shape {np.shape(points)}")
    return np.asarray(points, np.float32) * geo.scale_xy


def box_to_input(box, geo: Geometry) -> np.ndarray:
    """(..., 4) x0, y0, x1, y1 original pixels -> model-input pixels."""
    if np.ndim(box) < 1 or np.shape(box)[-1] != 4:
        raise ValueError(f"box must have shape (..., 4) (x0, y0, x1, y1), got shape {np.shape(box)}")
    return points_to_input(np.reshape(box, (*np.shape(box)[:-1], 2, 2)), geo).reshape(np.shape(box))


@functools.lru_cache(maxsize=32)
def _upscale_matrices(geo: Geometry, low_res: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """SAM's postprocessing along each axis as one (original, low-res) matrix: the row (column) map of
    bilinear to S, crop to the resized extent, bilinear to the original size, found by running those
    three steps on an identity matrix."""
    def axis(n_low: int, n_resized: int, n_original: int) -> np.ndarray:
        # A compiled executable runs at once, even while a jit is being traced: a constant either way.
        return np.asarray(_upscale_matrix.lower(n_low, geo.image_size, n_resized, n_original).compile()())

    return axis(low_res[0], geo.resized[0], geo.original[0]), axis(low_res[1], geo.resized[1], geo.original[1])


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _upscale_matrix(n_low: int, image_size: int, n_resized: int, n_original: int) -> jax.Array:
    """One axis of `_upscale_matrices`, as one program: run op by op, its ~20 operations were each
    compiled for every new image size (1-2 s per volume of a new size on the CPU)."""
    up = jax.image.resize(jnp.eye(n_low, dtype=jnp.float32), (image_size, n_low), "linear", antialias=False)
    return jax.image.resize(up[:n_resized], (n_original, n_low), "linear", antialias=False)


def upscale_logits(logits, geo: Geometry):
    """(..., S/4, S/4) low-resolution logits -> (..., H, W) logits on the original image.

    SAM's postprocess_masks: bilinear to S x S, crop the padding, bilinear to the original size. Each
    step is linear along each axis, so the three collapse into one matrix per axis: for ViT-B and a
    512 x 512 slice 0.2 GFLOP instead of 2.3 through the S x S intermediate.
    """
    logits = jnp.asarray(logits, jnp.float32)
    rows, cols = _upscale_matrices(geo, tuple(logits.shape[-2:]))
    exact = jax.lax.Precision.HIGHEST  # float32 products on GPUs too (not TF32): masks threshold these logits
    x = jnp.einsum("...yx,wx->...yw", logits, cols, precision=exact)
    return jnp.einsum("hy,...yw->...hw", rows, x, precision=exact)


def logits_to_mask(logits, geo: Geometry, preprocessing: str = "sam"):
    """Low-resolution logits -> binary mask on the original image (sigmoid > 0.5 for MedSAM)."""
    if preprocessing not in PREPROCESSING_MODES:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING_MODES}, got {preprocessing!r}")
    if np.ndim(logits) < 2:
        raise ValueError(f"logits must have shape (..., h, w), got shape {np.shape(logits)}")
    if preprocessing == "medsam":
        # MedSAM upsamples probabilities straight to the original size, then thresholds at 0.5.
        probs = jax.nn.sigmoid(jnp.asarray(logits, jnp.float32))
        lead = probs.shape[:-2]
        probs = jax.image.resize(probs, (*lead, *geo.original), "linear", antialias=False)
        return probs > 0.5
    return upscale_logits(logits, geo) > 0.0
