"""The reorientation between a file's voxel grid and the model frame.

The model was trained on canonical RAS slices `array[:, :, k].T` (rows = A index, columns = R index).
A file may store its axes in another order or direction (e.g. L, P from DICOM, rows and columns
swapped, or a sagittal or coronal acquisition whose S/I axis is not the third). `SliceFrame` holds
what nibabel's `io_orientation(affine)` says brings them to R, A, S: which array axis is the slice
(S/I) axis, and the transposition and flips of the other two, and applies them to arrays, points and
boxes, and back to masks. Slices are never flipped, so slice indices are the file's own along its
S/I axis; x and y index the other two array axes in array order (for the usual axial file: x the
first, y the second, slices the third; for a sagittal file stored (A, S, R): x along A, y along R,
slices along S). Exact: no resampling, no interpolation.
"""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np


@dataclasses.dataclass(frozen=True)
class SliceFrame:
    """file array -> canonical (N0, N1, Z): the slice axis moved last (`axial`), then an optional
    transposition of the other two and flips.

    `shape` is the file's in-plane shape (n0, n1) (its array shape without the slice axis);
    `flip[a]` flips canonical axis a (after transposing); `slice_axis` is the file's S/I array axis.
    """

    shape: tuple[int, int]
    transpose: bool
    flip: tuple[bool, bool]
    slice_axis: int = 2

    @classmethod
    def identity(cls, shape) -> "SliceFrame":
        return cls((int(shape[0]), int(shape[1])), False, (False, False))

    @classmethod
    def from_affine(cls, affine, shape) -> "SliceFrame":
        """The frame of a file with this affine and array shape; ValueError for a non-finite or degenerate affine."""
        affine = np.asarray(affine, np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"the image affine must be a finite 4x4 matrix, got {affine!r}")
        ornt = nib.orientations.io_orientation(affine)
        if np.isnan(ornt).any():
            raise ValueError(f"the image affine is degenerate (an axis has zero length): {affine.tolist()}")
        slice_axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
        in_plane = [a for a in range(3) if a != slice_axis]
        transpose = int(ornt[in_plane[0], 0]) == 1
        flips = [False, False]
        for a in in_plane:
            flips[int(ornt[a, 0])] = bool(ornt[a, 1] < 0)
        return cls((int(shape[in_plane[0]]), int(shape[in_plane[1]])), transpose, (flips[0], flips[1]), slice_axis)

    def axial(self, array: np.ndarray) -> np.ndarray:
        """(X, Y, Z)-shaped file array -> the same voxels with the slice axis last (a view): the grid
        that slice indices and x, y address."""
        return np.moveaxis(array, self.slice_axis, 2)

    @property
    def canonical_shape(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[0]) if self.transpose else self.shape

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """3D file array -> (N0, N1, Z) canonical (a view where possible)."""
        array = self.axial(array)
        if self.transpose:
            array = np.swapaxes(array, 0, 1)
        for a in range(2):
            if self.flip[a]:
                array = np.flip(array, axis=a)
        return array

    def from_canonical(self, array: np.ndarray) -> np.ndarray:
        """(N0, N1, Z) canonical array -> on the file's grid."""
        for a in range(2):
            if self.flip[a]:
                array = np.flip(array, axis=a)
        if self.transpose:
            array = np.swapaxes(array, 0, 1)
        return np.moveaxis(array, 2, self.slice_axis)

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


def axial_grid(shape, affine) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, affine) of a file's voxels with its slice (S/I) axis last: the grid that slice indices
    and x, y address (the file's own for the usual axial file)."""
    axis = SliceFrame.from_affine(affine, shape).slice_axis
    order = [a for a in range(3) if a != axis] + [axis]
    return tuple(int(shape[a]) for a in order), np.asarray(affine, np.float64)[:, order + [3]]
