"""Offline inference over many volumes (`radsam segment-batch`) and the per-volume routine it shares
with `radsam segment`.

Manifest: a CSV with a header row holding `image` and `prompts` columns (optional `id`), or a JSON
list of {"image": ..., "prompts": ..., "id": ...} objects or of [image, prompts] pairs. Relative
paths are taken from the manifest's folder. Case i is written to OUT_DIR/<id>.nii.gz, where id
defaults to the image's file name without .nii/.nii.gz (a DICOM folder: its name).

One `VolumePredictor` serves every case, so its compiled functions (bucketed shapes) are reused; the
next case is read and its prompts validated in a background thread while the current one runs. A
failing case is reported and skipped; a re-run skips cases whose output already exists (outputs are
written atomically, so an existing file is complete). A summary is printed and written to
OUT_DIR/segment-batch-summary.json; the exit status is 1 if any case failed.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from radsam_jax.inference.prompt_file import ObjectPrompt, load_prompts_file


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """3D Dice of two binary masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * int((a & b).sum()) / denom


def segment_objects(predictor, volume, objects: Sequence[ObjectPrompt], progress: Optional[Callable[[int], None]] = None):
    """Runs every object (segment, then its edits in order) on `volume`; returns (label map
    (X, Y, Z) uint8/uint16 on the volume's grid, list of per-object VolumeResult). Later objects
    overwrite earlier ones where they overlap."""
    predictor.set_volume(volume)
    max_label = max(o.label for o in objects)
    labels = np.zeros(volume.array.shape, np.uint8 if max_label < 256 else np.uint16)
    results = []
    for obj in objects:
        result = predictor.segment(obj.slice, points=obj.points, point_labels=obj.point_labels, box=obj.box,
                                   bounds=obj.bounds, propagation=obj.propagation, progress=progress)
        for e in obj.edits:
            result = predictor.edit(e.slice, e.points, e.point_labels)
        labels[result.mask > 0] = obj.label
        results.append(result)
    return labels, results


@dataclasses.dataclass
class Case:
    id: str
    image: Path
    prompts: Path


def _case_id(image: Path) -> str:
    name = image.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_manifest(path) -> list[Case]:
    """Manifest (CSV or JSON, see module docstring) -> cases; raises ValueError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    base = path.parent
    rows = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest {path} is not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise ValueError(f"manifest {path} must be a JSON list of cases")
        for i, item in enumerate(data):
            if isinstance(item, dict) and "image" in item and "prompts" in item:
                rows.append((item.get("id"), item["image"], item["prompts"]))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                rows.append((None, item[0], item[1]))
            else:
                raise ValueError(f"manifest {path}, case {i + 1}: expected {{\"image\", \"prompts\"}} or [image, prompts], got {item!r}")
    else:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or [])
            if not {"image", "prompts"} <= fields:
                raise ValueError(f"manifest {path} needs a header row with columns image,prompts[,id]; got {sorted(fields)}")
            for row in reader:
                rows.append((row.get("id") or None, row["image"], row["prompts"]))
    if not rows:
        raise ValueError(f"manifest {path} lists no cases")
    cases = []
    for cid, image, prompts in rows:
        image, prompts = Path(str(image).strip()), Path(str(prompts).strip())
        image = image if image.is_absolute() else base / image
        prompts = prompts if prompts.is_absolute() else base / prompts
        cases.append(Case(str(cid) if cid else _case_id(image), image, prompts))
    ids = [c.id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"manifest {path}: several cases would write the same output {dup}; add an \"id\" column")
    return cases


def _load_case(case: Case, world: bool):
    from radsam_jax.io import load_volume

    volume = load_volume(case.image)
    objects = load_prompts_file(case.prompts, volume.array.shape, volume.affine, world=world)
    return volume, objects


def run_batch(predictor, cases: Sequence[Case], out_dir, *, world: bool = False, previews: bool = False,
              log=print, progress: bool = True) -> dict:
    """Segments every case not yet done; returns the summary dict (also written to out_dir)."""
    from radsam_jax.io import save_label_map

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo, skipped = [], []
    for case in cases:
        (skipped if (out_dir / f"{case.id}.nii.gz").exists() else todo).append(case)
    for case in skipped:
        log(f"skip {case.id}: {out_dir / (case.id + '.nii.gz')} exists")
    done, failed = [], []
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="case", file=sys.stderr, desc="segment-batch")
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="radsam-reader") as reader:
        future = reader.submit(_load_case, todo[0], world) if todo else None
        for i, case in enumerate(todo):
            start = time.perf_counter()
            try:
                volume, objects = future.result()
            except Exception as e:  # reported below; the next case is already being read
                volume = None
                error = e
            # Read the next case while this one runs on the device.
            future = reader.submit(_load_case, todo[i + 1], world) if i + 1 < len(todo) else None
            try:
                if volume is None:
                    raise error
                labels, _ = segment_objects(predictor, volume, objects)
                out = out_dir / f"{case.id}.nii.gz"
                save_label_map(out, labels, like=volume)
                if previews:
                    from radsam_jax.inference.preview import save_preview

                    save_preview(out_dir / f"{case.id}.png", volume.array, labels, objects)
                seconds = time.perf_counter() - start
                done.append({"id": case.id, "output": str(out), "seconds": round(seconds, 3),
                             "objects": len(objects), "slices": int(volume.array.shape[2])})
                log(f"done {case.id}: {len(objects)} object(s), {volume.array.shape[2]} slices, {seconds:.2f} s -> {out}")
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                failed.append({"id": case.id, "image": str(case.image), "prompts": str(case.prompts), "error": msg})
                log(f"FAILED {case.id}: {msg}")
                if not isinstance(e, (ValueError, FileNotFoundError, RuntimeError)):
                    traceback.print_exc(file=sys.stderr)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    summary = {"done": done, "skipped": [c.id for c in skipped], "failed": failed}
    log(f"segment-batch: {len(done)} done, {len(skipped)} skipped (output exists), {len(failed)} failed")
    for f in failed:
        log(f"  failed {f['id']}: {f['error']}")
    tmp = out_dir / ".segment-batch-summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out_dir / "segment-batch-summary.json")
    return summary
