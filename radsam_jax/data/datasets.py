"""Dataset readers: a folder in a known layout -> a list of `Case`s (paths and structure ids).

Layouts:
- "amos": `dataset.json` ("labels": {"0": "background", "1": "spleen", ...}, or nnU-Net v2's
  {"background": 0, "spleen": 1, ...}), `imagesTr/`+`labelsTr/` (images named like their label
  maps, or nnU-Net's `amos_0001_0000.nii.gz` for `amos_0001.nii.gz`)
  (split "train") and `imagesVa/`+`labelsVa/` (split "val"). Case numbers <= 500 are CT, > 500 MRI
  (`amos_0507.nii.gz` -> 507), selected with `modality` ("CT", "MRI" or "all").
- "totalsegmentator": one folder per subject `sXXXX/` with `ct.nii.gz` and `segmentations/<name>.nii.gz`
  (one binary mask per structure); the split comes from `meta.csv` (column `image_id` and column
  `split` = train/val/test; ';'-separated in the released dataset, ',' accepted too).
- "generic": a case folder, or a folder of case folders, each holding an image (`ct.nii.gz`,
  `image.nii.gz`, another single `*.nii[.gz]`, or a DICOM folder `dicom/`), `labels.nii.gz` and
  `labels.json` with "label_map" {id: name} (the format of shared/data/*/labels.json). An optional
  `splits.json` {"train": [case ids], "val": [...]} in the root assigns splits; without it every
  case belongs to every split (point `root` and `val_root` at different folders instead).

Split "all" returns every case of a layout. Label ids in `Case.structures` are the values in the
case's label map; for TotalSegmentator, where each structure is its own file, ids are assigned
1..N in sorted name order over the whole dataset and `load_case` builds the label map from them.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from radsam_jax import io

log = logging.getLogger(__name__)

FORMATS = ("amos", "totalsegmentator", "generic")
AMOS_CT_MAX_CASE = 500
AMOS_FOLDERS = {"train": (("imagesTr", "labelsTr"),), "val": (("imagesVa", "labelsVa"),)}  # (images, labels)
AMOS_FOLDERS["all"] = AMOS_FOLDERS["train"] + AMOS_FOLDERS["val"]


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """One image with its labels.

    label_path: one integer label map (AMOS, generic); None when structure_paths is used.
    structure_paths: name -> binary mask file (TotalSegmentator); None when label_path is used.
    structures: name -> label id in the (possibly assembled) label map.
    """

    case_id: str
    image_path: str
    structures: dict
    label_path: Optional[str] = None
    structure_paths: Optional[dict] = None
    modality: str = "CT"

    def __post_init__(self):
        if (self.label_path is None) == (self.structure_paths is None):
            raise ValueError(f"case {self.case_id}: give exactly one of label_path and structure_paths")


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if io.is_nifti_path(p.name)) if folder.is_dir() else []


def structure_ids(table, source: str) -> dict[str, int]:
    """{structure name: label id} from a label table, background (0) left out. Two forms: id -> name
    ({"0": "background", "1": "spleen"}: AMOS's dataset.json, labels.json) and name -> id
    ({"background": 0, "spleen": 1}: nnU-Net v2's dataset.json). ValueError naming `source` and the
    entry otherwise: an id that is not an integer >= 0, a name with two ids, an id with two names."""
    if not isinstance(table, dict):
        raise ValueError(f"{source} must be a label table {{\"1\": \"spleen\", ...}}, got {table!r}")
    integer = lambda k: isinstance(k, str) and re.fullmatch(r"\s*-?[0-9]+\s*", k) is not None
    ids_first = any(integer(k) for k in table)
    pairs = []
    for key, value in table.items():
        if ids_first and not integer(key):
            raise ValueError(f"{source}: label id {key!r} (for {value!r}) is not an integer >= 0")
        if not ids_first and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"{source}: the label id of {key!r} is {value!r}, not an integer >= 0 (a label table maps ids "
                             f"to names, {{\"1\": \"spleen\"}}, or names to ids, {{\"spleen\": 1}})")
        name, label = (str(value), int(key)) if ids_first else (str(key), value)
        if label < 0:
            raise ValueError(f"{source}: label id {label} (for {name!r}) is negative")
        pairs.append((name, label))
    structures: dict[str, int] = {}
    named: dict[int, str] = {}
    for name, label in pairs:
        if label == 0:
            continue
        if structures.setdefault(name, label) != label:
            raise ValueError(f"{source}: {name!r} has two label ids, {structures[name]} and {label}")
        if named.setdefault(label, name) != name:
            raise ValueError(f"{source}: label id {label} has two names, {named[label]!r} and {name!r}")
    return structures


# --------------------------------------------------------------------------------------- AMOS


def amos_cases(root, split: str = "train", modality: str = "CT") -> list[Case]:
    """AMOS22 layout. split: "train" (imagesTr), "val" (imagesVa) or "all"; modality: CT, MRI, all."""
    root = Path(root)
    meta_file = root / "dataset.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"AMOS layout needs {meta_file}")
    meta = io.read_json(meta_file)
    if not isinstance(meta, dict) or "labels" not in meta:
        raise ValueError(f"{meta_file} has no 'labels' table")
    structures = structure_ids(meta["labels"], f"{meta_file} 'labels'")
    if not structures:
        raise ValueError(f"{meta_file} has no 'labels' besides background")
    if split not in AMOS_FOLDERS:
        raise ValueError(f"AMOS split must be one of {sorted(AMOS_FOLDERS)}, got {split!r}")
    wanted = {"CT": "CT", "MRI": "MRI", "MR": "MRI", "ALL": "ALL"}.get(str(modality).upper())
    if wanted is None:
        raise ValueError(f"modality must be 'CT', 'MRI' or 'all', got {modality!r}")
    cases = []
    for image_dir, label_dir in AMOS_FOLDERS[split]:
        for image in _nifti_files(root / image_dir):
            case_id = io.nifti_stem(image.name)
            label = root / label_dir / image.name
            channel = re.fullmatch(r"(.+)_\d{4}", case_id)  # nnU-Net names images <case>_0000, labels <case>
            if not label.exists() and channel:
                stripped = root / label_dir / (channel.group(1) + image.name[len(case_id):])
                if stripped.exists():
                    case_id, label = channel.group(1), stripped
            match = re.search(r"(\d+)$", case_id)
            number = int(match.group(1)) if match else 0
            case_modality = "CT" if number <= AMOS_CT_MAX_CASE else "MRI"
            if wanted != "ALL" and case_modality != wanted:
                continue
            if not label.exists():
                raise FileNotFoundError(f"AMOS image {image} has no label map {label}")
            cases.append(Case(case_id, str(image), dict(structures), label_path=str(label), modality=case_modality))
    if not cases:
        raise ValueError(f"no AMOS cases for split={split!r} modality={modality!r} under {root}")
    return cases


# --------------------------------------------------------------------------- TotalSegmentator


def _read_meta_csv(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (a spreadsheet's export) is not a column name
    first = text.splitlines()[0] if text else ""
    delimiter = ";" if first.count(";") >= first.count(",") else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    if not rows or "split" not in rows[0] or "image_id" not in rows[0]:
        raise ValueError(f"{path} needs columns 'image_id' and 'split' (found {list(rows[0]) if rows else []})")
    for line, row in enumerate(rows, start=2):
        if not row["image_id"] or not row["split"]:
            raise ValueError(f"{path} line {line}: no {'image_id' if not row['image_id'] else 'split'} ({row})")
    return {row["image_id"].strip(): row["split"].strip() for row in rows}


def totalsegmentator_cases(root, split: str = "train") -> list[Case]:
    """TotalSegmentator layout (sXXXX/ct.nii.gz + segmentations/*.nii.gz, split from meta.csv)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"TotalSegmentator root not found: {root}")
    subjects = sorted(p for p in root.iterdir() if p.is_dir() and (p / "ct.nii.gz").exists())
    if not subjects:
        raise ValueError(f"no TotalSegmentator cases (folders with ct.nii.gz) under {root}")
    meta_file = root / "meta.csv"
    if split != "all":
        if not meta_file.exists():
            raise FileNotFoundError(f"split {split!r} needs {meta_file} (or use split='all')")
        splits = _read_meta_csv(meta_file)
        valid = sorted(set(splits.values()))
        if split not in valid:
            raise ValueError(f"split {split!r} not in {meta_file} (splits there: {valid})")
    per_subject = {s: {io.nifti_stem(p.name): p for p in _nifti_files(s / "segmentations")} for s in subjects}
    # Ids over every subject, whatever the split: a structure has the same id in train, val and test.
    names = sorted(set().union(*[set(v) for v in per_subject.values()]))
    ids = {name: i + 1 for i, name in enumerate(names)}
    if split != "all":
        per_subject = {s: files for s, files in per_subject.items() if splits.get(s.name) == split}
    cases = []
    for subject, files in per_subject.items():
        if not files:
            log.warning("TotalSegmentator subject %s has no segmentations; skipped", subject)
            continue
        cases.append(
            Case(
                subject.name,
                str(subject / "ct.nii.gz"),
                {n: ids[n] for n in sorted(files)},
                structure_paths={n: str(p) for n, p in sorted(files.items())},
                modality="CT",
            )
        )
    if not cases:
        raise ValueError(f"no TotalSegmentator cases for split {split!r} under {root}")
    return cases


# ------------------------------------------------------------------------------------ generic


def _generic_image(folder: Path) -> Optional[Path]:
    for name in ("ct.nii.gz", "ct.nii", "image.nii.gz", "image.nii"):
        if (folder / name).exists():
            return folder / name
    others = [p for p in _nifti_files(folder) if not p.name.lower().startswith("label")]
    if len(others) == 1:
        return others[0]
    if (folder / "dicom").is_dir():
        return folder / "dicom"
    return None


def _generic_case(folder: Path) -> Case:
    meta = io.read_json(folder / "labels.json")
    if not isinstance(meta, dict) or "label_map" not in meta:
        raise ValueError(f"{folder / 'labels.json'} has no 'label_map' (id -> name)")
    structures = structure_ids(meta["label_map"], f"{folder / 'labels.json'} 'label_map'")
    image = _generic_image(folder)
    if image is None:
        raise ValueError(f"case folder {folder} has no image (ct.nii.gz, image.nii.gz, one *.nii.gz or dicom/)")
    label = next((folder / n for n in ("labels.nii.gz", "labels.nii", "label.nii.gz", "label.nii") if (folder / n).exists()), None)
    if label is None:
        raise ValueError(f"case folder {folder} has labels.json but no labels.nii.gz")
    return Case(folder.name, str(image), structures, label_path=str(label), modality=str(meta.get("modality", "CT")))


def generic_cases(root, split: str = "all") -> list[Case]:
    """Generic layout: `root` is a case folder (labels.json inside) or a folder of case folders."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset root not found: {root}")
    if (root / "labels.json").exists():
        folders = [root]
    else:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / "labels.json").exists())
    if not folders:
        raise ValueError(f"no cases under {root}: expected labels.json in it or in its sub-folders")
    cases = [_generic_case(f) for f in folders]
    splits_file = root / "splits.json"
    if split != "all" and splits_file.exists():
        splits = io.read_json(splits_file)
        if split not in splits:
            raise ValueError(f"split {split!r} not in {splits_file} (has {sorted(splits)})")
        names = list(map(str, splits[split]))
        unknown = sorted(set(names) - {c.case_id for c in cases})
        if unknown:  # a typo would silently shrink the split
            raise ValueError(f"split {split!r} of {splits_file} names {len(unknown)} case(s) not found under {root}: "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} (case folders hold labels.json)")
        cases = [c for c in cases if c.case_id in set(names)]
    return cases


# ----------------------------------------------------------------------------------- dispatch


def layout_problem(format: str, root, split: str = "all") -> Optional[str]:
    """None if `root` looks like a dataset of `format` (one of FORMATS) holding `split`, else what is
    wrong and what was expected: a glance at the top level (no case is read) to check a config before
    any work."""
    pairs = AMOS_FOLDERS.get(split, AMOS_FOLDERS["all"])
    meta = split != "all"  # TotalSegmentator splits come from meta.csv
    expected = {
        "amos": f"an AMOS folder (dataset.json, {' or '.join(f'{i}/ and {l}/' for i, l in pairs)})",
        "totalsegmentator": "a TotalSegmentator folder (subject folders with ct.nii.gz and segmentations/"
                            + (", meta.csv)" if meta else ")"),
        "generic": "a case folder with labels.json, or a folder of them",
    }[format]
    if not root:
        return f"not set; expected {expected}"
    root = Path(root)
    if not root.is_dir():
        return f"{root} {'is a file, not a folder' if root.exists() else 'does not exist'}; expected {expected}"
    if format == "amos":
        found = (root / "dataset.json").is_file() and any((root / i).is_dir() and (root / l).is_dir() for i, l in pairs)
    elif format == "totalsegmentator":
        found = (not meta or (root / "meta.csv").is_file()) and any(
            (s / "ct.nii.gz").is_file() and (s / "segmentations").is_dir() for s in root.iterdir())
    else:
        found = (root / "labels.json").is_file() or any((c / "labels.json").is_file() for c in root.iterdir())
    if not found and format == "amos" and split == "val" and (root / "dataset.json").is_file() and (root / "imagesTr").is_dir():
        return (f"{root} has no imagesVa/ and labelsVa/: nnU-Net's AMOS conversion merges the validation cases into "
                f"imagesTr/: move the cases to validate on into imagesVa/ and labelsVa/ (the AMOS release's layout)")
    return None if found else f"{root} is not {expected}"


def read_cases(
    format: str, root, split: str = "train", *, modality: str = "CT", structures: Optional[Sequence[str]] = None
) -> list[Case]:
    """Cases of one split in a layout ("amos", "totalsegmentator", "generic"), optionally keeping only
    `structures` (names; an unknown name is an error listing the valid ones)."""
    if format == "amos":
        cases = amos_cases(root, split, modality)
    elif format == "totalsegmentator":
        cases = totalsegmentator_cases(root, split)
    elif format == "generic":
        cases = generic_cases(root, split)
    else:
        raise ValueError(f"unknown dataset format {format!r}; expected one of {FORMATS}")
    if structures:
        cases = select_structures(cases, structures)
    return cases


def select_structures(cases: Iterable[Case], names: Sequence[str]) -> list[Case]:
    """Keeps only the named structures in each case; drops cases left with none."""
    cases = list(cases)
    valid = sorted(set().union(*[set(c.structures) for c in cases])) if cases else []
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown structure(s) {unknown}; valid names: {', '.join(valid)}")
    out = []
    for c in cases:
        kept = {n: c.structures[n] for n in names if n in c.structures}
        if not kept:
            continue
        paths = {n: c.structure_paths[n] for n in kept} if c.structure_paths is not None else None
        out.append(dataclasses.replace(c, structures=kept, structure_paths=paths))
    return out


def select_shard(items: Sequence, shard: tuple[int, int]) -> list:
    """Items I, I + N, I + 2N, ... of shard (I, N): how N processes (GPUs, hosts) split a list of cases."""
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise ValueError(f"a shard is I/N with 0 <= I < N, got {index}/{count}")
    return list(items)[index::count]


def case_files(case: Case) -> list[Path]:
    """Every file `load_case` reads the case from, in a fixed order: the image (each file under a
    DICOM series folder), then its label map or its structure masks."""
    image = Path(case.image_path)
    files = ([Path(root) / name for root, folders, names in sorted(os.walk(image)) for name in sorted(names)]
             if image.is_dir() else [image])
    if case.label_path is not None:
        return files + [Path(case.label_path)]
    return files + [Path(case.structure_paths[name]) for name in sorted(case.structure_paths)]


def load_case(case: Case, *, canonical: bool = True) -> tuple[io.Volume, np.ndarray]:
    """(volume, integer label map on the volume's grid), both in RAS voxel order when canonical.

    Labels on a different grid are aligned through world coordinates (io.load_label_map); one that
    does not overlap the image is an error, one that covers only part of it a warning.
    TotalSegmentator masks are combined into one map with the ids of `case.structures`; where masks
    overlap, the later name in sorted order wins, which shrinks the earlier structure's ground truth:
    a warning names the pairs and the voxels taken.
    """
    volume = io.load_volume(case.image_path)
    if case.label_path is not None:
        labels = io.load_label_map(case.label_path, volume)
    else:
        top = max(case.structures.values())
        labels = np.zeros(volume.array.shape, np.uint8 if top < 256 else np.uint16)
        names = {label: name for name, label in case.structures.items()}
        taken = []
        for name, path in sorted(case.structure_paths.items()):
            mask = io.load_label_map(path, volume) > 0
            below = labels[mask]
            for label, count in zip(*np.unique(below[below > 0], return_counts=True)):
                taken.append(f"{name} over {count} voxel(s) of {names[int(label)]}")
            labels[mask] = case.structures[name]
        if taken:
            log.warning("case %s: its structure masks overlap (%s); each of those voxels counts for the later "
                        "name only, in training and in evaluation", case.case_id, "; ".join(taken))
    if canonical:
        labels = io.reorient_labels_like(labels, volume)
        volume = io.to_canonical(volume)
    return volume, labels
