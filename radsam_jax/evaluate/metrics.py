"""Scores of the benchmark: 3D Dice, the oracle Dice, bootstrap confidence intervals, per-structure
and known/unknown breakdowns.

Every Dice here is a fraction in [0, 1] (tables multiply by 100 for display, like the paper).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

DEFAULT_BOOTSTRAP = 10_000


def dice(prediction: np.ndarray, target: np.ndarray) -> float:
    """3D (or 2D) Dice of two binary masks: 2|P & G| / (|P| + |G|); 1.0 when both are empty."""
    p = np.asarray(prediction).astype(bool, copy=False)
    g = np.asarray(target).astype(bool, copy=False)
    if p.shape != g.shape:
        raise ValueError(f"prediction {p.shape} and target {g.shape} differ in shape")
    denom = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if denom == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / denom


def oracle_mask(candidates: np.ndarray, target: np.ndarray, slice_axis: int = -1) -> np.ndarray:
    """The oracle's 3D mask: on every slice, the candidate (e.g. one of the 3 secondary masks) whose
    2D Dice with the target slice is highest, as a user who clicks the best proposal would pick.

    candidates: (K, X, Y, Z) binary; target: (X, Y, Z) binary. Ties go to the lower index. Slices
    where every candidate and the target are empty contribute nothing either way.
    """
    c = np.asarray(candidates).astype(bool, copy=False)
    g = np.asarray(target).astype(bool, copy=False)
    if c.ndim != g.ndim + 1 or c.shape[1:] != g.shape:
        raise ValueError(f"candidates {c.shape} must be (K, *{g.shape})")
    axis = slice_axis % g.ndim
    other = tuple(i for i in range(g.ndim) if i != axis)
    inter = np.count_nonzero(c & g[None], axis=tuple(i + 1 for i in other))  # (K, Z)
    sizes = np.count_nonzero(c, axis=tuple(i + 1 for i in other))
    g_sizes = np.count_nonzero(g, axis=other)[None]
    denom = sizes + g_sizes
    per_slice = np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), 1.0)
    best = np.argmax(per_slice, axis=0)  # (Z,)
    chosen = np.moveaxis(c, axis + 1, 1)[best, np.arange(best.size)]  # (Z, ...)
    return np.moveaxis(chosen, 0, axis)


def oracle_dice(candidates: np.ndarray, target: np.ndarray, slice_axis: int = -1) -> float:
    """3D Dice of `oracle_mask` (best secondary mask on every slice) against the target."""
    return dice(oracle_mask(candidates, target, slice_axis), target)


# ----------------------------------------------------------------------------- intervals


def bootstrap_ci(values: Sequence[float], *, num_resamples: int = DEFAULT_BOOTSTRAP, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean over objects and its percentile-bootstrap confidence interval.

    Resamples the objects with replacement `num_resamples` times (seeded: the same values and seed
    give the same interval). One value gives a zero-width interval; no values is an error.
    """
    x = np.asarray(list(values), np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci of no values")
    if not np.all(np.isfinite(x)):
        raise ValueError("bootstrap_ci needs finite values")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples, np.float64)
    chunk = max(1, 2_000_000 // x.size)  # bounds the (chunk, n) index array
    for start in range(0, num_resamples, chunk):
        n = min(chunk, num_resamples - start)
        means[start: start + n] = x[rng.integers(0, x.size, size=(n, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return mean, float(low), float(high)


def normal_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) from the normal approximation mean +- z * sd / sqrt(n) (population sd, the
    plug-in the bootstrap estimates); a closed form the bootstrap agrees with on large samples."""
    from statistics import NormalDist

    x = np.asarray(list(values), np.float64)
    if x.size == 0:
        raise ValueError("normal_ci of no values")
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    half = z * float(x.std(ddof=0)) / math.sqrt(x.size)
    m = float(x.mean())
    return m, m - half, m + half


# ----------------------------------------------------------------------------- breakdowns


# A --known-classes value that looks like a file name is never taken for a list of class names.
_LIST_SUFFIXES = (".json", ".txt", ".csv", ".tsv", ".lst", ".list")
# Named --known-classes sets. "amos": the 15 AMOS classes (the paper's training data) under their
# AMOS names ("arota" as AMOS's dataset.json spells the aorta) and TotalSegmentator v1/v2 names, for
# the paper's transfer table: an AMOS-trained model evaluated on TotalSegmentator, known vs unknown.
KNOWN_CLASS_PRESETS = {
    "amos": (
        "spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver", "stomach", "aorta", "arota",
        "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder", "prostate/uterus",
        "kidney_right", "kidney_left", "gallbladder", "inferior_vena_cava", "adrenal_gland_right",
        "adrenal_gland_left", "urinary_bladder", "prostate",
    ),
}


def parse_known_classes(spec: Optional[str], valid: Optional[Iterable[str]] = None) -> Optional[set[str]]:
    """--known-classes: a file (JSON list, a JSON label table {"label_map"|"labels": {id: name} or
    {name: id}} as datasets.structure_ids reads it, or one name a line),
    a comma-separated list, or a KNOWN_CLASS_PRESETS name ("amos": those of its classes among `valid`;
    a file of that name in the working folder is read instead). None/empty -> None (no known/unknown split).

    A value that looks like a path (a path separator, or a list file's suffix) must be a file, so a
    mistyped path is an error, not one class name. With `valid` (the evaluated structures), every name
    must be one of them: a misspelled name would otherwise turn a known class into an unknown one.
    """
    import json
    import os
    from pathlib import Path

    if not spec:
        return None
    path = Path(spec)
    if path.is_file():
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark some editors write
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith(("{", "[")):  # meant as JSON: not one class named by the whole text
                raise ValueError(f"--known-classes {spec} is not valid JSON: {e}") from None
            names = [line.strip() for line in text.splitlines()]
        else:
            if isinstance(data, Mapping):
                from radsam_jax.data.datasets import structure_ids

                data = data.get("label_map", data.get("labels", data))
                names = list(structure_ids(data, f"--known-classes {spec}")) if isinstance(data, Mapping) else list(data)
            else:
                names = [str(v) for v in data]
    elif spec.lower() in KNOWN_CLASS_PRESETS:
        preset = set(KNOWN_CLASS_PRESETS[spec.lower()])
        names = preset if valid is None else preset.intersection(valid)
        if not names:
            raise ValueError(f"--known-classes {spec}: none of its classes ({', '.join(sorted(preset))}) is a "
                             f"structure of the evaluated label maps")
        return names
    elif any(sep and sep in spec for sep in (os.sep, os.altsep)) or path.suffix.lower() in _LIST_SUFFIXES:
        raise ValueError(f"--known-classes {spec}: " + ("a folder, not a file" if path.is_dir() else "no such file"))
    else:
        names = spec.split(",")
    names = {n.strip() for n in names if n and n.strip() and n.strip() != "background"}
    if not names:
        raise ValueError(f"--known-classes {spec!r} names no class")
    if valid is not None:
        valid = sorted(set(valid))
        unknown = sorted(names.difference(valid))
        if unknown:
            raise ValueError(f"--known-classes {spec}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a "
                             f"structure of the evaluated label maps; valid names: {', '.join(valid)}")
    return names


def grouped_ci(rows: Iterable[Mapping], key, value: str = "dice", *, seed: int = 0,
               num_resamples: int = DEFAULT_BOOTSTRAP) -> dict:
    """{key(row): (mean, low, high, n)} over the rows of each group (rows with value None skipped)."""
    groups: dict = {}
    for r in rows:
        v = r.get(value)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        groups.setdefault(key(r), []).append(float(v))
    return {k: (*bootstrap_ci(v, seed=seed, num_resamples=num_resamples), len(v)) for k, v in groups.items()}
