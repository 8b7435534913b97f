"""`radsam evaluate` end to end with a tiny random-weight model (plumbing, not accuracy): the encoder
runs once per slice per volume, the command on shared/data writes every output with the documented
schema, MedSAM preprocessing reaches the predictor, and bad input fails with a clear error (exit 2).

Every test uses the same tiny config and --bucket 128, so the propagation compiles once per session.
"""

import json
from pathlib import Path

import jax
import nibabel as nib
import numpy as np
import pytest

from radsam_jax.cli import main as radsam
from radsam_jax.model import RadSam, init_variables
from tiny_model import tiny_model_config

SHARED = Path(__file__).parents[2] / "shared" / "data"
BUCKET = 128


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from radsam_jax.checkpoint import save_model

    config = tiny_model_config()
    path = tmp_path_factory.mktemp("ckpt") / "tiny_radsam"
    save_model(path, config, jax.jit(init_variables, static_argnums=0)(config, jax.random.key(0)))
    return path


def _synthetic(tmp_path, label_affine=None, names=None):
    """image.nii.gz + labels.nii.gz (+ names.json) of a small synthetic CT: organ 1, bone 2."""
    from data_fixtures import synthetic_case

    hu, labels = synthetic_case(3)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "image.nii.gz"))
    nib.save(nib.Nifti1Image(labels, affine if label_affine is None else label_affine), str(tmp_path / "labels.nii.gz"))
    (tmp_path / "names.json").write_text(json.dumps({"label_map": names or {"1": "organ", "2": "bone"}}))
    return tmp_path / "image.nii.gz", tmp_path / "labels.nii.gz", tmp_path / "names.json"


# ------------------------------------------------------------------------------ encoder calls


def test_encoder_runs_once_per_slice_per_volume(monkeypatch, checkpoint):
    from data_fixtures import synthetic_case

    from radsam_jax.checkpoint import load_checkpoint
    from radsam_jax.data.datasets import Case
    from radsam_jax.evaluate.runner import EvalOptions, evaluate_cases, make_settings
    from radsam_jax.inference import VolumePredictor, volume_predictor
    from radsam_jax.io import Volume

    encoded_per_call = []
    original = volume_predictor._encode_into

    def counting(variables, embeddings, hu, indices, **kw):
        encoded_per_call.append(set(np.asarray(indices).tolist()))  # a short chunk repeats its last slice
        return original(variables, embeddings, hu, indices, **kw)

    monkeypatch.setattr(volume_predictor, "_encode_into", counting)
    hu, labels = synthetic_case(7)
    volume = Volume(hu.astype(np.float32), np.diag([1.5, 1.5, 3.0, 1.0]), "synthetic")
    case = Case("synthetic", "-", {"organ": 1, "bone": 2}, label_path="-")
    predictor = VolumePredictor(load_checkpoint(checkpoint), encoder_batch_size=4, bucket=BUCKET)
    settings = make_settings(["volume", "slice"], ["box", "point"], ["mask"])
    result = evaluate_cases([case], predictor, settings, EvalOptions(edits=(0, 2), seed=1), load_case=lambda c: (volume, labels),
                            progress=False)
    assert {r["structure"] for r in result.rows} == {"organ", "bone"}
    assert len(result.rows) == 2 * 4 * 2
    seen = [k for chunk in encoded_per_call for k in chunk]
    assert len(seen) == len(set(seen)), f"a slice was encoded twice: {encoded_per_call}"
    span = set(np.flatnonzero(labels.reshape(-1, labels.shape[2]).any(axis=0)).tolist())
    assert set(seen) == span  # exactly the slices objects span, each once
    assert result.timings[0]["encoded"] == len(span) <= labels.shape[2]
    assert all(0.0 <= r["dice"] <= 1.0 for r in result.rows)
    assert all(r["oracle_dice"] is not None for r in result.rows if r["protocol"] == "slice" and r["edits"] == 0)


def _stopgap_all_masks(predictor, prompts: dict) -> np.ndarray:
    """The former radsam_jax/evaluate/secondary.py (deleted), kept verbatim as the reference: the
    prompts decoded again in chunks of 16 from the predictor's cached embeddings, all 4 masks."""
    import functools

    import jax.numpy as jnp

    from radsam_jax.inference.volume_predictor import _logits_to_masks
    from radsam_jax.prompts import Prompts

    @functools.partial(jax.jit, static_argnames=("decode_fn",))
    def decode_all(decode_fn, variables, embeddings, indices, prompts):
        logits, _ = decode_fn(variables, embeddings[indices], prompts)
        return logits.astype(jnp.float32)

    items = sorted(prompts.items())
    m, b, canon = predictor.config.mask_size, 16, None
    for start in range(0, len(items), b):
        chunk = items[start: start + b]
        idx = np.zeros((b,), np.int32)
        pts = np.zeros((b, predictor.max_points, 2), np.float32)
        labels = -np.ones((b, predictor.max_points), np.int32)
        boxes, has_box = np.zeros((b, 4), np.float32), np.zeros((b,), bool)
        for i, (k, p) in enumerate(chunk):
            idx[i] = int(k)
            pts[i], labels[i] = predictor._points_to_model(p.get("points"), p.get("point_labels"))
            if p.get("box") is not None:
                boxes[i], has_box[i] = predictor._box_to_model(p["box"]), True
        batch = Prompts(jnp.asarray(pts), jnp.asarray(labels), jnp.asarray(boxes), jnp.asarray(has_box),
                        jnp.zeros((b, m, m), jnp.float32), jnp.zeros((b,), bool))
        logits = decode_all(predictor.decode_fn, predictor.variables, predictor.embeddings, jnp.asarray(idx), batch)
        n = logits.shape[1]
        masks = _logits_to_masks(logits.reshape(b * n, m, m), geo=predictor.geo, preprocessing=predictor.config.preprocessing)
        masks = np.asarray(masks).reshape(b, n, *masks.shape[1:])
        if canon is None:
            canon = np.zeros((n, predictor.num_slices, *masks.shape[2:]), np.uint8)
        for i, (k, _) in enumerate(chunk):
            canon[:, int(k)] = masks[i]
    out = [np.ascontiguousarray(predictor.frame.from_canonical(np.transpose(c, (2, 1, 0))), dtype=np.uint8) for c in canon]
    return np.stack(out)


@pytest.mark.parametrize("prompt", ["box", "point"])
def test_oracle_from_segment_slices_matches_the_former_stopgap(checkpoint, prompt):
    """`segment_slices(all_masks=True)` (used by the runner) gives the same 4 masks, and so the same
    oracle Dice, as the deleted evaluate/secondary.py; on a flipped (L, P) grid."""
    from data_fixtures import synthetic_case

    from radsam_jax.checkpoint import load_checkpoint
    from radsam_jax.evaluate.metrics import oracle_dice
    from radsam_jax.evaluate.runner import Setting, run_slice_level
    from radsam_jax.evaluate.simulated_user import object_bounds, slice_2d, slice_prompt
    from radsam_jax.inference import VolumePredictor
    from radsam_jax.io import Volume

    hu, labels = synthetic_case(5)
    volume = Volume(hu.astype(np.float32), np.diag([-1.5, -1.5, 3.0, 1.0]), "synthetic")
    gt = labels == 1
    predictor = VolumePredictor(load_checkpoint(checkpoint), bucket=BUCKET)
    predictor.set_volume(volume)
    lo, hi = object_bounds(gt)
    present = [k for k in range(lo, hi + 1) if gt[:, :, k].any()]
    rng = np.random.default_rng(3)
    prompts = {k: slice_prompt(slice_2d(gt, k), prompt, rng) for k in present}
    result = predictor.segment_slices(prompts, all_masks=True)
    expected = _stopgap_all_masks(predictor, prompts)
    np.testing.assert_array_equal(result.all_masks, expected)
    np.testing.assert_array_equal(result.mask, expected[0])
    # Through the runner (same seed, so the same prompts): the oracle number is unchanged.
    _, info, _ = run_slice_level(predictor, gt, Setting("slice", prompt, "none"), [0], np.random.default_rng(3), oracle=True)
    assert info["oracle_dice"] == oracle_dice(expected[1:], gt)


def test_medsam_preprocessing_reaches_the_predictor(checkpoint):
    from radsam_jax.checkpoint import load_checkpoint
    from radsam_jax.inference import VolumePredictor
    from radsam_jax.io import Volume

    config = tiny_model_config(preprocessing="medsam")  # same parameters, MedSAM's input pipeline
    p = VolumePredictor(RadSam(config, load_checkpoint(checkpoint).variables), bucket=BUCKET)
    p.set_volume(Volume(np.zeros((40, 24, 5), np.float32), np.eye(4), "x"))
    assert p.config.preprocessing == "medsam"
    assert p.geo.resized == (64, 64)  # MedSAM resizes straight to a square (SAM keeps the aspect ratio)


# ------------------------------------------------------------------------------ whole command


def _check_outputs(out: Path, n_settings_min: int):
    for f in ("scores.csv", "summary.json", "summary.md", "breakdown.json", "edits.png", "per_structure.png", "worst_cases.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["settings"] and len(summary["settings"]) >= n_settings_min
    for s in summary["settings"]:
        assert list(s) == ["protocol", "prompt", "propagation", "edits", "mean_dice", "ci_low", "ci_high", "n", "clicks",
                           "clicks_honoured"]
        assert 0.0 <= s["ci_low"] <= s["mean_dice"] <= s["ci_high"] <= 1.0 and s["n"] >= 1
        if s["edits"] == 0:
            assert s["clicks"] == 0 and s["clicks_honoured"] is None
        elif s["clicks"]:
            assert 0.0 <= s["clicks_honoured"] <= 1.0
    import csv

    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert rows and all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    return summary, rows


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data not present")
def test_command_on_shared_data(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = radsam(["evaluate", "--checkpoint", str(checkpoint), "--data", str(SHARED), "--protocol", "volume,slice",
                 "--prompt", "box,point", "--propagation", "mask,box", "--edits", "0,1", "--structures", "spleen",
                 "--known-classes", "liver,spleen", "--bucket", str(BUCKET), "--bootstrap", "500", "--seed", "3",
                 "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary, rows = _check_outputs(out, 2 * 3 * 2)
    assert {r["case"] for r in rows} == {"ct-abdomen-3mm", "ct-thorax-abdomen-dicom"}
    assert {(s["protocol"], s["propagation"]) for s in summary["settings"]} == {("volume", "mask"), ("volume", "box"), ("slice", "none")}
    assert all(s["n"] == 2 for s in summary["settings"])
    md = (out / "summary.md").read_text()
    assert "| Model | Volume-level" in md and "Known / unknown" in md and "Initial slice" in md
    timings = json.loads((out / "breakdown.json").read_text())["timings"]
    assert all(t["encoded"] <= t["slices"] for t in timings)


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data not present")
def test_command_on_one_dicom_image_with_a_label_map_on_another_grid(checkpoint, tmp_path, capsys):
    case = SHARED / "ct-thorax-abdomen-dicom"
    out = tmp_path / "eval"
    rc = radsam(["evaluate", "--checkpoint", str(checkpoint), "--data", str(case / "dicom"), "--labels", str(case / "labels.nii.gz"),
                 "--label-names", str(case / "labels.json"), "--structures", "spleen,liver", "--edits", "0",
                 "--bucket", str(BUCKET), "--bootstrap", "200", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    _, rows = _check_outputs(out, 1)
    # aligned through world coordinates: the liver spans the 20 slices' worth it has in labels.json
    present = json.loads((case / "labels.json").read_text())["present"]
    liver = next(v for v in present.values() if v["name"] == "liver")
    row = next(r for r in rows if r["structure"] == "liver")
    assert int(row["voxels"]) == liver["voxels"]


# ------------------------------------------------------------------------------ bad input


def _run_bad(capsys, *argv):
    rc = radsam(["evaluate", *argv, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "radsam evaluate: error:" in err
    return err


def test_unknown_structure_is_an_error(checkpoint, tmp_path, capsys):
    image, labels, names = _synthetic(tmp_path)
    err = _run_bad(capsys, "--checkpoint", str(checkpoint), "--data", str(image), "--labels", str(labels),
                   "--label-names", str(names), "--structures", "organ,kidney", "--out", str(tmp_path / "o"))
    assert "kidney" in err and "organ" in err


def test_structure_absent_from_the_label_map_is_an_error(checkpoint, tmp_path, capsys):
    image, labels, names = _synthetic(tmp_path, names={"1": "organ", "2": "bone", "3": "kidney"})
    err = _run_bad(capsys, "--checkpoint", str(checkpoint), "--data", str(image), "--labels", str(labels),
                   "--label-names", str(names), "--structures", "kidney", "--out", str(tmp_path / "o"))
    assert "kidney" in err and "absent" in err


def test_a_structure_skipped_by_min_slices_is_not_called_absent(checkpoint, tmp_path, capsys):
    """organ spans 7 slices, bone 8: --min-slices 8 skips organ, which has voxels all the same."""
    image, labels, names = _synthetic(tmp_path)
    args = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(image), "--labels", str(labels), "--label-names",
            str(names), "--min-slices", "8", "--edits", "0", "--prompt", "box", "--protocol", "volume", "--no-progress"]
    assert radsam([*args, "--structures", "organ,bone", "--out", str(tmp_path / "both")]) == 0, capsys.readouterr().err
    assert "spans 7 < --min-slices 8 slices (1)" in (tmp_path / "both" / "summary.md").read_text()
    assert "absent" not in capsys.readouterr().err
    err = _run_bad(capsys, *args[1:], "--structures", "organ", "--out", str(tmp_path / "organ"))
    assert "every object was skipped (spans 7 < --min-slices 8 slices); a smaller --min-slices" in err, err
    assert "absent" not in err and "continues the run" not in err, err


def test_label_map_without_world_overlap_is_an_error(checkpoint, tmp_path, capsys):
    far = np.diag([1.5, 1.5, 3.0, 1.0])
    far[:3, 3] = [5000.0, 0.0, 0.0]
    image, labels, names = _synthetic(tmp_path, label_affine=far)
    err = _run_bad(capsys, "--checkpoint", str(checkpoint), "--data", str(image), "--labels", str(labels),
                   "--label-names", str(names), "--out", str(tmp_path / "o"))
    assert "does not overlap" in err


def test_empty_dataset_is_an_error(checkpoint, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _run_bad(capsys, "--checkpoint", str(checkpoint), "--data", str(empty), "--out", str(tmp_path / "o"))
    assert "no dataset found" in err
    amos = tmp_path / "amos"
    (amos / "imagesVa").mkdir(parents=True)
    (amos / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "spleen"}}))
    err = _run_bad(capsys, "--checkpoint", str(checkpoint), "--data", str(amos), "--out", str(tmp_path / "o"))
    assert "no dataset found" in err and "imagesVa/ and labelsVa/ (AMOS)" in err  # labelsVa/ is missing
    (amos / "labelsVa").mkdir()
    err = _run_bad(capsys, "--checkpoint", str(checkpoint), "--data", str(amos), "--out", str(tmp_path / "o"))
    assert "no AMOS cases" in err


def test_bad_options_are_errors(checkpoint, tmp_path, capsys):
    image, labels, names = _synthetic(tmp_path)
    common = ["--data", str(image), "--labels", str(labels), "--label-names", str(names), "--out", str(tmp_path / "o")]
    assert "does not exist" in _run_bad(capsys, "--checkpoint", str(tmp_path / "nope"), *common)
    err = _run_bad(capsys, "--checkpoint", str(tmp_path / "nope"), "--protocol", "slice", "--edits", "0,20", *common)
    assert "warning: the slice-level protocol stops at 10 edits per slice, so --edits 20 is not evaluated" in err
    err = _run_bad(capsys, "--checkpoint", str(tmp_path / "nope"), "--protocol", "slice,volume", "--edits", "0,20,30", *common)
    assert "so --edits 20,30 are run at the volume level only" in err
    assert "stops at 10" not in _run_bad(capsys, "--checkpoint", str(tmp_path / "nope"), "--edits", "0,20", "--protocol",
                                         "volume", *common)
    assert "--protocol" in _run_bad(capsys, "--checkpoint", str(checkpoint), "--protocol", "volumes", *common)
    assert "--labels" in _run_bad(capsys, "--checkpoint", str(checkpoint), "--data", str(image), "--out", str(tmp_path / "o"))


def test_negative_seed_is_refused_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    """The bootstrap takes no negative seed: a run with one used to finish, then never get its report."""
    image, labels, names = _synthetic(tmp_path)
    _no_model(monkeypatch)
    common = ["--data", str(image), "--labels", str(labels), "--label-names", str(names), "--out", str(tmp_path / "o")]
    assert "--seed must be >= 0, got -1" in _run_bad(capsys, "--checkpoint", str(checkpoint), "--seed", "-1", *common)
    assert radsam(["compare", str(tmp_path), str(tmp_path), "--seed", "-1", "--out", str(tmp_path / "c")]) == 2
    assert "--seed must be >= 0, got -1" in capsys.readouterr().err


def _no_model(monkeypatch):
    """Errors expected before any work: loading the model fails the test."""
    import radsam_jax.checkpoint

    def fail(*args, **kw):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(radsam_jax.checkpoint, "load_checkpoint", fail)


def test_out_that_is_a_file_is_refused_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    image, labels, names = _synthetic(tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    _no_model(monkeypatch)
    err = _run_bad(capsys, "--checkpoint", str(checkpoint), "--data", str(image), "--labels", str(labels),
                   "--label-names", str(names), "--out", str(afile))
    assert f"--out {afile} is a file" in err and "Traceback" not in err
    assert afile.read_text() == "mine"
    err = _run_bad(capsys, "--checkpoint", str(checkpoint), "--data", str(image), "--labels", str(labels),
                   "--label-names", str(names), "--out", str(afile / "sub"))
    assert f"--out {afile / 'sub'}: cannot create the folder" in err


def test_known_classes_mistyped_file_or_name_is_an_error(checkpoint, tmp_path, capsys, monkeypatch):
    image, labels, names = _synthetic(tmp_path)
    common = ["--checkpoint", str(checkpoint), "--data", str(image), "--labels", str(labels), "--label-names", str(names),
              "--out", str(tmp_path / "o")]
    _no_model(monkeypatch)
    assert "no such file" in _run_bad(capsys, *common, "--known-classes", str(tmp_path / "knwon.json"))
    err = _run_bad(capsys, *common, "--known-classes", "organ,bnoe")
    assert "bnoe is not a structure" in err and "valid names: bone, organ" in err
    assert not (tmp_path / "o").exists()


def test_label_names_with_a_non_integer_id_is_an_error(checkpoint, tmp_path, capsys):
    image, labels, names = _synthetic(tmp_path, names={"1": "organ", "two": "bone"})
    err = _run_bad(capsys, "--checkpoint", str(checkpoint), "--data", str(image), "--labels", str(labels),
                   "--label-names", str(names), "--out", str(tmp_path / "o"))
    assert f"--label-names {names}: label id 'two' (for 'bone') is not an integer >= 0" in err


# ------------------------------------------------------------------------------ long runs: stop and continue, shards


def _evaluate(checkpoint, data, out, *extra) -> int:
    return radsam(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--protocol", "volume,slice",
                   "--prompt", "box,point", "--edits", "0,1", "--worst", "3", "--bucket", str(BUCKET), "--bootstrap", "200",
                   "--no-progress", "--out", str(out), *extra])


def _same_report(a: Path, b: Path) -> None:
    """The same scores, summary, plots and breakdown (but for its timings) in two report folders."""
    for name in ("scores.csv", "summary.json", "worst_cases.png", "edits.png", "per_structure.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    without_timings = lambda folder: {k: v for k, v in json.loads((folder / "breakdown.json").read_text()).items() if k != "timings"}
    assert without_timings(a) == without_timings(b)


@pytest.fixture
def counted(monkeypatch):
    """Counts volume-level runs (two per object here: box and point) and case loads; "stop_at": the
    run that raises KeyboardInterrupt instead."""
    import radsam_jax.data.datasets
    from radsam_jax.evaluate import runner

    state = {"runs": 0, "stop_at": None, "loaded": []}
    real_run, real_load = runner.run_volume_level, radsam_jax.data.datasets.load_case

    def run(*args, **kw):
        state["runs"] += 1
        if state["runs"] == state["stop_at"]:
            raise KeyboardInterrupt
        return real_run(*args, **kw)

    def load(case):
        state["loaded"].append(case.case_id)
        return real_load(case)

    monkeypatch.setattr(runner, "run_volume_level", run)
    monkeypatch.setattr(radsam_jax.data.datasets, "load_case", load)
    return state


def test_a_stopped_run_continues_to_the_report_of_an_uninterrupted_one(checkpoint, tmp_path, capsys, counted):
    """Ctrl-C on the third object, then a kill in the middle of a record line: the same command runs only the
    objects not finished, loads no finished case again, and reports what an uninterrupted run reports."""
    import csv
    import shutil

    from data_fixtures import write_generic

    data = write_generic(tmp_path / "data", ("a", "b"))  # organ and bone in each; "absent" is skipped
    assert _evaluate(checkpoint, data, tmp_path / "full") == 0, capsys.readouterr().err
    assert counted["runs"] == 4 * 2
    out = tmp_path / "stopped"
    counted.update(runs=0, stop_at=5, loaded=[])  # the first setting of the third object (b's organ)
    assert _evaluate(checkpoint, data, out) == 130
    assert "interrupted; 3 of 6 object(s) finished and kept in" in capsys.readouterr().err
    assert not (out / "summary.json").exists()
    so_far = tmp_path / "so_far"
    assert radsam(["report", str(out), "--bootstrap", "200", "--out", str(so_far)]) == 2
    assert "(or --partial for a report so far)" in capsys.readouterr().err
    assert radsam(["report", str(out), "--partial", "--bootstrap", "200", "--out", str(so_far)]) == 0
    assert "Partial report of an unfinished run: 3 of 6 objects finished" in (so_far / "summary.md").read_text()
    assert radsam(["compare", str(tmp_path / "full"), str(so_far), "--bootstrap", "50", "--out", str(tmp_path / "cmp")]) == 0
    assert f"warning: {so_far} is a partial report (3 of 6 objects finished)" in capsys.readouterr().err
    assert "**(partial report: 3 of 6 objects finished)**" in (tmp_path / "cmp" / "compare.md").read_text()
    assert {r["case"] for r in csv.DictReader((so_far / "scores.csv").open())} == {"a"}
    with (out / "objects.jsonl").open("a") as f:
        f.write('{"object": {"case": "b", "structure": "org')  # then killed while writing its record line
    started = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**started, "code_sha256": ["0" * 64]}))  # and the code changed

    moved = shutil.copytree(data, tmp_path / "moved")  # and the data moved
    counted.update(runs=0, stop_at=None, loaded=[])
    assert _evaluate(checkpoint, moved, out) == 0
    err = capsys.readouterr().err
    assert f"continuing the run recorded in {out}: 3 of 6 object(s) done" in err
    assert "warning: radsam-jax's code differs from the code that started this run" in err
    assert f"warning: this run started on {{'data': '{data}'}}, this command reads {{'data': '{moved}'}}" in err
    assert counted["runs"] == 2 * 2 and counted["loaded"] == ["b"]
    _same_report(tmp_path / "full", out)
    lines = (out / "objects.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and json.loads(lines[-1]) == {"complete": True}
    # Finished (partly by other code): the same command, e.g. a requeued job, evaluates nothing; --restart does.
    counted.update(runs=0, loaded=[])
    assert _evaluate(checkpoint, data, out) == 0 and counted["runs"] == 0 and counted["loaded"] == []
    assert (f"{out} holds this run, finished (partly) by other radsam-jax code: nothing to evaluate "
            f"(--restart computes it again with this code)") in capsys.readouterr().err
    assert _evaluate(checkpoint, data, out, "--restart") == 0 and counted["runs"] == 4 * 2
    counted.update(runs=0, loaded=[])
    assert _evaluate(checkpoint, data, out) == 0 and counted["runs"] == 0 and counted["loaded"] == []
    assert f"{out} holds this run, finished: nothing to evaluate (--restart computes it again)" in capsys.readouterr().err
    _same_report(tmp_path / "full", out)


def test_an_unreadable_case_is_left_for_later_and_the_others_are_evaluated(checkpoint, tmp_path, capsys, counted):
    from data_fixtures import write_generic

    data = write_generic(tmp_path / "data", ("a", "b", "c"))
    assert _evaluate(checkpoint, data, tmp_path / "full") == 0, capsys.readouterr().err
    image = data / "b" / "ct.nii.gz"
    intact = image.read_bytes()
    image.write_bytes(intact[:400])  # a truncated copy
    out = tmp_path / "eval"
    counted.update(runs=0, loaded=[])
    assert _evaluate(checkpoint, data, out) == 2
    err = capsys.readouterr().err
    assert "evaluate: case b left for later, it cannot be read:" in err and str(image) in err
    assert "radsam evaluate: error: 1 case(s) could not be read: b: " in err
    assert (f"the other cases are evaluated: 6 of 9 object(s) are kept in {out}; once the file(s) are mended, the "
            f"same command evaluates the 1 case(s) left") in err
    assert counted["runs"] == 4 * 2 and not (out / "scores.csv").exists()
    image.write_bytes(intact)
    counted.update(runs=0, loaded=[])
    assert _evaluate(checkpoint, data, out) == 0, capsys.readouterr().err
    assert counted["loaded"] == ["b"] and counted["runs"] == 2 * 2
    _same_report(tmp_path / "full", out)


def test_a_case_whose_files_changed_since_is_refused(checkpoint, tmp_path, capsys, counted):
    """Mended label maps evaluated into the folder of the run they replace: the kept scores are those of the old
    files, so the run is refused; files touched or moved with the same bytes are not a change."""
    import os

    from data_fixtures import write_generic

    data = write_generic(tmp_path / "data", ("a", "b"))
    out = tmp_path / "eval"
    assert _evaluate(checkpoint, data, out) == 0, capsys.readouterr().err
    recorded = [json.loads(line)["case_files"] for line in (out / "objects.jsonl").read_text().splitlines()
                if "case_files" in line]
    assert [r["case"] for r in recorded] == ["a", "b"]
    assert [Path(f[0]).name for f in recorded[1]["files"]] == ["ct.nii.gz", "labels.nii.gz"]
    labels = data / "b" / "labels.nii.gz"
    os.utime(labels, ns=(0, 0))  # touched: compared by content once, then by its new time
    counted.update(runs=0, loaded=[])
    assert _evaluate(checkpoint, data, out) == 0 and counted["runs"] == 0 and counted["loaded"] == []
    assert "comparing the contents of case files moved or touched since" in capsys.readouterr().err
    assert _evaluate(checkpoint, data, out) == 0 and "comparing" not in capsys.readouterr().err

    image = nib.load(str(labels))
    mended = np.asarray(image.dataobj).copy()
    mended[mended == 1] = 0  # its organ relabelled as background
    nib.save(nib.Nifti1Image(mended, image.affine), str(labels))
    assert _evaluate(checkpoint, data, out) == 2
    err = capsys.readouterr().err
    assert (f"error: the files of case(s) b (1 in all) changed since the run recorded in {out} evaluated them: "
            f"its scores for them are not those of the files now. --restart evaluates the run again") in err
    counted.update(runs=0, loaded=[])
    assert _evaluate(checkpoint, data, out, "--restart") == 0 and counted["loaded"] == ["a", "b"]


def test_another_runs_record_is_refused_and_restart_discards_it(checkpoint, tmp_path, capsys):
    image, labels, names = _synthetic(tmp_path)
    single = ["--labels", str(labels), "--label-names", str(names)]
    out = tmp_path / "eval"
    assert _evaluate(checkpoint, image, out, *single) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert _evaluate(checkpoint, image, out, *single, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert f"{out} holds the record of another evaluation (run.json): seed 0 there, 1 here" in err and "--restart" in err
    assert _evaluate(checkpoint, image, out, *single, "--seed", "1", "--restart") == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["identity"]["seed"] == 1
    # A restart stopped before its first object leaves no report of the run it discarded.
    from radsam_jax.evaluate import runner

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runner, "run_volume_level", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert _evaluate(checkpoint, image, out, *single, "--seed", "2", "--restart") == 130
    assert not [p.name for p in out.iterdir() if p.suffix in (".csv", ".md", ".png") or p.name.startswith(("summary", "breakdown"))]


def test_ctrl_c_while_writing_the_report_keeps_the_finished_run(checkpoint, tmp_path, capsys, monkeypatch):
    from radsam_jax.evaluate import report

    image, labels, names = _synthetic(tmp_path)
    single = ["--labels", str(labels), "--label-names", str(names)]
    out = tmp_path / "eval"

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(report, "plot_per_structure", interrupted)
        assert _evaluate(checkpoint, image, out, *single) == 130
    assert f"interrupted while writing the report; the run is finished and recorded in {out}" in capsys.readouterr().err
    assert _evaluate(checkpoint, image, out, *single) == 0
    assert "finished: nothing to evaluate" in capsys.readouterr().err and (out / "per_structure.png").is_file()


def test_shards_merge_into_the_report_of_one_run(checkpoint, tmp_path, capsys):
    from data_fixtures import write_generic

    data = write_generic(tmp_path / "data", ("a", "b", "c"))
    assert _evaluate(checkpoint, data, tmp_path / "full") == 0, capsys.readouterr().err
    shards = [tmp_path / "shard0", tmp_path / "shard1"]
    for i, out in enumerate(shards):
        assert _evaluate(checkpoint, data, out, "--shard", f"{i}/2") == 0, capsys.readouterr().err
        assert f"shard {i}/2 finished" in capsys.readouterr().err and not (out / "scores.csv").exists()
    assert {r["case"] for line in (shards[0] / "objects.jsonl").read_text().splitlines()
            for r in json.loads(line).get("object", {}).get("rows", [])} == {"a", "c"}
    merged = tmp_path / "merged"
    assert radsam(["report", str(shards[1]), str(shards[0]), "--bootstrap", "200", "--out", str(merged)]) == 0, capsys.readouterr().err
    _same_report(tmp_path / "full", merged)
    assert "warning" not in capsys.readouterr().err
    run1 = json.loads((shards[1] / "run.json").read_text())
    (shards[1] / "run.json").write_text(json.dumps({**run1, "code_sha256": ["0" * 64]}))
    assert radsam(["report", str(shards[0]), str(shards[1]), "--bootstrap", "200", "--out", str(merged)]) == 0
    assert "warning: the records were written by different radsam-jax code" in capsys.readouterr().err
    assert radsam(["report", str(shards[0]), str(shards[1]), "--out", str(tmp_path / "full")]) == 2
    assert f"--out {tmp_path / 'full'} holds the record of another evaluation (run.json)" in capsys.readouterr().err
    _same_report(tmp_path / "full", merged)  # untouched
    # A folder holding a report and no record (the model card's folders in a clone) takes a new run,
    # whose report replaces it.
    (merged / "scores.csv").write_text("stale\n")
    assert _evaluate(checkpoint, data, merged) == 0, capsys.readouterr().err
    _same_report(tmp_path / "full", merged)

    def refused(*runs) -> str:
        assert radsam(["report", *map(str, runs), "--out", str(tmp_path / "r")]) == 2
        return capsys.readouterr().err

    assert "shard(s) 1/2 of this 2-shard run are not among the records given" in refused(shards[0])
    assert "are both shard 0/2" in refused(shards[0], shards[0], shards[1])
    assert "shards of one run share their count" in refused(shards[0], shards[1], tmp_path / "full")
    assert "holds no evaluation record" in refused(shards[0], data)
    lines = (shards[1] / "objects.jsonl").read_text().splitlines()
    (shards[1] / "objects.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # no {"complete": true}: still running
    assert f"unfinished evaluation record(s): {shards[1]}" in refused(shards[0], shards[1])
    assert _evaluate(checkpoint, data, tmp_path / "other", "--shard", "0/2", "--seed", "5") == 0
    assert "record different evaluations: seed 0 there, 5 here" in refused(shards[0], tmp_path / "other")
    # More shards than cases: shard 3/4 records an empty, finished shard, and the four merge into the run.
    quarters = [tmp_path / f"q{i}" for i in range(4)]
    for i, q in enumerate(quarters):
        assert _evaluate(checkpoint, data, q, "--shard", f"{i}/4") == 0
    assert "--shard 3/4 has no case (the run has 3): it records an empty shard" in capsys.readouterr().err
    assert radsam(["report", *map(str, quarters), "--bootstrap", "200", "--out", str(tmp_path / "from_quarters")]) == 0, \
        capsys.readouterr().err
    _same_report(tmp_path / "full", tmp_path / "from_quarters")
    with pytest.raises(SystemExit):
        _evaluate(checkpoint, data, tmp_path / "s", "--shard", "2/2")
    assert "expected I/N with 0 <= I < N" in capsys.readouterr().err


def test_compare_pairs_the_shared_objects_across_propagations(checkpoint, tmp_path, capsys):
    """Model B (other weights, mask and box propagation, every structure) against A (mask propagation,
    organ only): only the organs are scored, and each difference is the mean of B - A over them, for
    B's mask and box propagation alike against A's mask propagation."""
    import csv

    from data_fixtures import write_generic

    from radsam_jax.checkpoint import save_model

    other = tmp_path / "other_weights"
    save_model(other, tiny_model_config(), jax.jit(init_variables, static_argnums=0)(tiny_model_config(), jax.random.key(1)))
    data = write_generic(tmp_path / "data", ("a", "b"))
    volume = ["--protocol", "volume", "--prompt", "box", "--edits", "0,1"]
    assert _evaluate(checkpoint, data, tmp_path / "A", *volume, "--structures", "organ") == 0, capsys.readouterr().err
    assert _evaluate(other, data, tmp_path / "B", *volume, "--propagation", "mask,box") == 0, capsys.readouterr().err
    out = tmp_path / "cmp"
    assert radsam(["compare", str(tmp_path / "A"), str(tmp_path / "B"), "--paper", "--bootstrap", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "(2 shared object(s))" in printed

    def dice(folder):
        return {(r["case"], r["structure"], r["propagation"], int(r["edits"])): float(r["dice"])
                for r in csv.DictReader((tmp_path / folder / "scores.csv").open())}

    a, b = dice("A"), dice("B")
    result = json.loads((out / "compare.json").read_text())
    assert result["shared_objects"] == 2 and result["models"][1]["not_shared"] == ["a:bone", "b:bone"]
    differences = {(d["propagation"], d["edits"]): d for d in result["models"][1]["differences"]}
    assert set(differences) == {("mask", 0), ("mask", 1), ("box", 0), ("box", 1)}
    for (prop, e), d in differences.items():
        expected = [b[(c, "organ", prop, e)] - a[(c, "organ", "mask", e)] for c in "ab"]
        assert d["baseline_propagation"] == "mask" and d["n"] == 2
        assert d["difference"] == pytest.approx(np.mean(expected), abs=1e-6)  # scores.csv keeps 6 decimals
        assert d["better"] + d["equal"] + d["worse"] == 2 and d["ci_low"] <= d["difference"] <= d["ci_high"]
    md = (out / "compare.md").read_text()
    assert "| A | 3 | - |" in md and "| B | 3 | - |" in md and "| B (box propagation) | 3 | 1 |" in md
    assert "| paper: RadSAM | 3 | 20 | 91.11 | 90.63 | n | 10n | 96.73 | 96.78 |" in md
    assert (out / "compare_edits.png").is_file()
    assert radsam(["compare", str(tmp_path / "A"), str(data), "--out", str(out)]) == 2
    assert f"{data} has no scores.csv" in capsys.readouterr().err
    # The same case names on other images: a ground truth of another size is not paired.
    rows = list(csv.DictReader((tmp_path / "A" / "scores.csv").open()))
    (tmp_path / "A2").mkdir()
    with (tmp_path / "A2" / "scores.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "voxels": int(r["voxels"]) + (r["case"] == "b")} for r in rows)
    assert radsam(["compare", str(tmp_path / "A"), str(tmp_path / "A2"), "--out", str(tmp_path / "cmp2")]) == 2
    voxels = next(r["voxels"] for r in rows if r["case"] == "b")
    assert (f"object b:organ has {voxels} ground-truth voxels in {tmp_path / 'A'} but {int(voxels) + 1} in "
            f"{tmp_path / 'A2'}: the reports evaluated different images") in capsys.readouterr().err


def test_table1_puts_slice_level_on_the_mask_propagation_row():
    from radsam_jax.evaluate.report import table1

    def s(protocol, prompt, propagation, edits, dice):
        return dict(protocol=protocol, prompt=prompt, propagation=propagation, edits=edits, mean_dice=dice,
                    ci_low=dice, ci_high=dice, n=1)

    summary = {"settings": [s("volume", "box", "mask", 0, 0.8), s("volume", "box", "box", 0, 0.6),
                            s("slice", "box", "none", 0, 0.7)]}
    lines = table1(summary, "m")[2:]
    assert lines[0].startswith("| m |")  # the model's own (mask propagation) row comes first
    rows = {line.split(" | ")[0]: line for line in lines}
    assert set(rows) == {"| m (box propagation)", "| m"}
    assert "70.00" in rows["| m"] and "80.00" in rows["| m"]
    assert "70.00" not in rows["| m (box propagation)"] and "60.00" in rows["| m (box propagation)"]


def _windowed(checkpoint, tmp_path) -> Path:
    """A copy of `checkpoint` trained with another CT window (60/350) than the default 40/400."""
    import shutil

    windowed = tmp_path / "windowed"
    shutil.copytree(checkpoint, windowed)
    header = json.loads((windowed / "radsam.json").read_text())
    header["model_config"]["ct_window"] = [60.0, 350.0]
    (windowed / "radsam.json").write_text(json.dumps(header))
    return windowed


@pytest.mark.parametrize("option, expected", [((), (60.0, 350.0)), (("--window", "50", "500"), (50.0, 500.0))])
def test_the_models_ct_window_reaches_the_predictor(checkpoint, tmp_path, capsys, monkeypatch, option, expected):
    import radsam_jax.evaluate.runner

    windowed = _windowed(checkpoint, tmp_path)
    seen = []

    def record(cases, predictor, *args, **kw):
        seen.append(predictor.window)
        raise ValueError("stopped after the predictor was built")

    monkeypatch.setattr(radsam_jax.evaluate.runner, "evaluate_cases", record)
    image, labels, names = _synthetic(tmp_path)
    err = _run_bad(capsys, "--checkpoint", str(windowed), "--data", str(image), "--labels", str(labels),
                   "--label-names", str(names), *option, "--out", str(tmp_path / "o"))
    assert "stopped after the predictor was built" in err and seen == [expected]
    assert f"CT window {expected[0]:g}/{expected[1]:g} HU" in err


@pytest.mark.parametrize("option, window", [((), (60.0, 350.0)), (("--window", "-500", "1200"), (-500.0, 1200.0))])
def test_worst_cases_show_the_ct_window_the_model_saw(checkpoint, tmp_path, capsys, monkeypatch, option, window):
    """worst_cases.png through the model's ct_window (or --window), not a fixed 40/400; summary.md says which."""
    from PIL import Image

    from radsam_jax.evaluate import runner

    windowed = _windowed(checkpoint, tmp_path)
    gt = np.zeros((16, 16), bool)
    gt[6:12, 6:12] = True
    rows = [{"case": "c", "structure": "organ", "label": 1, "known": None, "protocol": "volume", "prompt": "box",
             "propagation": "mask", "edits": 0, "dice": 0.5}]
    worst = [runner.WorstCase(0.5, "c", "organ", "volume/box/mask", 0, 1, np.full((16, 16), -50.0, np.float32), gt, gt, (1.0, 1.0))]

    def evaluated(*args, record, **kw):
        record.set_worst(worst)
        record.add_object("c", "organ", rows)
        record.mark_complete()
        return record.result()

    monkeypatch.setattr(runner, "evaluate_cases", evaluated)
    image, labels, names = _synthetic(tmp_path)
    out = tmp_path / "o"
    rc = radsam(["evaluate", "--checkpoint", str(windowed), "--data", str(image), "--labels", str(labels), "--label-names",
                 str(names), *option, "--bootstrap", "10", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    level, width = window
    with Image.open(out / "worst_cases.png") as im:
        pixel = im.convert("RGB").getpixel((128, 30 + 3))  # under the caption, above the contours
    assert pixel == (int(np.clip((-50 - (level - width / 2)) / width, 0, 1) * 255),) * 3  # 47, 223 (40/400: 70)
    assert f"CT window {level:g}/{width:g} HU" in (out / "summary.md").read_text()


def test_bad_window_is_refused_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    image, labels, names = _synthetic(tmp_path)
    err = _run_bad(capsys, "--checkpoint", str(checkpoint), "--data", str(image), "--labels", str(labels),
                   "--label-names", str(names), "--window", "40", "-1", "--out", str(tmp_path / "o"))
    assert "--window LEVEL WIDTH needs finite values and WIDTH > 0" in err
