"""`radsam export WORKDIR DST`: a training run's checkpoint -> a model checkpoint for inference.

A training checkpoint holds the whole TrainState (optimiser moments, RNG, data-iterator state);
inference needs only the variables and the architecture, in the format `load_checkpoint` reads. The
exported model records the intensity units and window the run trained with (ModelConfig.intensity and
.ct_window, from the run's data.intensity, data.window_level and data.window_width), which inference
then uses by default.
"""

import argparse
import pathlib
import signal
import sys
from typing import Optional

import ml_collections

from radsam_jax.checkpoint import save_model, signals_held
from radsam_jax.io import check_output_path
from radsam_jax.model import ModelConfig
from radsam_jax.train import checkpointing
from radsam_jax.train.loop import as_trained, configured_model_config


def export_model(workdir, dst, step: Optional[int] = None) -> pathlib.Path:
    """Writes the variables of `workdir`'s checkpoint at `step` (default: the latest) to `dst`.
    Reads the run only: nothing in `workdir` is created or cleaned up."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"no training run at {workdir}: {workdir / 'checkpoints'} does not exist")
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints", async_save=False, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            raise FileNotFoundError(f"no complete checkpoint{'' if step is None else f' at step {step}'} in {workdir / 'checkpoints'}"
                                    f" (steps: {ckpt.all_steps()})")
        train_config = ckpt.restore_config(step)
        stored = ckpt.restore_model_config(step)
        if stored is not None:
            model_config = ModelConfig.from_mapping(stored)
            if "ct_window" not in stored:  # stored before ct_window existed: the run's data config gives it
                model_config = as_trained(model_config, ml_collections.ConfigDict(train_config))
        else:  # an older radsam-jax did not store it: the run's config gives it, as it did then
            try:
                model_config = configured_model_config(ml_collections.ConfigDict(train_config))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"step {step} does not record its model (older radsam-jax), so its "
                                        f"init_checkpoint must give it: {e}") from e
        state = ckpt.restore_state_arrays(step)
    finally:
        ckpt.close()
    metadata = {"source": "radsam train", "workdir": str(workdir.resolve()), "step": int(step), "training_config": train_config}
    with signals_held(signal.SIGINT, signal.SIGTERM):  # a Ctrl-C takes effect on a complete model
        return save_model(dst, model_config, {"params": state["params"], "buffers": state["buffers"]}, metadata)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export", help="export a training run's checkpoint as a model checkpoint for inference",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="the --workdir of `radsam train`")
    parser.add_argument("dst", help="output model checkpoint directory (must not exist)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest complete one)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from radsam_jax.checkpoint import CheckpointError

    try:
        check_output_path(args.dst, "destination", folder=True)
        if pathlib.Path(args.dst).resolve().is_relative_to((pathlib.Path(args.workdir) / "checkpoints").resolve()):
            raise ValueError(f"destination {args.dst} is inside the run's checkpoints folder, where it would be taken for a step")
        path = export_model(args.workdir, args.dst, args.step)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError) as e:
        print(f"radsam export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that failed after all (a full disk): nothing is left at the destination
        print(f"radsam export: error: writing {args.dst} failed: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.workdir} -> {path}")
    return 0
