"""`radsam segment` and `radsam segment-batch`: `add_parser(subparsers)` registers both, `run(args)`
executes one and returns the exit status (0 ok, 1 a case failed or an unexpected error, 2 bad input).

    radsam segment IMAGE [--checkpoint CKPT] --slice K (--box X0 Y0 X1 Y1 | --point X Y [--negative X Y ...])
                   [--bounds LO HI] --out MASK.nii.gz [--preview PNG] [--prompts FILE.json] [--world]
                   [--labels LABELS.nii.gz --label-id N]
    radsam segment-batch MANIFEST --checkpoint CKPT --out-dir DIR

Coordinates are voxel indices of IMAGE: K along its S/I axis, X and Y along its other two axes in
array order (for the usual axial file X = first array axis, Y = second, K = third, the slice shown as
`array[:, :, K].T`; sagittal and coronal files are sliced along S/I too); with --world, X Y are RAS millimetres and K, LO, HI the z coordinate in
millimetres. The --prompts schema is in `radsam_jax.inference.prompt_file`. Every input, and every
destination (--out, --preview, --out-dir: the right kind of path, never an input file), is checked
before the model runs; the label map is written atomically at the very end (after the preview), so a
failed run leaves nothing at --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from radsam_jax.cli import InputError, reporting_errors

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_CHECKPOINT = ASSETS / "default_checkpoint"
SAMPLE_DIR = ASSETS / "sample"  # the bundled CT (ct-abdomen-3mm of ../shared/data) and its labels


def add_predictor_options(g) -> None:
    """The VolumePredictor options of segment, segment-batch and evaluate (checked by `predictor_option_problem`)."""
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (default float32)")
    g.add_argument("--encoder-batch-size", type=int, default=None, metavar="N",
                   help="slices per encoder call (default: 1 on a CPU, 8 on a GPU/TPU)")
    g.add_argument("--bucket", type=int, default=32, metavar="N",
                   help="pad slice counts to multiples of N so new volumes reuse compiled functions (default 32)")
    g.add_argument("--vanish-policy", choices=("stop", "continue"), default="stop",
                   help="when the propagated mask becomes empty: stop (later slices stay empty) or continue (default stop)")
    g.add_argument("--intensity", choices=("hu", "percentile"),
                   help="intensity units: hu (CT) or percentile (MRI: each volume's 0.5-99.5th percentiles of "
                        "voxels above 0 -> 0-1000); default: the model's")
    g.add_argument("--window", type=float, nargs=2, metavar=("LEVEL", "WIDTH"),
                   help="intensity window in those units (default: the one the model was trained with, its "
                        "ct_window; with another --intensity than the model's, 40 400 for hu, 500 1000 for percentile)")


def parse_shard(text: str) -> tuple[int, int]:
    """argparse type of --shard I/N (segment-batch, evaluate): (I, N) with 0 <= I < N."""
    from radsam_jax.data.datasets import select_shard

    index, _, count = str(text).partition("/")  # no "/": int("") fails
    try:
        shard = int(index), int(count)
        select_shard((), shard)  # checks 0 <= I < N
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, e.g. 0/4, got {text!r}") from None
    return shard


def predictor_option_problem(args) -> Optional[str]:
    """What is wrong with the `add_predictor_options` values of `args`, or None."""
    from radsam_jax.model.config import is_valid_ct_window

    if args.encoder_batch_size is not None and args.encoder_batch_size < 1:
        return f"--encoder-batch-size must be >= 1, got {args.encoder_batch_size}"
    if args.bucket < 1:
        return f"--bucket must be >= 1, got {args.bucket}"
    if args.window is not None and not is_valid_ct_window(args.window):
        return f"--window LEVEL WIDTH needs finite values and WIDTH > 0, got {args.window[0]:g} {args.window[1]:g}"
    return None


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and inference")
    add_predictor_options(g)
    g.add_argument("--world", action="store_true", help="coordinates are RAS millimetres (slice, bounds: z in mm)")


def add_parser(subparsers) -> None:
    """Registers `segment` and `segment-batch` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "segment", help="segment one object (or several, --prompts) in a CT volume from a 2D prompt",
        description="Volume-level RadSAM: a box or points on one slice, propagated slice by slice to the bounds.",
    )
    p.add_argument("image", help="NIfTI file (.nii, .nii.gz) or DICOM series folder")
    p.add_argument("--checkpoint", help=f"model checkpoint directory (default: the bundled {DEFAULT_CHECKPOINT.name}/ if present)")
    p.add_argument("--slice", type=float, metavar="K", help="prompted slice index (along the S/I axis: the third array axis of an axial file)")
    p.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="box prompt on the slice")
    p.add_argument("--point", type=float, nargs=2, action="append", metavar=("X", "Y"), help="positive point (repeatable)")
    p.add_argument("--negative", type=float, nargs=2, action="append", metavar=("X", "Y"), help="negative point (repeatable)")
    p.add_argument("--mask", metavar="DRAWN.nii.gz",
                   help="drawn mask prompt: a label map on IMAGE's grid (e.g. an annotation tool's) whose voxels > 0 "
                        "(or == --mask-label) on slice K are the object; for models with binary mask prompts")
    p.add_argument("--mask-label", type=int, metavar="N", help="the object's label in the --mask file (default: every voxel > 0)")
    p.add_argument("--bounds", type=float, nargs=2, metavar=("LO", "HI"),
                   help="the object's first and last slice, inclusive, LO <= HI as indices (a file stored top-down "
                        "has its top slice at LO); with --world, z in mm, inferior first (default: whole volume)")
    p.add_argument("--propagation", choices=("mask", "box"),
                   help="prompt each slice with the previous mask (RadSAM, default) or the box around it (SAM/MedSAM)")
    p.add_argument("--prompts", metavar="FILE.json", help="several objects and edits in one JSON file (instead of --slice/--box/--point)")
    p.add_argument("--out", required=True, metavar="MASK.nii.gz", help="output label map (input grid and affine)")
    p.add_argument("--label-value", type=int, metavar="V", help="value of the object in the output (default 1; with --prompts, each object's \"label\")")
    p.add_argument("--preview", metavar="PNG", help="write a PNG montage of the prompted slice and its neighbours")
    p.add_argument("--labels", metavar="LABELS.nii.gz", help="reference label map: print the Dice of each object")
    p.add_argument("--label-id", type=int, metavar="N", help="reference id compared with the object (--prompts: objects without reference_label)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_options(p)
    p.set_defaults(func=run)

    b = subparsers.add_parser(
        "segment-batch", help="segment every case of a manifest (CSV or JSON of image, prompts file)",
        description="Offline volume inference over a manifest; failed cases are reported and skipped, existing outputs are kept.",
    )
    b.add_argument("manifest", help="CSV (columns image,prompts[,id]) or JSON list of {image, prompts[, id]}")
    b.add_argument("--checkpoint", required=True, help="model checkpoint directory")
    b.add_argument("--out-dir", required=True, help="folder for <id>.nii.gz outputs and segment-batch-summary.json")
    b.add_argument("--previews", action="store_true", help="also write <id>.png montages")
    b.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                   help="segment cases I, I+N, I+2N, ... of the manifest (one process, GPU or host per shard, the same "
                        "--out-dir); the summary goes to segment-batch-summary-I-of-N.json")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_options(b)
    b.set_defaults(func=run)


def _load_model(checkpoint, dtype: str):
    from radsam_jax.checkpoint import load_checkpoint

    if checkpoint is None:
        if not DEFAULT_CHECKPOINT.is_dir():
            raise InputError(f"no --checkpoint given and no bundled default checkpoint at {DEFAULT_CHECKPOINT}; pass --checkpoint CKPT")
        checkpoint = DEFAULT_CHECKPOINT
    return load_checkpoint(checkpoint, dtype=dtype)


def _predictor(model, args):
    from radsam_jax.inference.volume_predictor import VolumePredictor

    problem = predictor_option_problem(args)
    if problem:
        raise InputError(problem)
    return VolumePredictor(model, encoder_batch_size=args.encoder_batch_size, vanish_policy=args.vanish_policy, bucket=args.bucket,
                           window=args.window, intensity=args.intensity)


def _objects_from_args(args, volume):
    """The single command-line object, through the same validation as a prompts file."""
    from radsam_jax.inference.prompt_file import parse_prompts

    if args.prompts:
        # No defaults for these options: a given one would be silently ignored (the file sets them per object).
        given = [n for n, v in (("--slice", args.slice), ("--box", args.box), ("--point", args.point),
                                ("--negative", args.negative), ("--bounds", args.bounds), ("--mask", args.mask),
                                ("--mask-label", args.mask_label),
                                ("--propagation", args.propagation), ("--label-value", args.label_value)) if v is not None]
        if given:
            raise InputError(f"--prompts replaces {', '.join(given)}: set them in the JSON file (per object) or drop --prompts")
        from radsam_jax.inference.prompt_file import load_prompts_file

        return load_prompts_file(args.prompts, volume.array.shape, volume.affine, world=args.world)
    if args.slice is None:
        raise InputError("--slice K is required (or --prompts FILE.json)")
    if args.box is None and not args.point and args.mask is None:
        raise InputError("a prompt is required: --box X0 Y0 X1 Y1, --point X Y or --mask DRAWN.nii.gz")
    if args.negative and not args.point and args.box is None:
        raise InputError("--negative needs a --point or --box")
    if args.mask_label is not None and args.mask is None:
        raise InputError("--mask-label needs --mask DRAWN.nii.gz")
    obj = {"slice": args.slice, "label": 1 if args.label_value is None else args.label_value,
           "propagation": args.propagation or "mask"}
    if args.box is not None:
        obj["box"] = list(args.box)
    pts = [list(p) for p in (args.point or [])] + [list(p) for p in (args.negative or [])]
    if pts:
        obj["points"] = pts
        obj["point_labels"] = [1] * len(args.point or []) + [0] * len(args.negative or [])
    if args.mask is not None:
        obj["mask"] = args.mask
        if args.mask_label is not None:
            obj["mask_label"] = args.mask_label
    if args.bounds is not None:
        obj["bounds"] = list(args.bounds)
    if args.label_id is not None:
        obj["reference_label"] = args.label_id
    return parse_prompts({"objects": [obj]}, volume.array.shape, volume.affine, world=args.world)


def _outputs(args) -> list[tuple[str, str]]:
    return [("--out", args.out)] + ([("--preview", args.preview)] if args.preview else [])


def _check_destinations(args) -> None:
    """--out and --preview: writable files that are neither an input nor each other (before any work;
    the drawn masks a prompts file names are checked once it is read)."""
    from radsam_jax.io import check_output_path, check_outputs_spare_inputs, is_nifti_path

    if not is_nifti_path(args.out):
        raise InputError(f"--out {args.out} must end with .nii or .nii.gz")
    if args.preview and Path(args.preview).suffix.lower() != ".png":
        raise InputError(f"--preview {args.preview} must end with .png (it is written as PNG)")
    for what, path in _outputs(args):
        check_output_path(path, what)
    inputs = [("image", args.image), ("--labels file", args.labels), ("--prompts file", args.prompts), ("--mask file", args.mask)]
    check_outputs_spare_inputs(_outputs(args), [(what, path) for what, path in inputs if path is not None])


def run_segment(args) -> int:
    from radsam_jax.io import load_label_map, load_volume
    from radsam_jax.evaluate.metrics import dice
    from radsam_jax.inference.batch import voxel_ml

    out = Path(args.out)
    _check_destinations(args)
    if args.labels is None and args.label_id is not None:
        raise InputError("--label-id needs --labels LABELS.nii.gz")
    t0 = time.perf_counter()
    volume = load_volume(args.image)
    objects = _objects_from_args(args, volume)
    from radsam_jax.inference.prompt_file import drawn_mask
    from radsam_jax.io import check_outputs_spare_inputs

    check_outputs_spare_inputs(_outputs(args), [(f"drawn mask file of {o.title}", o.mask_file) for o in objects
                                                if o.mask_file is not None])
    for o in objects:  # read (and kept) here: a bad file fails before the model loads
        if o.mask_file is not None:
            drawn_mask(o, volume)
    if args.label_id is not None:
        for o in objects:
            if o.reference_label is None:
                o.reference_label = args.label_id
    reference = None
    if args.labels is not None:
        if all(o.reference_label is None for o in objects):
            raise InputError("--labels needs --label-id N (or reference_label in the prompts file) to know which label to compare")
        reference = load_label_map(args.labels, like=volume)
        wanted = {o.reference_label for o in objects if o.reference_label is not None}
        absent = sorted(label for label in wanted if not (reference == label).any())  # not a sort of the whole map
        if absent:
            present = [int(v) for v in np.unique(reference) if v != 0]
            shown = ", ".join(map(str, present[:30])) + (f", ... ({len(present)} labels)" if len(present) > 30 else "")
            raise InputError(f"reference label(s) {absent} are absent from {args.labels} (its labels: {shown})")
    model = _load_model(args.checkpoint, args.dtype)
    predictor = _predictor(model, args)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        total = sum(o.bounds[1] - o.bounds[0] + 1 for o in objects)
        bar = tqdm(total=total, unit="slice", file=sys.stderr, desc="segment")
    try:
        labels, results = _segment_with_bar(predictor, volume, objects, bar)
    finally:
        if bar is not None:
            bar.close()
    _write_preview_then_mask(args, out, labels, volume, predictor, objects)
    seconds = time.perf_counter() - t0
    for o, r in zip(objects, results):
        n, written = int((r.mask > 0).sum()), int((labels == o.label).sum())
        lo, hi = r.bounds
        kept = (f", {written} ({written * voxel_ml(volume):.1f} mL) written, later objects taking the others"
                if written != n else "")
        print(f"{o.title}: {n} voxels ({n * voxel_ml(volume):.1f} mL){kept} on slices {lo}..{hi}, "
              f"mean predicted IoU {np.nanmean(r.iou[lo:hi + 1]):.3f}")
        if reference is not None and o.reference_label is not None:
            ref = reference == o.reference_label
            print(f"dice {o.title} vs reference label {o.reference_label}: {dice(labels == o.label, ref):.4f}")
    print(f"wrote {out} ({seconds:.1f} s)")
    if args.preview:
        print(f"wrote preview {args.preview}")
    return 0


def _write_preview_then_mask(args, out: Path, labels, volume, predictor, objects) -> None:
    """The preview, then the mask last (see the module docstring): if the mask cannot be written
    (a full disk), the preview is put back as it was, so a failed run changes nothing."""
    import os
    import shutil
    import tempfile

    from radsam_jax.inference.preview import save_predictor_preview
    from radsam_jax.io import save_label_map

    preview = Path(args.preview) if args.preview else None
    backup = None
    if preview is not None and preview.exists():
        fd, backup = tempfile.mkstemp(prefix=f".{preview.name}.", suffix=".previous", dir=preview.parent)
        os.close(fd)
        shutil.copy2(preview, backup)
    try:
        if preview is not None:
            save_predictor_preview(preview, predictor, labels, objects)
        try:
            save_label_map(out, labels, like=volume)
        except OSError as e:
            raise RuntimeError(f"cannot write --out {out}: {e.strerror or e}") from e
    except BaseException:
        if preview is not None:
            if backup is not None:
                os.replace(backup, preview)
                backup = None
            else:
                preview.unlink(missing_ok=True)
        raise
    finally:
        if backup is not None:
            os.remove(backup)


def _segment_with_bar(predictor, volume, objects, bar):
    """segment_objects with the bar advanced per encoded chunk, then per propagated object."""
    from radsam_jax.inference.batch import segment_objects

    if bar is None:
        return segment_objects(predictor, volume, objects)
    done = [0]

    def progress(n):
        done[0] += n
        bar.update(n)

    labels, results = segment_objects(predictor, volume, objects, progress=progress)
    bar.update(max(0, bar.total - done[0]))  # propagated slices (already encoded ones, other objects)
    return labels, results


def run_batch_command(args) -> int:
    from radsam_jax.inference.batch import check_out_dir, read_manifest, run_batch

    cases = read_manifest(args.manifest)
    check_out_dir(cases, args.out_dir, previews=args.previews, manifest=args.manifest, shard=args.shard)
    from radsam_jax.data.datasets import select_shard

    if not select_shard(cases, args.shard):  # a Slurm array with more tasks than cases
        print(f"radsam segment-batch: shard {args.shard[0]}/{args.shard[1]} has no case (the manifest has "
              f"{len(cases)}): nothing to do", file=sys.stderr)
        return 0
    model = _load_model(args.checkpoint, args.dtype)
    predictor = _predictor(model, args)
    try:
        summary = run_batch(predictor, cases, args.out_dir, world=args.world, previews=args.previews,
                            progress=not args.no_progress, shard=args.shard)
    except KeyboardInterrupt:
        print(f"radsam segment-batch: interrupted; the finished cases' masks and the summary of the run so far are "
              f"in {args.out_dir}: the same command continues with the cases left", file=sys.stderr)
        return 130
    return 1 if summary["failed"] else 0


@reporting_errors
def run(args) -> int:
    """Runs the parsed `segment` / `segment-batch` command; returns the exit status."""
    return run_segment(args) if args.command == "segment" else run_batch_command(args)
