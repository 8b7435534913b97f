"""RadSAM model checkpoints on disk: an Orbax directory of variables plus `radsam.json`.

Layout of a model checkpoint directory DST:

    DST/radsam.json   {"format": "radsam-jax-model", "format_version": 1,
                       "model_config": ModelConfig.to_dict(), "metadata": {...}}
    DST/variables/    Orbax (StandardCheckpointer) checkpoint of {"params": ..., "buffers": ...}

`radsam.json` carries everything needed to rebuild the architecture, so `load_checkpoint(DST)`
restores against `abstract_variables(config)` and any shape disagreement is an error. This module
needs no PyTorch: converted checkpoints are read by the runtime alone.
"""

import contextlib
import dataclasses
import functools
import json
import os
import re
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from radsam_jax.model.config import ModelConfig
from radsam_jax.model.sam import RadSam, abstract_variables, check_compute_dtype

FORMAT_NAME = "radsam-jax-model"
FORMAT_VERSION = 1
CONFIG_FILE = "radsam.json"
VARIABLES_DIR = "variables"


class CheckpointError(ValueError):
    """A model checkpoint directory that is missing, incomplete or inconsistent."""


def _orbax():
    # Imported lazily: orbax pulls in a lot and most of the package never touches checkpoints.
    import orbax.checkpoint as ocp

    return ocp


@contextlib.contextmanager
def signals_held(*signums: int) -> Iterator[None]:
    """Holds these signals while the block runs, then delivers them to the handlers in place before.

    For `save_model`'s callers (convert, export): Orbax writes from background threads, so a Ctrl-C
    raised in the middle of it leaves part of the hidden temporary folder beside the destination (the
    threads write on after the cleanup removed it), and a SIGTERM all of it; held, they take effect
    once the checkpoint is complete at its destination. Only the main thread handles signals:
    elsewhere nothing is held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    # None: a handler not installed from Python, which could not be put back.
    previous = {s: h for s in signums if (h := signal.getsignal(s)) is not None}
    for s in previous:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(received):
            signal.raise_signal(s)


def save_model(path, config: ModelConfig, variables: Mapping[str, Any], metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Writes `variables` (numpy or jax arrays) and `config` as a model checkpoint directory at `path`.

    Everything is written into a temporary sibling directory first and renamed into place at the
    end, so `path` exists only once it is complete. Refuses an existing `path`.
    """
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"parent directory {path.parent} does not exist")
    _check_against_config(variables, config)
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_config": config.to_dict(),
        "metadata": dict(metadata or {}),
    }
    text = json.dumps(header, indent=2, sort_keys=True)  # fails early on non-JSON metadata
    ocp = _orbax()
    # Made with mkdir, not tempfile.mkdtemp (mode 0700), so the renamed checkpoint gets the usual
    # permissions under the umask; exist_ok=False makes the name ours alone.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        # Synchronous: a failed write (a full disk) returns once the writer is done, and nothing then
        # writes into `tmp` after it is removed.
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            checkpointer.save(tmp / VARIABLES_DIR, args=ocp.args.StandardSave(dict(variables)))
        (tmp / CONFIG_FILE).write_text(text + "\n")
        os.rename(tmp, path)  # atomic on one filesystem; fails if `path` appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_header(path) -> dict:
    """The parsed and validated `radsam.json` of a model checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model checkpoint at {path}: it does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a RadSAM model checkpoint directory (it is a file; convert PyTorch checkpoints with `radsam convert`)")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        # A training run's folder, or one of its step folders: its model comes out with `radsam export`.
        run = next((p for p in (path, path.parent.parent) if (p / "checkpoints").is_dir()), None)
        hint = f"; {run} is a training run: `radsam export {run} DST` writes its model" if run is not None else ""
        if not hint and any(next(path.glob(pattern), None) for pattern in ("*.safetensors", "*.bin", "*.index.json", "*.pth")):
            hint = "; it holds PyTorch or Hugging Face weights: convert them with `radsam convert`"
        raise CheckpointError(f"{path} is not a RadSAM model checkpoint: {CONFIG_FILE} is missing{hint}")
    try:
        header = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_file} is not a RadSAM model header (expected \"format\": \"{FORMAT_NAME}\")")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{config_file} has format_version {version!r}; this radsam-jax reads version {FORMAT_VERSION}")
    if not isinstance(header.get("model_config"), dict):
        raise CheckpointError(f"{config_file} has no \"model_config\" object")
    if not isinstance(header.get("metadata", {}), dict):
        raise CheckpointError(f"{config_file}: \"metadata\" must be an object")
    return header


# model_config fields added after model files existed: absent, they take the value every earlier file meant.
LATER_FIELDS = ("ct_window", "intensity", "mask_prompt")


def load_config(path) -> ModelConfig:
    """The architecture stored in a model checkpoint directory, without reading the weights."""
    header = read_header(path)
    values = header["model_config"]
    if "mask_prompt" not in values and "source_format" in header.get("metadata", {}):
        # Converted before the field existed: a SAM-family model, trained on logit mask prompts.
        values = {**values, "mask_prompt": "logits"}
    missing = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in values and f.name not in LATER_FIELDS]
    if missing:  # a default would silently change the model (8 decoder heads for 2, SAM's preprocessing for MedSAM's)
        raise CheckpointError(f"{Path(path) / CONFIG_FILE}: model_config lacks {', '.join(missing)}")
    try:
        return ModelConfig.from_mapping(values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE}: bad model_config: {e}") from e


def load_checkpoint(path, dtype=jnp.float32) -> RadSam:
    """Reads a model checkpoint directory written by `save_model` (or `radsam convert`).

    Variables are restored against `abstract_variables(config)`: a missing, extra or mis-shaped
    array is an error naming it. `dtype` is the compute dtype; parameters stay float32.
    """
    check_compute_dtype(dtype)  # before reading anything
    path = Path(path).absolute()
    header = read_header(path)
    config = load_config(path)
    variables_dir = path / VARIABLES_DIR
    if not variables_dir.is_dir():
        raise CheckpointError(f"{path} is incomplete: {VARIABLES_DIR}/ is missing")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _abstract_variables(config))
    ocp = _orbax()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(variables_dir, abstract)
    except ValueError as e:
        if not _TENSORSTORE_READ_FAILURE.search(str(e)):  # else damaged bytes, not another model
            raise CheckpointError(f"{variables_dir} does not match the model in {CONFIG_FILE}: {e}") from e
        raise CheckpointError(f"cannot read {variables_dir}: {_orbax_error_text(e)} (damaged? copy or convert the model "
                              f"again)") from e
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(f"cannot read {variables_dir}: {_orbax_error_text(e)} (damaged? copy or convert the model "
                              f"again)") from e
    # Orbax does not compare shapes with the target; the model would fail later and less clearly.
    _check_against_config(restored, config)
    variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), restored)
    return RadSam(config, variables, dtype=dtype, metadata=header.get("metadata", {}))


# TensorStore's failed reads: "FAILED_PRECONDITION: Error reading ...", "Error opening "zarr" driver: ...".
_TENSORSTORE_READ_FAILURE = re.compile(r"^[A-Z][A-Z_]+: |Error (reading|opening) ")


def _orbax_error_text(e: Exception) -> str:
    """The error, without the TensorStore spec (about 60 lines) that reads of damaged arrays append:
    the array it names is kept."""
    text = f"{type(e).__name__}: {e}"
    head, found, spec = text.partition(" See full TensorStore details")
    if not found:
        return text
    arrays = re.findall(r"'path': '([^'/]+)/?'", spec)  # the array's key; the folder's path has slashes
    return head.rstrip(".") + (f" of array {arrays[0]}" if arrays else "")


@functools.lru_cache(maxsize=8)
def expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    """"params/image_encoder/pos_embed"-style path -> shape of every variable of `config` (cached)."""
    return tree_shapes(_abstract_variables(config))


def path_name(path) -> str:
    """A pytree key path as "a/b/0/c": dict keys, attribute and field names and sequence indices alike,
    so a TrainState and the metadata of its saved form name their leaves the same."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def tree_shapes(tree) -> dict[str, tuple]:
    """path_name -> shape of each leaf (arrays, ShapeDtypeStructs, Orbax metadata)."""
    return {path_name(path): tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_against_config(variables: Mapping[str, Any], config: ModelConfig) -> None:
    """Raises CheckpointError listing every path whose presence or shape disagrees with `config`."""
    expected = expected_shapes(config)
    found = tree_shapes(variables)
    problems = [f"missing {k} {expected[k]}" for k in expected if k not in found]
    problems += [f"unexpected {k} {found[k]}" for k in found if k not in expected]
    problems += [f"{k} has shape {found[k]}, expected {expected[k]}" for k in expected if k in found and found[k] != tuple(expected[k])]
    if problems:
        raise CheckpointError(f"variables do not match model config {config.name!r}: " + "; ".join(problems))


@functools.lru_cache(maxsize=8)
def _abstract_variables(config: ModelConfig):
    return abstract_variables(config)


