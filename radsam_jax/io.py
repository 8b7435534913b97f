"""Reading CT/MRI volumes and label maps (NIfTI files, DICOM series) and writing label maps.

Conventions, shared with `radsam_jax.preprocess`:
- A `Volume` holds a float32 array (X, Y, Z) in the file's own voxel order and a 4x4 affine from
  voxel indices (i, j, k) to RAS+ world millimetres (NIfTI's convention; DICOM's LPS is converted).
- Axial slice k is shown as `array[:, :, k].T`, so a point (x, y) is (first-axis, second-axis) index.
- A DICOM series becomes X = columns, Y = rows, Z = slices ordered along the slice normal, which is
  how dcm2niix-free readers (and ITK before reorientation) lay it out; its affine says where it is.
- Label maps are aligned to an image through world coordinates, never by transposing arrays: the
  two may be stored in different voxel orders (e.g. a NIfTI label map in L,A,S beside a DICOM series).
- Training reads volumes through `to_canonical` (RAS voxel order) so every slice has the same
  in-plane orientation; inference keeps the file's own order and writes results on the input grid.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import nibabel as nib
import numpy as np

from radsam_jax.intensity import check_finite

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Two grids are "identical" when shapes match and affines agree to this many millimetres.
AFFINE_ATOL_MM = 1e-3


@dataclasses.dataclass
class Volume:
    """An image volume: `array` float32 (X, Y, Z), `affine` (4, 4) voxel index -> RAS mm, `path`."""

    array: np.ndarray
    affine: np.ndarray
    path: str = ""

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes (norms of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def axcodes(self) -> tuple[str, str, str]:
        """Orientation codes of the array axes, e.g. ('R', 'A', 'S')."""
        return tuple(nib.aff2axcodes(self.affine))


def is_nifti_path(path) -> bool:
    name = str(path).lower()
    return name.endswith(NIFTI_SUFFIXES)


def nifti_stem(name: str) -> str:
    """A NIfTI file name without its .nii / .nii.gz suffix, any case ("CT.NII.GZ" -> "CT"); other
    names unchanged. The case id of every layout and of `radsam segment-batch`."""
    lower = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _squeeze_to_3d(shape: Sequence[int], path, what: str) -> tuple[int, ...]:
    """Shape checks shared by images and labels: 3D, or 4D+ whose extra axes all have size 1."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 3:
        raise ValueError(f"{what} {path} is {len(shape)}D with shape {shape}; a 3D volume (X, Y, Z) is required")
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise ValueError(
            f"{what} {path} is {len(shape)}D with shape {shape}; a single 3D volume is required "
            f"(split the time/channel axis first)"
        )
    return shape[:3]


def _read_nifti(path: Path, what: str, read, raw: Optional[bytes] = None) -> tuple[np.ndarray, np.ndarray]:
    """(`read(img)` as a 3D array, affine) of a NIfTI file; `what` ("image", "label map") names it;
    `raw`: the file's bytes, read already (parsed from memory, not from the disk again).

    nib.load reads only the header, so a truncated or corrupt file fails in `read` (EOFError,
    OSError, zlib errors naming no file): both steps turn any error into a ValueError naming it.
    """
    try:
        img = nib.load(str(path)) if raw is None else _nifti_from_bytes(raw, path)
    except Exception as e:  # nibabel raises several types for corrupt files
        raise ValueError(f"cannot read NIfTI file {path} ({what}): {e}") from e
    shape = _squeeze_to_3d(img.shape, path, what)
    try:
        data = read(img)
    except Exception as e:
        raise ValueError(f"cannot read NIfTI file {path} ({what}): {e}") from e
    return np.asarray(data).reshape(shape), np.asarray(img.affine, np.float64)


def _nifti_from_bytes(raw: bytes, path: Path):
    """The NIfTI-1 or NIfTI-2 image nib.load(path) gives, from the file's bytes (with its errors)."""
    import gzip
    import io as stdlib_io

    from nibabel.filebasedimages import ImageFileError

    gz = str(path).lower().endswith(".gz")
    if not raw:
        raise ImageFileError(f"Empty file: '{path}'")
    if gz and raw[:2] != b"\x1f\x8b":
        raise ImageFileError(f"File {path} is not a gzip file")
    stream = stdlib_io.BytesIO(raw)
    stream.name = str(path)  # nibabel's errors name the file they read
    if gz:
        stream = gzip.GzipFile(str(path), "rb", fileobj=stream)
    try:
        head = stream.read(nib.Nifti2Header.sizeof_hdr)
    except EOFError:  # a header cut short
        head = b""
    stream.seek(0)
    image_class = next((c for c in (nib.Nifti1Image, nib.Nifti2Image) if c.header_class.may_contain_header(head)), None)
    if image_class is None:  # the class nib.load would pick for a .nii file, else its error
        raise ImageFileError(f'Cannot work out file type of "{path}"')
    return image_class.from_stream(stream)


def _load_nifti(path: Path) -> Volume:
    # get_fdata applies the header's scl_slope/scl_inter, so stored integers become Hounsfield units.
    array, affine = _read_nifti(path, "image", lambda img: img.get_fdata(dtype=np.float32))
    check_finite(array, f"image {path}")  # here, on the file's grid, so the index named is the file's
    return Volume(np.ascontiguousarray(array, dtype=np.float32), affine, str(path))


def _import_pydicom():
    try:
        import pydicom  # noqa: F401
    except ImportError as e:
        raise ImportError("reading DICOM needs pydicom: pip install radsam-jax[dicom]") from e
    return pydicom


def _read_dicom_folder(folder: Path):
    """All DICOM datasets with pixel data under `folder` (recursively), as (file, dataset) pairs."""
    pydicom = _import_pydicom()
    from pydicom.errors import InvalidDicomError

    datasets = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            file = Path(root) / name
            try:
                ds = pydicom.dcmread(str(file))
            except (InvalidDicomError, EOFError, OSError, TypeError, ValueError, KeyError):
                continue  # not DICOM (README, DICOMDIR-less junk, ...)
            if "PixelData" not in ds:
                continue  # DICOMDIR, structured reports, presentation states
            datasets.append((file, ds))
    return datasets


def _load_dicom_series(folder: Path) -> Volume:
    """A single-frame DICOM series -> Volume (X = columns, Y = rows, Z = along the slice normal).

    HU = stored pixel * RescaleSlope + RescaleIntercept, per slice. The affine maps (col, row, slice)
    to LPS from ImagePositionPatient (first slice), ImageOrientationPatient and PixelSpacing (row
    spacing, column spacing) and the mean step between consecutive slice positions, then negates x
    and y to get RAS.
    """
    datasets = _read_dicom_folder(folder)
    if not datasets:
        raise ValueError(f"no DICOM image files found in folder {folder}")
    series = sorted({str(ds.get("SeriesInstanceUID", "") or "") for _, ds in datasets})
    if len(series) > 1:
        raise ValueError(
            f"folder {folder} mixes {len(series)} DICOM series ({', '.join(series[:4])}"
            f"{', ...' if len(series) > 4 else ''}); pass the folder of a single series"
        )
    for file, ds in datasets:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise ValueError(f"{file} is a multi-frame DICOM ({frames} frames); only single-frame series are supported")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise ValueError(f"DICOM file {file} has no {tag}; cannot place it in space")

    first_file, first = datasets[0]
    orient = np.asarray([float(v) for v in first.ImageOrientationPatient], np.float64)
    rows, cols = int(first.Rows), int(first.Columns)
    spacing = np.asarray([float(v) for v in first.PixelSpacing], np.float64)  # (row spacing, column spacing)
    for file, ds in datasets[1:]:
        o = np.asarray([float(v) for v in ds.ImageOrientationPatient], np.float64)
        if not np.allclose(o, orient, atol=1e-4):
            raise ValueError(
                f"inconsistent ImageOrientationPatient in {folder}: {list(orient)} ({first_file.name}) vs "
                f"{list(o)} ({file.name}); mixed series or a tilted localiser"
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise ValueError(
                f"inconsistent slice size in {folder}: {rows}x{cols} ({first_file.name}) vs "
                f"{int(ds.Rows)}x{int(ds.Columns)} ({file.name}); mixed series"
            )
        if not np.allclose([float(v) for v in ds.PixelSpacing], spacing, atol=1e-4):
            raise ValueError(f"inconsistent PixelSpacing in {folder} ({first_file.name} vs {file.name}); mixed series")

    row_dir, col_dir = orient[:3], orient[3:]  # row_dir: along a row (increasing column)
    normal = np.cross(row_dir, col_dir)
    positions = np.asarray([[float(v) for v in ds.ImagePositionPatient] for _, ds in datasets], np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    datasets = [datasets[i] for i in order]
    if len(datasets) > 1:
        steps = np.diff(along)
        dup = np.flatnonzero(steps < 1e-3)
        if dup.size:
            a, b = datasets[dup[0]][0].name, datasets[dup[0] + 1][0].name
            raise ValueError(
                f"two DICOM slices at the same position {along[dup[0]]:.3f} mm in {folder} ({a}, {b}); "
                f"mixed series or duplicated files"
            )
        mean_step = float(steps.mean())
        if np.abs(steps - mean_step).max() > 0.1 * mean_step + 1e-3:
            raise ValueError(
                f"uneven slice spacing in {folder}: steps from {steps.min():.3f} to {steps.max():.3f} mm "
                f"(missing slices?); resample the series first"
            )
        slice_vec = (positions[-1] - positions[0]) / (len(datasets) - 1)
    else:
        thickness = float(datasets[0][1].get("SliceThickness", 1.0) or 1.0)
        slice_vec = normal * thickness

    slices = []
    for file, ds in datasets:
        try:
            pixels = ds.pixel_array
        except Exception as e:
            raise ValueError(f"cannot decode pixel data of {file}: {e}") from e
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        slices.append(pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    # (Z, rows, cols) -> (cols, rows, Z) = (X, Y, Z)
    array = np.ascontiguousarray(np.stack(slices, axis=0).transpose(2, 1, 0), dtype=np.float32)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * spacing[1]  # one column step
    affine_lps[:3, 1] = col_dir * spacing[0]  # one row step
    affine_lps[:3, 2] = slice_vec
    affine_lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # LPS -> RAS
    return Volume(array, affine, str(folder))


def load_volume(path) -> Volume:
    """A NIfTI file (.nii, .nii.gz) or a DICOM series folder -> Volume (float32 HU, affine to RAS mm).

    NIfTI keeps the file's voxel order and applies its intensity scaling. A DICOM folder is read with
    pydicom (optional dependency); its slices are sorted by ImagePositionPatient projected on the
    slice normal, not by file name. Raises FileNotFoundError for a missing path and ValueError for a
    file that is neither, an empty or mixed DICOM folder, or an image that is not 3D.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if path.is_dir():
        return _load_dicom_series(path)
    if is_nifti_path(path):
        return _load_nifti(path)
    if _looks_like_dicom_file(path):
        raise ValueError(f"{path} is a single DICOM file; pass the folder holding the whole series")
    raise ValueError(f"{path} is not a NIfTI file (.nii, .nii.gz) or a DICOM series folder")


def _looks_like_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


# ---------------------------------------------------------------------------------------------
# Label maps
# ---------------------------------------------------------------------------------------------


def _as_integer_labels(data: np.ndarray, path) -> np.ndarray:
    if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
        labels = data
    else:
        rounded = np.rint(data)
        if not np.allclose(rounded, data, atol=1e-3):
            raise ValueError(f"label map {path} holds non-integer values (is it an image, not a label map?)")
        labels = rounded
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0:
        raise ValueError(f"label map {path} holds negative label {lo}")
    dtype = np.uint8 if hi < 256 else np.uint16 if hi < 65536 else np.int32
    return np.ascontiguousarray(labels, dtype=dtype)


def read_label_file(path) -> tuple[np.ndarray, np.ndarray, str]:
    """`read_label_array` and the sha256 of the file, from one read of its bytes: the hash names the
    voxels returned even if the file changes meanwhile (segment-batch records it)."""
    labels, affine, raw = _read_label_bytes(path)
    return labels, affine, hashlib.sha256(raw).hexdigest()


def read_label_array(path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI label map in its own voxel order -> (integer array (X, Y, Z), affine)."""
    labels, affine, _ = _read_label_bytes(path)  # no hash: every training and evaluation case reads here
    return labels, affine


def _read_label_bytes(path) -> tuple[np.ndarray, np.ndarray, bytes]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"label map not found: {path}")
    if not is_nifti_path(path):
        raise ValueError(f"label map {path} is not a NIfTI file (.nii, .nii.gz)")
    raw = path.read_bytes()
    data, affine = _read_nifti(path, "label map", lambda img: np.asanyarray(img.dataobj), raw)  # applies scl_slope/inter
    return _as_integer_labels(data, path), affine, raw


def same_grid(shape_a, affine_a, shape_b, affine_b, atol: float = AFFINE_ATOL_MM) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=atol)


def _signed_permutation(matrix: np.ndarray, atol: float = 1e-4):
    """If `matrix` (3x3) is a signed permutation, its (axis, sign) per output axis; else None."""
    axes, signs = [], []
    for row in np.asarray(matrix):
        big = np.flatnonzero(np.abs(row) > atol)
        if big.size != 1 or abs(abs(row[big[0]]) - 1.0) > atol:
            return None
        axes.append(int(big[0]))
        signs.append(int(np.sign(row[big[0]])))
    if sorted(axes) != [0, 1, 2]:
        return None
    return axes, signs


def resample_labels(
    labels: np.ndarray,
    labels_affine: np.ndarray,
    target_shape: Sequence[int],
    target_affine: np.ndarray,
    *,
    fill: int = 0,
) -> tuple[np.ndarray, float]:
    """Nearest-neighbour resampling of a label array onto a target grid through world coordinates.

    For each target voxel v the label voxel is round(inv(labels_affine) @ target_affine @ v); voxels
    that map outside the label grid get `fill`. When that map is a signed permutation with integer
    offsets and the same voxel size (a pure reorientation), it is done exactly with transpose/flip/
    slicing. Returns (labels on the target grid, fraction of target voxels inside the label grid).
    """
    target_shape = tuple(int(s) for s in target_shape)
    src_shape = labels.shape
    vox = np.linalg.inv(labels_affine) @ target_affine  # target voxel -> label voxel
    lin, offset = vox[:3, :3], vox[:3, 3]
    perm = _signed_permutation(lin)
    if perm is not None and np.allclose(offset, np.rint(offset), atol=1e-3):
        axes, signs = perm
        out = np.full(target_shape, fill, labels.dtype)
        # label axis a gets target axis axes[a] with sign signs[a]: l_a = s_a * t_{axes[a]} + o_a.
        src_sel, dst_sel = [slice(None)] * 3, [slice(None)] * 3
        for a in range(3):
            d, s, o = axes[a], signs[a], int(np.rint(offset[a]))
            n_t, n_l = target_shape[d], src_shape[a]
            t = np.arange(n_t)
            ll = s * t + o
            valid = (ll >= 0) & (ll < n_l)
            if not valid.any():
                return out, 0.0
            t_valid = t[valid]
            dst_sel[d] = slice(int(t_valid[0]), int(t_valid[-1]) + 1)
            l0, l1 = int(ll[valid][0]), int(ll[valid][-1])
            src_sel[a] = slice(l0, l1 + 1) if s > 0 else slice(l0, (l1 - 1) if l1 > 0 else None, -1)
        block = labels[tuple(src_sel)]
        # block axes are label axes; move label axis a to target axis axes[a].
        inverse = np.argsort(axes)
        out[tuple(dst_sel)] = np.transpose(block, inverse)
        inside = np.prod([(dst_sel[d].stop - dst_sel[d].start) for d in range(3)]) / np.prod(target_shape)
        return out, float(inside)

    out = np.full(target_shape, fill, labels.dtype)
    i = np.arange(target_shape[0], dtype=np.float64)[:, None]
    j = np.arange(target_shape[1], dtype=np.float64)[None, :]
    n_inside = 0
    for k in range(target_shape[2]):  # slice by slice keeps memory at one slice of coordinates
        idx = []
        for a in range(3):
            idx.append(np.floor(lin[a, 0] * i + lin[a, 1] * j + (lin[a, 2] * k + offset[a]) + 0.5).astype(np.int64))
        valid = (idx[0] >= 0) & (idx[0] < src_shape[0]) & (idx[1] >= 0) & (idx[1] < src_shape[1])
        valid &= (idx[2] >= 0) & (idx[2] < src_shape[2])
        if valid.any():
            out[:, :, k][valid] = labels[idx[0][valid], idx[1][valid], idx[2][valid]]
            n_inside += int(valid.sum())
    return out, n_inside / float(np.prod(target_shape))


def align_labels(labels: np.ndarray, labels_affine: np.ndarray, like: Volume, *, label_path="<array>") -> np.ndarray:
    """An integer label array with its own affine -> labels on `like`'s grid (see `resample_labels`).

    Raises ValueError naming both shapes and files when the label grid does not overlap the image,
    and warns when it covers only part of it: the voxels outside become background, right for a label
    map cropped around its structures, wrong for a truncated one or a wrong pairing.
    """
    if same_grid(labels.shape, labels_affine, like.array.shape, like.affine):
        return labels
    out, inside = resample_labels(labels, labels_affine, like.array.shape, like.affine)
    label = f"label map {label_path} (shape {tuple(labels.shape)}, {''.join(nib.aff2axcodes(labels_affine))})"
    image = f"image {like.path or '<array>'} (shape {tuple(like.array.shape)}, {''.join(nib.aff2axcodes(like.affine))})"
    if inside == 0.0:
        raise ValueError(f"{label} does not overlap {image} in world space; wrong pairing or a broken affine")
    if inside < 1.0:
        warnings.warn(f"{label} covers {inside:.1%} of the voxels of {image}; the rest are taken as background",
                      stacklevel=2)
    # As many voxels along each (RAS) axis but another grid: more often a wrong header than another grid.
    labels_ras, labels_ras_affine = reoriented_grid(labels.shape, labels_affine)
    image_ras, image_ras_affine = reoriented_grid(like.array.shape, like.affine)
    if labels_ras == image_ras and not same_grid(labels_ras, labels_ras_affine, image_ras, image_ras_affine):

        def grid(a):
            return (f"spacing {np.round(np.linalg.norm(a[:3, :3], axis=0), 3).tolist()} mm, "
                    f"origin {np.round(a[:3, 3], 2).tolist()}")

        warnings.warn(f"{label} has the voxel counts of {image} but another grid ({grid(labels_ras_affine)} against "
                      f"{grid(image_ras_affine)}, in RAS order): resampled through world coordinates; if the voxels "
                      f"correspond, the label map's header is wrong", stacklevel=2)
    return out


def load_label_map(path, like: Volume) -> np.ndarray:
    """A NIfTI label map -> integer labels (uint8/uint16) on `like`'s voxel grid.

    Identical grid (shape and affine within 1e-3 mm): returned as stored. Otherwise aligned through
    world coordinates with nearest neighbour (a pure reorientation is an exact permutation/flip).
    Raises ValueError for a 4D label map or one that does not overlap the image, naming both.
    """
    labels, affine = read_label_array(path)
    return align_labels(labels, affine, like, label_path=str(path))


class _Reading:
    """read(item) in a daemon thread: a stop (Ctrl-C) does not wait for a read in progress.
    `result()` gives read's value or raises its exception; `seconds`: how long the read took."""

    def __init__(self, read: Callable, item):
        self._value, self._error, self.seconds = None, None, 0.0
        self._thread = threading.Thread(target=self._run, args=(read, item), daemon=True)
        self._thread.start()

    def _run(self, read, item):
        t0 = time.perf_counter()
        try:
            self._value = read(item)
        except BaseException as e:  # re-raised in the caller's thread, at this item
            self._error = e
        self.seconds = time.perf_counter() - t0

    def wait(self) -> None:
        self._thread.join()

    def result(self):
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value


def read_ahead(items: Sequence, read: Callable):
    """Yields (item, its reading) for each item, `reading.result()` being read(item) (or raising what
    it raised) and `reading.seconds` its time: the next item is read in the background while the
    caller works on this one (volumes read and decoded while the model runs), one read at a time."""
    reading = _Reading(read, items[0]) if items else None
    for i, item in enumerate(items):
        reading.wait()  # the next read starts when this one is done
        ahead = _Reading(read, items[i + 1]) if i + 1 < len(items) else None
        yield item, reading
        reading = ahead


# ---------------------------------------------------------------------------------------------
# Reorientation
# ---------------------------------------------------------------------------------------------


def reorient_array(array: np.ndarray, affine: np.ndarray, axcodes: str = "RAS") -> tuple[np.ndarray, np.ndarray]:
    """Permutes/flips a (X, Y, Z) array to the closest `axcodes` orientation; returns (array, affine).

    Exact (no resampling): nibabel's io_orientation picks the closest axis-aligned orientation, so
    an oblique scan keeps its obliquity in the new affine. Apply the same call to an image and its
    label map on the same grid and they stay aligned.
    """
    transform = _orientation_transform(affine, axcodes)
    out = nib.orientations.apply_orientation(array, transform)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(transform, array.shape)


def reoriented_grid(shape, affine: np.ndarray, axcodes: str = "RAS") -> tuple[tuple, np.ndarray]:
    """(shape, affine) that `reorient_array` gives an array of `shape`, without touching any array."""
    transform = _orientation_transform(affine, axcodes)
    order = np.argsort(transform[:, 0])  # output axis j holds input axis order[j]
    return tuple(int(shape[i]) for i in order), affine @ nib.orientations.inv_ornt_aff(transform, shape)


def _orientation_transform(affine: np.ndarray, axcodes: str) -> np.ndarray:
    current = nib.orientations.io_orientation(affine)
    return nib.orientations.ornt_transform(current, nib.orientations.axcodes2ornt(tuple(axcodes)))


def to_canonical(volume: Volume) -> Volume:
    """The volume in RAS voxel order (first axis towards Right, then Anterior, then Superior)."""
    array, affine = reorient_array(volume.array, volume.affine, "RAS")
    return Volume(array, affine, volume.path)


def reorient_labels_like(labels: np.ndarray, volume: Volume, axcodes: str = "RAS") -> np.ndarray:
    """Labels on `volume`'s grid -> the same reorientation `to_canonical(volume)` applies."""
    if labels.shape != volume.array.shape:
        raise ValueError(f"labels shape {labels.shape} differs from volume shape {volume.array.shape}")
    return reorient_array(labels, volume.affine, axcodes)[0]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def save_label_map(path, labels: np.ndarray, like: Volume) -> Path:
    """Writes integer `labels` (on `like`'s grid) as NIfTI with `like.affine`, atomically.

    uint8 when every label is < 256, else uint16. The file is written to a temporary name in the
    same folder, then renamed, so a reader never sees a half-written file.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise ValueError(f"cannot save label map to {path}: the name must end with .nii or .nii.gz")
    labels = np.asarray(labels)
    if labels.shape != like.array.shape:
        raise ValueError(f"labels shape {labels.shape} differs from the image shape {like.array.shape} ({like.path})")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.allclose(labels, np.rint(labels)):
            raise ValueError("labels must be integers")
        labels = np.rint(labels)
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"labels must lie in 0..65535 to be saved as uint8/uint16, got {lo}..{hi}")
    dtype = np.uint8 if hi < 256 else np.uint16
    img = nib.Nifti1Image(np.ascontiguousarray(labels, dtype=dtype), np.asarray(like.affine, np.float64))
    img.set_qform(like.affine, code=1)
    if not np.allclose(img.get_qform(), like.affine, atol=AFFINE_ATOL_MM):  # shear (gantry tilt): no qform holds it
        img.set_qform(None)  # code 0, so no reader places the mask by the qform's approximation
    img.set_sform(like.affine, code=1)
    img.header.set_data_dtype(dtype)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    return write_atomically(path, lambda tmp: nib.save(img, tmp), suffix)


def read_json(path, what: str = "", raw: Optional[bytes] = None):
    """The JSON a person wrote in `path` (labels.json, splits, manifests, prompts), a byte-order mark
    some editors write included; ValueError naming the file (as `what`, e.g. "prompts file") where
    it is not UTF-8 JSON. `raw`: the file's bytes, read already."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig") if raw is None else raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what + ' ' if what else ''}{path} is not valid JSON: {e}") from None


def file_sha256(path) -> str:
    """sha256 of a file's bytes, read in chunks: a CT or a checkpoint is not held in memory for it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            digest.update(chunk)
    return digest.hexdigest()


def files_sha256(paths) -> str:
    """One sha256 for several files in order: of their sha256s (a case's DICOM series and labels, a
    sharded checkpoint's index and shards)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def write_atomically(path, write: Callable[[str], object], suffix: str = "") -> Path:
    """Calls `write(tmp)` for a temporary file beside `path` (name ending in `suffix`, which writers
    such as nib.save read the format from), syncs it to disk, then renames it to `path`: a reader never
    sees a half-written file (nor, after a crash of the machine, an empty one), and a failure leaves no
    temporary file and the old `path`, if any, untouched.

    The file keeps the permissions of the file it replaces, else gets those of a plain open().
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)  # Windows fsyncs only writable descriptors
        try:
            os.fsync(fd)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # a file system that cannot sync: rename regardless
                raise
        finally:
            os.close(fd)
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask  # mkstemp makes 0600
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text_atomically(path, text: str) -> Path:
    """`path` holding `text`, written as `write_atomically` does."""
    return write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def save_png_atomically(path, image) -> Path:
    """A Pillow image saved as PNG at `path`, written as `write_atomically` does."""
    return write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def lock_exclusively(path):
    """An open file on `path` holding an exclusive flock, released when it is closed or the process
    ends however it ends; None if another process holds it. Where flock is missing (not POSIX, some
    network or parallel file systems) a warning, and an unlocked handle."""
    try:
        import fcntl
    except ImportError:
        return open(os.devnull)
    handle = open(path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError as e:
        warnings.warn(f"cannot lock {path} ({e.strerror or e}): nothing keeps a second process out of {Path(path).parent}")
    return handle


def _cannot_write_into(folder: Path) -> Optional[str]:
    """Why no file can be created in the existing `folder` (permissions, a read-only file system),
    or None: found by creating and removing an empty temporary file, which os.access misses (root, and
    file systems such as /sys that refuse new files whatever the permissions)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".radsam-write-check.", dir=folder)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.remove(probe)
    return None


def check_output_path(path, what: str, *, folder: bool = False, create: bool = False, probe: bool = True) -> Path:
    """Raises ValueError unless `path` can be written as a file (folder=True: used as a folder):
    nothing of the other kind is there and its nearest existing parent is a folder that takes new
    files (probe=False: not tried again, for many files of a folder already checked). Called before
    the model runs, so a bad destination fails at once rather than after the whole computation.
    create=True (with folder=True) also makes the folder, with its parents, and checks that files
    can be written into it."""
    if create and not folder:
        raise ValueError("check_output_path: create=True needs folder=True")
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind = "a file, not a folder" if folder else "a folder, not a file"
        raise ValueError(f"{what} {path} is {kind}")
    if create:  # mkdir names whatever is in the way (a file, permissions)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{what} {path}: cannot create the folder ({e.strerror or e})") from None
        problem = _cannot_write_into(path)
        if problem:
            raise ValueError(f"{what} {path}: the folder is not writable ({problem})")
        return path
    parent = path if folder and path.exists() else path.parent
    while not parent.exists():  # "." and "/" exist
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {path} cannot be created: {parent} is a file, not a folder")
    problem = _cannot_write_into(parent) if probe else None
    if problem:
        raise ValueError(f"{what} {path} cannot be written: no file can be created in {parent} ({problem})")
    return path


def _file_keys(path) -> list:
    """What identifies the file at `path`: its resolved path (symbolic links and "..", also through
    folders not yet created) and, when it exists, its (device, inode) (hard links)."""
    path = Path(path)
    keys = [path.resolve()]
    try:
        st = path.stat()
        keys.append((st.st_dev, st.st_ino))
    except OSError:
        pass
    return keys


def check_outputs_spare_inputs(outputs: Sequence[tuple[str, object]], inputs: Sequence[tuple[str, object]]) -> None:
    """Raises ValueError when an output (what, path) would replace an input (what, path) or another
    output: the same file by path, symbolic link or hard link."""
    written = {}
    for what, path in outputs:
        for key in _file_keys(path):
            if key in written:
                raise ValueError(f"{what} {path} and {written[key][0]} {written[key][1]} are the same file")
            written[key] = (what, path)
    for what, path in inputs:
        for key in _file_keys(path):
            if key in written:
                raise ValueError(f"{written[key][0]} {written[key][1]} is the {what} {path}; writing it would destroy the input")
