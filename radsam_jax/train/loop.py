"""`train_and_evaluate(config, workdir)`: the RadSAM training loop.

Read top to bottom: the banner comments follow big_vision's train.py. Everything that is not the
loop itself (loss, optimiser, sharded step, checkpoints) lives in the sibling modules.

Outputs in `workdir`: `checkpoints/` (Orbax, see checkpointing.py), `metrics.jsonl` (one JSON object
per log step and per validation, with at least "step" and "loss"), TensorBoard event files, and a
progress line on stdout (step, loss, images/s). Only process 0 writes logs and metrics.

A run is finished once metrics.jsonl records the validation of its last step: re-running it then does
nothing, and re-running one stopped (SIGTERM) at its last step before that validation only validates.
"""

import dataclasses
import json
import os
import pathlib
import time
from typing import Iterator, Optional

import jax
import ml_collections
import numpy as np
import optax

from radsam_jax.checkpoint import expected_shapes, tree_shapes
from radsam_jax.compilation_cache import enable_compilation_cache
from radsam_jax.intensity import DEFAULT_CT_WINDOW, INTENSITY_MODES, window_caption
from radsam_jax.io import check_output_path, write_text_atomically
from radsam_jax.model import ModelConfig, init_variables, load_model_config
from radsam_jax.train import checkpointing, optimizer as optimizer_lib
from radsam_jax.train.config_lib import ConfigError, resolve_path
from radsam_jax.train.loss import DICE_FORMS
from radsam_jax.train.train_step import (
    abstract_train_state,
    batch_sharding,
    compute_dtype,
    create_sharded_state,
    initial_loss_scale,
    make_eval_step,
    make_mesh,
    make_train_step,
    to_global_batch,
    training_attention,
)
from radsam_jax.train.volume_validation import volume_validation

DATA_SOURCES = ("pipeline", "mixture", "synthetic")  # config.data_source: one dataset, several, or ellipses


# --------------------------------------------------------------------------------------------------
# Helpers: distributed hook, model, data, metric writer
# --------------------------------------------------------------------------------------------------
# The explicit topology: config field -> environment variable. jax.distributed.initialize() itself
# reads only JAX_COORDINATOR_ADDRESS from the environment (jax 0.10), not the process count or id.
DISTRIBUTED_FIELDS = {
    "coordinator_address": ("distributed_coordinator_address", "RADSAM_COORDINATOR_ADDRESS"),
    "num_processes": ("distributed_num_processes", "RADSAM_NUM_PROCESSES"),
    "process_id": ("distributed_process_id", "RADSAM_PROCESS_ID"),
}


def distributed_arguments(config: ml_collections.ConfigDict) -> dict:
    """The explicitly given `jax.distributed.initialize` arguments: config fields
    (`distributed_coordinator_address`, `distributed_num_processes`, `distributed_process_id`)
    first, then RADSAM_COORDINATOR_ADDRESS / RADSAM_NUM_PROCESSES / RADSAM_PROCESS_ID. Unset ones
    are left out, so JAX auto-detects them (Slurm, TPU pod, K8s, Open MPI)."""
    args = {}
    for arg, (field, env) in DISTRIBUTED_FIELDS.items():
        value = config.get(field, None)
        if value in (None, "", -1):
            value = os.environ.get(env, "") or None
        if value is None:
            continue
        if arg != "coordinator_address":
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{field} / {env} must be an integer, got {value!r}") from None
        args[arg] = value
    if "num_processes" in args and "process_id" in args and not 0 <= args["process_id"] < args["num_processes"]:
        raise ConfigError(f"process_id {args['process_id']} ({DISTRIBUTED_FIELDS['process_id'][0]} / "
                          f"{DISTRIBUTED_FIELDS['process_id'][1]}) is not in 0..{args['num_processes'] - 1}")
    return args


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """The multi-host hook: `jax.distributed.initialize()` when the config or the environment
    (RADSAM_DISTRIBUTED=1, or any explicit topology value, see `distributed_arguments`) asks for it.
    It must run before anything touches a JAX backend. Explicit values are passed through; the
    rest is auto-detected by JAX (Slurm: one process per task, GPU = SLURM_LOCALID; TPU VM pods;
    K8s; Open MPI; or JAX_COORDINATOR_ADDRESS)."""
    args = distributed_arguments(config)
    wanted = (config.get("distributed", False) or bool(args)
              or os.environ.get("RADSAM_DISTRIBUTED", "").lower() in ("1", "true"))
    if wanted and not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(**args)
        except ValueError as e:  # a topology JAX could not complete (no coordinator outside a detected cluster)
            given = ", ".join(f"{f} / {env}" for f, env in DISTRIBUTED_FIELDS.values())
            raise ConfigError(f"cannot start the multi-process run: {e}; outside a cluster JAX detects (Slurm, TPU pod, "
                              f"K8s, Open MPI), give every process the topology: {given} "
                              f"(docs/multihost.md)") from None


def wait_for_all_processes(name: str, timeout_s: int = 3600) -> None:
    """A barrier of the coordination service (no device collective, long timeout); `name` must be
    used once. No-op with one process."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(f"radsam_{name}", timeout_in_ms=timeout_s * 1000)


class CompiledInStep:
    """A jitted function compiled at its first call, after which every process waits for the others
    before running it. The first run of an executable with collectives sets up their communicators,
    and Gloo (CPU) gives up when a peer is over 30 s late, as it is when the processes compile at
    different speeds on a loaded machine. One process: the jitted function itself."""

    def __init__(self, name: str, jitted):
        self.name, self.jitted, self.compiled = name, jitted, None

    def __call__(self, *args):
        if jax.process_count() == 1:
            return self.jitted(*args)
        if self.compiled is None:
            self.compiled = self.jitted.lower(*args).compile()
            wait_for_all_processes(f"compiled_{self.name}")
        return self.compiled(*args)


def training_intensity(config: ml_collections.ConfigDict) -> tuple[str, tuple[float, float]]:
    """(intensity units, window (level, width)) around which the run's data pipeline draws its
    jittered training windows: `data.intensity`, `data.window_level` / `data.window_width`. The
    trained model records them as ModelConfig.intensity and .ct_window, which inference uses.
    ValueError if a mixture's datasets disagree with `data` (a model records one of each)."""
    from radsam_jax.model.config import is_valid_ct_window

    def setting(data) -> tuple[str, tuple[float, float]]:
        if data is None:
            return "hu", DEFAULT_CT_WINDOW
        return (str(data.get("intensity", "hu")),
                (float(data.get("window_level", DEFAULT_CT_WINDOW[0])), float(data.get("window_width", DEFAULT_CT_WINDOW[1]))))

    settings = {"data": setting(config.get("data"))}
    if config.get("data_source") == "mixture":
        for name in dict(config.data_mixture):
            settings[f"datasets.{name}"] = setting(config.datasets[name])
    for key, (intensity, (level, width)) in settings.items():
        if intensity not in INTENSITY_MODES:
            raise ValueError(f"{key}.intensity {intensity!r} is not one of {', '.join(INTENSITY_MODES)}")
        if not is_valid_ct_window((level, width)):
            raise ValueError(f"{key}.window_level / window_width {level:g} / {width:g}: the width must be > 0")
    if len(set(settings.values())) > 1:
        raise ValueError("the datasets are windowed differently, but a model records one intensity and window: "
                         + "; ".join(f"{k} {i} {lw[0]:g}/{lw[1]:g}" for k, (i, lw) in settings.items())
                         + " (set the same intensity, window_level and window_width on each)")
    return settings["data"]


def as_trained(model_config: ModelConfig, config: ml_collections.ConfigDict) -> ModelConfig:
    """`model_config` as this training leaves it: the training intensity and window, and binary mask
    prompts (the prompt simulation's), also for a converted SAM-family init that read logits before."""
    intensity, window = training_intensity(config)
    return dataclasses.replace(model_config, intensity=intensity, ct_window=window, mask_prompt="binary")


def configured_model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The model `config` asks for, reading no weights: the init checkpoint's header, or the named
    preset with the model.* overrides, as trained here (`as_trained`)."""
    if config.init_checkpoint:
        from radsam_jax.checkpoint import load_config

        return as_trained(_init_architecture(load_config(resolve_path(config.init_checkpoint)), config), config)
    model_config = load_model_config(config.model.name)
    overrides = _model_overrides(config)
    if overrides:
        model_config = ModelConfig.from_mapping({**model_config.to_dict(), **overrides})
    return as_trained(model_config, config)


def load_model(config: ml_collections.ConfigDict) -> tuple[ModelConfig, Optional[dict]]:
    """(model config, initial variables or None): a converted checkpoint, or a named preset from
    scratch, as trained here (`as_trained`)."""
    if config.init_checkpoint:
        from radsam_jax.checkpoint import load_checkpoint

        model = load_checkpoint(resolve_path(config.init_checkpoint))
        return as_trained(_init_architecture(model.config, config), config), jax.device_get(model.variables)
    return configured_model_config(config), None


def _model_overrides(config: ml_collections.ConfigDict) -> dict:
    """The model.* fields the config sets (None: the preset's or the init checkpoint's)."""
    return {k: v for k, v in config.model.items() if k != "name" and v is not None}


def _init_architecture(init: ModelConfig, config: ml_collections.ConfigDict) -> ModelConfig:
    """`init` (an init checkpoint's model), ValueError if a model.* override asks for another value:
    the weights fix the architecture, and an override that silently did nothing would mislead."""
    header = init.to_dict()
    differ = [f"model.{k}={v!r} (the checkpoint has {header[k]!r})" for k, v in _model_overrides(config).items()
              if k in header and json.loads(json.dumps(v)) != json.loads(json.dumps(header[k]))]
    if differ:
        raise ValueError(f"init_checkpoint {config.init_checkpoint} fixes the architecture, but the config sets "
                         f"{'; '.join(differ)}: drop those model.* settings, or train from scratch (init_checkpoint='')")
    return init


def run_model(config: ml_collections.ConfigDict, ckpt: checkpointing.Checkpointer) -> tuple[ModelConfig, Optional[dict]]:
    """(architecture, initial variables or None) of the run whose checkpoints `ckpt` reads; ConfigError
    if it cannot be built. A new run loads `config`'s model; a resumed one takes the ModelConfig stored
    with its checkpoint (its init_checkpoint need not exist any more) and must not ask for another (one of
    an older radsam-jax, which stored none, takes the config's, which its saved arrays must fit);
    its ct_window, preprocessing and not architecture, follows the config (the window trained from now
    on); its intensity units may not change (the input would mean something else)."""
    step = ckpt.latest_step()
    stored = None if step is None else ckpt.restore_model_config(step)
    try:
        if step is None:
            return load_model(config)
        stored = None if stored is None else ModelConfig.from_mapping(stored)
        wanted = configured_model_config(config)
    except FileNotFoundError as e:
        if stored is None:
            old = "" if step is None else f" (step {step} does not record its model: older radsam-jax)"
            raise ConfigError(f"cannot build the model{old}: {e}") from e
        # The init checkpoint was moved or deleted (resuming does not read it): the run's record decides.
        try:
            return as_trained(stored, config), None
        except ValueError as e2:
            raise ConfigError(f"cannot build the model: {e2}") from e2
    except ValueError as e:  # CheckpointError is a ValueError
        raise ConfigError(f"cannot build the model: {e}") from e
    if stored is None:
        # Checkpoints of an older radsam-jax, which did not store the ModelConfig: its architecture can only
        # come from the config (the init checkpoint's header, or the preset), which the saved arrays must fit.
        _check_saved_variables(ckpt, step, wanted)
        return wanted, None
    have, want = stored.to_dict(), wanted.to_dict()
    changed = [f"{k} {have[k]!r} (checkpoint) != {want[k]!r} (config)" for k in have
               if have[k] != want[k] and k != "ct_window"]
    if changed:
        raise ConfigError(f"{ckpt.directory}/{step} was trained with another model than the config gives: "
                          f"{'; '.join(changed)}; resume with the run's own model settings or use a new --workdir")
    return as_trained(stored, config), None


def _check_saved_variables(ckpt: checkpointing.Checkpointer, step: int, model_config: ModelConfig) -> None:
    """ConfigError unless the variables saved at `step` have the paths and shapes of `model_config`'s
    (read from the checkpoint's metadata, before Orbax fails on them in the middle of the restore)."""
    saved, expected = ckpt.state_shapes(step), expected_shapes(model_config)
    problems = [f"{k} is {saved[k]} in the checkpoint, {shape} in the config's model"
                for k, shape in expected.items() if k in saved and saved[k] != shape]
    problems += [f"the checkpoint has no {k}" for k in expected if k not in saved]
    problems += [f"the config's model has no {k}" for k in saved if k not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more difference(s))" if len(problems) > 1 else ""
        raise ConfigError(f"{ckpt.directory}/{step} does not record its model (older radsam-jax) and its parameters "
                          f"do not match the architecture the config gives: {problems[0]}{more}; resume with the "
                          "run's own model settings or use a new --workdir")


def _check_resumable(ckpt: checkpointing.Checkpointer, target, saved_config: Optional[dict],
                     config: ml_collections.ConfigDict, changed: list[str]) -> None:
    """ConfigError, before Orbax, Grain or the first step fail on it, when the config builds a state the
    latest checkpoint cannot fill: an optimiser of another form (gradient clipping or weight decay
    switched on or off, parameters unfrozen: their Adam moments were never kept), another data source or
    mixture datasets, or another number of Grain worker processes (the iterator's saved state has one
    entry per dataset and worker).
    Freezing parameters is fine: their saved moments are left unread."""
    step = ckpt.latest_step()
    saved, wanted = ckpt.state_shapes(step, parts=None), tree_shapes(target)
    missing = [k for k in wanted if saved.get(k) != wanted[k]]
    settings = [c for c in changed if c.startswith(("optim.", "precision", "loss_scale"))]
    advice = (f"resume with the run's settings, or start a new --workdir from its weights (radsam export "
              f"{ckpt.directory.parent} DST, then init_checkpoint=DST)")
    if missing:
        raise ConfigError(f"{ckpt.directory}/{step} cannot continue with this config: its saved state has no "
                          f"{missing[0]} of shape {wanted[missing[0]]}"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: the optimiser's form "
                          f"changed ({'; '.join(settings) or 'see optim'}); {advice}")
    saved_config = saved_config or {}
    sources = [(c.get("data_source"), sorted(dict(c.get("data_mixture") or {})) if c.get("data_source") == "mixture" else None)
               for c in (saved_config, config.to_dict())]
    if saved_config.get("data_source") is not None and sources[0] != sources[1]:
        # The iterator's saved state is that of its source (one entry per mixture dataset): no other can take it.
        def named(source, names):
            return f"{source!r}" + (f" of {', '.join(names)}" if names else "")

        raise ConfigError(f"{ckpt.directory}/{step} saved the data order of data_source {named(*sources[0])}, and it "
                          f"resumes only from the same data, not {named(*sources[1])}; {advice}")
    old, new = _flat(saved_config), _flat(config.to_dict())
    if "batch_size" in old and int(old["batch_size"]) != int(config.batch_size):
        # Grain's saved position counts batches: in batches of another size it would skip or repeat samples.
        raise ConfigError(f"{ckpt.directory}/{step} saved its data position in batches of {int(old['batch_size'])} "
                          f"(batch_size), and it resumes only with that batch size, not {config.batch_size}: another "
                          f"would skip or repeat training samples (to fit fewer devices, grad_accum_steps splits the "
                          f"batch into microbatches); {advice}")
    loaders = {"pipeline": ["data"], "mixture": [f"datasets.{n}" for n in dict(config.get("data_mixture", {}))]}
    for key in (f"{name}.num_workers" for name in loaders.get(config.data_source, [])):
        if key in old and key in new and int(old[key]) != int(new[key]) and max(int(old[key]), int(new[key])) > 0:
            # Grain's saved iterator state has one entry per worker process: it restores only onto as many.
            raise ConfigError(f"{ckpt.directory}/{step} saved its data order with {int(old[key])} Grain worker "
                              f"process(es) ({key}={old[key]}), and it resumes only with as many, not {key}="
                              f"{new[key]}; {advice}")


def make_iterator(config: ml_collections.ConfigDict, model_config: ModelConfig, *, split: str, batch_size: int,
                  seed: int, num_epochs: Optional[int]) -> Iterator[dict]:
    """This process's share of the data (`batch_size` is the per-process batch)."""
    kwargs = dict(split=split, batch_size=batch_size, seed=seed, num_epochs=num_epochs,
                  shard_index=jax.process_index(), shard_count=jax.process_count())
    if config.data_source == "synthetic":
        from radsam_jax.train.synthetic import make_synthetic_iterator

        n = config.synthetic.num_train if split == "train" else config.synthetic.num_validation
        return make_synthetic_iterator(model_config, num_examples=n, **kwargs)
    if config.data_source == "pipeline":
        from radsam_jax.data.pipeline import make_data_iterator

        return make_data_iterator(config.data, model_config, **kwargs)
    if config.data_source == "mixture" and split == "train":
        from radsam_jax.data.pipeline import make_data_iterator
        from radsam_jax.train.mixture import MixedIterator

        weights = dict(config.data_mixture)
        iterators = {name: make_data_iterator(config.datasets[name], model_config, **kwargs) for name in weights}
        return MixedIterator(iterators, weights, seed)
    raise ValueError(f"data_source must be one of {', '.join(DATA_SOURCES)}, got {config.data_source!r}")


class MetricWriter:
    """metrics.jsonl + TensorBoard (tensorboardX) + stdout, on process 0 only."""

    def __init__(self, workdir: pathlib.Path):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.path = workdir / "metrics.jsonl"
        self.jsonl = open(self.path, "a")
        self.tensorboard_dir = workdir / "tensorboard"
        self.tb = None  # opened by start_at, which knows the step the run starts at

    def start_at(self, step: int) -> int:
        """Drops the metrics.jsonl rows of steps after `step`, where the run starts (a run stopped
        after its last checkpoint logged them, and logs them again), every row when it starts from
        step 0 (a run killed before its first checkpoint: its step-0 validation comes again), and
        lines cut short by a kill, so that every step appears once; returns how many rows were
        dropped. TensorBoard hides the earlier event files' points likewise (the event file's purge_step)."""
        if not self.enabled:
            return 0
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(self.tensorboard_dir), purge_step=step + 1 if step > 0 else 0)
        self.jsonl.close()
        lines = self.path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if step > 0 and isinstance(row, dict) and int(row.get("step", 0)) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if len(kept) != len(lines):
            write_text_atomically(self.path, "".join(kept))
        self.jsonl = open(self.path, "a")
        return len(lines) - len(kept)

    def write(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{f"{prefix}{k}": float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{prefix}{k}", float(v), int(step))
        self.tb.flush()

    def print(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()


def validation_sample_limit(config, batch_size: int) -> int:
    """Held-out slices per pipeline validation (0 = the whole split): data.val_max_samples and
    eval.max_batches x the eval batch both cap it (each <= 0: no cap), the smaller one wins."""
    caps = [n for n in (int(config.data.val_max_samples), config.eval.max_batches * batch_size) if n > 0]
    return min(caps, default=0)


def held_out_split(config) -> Optional[tuple]:
    """The validation split's cases and slice index for validation_batches (None for synthetic data)."""
    if config.data_source not in ("pipeline", "mixture"):
        return None
    from radsam_jax.data.pipeline import load_split

    return load_split(config.data, config.eval.split)


def validation_batches(config, model_config, batch_size: int, held_out: Optional[tuple] = None
                       ) -> Iterator[tuple[dict, np.ndarray]]:
    """(batch, weight) pairs of held-out slices, each batch exactly `batch_size` rows (the *global*
    eval batch, the same on every process); weight 0 marks padding rows of the last batch. Same
    slices and prompts at every call, and whatever the number of processes. `held_out`: the
    held_out_split(config) of an earlier call (else it is built again, reading every volume)."""
    if config.data_source in ("pipeline", "mixture"):  # a mixture validates on `config.data`
        from radsam_jax.data.pipeline import iterate_slices

        for batch in iterate_slices(config.data, model_config, split=config.eval.split, batch_size=batch_size,
                                    max_samples=validation_sample_limit(config, batch_size), seed=config.seed,
                                    loaded=held_out):
            yield batch, np.asarray(batch.pop("valid"), np.float32)
        return
    if config.data_source != "synthetic":
        raise ValueError(f"data_source must be 'pipeline', 'mixture' or 'synthetic', got {config.data_source!r}")
    from radsam_jax.train.synthetic import make_synthetic_iterator

    # Unsharded: every process walks the whole held-out set, so all take the same number of batches.
    it = make_synthetic_iterator(model_config, split=config.eval.split, batch_size=batch_size, seed=config.seed,
                                 num_examples=config.synthetic.num_validation, num_epochs=1)
    for i, batch in enumerate(it):
        if 0 < config.eval.max_batches <= i:
            break
        n = len(batch["target"])
        weight = np.zeros((batch_size,), np.float32)
        weight[:n] = 1.0
        if n < batch_size:  # pad to the compiled batch size with zero-weight rows
            batch = {k: np.concatenate([v, np.repeat(v[:1], batch_size - n, axis=0)]) for k, v in batch.items()}
        yield batch, weight


def evaluate(eval_step, variables, config, model_config, mesh, batch_size: int, held_out: Optional[tuple] = None) -> dict:
    """Mean validation loss terms and Dice (primary mask, hard, at S x S) over the held-out slices.

    Every process reads the same global batches (validation sets are small) and feeds its own rows,
    so each takes part in every collective step, and the result does not depend on the process count.
    """
    local = batch_size // jax.process_count()
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    sums = None
    for batch, weight in validation_batches(config, model_config, batch_size, held_out):
        global_batch = to_global_batch({k: v[rows] for k, v in batch.items()}, mesh)
        global_batch["weight"] = jax.make_array_from_process_local_data(
            batch_sharding(mesh), weight[rows])
        out = jax.device_get(eval_step(variables, global_batch))
        sums = out if sums is None else {k: sums[k] + out[k] for k in out}
    if not sums or sums["count"] == 0:
        raise ValueError(f"validation split {config.eval.split!r} produced no example")
    count = sums.pop("count")
    return {k.removesuffix("_sum"): float(v / count) for k, v in sums.items()} | {"num_examples": float(count)}


def validation_recorded(workdir: pathlib.Path, step: int) -> bool:
    """Whether `workdir`/metrics.jsonl holds a validation at `step`. Process 0 writes the file, so
    its answer is every process's (they must all take the same branch: validation is collective)."""
    found = False
    if jax.process_index() == 0 and (workdir / "metrics.jsonl").exists():
        with open(workdir / "metrics.jsonl") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if isinstance(row, dict) and row.get("step") == step and "validation_loss" in row:
                    found = True
                    break
    if jax.process_count() == 1:
        return found
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(found)))


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def check_config(config: ml_collections.ConfigDict) -> None:
    """ConfigErrors for mistakes that show without building anything: the device count and batch
    sizes, the schedule, the data modality, the dataset folders. Called before anything is written
    to the workdir."""
    available = jax.device_count()
    if config.num_devices > available:
        raise ConfigError(f"num_devices {config.num_devices} is more than the {available} "
                          f"{jax.devices()[0].platform} device(s) JAX sees")
    if jax.process_count() > 1 and config.num_devices not in (-1, available):
        raise ConfigError(f"num_devices {config.num_devices}: a run of {jax.process_count()} processes uses all "
                          f"{available} devices (-1); a mesh over some would leave processes without a device")
    n = config.num_devices if config.num_devices > 0 else available
    eval_batch = config.eval.batch_size if config.eval.batch_size > 0 else config.batch_size
    for key, batch in (("batch_size", config.batch_size), ("eval.batch_size", eval_batch)):
        if batch <= 0 or batch % n:
            raise ConfigError(f"{key} {batch} is not a positive multiple of the {n} devices of the mesh "
                              f"(batch sizes are global; set num_devices or a divisible batch size)")
    for key, check in (("precision", lambda: compute_dtype(config.precision)),
                       ("attention", lambda: training_attention(config))):
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from e
    if config.data_source not in DATA_SOURCES:
        raise ConfigError(f"data_source must be one of {', '.join(DATA_SOURCES)}, got {config.data_source!r}")
    if config.loss.dice not in DICE_FORMS:
        raise ConfigError(f"loss.dice must be one of {', '.join(DICE_FORMS)}, got {config.loss.dice!r}")
    accum = config.grad_accum_steps
    if accum < 1:
        raise ConfigError(f"grad_accum_steps must be >= 1, got {accum}")
    if config.batch_size % (n * accum):
        raise ConfigError(f"grad_accum_steps {accum}: batch_size {config.batch_size} does not split into {accum} "
                          f"microbatches over the {n} devices of the mesh (it must be a multiple of {n} x {accum})")
    if config.eval.volume_cases > 0 and config.eval.volume_min_slices < 1:
        raise ConfigError(f"eval.volume_min_slices must be >= 1, got {config.eval.volume_min_slices}")
    if config.eval.volume_cases > 0 and config.data_source == "synthetic":
        raise ConfigError(f"eval.volume_cases {config.eval.volume_cases}: volume validation needs volumes "
                          f"(data_source 'pipeline' or 'mixture'), the synthetic source has slices only")
    if config.num_train_steps <= 0 and config.optim.schedule != "constant":
        raise ConfigError(f"optim.schedule {config.optim.schedule!r} decays over num_train_steps, which must be > 0")
    if config.data_source == "mixture":
        from radsam_jax.train.mixture import mixture_probabilities

        try:
            weights = dict(config.data_mixture)
        except (TypeError, ValueError):  # e.g. amos:0.7,totalseg:0.3 from the command line
            raise ConfigError(f"data_mixture must be (name, weight) pairs, e.g. --config.data_mixture=\"(('amos', 0.7), "
                              f"('totalseg', 0.3))\", got {config.data_mixture!r}") from None
        try:
            mixture_probabilities(weights, list(config.get("datasets", {})))
        except ValueError as e:
            raise ConfigError(str(e)) from e
    if config.data_source in ("pipeline", "mixture"):
        from radsam_jax.data.pipeline import check_cache, check_modality, check_root

        # (key, data config, split) of each folder the run reads: its training data, then its validation data.
        reads = [("data", config.data, "train")] if config.data_source == "pipeline" else [
            (f"datasets.{name}", config.datasets[name], "train") for name in dict(config.data_mixture)]
        reads.append(("data", config.data, config.eval.split))
        try:
            for name, data_config, split in reads:
                check_modality(data_config, name)
                if split == "train":  # validation reads in order, one volume at a time
                    check_cache(data_config, name)
            training_intensity(config)
            for name, data_config, split in reads:
                check_root(data_config, split, name)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {"a.b.c": value}."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(saved: Optional[dict], current: dict) -> list[str]:
    """"key old -> new" for every config value that differs between a checkpoint's config and this
    run's (nested keys dotted); none for a checkpoint without one."""
    if not saved:
        return []
    old, new = _flat(saved), _flat(current)
    return [f"{k} {old.get(k, '(none)')!r} -> {new.get(k, '(none)')!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def validation_overlap(config: ml_collections.ConfigDict) -> list[str]:
    """Ids of the validation cases whose image is also a training image (none for synthetic data):
    e.g. a generic layout without splits.json or val_root, where every case is in every split. Their
    validation metrics are then training-set numbers. Reads no volume."""
    if config.data_source not in ("pipeline", "mixture"):
        return []
    from radsam_jax.data.pipeline import load_cases

    train = [config.data] if config.data_source == "pipeline" else [config.datasets[n] for n in dict(config.data_mixture)]
    seen = {pathlib.Path(c.image_path).resolve() for data in train for c in load_cases(data, "train")}
    return [c.case_id for c in load_cases(config.data, config.eval.split)
            if pathlib.Path(c.image_path).resolve() in seen]


def resume(ckpt: checkpointing.Checkpointer, config: ml_collections.ConfigDict, model_config: ModelConfig, tx, mesh,
           train_iter, writer: MetricWriter):
    """(train state, data iterator) of the run's last checkpoint, sharded over `mesh`, after checking that
    `config` can go on from it (`_check_resumable`); config changes are printed as a warning."""
    target = abstract_train_state(model_config, config, tx, mesh)
    saved_config = ckpt.restore_config()
    changed = config_changes(saved_config, json.loads(config.to_json()))
    _check_resumable(ckpt, target, saved_config, config, changed)
    state, train_iter = ckpt.restore(target, train_iter)
    if (saved_config or {}).get("precision", config.precision) != config.precision:
        # The loss scale belongs to the precision: float16 starts at loss_scale.initial, others at 1.
        shardings = jax.tree.map(lambda x: x.sharding, state.loss_scale)
        state = state.replace(loss_scale=jax.jit(lambda: initial_loss_scale(config), out_shardings=shardings)())
    writer.print(f"resumed from {ckpt.directory}/{ckpt.latest_step()} (step {int(state.step)})")
    if changed:
        writer.print(f"warning: resumed with another config than the run's last checkpoint: {'; '.join(changed[:10])}"
                     f"{' ...' if len(changed) > 10 else ''} (the run goes on with the new values)")
    return state, train_iter


def _set_up_process(config: ml_collections.ConfigDict) -> None:
    """Joins the other processes (multi-host) and enables the compilation cache: before anything touches a
    JAX backend."""
    maybe_initialize_distributed(config)
    if config.compilation_cache_dir:
        # Persistent XLA cache: a restarted (preempted) run or a sweep does not recompile.
        enable_compilation_cache(resolve_path(config.compilation_cache_dir))


def _check_run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """ConfigError for a mistake in `config` (`check_config`) or a `workdir` that cannot be written."""
    check_config(config)
    try:  # not found unusable after the data and the model are set up
        check_output_path(workdir, "--workdir", folder=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _probe_model(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[ModelConfig, Optional[dict]]:
    """`run_model` of the run in `workdir`, whose checkpoints it opens read-only: nothing is written to the
    workdir before the model is known to build."""
    probe = checkpointing.Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        return run_model(config, probe)
    finally:
        probe.close()


def _optimizer_and_schedule(config: ml_collections.ConfigDict, model_config: ModelConfig,
                            total_steps: Optional[int]) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimiser of `model_config`'s parameters (their shapes only) and its learning-rate schedule, over
    `total_steps` (None: unbounded, which check_config allows only with a constant schedule)."""
    abstract_params = jax.eval_shape(lambda: init_variables(model_config, jax.random.PRNGKey(0))["params"])
    tx = optimizer_lib.make_optimizer(config.optim, abstract_params, total_steps or 1)
    return tx, optimizer_lib.make_schedule(config.optim, total_steps or 1)


def _print_mesh(writer: MetricWriter, config: ml_collections.ConfigDict, mesh) -> None:
    """The mesh, the devices and processes it spans, and the global batch (and its microbatches)."""
    writer.print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
                 f"{jax.process_count()} process(es); global batch {config.batch_size}"
                 + (f" in {config.grad_accum_steps} microbatches of {config.batch_size // config.grad_accum_steps}"
                    if config.grad_accum_steps > 1 else ""))


def _warn_validation_overlap(writer: MetricWriter, config: ml_collections.ConfigDict) -> None:
    """A warning when validation cases are also training cases (`validation_overlap`)."""
    overlap = validation_overlap(config) if writer.enabled else []  # lists the cases: where it is printed only
    if overlap:
        writer.print(f"warning: {len(overlap)} validation case(s) ({', '.join(overlap[:5])}) are also training cases, "
                     f"so validation measures the training set (a generic layout holds every case in every split "
                     f"unless its root has a splits.json or data.val_root names another folder)")


def _start_metrics_at(writer: MetricWriter, step: int) -> None:
    """`writer.start_at(step)`, saying how many metrics.jsonl rows it dropped."""
    dropped = writer.start_at(step)
    if dropped:
        writer.print(f"dropped {dropped} row(s) of {writer.path} after step {step}, where the run starts again")


def _print_model(writer: MetricWriter, config: ml_collections.ConfigDict, model_config: ModelConfig,
                 params) -> None:
    """The model's name and size, the precision, and the intensity window it is trained for."""
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    writer.print(f"model {model_config.name}: {n_params / 1e6:.2f} M parameters, precision {config.precision}, "
                 f"{window_caption(model_config.ct_window, model_config.intensity)}")


def _volume_baseline_config(config: ml_collections.ConfigDict, model_config: ModelConfig, step: int) -> ModelConfig:
    """The model config of a volume validation before the first step. The weights are then the init
    checkpoint's: its volume validation reads mask prompts as that checkpoint declares (logits for a converted
    SAM), so the baseline is what `radsam evaluate` gives it; from the first step on, as trained (binary)."""
    if step == 0 and config.init_checkpoint and config.eval.volume_cases > 0:
        from radsam_jax.checkpoint import load_config

        init_prompt = load_config(resolve_path(config.init_checkpoint)).mask_prompt
        return dataclasses.replace(model_config, mask_prompt=init_prompt)
    return model_config


class _TrainingLoop:
    """The state the loop carries from step to step (train state, data iterator, step, last metrics), and
    what it does on the way: log, validate, checkpoint."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh, model_config: ModelConfig,
                 train_step: CompiledInStep, eval_step: CompiledInStep, total_steps: Optional[int],
                 ckpt: checkpointing.Checkpointer, writer: MetricWriter, state, train_iter, resumed: bool):
        self.config, self.workdir, self.mesh, self.model_config = config, workdir, mesh, model_config
        self.train_step, self.eval_step, self.total_steps = train_step, eval_step, total_steps
        self.ckpt, self.writer, self.resumed = ckpt, writer, resumed
        self.state, self.train_iter = state, train_iter
        self.step = self.start_step = int(state.step)
        self.eval_batch = config.eval.batch_size if config.eval.batch_size > 0 else config.batch_size
        self.config_json = json.loads(config.to_json())
        self.saved_step = ckpt.latest_step()
        self.held_out = None  # read at the first validation, then kept
        self.start_config = _volume_baseline_config(config, model_config, self.step)
        self.last, self.preempted = {}, False
        self.logged_step, self.metrics = self.step, None
        self._restart_throughput()

    def _restart_throughput(self) -> None:
        """Starts measuring images/s afresh (it measures training only, not validations or saves)."""
        self.t0, self.images_since = time.perf_counter(), 0

    def _due(self, every: int) -> bool:
        """Whether the current step is one of every `every` steps (never when `every` <= 0)."""
        return every > 0 and self.step % every == 0

    def save(self) -> None:
        """Checkpoints the current step, unless it is saved already."""
        if self.saved_step != self.step:
            self.ckpt.save(self.step, self.state, self.train_iter, self.config_json,
                           model_config=self.model_config.to_dict())
            self.saved_step = self.step

    def validate(self) -> None:
        """Validates the current state (slices, and volumes if eval.volume_cases > 0), writes and prints the
        result, and keeps it in `last` as validation_*."""
        config = self.config
        self.held_out = self.held_out or held_out_split(config)
        m = evaluate(self.eval_step, self.state.variables, config, self.model_config, self.mesh, self.eval_batch,
                     self.held_out)
        volume = ""
        if config.eval.volume_cases > 0:
            m.update(volume_validation(self.state.variables, self.start_config if self.step == 0 else self.model_config,
                                       config))
            volume = (f"; 3D dice {m['volume_dice']:.4f} ({int(m['volume_objects'])} objects, one box each)"
                      if m["volume_objects"] else f"; no object of the first {config.eval.volume_cases} validation "
                      f"volume(s) spans >= {config.eval.volume_min_slices} slices (eval.volume_min_slices)")
        self.writer.write(self.step, m, prefix="validation_")
        self.writer.print(f"step {self.step}: validation loss {m['loss']:.4f} dice {m['dice']:.4f} "
                          f"({int(m['num_examples'])} slices){volume}")
        self.last.update({f"validation_{k}": v for k, v in m.items()})

    def log(self) -> None:
        """Writes and prints the last step's metrics and the images/s since the last log."""
        values = {k: float(v) for k, v in jax.device_get(self.metrics).items()}  # syncs the device
        values["images_per_s"] = self.images_since / (time.perf_counter() - self.t0)
        self.writer.write(self.step, values)
        first = self.logged_step == self.start_step  # the train step's compilation is in this interval's time
        self.writer.print(f"step {self.step}{'/' + str(self.total_steps) if self.total_steps else ''} "
                          f"loss {values['loss']:.4f} dice {values['dice']:.3f} {values['images_per_s']:.1f} images/s"
                          + (" (compilation included)" if first else ""))
        self.last.update(values)
        self.logged_step = self.step
        self._restart_throughput()

    def train(self, guard: checkpointing.PreemptionGuard) -> None:
        """Trains until num_train_steps, the end of the data (num_epochs) or a preemption signal (`guard`) on
        any process, which saves the step reached."""
        if self.step == 0 and self.config.eval.at_start:
            self.validate()
            self._restart_throughput()
        while self.total_steps is None or self.step < self.total_steps:
            try:
                batch = next(self.train_iter)
            except StopIteration:
                break
            self.state, self.metrics = self.train_step(self.state, to_global_batch(batch, self.mesh))
            self.step += 1
            self.images_since += self.config.batch_size
            self._log_validate_save()
            if checkpointing.stop_requested_anywhere(guard.should_stop):
                # Preemption: save where we are and leave; the next start resumes from here.
                by = f"signal {guard.received}" if guard.received is not None else "a signal to another process"
                self.writer.print(f"{by}: saving step {self.step} and exiting")
                self.save()
                self.preempted = True
                break

    def _log_validate_save(self) -> None:
        """The periodic work after a step: every log_every_steps, eval.every_steps and checkpoint.every_steps
        steps (each <= 0: the last step only, which `finish` validates and saves)."""
        config = self.config
        if self._due(config.log_every_steps) or self.step == self.total_steps:
            self.log()
        if self._due(config.eval.every_steps):
            self.validate()
            self._restart_throughput()
        if self._due(config.checkpoint.every_steps):
            self.save()
            self._restart_throughput()

    def finish(self) -> None:
        """Logs the last step if it is not yet, then, unless preempted, validates (if that step's validation is
        not done) and saves it."""
        if self.logged_step != self.step:  # the last step of an epoch-bounded or preempted run
            self.log()
        # A re-run that had nothing left to train: the run is finished if its last step's validation is
        # recorded; one stopped by SIGTERM (or killed in that validation) at its last step validates now.
        rerun = self.resumed and self.step == self.start_step and not self.preempted
        if rerun and validation_recorded(self.workdir, self.step):
            self.writer.print(f"the run in {self.workdir} is already finished at step {self.step} (num_train_steps / "
                              "num_epochs): nothing to train or validate")
        elif not self.preempted:
            if rerun:
                self.writer.print(f"the run in {self.workdir} reached its last step {self.step} but not its final "
                                  "validation (stopped before it): validating")
            if rerun or not self._due(self.config.eval.every_steps):
                self.validate()
            self.save()

    def result(self, signal: Optional[int]) -> dict:
        """The last logged metrics, with the last validation's as validation_*, the step reached, and whether
        (and by which signal) a preemption stopped the run."""
        self.last["step"] = self.step
        self.last["preempted"] = self.preempted
        self.last["signal"] = signal if self.preempted else None
        return self.last


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from `workdir/checkpoints` if present); returns the last logged metrics,
    with "validation_*" entries of the last validation and "preempted" True if SIGTERM stopped it.
    A mistake in the config raises ConfigError before the workdir is created or written to."""
    _set_up_process(config)
    workdir = pathlib.Path(workdir)
    _check_run(config, workdir)

    # ---------------------------------------------------------------- Set up mesh
    # One "data" axis over every device of every process: params replicated, batch split.
    mesh = make_mesh(config.num_devices if config.num_devices > 0 else None)

    # ---------------------------------------------------------------- Create model & optimizer
    model_config, init_vars = _probe_model(config, workdir)
    total_steps = config.num_train_steps if config.num_train_steps > 0 else None
    tx, schedule = _optimizer_and_schedule(config, model_config, total_steps)

    # ---------------------------------------------------------------- Data
    train_iter = make_iterator(config, model_config, split="train", batch_size=config.batch_size // jax.process_count(),
                               seed=config.seed, num_epochs=config.num_epochs if config.num_epochs > 0 else None)
    workdir.mkdir(parents=True, exist_ok=True)
    writer = MetricWriter(workdir)
    _print_mesh(writer, config, mesh)
    _warn_validation_overlap(writer, config)

    # ---------------------------------------------------------------- Shard & transfer (or restore)
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints", max_to_keep=config.checkpoint.max_to_keep,
                                      async_save=config.checkpoint.async_save)
    resumed = ckpt.latest_step() is not None
    if resumed:
        state, train_iter = resume(ckpt, config, model_config, tx, mesh, train_iter, writer)
    else:
        state = create_sharded_state(model_config, config, tx, mesh, init_vars)
    del init_vars
    _start_metrics_at(writer, int(state.step))
    _print_model(writer, config, model_config, state.params)

    # ---------------------------------------------------------------- Update step
    train_step = CompiledInStep("train_step", make_train_step(model_config, config, tx, mesh, schedule))
    eval_step = CompiledInStep("eval_step", make_eval_step(model_config, config, mesh))

    # ---------------------------------------------------------------- Train loop
    loop = _TrainingLoop(config, workdir, mesh, model_config, train_step, eval_step, total_steps, ckpt, writer,
                         state, train_iter, resumed)
    del state  # the loop replaces it at every step, donating the old one: no reference here may keep it alive
    with checkpointing.PreemptionGuard() as guard, jax.set_mesh(mesh):
        loop.train(guard)
        loop.finish()
        ckpt.wait_until_finished()  # still guarded: a SIGTERM while the last save is written waits for it
    ckpt.close()
    writer.close()
    return loop.result(guard.received)
