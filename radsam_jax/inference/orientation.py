"""The in-plane reorientation between a file's voxel grid and the model frame.

The model was trained on canonical RAS slices `array[:, :, k].T` (rows = A index, columns = R index).
A file may store its in-plane axes in another order or direction (e.g. L, P from DICOM, or rows and
columns swapped). `SliceFrame` holds the flips/transposition of the first two array axes that
nibabel's `io_orientation(affine)` says bring them to R, A, and applies them to arrays, points and
boxes, and back to masks. The third array axis must be the slice axis (closest to S or I); it is
never reordered, so slice indices are the file's own. Exact: no resampling, no interpolation.
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np


@dataclasses.dataclass(frozen=True)
class SliceFrame:
    """file (n0, n1, Z) -> canonical (N0, N1, Z): optional transposition of axes 0, 1, then flips.

    `shape` is the file's in-plane shape (n0, n1); `flip[a]` flips canonical axis a (after transposing).
    """

    shape: tuple[int, int]
    transpose: bool
    flip: tuple[bool, bool]

    @classmethod
    def identity(cls, shape) -> "SliceFrame":
        return cls((int(shape[0]), int(shape[1])), False, (False, False))

    @classmethod
    def from_affine(cls, affine, shape) -> "SliceFrame":
        """Raises ValueError when the third array axis is not the slice (S/I) axis."""
        affine = np.asarray(affine, np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"the image affine must be a finite 4x4 matrix, got {affine!r}")
        ornt = nib.orientations.io_orientation(affine)
        if np.isnan(ornt).any():
            raise ValueError(f"the image affine is degenerate (an axis has zero length): {affine.tolist()}")
        codes = "".join(nib.orientations.ornt2axcodes(ornt))
        if int(ornt[2, 0]) != 2:
            raise ValueError(
                f"the third array axis of this image points {codes[2]} (orientation {codes}); the slice axis must "
                f"be the third axis and run S/I (axial slices). Reorient the image (e.g. to RAS) first"
            )
        transpose = int(ornt[0, 0]) == 1
        flips = [False, False]
        for i in range(2):
            flips[int(ornt[i, 0])] = bool(ornt[i, 1] < 0)
        return cls((int(shape[0]), int(shape[1])), transpose, (flips[0], flips[1]))

    @property
    def canonical_shape(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[0]) if self.transpose else self.shape

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """(n0, n1, ...) file array -> (N0, N1, ...) canonical (a view where possible)."""
        if self.transpose:
            array = np.swapaxes(array, 0, 1)
        for a in range(2):
            if self.flip[a]:
                array = np.flip(array, axis=a)
        return array

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """(N0, N1, ...) canonical array -> (n0, n1, ...) on the file's grid."""
        for a in range(2):
            if self.flip[a]:
                array = np.flip(array, axis=a)
        if self.transpose:
            array = np.swapaxes(array, 0, 1)
        return array

    def points_to_canonical(self, points) -> np.ndarray:
        """(..., 2) file voxel (x = first axis, y = second) -> canonical voxel (x, y)."""
        p = np.array(points, np.float64, copy=True)
        if self.transpose:
            p = p[..., ::-1].copy()
        size = self.canonical_shape
        for a in range(2):
            if self.flip[a]:
                p[..., a] = size[a] - 1 - p[..., a]
        return p

    def box_to_canonical(self, box) -> np.ndarray:
        """(..., 4) x0, y0, x1, y1 file voxels -> canonical box, re-sorted so x0 <= x1, y0 <= y1."""
        b = np.asarray(box, np.float64)
        c = self.points_to_canonical(b.reshape(*b.shape[:-1], 2, 2))
        lo, hi = np.minimum(c[..., 0, :], c[..., 1, :]), np.maximum(c[..., 0, :], c[..., 1, :])
        return np.concatenate([lo, hi], axis=-1)

    def points_from_canonical(self, points) -> np.ndarray:
        """(..., 2) canonical voxel (x, y) -> file voxel (x, y)."""
        p = np.array(points, np.float64, copy=True)
        size = self.canonical_shape
        for a in range(2):
            if self.flip[a]:
                p[..., a] = size[a] - 1 - p[..., a]
        if self.transpose:
            p = p[..., ::-1].copy()
        return p
