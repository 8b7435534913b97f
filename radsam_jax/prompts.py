"""RadSAM's static-shape prompt pytree: one compiled function serves every prompt combination."""

from typing import Optional

import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Prompts:
    """A batch of prompts in model-input pixels (B leading on every field).

    points: (B, N, 2) float (x, y); point_labels: (B, N) int, 1 positive, 0 negative, -1 padding.
    box: (B, 4) float x0, y0, x1, y1, used where has_box. mask: (B, S/4, S/4), used where has_mask:
    0/1 for RadSAM, low-res logits for SAM-family weights (ModelConfig.mask_prompt).
    """

    points: jnp.ndarray
    point_labels: jnp.ndarray
    box: jnp.ndarray
    has_box: jnp.ndarray
    mask: jnp.ndarray
    has_mask: jnp.ndarray

    @property
    def batch_size(self) -> int:
        return self.point_labels.shape[0]


def make_prompts(
    batch_size: int,
    mask_size: int,
    points: Optional[np.ndarray] = None,
    point_labels: Optional[np.ndarray] = None,
    box: Optional[np.ndarray] = None,
    mask: Optional[np.ndarray] = None,
    num_points: Optional[int] = None,
) -> Prompts:
    """Builds a `Prompts` batch, filling absent parts with padding.

    `num_points` pads the point axis to a fixed length (label -1) so calls with different numbers of
    points share one compiled function. Raises ValueError naming the field whose shape is wrong.
    """
    if points is None:
        if point_labels is not None:
            raise ValueError("point_labels given without points")
        n = num_points or 1
        pts = np.zeros((batch_size, n, 2), np.float32)
        labels = -np.ones((batch_size, n), np.int32)
    else:
        pts = np.asarray(points, np.float32)
        if pts.ndim != 3 or pts.shape[0] != batch_size or pts.shape[2] != 2:
            raise ValueError(f"points must have shape (B={batch_size}, N, 2), got {pts.shape}")
        if point_labels is None:
            raise ValueError("points given without point_labels")
        labels = np.asarray(point_labels, np.float64)  # checked before the cast: 0.7 is an error, not 0
        if labels.shape != pts.shape[:2]:
            raise ValueError(f"point_labels must have shape {pts.shape[:2]}, got {labels.shape}")
        bad = ~np.isin(labels, (-1, 0, 1))
        if bad.any():
            raise ValueError(f"point_labels must be 1, 0 or -1; got {labels[bad][0]:g} at index {tuple(np.argwhere(bad)[0])}")
        labels = labels.astype(np.int32)
        if num_points is not None:
            if pts.shape[1] > num_points:
                raise ValueError(f"{pts.shape[1]} points exceed num_points={num_points}")
            extra = num_points - pts.shape[1]
            pts = np.concatenate([pts, np.zeros((batch_size, extra, 2), np.float32)], axis=1)
            labels = np.concatenate([labels, -np.ones((batch_size, extra), np.int32)], axis=1)
    if box is None:
        bx = np.zeros((batch_size, 4), np.float32)
        has_box = np.zeros((batch_size,), bool)
    else:
        bx = np.asarray(box, np.float32)
        if bx.shape != (batch_size, 4):
            raise ValueError(f"box must have shape (B={batch_size}, 4), got {bx.shape}")
        has_box = np.ones((batch_size,), bool)
    if mask is None:
        m = np.zeros((batch_size, mask_size, mask_size), np.float32)
        has_mask = np.zeros((batch_size,), bool)
    else:
        m = np.asarray(mask, np.float32)
        if m.shape != (batch_size, mask_size, mask_size):
            raise ValueError(f"mask must have shape (B={batch_size}, {mask_size}, {mask_size}), got {m.shape}")
        has_mask = np.ones((batch_size,), bool)
    return Prompts(pts, labels, bx, has_box, m, has_mask)
