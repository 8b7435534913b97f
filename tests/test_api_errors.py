"""Bad input gets a clear error naming the argument and the value, before any computation."""

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from radsam_jax import preprocess
from radsam_jax.inference import VolumePredictor, bucket_size
from radsam_jax.model import RadSam
from radsam_jax.prompts import make_prompts
from test_inference import synthetic_volume, tiny_model  # noqa: F401 (tiny_model: a fixture)
from tiny_model import tiny_model_config

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ and launch/ are imported from the repository
    sys.path.append(str(ROOT))


@pytest.fixture(scope="module")
def predictor(tiny_model):  # noqa: F811
    p = VolumePredictor(tiny_model, bucket=32)
    p.set_volume(synthetic_volume())
    return p


@pytest.fixture
def no_compute(predictor, monkeypatch):
    """Fails the test if the encoder or a decoder runs: the errors must come before any computation."""
    import radsam_jax.inference.volume_predictor as vp

    def boom(*a, **k):
        raise AssertionError("computation started before the input was checked")
    for name in ("_encode_into", "propagate_volume", "decode_slices", "redecode_slices"):
        monkeypatch.setattr(vp, name, boom)
    return predictor


# --- 1, 2: launch scripts and their docs ----------------------------------------------------------

def test_documented_sweep_sbatch_args_parse():
    text = (ROOT / "docs/multihost.md").read_text()
    m = re.search(r"(python launch/sweep.py --mode slurm .*?--dry-run)", text, re.S)
    argv = shlex.split(m.group(1).replace("\\\n", " "))[2:]
    from launch.sweep import main
    seen = {}

    def fake_plan(*a, **k):  # stop after parsing: only the documented command line is under test
        seen["ok"] = True
        return []
    import launch.sweep as sweep
    orig = sweep.plan
    sweep.plan = fake_plan
    try:
        assert main(argv) == 0
    finally:
        sweep.plan = orig
    assert seen


def test_tpu_pod_dry_run_anywhere(tmp_path):
    fake = tmp_path / "gcloud"
    fake.write_text("#!/bin/bash\necho REAL GCLOUD RAN >&2\nexit 99\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(ROOT / "launch/tpu_pod.sh"), "tpu1", "zone1", "cfg.py", "/w",
                          "--config.seed=3", "--dry-run"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "REAL GCLOUD" not in out.stderr
    assert out.stdout.startswith("gcloud ") and "--config.seed=3" in out.stdout
    assert "--dry-run" not in out.stdout


# --- 3, 4: prompts ---------------------------------------------------------------------------------

def test_segment_empty_points_without_box(no_compute):
    with pytest.raises(ValueError, match="at least one point"):
        no_compute.segment(10, points=[], point_labels=[])
    with pytest.raises(ValueError, match="neither points nor a box"):
        no_compute.segment_slices({10: {"points": [], "point_labels": []}})


@pytest.mark.parametrize("call, message", [
    (dict(slice_index=None, box=(12, 9, 28, 23)), "slice index must be an integer, got None"),
    (dict(slice_index="10", box=(12, 9, 28, 23)), "slice index must be an integer, got '10'"),
    (dict(slice_index=10, box=(12, 9, 28, 23), bounds=(None, 15)), "bound lo index must be an integer, got None"),
    (dict(slice_index=10, box=(12, 9, 28, 23), bounds=("a", 15)), "bound lo index must be an integer, got 'a'"),
    (dict(slice_index=10, box="12 9 28 23"), "box must be four numbers x0, y0, x1, y1, got '12 9 28 23'"),
    (dict(slice_index=10, box={"x0": 12}), "box must be four numbers x0, y0, x1, y1, got {'x0': 12}"),
])
def test_bad_arguments_are_named(no_compute, call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        no_compute.segment(**call)


def test_an_empty_click_list_beside_a_box_is_no_click(predictor):
    """A UI's empty click list: the box alone, as without points."""
    a = predictor.segment(10, points=[], box=(12, 9, 28, 23), bounds=(8, 12))
    b = predictor.segment(10, box=(12, 9, 28, 23), bounds=(8, 12))
    np.testing.assert_array_equal(a.mask, b.mask)


@pytest.mark.parametrize("option, value", [("encoder_batch_size", "4"), ("encoder_batch_size", 2.5), ("encoder_batch_size", 0),
                                           ("max_points", -1), ("max_points", 2.7), ("max_points", True)])
def test_predictor_options_must_be_positive_integers(tiny_model, option, value):  # noqa: F811
    with pytest.raises(ValueError, match=re.escape(f"{option} must be a positive integer, got {value!r}")):
        VolumePredictor(tiny_model, **{option: value})


@pytest.mark.parametrize("labels", [[0.7], [1.5], ["a"]])
def test_non_integral_point_labels(no_compute, labels):
    with pytest.raises(ValueError, match="point_labels"):
        no_compute.segment(10, points=[(20, 16)], point_labels=labels)


def test_make_prompts_non_integral_labels():
    with pytest.raises(ValueError, match="point_labels must be 1, 0 or -1; got 0.7"):
        make_prompts(1, 16, points=np.zeros((1, 1, 2)), point_labels=np.array([[0.7]]))
    p = make_prompts(1, 16, points=np.zeros((1, 1, 2)), point_labels=np.array([[1.0]]))
    assert p.point_labels.dtype == np.int32 and p.point_labels[0, 0] == 1


# --- 5: segment_slices / edit_slices ---------------------------------------------------------------

def test_segment_slices_entry_errors(no_compute):
    with pytest.raises(ValueError, match=r"prompts\[0\] has no \"slice\" key"):
        no_compute.segment_slices([{"box": (10, 10, 30, 20)}])
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a dict"):
        no_compute.segment_slices([(10, {"box": (10, 10, 30, 20)})])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['boxes'\]; allowed: \('points', 'point_labels', 'box'\)"):
        no_compute.segment_slices({10: {"boxes": (10, 10, 30, 20)}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['point'\]"):
        no_compute.segment_slices([{"slice": 10, "point": [(20, 16)], "point_labels": [1]}])
    with pytest.raises(TypeError, match="must be a dict"):
        no_compute.segment_slices({10: [(20, 16)]})


def test_edit_slices_not_a_mapping(predictor, monkeypatch):
    predictor.segment_slices({10: {"box": (10, 10, 30, 20)}})
    import radsam_jax.inference.volume_predictor as vp
    monkeypatch.setattr(vp, "redecode_slices", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(TypeError, match=r"needs a mapping \{slice: \(points, point_labels\)\}, got list"):
        predictor.edit_slices([(10, ([(20, 16)], [1]))])
    with pytest.raises(ValueError, match="non-empty mapping"):
        predictor.edit_slices({})


# --- 6: shapes and types ---------------------------------------------------------------------------

def test_points_shape_named(no_compute):
    with pytest.raises(ValueError, match=r"points must be \(N, 2\).*shape \(1, 3\)"):
        no_compute.segment(10, points=[(60, 50, 80)], point_labels=[1])


def test_bounds_scalar(no_compute):
    with pytest.raises(ValueError, match=r"bounds must be \(lo, hi\), got 80"):
        no_compute.segment(10, box=(10, 10, 30, 20), bounds=80)


@pytest.mark.parametrize("bucket", [32.0, "32", True, [16, 32.0]])
def test_bucket_type(tiny_model, bucket):  # noqa: F811
    with pytest.raises(TypeError, match="bucket must be an int or a sequence of ints"):
        VolumePredictor(tiny_model, bucket=bucket)
    with pytest.raises(TypeError, match="bucket"):
        bucket_size(5, bucket)


def test_model_and_volume_types(tiny_model):  # noqa: F811
    with pytest.raises(TypeError, match="model must be a RadSam.*got str"):
        VolumePredictor("path/to/checkpoint")
    p = VolumePredictor(tiny_model, bucket=32)
    with pytest.raises(TypeError, match=r"volume must be a radsam_jax.io.Volume.*got ndarray"):
        p.set_volume(np.zeros((8, 8, 4), np.float32))


def test_preprocess_shapes():
    cfg = tiny_model_config()
    with pytest.raises(ValueError, match=r"hu_slices must have shape \(N, H, W\).*\(40, 36\)"):
        preprocess.preprocess_ct_slices(np.zeros((40, 36), np.float32), cfg)
    geo = preprocess.geometry(cfg, 40, 36)
    with pytest.raises(ValueError, match=r"box must have shape \(\.\.\., 4\).*\(3,\)"):
        preprocess.box_to_input([1, 2, 3], geo)
    with pytest.raises(ValueError, match=r"logits must have shape \(\.\.\., h, w\).*\(16,\)"):
        preprocess.logits_to_mask(np.zeros(16, np.float32), geo)


# --- 7: dtypes and options -------------------------------------------------------------------------

def test_bad_compute_dtype(tiny_model, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got <class 'jax.numpy.int32'>"):
        VolumePredictor(tiny_model, dtype=jnp.int32)
    with pytest.raises(ValueError, match="dtype must be one of .*'int8'"):
        RadSam(tiny_model.config, tiny_model.variables, dtype="int8")
    with pytest.raises(ValueError, match="dtype must be one of .*'int8'"):
        tiny_model.with_options(dtype="int8")
    from radsam_jax.checkpoint import load_checkpoint
    with pytest.raises(ValueError, match="dtype must be one of .*'int8'"):  # before reading the (missing) directory
        load_checkpoint(tmp_path / "missing", dtype="int8")
    assert VolumePredictor(tiny_model, dtype="bfloat16").dtype == jnp.bfloat16


def test_logits_to_mask_preprocessing_and_geometry():
    cfg = tiny_model_config()
    geo = preprocess.geometry(cfg, 40, 36)
    with pytest.raises(ValueError, match=r"preprocessing must be one of \('sam', 'medsam'\), got 'bogus'"):
        preprocess.logits_to_mask(np.zeros((16, 16), np.float32), geo, "bogus")
    for h, w in ((0, 512), (512, -3), (10.5, 20)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            preprocess.geometry(cfg, h, w)


# --- 8: benchmarks and docstrings ------------------------------------------------------------------

def test_cpu_blocks_small_default_out():
    from benchmarks.cpu_blocks import RESULTS, parse_args
    assert Path(parse_args([]).out) == RESULTS
    small = Path(parse_args(["--small"]).out)
    assert small != RESULTS and small.name == "cpu_blocks_small.md"
    assert parse_args(["--small", "--out", "x.md"]).out == "x.md"


def test_train_throughput_help_shows_whole_docstring():
    out = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "ViT-B is only lowered and compiled" in out.stdout


def test_docstrings():
    import benchmarks.volume_inference as vi
    import radsam_jax.inference.volume_predictor as vp
    assert "radsam_jax/assets/sample/ct.nii.gz" in vi.__doc__
    example = vp.__doc__.split("like=volume")[0]
    assert re.search(r"^\s*volume = ", example, re.M)
