r"""Prompts for `radsam segment` / `segment-batch`: the `--prompts` JSON file and the command-line form.

Schema of a prompts file (a bare list is taken as "objects"):

    {
      "coordinates": "voxel",          # or "world"; optional, default "voxel" (--world forces "world")
      "propagation": "mask",           # optional default for every object: "mask" (RadSAM) or "box"
      "objects": [
        {
          "label": 1,                  # value written in the output label map (default: position + 1)
          "name": "liver",             # optional, used in messages
          "slice": 56,                 # prompted slice (third array axis); world: z in mm
          "bounds": [30, 80],          # top/bottom slices, inclusive; optional, default the whole volume
          "box": [40, 30, 80, 70],     # x0, y0, x1, y1  \  at least one of box / points
          "points": [[60, 50]],        # (x, y) each     /
          "point_labels": [1],         # 1 positive, 0 negative; optional, default all 1
          "propagation": "mask",       # optional, overrides the file's default
          "reference_label": 5,        # optional: print the Dice against this id of --labels
          "edits": [                   # optional correction rounds, applied in order
            {"slice": 60, "points": [[55, 52]], "point_labels": [0]}
          ]
        }
      ]
    }

Voxel coordinates: x = first array axis index, y = second, slice = third (the slice shown as
`array[:, :, k].T`). World coordinates: x, y are RAS millimetres and slice / bounds are the z (S)
coordinate in millimetres; each is converted with the inverse affine (points at their slice's
height; slice heights at the prompt's x, y) and slices are rounded to the nearest index.
Objects are written in order; where two overlap, the later one wins.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

OBJECT_KEYS = {"label", "name", "slice", "bounds", "box", "points", "point_labels", "propagation", "reference_label", "edits"}
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

    @property
    def title(self) -> str:
        return f"object {self.label}" + (f" ({self.name})" if self.name else "")


class PromptError(ValueError):
    """A prompt that does not fit the image (message names the object and the problem)."""


def _world_to_voxel(affine: np.ndarray, xyz) -> np.ndarray:
    xyz = np.asarray(xyz, np.float64)
    return (np.linalg.inv(affine) @ np.append(xyz, 1.0))[:3]


def _slice_from_world(affine, z_mm: float, xy_mm, what: str) -> int:
    k = _world_to_voxel(affine, [xy_mm[0], xy_mm[1], float(z_mm)])[2]
    return int(np.floor(k + 0.5))


def _xy_from_world(affine, xy_mm: np.ndarray, z_mm: float) -> np.ndarray:
    out = [_world_to_voxel(affine, [x, y, z_mm])[:2] for x, y in np.asarray(xy_mm, np.float64).reshape(-1, 2)]
    return np.asarray(out, np.float64).reshape(-1, 2)


def _int(value, what: str) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise PromptError(f"{what} must be a number, got {value!r}") from None
    if not f.is_integer():
        raise PromptError(f"{what} must be an integer slice index (voxel coordinates), got {value!r}")
    return int(f)


def _points(points, labels, where: str):
    if points is None:
        if labels is not None:
            raise PromptError(f"{where}: point_labels given without points")
        return None, None
    try:
        p = np.asarray(points, np.float64).reshape(-1, 2)
    except (TypeError, ValueError):
        raise PromptError(f"{where}: points must be a list of [x, y] pairs, got {points!r}") from None
    if p.shape[0] == 0:
        raise PromptError(f"{where}: points is empty")
    lab = np.ones(p.shape[0], np.int64) if labels is None else np.asarray(labels).reshape(-1)
    if lab.shape[0] != p.shape[0]:
        raise PromptError(f"{where}: {p.shape[0]} points but {lab.shape[0]} point_labels")
    if not np.isin(lab, (0, 1)).all():
        raise PromptError(f"{where}: point_labels must be 1 (positive) or 0 (negative), got {lab.tolist()}")
    return p, lab.astype(np.int64)


def _check_xy(xy: np.ndarray, shape, where: str, what: str) -> None:
    n0, n1 = shape[0], shape[1]
    for x, y in np.asarray(xy).reshape(-1, 2):
        if not (np.isfinite(x) and np.isfinite(y) and -0.5 <= x <= n0 - 0.5 and -0.5 <= y <= n1 - 0.5):
            raise PromptError(
                f"{where}: {what} ({x:g}, {y:g}) is outside the image, whose slices are {n0} x {n1} voxels "
                f"(x in 0..{n0 - 1}, y in 0..{n1 - 1})"
            )


def _check_slice(k: int, nz: int, where: str, what: str = "slice") -> None:
    if not 0 <= k < nz:
        raise PromptError(f"{where}: {what} {k} is outside the image, which has slices 0..{nz - 1}")


def parse_object(raw: dict, index: int, shape: Sequence[int], affine, *, world: bool, default_propagation: str = "mask") -> ObjectPrompt:
    """A raw object dict (schema above) -> validated `ObjectPrompt` in voxel coordinates."""
    where = f"object {index + 1}" + (f" ({raw.get('name')})" if isinstance(raw, dict) and raw.get("name") else "")
    if not isinstance(raw, dict):
        raise PromptError(f"{where}: must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - OBJECT_KEYS)
    if unknown:
        raise PromptError(f"{where}: unknown keys {unknown} (allowed: {sorted(OBJECT_KEYS)})")
    nz = shape[2]
    if "slice" not in raw:
        raise PromptError(f"{where}: \"slice\" is required")
    if raw.get("box") is None and raw.get("points") is None:
        raise PromptError(f"{where}: needs a \"box\" or \"points\"")
    points, labels = _points(raw.get("points"), raw.get("point_labels"), where)
    box = None
    if raw.get("box") is not None:
        try:
            box = np.asarray(raw["box"], np.float64).reshape(4)
        except (TypeError, ValueError):
            raise PromptError(f"{where}: box must be [x0, y0, x1, y1], got {raw['box']!r}") from None
    ref_mm = None
    if world:
        ref_mm = points[0] if points is not None else (box[:2] + box[2:]) / 2
        z_mm = float(raw["slice"])
        k = _slice_from_world(affine, z_mm, ref_mm, where)
        if points is not None:
            points = _xy_from_world(affine, points, z_mm)
        if box is not None:
            c = _xy_from_world(affine, box.reshape(2, 2), z_mm)
            box = np.concatenate([c.min(axis=0), c.max(axis=0)])
    else:
        k = _int(raw["slice"], f"{where}: slice")
    _check_slice(k, nz, where)
    if points is not None:
        _check_xy(points, shape, where, "point")
    if box is not None:
        _check_xy(box.reshape(2, 2), shape, where, "box corner")
        if box[0] > box[2] or box[1] > box[3]:
            raise PromptError(f"{where}: box {box.tolist()} must have x0 <= x1 and y0 <= y1")
    if raw.get("bounds") is None:
        lo, hi = 0, nz - 1
    else:
        b = raw["bounds"]
        if not isinstance(b, (list, tuple)) or len(b) != 2:
            raise PromptError(f"{where}: bounds must be [lo, hi], got {b!r}")
        if world:
            if float(b[0]) > float(b[1]):
                raise PromptError(f"{where}: bounds LO={b[0]} mm > HI={b[1]} mm; give the bottom (inferior) z first")
            lo, hi = sorted(_slice_from_world(affine, float(v), ref_mm, where) for v in b)
        else:
            lo, hi = _int(b[0], f"{where}: bounds lo"), _int(b[1], f"{where}: bounds hi")
        _check_slice(lo, nz, where, "bound lo")
        _check_slice(hi, nz, where, "bound hi")
        if lo > hi:
            raise PromptError(f"{where}: bounds LO={lo} > HI={hi}; give the bottom slice first")
    if not lo <= k <= hi:
        raise PromptError(f"{where}: the prompted slice {k} is outside the bounds {lo}..{hi}")
    propagation = raw.get("propagation", default_propagation)
    if propagation not in ("mask", "box"):
        raise PromptError(f"{where}: propagation must be \"mask\" or \"box\", got {propagation!r}")
    label = raw.get("label", index + 1)
    label = _int(label, f"{where}: label")
    if not 1 <= label <= 65535:
        raise PromptError(f"{where}: label must lie in 1..65535, got {label}")
    ref = raw.get("reference_label")
    ref = None if ref is None else _int(ref, f"{where}: reference_label")
    edits = []
    for j, e in enumerate(raw.get("edits") or []):
        ew = f"{where}, edit {j + 1}"
        if not isinstance(e, dict):
            raise PromptError(f"{ew}: must be a JSON object")
        unknown = sorted(set(e) - EDIT_KEYS)
        if unknown:
            raise PromptError(f"{ew}: unknown keys {unknown} (allowed: {sorted(EDIT_KEYS)})")
        if "slice" not in e or e.get("points") is None:
            raise PromptError(f"{ew}: needs \"slice\" and \"points\"")
        ep, el = _points(e["points"], e.get("point_labels"), ew)
        if world:
            z_mm = float(e["slice"])
            ek = _slice_from_world(affine, z_mm, ep[0], ew)
            ep = _xy_from_world(affine, ep, z_mm)
        else:
            ek = _int(e["slice"], f"{ew}: slice")
        _check_slice(ek, nz, ew)
        if not lo <= ek <= hi:
            raise PromptError(f"{ew}: slice {ek} is outside the object's bounds {lo}..{hi}")
        _check_xy(ep, shape, ew, "point")
        edits.append(Edit(ek, ep, el))
    return ObjectPrompt(label, k, (lo, hi), points, labels, box, propagation, str(raw.get("name", "") or ""), ref, edits)


def parse_prompts(data: Any, shape: Sequence[int], affine, *, world: bool = False) -> list[ObjectPrompt]:
    """Parsed JSON (schema above) -> validated objects. `world=True` forces world coordinates."""
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
                           default_propagation=data.get("propagation", "mask")) for i, o in enumerate(objects)]
    labels = [o.label for o in parsed]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise PromptError(f"several objects share the output label(s) {dup}; give each a distinct \"label\"")
    return parsed


def load_prompts_file(path, shape, affine, *, world: bool = False) -> list[ObjectPrompt]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PromptError(f"prompts file {path} is not valid JSON: {e}") from e
    try:
        return parse_prompts(data, shape, affine, world=world)
    except PromptError as e:
        raise PromptError(f"{path}: {e}") from None
