"""`radsam compare`: benchmark reports of several models side by side, as in the paper's Table 1,
with paired differences against the first.

Reads scores.csv from each report folder (the --out of `radsam evaluate` or `radsam report`) and
writes to --out:
- compare.md: Table 1 with every model's rows (optionally the paper's reference rows, for
  orientation: other data), then per matching setting (protocol, prompt, edits; every pair of
  propagations, so RadSAM's mask propagation meets a SAM baseline's box propagation) the paired
  difference of each model against the first: the mean over the objects both evaluated of
  Dice(model) - Dice(first), its 95% percentile-bootstrap CI (objects resampled, so the pairing
  stays), and how many objects got better, equal or worse.
- compare.json: those differences, and each model's summary over the shared objects.
- compare_edits.png: Dice against edits, a panel per protocol and prompt, a line per model and
  propagation.
Models are compared on the objects every one of them evaluated; objects that only some evaluated
are counted and named in compare.md, not scored.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from radsam_jax.evaluate.metrics import DEFAULT_BOOTSTRAP, bootstrap_ci
from radsam_jax.io import write_text_atomically
from radsam_jax.evaluate.report import (
    SETTING_ORDER, _setting, _setting_sort, plot_dice_vs_edits, summarize, table1,
)

# The paper's Table 1 (AMOS validation, 100 CT volumes, ViT-B; Dice x100): (model, volume |P|, |E|,
# box, point, slice |P|, |E|, box, point). Other data than any run here: a reference point, not a comparison.
PAPER_TABLE1 = (
    ("nnU-Net (no prompt)", "-", "-", 88.87, 88.87, "-", "-", 88.87, 88.87),
    ("SAM (box propagation)", "3", "-", 50.93, 38.78, "n", "-", 70.20, 33.07),
    ("SAM (box propagation)", "3", "20", 60.60, 47.16, "n", "10n", 85.43, 84.31),
    ("MedSAM (box propagation)", "3", "-", 53.19, None, "n", "-", 81.36, None),
    ("RadSAM", "3", "-", 84.99, 84.05, "n", "-", 91.08, 85.09),
    ("RadSAM", "3", "20", 91.11, 90.63, "n", "10n", 96.73, 96.78),
)


class CompareError(ValueError):
    """Reports that cannot be compared (missing, unreadable, or without a shared object)."""


def read_scores(folder) -> list[dict]:
    """The rows of folder/scores.csv, with dice a float and edits an int."""
    path = Path(folder) / "scores.csv"
    if not path.is_file():
        raise CompareError(f"{folder} has no scores.csv: give the --out folder of `radsam evaluate` or `radsam report`")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    try:
        for r in rows:
            r["dice"], r["edits"], r["label"] = float(r["dice"]), int(r["edits"]), int(r["label"])
    except (KeyError, ValueError) as e:
        raise CompareError(f"{path} is not a scores.csv of radsam evaluate ({type(e).__name__}: {e})") from None
    if not rows:
        raise CompareError(f"{path} has no rows")
    return rows


def partial_note(folder) -> Optional[str]:
    """"k of n objects finished" when folder holds a partial report (breakdown.json says so), else None."""
    path = Path(folder) / "breakdown.json"
    try:
        return json.loads(path.read_text()).get("partial") if path.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        raise CompareError(f"{path} is not a breakdown.json of radsam evaluate") from None


def _object(r: dict) -> tuple:
    return r["case"], r["structure"]


def paired_differences(base: Sequence[dict], other: Sequence[dict], *, seed: int = 0,
                       num_resamples: int = DEFAULT_BOOTSTRAP) -> list[dict]:
    """Per (protocol, prompt, edits) and pair of propagations (other's, base's): the mean paired
    Dice difference other - base over the objects both have, its bootstrap CI, n, and the counts of
    objects better / equal / worse; in report order."""
    base_dice = {(_object(r), *_setting(r)): r["dice"] for r in base}
    pairs: dict = {}
    base_props = {}
    for r in base:
        base_props.setdefault((r["protocol"], r["prompt"], r["edits"]), set()).add(r["propagation"])
    for r in other:
        key = (r["protocol"], r["prompt"], r["edits"])
        for prop in base_props.get(key, ()):
            b = base_dice.get((_object(r), r["protocol"], r["prompt"], prop, r["edits"]))
            if b is not None:
                pairs.setdefault((*key, r["propagation"], prop), []).append((_object(r), r["dice"] - b))
    out = []
    order = lambda k: (*_setting_sort((k[0], k[1], k[3], k[2])), SETTING_ORDER["propagation"].index(k[4]))
    for (protocol, prompt, edits, prop, base_prop), pairs_of in sorted(pairs.items(), key=lambda kv: order(kv[0])):
        d = np.asarray([diff for _, diff in sorted(pairs_of)])  # object order: the CI does not depend on row order
        mean, lo, hi = bootstrap_ci(d, seed=seed, num_resamples=num_resamples)
        out.append({"protocol": protocol, "prompt": prompt, "edits": edits, "propagation": prop,
                    "baseline_propagation": base_prop, "difference": mean, "ci_low": lo, "ci_high": hi, "n": int(d.size),
                    "better": int((d > 0).sum()), "equal": int((d == 0).sum()), "worse": int((d < 0).sum())})
    return out


def _check_same_ground_truth(folders: Sequence, scores: Sequence[list], shared: set) -> None:
    """CompareError when a shared (case, structure) has another ground-truth size in another report:
    objects are paired by name, and two data sets may use the same case ids for different images."""
    sizes = [{_object(r): r.get("voxels") for r in rows} for rows in scores]
    for obj in sorted(shared):
        seen = [(folder, size[obj]) for folder, size in zip(folders, sizes) if size[obj] not in (None, "")]
        if len({v for _, v in seen}) > 1:
            (fa, a), (fb, b) = seen[0], next((f, v) for f, v in seen if v != seen[0][1])
            raise CompareError(f"object {obj[0]}:{obj[1]} has {a} ground-truth voxels in {fa} but {b} in {fb}: the "
                               f"reports evaluated different images or label maps under the same case names")


def compare(folders: Sequence, names: Optional[Sequence[str]] = None, *, seed: int = 0,
            num_resamples: int = DEFAULT_BOOTSTRAP) -> dict:
    """Every model's summary over the objects all evaluated, and its differences against the first."""
    if len(folders) < 2:
        raise CompareError("compare needs at least two report folders")
    names = list(names) if names else [Path(f).resolve().name for f in folders]
    if len(names) != len(folders):
        raise CompareError(f"{len(names)} name(s) for {len(folders)} report folder(s)")
    if len(set(names)) != len(names):
        raise CompareError(f"model names must differ, got {names}: give --names")
    scores = [read_scores(f) for f in folders]
    objects = [{_object(r) for r in rows} for rows in scores]
    shared = set.intersection(*objects)
    if not shared:
        raise CompareError("the reports share no object (case, structure): they evaluated different data")
    _check_same_ground_truth(folders, scores, shared)
    models = []
    for name, folder, rows, own in zip(names, folders, scores, objects):
        kept = [r for r in rows if _object(r) in shared]
        models.append({"name": name, "folder": str(folder), "objects": len(own), "partial": partial_note(folder),
                       "not_shared": sorted(f"{c}:{s}" for c, s in own - shared), "rows": kept,
                       "summary": summarize(kept, seed=seed, num_resamples=num_resamples)})
    for m in models[1:]:
        m["differences"] = paired_differences(models[0]["rows"], m["rows"], seed=seed, num_resamples=num_resamples)
    return {"shared_objects": len(shared), "models": models}


def _paper_rows() -> list[str]:
    cell = lambda v: "-" if v is None else f"{v:.2f}"
    return [f"| paper: {m} | {vp_} | {ev} | {cell(vb)} | {cell(vp)} | {sp_} | {es} | {cell(sb)} | {cell(sp)} |"
            for m, vp_, ev, vb, vp, sp_, es, sb, sp in PAPER_TABLE1]


def write_comparison(out_dir, result: dict, *, paper: bool = False) -> Path:
    """compare.md, compare.json and compare_edits.png in out_dir; returns the markdown's path."""
    out = Path(out_dir)
    models = result["models"]
    base = models[0]["name"]
    lines = ["# RadSAM benchmark: model comparison", "",
             f"Scored on the {result['shared_objects']} object(s) (case, structure) that every report evaluated."]
    for m in models:
        extra = f"; {len(m['not_shared'])} more not scored here: {', '.join(m['not_shared'][:8])}" if m["not_shared"] else ""
        partial = f" **(partial report: {m['partial']})**" if m["partial"] else ""
        lines.append(f"- {m['name']}: `{m['folder']}`, {m['objects']} object(s){extra}{partial}")
    lines += ["", "## Table 1 (Dice x100, mean ± 95% CI half-width)", ""]
    for i, m in enumerate(models):
        lines += table1(m["summary"], m["name"])[(0 if i == 0 else 2):]
    if paper:
        lines += _paper_rows()
        lines += ["", "Rows 'paper:' are the paper's Table 1 (AMOS validation, 100 CT volumes, ViT-B), other data "
                      "than the rows above: for orientation, not a comparison."]
    lines += ["", f"## Paired differences against {base} (Dice x100)", "",
              f"Mean over the shared objects of Dice(model) - Dice({base}), 95% paired-bootstrap CI; objects better / "
              "equal / worse. A CI that excludes 0 is a difference these objects support.", "",
              "| model | protocol | prompt | edits | propagation | vs. propagation | difference | n | better / equal / worse |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m in models[1:]:
        for d in m["differences"]:
            lines.append(f"| {m['name']} | {d['protocol']} | {d['prompt']} | {d['edits']} | {d['propagation']} | "
                         f"{d['baseline_propagation']} | {d['difference'] * 100:+.2f} [{d['ci_low'] * 100:+.2f}, "
                         f"{d['ci_high'] * 100:+.2f}] | {d['n']} | {d['better']} / {d['equal']} / {d['worse']} |")
    write_text_atomically(out / "compare.md", "\n".join(lines) + "\n")
    data = {"shared_objects": result["shared_objects"],
            "models": [{k: v for k, v in m.items() if k != "rows"} for m in models]}
    write_text_atomically(out / "compare.json", json.dumps(data, indent=2) + "\n")
    panels = []
    for protocol in ("volume", "slice"):
        for prompt in ("box", "point"):
            curves = {}
            for m in models:
                for s in m["summary"]["settings"]:
                    if (s["protocol"], s["prompt"]) == (protocol, prompt):
                        label = m["name"] if s["propagation"] in ("mask", "none") else f"{m['name']} ({s['propagation']} propagation)"
                        curves.setdefault(label, []).append(s)
            if curves:
                panels.append((f"{protocol}-level, {prompt}", protocol, curves))
    plot_dice_vs_edits(out / "compare_edits.png", panels)
    return out / "compare.md"
