"""`radsam export WORKDIR DST`: a training run's checkpoint -> a model checkpoint for inference.

A training checkpoint holds the whole TrainState (optimiser moments, RNG, data-iterator state);
inference needs only the variables and the architecture, in the format `load_checkpoint` reads.
"""

import argparse
import pathlib
import sys
from typing import Optional

import ml_collections

from radsam_jax.checkpoint import save_model
from radsam_jax.train import checkpointing
from radsam_jax.train.loop import load_model


def export_model(workdir, dst, step: Optional[int] = None) -> pathlib.Path:
    """Writes the variables of `workdir`'s checkpoint at `step` (default: the latest) to `dst`."""
    workdir = pathlib.Path(workdir)
    ckpt = checkpointing.Checkpointer(workdir / "checkpoints", async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None or step not in ckpt.all_steps():
            raise FileNotFoundError(f"no complete checkpoint{'' if step is None else f' at step {step}'} in {workdir / 'checkpoints'}"
                                    f" (steps: {ckpt.all_steps()})")
        train_config = ckpt.restore_config(step)
        # The architecture comes from the run's own config: init_checkpoint or model preset + overrides.
        model_config, _ = load_model(ml_collections.ConfigDict(train_config))
        state = ckpt.restore_state_arrays(step)
    finally:
        ckpt.close()
    metadata = {"source": "radsam train", "workdir": str(workdir.resolve()), "step": int(step), "training_config": train_config}
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
        path = export_model(args.workdir, args.dst, args.step)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError) as e:
        print(f"radsam export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.workdir} -> {path}")
    return 0
