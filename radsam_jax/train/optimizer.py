"""The optimiser: Adam (the paper: constant lr 1e-5), optional warm-up / cosine decay, gradient
clipping, and a choice of trainable parameters by regexes over their paths.

Parameter paths are the "/"-joined keys under "params", e.g. "image_encoder/blocks_0/attn/qkv/kernel"
or "prompt_encoder/mask_conv1/kernel". A parameter is trained when it matches (re.fullmatch) one of
`config.trainable` and none of `config.frozen`; the others go through `optax.set_to_zero`, which keeps
no Adam moments for them, so a frozen ViT-H encoder costs no optimiser memory, and the train step
differentiates only the trainable ones (`partition`): frozen parameters get no weight gradients, and
a frozen part with no trainable parameter upstream of it (the image encoder) no backward pass at
all. The "buffers" collection is never given to the optimiser (nor differentiated) at all.
"""

import re
from typing import Sequence

import jax
import ml_collections
import optax

from radsam_jax.checkpoint import path_name

TRAIN, FREEZE = "train", "freeze"


def param_paths(params) -> list[str]:
    """The "/"-joined path of every leaf of a params pytree, in tree order."""
    return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def trainable_labels(params, trainable: Sequence[str], frozen: Sequence[str] = ()):
    """A pytree like `params` of "train" / "freeze" labels (for optax.multi_transform)."""
    trainable = [re.compile(p) for p in trainable]
    frozen = [re.compile(p) for p in frozen]

    def label(path, _):
        name = path_name(path)
        ok = any(p.fullmatch(name) for p in trainable) and not any(p.fullmatch(name) for p in frozen)
        return TRAIN if ok else FREEZE

    return jax.tree_util.tree_map_with_path(label, params)


def partition(params, labels) -> tuple:
    """(trainable, frozen): two trees shaped like `params`, each holding its leaves and None for the
    other's; `combine` puts them back together."""
    trainable = jax.tree.map(lambda label, x: x if label == TRAIN else None, labels, params)
    frozen = jax.tree.map(lambda label, x: None if label == TRAIN else x, labels, params)
    return trainable, frozen


def combine(trainable, frozen):
    """The inverse of `partition`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Constant lr (default), with optional linear warm-up and optional cosine decay to `min_lr`."""
    lr, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        decay_steps = max(total_steps - warmup, 1)
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=config.min_lr / lr if lr else 0.0)
    else:
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {config.schedule!r}")
    if warmup > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])
    return main


def make_optimizer(config: ml_collections.ConfigDict, params, total_steps: int) -> optax.GradientTransformation:
    """config: the `optim` section of a training config; params: the (abstract) params pytree.

    Raises ValueError when the trainable regexes select no parameter at all (a typo would otherwise
    train nothing, silently).
    """
    labels = trainable_labels(params, config.trainable, config.frozen)
    if TRAIN not in jax.tree.leaves(labels):
        raise ValueError(
            f"optim.trainable={list(config.trainable)} / optim.frozen={list(config.frozen)} select no "
            f"parameter; paths look like {param_paths(params)[:3]}"
        )
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adam(make_schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps))
    if config.weight_decay > 0:
        # Decoupled weight decay (AdamW) when asked; the paper uses plain Adam.
        parts[-1] = optax.adamw(make_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                                eps=config.eps, weight_decay=config.weight_decay)
    train_tx = optax.chain(*parts)
    return optax.multi_transform({TRAIN: train_tx, FREEZE: optax.set_to_zero()}, labels)
