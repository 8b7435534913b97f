"""Volume validation during training: the paper's own metric beside the slice validation.

The slice validation (loop.evaluate) scores single slices from simulated prompts; what RadSAM is for
is a 3D mask from one prompt. With `eval.volume_cases` > 0, each validation also runs the benchmark's
volume-level setting (radsam_jax/evaluate/runner.py: a tight box on the slice of largest area, the
ground truth's bottom and top slices, mask propagation, no edits) on the first `eval.volume_cases`
volumes of the validation split, and logs the mean 3D Dice over their objects
("validation_volume_dice") and per structure ("validation_volume_dice/<structure>").

The model's parameters are replicated, so every process holds them whole and runs the same volumes
on its own first device (identical results, no collective to wait on); process 0 writes them.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from radsam_jax.model.config import ModelConfig


def host_variables(variables: Mapping[str, Any]) -> dict:
    """Numpy copies of replicated (possibly multi-process) arrays, from this process's own shard."""
    def fetch(x):
        if not x.sharding.is_fully_replicated:
            raise ValueError(f"volume validation needs replicated parameters, got sharding {x.sharding}")
        return np.asarray(x.addressable_data(0))

    return jax.tree.map(fetch, dict(variables))


def volume_validation(variables: Mapping[str, Any], model_config: ModelConfig,
                      config: ml_collections.ConfigDict) -> dict:
    """{"volume_dice": mean 3D Dice, "volume_objects": objects scored, "volume_dice/<structure>": ...}
    of the volume-level setting on the first `config.eval.volume_cases` cases of the validation split."""
    from radsam_jax.data import datasets, pipeline
    from radsam_jax.evaluate.runner import EvalOptions, evaluate_cases, make_settings
    from radsam_jax.inference import VolumePredictor
    from radsam_jax.model.sam import RadSam

    cases, _ = pipeline.load_split(config.data, config.eval.split)
    cases = cases[: int(config.eval.volume_cases)]
    dtype = "bfloat16" if config.precision == "bfloat16" else "float32"  # float16 (V100): validate in float32
    with jax.default_device(jax.local_devices()[0]):
        predictor = VolumePredictor(RadSam(model_config, host_variables(variables), dtype=dtype))
        result = evaluate_cases(cases, predictor, make_settings(["volume"], ["box"], ["mask"]),
                                EvalOptions(edits=(0,), seed=int(config.seed), min_slices=int(config.eval.volume_min_slices),
                                            oracle=False, worst_count=0),
                                load_case=datasets.load_case, progress=False)
    if not result.rows:
        raise ValueError(f"volume validation: no object in the first {len(cases)} case(s) of split {config.eval.split!r} "
                         f"spans >= {config.eval.volume_min_slices} slices (eval.volume_min_slices)")
    by_structure = collections.defaultdict(list)
    for row in result.rows:
        by_structure[row["structure"]].append(row["dice"])
    out = {"volume_dice": float(np.mean([row["dice"] for row in result.rows])), "volume_objects": float(len(result.rows))}
    out.update({f"volume_dice/{name}": float(np.mean(d)) for name, d in sorted(by_structure.items())})
    return out
