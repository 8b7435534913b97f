"""`radsam segment` / `segment-batch`: outputs on the input grid with its affine, --prompts, preview,
Dice, batch skip/failure handling, and bad input (clear error, non-zero exit, nothing at --out)."""

import argparse
import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radsam_jax.checkpoint import save_model
from radsam_jax.inference import cli
from test_inference import random_variables
from tiny_model import tiny_model_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = tiny_model_config()
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(path, config, random_variables(config))
    return path


def _ball_volume(shape=(40, 36, 20)):
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    ball = ((x - 20) / 10.0) ** 2 + ((y - 16) / 8.0) ** 2 + ((z - 10) / 5.0) ** 2 <= 1.0
    return np.where(ball, 200, -50).astype(np.int16), ball


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A NIfTI in L, P, S voxel order with an oblique-free but non-trivial affine, plus a label map."""
    folder = tmp_path_factory.mktemp("img")
    array, ball = _ball_volume()
    affine = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 20.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(array, affine), folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(ball.astype(np.uint8) * 7, affine), folder / "labels.nii.gz")
    return folder / "ct.nii.gz"


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="radsam")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return cli.run(parser.parse_args([str(a) for a in argv]))


def test_segment_writes_label_map_on_input_grid(image, checkpoint, tmp_path, capsys):
    out, png = tmp_path / "mask.nii.gz", tmp_path / "preview.png"
    rc = run_cli("segment", image, "--checkpoint", checkpoint, "--slice", 10, "--box", 12, 9, 28, 23,
                 "--point", 20, 16, "--negative", 2, 2, "--bounds", 5, 15, "--out", out, "--preview", png,
                 "--labels", image.parent / "labels.nii.gz", "--label-id", 7, "--no-progress")
    assert rc == 0
    img_in, img_out = nib.load(str(image)), nib.load(str(out))
    assert img_out.shape == img_in.shape
    np.testing.assert_allclose(img_out.affine, img_in.affine)
    assert img_out.get_data_dtype() == np.uint8
    data = np.asarray(img_out.dataobj)
    assert set(np.unique(data)) <= {0, 1} and not data[:, :, :5].any() and not data[:, :, 16:].any()
    stdout = capsys.readouterr().out
    assert "dice object 1 vs reference label 7:" in stdout
    n = int(data.sum())  # voxels of 1.5 x 1.5 x 3 mm = 6.75 mm^3
    assert f"object 1: {n} voxels ({n * 6.75 / 1000:.1f} mL) on slices" in stdout, stdout
    from PIL import Image

    with Image.open(png) as im:
        assert im.width > im.height >= 200  # panels: the longer side >= 256 px


def test_segment_prompts_file_world_and_edits(image, checkpoint, tmp_path, capsys):
    affine = nib.load(str(image)).affine
    # Voxel (20, 16, 10) in world millimetres.
    wx, wy, wz = (affine @ [20, 16, 10, 1])[:3]
    prompts = {
        "coordinates": "world",
        "objects": [
            {"label": 3, "name": "ball", "slice": wz, "points": [[wx, wy]], "bounds": [wz - 9, wz + 9],
             "edits": [{"slice": wz + 3, "points": [[wx, wy]], "point_labels": [1]}]},
            {"label": 5, "slice": wz, "box": [wx - 6, wy - 6, wx + 6, wy + 6], "propagation": "box", "reference_label": 7},
        ],
    }
    pfile = tmp_path / "prompts.json"
    pfile.write_text(json.dumps(prompts))
    out = tmp_path / "objects.nii.gz"
    rc = run_cli("segment", image, "--checkpoint", checkpoint, "--prompts", pfile, "--out", out, "--no-progress",
                 "--labels", image.parent / "labels.nii.gz")
    assert rc == 0, capsys.readouterr().err
    data = np.asarray(nib.load(str(out)).dataobj)
    assert set(np.unique(data)) <= {0, 3, 5}
    assert not (data == 3)[:, :, :7].any() and not (data == 3)[:, :, 14:].any()  # bounds 7..13
    stdout = capsys.readouterr().out
    assert "object 3 (ball)" in stdout
    # Where the box object (later) overlaps the ball, its label is written: each line says what was.
    for label in (3, 5):
        line = next(x for x in stdout.splitlines() if x.startswith(f"object {label}"))
        n = int(re.search(r": (\d+) voxels", line)[1])
        written = int((data == label).sum())
        assert (f"{n} voxels" in line) and ((f", {written} (" in line) == (written != n)), line
    assert int((data == 3).sum()) < int(re.search(r"object 3 \(ball\): (\d+) voxels", stdout)[1])  # they overlap


def test_segment_from_a_drawn_mask_file(image, checkpoint, tmp_path, capsys):
    """--mask (and a prompts file's "mask", relative to the file): slice K of a label map on the image's
    grid is the prompt, as VolumePredictor.segment(K, mask=...) takes it from Python."""
    from radsam_jax.checkpoint import load_checkpoint
    from radsam_jax.inference import VolumePredictor
    from radsam_jax.io import load_volume

    drawn = image.parent / "labels.nii.gz"  # the ball, label 7
    out = tmp_path / "from_mask.nii.gz"
    assert run_cli("segment", image, "--checkpoint", checkpoint, "--slice", 10, "--mask", drawn, "--mask-label", 7,
                   "--bounds", 6, 14, "--out", out, "--no-progress") == 0, capsys.readouterr().err
    predictor = VolumePredictor(load_checkpoint(checkpoint))
    predictor.set_volume(load_volume(image))
    expected = predictor.segment(10, mask=np.asarray(nib.load(str(drawn)).dataobj)[:, :, 10] == 7, bounds=(6, 14)).mask
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), expected)
    (tmp_path / "drawn").mkdir()
    (tmp_path / "drawn" / "ball.nii.gz").write_bytes(drawn.read_bytes())
    pfile = tmp_path / "drawn" / "prompts.json"
    pfile.write_text(json.dumps([{"slice": 10, "bounds": [6, 14], "mask": "ball.nii.gz"}]))
    out2 = tmp_path / "from_file.nii.gz"
    assert run_cli("segment", image, "--checkpoint", checkpoint, "--prompts", pfile, "--out", out2, "--no-progress") == 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(out2)).dataobj), expected)
    capsys.readouterr()
    assert run_cli("segment", image, "--checkpoint", checkpoint, "--slice", 10, "--mask", drawn, "--mask-label", 3,
                   "--out", tmp_path / "none.nii.gz", "--no-progress") == 2
    assert f"object 1: its mask {drawn} has no voxel of label 3 on slice 10" in capsys.readouterr().err
    assert run_cli("segment", image, "--checkpoint", checkpoint, "--slice", 10, "--box", 12, 9, 28, 23, "--mask-label", 7,
                   "--out", tmp_path / "none.nii.gz", "--no-progress") == 2
    assert "--mask-label needs --mask DRAWN.nii.gz" in capsys.readouterr().err
    assert not (tmp_path / "none.nii.gz").exists()
    # A prompts file's drawn mask is an input too: --out onto it is refused, the file kept (a --preview
    # ends with .png, which a NIfTI mask does not).
    kept = (tmp_path / "drawn" / "ball.nii.gz").read_bytes()
    assert run_cli("segment", image, "--checkpoint", checkpoint, "--prompts", pfile, "--out",
                   tmp_path / "drawn" / "ball.nii.gz", "--no-progress") == 2
    assert "is the drawn mask file of object 1" in capsys.readouterr().err
    assert (tmp_path / "drawn" / "ball.nii.gz").read_bytes() == kept
    assert run_cli("segment", image, "--checkpoint", checkpoint, "--prompts", pfile, "--out", tmp_path / "o.nii.gz",
                   "--preview", tmp_path / "drawn" / "ball.nii.gz", "--no-progress") == 2
    assert "--preview" in (err := capsys.readouterr().err) and "must end with .png" in err, err
    assert (tmp_path / "drawn" / "ball.nii.gz").read_bytes() == kept and not (tmp_path / "o.nii.gz").exists()


def test_segment_a_sagittal_file_gives_its_axial_twins_mask(image, checkpoint, tmp_path, capsys):
    """The same voxels stored sagittally: the same world prompt gives the same mask, on the file's grid."""
    nii = nib.load(str(image))
    sagittal = tmp_path / "sagittal.nii.gz"  # stored[a, s, r] = array[r, a, s]
    nib.save(nib.Nifti1Image(np.transpose(np.asarray(nii.dataobj), (1, 2, 0)), nii.affine[:, [1, 2, 0, 3]]), sagittal)
    wz = (nii.affine @ [20, 16, 10, 1])[2]  # the ball's centre slice, in millimetres
    (x0, y0), (x1, y1) = (nii.affine @ [12, 9, 10, 1])[:2], (nii.affine @ [28, 23, 10, 1])[:2]  # a box around it
    lo, hi = (nii.affine @ [20, 16, 6, 1])[2], (nii.affine @ [20, 16, 14, 1])[2]
    masks = []
    for path, name in ((image, "axial"), (sagittal, "sagittal")):
        out = tmp_path / f"{name}_mask.nii.gz"
        rc = run_cli("segment", path, "--checkpoint", checkpoint, "--world", "--slice", wz, "--box", min(x0, x1), min(y0, y1),
                     max(x0, x1), max(y0, y1), "--bounds", lo, hi, "--out", out, "--preview", tmp_path / f"{name}.png", "--no-progress")
        assert rc == 0, capsys.readouterr().err
        img = nib.load(str(out))
        np.testing.assert_allclose(img.affine, nib.load(str(path)).affine)
        masks.append(np.asarray(img.dataobj))
    assert masks[0].any()
    np.testing.assert_array_equal(masks[1], np.transpose(masks[0], (1, 2, 0)))


def _bad(capsys, out, *argv, match):
    rc = run_cli(*argv, "--out", out, "--no-progress")
    err = capsys.readouterr().err
    assert rc != 0
    assert match in err, err
    assert not Path(out).exists() and not list(Path(out).parent.glob(".*tmp*"))


def test_bad_input(image, checkpoint, tmp_path, capsys):
    out = tmp_path / "sub" / "mask.nii.gz"
    ck = ("--checkpoint", checkpoint)
    _bad(capsys, out, "segment", image, *ck, "--slice", 10, "--point", 45, 3, match="point (45, 3) is outside the image")
    _bad(capsys, out, "segment", image, *ck, "--slice", 10, "--box", 1, 1, 60, 5, match="box corner (60, 5) is outside the image")
    _bad(capsys, out, "segment", image, *ck, "--slice", 3, "--point", 5, 5, "--bounds", 5, 15, match="prompted slice 3 is outside the bounds 5..15")
    _bad(capsys, out, "segment", image, *ck, "--slice", 30, "--point", 5, 5, match="slice 30 is outside the image")
    _bad(capsys, out, "segment", image, *ck, "--slice", 10, "--point", 5, 5, "--bounds", 15, 5, match="LO=15 > HI=5")
    _bad(capsys, out, "segment", tmp_path / "missing.nii.gz", *ck, "--slice", 1, "--point", 5, 5, match="image not found")
    empty = tmp_path / "empty_dicom"
    empty.mkdir()
    _bad(capsys, out, "segment", empty, *ck, "--slice", 1, "--point", 5, 5, match="no DICOM image files found")
    four_d = tmp_path / "4d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 3), np.int16), np.eye(4)), four_d)
    _bad(capsys, out, "segment", four_d, *ck, "--slice", 1, "--point", 5, 5, match="4D")
    _bad(capsys, out, "segment", image, "--checkpoint", tmp_path / "nope", "--slice", 10, "--point", 5, 5, match="no model checkpoint")
    _bad(capsys, out, "segment", image, *ck, "--slice", 10, match="a prompt is required")
    _bad(capsys, out, "segment", image, *ck, "--slice", 10, "--point", 5, 5, "--encoder-batch-size", 0,
         match="--encoder-batch-size must be >= 1, got 0")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"objects": [{"slice": 10, "points": [[5, 5]], "colour": "red"}]}))
    _bad(capsys, out, "segment", image, *ck, "--prompts", bad_json, match="unknown keys ['colour']")


def test_segment_batch_records_the_prompts_it_read_and_redoes_a_changed_drawn_mask(image, checkpoint, tmp_path,
                                                                                     capsys, monkeypatch):
    from radsam_jax.inference import batch

    (tmp_path / "ball.nii.gz").write_bytes((image.parent / "labels.nii.gz").read_bytes())  # the ball, label 7
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"slice": 10, "bounds": [6, 14], "mask": "ball.nii.gz"}]))
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,image,prompts\na,{image},p.json\n")
    first = prompts.read_text()
    fixed = json.dumps([{"slice": 10, "bounds": [8, 12], "mask": "ball.nii.gz"}])
    real_segment, used = batch.segment_objects, []

    def edited_once_read(predictor, volume, objects, **kwargs):  # the user saves a fix after the prompts were read
        used.append(objects[0].bounds)
        prompts.write_text(fixed)
        return real_segment(predictor, volume, objects, **kwargs)

    out_dir = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(batch, "segment_objects", edited_once_read)
        assert run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--no-progress") == 0
    assert used == [(6, 14)]
    record = json.loads((out_dir / "segment-batch-summary.json").read_text())["done"][0]
    assert record["prompts_sha256"] == hashlib.sha256(first.encode()).hexdigest()  # the prompts the mask is made from
    assert list(record["masks_sha256"]) == [str(tmp_path / "ball.nii.gz")]
    capsys.readouterr()
    assert run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--no-progress") == 0
    assert f"redo a: its prompts file {prompts} changed" in capsys.readouterr().out  # the fix, segmented
    record = json.loads((out_dir / "segment-batch-summary.json").read_text())["done"][0]
    assert record["prompts_sha256"] == hashlib.sha256(fixed.encode()).hexdigest()
    assert run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--no-progress") == 0
    assert "0 done, 1 skipped" in capsys.readouterr().out
    ball = nib.load(str(tmp_path / "ball.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(ball.dataobj)[::-1].copy(), ball.affine), tmp_path / "ball.nii.gz")  # redrawn
    assert run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--no-progress") == 0
    text = capsys.readouterr().out
    assert f"redo a: its drawn mask {tmp_path / 'ball.nii.gz'} changed" in text and "1 done" in text
    # Run from another folder, the manifest named relative to it: the same files are compared.
    monkeypatch.chdir(tmp_path.parent)
    redrawn = np.asarray(nib.load(str(tmp_path / "ball.nii.gz")).dataobj)[:, ::-1].copy()  # drawn again
    nib.save(nib.Nifti1Image(redrawn, ball.affine), tmp_path / "ball.nii.gz")
    relative = [tmp_path.name + "/cases.csv", "--out-dir", tmp_path.name + "/out"]
    assert run_cli("segment-batch", *relative, "--checkpoint", checkpoint, "--no-progress") == 0
    assert f"redo a: its drawn mask {tmp_path / 'ball.nii.gz'} changed" in capsys.readouterr().out
    record = json.loads((out_dir / "segment-batch-summary.json").read_text())["done"][0]
    assert list(record["masks_sha256"]) == [str(tmp_path / "ball.nii.gz")]  # absolute, whatever the folder
    monkeypatch.chdir(tmp_path)
    nib.save(nib.Nifti1Image(redrawn[::-1].copy(), ball.affine), tmp_path / "ball.nii.gz")
    assert run_cli("segment-batch", "cases.csv", "--out-dir", "out", "--checkpoint", checkpoint, "--no-progress") == 0
    assert "redo a: its drawn mask" in capsys.readouterr().out


def test_segment_batch_reads_each_prompts_file_once_and_each_drawn_mask_once_per_case(image, checkpoint, tmp_path,
                                                                                       monkeypatch):
    """A prompts file is read once (its masks' paths checked before the model loads, its objects run),
    a drawn mask once per case however many objects name it: hashes and prompts from the same read."""
    import builtins
    import io

    for name in ("ball.nii.gz", "ball_b.nii.gz"):
        (tmp_path / name).write_bytes((image.parent / "labels.nii.gz").read_bytes())  # the ball, label 7
    (tmp_path / "a.json").write_text(json.dumps([{"label": k, "slice": 10, "bounds": [8, 12], "mask": "ball.nii.gz",
                                                  "mask_label": 7} for k in (1, 2)]))
    (tmp_path / "b.json").write_text(json.dumps([{"slice": 10, "bounds": [8, 12], "mask": "ball_b.nii.gz"}]))
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,image,prompts\na,{image},a.json\nb,{image},b.json\n")
    watched = {str((tmp_path / name).resolve()): name for name in ("a.json", "b.json", "ball.nii.gz", "ball_b.nii.gz")}
    real_open, opened = builtins.open, {name: 0 for name in watched.values()}

    def counted_open(file, *args, **kwargs):  # every Python-level open: builtins.open, io.open (pathlib), gzip
        if isinstance(file, (str, Path)) and str(Path(file).resolve()) in watched:
            opened[watched[str(Path(file).resolve())]] += 1
        return real_open(file, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", counted_open)
        m.setattr(io, "open", counted_open)
        assert run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", tmp_path / "out",
                       "--no-progress") == 0
    assert opened == {"a.json": 1, "b.json": 1, "ball.nii.gz": 1, "ball_b.nii.gz": 1}
    done = json.loads((tmp_path / "out" / "segment-batch-summary.json").read_text())["done"]
    sha = hashlib.sha256((image.parent / "labels.nii.gz").read_bytes()).hexdigest()
    assert [r["masks_sha256"] for r in done] == [{str(tmp_path / "ball.nii.gz"): sha}, {str(tmp_path / "ball_b.nii.gz"): sha}]
    assert done[0]["volumes_ml"].keys() == {"1", "2"}


def test_segment_without_checkpoint_needs_one(image, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "DEFAULT_CHECKPOINT", tmp_path / "no_default")
    _bad(capsys, tmp_path / "m.nii.gz", "segment", image, "--slice", 10, "--point", 5, 5, match="pass --checkpoint")


def test_segment_batch(image, checkpoint, tmp_path, capsys):
    good = tmp_path / "p.json"
    good.write_text(json.dumps([{"slice": 10, "box": [12, 9, 28, 23], "bounds": [6, 14]}]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"slice": 10, "points": [[99, 1]]}]))
    # A second image with another slice count in the same bucket.
    array, _ = _ball_volume((40, 36, 27))
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0])), other)
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,image,prompts\na,{image},p.json\nb,other.nii.gz,p.json\nc,other.nii.gz,bad.json\nd,missing.nii.gz,p.json\n")
    out_dir = tmp_path / "out"
    rc = run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--no-progress")
    assert rc == 1
    text = capsys.readouterr().out
    assert "2 done, 0 skipped" in text and "2 failed" in text and "failed c:" in text and "failed d:" in text
    assert sorted(p.name for p in out_dir.glob("*.nii.gz")) == ["a.nii.gz", "b.nii.gz"]
    np.testing.assert_allclose(nib.load(str(out_dir / "b.nii.gz")).affine, np.diag([1.5, 1.5, 3.0, 1.0]))
    summary = json.loads((out_dir / "segment-batch-summary.json").read_text())
    assert [d["id"] for d in summary["done"]] == ["a", "b"] and len(summary["failed"]) == 2
    for d in summary["done"]:  # each object's volume in the written label map, voxels of 6.75 mm^3
        written = np.asarray(nib.load(d["output"]).dataobj)
        assert d["volumes_ml"] and all(ml == round(np.count_nonzero(written == int(label)) * 6.75e-3, 3)
                                       for label, ml in d["volumes_ml"].items()), d
    # A re-run skips finished cases, and its summary keeps their records.
    rc = run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--no-progress")
    assert rc == 1
    assert "0 done, 2 skipped" in capsys.readouterr().out
    again = json.loads((out_dir / "segment-batch-summary.json").read_text())
    assert again["done"] == summary["done"] and again["skipped"] == ["a", "b"] and again["complete"]
    # Other settings would mix two runs' masks in one folder: refused before anything runs.
    rc = run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--no-progress",
                 "--dtype", "bfloat16", "--vanish-policy", "continue")
    assert rc == 2
    err = capsys.readouterr().err
    assert (f"{out_dir} holds masks made with other settings (dtype 'float32' there, 'bfloat16' here; vanish_policy "
            f"'stop' there, 'continue' here; masks of a, b): use another --out-dir") in err
    # A prompts file changed since its masks were written: those cases are segmented again.
    good.write_text(json.dumps([{"slice": 10, "box": [14, 10, 26, 22], "bounds": [7, 13]}]))
    rc = run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--no-progress")
    text = capsys.readouterr().out
    assert rc == 1 and "redo a: its prompts file" in text and "redo b:" in text and "2 done, 0 skipped" in text
    # Other settings through another shard count: still refused (every summary in the folder is read).
    rc = run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--no-progress",
                 "--shard", "0/2", "--dtype", "bfloat16")
    assert rc == 2 and "holds masks made with other settings (dtype 'float32' there" in capsys.readouterr().err
    # A changed prompts file whose re-run fails keeps the case to redo: its old mask is not taken as done.
    good.write_text(json.dumps([{"slice": 99, "box": [14, 10, 26, 22]}]))
    for _ in range(2):
        rc = run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--no-progress")
        text = capsys.readouterr().out
        assert rc == 1 and "redo a:" in text and "failed a:" in text and "0 done, 0 skipped" in text, text
    # A prompts file removed since its mask was written: nothing to compare, the mask stands.
    good.unlink()
    rc = run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--no-progress")
    assert rc == 1 and "0 done, 2 skipped" in capsys.readouterr().out


def test_segment_batch_stopped_keeps_its_summary_and_continues(image, checkpoint, tmp_path, capsys, monkeypatch):
    from radsam_jax.inference import batch

    (tmp_path / "p.json").write_text(json.dumps([{"slice": 10, "box": [12, 9, 28, 23], "bounds": [6, 14]}]))
    manifest = tmp_path / "cases.csv"
    manifest.write_text("id,image,prompts\n" + "".join(f"{c},{image},p.json\n" for c in "abc"))
    argv = ("segment-batch", manifest, "--checkpoint", checkpoint, "--no-progress", "--out-dir")
    assert run_cli(*argv, tmp_path / "full") == 0
    full = json.loads((tmp_path / "full" / "segment-batch-summary.json").read_text())
    real, calls = batch.segment_objects, []

    def stopped_at_the_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    out_dir = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(batch, "segment_objects", stopped_at_the_second)
        assert run_cli(*argv, out_dir) == 130
    assert f"interrupted; the finished cases' masks and the summary of the run so far are in {out_dir}" in capsys.readouterr().err
    so_far = json.loads((out_dir / "segment-batch-summary.json").read_text())
    assert [d["id"] for d in so_far["done"]] == ["a"] and not so_far["complete"]
    assert run_cli(*argv, out_dir) == 0
    assert "2 done, 1 skipped" in capsys.readouterr().out
    final = json.loads((out_dir / "segment-batch-summary.json").read_text())
    drop = lambda records: [{k: v for k, v in r.items() if k not in ("seconds", "output")} for r in records]
    assert drop(final["done"]) == drop(full["done"]) and final["skipped"] == ["a"] and final["complete"]
    assert final["settings"] == full["settings"]


def test_segment_batch_shards_share_a_manifest_and_an_out_dir(image, checkpoint, tmp_path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"slice": 10, "box": [12, 9, 28, 23], "bounds": [6, 14]}]))
    manifest = tmp_path / "cases.csv"
    manifest.write_text("id,image,prompts\n" + "".join(f"{c},{image},p.json\n" for c in "abc"))
    out_dir = tmp_path / "out"
    for shard, ids in (("0/2", ["a", "c"]), ("1/2", ["b"])):
        rc = run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--shard", shard, "--no-progress")
        assert rc == 0, capsys.readouterr()
        name = f"segment-batch-summary-{shard.replace('/', '-of-')}.json"
        assert [d["id"] for d in json.loads((out_dir / name).read_text())["done"]] == ids
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz", "segment-batch-summary-0-of-2.json",
                                                         "segment-batch-summary-0-of-2.lock", "segment-batch-summary-1-of-2.json",
                                                         "segment-batch-summary-1-of-2.lock"]
    # Two processes on one shard of one folder: the second is refused (the summaries would race).
    from radsam_jax.io import lock_exclusively

    with lock_exclusively(out_dir / "segment-batch-summary-1-of-2.lock"):
        assert run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--shard", "1/2",
                       "--no-progress") == 2
        assert (f"another segment-batch process writes into {out_dir} as shard 1/2: wait for it to end"
                in capsys.readouterr().err)
    masks = [np.asanyarray(nib.load(str(out_dir / f"{c}.nii.gz")).dataobj) for c in "ab"]
    assert masks[0].any() and np.array_equal(*masks)  # same image, same prompt
    assert run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--shard", "5/8", "--no-progress") == 0
    assert "shard 5/8 has no case (the manifest has 3): nothing to do" in capsys.readouterr().err


def _truncated_copy(src: Path, dst: Path) -> Path:
    raw = src.read_bytes()
    dst.write_bytes(raw[: len(raw) // 2])
    return dst


def test_bad_files_and_destinations(image, checkpoint, tmp_path, capsys):
    """Checked before the model runs: corrupt inputs name their file, and a destination that cannot
    be written (or would replace an input) is refused."""
    out = tmp_path / "sub" / "mask.nii.gz"
    ck = ("--checkpoint", checkpoint)
    prompt = ("--slice", 10, "--point", 20, 16)
    cut = _truncated_copy(image, tmp_path / "cut.nii.gz")
    _bad(capsys, out, "segment", cut, *ck, *prompt, match=f"cannot read NIfTI file {cut} (image)")
    cut_labels = _truncated_copy(image.parent / "labels.nii.gz", tmp_path / "cut_labels.nii.gz")
    _bad(capsys, out, "segment", image, *ck, *prompt, "--labels", cut_labels, "--label-id", 7,
         match=f"cannot read NIfTI file {cut_labels} (label map)")
    _bad(capsys, out, "segment", image, *ck, *prompt, "--labels", image.parent / "labels.nii.gz", "--label-id", 250,
         match=f"reference label(s) [250] are absent from {image.parent / 'labels.nii.gz'} (its labels: 7)")
    afile = tmp_path / "afile"
    afile.write_text("x")
    _bad(capsys, afile / "m.nii.gz", "segment", image, *ck, *prompt, match=f"cannot be created: {afile} is a file")
    (tmp_path / "adir.nii.gz").mkdir()
    assert run_cli("segment", image, *ck, *prompt, "--out", tmp_path / "adir.nii.gz", "--no-progress") == 2
    assert f"--out {tmp_path}/adir.nii.gz is a folder, not a file" in capsys.readouterr().err
    _bad(capsys, out, "segment", image, *ck, *prompt, "--preview", afile / "p.png", match=f"--preview {afile}/p.png cannot be created")
    pfile = tmp_path / "p.json"
    pfile.write_text(json.dumps([{"slice": 10, "points": [[20, 16]]}]))
    for option in (("--propagation", "box"), ("--label-value", 2)):
        _bad(capsys, out, "segment", image, *ck, "--prompts", pfile, *option, match=f"--prompts replaces {option[0]}")
    # --out naming the input itself (by path, or through a hard link) never replaces it.
    copy = tmp_path / "ct.nii.gz"
    copy.write_bytes(image.read_bytes())
    (tmp_path / "hard.nii.gz").hardlink_to(copy)
    for target in (copy, tmp_path / "sub" / ".." / "ct.nii.gz", tmp_path / "hard.nii.gz"):
        assert run_cli("segment", copy, *ck, *prompt, "--out", target, "--no-progress") == 2
        assert "writing it would destroy the input" in capsys.readouterr().err
    assert copy.read_bytes() == image.read_bytes()


def _prompt_error(data, match, world=False, shape=(40, 36, 20)):
    from radsam_jax.inference.prompt_file import PromptError, parse_prompts

    affine = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 20.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]])
    with pytest.raises(PromptError, match=match):
        parse_prompts(data, shape, affine, world=world)


@pytest.mark.parametrize("obj, match", [
    ({"slice": 0, "box": [0, 0, 5, 5], "edits": 5}, r"object 1: edits must be a list .*got 5"),
    ({"slice": None, "box": [0, 0, 5, 5]}, "object 1: slice must be a number, got None"),
    ({"slice": [0], "box": [0, 0, 5, 5]}, r"object 1: slice must be a number, got \[0\]"),
    ({"slice": "abc", "box": [0, 0, 5, 5]}, "object 1: slice must be a number, got 'abc'"),
    ({"slice": 0, "box": [0, 0, 5, 5], "bounds": [-30, None]}, "object 1: bounds hi must be a number, got None"),
    ({"slice": 0, "box": [0, None, 5, 5]}, r"object 1: box must be \[x0, y0, x1, y1\] \(numbers\)"),
    ({"slice": 0, "points": [[0, None]]}, "object 1: points must be a list of"),
    ({"slice": 0, "points": [[0, 0]], "edits": [{"slice": None, "points": [[0, 0]]}]}, "object 1, edit 1: slice must be a number"),
    # Millimetres as given, and the image's extent in millimetres (voxel slices span -40 +- 1.5 .. 17 + 1.5 mm).
    ({"slice": 400, "points": [[0, 0]]}, r"slice z = 400 mm is outside the image, which spans z -41.5..18.5 mm"),
    ({"slice": 0, "points": [[100, 0]]}, r"point \(100, 0\) mm is outside the image, whose slice 13 spans x -29.2..30.8 mm"),
    ({"slice": 0, "points": [[0, 0]], "bounds": [-30, -20]}, r"prompted slice z = 0 mm \(slice 13\) is outside the bounds -30..-20 mm"),
    ({"slice": 0, "points": [[0, 0]], "edits": [{"slice": 300, "points": [[0, 0]]}]}, "edit 1: slice z = 300 mm is outside"),
])
def test_world_prompts_errors_name_key_and_millimetres(obj, match):
    _prompt_error({"coordinates": "world", "objects": [obj]}, match)


def test_world_drawn_mask_alone_places_its_slices_at_the_image_centre():
    """A drawn mask needs no point or box in world coordinates: its slice and bounds are the z heights
    taken at the image's centre voxel (on an oblique scan the slice at a height varies in-plane)."""
    from radsam_jax.inference.prompt_file import parse_prompts

    shape = (40, 36, 20)
    axial = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 20.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]])
    (obj,) = parse_prompts({"coordinates": "world", "objects": [{"slice": 0, "mask": "m.nii.gz", "bounds": [-30, 9]}]},
                           shape, axial)
    assert (obj.slice, obj.bounds, obj.points, obj.box) == (13, (3, 16), None, None)  # z = -40 + 3 k, rounded
    c, sn = np.cos(0.3), np.sin(0.3)  # tilted about x: a slice's z rises 1.5 * sin(0.3) mm per voxel of y
    oblique = np.array([[1.5, 0, 0, 0], [0, 1.5 * c, -3 * sn, 0], [0, 1.5 * sn, 3 * c, -40.0], [0, 0, 0, 1]])
    centre_y = 1.5 * c * 17.5 - 3 * sn * 9.5  # voxel (19.5, 17.5, 9.5)'s y in mm
    for z in (-20.0, 0.0, 10.0):
        (alone,) = parse_prompts({"coordinates": "world", "objects": [{"slice": z, "mask": "m.nii.gz"}]}, shape, oblique)
        (point,) = parse_prompts({"coordinates": "world", "objects": [{"slice": z, "points": [[29.25, centre_y]]}]},
                                 shape, oblique)
        assert alone.slice == point.slice
        corner = np.linalg.inv(oblique) @ [0.0, 0.0, z, 1.0]  # the slice at that height at x = y = 0 differs
        assert alone.slice != int(np.floor(corner[2] + 0.5))


def test_prompts_errors_per_key_and_point_limit():
    from radsam_jax.inference.prompt_file import parse_prompts
    from radsam_jax.inference.volume_predictor import DEFAULT_MAX_POINTS, VolumePredictor

    _prompt_error([{"slice": 5, "label": 1.5, "points": [[1, 1]]}], "object 1: label must be an integer, got 1.5")
    _prompt_error([{"slice": 5.5, "points": [[1, 1]]}], r"slice must be an integer slice index \(voxel coordinates\)")
    _prompt_error([{"slice": 5, "points": [[1, 1]], "edits": 0}], "edits must be a list")
    # [x, y, slice] is no point, nor are strings and booleans numbers (they were reshaped or cast silently).
    _prompt_error([{"slice": 5, "points": [[6, 5, 9], [4, 4, 9]]}], r"points must be a list of \[x, y\] number pairs")
    _prompt_error([{"slice": 5, "points": [[1, 1]], "edits": [{"slice": 6, "points": [1, 2, 3]}]}], "points must be a list of")
    _prompt_error([{"slice": "5", "points": [[1, 1]]}], "slice must be a number, got '5'")
    _prompt_error([{"slice": True, "points": [[1, 1]]}], "slice must be a number, got True")
    _prompt_error([{"slice": 5, "points": [[1, 1]], "point_labels": [True]}], "point_labels must be 1")
    _prompt_error([{"slice": 5, "box": [1, 1, True, 4]}], "box must be")
    assert parse_prompts([{"slice": 5, "points": [3, 4]}], (40, 36, 20), np.eye(4))[0].points.tolist() == [[3.0, 4.0]]
    import jax.numpy as jnp  # the Python API's scalars are numbers: np.int64, 0-d arrays, jnp.argmax(...)
    for k in (np.int64(5), np.array(5), jnp.int32(5), 5.0):
        assert parse_prompts([{"slice": k, "points": np.array([[3, 4]])}], (40, 36, 20), np.eye(4))[0].slice == 5
    _prompt_error([{"slice": 5, "points": []}], "object 1: points is empty")
    # The predictor's own limit on points per slice (prompt + edits there), checked while parsing.
    assert VolumePredictor.__init__.__kwdefaults__["max_points"] == DEFAULT_MAX_POINTS
    n = DEFAULT_MAX_POINTS
    _prompt_error([{"slice": 5, "points": [[1, 1]] * (n + 1)}], f"object 1: {n + 1} points, more than the {n}")
    many = {"slice": 5, "points": [[1, 1]] * (n - 1), "edits": [{"slice": 6, "points": [[1, 1]] * n},
                                                               {"slice": 5, "points": [[2, 2]] * 2}]}
    _prompt_error([many], f"object 1, edit 2: slice 5 would hold {n + 1} points")
    many["edits"][1]["points"] = [[2, 2]]
    parse_prompts([many], (40, 36, 20), np.eye(4))


def test_set_volume_bad_encode_keeps_the_predictor(checkpoint):
    from radsam_jax.checkpoint import load_checkpoint
    from radsam_jax.inference import VolumePredictor
    from radsam_jax.io import Volume

    predictor = VolumePredictor(load_checkpoint(checkpoint))
    volume = Volume(np.zeros((8, 8, 4), np.float32), np.eye(4))
    with pytest.raises(ValueError, match="encode must be 'lazy' or 'all', got 'foo'"):
        predictor.set_volume(volume, encode="foo")
    assert predictor.volume is None


def test_preview_failure_leaves_no_temporary_file(tmp_path):
    from radsam_jax.inference.preview import save_preview
    from radsam_jax.inference.prompt_file import parse_prompts

    objects = parse_prompts([{"slice": 2, "points": [[3, 3]]}], (8, 8, 4), np.eye(4))
    (tmp_path / "p.png").mkdir()  # the rename onto it fails after the PNG is written
    with pytest.raises(OSError):
        save_preview(tmp_path / "p.png", np.zeros((8, 8, 4), np.float32), np.zeros((8, 8, 4), np.uint8), objects,
                     window=(40.0, 400.0))
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


def test_manifest_errors(tmp_path):
    from radsam_jax.inference.batch import read_manifest

    def bad(name, text, match):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=match):
            read_manifest(path)

    bad("short.csv", "image,prompts,id\nct.nii.gz,p.json,a\nct.nii.gz\n", r"short.csv, line 3: empty or missing \"prompts\"")
    bad("empty.csv", "image,prompts\n,p.json\n", r"empty.csv, line 2: empty or missing \"image\"")
    bad("long.csv", "image,prompts\nct.nii.gz,p.json,x\n", "long.csv, line 2: more cells than the header's 2")
    bad("null.json", json.dumps([{"image": None, "prompts": "p.json"}]), r"null.json, case 1: empty or missing \"image\"")
    bad("up.json", json.dumps([{"image": "ct.nii.gz", "prompts": "p.json", "id": "../escaped"}]),
        r"up.json, case 1: id '../escaped' must be a plain file name")
    bad("sub.csv", "image,prompts,id\nct.nii.gz,p.json,sub/x\n", "sub.csv, line 2: id 'sub/x' must be a plain file name")
    bad("dup.csv", "image,prompts,id\nct.nii.gz,p.json,a\nother.nii.gz,p.json,a\n",
        r"dup.csv: line 2 and line 3 both have id 'a' \(output a.nii.gz\); give each case a distinct \"id\"")
    bom = tmp_path / "bom.csv"
    bom.write_text("image,prompts\nct.nii.gz,p.json\n", encoding="utf-8-sig")
    assert [(c.id, c.image) for c in read_manifest(bom)] == [("ct", tmp_path / "ct.nii.gz")]


def test_segment_batch_refuses_bad_out_dir(image, checkpoint, tmp_path, capsys):
    """An image in --out-dir named <id>.nii.gz is never taken for a finished output, nor replaced."""
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "ct.nii.gz").write_bytes(image.read_bytes())
    (folder / "p.json").write_text(json.dumps([{"slice": 10, "points": [[20, 16]]}]))
    manifest = folder / "cases.csv"
    manifest.write_text("image,prompts\nct.nii.gz,p.json\n")
    ck = ("--checkpoint", checkpoint, "--no-progress")
    assert run_cli("segment-batch", manifest, *ck, "--out-dir", folder) == 2
    err = capsys.readouterr().err
    assert f"the output of case 'ct' {folder}/ct.nii.gz is the image of case 'ct'" in err, err
    assert (folder / "ct.nii.gz").read_bytes() == image.read_bytes()
    assert run_cli("segment-batch", manifest, *ck, "--out-dir", folder / "p.json") == 2
    assert f"--out-dir {folder}/p.json is a file, not a folder" in capsys.readouterr().err
    # A drawn mask that is a case's output (refining last run's mask in place): refused, not overwritten
    # (and not taken for a finished output).
    (folder / "out").mkdir()
    (folder / "out" / "ct.nii.gz").write_bytes((image.parent / "labels.nii.gz").read_bytes())
    (folder / "p.json").write_text(json.dumps([{"slice": 10, "mask": "out/ct.nii.gz", "mask_label": 7}]))
    before = (folder / "out" / "ct.nii.gz").read_bytes()
    assert run_cli("segment-batch", manifest, *ck, "--out-dir", folder / "out") == 2
    err = capsys.readouterr().err
    assert f"the output of case 'ct' {folder}/out/ct.nii.gz is the drawn mask of case 'ct'" in err, err
    assert (folder / "out" / "ct.nii.gz").read_bytes() == before


def test_segment_batch_mask_only_after_its_preview(image, checkpoint, tmp_path, capsys, monkeypatch):
    """A case whose preview fails has no mask (so a re-run does it again) and no temporary file."""
    from PIL import Image

    pfile = tmp_path / "p.json"
    pfile.write_text(json.dumps([{"slice": 10, "box": [12, 9, 28, 23], "bounds": [9, 11]}]))
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,image,prompts\na,{image},p.json\n")
    out_dir = tmp_path / "out"
    argv = ("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--previews", "--no-progress")

    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")
        raise OSError("No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Image.Image, "save", full_disk)
        assert run_cli(*argv) == 1
    assert "failed a: OSError: No space left on device" in capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == ["segment-batch-summary.json", "segment-batch-summary.lock"]
    assert run_cli(*argv) == 0
    assert "1 done, 0 skipped" in capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.nii.gz", "a.png", "segment-batch-summary.json",
                                                         "segment-batch-summary.lock"]
    # Redone without --previews: the preview of the replaced mask goes (one the run did not write stays).
    (out_dir / "notes.png").write_bytes(b"the user's")
    pfile.write_text(json.dumps([{"slice": 10, "box": [14, 10, 26, 22], "bounds": [9, 11]}]))
    assert run_cli(*argv[:-2], "--no-progress") == 0
    assert "redo a: its prompts file" in capsys.readouterr().out
    assert sorted(p.name for p in out_dir.glob("*.png")) == ["notes.png"]


def _with_ct_window(checkpoint, dst, window):
    """A copy of `checkpoint` whose radsam.json records `window` as the model's CT window."""
    import shutil

    shutil.copytree(checkpoint, dst)
    header = json.loads((dst / "radsam.json").read_text())
    header["model_config"]["ct_window"] = list(window)
    (dst / "radsam.json").write_text(json.dumps(header))
    return dst


def test_volume_predictor_uses_the_models_ct_window(checkpoint, tmp_path):
    from radsam_jax.checkpoint import load_checkpoint
    from radsam_jax.inference import VolumePredictor
    from radsam_jax.io import Volume
    from radsam_jax.intensity import DEFAULT_CT_WINDOW

    model = load_checkpoint(_with_ct_window(checkpoint, tmp_path / "windowed", (60.0, 350.0)))
    assert model.config.ct_window == (60.0, 350.0)
    assert VolumePredictor(load_checkpoint(checkpoint)).window == DEFAULT_CT_WINDOW
    rng = np.random.default_rng(0)
    volume = Volume(rng.uniform(-300, 300, (24, 20, 2)).astype(np.float32), np.eye(4))

    def embeddings(**kw):
        predictor = VolumePredictor(model, encoder_batch_size=2, **kw)
        predictor.set_volume(volume, encode="all")
        return predictor.window, np.asarray(predictor.embeddings)

    window, own = embeddings()
    assert window == (60.0, 350.0)
    explicit_same, same = embeddings(window=(60, 350))
    assert explicit_same == window
    np.testing.assert_array_equal(own, same)  # the model's window is what the encoder saw
    explicit, other = embeddings(window=DEFAULT_CT_WINDOW)  # an explicit window wins
    assert explicit == DEFAULT_CT_WINDOW and not np.allclose(own, other)
    with pytest.raises(ValueError, match="width > 0"):
        VolumePredictor(model, window=(40.0, 0.0))


def test_segment_window_defaults_to_the_model_and_option_wins(image, checkpoint, tmp_path, capsys, monkeypatch):
    windowed = _with_ct_window(checkpoint, tmp_path / "windowed", (60.0, 350.0))
    seen = []
    build = cli._predictor
    monkeypatch.setattr(cli, "_predictor", lambda model, args: seen.append(build(model, args)) or seen[-1])
    prompt = ("--slice", 10, "--box", 12, 9, 28, 23, "--bounds", 9, 11, "--no-progress")
    assert run_cli("segment", image, "--checkpoint", windowed, *prompt, "--out", tmp_path / "a.nii.gz") == 0
    assert run_cli("segment", image, "--checkpoint", windowed, *prompt, "--window", -600, 1500,
                   "--out", tmp_path / "b.nii.gz") == 0
    assert [p.window for p in seen] == [(60.0, 350.0), (-600.0, 1500.0)]
    capsys.readouterr()
    _bad(capsys, tmp_path / "c.nii.gz", "segment", image, "--checkpoint", windowed, "--slice", 10, "--point", 5, 5,
         "--window", 40, 0, match="--window LEVEL WIDTH needs finite values and WIDTH > 0")


@pytest.mark.parametrize("option, window", [((), (60.0, 350.0)), (("--window", -500, 1200), (-500.0, 1200.0))])
def test_previews_show_the_ct_window_the_model_saw(image, checkpoint, tmp_path, capsys, monkeypatch, option, window):
    """segment --preview and segment-batch --previews: the model's ct_window (or --window), not a fixed
    40/400, in the pixels and in the panel's text."""
    from PIL import Image, ImageDraw

    texts = []
    draw_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *a, **kw: texts.append(text) or draw_text(self, xy, text, *a, **kw))
    windowed = _with_ct_window(checkpoint, tmp_path / "windowed", (60.0, 350.0))
    pfile = tmp_path / "p.json"
    pfile.write_text(json.dumps([{"slice": 10, "box": [12, 9, 28, 23], "bounds": [9, 11]}]))
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"id,image,prompts\na,{image},p.json\n")
    assert run_cli("segment", image, "--checkpoint", windowed, "--prompts", pfile, *option, "--no-progress",
                   "--out", tmp_path / "m.nii.gz", "--preview", tmp_path / "segment.png") == 0
    assert run_cli("segment-batch", manifest, "--checkpoint", windowed, *option, "--previews", "--no-progress",
                   "--out-dir", tmp_path / "out") == 0, capsys.readouterr()
    level, width = window
    background = int(np.clip((-50 - (level - width / 2)) / width, 0, 1) * 255)  # the CT around the ball: 47, 223 (40/400: 70)
    for png in (tmp_path / "segment.png", tmp_path / "out" / "a.png"):
        with Image.open(png) as im:
            rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
        grey = rgb[(rgb[:, 0] == rgb[:, 1]) & (rgb[:, 1] == rgb[:, 2]), 0]  # not the contours or the box
        assert np.bincount(grey).argmax() == background, png
    assert texts.count(f"CT window {level:g}/{width:g} HU") == 2


def _refuses_new_files(folder) -> bool:
    import os
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return True
    os.close(fd)
    os.remove(name)
    return False


@pytest.fixture
def unwritable(tmp_path):
    """A folder that refuses new files: read-only permissions, or (for root, whom they do not stop) /sys."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    folder = next((f for f in (locked, Path("/sys")) if _refuses_new_files(f)), None)
    if folder is None:
        locked.chmod(0o755)
        pytest.skip("no folder refuses new files here")
    yield folder
    locked.chmod(0o755)


def test_unwritable_destinations_fail_before_the_model_runs(image, checkpoint, tmp_path, capsys, unwritable, monkeypatch):
    """--out, --preview and --out-dir in a folder that takes no new files: exit 2 naming it, before the
    model loads, nothing written (it used to fail with a traceback after the whole run, the preview written)."""
    monkeypatch.setattr(cli, "_load_model", lambda *a: pytest.fail("the model was loaded"))
    prompt = ("--checkpoint", checkpoint, "--slice", 10, "--point", 20, 16)
    png = tmp_path / "p.png"
    assert run_cli("segment", image, *prompt, "--out", unwritable / "sub" / "m.nii.gz", "--preview", png, "--no-progress") == 2
    assert f"--out {unwritable}/sub/m.nii.gz cannot be written: no file can be created in {unwritable}" in capsys.readouterr().err
    assert not png.exists()
    assert run_cli("segment", image, *prompt, "--out", tmp_path / "m.nii.gz", "--preview", unwritable / "p.png", "--no-progress") == 2
    assert f"--preview {unwritable}/p.png cannot be written" in capsys.readouterr().err
    manifest = tmp_path / "cases.csv"
    (tmp_path / "p.json").write_text(json.dumps([{"slice": 10, "points": [[20, 16]]}]))
    manifest.write_text(f"id,image,prompts\na,{image},p.json\n")
    assert run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", unwritable / "out", "--no-progress") == 2
    assert f"--out-dir {unwritable}/out cannot be written: no file can be created in {unwritable}" in capsys.readouterr().err


def test_a_mask_that_cannot_be_written_leaves_the_preview_as_it_was(image, checkpoint, tmp_path, capsys, monkeypatch):
    """The disk fills between the preview and the mask: a clean error naming --out (exit 1), no mask,
    and the preview as it was before the run (none, or the earlier one)."""
    from radsam_jax import io

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "save_label_map", full_disk)
    out, png = tmp_path / "m.nii.gz", tmp_path / "p.png"
    argv = ("segment", image, "--checkpoint", checkpoint, "--slice", 10, "--box", 12, 9, 28, 23, "--bounds", 9, 11,
            "--out", out, "--preview", png, "--no-progress")
    for earlier in (None, b"an earlier preview"):
        if earlier is not None:
            png.write_bytes(earlier)
        assert run_cli(*argv) == 1
        err = capsys.readouterr().err
        assert f"cannot write --out {out}: No space left on device" in err and "Traceback" not in err, err
        assert not out.exists()
        assert (png.read_bytes() == earlier) if earlier is not None else not png.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == (["p.png"] if earlier is not None else [])


def test_voxel_volume_of_a_sheared_grid_is_its_determinant():
    from radsam_jax.inference.batch import voxel_ml
    from radsam_jax.io import Volume

    affine = np.array([[0.8, 0, 0, 0], [0, 0.8, 0.5, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])  # gantry tilt: z moves in y
    assert voxel_ml(Volume(np.zeros((2, 2, 2), np.float32), affine)) == pytest.approx(0.8 * 0.8 * 2.0 / 1000, rel=1e-12)


def test_the_commands_show_radsams_own_warnings_as_one_line(monkeypatch):
    import warnings

    import radsam_jax
    from radsam_jax import cli

    default = warnings.formatwarning
    monkeypatch.setattr(warnings, "formatwarning", default)  # put back after the test
    assert cli._one_line_warnings("segment") is default
    ours = str(Path(radsam_jax.__file__).parent / "inference" / "volume_predictor.py")
    assert warnings.formatwarning("ct.nii.gz has no value below 0", UserWarning, ours, 265) == (
        "radsam segment: warning: ct.nii.gz has no value below 0\n")
    theirs = warnings.formatwarning("deprecated", DeprecationWarning, "/site-packages/optax/x.py", 3)
    assert "DeprecationWarning: deprecated" in theirs and "x.py:3" in theirs
    warnings.formatwarning = default
    assert cli.main(["evaluate", "--checkpoint", "/nonexistent", "--data", "/nonexistent", "--out", "/nonexistent"]) == 2
    assert warnings.formatwarning is default  # main puts Python's formatter back
