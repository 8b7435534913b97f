"""The evaluation loop: every case, every structure, every setting, every edit checkpoint.

Per volume the predictor's `set_volume` runs once and the slices an object spans are encoded once
(`encode_slices`, which skips cached slices); every structure, prompt kind, propagation mode, edit
and protocol after that re-uses the cached embeddings, so the image encoder runs at most once per
slice per volume. Randomness (point prompts, correction clicks, optional box jitter) comes from a
generator seeded by (seed, case, structure, setting), so the same seed gives the same numbers, and
adding a setting or a structure to a run does not change the others.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import sys
import time
import zlib
from typing import Callable, Optional, Sequence

import numpy as np

from radsam_jax.evaluate.metrics import dice, oracle_dice
from radsam_jax.evaluate.simulated_user import (
    PROMPT_KINDS, correction_2d, correction_3d, initial_slice, object_bounds, slice_2d, slice_prompt,
)

PROTOCOLS = ("volume", "slice")
PROPAGATIONS = ("mask", "box")
SLICE_EDITS_MAX = 10  # slice-level: at most 10 correction points per slice (the paper's 10n)


class EvaluationInputError(ValueError):
    """Bad input found while evaluating (e.g. a requested structure absent from every label map)."""


class EvaluationInterrupted(KeyboardInterrupt):
    """Ctrl-C during `evaluate_cases`; `rows` holds the scores of every object finished before it."""

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


@dataclasses.dataclass
class WorstCase:
    dice: float
    case: str
    structure: str
    setting: str
    edits: int
    slice: int
    image: np.ndarray  # 2D HU (rows = y, columns = x)
    gt: np.ndarray
    pred: np.ndarray
    spacing: tuple  # (x, y) mm


@dataclasses.dataclass
class EvalResult:
    rows: list
    worst: list
    timings: list  # per case: {"case", "slices", "encoded", "encode_s", "total_s", "objects"}
    skipped: list  # (case, structure, reason)
    missing_structures: list = dataclasses.field(default_factory=list)  # requested, found in no case


def _rng(seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(zlib.crc32(p.encode()) for p in parts)]))


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


def _worst_slice(pred: np.ndarray, gt: np.ndarray, lo: int, hi: int) -> int:
    errors = np.count_nonzero((pred.astype(bool) != gt.astype(bool)).reshape(-1, gt.shape[-1]), axis=0)
    if errors.any():
        return int(np.argmax(errors))
    return int(np.argmax(np.count_nonzero(gt.reshape(-1, gt.shape[-1]), axis=0)))


def evaluate_cases(cases, predictor, settings: Sequence[Setting], options: EvalOptions, *, load_case: Callable,
                   progress: bool = True, log=print) -> EvalResult:
    """Runs every setting on every object of every case; see the module docstring."""
    import jax

    if not cases:
        raise EvaluationInputError("no case to evaluate: the dataset is empty")
    if options.min_slices < 1:
        raise ValueError(f"--min-slices must be >= 1, got {options.min_slices}")
    checkpoints = {s.protocol: edit_checkpoints(options.edits, s.protocol) for s in settings}
    for protocol, cps in checkpoints.items():
        if not cps:
            raise ValueError(f"--edits {list(options.edits)} leaves no checkpoint for the {protocol}-level protocol "
                             f"(slice-level allows at most {SLICE_EDITS_MAX} points per slice)")
    requested = list(options.requested_structures or [])
    found = {name: 0 for name in requested}
    rows, timings, skipped, heap = [], [], [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(c.structures) for c in cases), unit="object", file=sys.stderr, desc="evaluate")
    tiebreak = itertools.count()
    finished = 0  # len(rows) when the last object was complete (all its settings and checkpoints)
    try:
        for case in cases:
            t0 = time.perf_counter()
            volume, labels = load_case(case)
            present_ids = set(np.unique(labels).tolist())
            if requested and len(cases) == 1:
                missing = [n for n in requested if case.structures.get(n) not in present_ids]
                if missing:
                    raise EvaluationInputError(
                        f"structure(s) {missing} absent from the label map of {case.case_id} "
                        f"(no voxel with their label id {[case.structures.get(n) for n in missing]})")
            predictor.set_volume(volume)
            encoded, encode_s, n_objects = 0, 0.0, 0
            for name, label_id in case.structures.items():
                if label_id not in present_ids:
                    skipped.append((case.case_id, name, "absent"))
                    if bar is not None:
                        bar.update(1)
                    continue
                gt = labels == label_id
                lo, hi = object_bounds(gt)
                if hi - lo + 1 < options.min_slices:
                    skipped.append((case.case_id, name, f"spans {hi - lo + 1} < --min-slices {options.min_slices} slices"))
                    if bar is not None:
                        bar.update(1)
                    continue
                if name in found:
                    found[name] += 1
                n_objects += 1
                te = time.perf_counter()
                encoded += predictor.encode_slices(lo, hi)  # cached slices are skipped
                jax.block_until_ready(predictor.embeddings)
                encode_s += time.perf_counter() - te
                known = None if options.known_classes is None else name in options.known_classes
                for setting in settings:
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
                            "voxels": int(np.count_nonzero(gt)),
                        })
                    if options.worst_count > 0:
                        d0 = float(scores[cps[0]])
                        item = (-d0, next(tiebreak))
                        if len(heap) < options.worst_count or item > heap[0][:2]:
                            k = _worst_slice(first, gt, lo, hi)
                            sx, sy = (float(v) for v in volume.spacing[:2])
                            wc = WorstCase(d0, case.case_id, name, setting.key, cps[0], k,
                                           slice_2d(volume.array, k).astype(np.float32), slice_2d(gt, k).copy(),
                                           slice_2d(first, k).astype(bool), (sx, sy))
                            if len(heap) < options.worst_count:
                                heapq.heappush(heap, (*item, wc))
                            else:
                                heapq.heapreplace(heap, (*item, wc))
                finished = len(rows)
                if bar is not None:
                    bar.update(1)
            timings.append({"case": case.case_id, "slices": int(volume.array.shape[2]), "encoded": int(encoded),
                            "encode_s": encode_s, "total_s": time.perf_counter() - t0, "objects": n_objects})
    except KeyboardInterrupt:
        raise EvaluationInterrupted(rows[:finished]) from None
    finally:
        if bar is not None:
            bar.close()
    never = [n for n, c in found.items() if c == 0]
    if never and not rows:
        raise EvaluationInputError(f"structure(s) {never} absent from every label map (no voxel in any case)")
    if not rows:
        reasons = sorted({r for _, _, r in skipped})
        raise EvaluationInputError(f"no object to evaluate in {len(cases)} case(s): every structure was skipped ({'; '.join(reasons) or 'none listed'})")
    worst = [w for _, _, w in sorted(heap, key=lambda t: (-t[0], t[1]))]
    worst.sort(key=lambda w: w.dice)
    return EvalResult(rows, worst, timings, skipped, never)
