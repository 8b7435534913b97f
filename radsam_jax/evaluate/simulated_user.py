"""The simulated user of the benchmark: prompts and correction points drawn from the ground truth.

Conventions: a ground-truth object is a binary (X, Y, Z) array on the volume's grid, Z the slice
axis; 2D prompts are in the predictor's voxel coordinates, x = first array axis, y = second. A 2D
slice is handled as `gt[:, :, k].T` (rows = y, columns = x), the layout `prompt_simulation` expects.

Project choices (the paper is silent on them; they are repeated in every summary.md):
- Initial slice (volume-level): the slice where the object's area is largest; ties go to the slice
  closest to the middle of the object's extent, then to the lower index. Deterministic, so box and
  point settings prompt the same slice.
- Point prompt: one positive point drawn uniformly among that slice's object pixels (seeded).
- Box prompt: the slice's tight bounding box (inclusive pixel indices), no jitter; with
  `box_jitter=(lo, hi)` every side moves outwards by U(lo, hi) pixels at a 1024 input, training's unit
  (data.prompts.box_jitter): lo * L / 1024 voxels for a slice whose longest side is L voxels.
- Bounds: the object's bottom and top slices (first and last slice holding a voxel).
- Volume-level edits: one point at a time, drawn uniformly among all 3D error voxels of the current
  prediction (false negative -> positive point, false positive -> negative point), then
  `predictor.edit(slice, ...)`, which re-propagates from that slice re-using earlier corrections.
  Edits are cumulative; a perfect prediction gets no further edit (its Dice is carried forward).
- Slice-level: one prompt (same rules as above) on every slice where the object is present; edits
  are rounds: in round r every prompted slice that still has errors gets one correction point drawn
  uniformly among its 2D error pixels, and the round is one `predictor.edit_slices({slice: click})`
  call (each slice decoded once with its prompt, all its corrections and its current mask; no
  propagation). `edits = r` means r points per slice (paper: up to 10). The oracle Dice uses the 3
  secondary masks of `segment_slices(prompts, all_masks=True)`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from radsam_jax.data.prompt_simulation import bounding_box, correction_points, jittered_box, positive_point

PROMPT_KINDS = ("box", "point")


def object_bounds(gt: np.ndarray) -> tuple[int, int]:
    """(lo, hi): first and last slice (third axis) where the object has a voxel."""
    present = np.flatnonzero(np.asarray(gt).reshape(-1, gt.shape[-1]).any(axis=0))
    if present.size == 0:
        raise ValueError("the object is empty: no slice holds a voxel")
    return int(present[0]), int(present[-1])


def initial_slice(gt: np.ndarray) -> int:
    """The slice with the largest object area (ties: nearest the middle of the extent, then lowest)."""
    areas = np.count_nonzero(np.asarray(gt).reshape(-1, gt.shape[-1]), axis=0)
    if not areas.any():
        raise ValueError("the object is empty: no slice holds a voxel")
    lo, hi = object_bounds(gt)
    middle = (lo + hi) / 2.0
    candidates = np.flatnonzero(areas == areas.max())
    return int(min(candidates, key=lambda k: (abs(k - middle), k)))


def slice_2d(array3d: np.ndarray, k: int) -> np.ndarray:
    """Slice k as (rows = y, columns = x): `array3d[:, :, k].T`."""
    return np.asarray(array3d)[:, :, k].T


def slice_prompt(gt_slice: np.ndarray, kind: str, rng: np.random.Generator,
                 box_jitter: Optional[tuple[float, float]] = None) -> dict:
    """{"points", "point_labels"} or {"box"} for one non-empty (rows = y, columns = x) GT slice."""
    if kind == "point":
        return {"points": positive_point(gt_slice, rng)[None].astype(np.float64), "point_labels": np.array([1])}
    if kind == "box":
        if box_jitter is None:
            box = bounding_box(gt_slice)
        else:  # pixels at a 1024 input -> this slice's voxels (the model sees its longest side at full size)
            scale = max(gt_slice.shape) / 1024
            box = jittered_box(gt_slice, rng, (box_jitter[0] * scale, box_jitter[1] * scale))[0]
        return {"box": box.astype(np.float64)}
    raise ValueError(f"prompt must be one of {PROMPT_KINDS}, got {kind!r}")


@dataclasses.dataclass(frozen=True)
class Correction:
    """One simulated click: slice, (x, y) voxel, label 1 = add (missed voxel), 0 = remove."""

    slice: int
    point: tuple[float, float]
    label: int


def correction_3d(prediction: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> Optional[Correction]:
    """A click drawn uniformly among the 3D error voxels (prediction != gt); None when there are none."""
    p = np.asarray(prediction).astype(bool, copy=False)
    g = np.asarray(gt).astype(bool, copy=False)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and target {g.shape} differ in shape")
    errors = np.flatnonzero(p != g)
    if errors.size == 0:
        return None
    x, y, z = np.unravel_index(errors[rng.integers(errors.size)], g.shape)
    return Correction(int(z), (float(x), float(y)), int(g[x, y, z]))


def correction_2d(prediction_slice: np.ndarray, gt_slice: np.ndarray, rng: np.random.Generator,
                  k: int) -> Optional[Correction]:
    """A click on slice k drawn uniformly among its 2D error pixels ((rows = y, columns = x) inputs)."""
    points, labels = correction_points(prediction_slice, gt_slice, rng, 1)
    if len(points) == 0:
        return None
    return Correction(int(k), (float(points[0, 0]), float(points[0, 1])), int(labels[0]))
