r"""Prompts for `radsam segment` / `segment-batch`: the `--prompts` JSON file and the command-line form.

Schema of a prompts file (a bare list is taken as "objects"):

    {
      "coordinates": "voxel",          # or "world"; optional, default "voxel" (--world forces "world")
      "propagation": "mask",           # optional default for every object: "mask" (RadSAM) or "box"
      "objects": [
        {
          "label": 1,                  # value written in the output label map (default: position + 1)
          "name": "liver",             # optional, used in messages
          "slice": 56,                 # prompted slice (index along the S/I axis); world: z in mm
          "bounds": [30, 80],          # first and last slice, inclusive, lo <= hi; optional, default the whole volume
          "box": [40, 30, 80, 70],     # x0, y0, x1, y1  \
          "points": [[60, 50]],        # (x, y) each      } at least one of box / points / mask
          "mask": "liver_drawn.nii.gz",  # a label map on the image's grid (e.g. an annotation tool's),
                                       # its voxels > 0 (or == "mask_label") on "slice": a drawn mask
                                       # prompt, for models with binary mask prompts; relative to this file
          "point_labels": [1],         # 1 positive, 0 negative; optional, default all 1
          "propagation": "mask",       # optional, overrides the file's default
          "reference_label": 5,        # optional: print the Dice against this id of --labels
          "edits": [                   # optional correction rounds, applied in order
            {"slice": 60, "points": [[55, 52]], "point_labels": [0]}
          ]
        }
      ]
    }

Voxel coordinates: slice = index along the file's S/I array axis, x and y = indices along its
other two axes in array order; for the usual axial file x = first array axis, y = second, slice =
third (the slice shown as `array[:, :, k].T`), for a sagittal file stored (A, S, R) x runs along A,
y along R and slices along S (`orientation.axial_grid`). World coordinates: x, y are RAS millimetres and slice / bounds are the z (S)
coordinate in millimetres; each is converted with the inverse affine (points at their slice's
height; slice heights at the prompt's x, y, or a drawn mask alone's at the image's centre voxel) and
slices are rounded to the nearest index.
Objects are written in order; where two overlap, the later one wins. A slice holds at most
`DEFAULT_MAX_POINTS` (16) points, the prompt's plus every edit's on it, as `VolumePredictor` does.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from radsam_jax.inference.orientation import axial_grid
from radsam_jax.inference.propagation import PROPAGATION_MODES
from radsam_jax.inference.volume_predictor import DEFAULT_MAX_POINTS
from radsam_jax.io import read_json

OBJECT_KEYS = {"label", "name", "slice", "bounds", "box", "points", "point_labels", "mask", "mask_label", "propagation",
               "reference_label", "edits"}
EDIT_KEYS = {"slice", "points", "point_labels"}
TOP_KEYS = {"coordinates", "propagation", "objects"}


@dataclasses.dataclass
class Edit:
    slice: int
    points: np.ndarray  # (N, 2) voxel
    point_labels: np.ndarray  # (N,)


@dataclasses.dataclass
class ObjectPrompt:
    """One object in voxel coordinates of the file's grid, validated against the volume's shape."""

    label: int
    slice: int
    bounds: tuple[int, int]
    points: Optional[np.ndarray] = None
    point_labels: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    propagation: str = "mask"
    name: str = ""
    reference_label: Optional[int] = None
    edits: list = dataclasses.field(default_factory=list)
    mask_file: Optional[str] = None  # label map holding a drawn mask on `slice` (drawn_mask)
    mask_label: Optional[int] = None  # its label there; None: every voxel > 0
    drawn: Optional[np.ndarray] = dataclasses.field(default=None, repr=False, compare=False)  # read once (drawn_mask)

    @property
    def title(self) -> str:
        return f"object {self.label}" + (f" ({self.name})" if self.name else "")


class PromptError(ValueError):
    """A prompt that does not fit the image (message names the object and the problem)."""


def _world_to_voxel(affine: np.ndarray, xyz) -> np.ndarray:
    xyz = np.asarray(xyz, np.float64)
    return (np.linalg.inv(affine) @ np.append(xyz, 1.0))[:3]


def _grid_centre_mm(affine, shape) -> np.ndarray:
    """The RAS (x, y) of the image's centre voxel: where a drawn mask alone (no point, no box) places
    its slices in world coordinates (the same slice wherever taken unless the scan is oblique)."""
    centre = (np.asarray(shape[:3], np.float64) - 1) / 2
    return (np.asarray(affine, np.float64) @ np.append(centre, 1.0))[:2]


def _slice_from_world(affine, z_mm: float, xy_mm, nz: int, where: str, what: str = "slice") -> int:
    """The slice index at height z_mm (at x, y = xy_mm); an error quotes the millimetres given."""
    i, j, k = _world_to_voxel(affine, [xy_mm[0], xy_mm[1], z_mm])
    k = int(np.floor(k + 0.5))
    if not 0 <= k < nz:
        z = sorted((affine @ [i, j, e, 1.0])[2] for e in (-0.5, nz - 0.5))
        raise PromptError(
            f"{where}: {what} z = {z_mm:g} mm is outside the image, which spans z {z[0]:.1f}..{z[1]:.1f} mm "
            f"at that x, y (voxel slice {k}; the image has slices 0..{nz - 1})"
        )
    return k


def _xy_from_world(affine, xy_mm: np.ndarray, z_mm: float, shape, k: int, where: str, what: str) -> np.ndarray:
    """(N, 2) RAS mm at height z_mm -> voxel (x, y); an error quotes the millimetres given and the
    slice's extent in millimetres."""
    xy_mm = np.asarray(xy_mm, np.float64).reshape(-1, 2)
    out = np.asarray([_world_to_voxel(affine, [x, y, z_mm])[:2] for x, y in xy_mm], np.float64).reshape(-1, 2)
    for (x, y), (i, j) in zip(xy_mm, out):
        if not _inside(i, j, shape):
            corners = np.asarray([affine @ [a, b, k, 1.0] for a in (-0.5, shape[0] - 0.5) for b in (-0.5, shape[1] - 0.5)])
            (x0, y0), (x1, y1) = corners[:, :2].min(axis=0), corners[:, :2].max(axis=0)
            raise PromptError(
                f"{where}: {what} ({x:g}, {y:g}) mm is outside the image, whose slice {k} spans x {x0:.1f}..{x1:.1f} mm "
                f"and y {y0:.1f}..{y1:.1f} mm (voxel ({i:.1f}, {j:.1f}) of {shape[0]} x {shape[1]})"
            )
    return out


def _number(value, what: str) -> float:
    # "90" or true is a typo, not a slice; NumPy and JAX scalars (np.int64, jnp.argmax(...)) are numbers
    if isinstance(value, (bool, str)) or np.ndim(value) != 0 or np.asarray(value).dtype.kind not in "iuf":
        raise PromptError(f"{what} must be a number, got {value!r}")
    f = float(value)
    if not np.isfinite(f):
        raise PromptError(f"{what} must be a finite number, got {value!r}")
    return f


SLICE_INDEX = " slice index (voxel coordinates)"


def _int(value, what: str, kind: str = "") -> int:
    """`value` as an int; `kind` completes "must be an integer..." (e.g. SLICE_INDEX)."""
    f = _number(value, what)
    if not f.is_integer():
        raise PromptError(f"{what} must be an integer{kind}, got {value!r}")
    return int(f)


def _has_bool(value) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(_has_bool(v) for v in value))


def _points(points, labels, where: str):
    if points is None:
        if labels is not None:
            raise PromptError(f"{where}: point_labels given without points")
        return None, None
    try:
        p = np.asarray(points, np.float64)
    except (TypeError, ValueError):
        p = None
    if p is not None and p.size == 0:
        raise PromptError(f"{where}: points is empty")
    if p is not None and p.shape == (2,):  # one [x, y]
        p = p[None]
    # NumPy turns a null into NaN, and true into 1; [x, y, slice] is not a point
    if p is None or p.ndim != 2 or p.shape[1] != 2 or not np.isfinite(p).all() or _has_bool(points):
        raise PromptError(f"{where}: points must be a list of [x, y] number pairs, got {points!r}")
    if labels is not None and _has_bool(labels):
        raise PromptError(f"{where}: point_labels must be 1 (positive) or 0 (negative), got {labels!r}")
    lab = np.ones(p.shape[0], np.int64) if labels is None else np.asarray(labels).reshape(-1)
    if lab.shape[0] != p.shape[0]:
        raise PromptError(f"{where}: {p.shape[0]} points but {lab.shape[0]} point_labels")
    if not np.isin(lab, (0, 1)).all():
        raise PromptError(f"{where}: point_labels must be 1 (positive) or 0 (negative), got {lab.tolist()}")
    return p, lab.astype(np.int64)


def _inside(x: float, y: float, shape) -> bool:
    return bool(np.isfinite(x) and np.isfinite(y) and -0.5 <= x <= shape[0] - 0.5 and -0.5 <= y <= shape[1] - 0.5)


def _check_xy(xy: np.ndarray, shape, where: str, what: str) -> None:
    n0, n1 = shape[0], shape[1]
    for x, y in np.asarray(xy).reshape(-1, 2):
        if not _inside(x, y, shape):
            raise PromptError(
                f"{where}: {what} ({x:g}, {y:g}) is outside the image, whose slices are {n0} x {n1} voxels "
                f"(x in 0..{n0 - 1}, y in 0..{n1 - 1})"
            )


def _check_slice(k: int, nz: int, where: str, what: str = "slice") -> None:
    if not 0 <= k < nz:
        raise PromptError(f"{where}: {what} {k} is outside the image, which has slices 0..{nz - 1}")


def parse_object(raw: dict, index: int, shape: Sequence[int], affine, *, world: bool, default_propagation: str = "mask",
                 max_points: int = DEFAULT_MAX_POINTS) -> ObjectPrompt:
    """A raw object dict (schema above) -> validated `ObjectPrompt` in voxel coordinates.

    max_points: the most points a slice may hold, the prompt's plus its edits' (`VolumePredictor`'s
    `max_points`), checked here so that a file over the limit fails before anything is computed.
    """
    where = f"object {index + 1}" + (f" ({raw.get('name')})" if isinstance(raw, dict) and raw.get("name") else "")
    if not isinstance(raw, dict):
        raise PromptError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - OBJECT_KEYS)
    if unknown:
        raise PromptError(f"{where}: unknown keys {unknown} (allowed: {sorted(OBJECT_KEYS)})")
    if "slice" not in raw:
        raise PromptError(f"{where}: \"slice\" is required")
    if raw.get("box") is None and raw.get("points") is None and raw.get("mask") is None:
        raise PromptError(f"{where}: needs a \"box\", \"points\" or a \"mask\"")
    mask_file, mask_label = raw.get("mask"), raw.get("mask_label")
    if mask_file is not None and not (isinstance(mask_file, str) and mask_file.strip()):
        raise PromptError(f"{where}: mask must be the path of a label map (a string), got {mask_file!r}")
    if mask_label is not None:
        if mask_file is None:
            raise PromptError(f"{where}: mask_label needs a \"mask\" file")
        mask_label = _int(mask_label, f"{where}: mask_label")
    points, labels = _points(raw.get("points"), raw.get("point_labels"), where)
    box = _box(raw.get("box"), where)
    ref_mm = None  # world: where the object's slices are placed in-plane
    if world:
        ref_mm = (points[0] if points is not None else (box[:2] + box[2:]) / 2 if box is not None
                  else _grid_centre_mm(affine, shape))
    k, prompted, points, box = _place(raw["slice"], points, box, shape, affine, world, ref_mm, where)
    if box is not None and (box[0] > box[2] or box[1] > box[3]):
        raise PromptError(f"{where}: box {box.tolist()} must have x0 <= x1 and y0 <= y1")
    lo, hi, span = _bounds(raw.get("bounds"), shape[2], affine, world, ref_mm, where)
    if not lo <= k <= hi:
        raise PromptError(f"{where}: the prompted slice {prompted} is outside the bounds {span}")
    propagation = raw.get("propagation", default_propagation)
    if propagation not in PROPAGATION_MODES:
        raise PromptError(f"{where}: propagation must be \"mask\" or \"box\", got {propagation!r}")
    label = raw.get("label", index + 1)
    label = _int(label, f"{where}: label")
    if not 1 <= label <= 65535:
        raise PromptError(f"{where}: label must lie in 1..65535, got {label}")
    ref = raw.get("reference_label")
    ref = None if ref is None else _int(ref, f"{where}: reference_label")
    if points is not None and len(points) > max_points:
        raise PromptError(f"{where}: {len(points)} points, more than the {max_points} a slice can hold")
    edits = _edits(raw.get("edits"), {k: 0 if points is None else len(points)}, (lo, hi, span), shape, affine, world,
                   max_points, where)
    return ObjectPrompt(label, k, (lo, hi), points, labels, box, propagation, str(raw.get("name", "") or ""), ref, edits,
                        mask_file, mask_label)


def _box(raw_box, where: str) -> Optional[np.ndarray]:
    if raw_box is None:
        return None
    try:
        box = np.asarray(raw_box, np.float64).reshape(4)
    except (TypeError, ValueError):
        box = None
    if box is None or not np.isfinite(box).all() or _has_bool(raw_box):
        raise PromptError(f"{where}: box must be [x0, y0, x1, y1] (numbers), got {raw_box!r}")
    return box


def _place(raw_slice, points, box, shape, affine, world: bool, ref_mm, where: str):
    """(slice index, how to name it in errors, points and box in voxels) of a prompt, checked inside the image."""
    nz = shape[2]
    if world:
        z_mm = _number(raw_slice, f"{where}: slice")
        k = _slice_from_world(affine, z_mm, ref_mm, nz, where)
        if points is not None:
            points = _xy_from_world(affine, points, z_mm, shape, k, where, "point")
        if box is not None:
            c = _xy_from_world(affine, box.reshape(2, 2), z_mm, shape, k, where, "box corner")
            box = np.concatenate([c.min(axis=0), c.max(axis=0)])
        return k, f"z = {z_mm:g} mm (slice {k})", points, box
    k = _int(raw_slice, f"{where}: slice", SLICE_INDEX)
    _check_slice(k, nz, where)
    if points is not None:
        _check_xy(points, shape, where, "point")
    if box is not None:
        _check_xy(box.reshape(2, 2), shape, where, "box corner")
    return k, f"{k}", points, box


def _bounds(raw_bounds, nz: int, affine, world: bool, ref_mm, where: str) -> tuple[int, int, str]:
    """(lo, hi, how to name them in errors): the whole volume by default."""
    if raw_bounds is None:
        return 0, nz - 1, f"0..{nz - 1}"
    b = raw_bounds
    if not isinstance(b, (list, tuple)) or len(b) != 2:
        raise PromptError(f"{where}: bounds must be [lo, hi], got {b!r}")
    if world:
        b = [_number(v, f"{where}: bounds {n}") for v, n in zip(b, ("lo", "hi"))]
        if b[0] > b[1]:
            raise PromptError(f"{where}: bounds LO={b[0]:g} mm > HI={b[1]:g} mm; give the bottom (inferior) z first")
        lo, hi = sorted(_slice_from_world(affine, v, ref_mm, nz, where, f"bound {n}") for v, n in zip(b, ("lo", "hi")))
        return lo, hi, f"{b[0]:g}..{b[1]:g} mm (slices {lo}..{hi})"
    lo, hi = _int(b[0], f"{where}: bounds lo", SLICE_INDEX), _int(b[1], f"{where}: bounds hi", SLICE_INDEX)
    _check_slice(lo, nz, where, "bound lo")
    _check_slice(hi, nz, where, "bound hi")
    if lo > hi:
        raise PromptError(f"{where}: bounds LO={lo} > HI={hi}; give the lower slice index first")
    return lo, hi, f"{lo}..{hi}"


def _edits(raw_edits, stored: dict, bounds: tuple[int, int, str], shape, affine, world: bool, max_points: int,
           where: str) -> list[Edit]:
    """The object's correction rounds, each inside its bounds; `stored` counts the points per slice as
    the predictor stores them (the prompt's, then every edit's on that slice), within max_points."""
    if raw_edits is not None and not isinstance(raw_edits, list):
        raise PromptError(f"{where}: edits must be a list of {{\"slice\", \"points\"}} objects, got {raw_edits!r}")
    lo, hi, span = bounds
    edits = []
    for j, e in enumerate(raw_edits or []):
        ew = f"{where}, edit {j + 1}"
        if not isinstance(e, dict):
            raise PromptError(f"{ew}: must be a JSON object")
        unknown = sorted(set(e) - EDIT_KEYS)
        if unknown:
            raise PromptError(f"{ew}: unknown keys {unknown} (allowed: {sorted(EDIT_KEYS)})")
        if "slice" not in e or e.get("points") is None:
            raise PromptError(f"{ew}: needs \"slice\" and \"points\"")
        ep, el = _points(e["points"], e.get("point_labels"), ew)
        ek, edited, ep, _ = _place(e["slice"], ep, None, shape, affine, world, ep[0], ew)
        if not lo <= ek <= hi:
            raise PromptError(f"{ew}: slice {edited} is outside the object's bounds {span}")
        stored[ek] = stored.get(ek, 0) + len(ep)
        if stored[ek] > max_points:
            raise PromptError(
                f"{ew}: slice {edited} would hold {stored[ek]} points (the prompt's and the edits' so far), "
                f"more than the {max_points} a slice can hold"
            )
        edits.append(Edit(ek, ep, el))
    return edits


def drawn_mask(obj: ObjectPrompt, volume, labels: Optional[np.ndarray] = None) -> np.ndarray:
    """The object's drawn mask prompt: its `mask_file` aligned to `volume` (io.load_label_map), on
    slice `obj.slice`, as a bool array of that slice's shape (VolumePredictor.segment's `mask`).
    Read once per object (kept in `obj.drawn`): the command line checks it before the model loads.
    `labels`: the `mask_file` already read on `volume`'s grid (`read_drawn_masks`)."""
    if obj.drawn is not None:
        return obj.drawn
    from radsam_jax.inference.orientation import SliceFrame
    from radsam_jax.io import load_label_map

    if labels is None:
        labels = load_label_map(obj.mask_file, like=volume)
    drawn = SliceFrame.from_affine(volume.affine, labels.shape).axial(labels)[:, :, obj.slice]
    drawn = drawn > 0 if obj.mask_label is None else drawn == obj.mask_label
    if not drawn.any():
        which = "no voxel above 0" if obj.mask_label is None else f"no voxel of label {obj.mask_label}"
        raise PromptError(f"{obj.title}: its mask {obj.mask_file} has {which} on slice {obj.slice}")
    obj.drawn = drawn
    return drawn


def read_drawn_masks(objects: Sequence[ObjectPrompt], volume) -> dict[str, str]:
    """Reads every drawn mask file the objects name once from disk (objects naming one file share
    it; one file's voxels held at a time) and keeps each object's `drawn_mask`; returns {absolute
    path: sha256 of the bytes read}, sorted: the files the objects' masks are made from, whatever
    the current folder (a re-run from another one compares the same files)."""
    from radsam_jax.io import align_labels, read_label_file

    by_file: dict[str, list[ObjectPrompt]] = {}
    for o in objects:
        if o.mask_file is not None:
            by_file.setdefault(str(Path(o.mask_file).resolve()), []).append(o)
    hashes = {}
    for key, named in by_file.items():
        path = named[0].mask_file
        labels, affine, hashes[key] = read_label_file(path)  # one read: the hash names these voxels
        labels = align_labels(labels, affine, volume, label_path=str(path))
        for o in named:
            drawn_mask(o, volume, labels)
    return dict(sorted(hashes.items()))


def parse_prompts(data: Any, shape: Sequence[int], affine, *, world: bool = False,
                  max_points: int = DEFAULT_MAX_POINTS) -> list[ObjectPrompt]:
    """Parsed JSON (schema above) -> validated objects. `world=True` forces world coordinates;
    `max_points`: see `parse_object`. `shape` and `affine` are the file's; slices index its S/I axis
    and x, y its other two axes in array order (orientation.axial_grid)."""
    if affine is not None:  # voxel prompts of an array without an affine: its third axis is the slice axis
        shape, affine = axial_grid(shape, affine)
    if isinstance(data, list):
        data = {"objects": data}
    if not isinstance(data, dict):
        raise PromptError("the prompts file must hold a JSON object with \"objects\", or a list of objects")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise PromptError(f"unknown top-level keys {unknown} (allowed: {sorted(TOP_KEYS)})")
    coords = data.get("coordinates", "voxel")
    if coords not in ("voxel", "world"):
        raise PromptError(f"\"coordinates\" must be \"voxel\" or \"world\", got {coords!r}")
    objects = data.get("objects")
    if not isinstance(objects, list) or not objects:
        raise PromptError("the prompts file has no objects (\"objects\": [...] must be a non-empty list)")
    parsed = [parse_object(o, i, shape, affine, world=world or coords == "world",
                           default_propagation=data.get("propagation", "mask"), max_points=max_points)
              for i, o in enumerate(objects)]
    labels = [o.label for o in parsed]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise PromptError(f"several objects share the output label(s) {dup}; give each a distinct \"label\"")
    return parsed


@dataclasses.dataclass
class PromptsFile:
    """A prompts file read once: its JSON and the sha256 of the bytes it was parsed from (None where
    it cannot be read), or the error `objects` raises. `mask_paths` reads no volume; `objects`
    validates the prompts against one."""

    path: Path
    data: Any = None
    sha256: Optional[str] = None
    error: Optional[Exception] = None

    @classmethod
    def read(cls, path) -> "PromptsFile":
        path = Path(path)
        if not path.is_file():
            return cls(path, error=FileNotFoundError(f"prompts file not found: {path}"))
        try:
            raw = path.read_bytes()
        except OSError as e:
            return cls(path, error=e)
        sha256 = hashlib.sha256(raw).hexdigest()
        try:
            return cls(path, read_json(path, "prompts file", raw), sha256)
        except ValueError as e:
            return cls(path, sha256=sha256, error=PromptError(str(e)))

    def mask_paths(self) -> list[Path]:
        """The drawn masks the file names (relative to it): the inputs a batch's outputs must spare. A
        file that cannot be read or parsed names none (`objects` fails with its own error)."""
        data = self.data
        objects = data if isinstance(data, list) else data.get("objects") if isinstance(data, dict) else None
        return [self.path.parent / o["mask"] for o in objects or [] if isinstance(o, dict) and isinstance(o.get("mask"), str)
                and o["mask"].strip()]

    def objects(self, shape, affine, *, world: bool = False, max_points: int = DEFAULT_MAX_POINTS) -> list[ObjectPrompt]:
        """The validated objects (`parse_prompts`), errors naming the file; a drawn mask's path is the file's."""
        if self.error is not None:
            raise self.error
        try:
            objects = parse_prompts(self.data, shape, affine, world=world, max_points=max_points)
        except PromptError as e:
            raise PromptError(f"{self.path}: {e}") from None
        for o in objects:
            if o.mask_file is not None:
                o.mask_file = str(self.path.parent / o.mask_file)
        return objects


def load_prompts_file(path, shape, affine, *, world: bool = False, max_points: int = DEFAULT_MAX_POINTS) -> list[ObjectPrompt]:
    return PromptsFile.read(path).objects(shape, affine, world=world, max_points=max_points)
