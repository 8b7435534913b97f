"""MR intensities (ModelConfig.intensity "percentile"): the normalisation against MedSAM's MR formula,
its independence of the scanner's scale through the predictor, and the CLIs that take MR volumes
(segment, evaluate) or refuse them with a model that windows Hounsfield units."""

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from radsam_jax.checkpoint import save_model
from radsam_jax.cli import main as radsam
from radsam_jax.inference import VolumePredictor
from radsam_jax.intensity import volume_intensities, window_caption
from radsam_jax.io import Volume
from radsam_jax.model import ModelConfig, RadSam
from radsam_jax.preprocess import window_ct
from test_inference import random_variables, synthetic_volume
from tiny_model import tiny_model_config

PERCENTILE = dict(intensity="percentile", ct_window=(500.0, 1000.0))


def medsam_mr_0_255(volume: np.ndarray) -> np.ndarray:
    """MedSAM's MR preprocessing, written from its description: clip to the 0.5th / 99.5th
    percentiles of the voxels above 0, min-max scale to 0..255, background (0) stays 0."""
    lo, hi = np.percentile(volume[volume > 0], (0.5, 99.5))
    clipped = np.clip(volume, lo, hi)
    out = (clipped - clipped.min()) / (clipped.max() - clipped.min()) * 255.0
    out[volume == 0] = 0
    return out


def mr_like(seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """An MR-like volume: background 0, tissue with a long bright tail, arbitrary units."""
    rng = np.random.default_rng(seed)
    volume = rng.gamma(2.0, 150.0, (30, 28, 12)).astype(np.float32)
    volume[:4] = 0  # air around the body
    return volume * np.float32(scale)


def test_percentile_window_is_medsams_mr_normalisation():
    volume = mr_like()
    ours = np.asarray(window_ct(volume_intensities(volume, "percentile"), 500.0, 1000.0))
    np.testing.assert_allclose(ours, medsam_mr_0_255(volume), atol=1e-3)  # float32 on a 0..255 scale
    normalised = volume_intensities(volume, "percentile")
    np.testing.assert_allclose(np.percentile(normalised[volume > 0], (0.5, 99.5)), (0.0, 1000.0), atol=1e-2)
    assert (normalised[volume == 0] < 0).all()  # the background falls below the window: black
    # MR values have no absolute scale: a scanner storing them 3.7x larger gives the same input.
    np.testing.assert_allclose(volume_intensities(volume * np.float32(3.7), "percentile"), normalised, rtol=1e-5, atol=1e-3)


def test_hu_intensities_are_left_as_stored():
    volume = mr_like()
    assert volume_intensities(volume, "hu") is volume


@pytest.mark.parametrize("volume, message", [
    (np.zeros((4, 4, 2)), "mr.nii.gz has no voxel above 0"),
    (np.where(np.arange(32).reshape(4, 4, 2) > 3, 7.0, 0.0), "mr.nii.gz: the 0.5th and 99.5th percentiles .* are both 7"),
])
def test_volumes_percentiles_cannot_normalise_are_refused(volume, message):
    with pytest.raises(ValueError, match=message):
        volume_intensities(volume, "percentile", "mr.nii.gz")
    with pytest.raises(ValueError, match="intensity must be one of hu, percentile, got 'zscore'"):
        volume_intensities(volume, "zscore")


@pytest.mark.parametrize("intensity", ["hu", "percentile"])
def test_non_finite_voxels_are_refused_with_their_place(intensity):
    # One NaN voxel used to spread through the encoder's attention: an empty mask on its slice and on
    # every slice propagation reached from there, with no error.
    volume = mr_like()
    volume[5, 7, 3] = np.nan
    volume[6, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"ct.nii.gz holds 2 NaN or infinite voxel\(s\), the first at voxel index "
                                         r"\(5, 7, 3\): replace them"):
        volume_intensities(volume, intensity, "ct.nii.gz")
    assert volume_intensities(np.zeros((2, 2, 2), np.int16), "hu").dtype == np.int16  # integers are always finite


def test_predictor_refuses_non_finite_volumes_and_keeps_the_current_one(models):
    ct_model, _ = models
    p = VolumePredictor(ct_model, bucket=32)
    first = Volume(mr_like() - 500.0, np.eye(4), "first")
    p.set_volume(first)
    broken = mr_like() - 500.0
    broken[0, 0, 6] = np.nan
    with pytest.raises(ValueError, match=r"nan.nii.gz holds 1 NaN or infinite voxel\(s\), the first at voxel index \(0, 0, 6\)"):
        p.set_volume(Volume(broken, np.eye(4), "nan.nii.gz"))
    assert p.volume is first


def test_model_config_records_the_intensity():
    config = ModelConfig(**PERCENTILE)
    assert ModelConfig.from_mapping(config.to_dict()) == config
    old = {k: v for k, v in ModelConfig().to_dict().items() if k != "intensity"}  # a file written before it existed
    assert ModelConfig.from_mapping(old).intensity == "hu"
    with pytest.raises(ValueError, match="intensity must be one of hu, percentile, got 'zscore'"):
        ModelConfig(intensity="zscore").validate()
    assert window_caption((500.0, 1000.0), "percentile") == "window 500/1000 (p0.5-p99.5 = 0-1000)"
    assert window_caption((40.0, 400.0), "hu") == "CT window 40/400 HU"


@pytest.fixture(scope="module")
def models():
    # A one-layer decoder with 8 mask-prompt channels: the model whose fingerprint from before the
    # intensity field is pinned below.
    config = tiny_model_config(mask_in_chans=8, decoder_depth=1)
    variables = random_variables(config)
    return RadSam(config, variables), RadSam(dataclasses.replace(config, **PERCENTILE), variables)


def test_predictor_normalises_mr_volumes_by_their_percentiles(models):
    ct_model, mr_model = models
    raw = Volume(np.clip(synthetic_volume().array + 100.0, 0, None), np.diag([1.5, 1.5, 3.0, 1.0]), "mr")
    prompt = dict(box=[12, 9, 28, 23], bounds=(4, 15))

    mr = VolumePredictor(mr_model, bucket=32, vanish_policy="continue")
    assert (mr.intensity, mr.window) == ("percentile", (500.0, 1000.0))
    mr.set_volume(raw, encode="all")
    # The same as a Hounsfield-unit model windowing the normalised volume at 500/1000 by hand.
    by_hand = VolumePredictor(ct_model, bucket=32, vanish_policy="continue", window=(500.0, 1000.0))
    by_hand.set_volume(Volume(volume_intensities(raw.array, "percentile"), raw.affine, "normalised"), encode="all")
    np.testing.assert_array_equal(np.asarray(mr.embeddings), np.asarray(by_hand.embeddings))
    np.testing.assert_array_equal(mr.segment(10, **prompt).mask, by_hand.segment(10, **prompt).mask)
    np.testing.assert_array_equal(mr.intensities, volume_intensities(raw.array, "percentile"))
    # ... and independent of the scale the scanner stored: embeddings to float32 rounding.
    reference = np.asarray(mr.embeddings)
    mr.set_volume(Volume(raw.array * np.float32(3.7), raw.affine, "mr x 3.7"), encode="all")
    scale = np.abs(reference).max()
    np.testing.assert_allclose(np.asarray(mr.embeddings), reference, atol=1e-4 * scale)


def test_predictor_intensity_override_and_errors(models):
    ct_model, mr_model = models
    assert VolumePredictor(ct_model, intensity="percentile").window == (500.0, 1000.0)  # that mode's default
    assert VolumePredictor(mr_model, intensity="hu").window == (40.0, 400.0)
    assert VolumePredictor(ct_model).window == ct_model.config.ct_window
    with pytest.raises(ValueError, match="intensity must be one of hu, percentile, got 'zscore'"):
        VolumePredictor(ct_model, intensity="zscore")
    p = VolumePredictor(mr_model, bucket=32)
    first = Volume(mr_like(), np.eye(4), "first")
    p.set_volume(first)
    with pytest.raises(ValueError, match="blank.nii.gz has no voxel above 0"):
        p.set_volume(Volume(np.zeros((30, 28, 12), np.float32), np.eye(4), "blank.nii.gz"))
    assert p.volume is first  # a volume that cannot be normalised keeps the current one


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, models):
    folder = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name, model in zip(("ct", "mr"), models):
        paths[name] = save_model(folder / name, model.config, model.variables)
    return paths


def _mr_case(folder, modality="MR"):
    """A generic case folder: an MR-like volume with a bright ellipsoid 'organ' (label 1)."""
    x, y, z = np.meshgrid(*[np.arange(s) for s in (40, 36, 20)], indexing="ij")
    organ = ((x - 20) / 10.0) ** 2 + ((y - 16) / 8.0) ** 2 + ((z - 10) / 5.0) ** 2 <= 1.0
    rng = np.random.default_rng(1)
    mr = np.where(organ, 900.0, 300.0) + rng.normal(0, 30, organ.shape)
    mr[:3] = 0
    folder.mkdir(parents=True)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(mr.astype(np.float32), affine), str(folder / "mr.nii.gz"))
    nib.save(nib.Nifti1Image(organ.astype(np.uint8), affine), str(folder / "labels.nii.gz"))
    (folder / "labels.json").write_text(json.dumps({"label_map": {"1": "organ"}, "modality": modality}))
    return folder


def test_segment_takes_mr_volumes_with_percentile_intensities(checkpoints, tmp_path, capsys):
    case = _mr_case(tmp_path / "case")
    out, png = tmp_path / "mask.nii.gz", tmp_path / "preview.png"
    args = ["segment", str(case / "mr.nii.gz"), "--slice", "10", "--box", "12", "9", "28", "23", "--bounds", "5", "15",
            "--out", str(out), "--preview", str(png), "--no-progress"]
    assert radsam([*args, "--checkpoint", str(checkpoints["mr"])]) == 0, capsys.readouterr().err
    from_model = np.asarray(nib.load(str(out)).dataobj)
    out.unlink()
    # Windowed as HU, the same file gives another mask, with a warning that it does not look like CT.
    with pytest.warns(UserWarning, match="mr.nii.gz has no value below 0, so it does not look like CT"):
        assert radsam([*args, "--checkpoint", str(checkpoints["ct"])]) == 0
    assert (np.asarray(nib.load(str(out)).dataobj) != from_model).any()
    out.unlink()
    # A Hounsfield-unit model told the units on the command line segments the same way.
    assert radsam([*args, "--checkpoint", str(checkpoints["ct"]), "--intensity", "percentile", "--window", "500", "1000"]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), from_model)
    assert png.stat().st_size > 0


def test_evaluate_needs_percentile_intensities_for_mr_cases(checkpoints, tmp_path, capsys, monkeypatch):
    import radsam_jax.checkpoint

    data = tmp_path / "data"
    _mr_case(data / "case1")
    common = ["evaluate", "--data", str(data), "--protocol", "volume", "--prompt", "box", "--edits", "0",
              "--bootstrap", "10", "--worst", "1", "--no-progress"]
    with monkeypatch.context() as m:  # refused from the checkpoint's header, before the weights are read
        m.setattr(radsam_jax.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("the model was loaded"))
        assert radsam([*common, "--checkpoint", str(checkpoints["ct"]), "--out", str(tmp_path / "hu")]) == 2
    err = capsys.readouterr().err
    assert "case(s) case1 (MR) are not CT" in err and "--intensity percentile" in err, err
    assert not (tmp_path / "hu").exists()
    out = tmp_path / "mr"
    assert radsam([*common, "--checkpoint", str(checkpoints["mr"]), "--out", str(out)]) == 0, capsys.readouterr().err
    assert "window 500/1000 (p0.5-p99.5 = 0-1000)" in (out / "summary.md").read_text()
    run = json.loads((out / "run.json").read_text())
    assert run["identity"]["intensity"] == "percentile" and run["report"]["intensity"] == "percentile"
    # The report re-rendered from the record states the same units.
    assert radsam(["report", str(out), "--out", str(tmp_path / "again")]) == 0, capsys.readouterr().err
    assert "window 500/1000 (p0.5-p99.5 = 0-1000)" in (tmp_path / "again" / "summary.md").read_text()


def test_evaluate_warns_about_ct_cases_normalised_by_percentiles(checkpoints, tmp_path, capsys):
    data = tmp_path / "data"
    _mr_case(data / "ct1", modality="CT")
    out = tmp_path / "out"
    assert radsam(["evaluate", "--data", str(data), "--protocol", "volume", "--prompt", "box", "--edits", "0",
                   "--bootstrap", "10", "--no-progress", "--checkpoint", str(checkpoints["mr"]), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 CT case(s) (ct1) are normalised by their percentiles" in err, err
    # A CT run records no intensity, as runs did before the field existed, so their records continue.
    assert radsam(["evaluate", "--data", str(data), "--protocol", "volume", "--prompt", "box", "--edits", "0",
                   "--bootstrap", "10", "--no-progress", "--checkpoint", str(checkpoints["ct"]),
                   "--intensity", "hu", "--out", str(tmp_path / "hu")]) == 0
    assert "intensity" not in json.loads((tmp_path / "hu" / "run.json").read_text())["identity"]


def test_ct_models_keep_the_fingerprint_of_records_written_before_the_intensity_field(models):
    """Run records identify the model by this hash; the value below is what radsam-jax computed for
    this model before ModelConfig.intensity existed (commit 812d850), so those records still continue."""
    from radsam_jax.evaluate.record import model_fingerprint

    ct_model, mr_model = models
    assert model_fingerprint(ct_model) == "1dede5f1960a1599ee5001a22e678aec1e3a35ec00211e9fb2e45813e7811d91"
    assert model_fingerprint(mr_model) != model_fingerprint(ct_model)
