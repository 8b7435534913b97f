"""Volume validation during training: the paper's own metric beside the slice validation.

The slice validation (loop.evaluate) scores single slices from simulated prompts; what RadSAM is for
is a 3D mask from one prompt. With `eval.volume_cases` > 0, each validation also runs the benchmark's
volume-level setting (radsam_jax/evaluate/runner.py: a tight box on the slice of largest area, the
ground truth's bottom and top slices, mask propagation, no edits) on the first `eval.volume_cases`
volumes of the validation split, and logs the mean 3D Dice over their objects
("validation_volume_dice") and per structure ("validation_volume_dice/<structure>").

The parameters are replicated, so every process holds them whole: each runs the same volumes on its
own first device, in a one-device mesh of its own (inside the training mesh, arrays would be spread
over every device of the job, every process repeating the work in one program), and process 0 writes
the result. The weights are taken from that device's replica, not copied.
"""

from __future__ import annotations

import collections
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


def volume_validation(variables: Mapping[str, Any], model_config: ModelConfig,
                      config: ml_collections.ConfigDict) -> dict:
    """{"volume_dice": mean 3D Dice, "volume_objects": objects scored, "volume_dice/<structure>": ...}
    of the volume-level setting on the first `config.eval.volume_cases` cases of the validation split;
    {"volume_objects": 0.0} when none of their objects can be scored (eval.volume_min_slices)."""
    from radsam_jax.data import datasets, pipeline
    from radsam_jax.evaluate.runner import EvalOptions, EvaluationInputError, evaluate_cases, make_settings
    from radsam_jax.inference import VolumePredictor
    from radsam_jax.model.sam import RadSam

    cases = pipeline.load_cases(config.data, config.eval.split)[: int(config.eval.volume_cases)]
    dtype = "bfloat16" if config.precision == "bfloat16" else "float32"  # float16 (V100): validate in float32
    own_device = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("data",))
    with jax.set_mesh(own_device):
        predictor = VolumePredictor(RadSam(model_config, first_device_weights(variables), dtype=dtype))
        try:
            result = evaluate_cases(cases, predictor, make_settings(["volume"], ["box"], ["mask"]),
                                    EvalOptions(edits=(0,), seed=int(config.seed), oracle=False, worst_count=0,
                                                min_slices=int(config.eval.volume_min_slices)),
                                    load_case=datasets.load_case, progress=False)
        except EvaluationInputError:  # every object skipped (absent, or fewer slices than volume_min_slices)
            return {"volume_objects": 0.0}
    by_structure = collections.defaultdict(list)
    for row in result.rows:
        by_structure[row["structure"]].append(row["dice"])
    out = {"volume_dice": float(np.mean([row["dice"] for row in result.rows])), "volume_objects": float(len(result.rows))}
    out.update({f"volume_dice/{name}": float(np.mean(d)) for name, d in sorted(by_structure.items())})
    return out
