"""Tiny synthetic datasets in the AMOS, TotalSegmentator and generic layouts (written to tmp_path)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (40, 32, 12)


def _affine(flip_x=False):
    a = np.diag([1.5, 1.5, 3.0, 1.0])
    if flip_x:  # an L,A,S file: the readers must still index slices in RAS
        a[0, 0] = -1.5
        a[0, 3] = 1.5 * (SHAPE[0] - 1)
    return a


def synthetic_case(seed: int, shape=SHAPE):
    """(HU int16 volume, labels uint8): an 'organ' 1 (ellipsoid), a 'bone' 2 (a box), background -1000."""
    rng = np.random.default_rng(seed)
    x, y, z = np.mgrid[0: shape[0], 0: shape[1], 0: shape[2]]
    cx, cy = shape[0] / 2 + rng.uniform(-3, 3), shape[1] / 2 + rng.uniform(-3, 3)
    organ = ((x - cx) / 10) ** 2 + ((y - cy) / 7) ** 2 + ((z - shape[2] / 2) / 4) ** 2 <= 1
    bone = (x >= 4) & (x < 9) & (y >= 20) & (y < 26) & (z >= 2) & (z < 10)
    labels = np.zeros(shape, np.uint8)
    labels[organ] = 1
    labels[bone] = 2
    hu = np.full(shape, -1000, np.int16)
    hu[organ] = 60
    hu[bone] = 700
    hu = (hu + rng.normal(0, 5, shape)).astype(np.int16)
    return hu, labels


def _save(path: Path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def write_amos(root: Path, train=(1, 2, 3, 501), val=(4,)):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ", "2": "bone"}}))
    for folder, numbers in (("Tr", train), ("Va", val)):
        for n in numbers:
            hu, labels = synthetic_case(n)
            _save(root / f"images{folder}" / f"amos_{n:04d}.nii.gz", hu, _affine(flip_x=n % 2 == 0))
            _save(root / f"labels{folder}" / f"amos_{n:04d}.nii.gz", labels, _affine(flip_x=n % 2 == 0))
    return root


def write_totalsegmentator(root: Path, splits=None, delimiter=";"):
    splits = splits or {"s0001": "train", "s0002": "train", "s0003": "val", "s0004": "test"}
    root.mkdir(parents=True, exist_ok=True)
    lines = [delimiter.join(["image_id", "age", "split"])]
    for i, (sid, split) in enumerate(sorted(splits.items())):
        hu, labels = synthetic_case(10 + i)
        _save(root / sid / "ct.nii.gz", hu, _affine())
        _save(root / sid / "segmentations" / "liver.nii.gz", (labels == 1).astype(np.uint8), _affine())
        _save(root / sid / "segmentations" / "vertebrae_L1.nii.gz", (labels == 2).astype(np.uint8), _affine())
        lines.append(delimiter.join([sid, "50", split]))
    (root / "meta.csv").write_text("\n".join(lines) + "\n")
    return root


def write_generic(root: Path, case_ids=("a", "b")):
    for i, cid in enumerate(case_ids):
        hu, labels = synthetic_case(20 + i)
        _save(root / cid / "ct.nii.gz", hu, _affine())
        _save(root / cid / "labels.nii.gz", labels, _affine())
        (root / cid / "labels.json").write_text(json.dumps({"label_map": {"1": "organ", "2": "bone", "3": "absent"}}))
    return root
