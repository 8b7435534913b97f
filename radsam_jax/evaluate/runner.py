"""The evaluation loop: every case, every structure, every setting, every edit checkpoint.

Per volume the predictor's `set_volume` runs once and the slices an object spans are encoded once
(`encode_slices`, which skips cached slices); every structure, prompt kind, propagation mode, edit
and protocol after that re-uses the cached embeddings, so the image encoder runs at most once per
slice per volume; the next volume is read in a background thread meanwhile (io.read_ahead). Randomness (point prompts, correction clicks, optional box jitter) comes from a
generator seeded by (seed, case, structure, setting), so the same seed gives the same numbers, and
adding a setting or a structure to a run does not change the others. Each finished object goes into
a `RunRecord` (record.py) at once, so a run can continue after a stop and shards of a run merge.
A case that cannot be read (a damaged file, a label map off the image) does not stop the others: they
are evaluated, then `UnreadableCases` names every such case; the same call evaluates them once mended.
A case whose files changed since the record's run evaluated some of its objects (`case_content`) is
refused: its kept scores would be those of other files.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import sys
import time
import zlib
from typing import Callable, Optional, Sequence

import numpy as np

from radsam_jax.evaluate.metrics import dice, oracle_dice
from radsam_jax.evaluate.record import EvalResult, RunRecord, WorstCase
from radsam_jax.evaluate.simulated_user import (
    PROMPT_KINDS, correction_2d, correction_3d, initial_slice, object_bounds, slice_2d, slice_prompt,
)
from radsam_jax.io import read_ahead

PROTOCOLS = ("volume", "slice")
PROPAGATIONS = ("mask", "box")
SLICE_EDITS_MAX = 10  # slice-level: at most 10 correction points per slice (the paper's 10n)


class EvaluationInputError(ValueError):
    """Bad input found while evaluating (e.g. a requested structure absent from every label map)."""


class UnreadableCases(EvaluationInputError):
    """Cases whose files could not be read; `failures` [(case id, message)]. Every other case was
    evaluated and recorded."""

    def __init__(self, failures: list[tuple[str, str]]):
        self.failures = failures
        super().__init__(f"{len(failures)} case(s) could not be read: "
                         + "; ".join(f"{case}: {message}" for case, message in failures))


class EvaluationInterrupted(KeyboardInterrupt):
    """Ctrl-C during `evaluate_cases`; `rows` holds the scores of every object finished before it
    (also those of the record it continued)."""

    def __init__(self, rows: list):
        super().__init__()
        self.rows = rows


@dataclasses.dataclass(frozen=True)
class Setting:
    """protocol "volume"|"slice"; prompt "box"|"point"; propagation "mask"|"box" (volume), "none" (slice)."""

    protocol: str
    prompt: str
    propagation: str

    @property
    def key(self) -> str:
        return f"{self.protocol}/{self.prompt}/{self.propagation}"


def make_settings(protocols: Sequence[str], prompts: Sequence[str], propagations: Sequence[str]) -> list[Setting]:
    for name, values, valid in (("protocol", protocols, PROTOCOLS), ("prompt", prompts, PROMPT_KINDS),
                                ("propagation", propagations, PROPAGATIONS)):
        bad = [v for v in values if v not in valid]
        if bad or not values:
            raise ValueError(f"--{name} must be a comma list of {', '.join(valid)}, got {','.join(values) or 'nothing'}")
    out = []
    for protocol in dict.fromkeys(protocols):
        props = dict.fromkeys(propagations) if protocol == "volume" else ("none",)
        for prompt, prop in itertools.product(dict.fromkeys(prompts), props):
            out.append(Setting(protocol, prompt, prop))
    return out


def edit_checkpoints(edits: Sequence[int], protocol: str) -> list[int]:
    """Sorted distinct edit counts for a protocol (slice-level: those <= SLICE_EDITS_MAX)."""
    e = sorted(set(int(x) for x in edits))
    if any(x < 0 for x in e):
        raise ValueError(f"--edits must be >= 0, got {edits}")
    return [x for x in e if x <= SLICE_EDITS_MAX] if protocol == "slice" else e


@dataclasses.dataclass
class EvalOptions:
    edits: Sequence[int] = (0,)
    seed: int = 0
    min_slices: int = 1
    box_jitter: Optional[tuple[float, float]] = None
    known_classes: Optional[set] = None
    oracle: bool = True  # slice-level, no edits: oracle Dice from the secondary masks
    worst_count: int = 8  # worst cases kept for the montage
    requested_structures: Optional[Sequence[str]] = None
    shard: tuple[int, int] = (0, 1)  # (I, N): this process evaluates cases I, I + N, ... (datasets.select_shard)


def _rng(seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(zlib.crc32(p.encode()) for p in parts)]))


def _honoured(mask: np.ndarray, clicks) -> int:
    """How many clicks have their voxel at the clicked label in `mask` (the edit did what was asked there)."""
    return sum(int(bool(mask[int(c.point[0]), int(c.point[1]), c.slice]) == bool(c.label)) for c in clicks)


def _scores_over_edits(pred: np.ndarray, gt: np.ndarray, checkpoints: Sequence[int], correct) -> tuple[dict, dict, np.ndarray]:
    """Dice after 0, 1, 2, ... correction rounds, kept at each checkpoint count; the clicks so far and
    how many were honoured (`_honoured` right after their round), per checkpoint; the mask at the first.

    correct(pred) runs one round and returns (the new mask, the round's clicks), or None when nothing
    is left to correct (a perfect mask: its Dice carries forward to the later checkpoints).
    """
    scores, clicks, first = {}, {}, None
    n, last, made, honoured = 0, dice(pred, gt), 0, 0
    targets = list(checkpoints)
    while True:
        if n in targets:
            scores[n], clicks[n] = last, (made, honoured)
            if first is None:
                first = pred
        if n >= targets[-1]:
            break
        corrected = correct(pred)
        if corrected is None:
            break
        (pred, round_clicks), n = corrected, n + 1
        last, made, honoured = dice(pred, gt), made + len(round_clicks), honoured + _honoured(pred, round_clicks)
    for t in targets:
        scores.setdefault(t, last)
        clicks.setdefault(t, (made, honoured))
    return scores, clicks, first if first is not None else pred


def run_volume_level(predictor, gt: np.ndarray, setting: Setting, checkpoints: Sequence[int], rng,
                     box_jitter=None) -> tuple[dict, dict, np.ndarray]:
    """Dice at each edit checkpoint, info (initial slice, bounds), the mask at the first checkpoint."""
    lo, hi = object_bounds(gt)
    k = initial_slice(gt)
    prompt = slice_prompt(slice_2d(gt, k), setting.prompt, rng, box_jitter)
    pred = predictor.segment(k, bounds=(lo, hi), propagation=setting.propagation, **prompt).mask

    def correct(pred):
        click = correction_3d(pred, gt, rng)
        return None if click is None else (predictor.edit(click.slice, [click.point], [click.label]).mask, [click])

    scores, clicks, first = _scores_over_edits(pred, gt, checkpoints, correct)
    return scores, {"initial_slice": k, "lo": lo, "hi": hi, "clicks": clicks}, first


def run_slice_level(predictor, gt: np.ndarray, setting: Setting, checkpoints: Sequence[int], rng,
                    box_jitter=None, oracle: bool = False) -> tuple[dict, dict, np.ndarray]:
    """One prompt on every slice holding the object, then rounds of one correction per slice."""
    lo, hi = object_bounds(gt)
    present = [k for k in range(lo, hi + 1) if gt[:, :, k].any()]
    prompts = {k: slice_prompt(slice_2d(gt, k), setting.prompt, rng, box_jitter) for k in present}
    info = {"initial_slice": -1, "lo": lo, "hi": hi}
    if oracle:  # all 4 decoder masks (primary + 3 secondary) from the same batched decode
        result = predictor.segment_slices(prompts, all_masks=True)
        if result.all_masks.shape[0] > 1:
            info["oracle_dice"] = oracle_dice(result.all_masks[1:], gt)
    else:
        result = predictor.segment_slices(prompts)

    def correct(pred):
        clicks = [c for c in (correction_2d(slice_2d(pred, k), slice_2d(gt, k), rng, k) for k in present) if c is not None]
        if not clicks:
            return None
        # One round = one batched decode of the clicked slices (no propagation at slice level).
        return predictor.edit_slices({c.slice: ([c.point], [c.label]) for c in clicks}).mask, clicks

    scores, info["clicks"], first = _scores_over_edits(result.mask, gt, checkpoints, correct)
    return scores, info, first


def _worst_slice(pred: np.ndarray, gt: np.ndarray) -> int:
    """The slice with most wrong voxels; the object's largest slice when none is wrong."""
    errors = np.count_nonzero((pred.astype(bool) != gt.astype(bool)).reshape(-1, gt.shape[-1]), axis=0)
    if errors.any():
        return int(np.argmax(errors))
    return int(np.argmax(np.count_nonzero(gt.reshape(-1, gt.shape[-1]), axis=0)))


def evaluate_cases(cases, predictor, settings: Sequence[Setting], options: EvalOptions, *, load_case: Callable,
                   progress: bool = True, record: Optional[RunRecord] = None) -> EvalResult:
    """Runs every setting on every object of the cases of `options.shard`; see the module docstring.

    record: where each finished object goes at once (default: a new one in memory); the objects it
    already holds are not run again, and a case all of whose objects it holds is not even loaded.
    """
    from radsam_jax.data.datasets import select_shard

    checkpoints = _check_run(cases, settings, options)
    mine = select_shard(list(enumerate(cases)), options.shard)  # (index in cases, case); none: an empty shard
    record = RunRecord() if record is None else record
    requested = list(options.requested_structures or [])
    done = record.finished()
    # The kept worst objects as a min-heap on (-Dice, order): its top is the least bad, replaced first.
    heap = [(-w.dice, w.order, w) for w in record.worst]
    heapq.heapify(heap)
    verified = _check_case_files(mine, record, done)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(c.structures) for _, c in mine), unit="object", file=sys.stderr, desc="evaluate",
                   initial=sum((c.case_id, n) in done for _, c in mine for n in c.structures))
    tick = bar.update if bar is not None else lambda n: None
    work = [(case_index, case, todo) for case_index, case in mine
            if (todo := [(i, name, label_id) for i, (name, label_id) in enumerate(case.structures.items())
                         if (case.case_id, name) not in done])]
    unreadable = []

    def read(case):
        volume_and_labels = load_case(case)  # its errors first: they say more than a hash's
        if record.folder is None or case.case_id in verified:
            return volume_and_labels, None
        try:
            return volume_and_labels, case_content(case)
        except OSError:  # a load_case that does not read the case's paths
            return volume_and_labels, None

    try:
        for (case_index, case, todo), reading in read_ahead(work, lambda w: read(w[1])):
            try:
                (volume, labels), content = reading.result()
            except Exception as e:  # this case's files; the model has not run on it
                unreadable.append((case.case_id, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"))
                (bar.write if bar is not None else print)(f"evaluate: case {case.case_id} left for later, it cannot "
                                                          f"be read: {unreadable[-1][1]}", file=sys.stderr)
                continue
            started = time.perf_counter() - reading.seconds  # the case's time includes its read, overlapped or not
            if content is not None:
                record.add_case_files(case.case_id, content)
            present_ids = set(np.unique(labels).tolist())
            if requested and len(cases) == 1:
                _check_requested_present(case, present_ids, requested)
            _evaluate_case(predictor, case_index, case, todo, volume, labels, present_ids, started, settings,
                           checkpoints, options, heap, record, tick)
    except KeyboardInterrupt:
        raise EvaluationInterrupted(list(record.rows)) from None
    finally:
        if bar is not None:
            bar.close()
    if unreadable:
        raise UnreadableCases(unreadable)
    if not record.complete:
        record.mark_complete()
    return _checked_result(record, requested, options, len(mine))


def _check_run(cases, settings: Sequence[Setting], options: EvalOptions) -> dict:
    """The edit checkpoints per protocol; EvaluationInputError or ValueError for a run that cannot start."""
    if not cases:
        raise EvaluationInputError("no case to evaluate: the dataset is empty")
    twice = sorted(i for i, n in collections.Counter(c.case_id for c in cases).items() if n > 1)
    if twice:
        raise EvaluationInputError(f"case id(s) {twice} name more than one case (e.g. x.nii beside x.nii.gz): "
                                   f"their scores could not be told apart")
    if options.min_slices < 1:
        raise ValueError(f"--min-slices must be >= 1, got {options.min_slices}")
    checkpoints = {s.protocol: edit_checkpoints(options.edits, s.protocol) for s in settings}
    for protocol, cps in checkpoints.items():
        if not cps:
            raise ValueError(f"--edits {list(options.edits)} leaves no checkpoint for the {protocol}-level protocol "
                             f"(slice-level allows at most {SLICE_EDITS_MAX} points per slice)")
    return checkpoints


def _check_requested_present(case, present_ids: set, requested: list) -> None:
    """A one-case run: EvaluationInputError for requested structures with no voxel in its label map."""
    missing = [n for n in requested if case.structures.get(n) not in present_ids]
    if missing:
        raise EvaluationInputError(
            f"structure(s) {missing} absent from the label map of {case.case_id} "
            f"(no voxel with their label id {[case.structures.get(n) for n in missing]})")


def _evaluate_case(predictor, case_index: int, case, todo: list, volume, labels: np.ndarray, present_ids: set,
                   started: float, settings: Sequence[Setting], checkpoints: dict, options: EvalOptions, heap: list,
                   record: RunRecord, tick: Callable) -> None:
    """Every object of one read case still to do (`todo`: (structure index, name, label id)) into
    `record`, then the case's timing row (from `started`); tick(1) per object, evaluated or skipped."""
    import jax

    predictor.set_volume(volume)
    encoded, encode_s, n_objects = 0, 0.0, 0
    for structure_index, name, label_id in todo:
        if label_id not in present_ids:
            record.add_skipped(case.case_id, name, "absent")
            tick(1)
            continue
        gt = labels == label_id
        lo, hi = object_bounds(gt)
        if hi - lo + 1 < options.min_slices:
            record.add_skipped(case.case_id, name, f"spans {hi - lo + 1} < --min-slices {options.min_slices} slices")
        else:
            te = time.perf_counter()
            encoded += predictor.encode_slices(lo, hi)  # cached slices are skipped
            jax.block_until_ready(predictor.embeddings)
            encode_s += time.perf_counter() - te
            n_objects += 1
            rows, offered = _evaluate_object(predictor, volume, case, (case_index, structure_index), name,
                                             label_id, gt, (lo, hi), settings, checkpoints, options, heap)
            if offered:
                record.set_worst([w for *_, w in heap])
            record.add_object(case.case_id, name, rows)
        tick(1)
    record.add_timing({"case": case.case_id, "slices": int(volume.array.shape[2]), "encoded": int(encoded),
                       "encode_s": encode_s, "total_s": time.perf_counter() - started, "objects": n_objects})


def _checked_result(record: RunRecord, requested: list, options: EvalOptions, num_cases: int) -> EvalResult:
    """The record's result; EvaluationInputError for a whole run (not a shard) with no object scored."""
    result = record.result(requested)
    if not result.rows and options.shard[1] == 1:  # a shard may hold no object: its run's report decides
        if result.missing_structures:
            raise EvaluationInputError(f"structure(s) {result.missing_structures} absent from every label map (no voxel in any case)")
        reasons = sorted({r for _, _, r in result.skipped})
        raise EvaluationInputError(f"no object to evaluate in {num_cases} case(s): every object was skipped "
                                   f"({'; '.join(reasons) or 'none listed'}); a smaller --min-slices or other "
                                   f"--structures give some")
    return result


def case_content(case, recorded: Optional[dict] = None, *, before_reading: Callable = lambda: None) -> dict:
    """{"files": [[path, size, mtime_ns], ...], "sha256": of their bytes} of the files a case is read
    from; `recorded` when those paths, sizes and times are its own (its files are not read again,
    else `before_reading()` is called first). The sha256 leaves the paths out: a dataset moved
    elsewhere keeps its content's."""
    from radsam_jax.data.datasets import case_files
    from radsam_jax.io import files_sha256

    files = case_files(case)
    stats = [[str(f.resolve()), st.st_size, st.st_mtime_ns] for f in files for st in [f.stat()]]
    if recorded is not None and recorded["files"] == stats:
        return recorded
    before_reading()
    return {"files": stats, "sha256": files_sha256(files)}


def _check_case_files(mine, record: RunRecord, done: set) -> set:
    """Ids of the cases with objects in `record` whose files are still those it recorded (moved or
    touched ones are compared by content, then recorded anew); EvaluationInputError for any other."""
    verified, changed, told = set(), [], []

    def tell():  # once: comparing a moved dataset reads all of it
        if not told:
            told.append(True)
            print(f"evaluate: comparing the contents of case files moved or touched since {record.folder} "
                  f"recorded them", file=sys.stderr)

    for _, case in mine:
        recorded = record.case_files.get(case.case_id)
        if recorded is None or not any((case.case_id, name) in done for name in case.structures):
            continue
        try:
            now = case_content(case, recorded, before_reading=tell)
        except OSError:  # gone: a finished case needs no file, one still to evaluate is reported when read
            continue
        if now["sha256"] != recorded["sha256"]:
            changed.append(case.case_id)
            continue
        verified.add(case.case_id)
        if now is not recorded:
            record.add_case_files(case.case_id, now)  # the next check needs no read
    if changed:
        raise EvaluationInputError(
            f"the files of case(s) {', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''} ({len(changed)} in all) "
            f"changed since the run recorded in {record.folder} evaluated them: its scores for them are not those of "
            f"the files now. --restart evaluates the run again (or give another --out)")
    return verified


def _evaluate_object(predictor, volume, case, position: tuple[int, int], name: str, label_id: int, gt: np.ndarray,
                     bounds: tuple[int, int], settings: Sequence[Setting], checkpoints: dict, options: EvalOptions,
                     heap: list) -> tuple[list, bool]:
    """Every setting on one object (`position`: case and structure index): its score rows, and whether
    it changed the worst-object `heap`."""
    lo, hi = bounds
    known = None if options.known_classes is None else name in options.known_classes
    voxels = int(np.count_nonzero(gt))
    rows, offered = [], False
    for setting_index, setting in enumerate(settings):
        rng = _rng(options.seed, case.case_id, name, setting.key)
        cps = checkpoints[setting.protocol]
        if setting.protocol == "volume":
            scores, info, first = run_volume_level(predictor, gt, setting, cps, rng, options.box_jitter)
        else:
            scores, info, first = run_slice_level(predictor, gt, setting, cps, rng, options.box_jitter,
                                                  oracle=options.oracle and cps[0] == 0)
        for e in cps:
            rows.append({
                "case": case.case_id, "structure": name, "label": int(label_id), "known": known,
                "protocol": setting.protocol, "prompt": setting.prompt, "propagation": setting.propagation,
                "edits": e, "dice": float(scores[e]),
                "clicks": info["clicks"][e][0], "clicks_honoured": info["clicks"][e][1],
                "oracle_dice": info.get("oracle_dice") if e == 0 else None,
                "initial_slice": info["initial_slice"], "lo": info["lo"], "hi": info["hi"],
                "voxels": voxels,
            })
        if options.worst_count > 0:
            d0 = float(scores[cps[0]])
            order = (*position, setting_index)
            if len(heap) < options.worst_count or (-d0, order) > heap[0][:2]:
                k = _worst_slice(first, gt)
                sx, sy = (float(v) for v in volume.spacing[:2])
                image = slice_2d(predictor.intensities, k).astype(np.float32)  # in the units its window is in
                wc = WorstCase(d0, case.case_id, name, setting.key, cps[0], k, image, slice_2d(gt, k).copy(),
                               slice_2d(first, k).astype(bool), (sx, sy), order)
                (heapq.heappush if len(heap) < options.worst_count else heapq.heapreplace)(heap, (-d0, order, wc))
                offered = True
    return rows, offered
