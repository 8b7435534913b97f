"""Orbax checkpoints of a training run: the train state *and* the Grain iterator state, side by side.

Layout (one Orbax step directory per saved step):

    workdir/checkpoints/<step>/state/      TrainState: params, buffers, opt_state, step, rng, loss scale
    workdir/checkpoints/<step>/data_iter/  process_<i>-of-<n>.json: Grain iterator state, per process
    workdir/checkpoints/<step>/config/     the training config as JSON (for humans and `radsam` tools)
    workdir/checkpoints/<step>/model_config/  the run's ModelConfig as JSON: resume and `radsam export`
                                           rebuild the architecture from it, not from init_checkpoint

Saving the iterator beside the model (as maxtext does) is what makes a resume exact: the next batch
after a restore is the batch the uninterrupted run would have seen.

Crash safety comes from Orbax's atomic finalize: a step is written under a temporary name
(`<step>.orbax-checkpoint-tmp-*`) and renamed only once complete, and `latest_step()` only lists
finalised steps, so a run killed mid-save restarts from the last complete checkpoint; we also pass
`cleanup_tmp_directories=True` so the leftovers are removed at start-up.

SIGTERM (preemption, `kill`, Slurm / Kubernetes shutdown): `PreemptionGuard` records the signal;
the loop checks it after each step, saves a checkpoint at the current step, waits for the write to
finish and exits cleanly. We never save from inside the signal handler: the state may be mid-update.
"""

import re
import signal
import threading
import time
from typing import Optional

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from radsam_jax.checkpoint import tree_shapes
from radsam_jax.train.config_lib import ConfigError

STATE, DATA_ITER, CONFIG, MODEL_CONFIG = "state", "data_iter", "config", "model_config"


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for (TrainState, Grain iterator, config)."""

    def __init__(self, directory, *, max_to_keep: Optional[int] = 3, async_save: bool = True, read_only: bool = False):
        """`read_only`: nothing is created, saved or deleted, not even the temporary directory of a
        save in progress (e.g. exporting or checking while the run trains)."""
        # Orbax requires absolute paths; a relative --workdir is taken from the current directory.
        self.directory = epath.Path(directory).absolute()
        # Not Orbax's own read_only option, which logs a warning at every start: Orbax writes or
        # deletes nothing but at creation (create, cleanup) and in save(), which a reader never calls.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE: ocp.StandardCheckpointHandler(),
                DATA_ITER: grain.checkpoint.CheckpointHandler(),
                CONFIG: ocp.JsonCheckpointHandler(),
                MODEL_CONFIG: ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> Optional[int]:
        """The last *complete* checkpoint's step (temporary, unfinished directories are ignored)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iter=None, config: Optional[dict] = None, *,
             model_config: Optional[dict] = None) -> bool:
        """Saves `step` (the caller decides when; Orbax refuses a step saved already); returns whether it
        saved. `model_config`: ModelConfig.to_dict() of the trained model."""
        items = {STATE: ocp.args.StandardSave(state)}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(config)
        if model_config is not None:
            items[MODEL_CONFIG] = ocp.args.JsonSave(model_config)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state, data_iter=None, step: Optional[int] = None):
        """(state, data_iter) at `step` (default latest); `abstract_state` gives shapes and shardings.

        The iterator is restored in place (set_state) when given.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        items = {STATE: ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            self._check_process_count(step)
            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored[STATE], (restored[DATA_ITER] if data_iter is not None else None)

    def _check_process_count(self, step: int) -> None:
        """ConfigError unless the checkpoint's data iterator states (one file per process,
        process_I-of-N.json) were written by as many processes as this run has."""
        counts = {int(m[1]) for f in (self.directory / str(step) / DATA_ITER).glob("process_*-of-*.json")
                  if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", f.name))}
        if counts and jax.process_count() not in counts:
            raise ConfigError(f"checkpoint {self.directory / str(step)} was written by {max(counts)} process(es): each "
                              f"saved its own share of the data order; resume with {max(counts)} process(es), not "
                              f"{jax.process_count()}")

    def restore_state_arrays(self, step: Optional[int] = None, parts=("params", "buffers")) -> dict:
        """`parts` of the saved train state (top-level keys) as a plain nested dict of host arrays, no
        target needed, e.g. to export trained weights: `restore_state_arrays()["params"]`. Only those
        parts are read: the optimiser moments, twice the parameters, stay on disk."""
        step = self.latest_step() if step is None else step
        # Onto one local device, whatever the saving topology (a multi-host run's checkpoint names
        # devices this process may not have, and Orbax would refuse to reuse its shardings).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        tree = self.manager.item_metadata(step)[STATE].tree
        missing = [p for p in parts if p not in tree]
        if missing:
            raise KeyError(f"checkpoint {self.directory / str(step)} has no {missing} in its state (it has {sorted(tree)})")
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), {p: tree[p] for p in parts})
        # The state item was written by StandardCheckpointHandler, whose files the PyTree handler reads;
        # only the latter restores a subset of the tree.
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
            restored = reader.restore(self.directory / str(step) / STATE,
                                      args=ocp.args.PyTreeRestore(target, ocp.checkpoint_utils.construct_restore_args(target),
                                                                  partial_restore=True))
        return jax.device_get(restored)

    def state_shapes(self, step: Optional[int] = None, parts=("params", "buffers")) -> dict[str, tuple]:
        """"params/image_encoder/pos_embed"-style path (checkpoint.tree_shapes) -> shape of each array of the
        state's `parts` (all: None) saved at `step` (default latest), from the checkpoint's metadata: no
        array is read."""
        tree = self.manager.item_metadata(self.latest_step() if step is None else step)[STATE].tree
        return tree_shapes(tree if parts is None else {k: tree[k] for k in parts})

    def restore_config(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else step
        return self.manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

    def restore_model_config(self, step: Optional[int] = None) -> Optional[dict]:
        """The ModelConfig dict saved with `step` (default latest); None for checkpoints written
        before radsam-jax stored it."""
        step = self.latest_step() if step is None else step
        if MODEL_CONFIG not in self.manager.item_metadata(step).keys():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()}))[MODEL_CONFIG]

    def wait_until_finished(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


class PreemptionGuard:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the training loop polls between steps, so both
    save the current step and exit; a second Ctrl-C (a second or more later) raises KeyboardInterrupt
    at once (a save that hangs can still be left). Python's own KeyboardInterrupt could land anywhere, e.g. in a
    garbage-collection callback of jax that swallows it, and the run trained on.

    Use as a context manager; the previous handlers are restored on exit. Only the main thread can
    install signal handlers, so elsewhere (e.g. a test thread) this is a no-op guard.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self._event = threading.Event()
        self._previous = {}
        self.received: Optional[int] = None
        self._first_sigint: Optional[float] = None

    def _handler(self, signum, frame):
        # The same Ctrl-C can arrive twice at once, from the terminal and relayed by a wrapper
        # (e.g. `timeout`): only one a second or more after the first is a second Ctrl-C.
        if signum == signal.SIGINT and self._first_sigint is not None and time.monotonic() - self._first_sigint > 1.0:
            raise KeyboardInterrupt
        if signum == signal.SIGINT and self._first_sigint is None:
            self._first_sigint = time.monotonic()
        self.received = signum
        self._event.set()

    @property
    def should_stop(self) -> bool:
        return self._event.is_set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
        return False


def stop_requested_anywhere(local_stop: bool) -> bool:
    """True if any process got the signal: every process must take the same save-and-exit branch,
    or the collective save would hang. One process: just the local flag."""
    if jax.process_count() == 1:
        return local_stop
    from jax.experimental import multihost_utils
    import numpy as np

    flags = multihost_utils.process_allgather(np.asarray([local_stop], np.int32))
    return bool(np.any(flags))
