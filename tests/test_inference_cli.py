"""`radsam segment` / `segment-batch`: outputs on the input grid with its affine, --prompts, preview,
Dice, batch skip/failure handling, and bad input (clear error, non-zero exit, nothing at --out)."""

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radsam_jax.checkpoint import save_model
from radsam_jax.inference import cli
from test_inference import random_variables, tiny_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = tiny_config()
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
    assert "object 3 (ball)" in capsys.readouterr().out


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
    sagittal = tmp_path / "sagittal.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])), sagittal)
    _bad(capsys, out, "segment", sagittal, *ck, "--slice", 1, "--point", 5, 5, match="third array axis")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"objects": [{"slice": 10, "points": [[5, 5]], "colour": "red"}]}))
    _bad(capsys, out, "segment", image, *ck, "--prompts", bad_json, match="unknown keys ['colour']")


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
    # A re-run skips finished cases.
    rc = run_cli("segment-batch", manifest, "--checkpoint", checkpoint, "--out-dir", out_dir, "--no-progress")
    assert rc == 1
    assert "0 done, 2 skipped" in capsys.readouterr().out
