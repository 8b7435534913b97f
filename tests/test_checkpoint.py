"""radsam_jax.checkpoint: the Orbax + radsam.json model checkpoint format (no torch needed)."""

import json
import re
import os
import stat

import jax
import numpy as np
import pytest

from radsam_jax import load_checkpoint
from radsam_jax.checkpoint import CONFIG_FILE, FORMAT_VERSION, CheckpointError, save_model
from radsam_jax.model import abstract_variables, load_model_config


@pytest.fixture(scope="module")
def small():
    config = load_model_config("small")
    # Random arrays of the model's shapes: the format does not care about values, and running
    # Flax's init eagerly would take a minute on a small CPU.
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), abstract_variables(config))
    return config, variables


@pytest.fixture(scope="module")
def saved(small, tmp_path_factory):
    config, variables = small
    path = tmp_path_factory.mktemp("ckpt") / "small_model"
    save_model(path, config, variables, {"source_file": "x.pth", "source_sha256": "ab" * 32})
    return path


def test_round_trip(small, saved):
    config, variables = small
    header = json.loads((saved / CONFIG_FILE).read_text())
    assert header["format_version"] == FORMAT_VERSION and header["model_config"] == config.to_dict()
    model = load_checkpoint(saved)
    assert model.config == config and model.metadata["source_file"] == "x.pth"
    assert jax.tree.structure(model.variables) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(model.variables), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert str(load_checkpoint(saved, dtype="bfloat16").dtype) == "bfloat16"
    assert [p.name for p in saved.parent.iterdir()] == ["small_model"]  # no temporary leftovers


def test_existing_destination_is_refused(small, saved):
    config, variables = small
    with pytest.raises(FileExistsError, match="already exists"):
        save_model(saved, config, variables)


def test_failed_save_leaves_nothing(small, tmp_path):
    config, variables = small
    with pytest.raises(TypeError):
        save_model(tmp_path / "m", config, variables, {"not json": object()})
    broken = jax.tree.map(lambda x: x, variables)
    broken["params"]["image_encoder"]["pos_embed"] = np.zeros((1, 2, 2, 3), np.float32)
    with pytest.raises(CheckpointError, match="pos_embed has shape"):
        save_model(tmp_path / "m", config, broken)
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_and_header(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="radsam.json is missing$"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints" / "200").mkdir(parents=True)  # a training run's folder, or its step
    for given in (tmp_path / "run", tmp_path / "run" / "checkpoints" / "200"):
        with pytest.raises(CheckpointError, match=f"radsam.json is missing; {tmp_path / 'run'} is a training run: "
                                                  f"`radsam export {tmp_path / 'run'} DST` writes its model"):
            load_checkpoint(given)
    (tmp_path / "file.pth").write_text("x")
    with pytest.raises(CheckpointError, match="radsam convert"):
        load_checkpoint(tmp_path / "file.pth")
    (tmp_path / "hf").mkdir()  # a Hugging Face SamModel folder, not converted
    (tmp_path / "hf" / "model.safetensors").write_text("x")
    with pytest.raises(CheckpointError, match="radsam.json is missing; it holds PyTorch or Hugging Face weights: "
                                              "convert them with `radsam convert`"):
        load_checkpoint(tmp_path / "hf")


def _copy_with_header(saved, tmp_path, edit):
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(saved, path)
    edit(path / CONFIG_FILE)
    return path


def test_bad_header_content(saved, tmp_path):
    path = _copy_with_header(saved, tmp_path, lambda f: f.write_text("{not json"))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)

    def set_field(key, value):
        def edit(f):
            header = json.loads(f.read_text())
            header[key] = value
            f.write_text(json.dumps(header))

        return edit

    for i, (key, value, message) in enumerate(
        [("format_version", 99, "format_version 99"), ("format", "other", "not a RadSAM model header"), ("model_config", None, "no \"model_config\"")]
    ):
        (tmp_path / str(i)).mkdir()
        path = _copy_with_header(saved, tmp_path / str(i), set_field(key, value))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)


def test_config_that_does_not_match_the_weights(saved, tmp_path):
    def edit(f):
        header = json.loads(f.read_text())
        header["model_config"]["encoder_dim"] = 96
        f.write_text(json.dumps(header))

    path = _copy_with_header(saved, tmp_path, edit)
    with pytest.raises(CheckpointError, match="patch_embed"):
        load_checkpoint(path)


def test_unknown_config_key(saved, tmp_path):
    def edit(f):
        header = json.loads(f.read_text())
        header["model_config"]["colour"] = "blue"
        f.write_text(json.dumps(header))

    with pytest.raises(CheckpointError, match="colour"):
        load_checkpoint(_copy_with_header(saved, tmp_path, edit))


@pytest.mark.parametrize("change, message", [
    ({"decoder_heads": None}, "model_config lacks decoder_heads"),
    ({"preprocessing": None}, "model_config lacks preprocessing"),
    ({"image_size": 256.0}, "image_size must be an integer, got 256.0"),
    ({"decoder_heads": "8"}, "decoder_heads must be an integer, got '8'"),
    ({"pixel_std": ["a", 1, 2]}, "pixel_std must be a list of numbers"),
], ids=["no_heads", "no_preprocessing", "float_size", "string_heads", "string_std"])
def test_hand_edited_config_fields_must_be_there_and_typed(saved, tmp_path, change, message):
    """A missing field took its default silently (8 decoder heads for a 2-head model gave another mask)."""
    def edit(f):
        header = json.loads(f.read_text())
        for key, value in change.items():
            if value is None:
                del header["model_config"][key]
            else:
                header["model_config"][key] = value
        f.write_text(json.dumps(header))

    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(_copy_with_header(saved, tmp_path, edit))


def test_missing_variables(saved, tmp_path):
    import shutil

    path = _copy_with_header(saved, tmp_path, lambda f: None)
    shutil.rmtree(path / "variables")
    with pytest.raises(CheckpointError, match="variables/ is missing"):
        load_checkpoint(path)


def test_damaged_array_bytes_name_the_array_in_one_line(saved, tmp_path):
    """TensorStore appends its whole spec (about 60 lines) to a failed read: the message keeps the
    array's key instead. Loaded in a child process: Orbax's reader threads outlive the error there."""
    import shutil
    import subprocess
    import sys

    path = tmp_path / "damaged"
    shutil.copytree(saved, path)
    # Orbax lays the arrays out in a different set of files at each save: every data file is damaged,
    # 64 bytes zeroed every 4 KiB from its first quarter on (a single spot may fall in unused bytes).
    for data in (f for f in (path / "variables").rglob("*") if f.is_file() and f.parent.name == "d"):
        raw = bytearray(data.read_bytes())
        for i in range(len(raw) // 4, len(raw) - 64, 4096):
            raw[i: i + 64] = bytes(64)
        data.write_bytes(bytes(raw))
    code = ("import json, sys\nfrom radsam_jax import load_checkpoint\nfrom radsam_jax.checkpoint import CheckpointError\n"
            "try:\n    load_checkpoint(sys.argv[1])\nexcept CheckpointError as e:\n    print(json.dumps(str(e)))\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.stdout.startswith('"cannot read '), (r.stdout, r.stderr[-3000:])
    message = json.loads(r.stdout)
    assert message.startswith(f"cannot read {path / 'variables'}: ") and message.endswith("(damaged? copy or convert the model again)")
    assert "\n" not in message and "TensorStore details" not in message
    assert re.search(r"(params|buffers)\.[\w.]+", message), message  # the array, whichever way TensorStore says it


def test_tensorstore_spec_is_cut_from_read_errors():
    from radsam_jax.checkpoint import _orbax_error_text

    spec = ("TensorStore({\n  'base': {\n    'kvstore': {\n      'base': {'driver': 'file', 'path': '/m/variables/'},\n"
            "      'path': 'params.mask_decoder.iou_token/',\n    },\n  },\n})>")
    e = Exception("Encountered error while reading array index: (slice(0, 8, 1),). See full TensorStore details: "
                  "<bound method spec of " + spec)
    assert _orbax_error_text(e) == ("Exception: Encountered error while reading array index: (slice(0, 8, 1),) of array "
                                    "params.mask_decoder.iou_token")
    assert _orbax_error_text(OSError("disk gone")) == "OSError: disk gone"


def test_ct_window_round_trips(small, tmp_path):
    import dataclasses

    config, variables = small
    windowed = dataclasses.replace(config, ct_window=(60.0, 350.0))
    path = save_model(tmp_path / "m", windowed, variables)
    assert json.loads((path / CONFIG_FILE).read_text())["model_config"]["ct_window"] == [60.0, 350.0]
    model = load_checkpoint(path)
    assert model.config.ct_window == (60.0, 350.0) and model.config == windowed


def test_header_without_ct_window_loads_with_the_default(saved, tmp_path):
    from radsam_jax.model.config import DEFAULT_CT_WINDOW

    def edit(f):  # a radsam.json written before ct_window existed
        header = json.loads(f.read_text())
        del header["model_config"]["ct_window"]
        f.write_text(json.dumps(header))

    model = load_checkpoint(_copy_with_header(saved, tmp_path, edit))
    assert model.config.ct_window == DEFAULT_CT_WINDOW == (40.0, 400.0)


@pytest.mark.parametrize("window", [[40.0], [40.0, 0.0], [40.0, -10.0], "soft", [40.0, None]])
def test_bad_ct_window_is_a_checkpoint_error(saved, tmp_path, window):
    def edit(f):
        header = json.loads(f.read_text())
        header["model_config"]["ct_window"] = window
        f.write_text(json.dumps(header))

    with pytest.raises(CheckpointError, match="ct_window"):
        load_checkpoint(_copy_with_header(saved, tmp_path, edit))


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_directory_has_the_umask_permissions(small, tmp_path, umask):
    config, variables = small
    previous = os.umask(umask)
    try:
        path = save_model(tmp_path / "m", config, variables)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask
