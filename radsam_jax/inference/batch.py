"""Offline inference over many volumes (`radsam segment-batch`) and the per-volume routine it shares
with `radsam segment`.

Manifest: a CSV with a header row holding `image` and `prompts` columns (optional `id`), or a JSON
list of {"image": ..., "prompts": ..., "id": ...} objects or of [image, prompts] pairs. Relative
paths are taken from the manifest's folder. Case i is written to OUT_DIR/<id>.nii.gz, where id
defaults to the image's file name without .nii/.nii.gz (a DICOM folder: its name).

One `VolumePredictor` serves every case, so its compiled functions (bucketed shapes) are reused; the
next case is read and its prompts validated in a background thread while the current one runs. Each
prompts file is read once, before anything runs (`ManifestCase.prompts_file`: the output check and
the run use it), each drawn mask once per case, when the case is read; a case's record holds the
hashes of the bytes it was made from. A
failing case is reported and skipped; a re-run skips cases whose output already exists (outputs are
written atomically, and a case's mask last, so an existing mask is a finished case; one whose prompts
file changed since is segmented again, and masks recorded with other settings (model, dtype, window,
intensity, vanish policy, --world) are refused: `batch_settings`). Ids must be plain
file names; an output that would replace an input (an image in OUT_DIR named <id>.nii.gz, the
manifest, ...) is refused before anything runs. A summary is printed and written to
OUT_DIR/segment-batch-summary.json after every case (with the records of cases done by earlier runs,
and "complete": false until the run ends); the exit status is 1 if any case failed. With --shard I/N a process
segments cases I, I+N, ... and writes segment-batch-summary-I-of-N.json, so N processes (GPUs, hosts)
share one manifest and one OUT_DIR.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from radsam_jax.inference.prompt_file import ObjectPrompt, PromptsFile, drawn_mask, read_drawn_masks
from radsam_jax.io import nifti_stem, read_ahead


def voxel_ml(volume) -> float:
    """The volume of one voxel of `volume` in mL: |det| of the affine's 3x3 part in mm^3, which the
    product of the spacings overstates on sheared grids (gantry-tilted CT)."""
    return abs(float(np.linalg.det(np.asarray(volume.affine, np.float64)[:3, :3]))) / 1000.0


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
                                   bounds=obj.bounds, propagation=obj.propagation, progress=progress,
                                   mask=None if obj.mask_file is None else drawn_mask(obj, volume))
        for e in obj.edits:
            result = predictor.edit(e.slice, e.points, e.point_labels)
        labels[result.mask > 0] = obj.label
        results.append(result)
    return labels, results


@dataclasses.dataclass
class ManifestCase:
    """One row of a segment-batch manifest (not a dataset's `datasets.Case`)."""

    id: str
    image: Path
    prompts: Path

    @functools.cached_property
    def prompts_file(self) -> PromptsFile:
        """The prompts file as read, once: by `check_out_dir` (its drawn masks' paths), then for the
        run (its objects and hash)."""
        return PromptsFile.read(self.prompts)


def _case_cell(value, path, where: str, key: str) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"manifest {path}, {where}: empty or missing \"{key}\"")
    if not isinstance(value, str):
        raise ValueError(f"manifest {path}, {where}: \"{key}\" must be a path (a string), got {value!r}")
    return value.strip()


def read_manifest(path) -> list[ManifestCase]:
    """Manifest (CSV or JSON, see module docstring) -> cases; raises ValueError naming the problem
    (and the row: "line N" of a CSV, "case N" of a JSON list)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    base = path.parent
    rows = []  # (where, id or None, image, prompts)
    try:
        if path.suffix.lower() == ".json":
            from radsam_jax.io import read_json

            data = read_json(path, "manifest")
            if not isinstance(data, list):
                raise ValueError(f"manifest {path} must be a JSON list of cases")
            for i, item in enumerate(data):
                if isinstance(item, dict) and "image" in item and "prompts" in item:
                    rows.append((f"case {i + 1}", item.get("id"), item["image"], item["prompts"]))
                elif isinstance(item, (list, tuple)) and len(item) == 2:
                    rows.append((f"case {i + 1}", None, item[0], item[1]))
                else:
                    raise ValueError(f"manifest {path}, case {i + 1}: expected {{\"image\", \"prompts\"}} or [image, prompts], got {item!r}")
        else:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                fields = set(reader.fieldnames or [])
                if not {"image", "prompts"} <= fields:
                    raise ValueError(f"manifest {path} needs a header row with columns image,prompts[,id]; got {sorted(fields)}")
                for row in reader:
                    where = f"line {reader.line_num}"
                    if None in row:  # DictReader's key for cells beyond the header
                        raise ValueError(f"manifest {path}, {where}: more cells than the header's {len(reader.fieldnames)}")
                    rows.append((where, row.get("id"), row["image"], row["prompts"]))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"cannot read manifest {path}: {e}") from e
    if not rows:
        raise ValueError(f"manifest {path} lists no cases")
    cases, first_seen = [], {}
    for where, cid, image, prompts in rows:
        image = Path(_case_cell(image, path, where, "image"))
        prompts = Path(_case_cell(prompts, path, where, "prompts"))
        image = image if image.is_absolute() else base / image
        prompts = prompts if prompts.is_absolute() else base / prompts
        if isinstance(cid, str):
            cid = cid.strip() or None
        elif cid is not None and (isinstance(cid, bool) or not isinstance(cid, int)):
            raise ValueError(f"manifest {path}, {where}: \"id\" must be a string, got {cid!r}")
        cid = nifti_stem(image.name) if cid is None else str(cid)
        # The id names the output file in --out-dir: no folder part may take it elsewhere.
        if cid in ("", ".", "..") or any(sep in cid for sep in ("/", "\\", "\0")):
            raise ValueError(f"manifest {path}, {where}: id {cid!r} must be a plain file name (no /, \\ or ..)")
        if cid in first_seen:
            raise ValueError(
                f"manifest {path}: {first_seen[cid]} and {where} both have id {cid!r} (output {cid}.nii.gz); "
                f"give each case a distinct \"id\""
            )
        first_seen[cid] = where
        cases.append(ManifestCase(cid, image, prompts))
    return cases


SUMMARY_NAME = "segment-batch-summary.json"


def summary_name(shard: tuple[int, int] = (0, 1)) -> str:
    """segment-batch-summary.json, or segment-batch-summary-I-of-N.json for shard I/N: shards sharing
    an --out-dir each keep their own."""
    return SUMMARY_NAME if shard[1] == 1 else SUMMARY_NAME.replace(".json", f"-{shard[0]}-of-{shard[1]}.json")


def check_out_dir(cases: Sequence[ManifestCase], out_dir, *, previews: bool = False, manifest=None,
                  shard: tuple[int, int] = (0, 1)) -> None:
    """Raises ValueError unless every output can be written without destroying anything: --out-dir
    is (or can be made) a folder, no output is a folder, and no output is an input of any case (e.g.
    an image in --out-dir whose id is its own name, a drawn mask that is a case's earlier output) or the
    manifest. Run
    before the model loads; every case is checked, also those of other shards."""
    from radsam_jax.data.datasets import select_shard
    from radsam_jax.io import check_output_path, check_outputs_spare_inputs

    select_shard(cases, shard)  # a well-formed shard, maybe empty (more shards than cases: nothing to do)
    out_dir = check_output_path(out_dir, "--out-dir", folder=True)
    outputs = [("segment-batch summary", out_dir / summary_name(shard))]
    for c in cases:
        outputs.append((f"the output of case {c.id!r}", out_dir / f"{c.id}.nii.gz"))
        if previews:
            outputs.append((f"the preview of case {c.id!r}", out_dir / f"{c.id}.png"))
    for what, out in outputs:  # all in out_dir, whose files were tried above: each only for what is in the way
        check_output_path(out, what, probe=False)
    inputs = [(f"image of case {c.id!r}", c.image) for c in cases] + [(f"prompts file of case {c.id!r}", c.prompts) for c in cases]
    inputs += [(f"drawn mask of case {c.id!r}", m) for c in cases for m in c.prompts_file.mask_paths()]
    if manifest is not None:
        inputs.append(("manifest", manifest))
    check_outputs_spare_inputs(outputs, inputs)


def _load_case(case: ManifestCase, world: bool, max_points: int):
    """(volume, objects with their drawn masks read, the hashes of the prompt files as read: `_hashes`).
    The prompts file was read before the run (`ManifestCase.prompts_file`), each drawn mask is read
    here, once: each hash is that of the bytes the case is made from."""
    from radsam_jax.io import load_volume

    volume = load_volume(case.image)
    objects = case.prompts_file.objects(volume.array.shape, volume.affine, world=world, max_points=max_points)
    return volume, objects, _hashes(case.prompts_file.sha256, read_drawn_masks(objects, volume))


def _hashes(prompts_sha256: Optional[str], masks_sha256: dict) -> dict:
    """A case's record of its prompt files: the prompts file's sha256 and, if it names drawn masks, theirs."""
    return {"prompts_sha256": prompts_sha256, **({"masks_sha256": masks_sha256} if masks_sha256 else {})}


def batch_settings(predictor, world: bool) -> dict:
    """What decides a case's mask besides its image and prompts: masks made under other settings are
    another run's, not to be mixed into this one's --out-dir."""
    from radsam_jax.evaluate.record import model_fingerprint

    return {"model_sha256": model_fingerprint(predictor.model), "dtype": str(predictor.dtype),
            "intensity": predictor.intensity, "window": [float(v) for v in predictor.window],
            "vanish_policy": predictor.vanish_policy, "world": bool(world)}


def _file_sha256(path: Path) -> Optional[str]:
    """sha256 of the file's bytes; None if it cannot be read (a prompts file removed since)."""
    from radsam_jax.io import file_sha256

    try:
        return file_sha256(path)
    except OSError:
        return None


def _earlier_records(out_dir: Path, shard: tuple[int, int]) -> dict:
    """The done records of every segment-batch summary in out_dir by case id (another shard count's
    too); this shard's own summary wins where two hold the same case."""
    own = out_dir / summary_name(shard)
    paths = sorted(out_dir.glob(SUMMARY_NAME.replace(".json", "*.json")), key=lambda path: path == own)
    records = {}
    for path in paths:
        try:
            records.update({r["id"]: r for r in json.loads(path.read_text()).get("done", [])})
        except (json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a segment-batch summary ({type(e).__name__}: {e}); move it away") from None
    return records


def _check_settings(out_dir: Path, records: dict, existing: list[str], settings: dict) -> None:
    """ValueError when a mask in out_dir is recorded with other settings than this run's: one folder
    does not mix two runs' masks (masks whose record predates recorded settings cannot be told)."""
    other = [cid for cid in existing if records.get(cid, {}).get("settings") not in (None, settings)]
    if other:
        recorded = records[other[0]]["settings"]
        changed = "; ".join(f"{k} {recorded.get(k)!r} there, {settings.get(k)!r} here"
                            for k in settings if recorded.get(k) != settings.get(k))
        raise ValueError(f"{out_dir} holds masks made with other settings ({changed}; masks of "
                         f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}): use another --out-dir, "
                         f"or remove those masks to segment the cases again")


def run_batch(predictor, cases: Sequence[ManifestCase], out_dir, *, world: bool = False, previews: bool = False,
              log=print, progress: bool = True, shard: tuple[int, int] = (0, 1)) -> dict:
    """Segments every case of `shard` (I, N: cases I, I+N, ...) not yet done; returns the summary dict
    (also written to out_dir, `summary_name(shard)`, after every case: a stopped run keeps its record).

    A case's mask is written last, once everything else for it (its preview) succeeded: an existing
    mask marks the case done on a re-run, unless its record says its prompts file changed since (then
    it is segmented again; the old record stays until the new mask replaces it, so a failed or
    stopped re-run is retried). The summary keeps the records of cases done by earlier runs. Raises
    ValueError (nothing run) where `check_out_dir` does, or when out_dir holds masks recorded with
    other settings (`batch_settings`), or when another process runs the same shard into out_dir
    (segment-batch-summary[-I-of-N].lock)."""
    from radsam_jax.io import lock_exclusively

    out_dir = Path(out_dir)
    check_out_dir(cases, out_dir, previews=previews, shard=shard)
    settings = batch_settings(predictor, world)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_exclusively(out_dir / summary_name(shard).replace(".json", ".lock"))
    if lock is None:
        raise ValueError(f"another segment-batch process writes into {out_dir}"
                         + (f" as shard {shard[0]}/{shard[1]}" if shard[1] > 1 else "")
                         + ": wait for it to end, or give this one another --out-dir (or --shard)")
    with lock:
        return _run_locked(predictor, cases, out_dir, settings, world=world, previews=previews, log=log,
                           progress=progress, shard=shard)


def _run_locked(predictor, cases, out_dir: Path, settings: dict, *, world, previews, log, progress, shard) -> dict:
    from radsam_jax.data.datasets import select_shard

    mine = select_shard(cases, shard)
    existing = [case.id for case in mine if (out_dir / f"{case.id}.nii.gz").exists()]
    records = _earlier_records(out_dir, shard)
    _check_settings(out_dir, records, existing, settings)
    todo, skipped, kept = _triage(mine, set(existing), records, out_dir, log)
    summary = _Summary(out_dir / summary_name(shard), settings, mine, kept, skipped)
    bar = _progress_bar(len(todo)) if progress and todo else None
    for case, read in read_ahead(todo, lambda c: _load_case(c, world, predictor.max_points)):
        try:
            summary.done.append(_run_case(predictor, case, read, out_dir, settings, previews=previews,
                                          earlier=records.get(case.id), log=log))
        except Exception as e:
            summary.failed.append(_failure(case, e, log))
        summary.write(complete=False)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    written = summary.write(complete=True)
    log(f"segment-batch: {len(summary.done)} done, {len(skipped)} skipped (output exists), {len(summary.failed)} failed")
    for f in summary.failed:
        log(f"  failed {f['id']}: {f['error']}")
    return written


def _triage(mine: Sequence[ManifestCase], existing: set, records: dict, out_dir: Path, log):
    """(cases to segment, cases skipped, the earlier records of the cases whose mask exists, by id): a
    case runs unless its mask exists and its record names no prompt file changed since (`_changed`)."""
    todo, skipped, kept = [], [], {}
    for case in mine:
        record = records.get(case.id)
        if case.id not in existing:
            todo.append(case)
            continue
        if record is not None:
            kept[case.id] = record
        changed = _changed(case, record)
        if changed:
            log(f"redo {case.id}: {changed} changed since its mask was written")
            todo.append(case)
        else:
            skipped.append(case)
            log(f"skip {case.id}: {out_dir / (case.id + '.nii.gz')} exists")
    return todo, skipped, kept


def _changed(case: ManifestCase, record: Optional[dict]) -> Optional[str]:
    """Which prompt file of a finished case changed since its record ("its prompts file P", "its
    drawn mask M, ..."), or None. A file removed since (hash None) leaves nothing to compare: the
    mask stands; so does one whose record names no prompts."""
    if record is None or not record.get("prompts_sha256"):
        return None
    if case.prompts_file.sha256 not in (None, record["prompts_sha256"]):
        return f"its prompts file {case.prompts}"
    stale = [m for m, sha in record.get("masks_sha256", {}).items() if _file_sha256(Path(m)) not in (None, sha)]
    return f"its drawn mask {', '.join(stale)}" if stale else None


@dataclasses.dataclass
class _Summary:
    """A run's summary as it goes, written to `path` after every case (`run_batch`)."""

    path: Path
    settings: dict
    mine: Sequence[ManifestCase]  # the shard's cases, in the order records are listed
    kept: dict  # earlier runs' records of the cases whose mask exists, by id
    skipped: list
    done: list = dataclasses.field(default_factory=list)  # this run's records
    failed: list = dataclasses.field(default_factory=list)

    def write(self, complete: bool) -> dict:
        from radsam_jax.io import write_text_atomically

        order = {case.id: i for i, case in enumerate(self.mine)}
        records = {**self.kept, **{r["id"]: r for r in self.done}}
        summary = {"settings": self.settings, "complete": complete,
                   "done": sorted(records.values(), key=lambda r: order[r["id"]]), "skipped": [c.id for c in self.skipped],
                   "failed": self.failed}
        write_text_atomically(self.path, json.dumps(summary, indent=2) + "\n")
        return summary


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="case", file=sys.stderr, desc="segment-batch")


def _run_case(predictor, case: ManifestCase, read, out_dir: Path, settings: dict, *, previews: bool,
              earlier: Optional[dict], log) -> dict:
    """Segments a case once `read` (its `_load_case` reading, io.read_ahead) is done and writes its outputs, the mask
    last; returns its record. Raises what reading or segmenting it raised."""
    from radsam_jax.io import save_label_map

    start = time.perf_counter()
    volume, objects, hashes = read.result()
    labels, _ = segment_objects(predictor, volume, objects)
    preview = out_dir / f"{case.id}.png"
    if previews:
        from radsam_jax.inference.preview import save_predictor_preview

        save_predictor_preview(preview, predictor, labels, objects)
    out = out_dir / f"{case.id}.nii.gz"
    save_label_map(out, labels, like=volume)
    if not previews and (earlier or {}).get("preview"):  # it showed the mask just replaced
        preview.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    counts = np.bincount(labels.ravel(), minlength=max(o.label for o in objects) + 1)  # per label, as written
    log(f"done {case.id}: {len(objects)} object(s), {predictor.num_slices} slices, {seconds:.2f} s -> {out}")
    return {"id": case.id, "output": str(out), "seconds": round(seconds, 3), "objects": len(objects),
            "slices": predictor.num_slices,
            "volumes_ml": {str(o.label): round(int(counts[o.label]) * voxel_ml(volume), 3) for o in objects},
            **hashes, **({"preview": str(preview)} if previews else {}), "settings": settings}


def _failure(case: ManifestCase, error: Exception, log) -> dict:
    """A failed case's record, logged (with the traceback of an unexpected error: call it in the except block)."""
    msg = f"{type(error).__name__}: {error}"
    log(f"FAILED {case.id}: {msg}")
    if not isinstance(error, (ValueError, FileNotFoundError, RuntimeError)):
        traceback.print_exc(file=sys.stderr)
    return {"id": case.id, "image": str(case.image), "prompts": str(case.prompts), "error": msg}
