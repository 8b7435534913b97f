"""Outputs of `radsam evaluate`: scores.csv, summary.json, summary.md, breakdown.json and PNG plots.

- scores.csv: one row per (volume, structure, protocol, prompt, propagation, edits), Dice in [0, 1];
  initial_slice, lo, hi (and worst_cases.png's slice numbers) index the axial slices of the volume
  reoriented to RAS, inferior to superior: the file's own indices for the usual RAS or LPS storage,
  not for a file stored top-down or sagittally.
- summary.json: exactly {"settings": [{"protocol", "prompt", "propagation", "edits", "mean_dice",
  "ci_low", "ci_high", "n", "clicks", "clicks_honoured"}, ...]} (SETTING_KEYS; Dice in [0, 1], 95%
  percentile-bootstrap CI over objects; the correction clicks made and the share the model honoured).
- summary.md: a table shaped like the paper's Table 1 (x100, mean +- CI half-width), then every
  setting with its interval, per-structure scores, known/unknown classes (Table 2), the oracle
  (Table 3d), timing, and the protocol choices.
- breakdown.json: per-structure, known/unknown and oracle numbers (machine-readable summary.md), and
  "partial": null, or "k of n objects finished" for a report of an unfinished run (`radsam report --partial`).
- edits.png (Figure 3: Dice vs number of edits), per_structure.png (Figure 2a), worst_cases.png
  (CT slice + ground-truth contour (green) + prediction contour (red) of the worst objects; none
  with --worst 0).
Each file is written under a temporary name and renamed: no file is ever half-written, and the
earlier report's files are removed first, so a report stopped part-way is short, never a mix of two.
Every table and figure but scores.csv (the order of the run's cases, then of evaluation) lists
structures by label id, then name, and settings by SETTING_ORDER (protocol volume then slice,
prompt box then point, propagation mask then box then none), then edits; intervals are computed
over the rows in that order, so the same rows give the same files whatever order the evaluation
produced them in.
Plots use Pillow only, so they work from a plain install.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from radsam_jax.evaluate.metrics import DEFAULT_BOOTSTRAP, grouped_ci
from radsam_jax.io import save_png_atomically, write_atomically, write_text_atomically
from radsam_jax.inference.preview import mask_contour
from radsam_jax.intensity import window_caption, window_unit

SCORE_COLUMNS = ("case", "structure", "label", "known", "protocol", "prompt", "propagation", "edits", "dice",
                 "clicks", "clicks_honoured", "oracle_dice", "initial_slice", "lo", "hi", "voxels")
SETTING_KEYS = ("protocol", "prompt", "propagation", "edits", "mean_dice", "ci_low", "ci_high", "n", "clicks",
                "clicks_honoured")
SETTING_FIELDS = ("protocol", "prompt", "propagation", "edits")
# The model's own propagation (mask, RadSAM) before the SAM/MedSAM baseline's (box); slice-level rows have none.
SETTING_ORDER = {"protocol": ("volume", "slice"), "prompt": ("box", "point"), "propagation": ("mask", "box", "none")}


def _setting(r: dict) -> tuple:
    return r["protocol"], r["prompt"], r["propagation"], int(r["edits"])


def _setting_sort(k, fields: Sequence[str] = SETTING_FIELDS) -> tuple:
    """Sort key of a setting tuple `k` holding the values of `fields` (edits ascending)."""
    return tuple(SETTING_ORDER[f].index(v) if f in SETTING_ORDER else v for f, v in zip(fields, k))


def _structure_sort(rows: Sequence[dict]):
    """Sort key of a structure name: its label id (the smallest, should cases differ), then the name."""
    label = {}
    for r in rows:
        label[r["structure"]] = min(int(r["label"]), label.get(r["structure"], int(r["label"])))
    return lambda name: (label[name], name)


def _report_order(rows: Sequence[dict]) -> list[dict]:
    """The rows by case, structure and setting: each group's values, hence its seeded bootstrap
    interval, then do not depend on the order in which the evaluation produced the rows."""
    structure = _structure_sort(rows)
    return sorted(rows, key=lambda r: (str(r["case"]), structure(r["structure"]), _setting_sort(_setting(r))))


def write_scores_csv(path, rows: Sequence[dict]) -> Path:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SCORE_COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]))
                            for k in SCORE_COLUMNS})

    return write_atomically(path, write)


def summarize(rows: Sequence[dict], *, seed: int = 0, num_resamples: int = DEFAULT_BOOTSTRAP) -> dict:
    """{"settings": [...]} per (protocol, prompt, propagation, edits): the mean Dice and its bootstrap
    CI; the correction clicks made up to that checkpoint, and the share of them honoured (None: none made)."""
    rows = _report_order(rows)
    groups = grouped_ci(rows, _setting, seed=seed, num_resamples=num_resamples)
    made, honoured = {}, {}
    for r in rows:
        k = _setting(r)
        made[k] = made.get(k, 0) + int(r.get("clicks") or 0)
        honoured[k] = honoured.get(k, 0) + int(r.get("clicks_honoured") or 0)
    settings = []
    for k in sorted(groups, key=_setting_sort):
        mean, lo, hi, n = groups[k]
        share = honoured[k] / made[k] if made[k] else None
        settings.append(dict(zip(SETTING_KEYS, (*k, _clip(mean), _clip(lo), _clip(hi), int(n), made[k], share))))
    return {"settings": settings}


def _clip(x: float) -> float:
    return float(min(1.0, max(0.0, x)))


def breakdown(rows: Sequence[dict], *, seed: int = 0, num_resamples: int = DEFAULT_BOOTSTRAP) -> dict:
    """Per-structure, known/unknown and oracle numbers: lists of dicts with mean/ci/n, in report order
    (structures by label id then name, known before unknown, then settings)."""
    rows = _report_order(rows)

    def pack(groups, names, head=None):  # head: sort key of the field before the setting, if any
        order = (lambda k: (head(k[0]), *_setting_sort(k[1:]))) if head else _setting_sort
        return [dict(zip(names, k), mean_dice=_clip(v[0]), ci_low=_clip(v[1]), ci_high=_clip(v[2]), n=int(v[3]))
                for k, v in sorted(groups.items(), key=lambda kv: order(kv[0]))]

    per_structure = grouped_ci(rows, lambda r: (r["structure"], *_setting(r)), seed=seed, num_resamples=num_resamples)
    known_rows = [r for r in rows if r.get("known") is not None]
    known = grouped_ci(known_rows, lambda r: ("known" if r["known"] else "unknown", *_setting(r)), seed=seed,
                       num_resamples=num_resamples)
    oracle = grouped_ci([r for r in rows if r.get("oracle_dice") is not None], _setting, "oracle_dice", seed=seed,
                        num_resamples=num_resamples)
    return {
        "per_structure": pack(per_structure, ("structure", *SETTING_FIELDS), _structure_sort(rows)),
        "known_unknown": pack(known, ("group", *SETTING_FIELDS), ("known", "unknown").index),
        "oracle": pack(oracle, SETTING_FIELDS),
    }


# ------------------------------------------------------------------------------------- markdown


def _pm(s: Optional[dict]) -> str:
    if s is None:
        return "-"
    half = (s["ci_high"] - s["ci_low"]) / 2 * 100
    return f"{s['mean_dice'] * 100:.2f} ± {half:.2f}"


def _ci(s: dict) -> str:
    return f"{s['mean_dice'] * 100:.2f} [{s['ci_low'] * 100:.2f}, {s['ci_high'] * 100:.2f}]"


def table1(summary: dict, model: str) -> list[str]:
    """Markdown lines shaped like the paper's Table 1 (volume-level and slice-level columns)."""
    by = {(s["protocol"], s["prompt"], s["propagation"], s["edits"]): s for s in summary["settings"]}
    props = sorted({s["propagation"] for s in summary["settings"] if s["protocol"] == "volume"},
                   key=SETTING_ORDER["propagation"].index)  # the model's own (RadSAM) row first
    vol_edits = sorted({s["edits"] for s in summary["settings"] if s["protocol"] == "volume"})
    sl_edits = sorted({s["edits"] for s in summary["settings"] if s["protocol"] == "slice"})
    lines = ["| Model | Volume-level \\|P\\| | \\|E\\| | Bbox | Point | Slice-level \\|P\\| | \\|E\\| | Bbox | Point |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = props or ["none"]
    # Slice-level runs have no propagation: their columns go on the model's own (mask propagation) row.
    slice_group = "mask" if "mask" in groups else groups[0]
    for prop in groups:
        label = model if prop in ("mask", "none") else f"{model} ({prop} propagation)"
        edits = sorted(set(vol_edits if props else []) | set(sl_edits if prop == slice_group else []))
        for e in edits:
            v = e in vol_edits and bool(props)
            sl = e in sl_edits and prop == slice_group
            cells = [label,
                     "3" if v else "", ("-" if e == 0 else str(e)) if v else "",
                     _pm(by.get(("volume", "box", prop, e))) if v else "", _pm(by.get(("volume", "point", prop, e))) if v else "",
                     "n" if sl else "", ("-" if e == 0 else f"{e}n") if sl else "",
                     _pm(by.get(("slice", "box", "none", e))) if sl else "", _pm(by.get(("slice", "point", "none", e))) if sl else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


PROTOCOL_NOTES = """\
## Protocol (project choices where the paper is silent)
- Metric: 3D Dice on the whole object (also for slice-level prompting), mean over objects with a 95%
  percentile-bootstrap confidence interval over objects ({resamples} resamples, seeded); Table 1 shows
  mean ± half the interval width, x100.
- Objects: every structure of the label map with at least one voxel in the volume and spanning at
  least --min-slices={min_slices} slices (absent or too-thin structures are skipped and counted below).
- Initial slice (volume-level): the slice with the largest object area (ties: nearest the middle of
  the extent, then the lower index). Bounds: the object's first and last slices.
- Point prompt: one positive point uniform among the initial slice's object pixels (seeded).
  Box prompt: the tight bounding box; jitter: {jitter}.
- Propagation: from the prompted slice up and down to the bounds, prompted by the previous slice's
  mask (mask) or the box around it (box, for SAM/MedSAM). Mask prompts go in the model's encoding,
  here {mask_prompt} (binary: 0/1, as RadSAM trains; logits: SAM's own). A mask that vanishes before a bound:
  vanish policy "{vanish}" (stop: later slices stay empty, unless a stored positive click restarts it).
- Volume-level edits: cumulative; each click uniform among all 3D error voxels (missed -> positive,
  wrong -> negative), then re-propagation from that slice re-using earlier clicks; Dice recorded at
  each checkpoint of --edits. A perfect mask gets no more clicks (its Dice is carried forward).
- Clicks honoured: of the correction clicks made up to a checkpoint, the share whose voxel has the
  clicked label (inside the mask for a positive click, outside for a negative one) right after the
  edit that placed it. A model that ignores clicks scores near 0 % however its Dice moves.
- Slice-level: one prompt per slice holding the object; edits are rounds of one click per slice with
  errors, uniform among that slice's 2D errors; edits = r means r points per slice (at most {smax}).
  Each round decodes a clicked slice again with its first prompt (its box, or its point), all its
  clicks so far and its current mask as the mask prompt.
- Oracle (slice-level, no edits): on every slice the secondary mask (of 3) with the best 2D Dice,
  stacked and scored in 3D.
"""


def write_summary_md(path, summary: dict, extra: dict, *, model: str, options: dict, timings: Sequence[dict],
                     skipped: Sequence[tuple]) -> Path:
    window = window_caption(options["window"], options.get("intensity", "hu"))
    lines = [f"# RadSAM benchmark: {model}", "",
             f"Data: `{options.get('data')}` ({options.get('cases')} volume(s)); checkpoint `{options.get('checkpoint')}`; "
             f"seed {options.get('seed')}; {window} (model input and worst_cases.png).", ""]
    if options.get("partial"):
        lines += [f"**Partial report of an unfinished run: {options['partial']} (evaluated or skipped).**", ""]
    lines += ["## Table 1 (Dice x100, mean ± 95% CI half-width)", ""]
    lines += table1(summary, model)
    lines += ["", "## Every setting (Dice x100, mean [95% CI], n objects)", "",
              "| protocol | prompt | propagation | edits | Dice | n | clicks honoured |", "|---|---|---|---|---|---|---|"]
    for s in summary["settings"]:
        honoured = "-" if s["clicks_honoured"] is None else f"{s['clicks_honoured']:.0%} of {s['clicks']}"
        lines.append(f"| {s['protocol']} | {s['prompt']} | {s['propagation']} | {s['edits']} | {_ci(s)} | {s['n']} | {honoured} |")
    if extra.get("known_unknown"):
        lines += ["", "## Known / unknown classes (Table 2; Dice x100 ± CI half-width)", "",
                  "| protocol | prompt | propagation | edits | known | unknown |", "|---|---|---|---|---|---|"]
        ku = {}
        for r in extra["known_unknown"]:
            ku.setdefault((r["protocol"], r["prompt"], r["propagation"], r["edits"]), {})[r["group"]] = r
        for k in sorted(ku, key=_setting_sort):
            g = ku[k]
            lines.append(f"| {' | '.join(map(str, k))} | {_pm(g.get('known'))} (n={g.get('known', {}).get('n', 0)}) | "
                         f"{_pm(g.get('unknown'))} (n={g.get('unknown', {}).get('n', 0)}) |")
    if extra.get("oracle"):
        lines += ["", "## Oracle (Table 3d; slice-level, no edits)", "", "| prompt | Dice 3D | Dice oracle |", "|---|---|---|"]
        by = {(s["protocol"], s["prompt"], s["propagation"], s["edits"]): s for s in summary["settings"]}
        for r in extra["oracle"]:
            main = by.get((r["protocol"], r["prompt"], r["propagation"], r["edits"]))
            lines.append(f"| {r['prompt']} | {_pm(main)} | {_pm(r)} |")
    if extra.get("per_structure"):
        keys = sorted({(r["protocol"], r["prompt"], r["propagation"], r["edits"]) for r in extra["per_structure"]},
                      key=_setting_sort)
        first = {}
        for k in keys:  # the fewest-edits checkpoint of each setting
            first.setdefault(k[:3], k)
        cols = list(first.values())
        lines += ["", "## Per structure (Figure 2a; fewest-edits checkpoint, Dice x100 ± CI half-width)", "",
                  "| structure | " + " | ".join("/".join(map(str, c)) for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        ps = {(r["structure"], r["protocol"], r["prompt"], r["propagation"], r["edits"]): r for r in extra["per_structure"]}
        for name in dict.fromkeys(r["structure"] for r in extra["per_structure"]):  # breakdown's order
            lines.append(f"| {name} | " + " | ".join(
                (f"{_pm(ps[(name, *c)])} (n={ps[(name, *c)]['n']})" if (name, *c) in ps else "-") for c in cols) + " |")
    lines += ["", "## Timing", "", "| case | slices | slices encoded | encoder s | slices/s | total s | objects timed |",
              "|---|---|---|---|---|---|---|"]
    for t in timings:
        rate = t["encoded"] / t["encode_s"] if t["encode_s"] > 0 else float("nan")
        lines.append(f"| {t['case']} | {t['slices']} | {t['encoded']} | {t['encode_s']:.2f} | {rate:.2f} | "
                     f"{t['total_s']:.2f} | {t['objects']} |")
    lines += ["", "The encoder runs at most once per slice per volume (slices encoded <= slices); every",
              "structure, prompt, edit and setting re-uses the cached embeddings. Encoder time includes",
              "compilation on the first volume. A case is timed by the pass that finishes it: after a",
              "stopped run, only the objects that pass evaluated."]
    if skipped:
        lines += ["", f"## Skipped objects ({len(skipped)})", ""]
        reasons = {}
        for case, name, why in skipped:
            reasons.setdefault(why, []).append(f"{case}:{name}")
        for why, items in sorted(reasons.items()):
            shown = ", ".join(items[:12]) + (f", ... (+{len(items) - 12})" if len(items) > 12 else "")
            lines.append(f"- {why} ({len(items)}): {shown}")
    lines += ["", PROTOCOL_NOTES.format(resamples=options.get("resamples", DEFAULT_BOOTSTRAP), min_slices=options.get("min_slices", 1),
                                        jitter=options.get("jitter") or "none", vanish=options.get("vanish_policy", "stop"),
                                        smax=options.get("slice_edits_max", 10),
                                        mask_prompt=options.get("mask_prompt", "binary"))]
    return write_text_atomically(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------- plots (Pillow)

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _text(draw, xy, text, fill=(0, 0, 0), anchor="la"):
    try:
        draw.text(xy, text, fill=fill, font=_font(), anchor=anchor)
    except (ValueError, TypeError):  # bitmap default fonts do not support anchors
        w = draw.textlength(text, font=_font()) if hasattr(draw, "textlength") else 6 * len(text)
        x, y = xy
        x -= {"l": 0, "m": w / 2, "r": w}[anchor[0]]
        y -= {"a": 0, "m": 5, "d": 10, "s": 10, "t": 0, "b": 10}.get(anchor[1], 0)
        draw.text((x, y), text, fill=fill, font=_font())


def _panel(draw, box, xlim, ylim, xticks, yticks, title, xlabel, ylabel):
    """Axes frame with ticks; returns a function (x, y) data -> pixel."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    sx = lambda x: x0 + (x - xlim[0]) / max(xlim[1] - xlim[0], 1e-9) * (x1 - x0)  # noqa: E731
    sy = lambda y: y1 - (y - ylim[0]) / max(ylim[1] - ylim[0], 1e-9) * (y1 - y0)  # noqa: E731
    for t in yticks:
        draw.line([(x0, sy(t)), (x1, sy(t))], fill=(225, 225, 225))
        _text(draw, (x0 - 4, sy(t)), f"{t:g}", anchor="rm")
    for t in xticks:
        draw.line([(sx(t), y1), (sx(t), y1 + 4)], fill=(0, 0, 0))
        _text(draw, (sx(t), y1 + 6), f"{t:g}", anchor="ma")
    draw.rectangle(box, outline=(0, 0, 0))
    _text(draw, ((x0 + x1) / 2, y0 - 16), title, anchor="ma")
    _text(draw, ((x0 + x1) / 2, y1 + 20), xlabel, anchor="ma")
    _text(draw, (x0 - 34, y0 - 16), ylabel, anchor="la")
    return lambda x, y: (sx(x), sy(y))


EDIT_UNITS = {"volume": "edit points per volume", "slice": "points per slice"}


def plot_dice_vs_edits(path, panels: Sequence[tuple]) -> Path:
    """Mean Dice (x100, with 95% CI whiskers) against the number of edits. panels: (title, protocol,
    {legend label: [summary settings]}) each; a label keeps its colour in every panel."""
    from PIL import Image, ImageDraw

    pw, ph, margin = 420, 300, 60
    labels = list(dict.fromkeys(label for _, _, lines in panels for label in lines))
    colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    legend_w = max([170] + [int(6.5 * len(label)) + 50 for label in labels])
    img = Image.new("RGB", (margin + len(panels) * (pw + margin) + legend_w, max(ph + 2 * margin + 10, 2 * margin + 18 * len(labels))),
                    "white")
    draw = ImageDraw.Draw(img)
    for i, (title, protocol, lines) in enumerate(panels):
        ss = [s for pts in lines.values() for s in pts]
        xmax = max(1, max(s["edits"] for s in ss))
        ymin = max(0.0, math.floor(min(s["ci_low"] for s in ss) * 100 / 10) * 10)
        box = (margin + i * (pw + margin), margin, margin + i * (pw + margin) + pw, margin + ph)
        to_px = _panel(draw, box, (0, xmax), (ymin, 100), sorted({s["edits"] for s in ss}), list(range(int(ymin), 101, 10)),
                       title, f"number of edits ({EDIT_UNITS[protocol]})", "Dice")
        for label, pts in lines.items():
            pts = sorted(pts, key=lambda s: s["edits"])
            c = colors[label]
            xy = [to_px(s["edits"], s["mean_dice"] * 100) for s in pts]
            if len(xy) > 1:
                draw.line(xy, fill=c, width=2)
            for s, (px, py) in zip(pts, xy):
                _, ylo = to_px(s["edits"], s["ci_low"] * 100)
                _, yhi = to_px(s["edits"], s["ci_high"] * 100)
                draw.line([(px, ylo), (px, yhi)], fill=c, width=1)
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
    lx = margin + len(panels) * (pw + margin) - 40
    for j, label in enumerate(labels):
        y = margin + 10 + 18 * j
        draw.line([(lx, y), (lx + 20, y)], fill=colors[label], width=3)
        _text(draw, (lx + 26, y), label, anchor="lm")
    return save_png_atomically(path, img)


def plot_edits(path, summary: dict, model: str) -> Path:
    """Figure 3: one model's Dice against edits, a panel per protocol, a line per prompt and propagation."""
    panels = []
    for protocol in ("volume", "slice"):
        ss = sorted((s for s in summary["settings"] if s["protocol"] == protocol),
                    key=lambda s: _setting_sort(_setting(s)))
        lines = {}
        for s in ss:
            label = s["prompt"] if s["propagation"] == "none" else f"{s['prompt']}, {s['propagation']} propagation"
            lines.setdefault(label, []).append(s)
        if lines:
            panels.append((f"{model}: {protocol}-level", protocol, lines))
    return plot_dice_vs_edits(path, panels)


def plot_per_structure(path, per_structure: Sequence[dict], model: str) -> Path:
    """Figure 2a: per-structure mean Dice (bars) with 95% CI whiskers, one bar per setting, at each
    setting's fewest-edits checkpoint; structures in the order of `per_structure` (breakdown's)."""
    from PIL import Image, ImageDraw

    first = {}
    for r in sorted(per_structure, key=lambda r: _setting_sort(_setting(r))):
        first.setdefault((r["protocol"], r["prompt"], r["propagation"]), r["edits"])
    keep = [r for r in per_structure if first.get((r["protocol"], r["prompt"], r["propagation"])) == r["edits"]]
    names = list(dict.fromkeys(r["structure"] for r in keep))
    settings = list(first)
    bar_h, gap = 8, 6
    row_h = bar_h * max(1, len(settings)) + gap
    left, top, width = 190, 50, 420
    img = Image.new("RGB", (left + width + 230, top + row_h * max(1, len(names)) + 50), "white")
    draw = ImageDraw.Draw(img)
    sx = lambda v: left + v * width  # noqa: E731
    for t in range(0, 101, 20):
        draw.line([(sx(t / 100), top - 4), (sx(t / 100), top + row_h * len(names))], fill=(225, 225, 225))
        _text(draw, (sx(t / 100), top + row_h * len(names) + 4), str(t), anchor="ma")
    _text(draw, (left + width / 2, top + row_h * len(names) + 20), "Dice (x100), 95% CI whiskers", anchor="ma")
    _text(draw, (left, 12), f"{model}: Dice per structure", anchor="la")
    by = {(r["structure"], r["protocol"], r["prompt"], r["propagation"]): r for r in keep}
    for i, name in enumerate(names):
        y = top + i * row_h
        _text(draw, (left - 6, y + row_h / 2 - gap / 2), name[:30], anchor="rm")
        for j, s in enumerate(settings):
            r = by.get((name, *s))
            if r is None:
                continue
            c = PALETTE[j % len(PALETTE)]
            yy = y + j * bar_h
            draw.rectangle([sx(0), yy, sx(r["mean_dice"]), yy + bar_h - 2], fill=c)
            cy = yy + (bar_h - 2) / 2
            draw.line([(sx(r["ci_low"]), cy), (sx(r["ci_high"]), cy)], fill=(0, 0, 0))
    for j, s in enumerate(settings):
        y = top + 18 * j
        draw.rectangle([left + width + 20, y, left + width + 32, y + 10], fill=PALETTE[j % len(PALETTE)])
        _text(draw, (left + width + 38, y + 5), "/".join(map(str, s)) + f" (E={first[s]})", anchor="lm")
    return save_png_atomically(path, img)


def plot_worst_cases(path, worst: Sequence, *, window: tuple[float, float], tile: int = 256) -> Optional[Path]:
    """Montage of the worst objects: the slice with the most errors through `window` (the level, width
    the model saw, in the units of its intensity), radiological view (patient right on the left, anterior up), ground truth
    green, prediction red, overlap yellow."""
    from PIL import Image, ImageDraw

    if not worst:
        return None
    cols = min(4, len(worst))
    rows_n = math.ceil(len(worst) / cols)
    label_h = 30
    img = Image.new("RGB", (cols * tile, rows_n * (tile + label_h)), "white")
    draw = ImageDraw.Draw(img)
    for i, w in enumerate(worst):
        # RAS canonical slice (rows = y = A, columns = x = R): flip both for the radiological view.
        ct = window_unit(w.image, window)[::-1, ::-1]
        gt, pred = mask_contour(w.gt)[::-1, ::-1], mask_contour(w.pred)[::-1, ::-1]
        rgb = np.repeat((ct * 255).astype(np.uint8)[..., None], 3, axis=2)
        rgb[gt] = (0, 220, 0)
        rgb[pred] = (230, 30, 30)
        rgb[gt & pred] = (240, 220, 0)
        h, wd = rgb.shape[:2]
        sx, sy = w.spacing
        phys_w, phys_h = wd * sx, h * sy
        scale = tile / max(phys_w, phys_h)
        size = (max(1, round(phys_w * scale)), max(1, round(phys_h * scale)))
        pic = Image.fromarray(rgb).resize(size, Image.NEAREST)
        r, c = divmod(i, cols)
        x, y = c * tile, r * (tile + label_h)
        img.paste(pic, (x + (tile - size[0]) // 2, y + label_h + (tile - size[1]) // 2))
        _text(draw, (x + 4, y + 2), f"{w.case}: {w.structure} Dice {w.dice * 100:.1f}"[:44])
        _text(draw, (x + 4, y + 15), f"{w.setting} E={w.edits} slice {w.slice}"[:44], fill=(80, 80, 80))
    return save_png_atomically(path, img)


REPORT_FILES = ("scores.csv", "summary.json", "summary.md", "breakdown.json", "edits.png", "per_structure.png",
                "worst_cases.png")


def remove_report(out_dir) -> None:
    """Removes the report files in out_dir (before a new report, or a new run's record, goes there)."""
    for name in REPORT_FILES:
        (Path(out_dir) / name).unlink(missing_ok=True)


def write_report(out_dir, result, *, model: str, options: dict, window: tuple[float, float], seed: int = 0,
                 num_resamples: int = DEFAULT_BOOTSTRAP, intensity: str = "hu") -> dict:
    """Writes every output file into out_dir, after removing those of an earlier report there;
    returns the summary dict. window: the (level, width) the model saw (VolumePredictor.window), in
    the units of `intensity` (VolumePredictor.intensity), for the montage."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_report(out)
    write_scores_csv(out / "scores.csv", result.rows)
    summary = summarize(result.rows, seed=seed, num_resamples=num_resamples)
    write_text_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    extra = breakdown(result.rows, seed=seed, num_resamples=num_resamples)
    write_text_atomically(out / "breakdown.json", json.dumps({**extra, "timings": result.timings,
                                                    "skipped": [list(s) for s in result.skipped],
                                                    "partial": options.get("partial")}, indent=2) + "\n")
    write_summary_md(out / "summary.md", summary, extra, model=model,
                     options={**options, "resamples": num_resamples, "window": window, "intensity": intensity},
                     timings=result.timings, skipped=result.skipped)
    plot_edits(out / "edits.png", summary, model)
    plot_per_structure(out / "per_structure.png", extra["per_structure"], model)
    plot_worst_cases(out / "worst_cases.png", result.worst, window=window)
    return summary


def write_record_report(out_dir, record, *, num_resamples: int = DEFAULT_BOOTSTRAP, worst: Optional[int] = None,
                        model: Optional[str] = None):
    """The report of a whole run from its record (a finished RunRecord, or `merge_records` of its
    shards): writes it into out_dir and returns (summary dict, EvalResult). worst: objects in the
    montage, at most the number the run kept (its --worst); model: a name other than the run's."""
    identity, shown = record.run["identity"], record.run["report"]
    result = record.result(identity.get("structures") or ())
    objects = sum(len(structures) for _, structures in identity["cases"])
    partial = None if record.complete else f"{len(record.finished())} of {objects} objects finished"
    if worst is not None:
        if worst > identity["worst"]:
            raise ValueError(f"--worst {worst}: the run kept its {identity['worst']} worst objects (its --worst)")
        result.worst = result.worst[:worst]
    if not result.rows:
        raise ValueError(f"no object was evaluated in the run's {len(identity['cases'])} case(s)")
    options = {**shown["options"], "cases": len(identity["cases"]), "partial": partial}
    summary = write_report(out_dir, result, model=model or shown["model"], options=options,
                           window=tuple(shown["window"]), seed=identity["seed"], num_resamples=num_resamples,
                           intensity=shown.get("intensity", "hu"))
    return summary, result
