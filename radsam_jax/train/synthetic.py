"""A synthetic Grain dataset with the real pipeline's batch contract, for tests and benchmarks.

Each example is a bright noisy ellipse on a dark noisy background at the model input size, its
binary target, and RadSAM-style simulated prompts: a point inside the object, its (jittered) box,
and a shifted, dilated copy of the target as mask prompt (half of the examples). Examples are a pure
function of (seed, index), so the iterator state is just a position and resumes are exact.

Batch (dict of numpy arrays): "image" float32 (B,S,S,3) already normalised, "target" uint8 (B,S,S),
"points" float32 (B,1,2), "point_labels" int32 (B,1), "box" float32 (B,4), "has_box" bool (B,),
"mask" float32 (B,S/4,S/4), "has_mask" bool (B,).
"""

from typing import Optional

import grain
import numpy as np

from radsam_jax.model import ModelConfig


def synthetic_example(index: int, *, image_size: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, index])
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    cx, cy = rng.uniform(0.3, 0.7, 2) * s
    rx, ry = rng.uniform(0.08, 0.25, 2) * s
    angle = rng.uniform(0, np.pi)
    ca, sa = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * ca + (yy - cy) * sa) / rx
    v = (-(xx - cx) * sa + (yy - cy) * ca) / ry
    target = (u * u + v * v <= 1.0).astype(np.uint8)
    # A second, distracting blob so the prompt matters.
    dx, dy = rng.uniform(0.1, 0.9, 2) * s
    distractor = ((xx - dx) ** 2 + (yy - dy) ** 2 <= (0.08 * s) ** 2) & (target == 0)
    gray = 0.25 + 0.5 * target + 0.4 * distractor + rng.normal(0, 0.1, (s, s))
    image = np.repeat(((gray - 0.5) / 0.25).astype(np.float32)[..., None], 3, axis=-1)

    ys, xs = np.nonzero(target)
    k = rng.integers(len(xs))
    point = np.array([[xs[k] + 0.5, ys[k] + 0.5]], np.float32)
    jitter = rng.uniform(-0.02, 0.05, 4) * s
    box = np.array([xs.min() - jitter[0], ys.min() - jitter[1], xs.max() + 1 + jitter[2], ys.max() + 1 + jitter[3]],
                   np.float32).clip(0, s)
    m = s // 4
    low = target.reshape(m, 4, m, 4).max(axis=(1, 3))
    shift = rng.integers(-2, 3, 2)
    mask = np.roll(low, tuple(shift), axis=(0, 1)).astype(np.float32)
    return {
        "image": image,
        "target": target,
        "points": point,
        "point_labels": np.ones((1,), np.int32),
        "box": box,
        "has_box": np.asarray(rng.uniform() < 0.5),
        "mask": mask,
        "has_mask": np.asarray(rng.uniform() < 0.5),
    }


def make_synthetic_iterator(
    model_config: ModelConfig,
    *,
    split: str,
    batch_size: int,
    seed: int,
    num_examples: int = 64,
    shard_index: Optional[int] = None,
    shard_count: Optional[int] = None,
    num_epochs: Optional[int] = None,
) -> grain.DatasetIterator:
    """A Grain iterator of synthetic batches (same signature shape as the data pipeline's).

    split "train" shuffles each epoch and repeats `num_epochs` times (None: forever); any other split
    is a fixed held-out set (different examples), in order, once.
    """
    offset = 0 if split == "train" else 1_000_000
    ds = grain.MapDataset.range(num_examples)
    if shard_count:
        if num_examples < shard_count:
            raise ValueError(f"{num_examples} synthetic examples cannot be shared by {shard_count} processes")
        # Equal shares (the remainder dropped, as the data pipeline does): a process with one batch more
        # than the others would wait for them in its extra step's collectives.
        ds = ds[shard_index::shard_count][: num_examples // shard_count]
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat(num_epochs)
    ds = ds.map(lambda i: synthetic_example(int(i) + offset, image_size=model_config.image_size, seed=seed))
    ds = ds.batch(batch_size, drop_remainder=split == "train")
    # Each element is a whole batch: 2 threads keeping 2 batches ready. Grain's defaults (16 threads,
    # 500 elements) build dozens of batches ahead, GiBs at 1024 px, for a consumer that takes two.
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
