"""Volume validation during training: the paper's own metric beside the slice validation.

The slice validation (loop.evaluate) scores single slices from simulated prompts; what RadSAM is for
is a 3D mask from one prompt. With `eval.volume_cases` > 0, each validation also runs the benchmark's
volume-level setting (radsam_jax/evaluate/runner.py: a tight box on the slice of largest area, the
ground truth's bottom and top slices, mask propagation, no edits) on the first `eval.volume_cases`
volumes of the validation split, and logs the mean 3D Dice over their objects
("validation_volume_dice") and per structure ("validation_volume_dice/<structure>").

The parameters are replicated, so every process holds them whole: process p scores volumes p, p + P,
p + 2P, ... of the N (P processes) on its own first device, in a one-device mesh of its own (inside
the training mesh, arrays would be spread over every device of the job), with the weights of that
device's replica (not copied). The per-structure sums of Dice and object counts are then gathered
from every process, so each process holds the result and process 0 writes it. A process whose
volumes fail (an unreadable file, ...) raises its error and makes the others raise too, rather than
leaving them waiting in the gather.
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from radsam_jax.model.config import ModelConfig


def first_device_weights(variables: Mapping[str, Any]) -> dict:
    """This process's replica on its first device of each (replicated, possibly multi-process) array."""
    def replica(x):
        if not x.sharding.is_fully_replicated:
            raise ValueError(f"volume validation needs replicated parameters, got sharding {x.sharding}")
        return x.addressable_data(0)

    return jax.tree.map(replica, dict(variables))


class VolumeValidationError(RuntimeError):
    """Volume validation failed on another process (whose own error is in its output)."""


def gather_sums(sums: np.ndarray, failed: bool = False) -> np.ndarray:
    """The sum over processes of each process's float64 `sums`, exactly: sent as their bit patterns,
    since the transfer would round float64 to float32 (JAX's default precision).

    Every process must call it, also one whose own work failed (`failed`), so that none waits for
    it: the others then raise VolumeValidationError instead of hanging in the gather.
    """
    rows = np.concatenate([np.asarray(sums, np.float64), [[float(failed), 0.0]]])  # last row: failures
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        bits = np.ascontiguousarray(rows).view(np.uint32)
        gathered = np.asarray(multihost_utils.process_allgather(bits))  # (processes, *bits.shape)
        rows = np.ascontiguousarray(gathered).view(np.float64).sum(axis=0)
    if rows[-1, 0] > float(failed):
        raise VolumeValidationError(f"volume validation failed on {int(rows[-1, 0] - failed)} other process(es); "
                                    f"their output says why")
    return rows[:-1]


def volume_validation(variables: Mapping[str, Any], model_config: ModelConfig,
                      config: ml_collections.ConfigDict) -> dict:
    """{"volume_dice": mean 3D Dice, "volume_objects": objects scored, "volume_dice/<structure>": ...}
    of the volume-level setting on the first `config.eval.volume_cases` cases of the validation split,
    shared out over the processes; {"volume_objects": 0.0} when none of their objects can be scored
    (eval.volume_min_slices). Every process must call it (it gathers from all of them)."""
    from radsam_jax.data import datasets, pipeline

    cases = pipeline.load_cases(config.data, config.eval.split)[: int(config.eval.volume_cases)]
    names = sorted({name for case in cases for name in case.structures})
    mine = datasets.select_shard(cases, (jax.process_index(), jax.process_count()))
    try:
        sums = _scored_sums(mine, names, variables, model_config, config)
    except Exception:
        with contextlib.suppress(VolumeValidationError):  # the others wait in the gather: release them
            gather_sums(np.zeros((len(names), 2)), failed=True)
        raise
    sums = gather_sums(sums)
    objects = float(sums[:, 1].sum())
    if objects == 0:
        return {"volume_objects": 0.0}
    out = {"volume_dice": float(sums[:, 0].sum() / objects), "volume_objects": objects}
    out.update({f"volume_dice/{name}": float(total / count) for name, (total, count) in zip(names, sums) if count > 0})
    return out


def _scored_sums(cases: list, names: list, variables: Mapping[str, Any], model_config: ModelConfig,
                 config: ml_collections.ConfigDict) -> np.ndarray:
    """Per structure of `names`: (sum of 3D Dice, objects scored) over this process's `cases`."""
    from radsam_jax.data import datasets
    from radsam_jax.evaluate.runner import EvalOptions, EvaluationInputError, evaluate_cases, make_settings
    from radsam_jax.inference import VolumePredictor
    from radsam_jax.model.sam import RadSam

    sums = np.zeros((len(names), 2), np.float64)
    if not cases:
        return sums
    dtype = "bfloat16" if config.precision == "bfloat16" else "float32"  # float16 (V100): validate in float32
    own_device = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("data",))
    with jax.set_mesh(own_device):
        predictor = VolumePredictor(RadSam(model_config, first_device_weights(variables), dtype=dtype))
        try:
            rows = evaluate_cases(cases, predictor, make_settings(["volume"], ["box"], ["mask"]),
                                  EvalOptions(edits=(0,), seed=int(config.seed), oracle=False, worst_count=0,
                                              min_slices=int(config.eval.volume_min_slices)),
                                  load_case=datasets.load_case, progress=False).rows
        except EvaluationInputError:  # every object skipped (absent, or fewer slices than volume_min_slices)
            rows = []
    for row in rows:
        sums[names.index(row["structure"])] += (row["dice"], 1.0)
    return sums
