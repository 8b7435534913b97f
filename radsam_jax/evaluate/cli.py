"""`radsam evaluate`: the paper's benchmark on a dataset (or one image) with a simulated user.

    radsam evaluate --checkpoint CKPT --data PATH --protocol volume,slice --prompt box,point
                    --edits 0,1,2,5,10,20 [--propagation mask,box] [--structures a,b] [--seed N]
                    [--min-slices N] [--known-classes FILE|a,b|amos] --out DIR
    radsam evaluate --checkpoint CKPT --data IMAGE --labels LABELS.nii.gz --label-names NAMES.json ...

PATH: a dataset in the AMOS layout (dataset.json), the TotalSegmentator layout (meta.csv or
sXXXX/ct.nii.gz) or the generic layout (labels.json in it or in its sub-folders); or one image (a
NIfTI file or a DICOM folder) with --labels and --label-names (JSON {"label_map": {"1": "spleen"}}).
A label map on another voxel grid of the same world space is aligned through world coordinates.
Comma lists of --protocol/--prompt/--propagation run every combination from the same cached
embeddings. Baselines: SAM / MedSAM checkpoints from `radsam convert` run with --propagation box
(MedSAM's preprocessing comes from its checkpoint config).

Long runs: every finished object goes into --out at once (run.json, objects.jsonl, worst_cases.npz;
evaluate/record.py), so after Ctrl-C, a preemption or a crash the same command continues where the
run stopped, with the scores an uninterrupted run gives; once finished, it evaluates nothing and
writes the report again (--restart computes it again). A case whose files cannot be read is named
and left for later (exit 2) while the others are evaluated. --shard I/N evaluates every N-th case from
the I-th (one process, GPU or host per shard, each with its own --out); `radsam report` merges the
shards' folders into one report:

    radsam evaluate ... --shard 0/4 --out eval/0   # ... up to --shard 3/4 --out eval/3
    radsam report eval/0 eval/1 eval/2 eval/3 --out eval/all

Exit status: 0 ok, 2 bad input, 1 failure, 130 interrupted (the record keeps the finished objects).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from radsam_jax.cli import InputError, reporting_errors
from radsam_jax.inference.cli import add_predictor_options, parse_shard, predictor_option_problem

PROG = "radsam evaluate"


def _csv(text: str) -> list[str]:
    return [t.strip() for t in str(text).split(",") if t.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `evaluate`, `report` and `compare` subcommands; dispatch with `args.func(args)`."""
    p = subparsers.add_parser(
        "evaluate", help="run the RadSAM benchmark (3D Dice, CIs, tables, plots) with a simulated user",
        description="Volume-level and slice-level prompting with simulated prompts and edits; writes scores.csv, "
                    "summary.json, summary.md and PNG plots to --out.",
    )
    p.add_argument("--checkpoint", required=True, help="model checkpoint directory (radsam train / radsam convert)")
    p.add_argument("--data", required=True, metavar="PATH", help="AMOS, TotalSegmentator or generic dataset folder, or one image with --labels")
    p.add_argument("--labels", metavar="LABELS.nii.gz", help="label map of the single image given as --data")
    p.add_argument("--label-names", metavar="NAMES.json", help='{"label_map": {"1": "spleen", ...}} for --labels')
    p.add_argument("--split", default="auto", help="dataset split (default: AMOS val, TotalSegmentator test if meta.csv else all, generic all)")
    p.add_argument("--modality", default="CT",
                   help="AMOS modality: CT, MRI or all (default CT; MRI needs intensity 'percentile')")
    p.add_argument("--protocol", default="volume", help="volume, slice, or both comma-separated (default volume)")
    p.add_argument("--prompt", default="box", help="box, point, or both comma-separated (default box)")
    p.add_argument("--propagation", default="mask", help="volume-level: mask (RadSAM), box (SAM/MedSAM), or both comma-separated (default mask)")
    p.add_argument("--edits", type=_int_list, default=[0], metavar="0,1,2,5,10,20",
                   help="edit counts to record in one cumulative run (slice-level: points per slice, at most 10; default 0)")
    p.add_argument("--structures", metavar="a,b", help="only these structures (names from the label map)")
    p.add_argument("--known-classes", metavar="FILE|a,b|amos",
                   help="classes the model was trained on, each a structure of the label maps, or 'amos' (AMOS's "
                        "15 classes under their AMOS and TotalSegmentator names): adds the known/unknown split (Table 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated user and the bootstrap (default 0)")
    p.add_argument("--min-slices", type=int, default=1, metavar="N", help="skip objects spanning fewer than N slices (default 1)")
    p.add_argument("--box-jitter", type=float, nargs=2, metavar=("LO", "HI"),
                   help="move each box side outwards by U(LO, HI) pixels at a 1024 input, as training's "
                        "data.prompts.box_jitter (-5 20 in the paper's setting): LO * L / 1024 voxels on a slice whose "
                        "longest side is L voxels (default: no jitter, the tight box)")
    p.add_argument("--max-cases", type=int, metavar="N", help="evaluate only the first N cases")
    p.add_argument("--no-oracle", action="store_true", help="skip the oracle Dice (slice-level secondary masks)")
    p.add_argument("--bootstrap", type=int, default=10_000, metavar="N", help="bootstrap resamples for the CIs (default 10000)")
    p.add_argument("--worst", type=int, default=8, metavar="N", help="worst objects in worst_cases.png (default 8)")
    p.add_argument("--name", help="model name in tables and plots (default: the checkpoint folder name)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: the report, and the run's record (a stopped run continues from it)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                   help="evaluate cases I, I+N, I+2N, ... (0 <= I < N) and write no report: `radsam report` merges the N folders")
    p.add_argument("--restart", action="store_true", help="discard the run record in --out and start again")
    add_predictor_options(p.add_argument_group("inference"))
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    add_report_parser(subparsers)
    add_compare_parser(subparsers)
    return p


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="write the benchmark report of an evaluation, or of all the shards of one",
        description="Reads the run records that `radsam evaluate` leaves in its --out folders (one finished run, "
                    "or every shard of one, each finished) and writes scores.csv, summary.json, summary.md, "
                    "breakdown.json and the plots to --out.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="--out folders of `radsam evaluate`")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (may be a RUN_DIR)")
    p.add_argument("--bootstrap", type=int, default=10_000, metavar="N", help="bootstrap resamples for the CIs (default 10000)")
    p.add_argument("--worst", type=int, metavar="N", help="worst objects in worst_cases.png (default: all the runs kept)")
    p.add_argument("--name", help="model name in tables and plots (default: the run's)")
    p.add_argument("--partial", action="store_true",
                   help="also from unfinished runs: the objects finished so far (summary.md says how many)")
    p.set_defaults(func=run_report)
    return p


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare", help="compare several models' benchmark reports (Table 1, paired differences with CIs)",
        description="Reads scores.csv from report folders (`radsam evaluate` / `radsam report` --out) and writes "
                    "compare.md (Table 1 of every model, and per setting the paired Dice difference of each model "
                    "against the first with a bootstrap CI), compare.json and compare_edits.png to --out. Only the "
                    "objects every report evaluated are scored.",
    )
    p.add_argument("reports", nargs="+", metavar="REPORT_DIR", help="report folders; the first is the baseline")
    p.add_argument("--names", metavar="a,b", help="model names, one per folder (default: the folder names)")
    p.add_argument("--paper", action="store_true",
                   help="add the paper's Table 1 rows (AMOS validation, ViT-B; other data, for orientation)")
    p.add_argument("--bootstrap", type=int, default=10_000, metavar="N", help="bootstrap resamples for the CIs (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=run_compare)
    return p


# ----------------------------------------------------------------------------------- data


def dataset_layout(path: Path) -> str:
    """'amos', 'totalsegmentator' or 'generic' from the files in a dataset folder."""
    if not path.exists():
        raise InputError(f"--data {path} does not exist")
    if not path.is_dir():
        raise InputError(f"--data {path} is a file: give --labels and --label-names to evaluate one image")
    from radsam_jax.data.datasets import FORMATS, layout_problem

    for format in FORMATS:  # the layout checks of training configs
        if layout_problem(format, path) is None:
            return format
    raise InputError(
        f"no dataset found at {path}: expected dataset.json with imagesTr/ and labelsTr/ or imagesVa/ and labelsVa/ "
        f"(AMOS), subject folders with ct.nii.gz and segmentations/ (TotalSegmentator), or labels.json in it or its "
        f"sub-folders (generic); for one image pass --labels and --label-names")


def _single_image_case(args):
    from radsam_jax.data.datasets import Case, structure_ids
    from radsam_jax.io import nifti_stem, read_json
    from radsam_jax.intensity import UNKNOWN_MODALITY

    if not args.labels or not args.label_names:
        raise InputError("one image as --data needs both --labels LABELS.nii.gz and --label-names NAMES.json")
    for what, f in (("--data", args.data), ("--labels", args.labels), ("--label-names", args.label_names)):
        if not Path(f).exists():
            raise InputError(f"{what} {f} does not exist")
    try:
        meta = read_json(Path(args.label_names))
    except ValueError as e:
        raise InputError(f"--label-names {e}") from None
    names = meta.get("label_map", meta.get("labels")) if isinstance(meta, dict) else None
    if not isinstance(names, dict):
        raise InputError(f'--label-names {args.label_names} needs {{"label_map": {{"1": "name", ...}}}}')
    try:
        structures = structure_ids(names, f"--label-names {args.label_names}")
    except ValueError as e:
        raise InputError(str(e)) from None
    if not structures:
        raise InputError(f"--label-names {args.label_names} names no structure besides background")
    image = Path(args.data)
    case_id = nifti_stem(image.name) if image.is_file() else image.name
    return Case(case_id, str(image), structures, label_path=str(args.labels),
                modality=UNKNOWN_MODALITY)  # only datasets' layouts declare one


def read_dataset(args):
    """The cases to evaluate (structures filtered), a description of the source, the requested
    structures, and the names of every structure in the label maps (before --structures)."""
    from radsam_jax.data.datasets import read_cases, select_structures

    data = Path(args.data)
    structures = _csv(args.structures) if args.structures else None
    if args.labels or args.label_names or data.is_file() or (data.is_dir() and _is_dicom_folder(data)):
        cases = [_single_image_case(args)]
        fmt = "image"
    else:
        fmt = dataset_layout(data)
        split = args.split
        if split == "auto":
            split = {"amos": "val", "generic": "all"}.get(fmt) or ("test" if (data / "meta.csv").is_file() else "all")
        kwargs = {"modality": args.modality} if fmt == "amos" else {}
        cases = read_cases(fmt, data, split, **kwargs)
    names = sorted(set().union(*(c.structures for c in cases)))
    if structures:
        cases = select_structures(cases, structures)
    if args.max_cases is not None:
        if args.max_cases < 1:
            raise InputError(f"--max-cases must be >= 1, got {args.max_cases}")
        cases = cases[: args.max_cases]
    if not cases:
        raise InputError(f"no case to evaluate in {data}" + (f" with structures {structures}" if structures else ""))
    return cases, fmt, structures, names


def _is_dicom_folder(path: Path) -> bool:
    if (path / "labels.json").exists() or (path / "dataset.json").exists():
        return False
    files = [p for p in path.iterdir() if p.is_file()]
    return bool(files) and all(p.suffix.lower() in (".dcm", "") for p in files[:20]) and not any(p.is_dir() for p in path.iterdir())


# ----------------------------------------------------------------------------------- run


def _identity(model, predictor, cases, settings, args, structures, known) -> dict:
    """What decides the run's scores (record.py): equal identities give equal rows."""
    from radsam_jax.evaluate.record import model_fingerprint, without_later_defaults

    return without_later_defaults({"model_sha256": model_fingerprint(model), "cases": [[c.case_id, dict(c.structures)] for c in cases],
            "settings": [s.key for s in settings], "edits": sorted(set(args.edits)), "seed": args.seed,
            "min_slices": args.min_slices,
            # 1024-input pixels; a record whose jitter was in voxels (before) holds a plain list: not continued
            "box_jitter": {"px_at_1024": list(args.box_jitter)} if args.box_jitter else None,
            "known_classes": sorted(known) if known is not None else None, "oracle": not args.no_oracle,
            "structures": structures, "dtype": args.dtype, "window": [float(v) for v in predictor.window],
            "vanish_policy": args.vanish_policy, "worst": args.worst, "intensity": predictor.intensity})


def _check_intensity(cases, args) -> None:
    """InputError for MR cases evaluated in Hounsfield units, a warning for CT cases normalised by
    percentiles; from the checkpoint's header (the weights are not read yet) or --intensity."""
    from radsam_jax.checkpoint import load_config
    from radsam_jax.intensity import modality_mismatches

    intensity = args.intensity or load_config(args.checkpoint).intensity
    not_ct, ct = modality_mismatches(cases, intensity)
    if not_ct:
        raise InputError(f"case(s) {', '.join(not_ct[:5])} are not CT, but the model windows Hounsfield units "
                         f"(intensity 'hu'): evaluate MR cases with a model trained on them (intensity "
                         f"'percentile') or pass --intensity percentile")
    if ct:
        print(f"{PROG}: warning: {len(ct)} CT case(s) ({', '.join(ct[:5])}) are normalised by their percentiles "
              f"(intensity 'percentile'), which discards what Hounsfield units mean", file=sys.stderr)


def _check_counts(args, minimums: dict) -> None:
    """InputError for an option below its minimum ({"--bootstrap": 1, ...}; None: the option's default)."""
    for flag, lo in minimums.items():
        v = getattr(args, flag.lstrip("-").replace("-", "_"))
        if v is not None and v < lo:
            raise InputError(f"{flag} must be >= {lo}, got {v}")


def _output_folder(path) -> Path:
    """--out created and writable now, not found unwritable after a run of hours."""
    from radsam_jax.io import check_output_path

    try:
        return check_output_path(path, "--out", folder=True, create=True)
    except ValueError as e:
        raise InputError(str(e)) from None


def _evaluate(args) -> int:
    from radsam_jax.data.datasets import select_shard
    from radsam_jax.evaluate.metrics import parse_known_classes
    from radsam_jax.evaluate.record import RunRecord
    from radsam_jax.evaluate.report import write_record_report
    from radsam_jax.evaluate.runner import EvalOptions
    from radsam_jax.intensity import window_caption

    settings = _checked_settings(args)
    cases, fmt, structures, names = read_dataset(args)
    index, count = args.shard
    mine = select_shard(cases, args.shard)
    if not mine:  # more shards than cases (a Slurm array over a small dataset): an empty, finished shard
        print(f"{PROG}: --shard {index}/{count} has no case (the run has {len(cases)}): it records an empty shard, "
              f"which radsam report merges with the others", file=sys.stderr)
    known = parse_known_classes(args.known_classes, valid=names)
    _check_intensity(cases, args)
    out = _output_folder(args.out)
    model, predictor = _load_predictor(args, settings)
    options = EvalOptions(edits=args.edits, seed=args.seed, min_slices=args.min_slices,
                          box_jitter=tuple(args.box_jitter) if args.box_jitter else None, known_classes=known,
                          oracle=not args.no_oracle, worst_count=args.worst, requested_structures=structures,
                          shard=args.shard)
    name = args.name or Path(args.checkpoint).resolve().name
    run = _run_description(args, model, predictor, cases, settings, structures, known, name)
    with RunRecord.open(out, run, restart=args.restart) as record:
        shard_text = f" (shard {index}/{count}: {len(mine)} of {len(cases)})" if count > 1 else ""
        print(f"{PROG}: {len(cases)} case(s) ({fmt}){shard_text}, settings {', '.join(s.key for s in settings)}, "
              f"edits {sorted(set(args.edits))}, model {name} ({model.config.name}, preprocessing {model.config.preprocessing}, "
              f"{window_caption(predictor.window, predictor.intensity)}, {model.config.mask_prompt} mask prompts)", file=sys.stderr)
        objects = {(c.case_id, n) for c in mine for n in c.structures}
        _tell_record_state(record, run, objects, out)
        stopped = _evaluate_into(record, cases, predictor, settings, options, objects, out, args)
        if stopped is not None:
            return stopped
        if count > 1:
            print(f"{PROG}: shard {index}/{count} finished ({len(objects)} object(s) in {out}); once every shard is: "
                  f"radsam report <the {count} --out folders> --out DIR", file=sys.stderr)
            return 0
        try:
            summary, result = write_record_report(out, record, num_resamples=args.bootstrap)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted while writing the report; the run is finished and recorded in {out}: "
                  f"the same command (or radsam report {out} --out {out}) writes it", file=sys.stderr)
            return 130
    return _finish(summary, result, out, args.out)


def _checked_settings(args) -> list:
    """The settings of the command line; InputError for options that cannot run, a warning for edit
    counts the slice-level protocol does not reach."""
    from radsam_jax.evaluate.runner import SLICE_EDITS_MAX, make_settings

    settings = make_settings(_csv(args.protocol), _csv(args.prompt), _csv(args.propagation))
    if not args.edits:
        raise InputError("--edits needs at least one count, e.g. 0 or 0,1,2,5,10,20")
    beyond = sorted({e for e in args.edits if e > SLICE_EDITS_MAX})
    if beyond and any(s.protocol == "slice" for s in settings):
        where = ("run at the volume level only" if any(s.protocol == "volume" for s in settings)
                 else "not evaluated (--protocol volume runs them)")
        print(f"{PROG}: warning: the slice-level protocol stops at {SLICE_EDITS_MAX} edits per slice, so --edits "
              f"{','.join(map(str, beyond))} {'is' if len(beyond) == 1 else 'are'} {where}", file=sys.stderr)
    problem = predictor_option_problem(args)
    if problem:
        raise InputError(problem)
    _check_counts(args, {"--min-slices": 1, "--bootstrap": 1, "--worst": 0, "--seed": 0})
    if args.box_jitter is not None and args.box_jitter[0] > args.box_jitter[1]:
        raise InputError(f"--box-jitter LO HI needs LO <= HI, got {args.box_jitter}")
    if not Path(args.checkpoint).exists():
        raise InputError(f"--checkpoint {args.checkpoint} does not exist")
    return settings


def _load_predictor(args, settings) -> tuple:
    """(model, VolumePredictor) with room for every click the settings' edits can place on one slice."""
    from radsam_jax.checkpoint import load_checkpoint
    from radsam_jax.evaluate.runner import SLICE_EDITS_MAX
    from radsam_jax.inference import VolumePredictor
    from radsam_jax.inference.volume_predictor import DEFAULT_MAX_POINTS

    model = load_checkpoint(args.checkpoint, dtype=args.dtype)
    volume_edits = max([e for e in args.edits] + [0]) if any(s.protocol == "volume" for s in settings) else 0
    # Every click of a volume-level run may land on the same slice (plus the initial point).
    max_points = max(DEFAULT_MAX_POINTS, 2 + volume_edits, 2 + SLICE_EDITS_MAX)
    predictor = VolumePredictor(model, encoder_batch_size=args.encoder_batch_size, vanish_policy=args.vanish_policy,
                                bucket=args.bucket, max_points=max_points, window=args.window,
                                intensity=args.intensity)
    return model, predictor


def _run_description(args, model, predictor, cases, settings, structures, known, name: str) -> dict:
    """The run's record header: its identity (what a continued run must share), shard, report options,
    code fingerprint and input paths."""
    from radsam_jax.evaluate.record import code_fingerprint
    from radsam_jax.evaluate.runner import SLICE_EDITS_MAX

    shown = {"data": args.data, "checkpoint": args.checkpoint, "seed": args.seed, "min_slices": args.min_slices,
             "jitter": f"U({args.box_jitter[0]:g}, {args.box_jitter[1]:g}) px at a 1024 input" if args.box_jitter else None,
             "vanish_policy": args.vanish_policy, "slice_edits_max": SLICE_EDITS_MAX, "mask_prompt": predictor.config.mask_prompt}
    inputs = {what: str(Path(v).resolve()) for what, v in (("data", args.data), ("labels", args.labels)) if v}
    return {"identity": _identity(model, predictor, cases, settings, args, structures, known), "shard": list(args.shard),
            "report": {"model": name, "options": shown, "window": [float(v) for v in predictor.window],
                       "intensity": predictor.intensity},
            "code_sha256": [code_fingerprint()], "inputs": inputs}


def _tell_record_state(record, run: dict, objects: set, out: Path) -> None:
    """Says whether `out` holds this run finished (nothing to do) or in part (continued), with warnings
    for other code or other input paths than the run started with."""
    if record.complete:
        other_code = record.run["code_sha256"] != run["code_sha256"]  # it lists every invocation's code
        print(f"{PROG}: {out} holds this run, finished" + (" (partly) by other radsam-jax code" if other_code else "")
              + ": nothing to evaluate (--restart computes it again" + (" with this code)" if other_code else ")"),
              file=sys.stderr)
    elif record.finished() & objects:
        print(f"{PROG}: continuing the run recorded in {out}: {len(record.finished() & objects)} of {len(objects)} "
              f"object(s) done (--restart starts again)", file=sys.stderr)
        if len(record.run["code_sha256"]) > 1:
            print(f"{PROG}: warning: radsam-jax's code differs from the code that started this run (its Python "
                  f"files changed): the report will mix scores of both; --restart computes them all again", file=sys.stderr)
        inputs = run["inputs"]
        if record.run.get("inputs", inputs) != inputs:
            print(f"{PROG}: warning: this run started on {record.run.get('inputs')}, this command reads {inputs} "
                  f"(same cases and structures)", file=sys.stderr)


def _evaluate_into(record, cases, predictor, settings, options, objects: set, out: Path, args) -> int | None:
    """evaluate_cases into `record`; 130 after Ctrl-C, None when finished. On an error, says which
    objects are kept and how to continue, then raises it."""
    from radsam_jax.data.datasets import load_case
    from radsam_jax.evaluate.record import OBJECTS_FILE
    from radsam_jax.evaluate.runner import EvaluationInterrupted, UnreadableCases, evaluate_cases

    try:
        evaluate_cases(cases, predictor, settings, options, load_case=load_case, progress=not args.no_progress,
                       record=record)
    except EvaluationInterrupted:
        print(f"{PROG}: interrupted; {len(record.finished() & objects)} of {len(objects)} object(s) finished and kept "
              f"in {out / OBJECTS_FILE}: the same command continues the run", file=sys.stderr)
        return 130
    except UnreadableCases as e:
        done = len(record.finished() & objects)
        print(f"{PROG}: the other cases are evaluated: {done} of {len(objects)} object(s) are kept in {out}; "
              f"once the file(s) are mended, the same command evaluates the {len(e.failures)} case(s) left "
              f"(radsam report {out} --partial --out DIR reports the finished objects now)", file=sys.stderr)
        raise
    except Exception:
        if record.finished() & objects and not record.complete:
            print(f"{PROG}: the {len(record.finished() & objects)} finished object(s) are kept in {out}: "
                  f"once the problem is mended, the same command continues the run", file=sys.stderr)
        raise
    return None


def _finish(summary: dict, result, out: Path, where) -> int:
    for s in summary["settings"]:
        print(f"{s['protocol']:6s} {s['prompt']:5s} {s['propagation']:4s} edits={s['edits']:<3d} "
              f"Dice {s['mean_dice'] * 100:6.2f} [{s['ci_low'] * 100:.2f}, {s['ci_high'] * 100:.2f}] n={s['n']}"
              + ("" if s["clicks_honoured"] is None else f" clicks honoured {s['clicks_honoured']:.0%} of {s['clicks']}"))
    print(f"wrote {out / 'summary.md'}")
    if result.missing_structures:
        raise InputError(f"structure(s) {result.missing_structures} absent from every label map (no voxel in any case); "
                         f"the other structures were evaluated and written to {where}")
    return 0


def _report(args) -> int:
    from radsam_jax.evaluate.record import RUN_FILE, RunRecord, merge_records
    from radsam_jax.evaluate.report import write_record_report

    _check_counts(args, {"--bootstrap": 1, "--worst": 0})
    records = [RunRecord.load(path) for path in args.runs]
    record = merge_records(records, partial=args.partial)
    if len({code for r in records for code in r.run.get("code_sha256") or []}) > 1:
        print("radsam report: warning: the records were written by different radsam-jax code (its Python files "
              "differ between them): the report mixes scores of both", file=sys.stderr)
    out = _output_folder(args.out)
    if (out / RUN_FILE).exists() and not any(out.resolve() == Path(run).resolve() for run in args.runs):
        raise InputError(f"--out {args.out} holds the record of another evaluation ({RUN_FILE}): this report would "
                         f"sit beside a record it does not describe; use another --out")
    summary, result = write_record_report(out, record, num_resamples=args.bootstrap, worst=args.worst, model=args.name)
    return _finish(summary, result, out, args.out)


def _compare(args) -> int:
    from radsam_jax.evaluate.compare import compare, write_comparison

    _check_counts(args, {"--bootstrap": 1, "--seed": 0})
    result = compare(args.reports, _csv(args.names) if args.names else None, seed=args.seed, num_resamples=args.bootstrap)
    out = _output_folder(args.out)
    path = write_comparison(out, result, paper=args.paper)
    base = result["models"][0]["name"]
    for m in result["models"][1:]:
        for d in m["differences"]:
            print(f"{m['name']} - {base}: {d['protocol']:6s} {d['prompt']:5s} edits={d['edits']:<3d} "
                  f"{d['propagation']}/{d['baseline_propagation']} {d['difference'] * 100:+6.2f} "
                  f"[{d['ci_low'] * 100:+.2f}, {d['ci_high'] * 100:+.2f}] n={d['n']}")
    for m in result["models"]:
        if m["partial"]:
            print(f"radsam compare: warning: {m['folder']} is a partial report ({m['partial']})", file=sys.stderr)
    print(f"wrote {path} ({result['shared_objects']} shared object(s))")
    return 0


run = reporting_errors(_evaluate)
run_report = reporting_errors(_report)
run_compare = reporting_errors(_compare)

