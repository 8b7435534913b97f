"""The record of one evaluation, kept in its --out folder while it runs.

A benchmark over a whole dataset runs for hours. Its record lets a run stopped by Ctrl-C, a
preemption or a crash continue where it stopped (the same command again; once finished, nothing is
evaluated again), and lets the shards of one run (`radsam evaluate --shard I/N`, one process, GPU or
host each) merge into one report (`radsam report`).

- run.json: the run's identity (what decides its scores: the model's config and weights, the cases
  and their structures, settings, edits, seed, ...), its shard, what the report prints (model name,
  data path, intensity window), the input paths it started with, and the code that wrote it
  (`code_fingerprint` of each invocation; continuing with other code is warned about, not refused).
  Written when the run starts, updated when it continues.
- objects.jsonl: one JSON line per finished object (its score rows), per skipped object, per pass
  over a case (timing), per case read (its files' sizes, times and sha256: a case whose files
  changed since is refused, as its kept scores are not those of the files now), and
  {"complete": true} at the end; each appended, flushed and synced when it happens. A torn last
  line (killed while writing) is dropped when the record is read.
- worst_cases.npz: the worst objects so far with their slices, for the montage; replaced atomically
  when that set changes.
- run.lock: flock-ed by the process writing the record, so that no two processes write into it.

An object is the unit: one stopped half-way is evaluated again from its start, and as its simulated
user is seeded by (seed, case, structure, setting), a continued run gives the rows an uninterrupted
one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

RUN_FILE, OBJECTS_FILE, WORST_FILE = "run.json", "objects.jsonl", "worst_cases.npz"
RECORD_FILES = (RUN_FILE, OBJECTS_FILE, WORST_FILE)
LOCK_FILE = "run.lock"
RECORD_FORMAT = 1


class RecordError(ValueError):
    """A record that cannot be continued or merged: another run's, damaged or unfinished."""


@dataclasses.dataclass
class WorstCase:
    dice: float
    case: str
    structure: str
    setting: str
    edits: int
    slice: int
    image: np.ndarray  # 2D, in the units of the run's intensity (HU for CT; rows = y, columns = x)
    gt: np.ndarray
    pred: np.ndarray
    spacing: tuple  # (x, y) mm
    order: tuple = ()  # (case index, structure index, setting index): breaks ties between equal Dice


@dataclasses.dataclass
class EvalResult:
    rows: list
    worst: list
    timings: list  # per case: {"case", "slices", "encoded", "encode_s", "total_s", "objects"}
    skipped: list  # (case, structure, reason)
    missing_structures: list = dataclasses.field(default_factory=list)  # requested, found in no case


def keep_worst(candidates: Sequence[WorstCase], count: int) -> list[WorstCase]:
    """The `count` lowest-Dice objects, ties to the later `order`, listed by Dice then order: the
    same set whether they were found in one run, in a continued one or across shards."""
    kept = sorted(candidates, key=lambda w: (-w.dice, w.order), reverse=True)[:count]
    return sorted(kept, key=lambda w: (w.dice, w.order))


# Model config fields and run identity entries added after run records existed, with the value every
# run had before: left out at that value, so records written before can still be continued and merged.
_LATER_DEFAULTS = {"intensity": "hu"}


def without_later_defaults(values: dict) -> dict:
    """`values` without the entries added after run records existed that hold the value every run had
    before (_LATER_DEFAULTS): model configs and run identities then hash and compare as they did."""
    return {k: v for k, v in values.items() if _LATER_DEFAULTS.get(k, object()) != v}


def model_fingerprint(model) -> str:
    """sha256 of a RadSam's config and variables: equal for the same weights wherever they are stored."""
    import jax

    config = without_later_defaults(dataclasses.asdict(model.config))
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(model.variables)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def code_fingerprint() -> str:
    """sha256 of radsam_jax's Python files: a run continued after they changed mixes two versions' scores."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(f"{path.relative_to(package).as_posix()}\n".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def _write_json(path: Path, data) -> None:
    from radsam_jax.io import write_text_atomically

    write_text_atomically(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _shown(value) -> str:
    text = json.dumps(value, default=_json_default)
    return text if len(text) <= 60 else text[:57] + "..."


def identity_difference(there: dict, here: dict) -> Optional[str]:
    """The first identity entry in which two runs differ, in words; None when they are the same run."""
    for key in dict.fromkeys([*there, *here]):
        a, b = there.get(key), here.get(key)
        if a == b:
            continue
        if key == "cases" and isinstance(a, list) and isinstance(b, list):
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            at = lambda cases: _shown(cases[first]) if first < len(cases) else "nothing"
            return f"its cases differ ({len(a)} there, {len(b)} here; case {first}: {at(a)} there, {at(b)} here)"
        return f"{key} {_shown(a)} there, {_shown(b)} here"
    return None


class RunRecord:
    """What an evaluation has done: the score rows of finished objects, skipped objects, timings and
    the worst objects, kept in `folder` (None: in memory only). `run` is run.json's content."""

    def __init__(self, folder=None, run: Optional[dict] = None):
        self.folder = None if folder is None else Path(folder)
        self.run = run or {}
        self.rows, self.skipped, self.timings, self.worst = [], [], [], []
        self.case_files = {}  # case -> {"files": [[path, size, mtime_ns], ...], "sha256": of their bytes}
        self.complete = False
        self._finished = set()  # (case, structure) of every finished or skipped object
        self._valid_bytes = 0  # length of objects.jsonl up to its last whole line
        self._lock = None

    # ------------------------------------------------------------------------------ opening

    @classmethod
    def open(cls, folder, run: dict, *, restart: bool = False) -> "RunRecord":
        """The record of the run `run` ({"identity", "shard", "report", "code_sha256": [hash],
        "inputs"}) in `folder`, held with an exclusive lock on folder/run.lock until `close`:

        - the folder's own if it holds this run's: to continue a stopped run, or a finished one (its
          objects are all done, also if other code finished it: evaluating it again needs restart);
          a stopped one adds this code's hash to its "code_sha256" list; "inputs" stay those it started with;
        - a new one if the folder holds no record, an empty one, or with restart (which deletes the
          old one first); report files there go with it (they are another run's).
        RecordError when another process holds the lock, or the folder holds another run's record
        with something in it (a stopped run, or a finished shard: hours of work)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lock = _lock(folder)
        try:
            record = cls._open(folder, run, restart)
        except BaseException:
            lock.close()
            raise
        record._lock = lock
        return record

    @classmethod
    def _open(cls, folder: Path, run: dict, restart: bool) -> "RunRecord":
        if restart:
            for name in RECORD_FILES:
                (folder / name).unlink(missing_ok=True)
        if not (folder / RUN_FILE).exists():
            stray = [name for name in (OBJECTS_FILE, WORST_FILE) if (folder / name).exists()]
            if stray:
                raise RecordError(f"{folder} has {' and '.join(stray)} but no {RUN_FILE}, so whose run they record is "
                                  f"unknown; --restart discards them")
            return cls._new(folder, run)
        record = cls.load(folder)
        if not (record.rows or record.skipped or record.timings):
            return cls._new(folder, run)  # e.g. a run that stopped on bad input at once: nothing to lose
        problem = identity_difference(record.run.get("identity", {}), run["identity"])
        if problem is None and record.run.get("shard") != run["shard"]:
            problem = f"it is shard {_shard_text(record.run.get('shard'))}, this run is shard {_shard_text(run['shard'])}"
        if problem:
            raise RecordError(f"{folder} holds the record of another evaluation ({RUN_FILE}): {problem}; "
                              f"use another --out, or --restart to discard that record")
        codes, current = list(record.run.get("code_sha256") or []), list(run.get("code_sha256") or [])
        objects = folder / OBJECTS_FILE
        if objects.exists() and record._valid_bytes < objects.stat().st_size:
            os.truncate(objects, record._valid_bytes)  # the torn line of a killed run
        if not record.complete:  # the code of every invocation that evaluates into it
            codes += [c for c in current if c not in codes]
        record.run = {**record.run, "report": run["report"], "code_sha256": codes}  # report: this invocation's name, paths
        _write_json(folder / RUN_FILE, record.run)
        return record

    @classmethod
    def _new(cls, folder: Path, run: dict) -> "RunRecord":
        from radsam_jax.evaluate.report import remove_report

        remove_report(folder)  # a report there (an earlier run's, a merge's) would pass for this run's
        for name in RECORD_FILES:
            (folder / name).unlink(missing_ok=True)
        record = cls(folder, {"format": RECORD_FORMAT, **run})
        _write_json(folder / RUN_FILE, record.run)
        (folder / OBJECTS_FILE).touch()
        return record

    def close(self) -> None:
        """Releases the folder's lock (also released when the process ends, however it ends)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "RunRecord":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @classmethod
    def load(cls, folder) -> "RunRecord":
        """Reads the record in `folder`; RecordError naming the file and line of anything damaged."""
        folder = Path(folder)
        path = folder / RUN_FILE
        if not path.is_file():
            raise RecordError(f"{folder} holds no evaluation record: {RUN_FILE} is missing")
        try:
            run = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise RecordError(f"{path} is not JSON: {e}") from None
        if not isinstance(run, dict) or run.get("format") != RECORD_FORMAT or "identity" not in run:
            raise RecordError(f"{path} is not a radsam evaluation record of format {RECORD_FORMAT}")
        record = cls(folder, run)
        record._read_objects(folder / OBJECTS_FILE)
        record._read_worst(folder / WORST_FILE)
        return record

    def _read_objects(self, path: Path) -> None:
        if not path.exists():
            return
        data = path.read_bytes()
        *lines, tail = data.split(b"\n")  # `tail`: after the last newline, empty unless a write was torn
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path} line {number} is not JSON ({e}); --restart discards the record") from None
            try:
                self._apply(entry)
            except RecordError as e:
                raise RecordError(f"{path} line {number}: {e}") from None
            except (AttributeError, KeyError, TypeError, ValueError):
                raise RecordError(f"{path} line {number} is not a record entry: {_shown(entry)}") from None
        self._valid_bytes = len(data) - len(tail)

    def _apply(self, entry: dict) -> None:
        if len(entry) != 1:
            raise ValueError(f"one entry per line, got {len(entry)}")
        if "object" in entry or "skipped" in entry:
            obj = entry.get("object")
            case, structure, reason = (obj["case"], obj["structure"], None) if obj else entry["skipped"]
            if (case, structure) in self._finished:  # two processes in one folder, or a bug: never count it twice
                raise RecordError(f"{case}:{structure} is recorded a second time")
            if obj:
                self.rows.extend(obj["rows"])
            else:
                self.skipped.append((case, structure, reason))
            self._finished.add((case, structure))
        elif "timing" in entry:
            self.timings.append(entry["timing"])
        elif "case_files" in entry:
            files = entry["case_files"]
            self.case_files[files["case"]] = {"files": files["files"], "sha256": files["sha256"]}
        elif entry.keys() == {"complete"}:
            self.complete = bool(entry["complete"])
        else:
            raise ValueError(f"unknown entry {list(entry)}")

    def _read_worst(self, path: Path) -> None:
        if not path.exists():
            return
        try:
            with np.load(path, allow_pickle=False) as npz:
                meta = json.loads(str(npz["meta"]))
                worst = [WorstCase(m["dice"], m["case"], m["structure"], m["setting"], m["edits"], m["slice"],
                                   npz[f"image_{i}"], npz[f"gt_{i}"], npz[f"pred_{i}"], tuple(m["spacing"]), tuple(m["order"]))
                         for i, m in enumerate(meta)]
        except Exception as e:  # numpy, zipfile and the OS raise many kinds for a damaged file
            raise RecordError(f"{path} cannot be read ({type(e).__name__}: {e}); delete it to keep the scores and lose "
                              f"only the worst objects found so far (the montage), or --restart") from None
        # An object's candidates are saved just before the object's rows; those of an object whose rows
        # never came are dropped (the object runs again and offers them again).
        self.worst = [w for w in worst if (w.case, w.structure) in self._finished]

    # ------------------------------------------------------------------------------ recording

    def finished(self) -> set:
        """(case, structure) of every object finished or skipped."""
        return set(self._finished)

    def _append(self, entry: dict) -> None:
        self._apply(entry)
        if self.folder is None:
            return
        with open(self.folder / OBJECTS_FILE, "a") as f:
            f.write(json.dumps(entry, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_object(self, case: str, structure: str, rows: Sequence[dict]) -> None:
        self._append({"object": {"case": case, "structure": structure, "rows": list(rows)}})

    def add_skipped(self, case: str, structure: str, reason: str) -> None:
        self._append({"skipped": [case, structure, reason]})

    def add_timing(self, timing: dict) -> None:
        self._append({"timing": timing})

    def add_case_files(self, case: str, content: dict) -> None:
        """What the case's files were when it was read (runner.case_content); the latest one counts."""
        self._append({"case_files": {"case": case, **content}})

    def mark_complete(self) -> None:
        self._append({"complete": True})

    def set_worst(self, worst: Sequence[WorstCase]) -> None:
        """Replaces the kept worst objects (call before `add_object` of the object that changed them)."""
        self.worst = list(worst)
        if self.folder is None:
            return
        from radsam_jax.io import write_atomically

        meta = [{"dice": w.dice, "case": w.case, "structure": w.structure, "setting": w.setting, "edits": w.edits,
                 "slice": w.slice, "spacing": list(w.spacing), "order": list(w.order)} for w in self.worst]
        arrays = {"meta": np.array(json.dumps(meta, default=_json_default))}
        for i, w in enumerate(self.worst):
            arrays.update({f"image_{i}": w.image, f"gt_{i}": w.gt, f"pred_{i}": w.pred})

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        write_atomically(self.folder / WORST_FILE, write)

    # ------------------------------------------------------------------------------ results

    def result(self, requested: Sequence[str] = ()) -> EvalResult:
        """The rows, the worst objects (kept count: identity "worst"), timings summed per case, the
        skipped objects, and, once complete, the requested structures that no object was evaluated
        for (before, they may just not have been reached). Rows, skipped objects and timings in the
        order of the run's cases, whatever order they finished in (shards, a case left for later)."""
        case_index = {c[0]: i for i, c in enumerate(self.run.get("identity", {}).get("cases", []))}
        by_case = lambda case: case_index.get(case, -1)
        rows = sorted(self.rows, key=lambda row: by_case(row["case"]))
        skipped = sorted(self.skipped, key=lambda s: by_case(s[0]))
        timings = {}
        for t in sorted(self.timings, key=lambda t: by_case(t["case"])):
            if t["case"] in timings:
                seen = timings[t["case"]]
                for key in ("encoded", "encode_s", "total_s", "objects"):
                    seen[key] += t[key]
            else:
                timings[t["case"]] = dict(t)
        # Present: evaluated, or skipped by an option (--min-slices) rather than for having no voxel.
        present = {r["structure"] for r in self.rows} | {s for _, s, why in self.skipped if why != "absent"}
        count = self.run.get("identity", {}).get("worst", len(self.worst))
        missing = [name for name in requested if name not in present] if self.complete else []
        return EvalResult(rows, keep_worst(self.worst, count), list(timings.values()), skipped, missing)


def _lock(folder: Path):
    """An open file on folder/run.lock holding an exclusive flock (io.lock_exclusively): two
    processes never write into one record."""
    from radsam_jax.io import lock_exclusively

    handle = lock_exclusively(folder / LOCK_FILE)
    if handle is None:
        raise RecordError(f"another process is evaluating into {folder} ({LOCK_FILE} is locked): wait for it to end, "
                          f"or give this one another --out")
    return handle


def _shard_text(shard) -> str:
    return f"{shard[0]}/{shard[1]}" if isinstance(shard, (list, tuple)) and len(shard) == 2 else str(shard)


def merge_records(records: Sequence[RunRecord], *, partial: bool = False) -> RunRecord:
    """One in-memory record of a whole run from its records: one unsharded run, or every shard of one
    run exactly once, each complete (partial: shards unfinished or not started may be among them or
    missing); its `result` orders the rows by the run's cases, as one process writes them."""
    if not records:
        raise RecordError("no evaluation record to report")
    first = records[0]
    where = lambda r: str(r.folder)
    for r in records[1:]:
        problem = identity_difference(first.run["identity"], r.run["identity"])
        if problem:
            raise RecordError(f"{where(r)} and {where(first)} record different evaluations: {problem}")
    shards = {}
    for r in records:
        shard = tuple(r.run.get("shard", (0, 1)))
        if shard[1] != first.run.get("shard", [0, 1])[1]:
            raise RecordError(f"{where(r)} is shard {_shard_text(shard)} but {where(first)} is shard "
                              f"{_shard_text(first.run.get('shard'))}: shards of one run share their count")
        if shard in shards:
            raise RecordError(f"{where(r)} and {where(shards[shard])} are both shard {_shard_text(shard)}")
        shards[shard] = r
    count = first.run.get("shard", [0, 1])[1]
    missing = [f"{i}/{count}" for i in range(count) if (i, count) not in shards]
    if missing and not partial:
        raise RecordError(f"shard(s) {', '.join(missing)} of this {count}-shard run are not among the records given "
                          f"(--partial reports without them)")
    unfinished = [where(r) for r in records if not r.complete]
    if unfinished and not partial:
        raise RecordError(f"unfinished evaluation record(s): {', '.join(unfinished)}; run the same "
                          f"`radsam evaluate` command there again to finish (or --partial for a report so far)")
    merged = RunRecord(None, {**first.run, "shard": [0, 1]})
    ordered = sorted(records, key=lambda r: r.run.get("shard", [0, 1])[0])
    merged.rows = [row for r in ordered for row in r.rows]
    merged.skipped = [s for r in ordered for s in r.skipped]
    merged.timings = [t for r in ordered for t in r.timings]
    merged.worst = [w for r in ordered for w in r.worst]
    merged._finished = set().union(*(r._finished for r in records))
    merged.complete = not (unfinished or missing)
    return merged
