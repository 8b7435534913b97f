"""The jitted, sharded RadSAM train step (and eval step), plus creating the train state sharded.

Sharding is declared once: a 1-D `Mesh` with a "data" axis over every device of every process;
the train state is replicated (P()), every batch array is split on its leading axis (P("data")).
`jax.jit` with these in/out shardings lets XLA insert the gradient all-reduce itself (with gradient
accumulation, a `shard_map` all-reduces once after the microbatch loop); the state is donated so
parameters and Adam moments are updated in place (no second copy in device memory).
"""

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from radsam_jax.model import ModelConfig, Sam, init_variables
from radsam_jax.model.image_encoder import resolve_attention
from radsam_jax.model.sam import check_compute_dtype
from radsam_jax.prompts import Prompts
from radsam_jax.train import optimizer as optimizer_lib
from radsam_jax.train.loss import LossSettings, radsam_loss, radsam_loss_per_sample
from radsam_jax.train.state import DynamicLossScale, TrainState

DATA_AXIS = "data"

# Batch fields the step reads, with the dtype each is cast to on the host.
BATCH_DTYPES = {
    "image": np.float32,
    "target": np.uint8,
    "points": np.float32,
    "point_labels": np.int32,
    "box": np.float32,
    "has_box": np.bool_,
    "mask": np.float32,
    "has_mask": np.bool_,
}

def training_attention(config: ml_collections.ConfigDict) -> str:
    """The encoder's attention implementation for `config.attention` at the run's precision: "auto"
    is cuDNN's fused kernel on GPUs in bfloat16/float16, else the chunked path, whose backward pass
    also holds one step's scores at a time (image_encoder.attention_query_chunked). ValueError for an
    unknown name."""
    return resolve_attention(config.get("attention", "chunked"), compute_dtype(config.precision))


def compute_dtype(precision: str):
    """config.precision as the model's compute dtype; ValueError naming it if it is not one."""
    return check_compute_dtype(precision, "precision")


def make_mesh(num_devices: Optional[int] = None) -> jax.sharding.Mesh:
    """A 1-D ("data",) mesh over the first `num_devices` devices (default: all, all processes).

    Auto axis types: the model was written without sharding-in-types annotations, so we let XLA
    propagate the batch sharding through it (the default Explicit mode would ask for annotations).
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n])


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def to_global_batch(local_batch: dict, mesh) -> dict:
    """This process's numpy batch -> global jax arrays split over the "data" axis.

    Works for one process (the local batch is the global batch) and for many (each process passes
    its own shard; the global batch is their concatenation in process order).
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, dtype in BATCH_DTYPES.items():
        if key not in local_batch:
            raise KeyError(f"training batch lacks {key!r}; it has {sorted(local_batch)}")
        out[key] = jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[key], dtype))
    return out


def batch_prompts(batch: dict) -> Prompts:
    return Prompts(batch["points"], batch["point_labels"], batch["box"], batch["has_box"],
                   batch["mask"], batch["has_mask"])


def loss_settings(config: ml_collections.ConfigDict) -> LossSettings:
    return LossSettings(config.loss.primary_weight, config.loss.secondary_weight, config.loss.iou_weight,
                        config.loss.dice)


# --------------------------------------------------------------------------------------------------
# Create the state, already sharded
# --------------------------------------------------------------------------------------------------
def initial_loss_scale(config: ml_collections.ConfigDict) -> DynamicLossScale:
    if config.precision == "float16":
        return DynamicLossScale.create(config.loss_scale.initial, config.loss_scale.period, config.loss_scale.factor)
    return DynamicLossScale.create(1.0)


def _state_initializer(model_config: ModelConfig, config: ml_collections.ConfigDict,
                       tx: optax.GradientTransformation) -> Callable[[Optional[dict]], TrainState]:
    rng = jax.random.PRNGKey(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    loss_scale = initial_loss_scale(config)

    def init(variables):
        if variables is None:
            variables = init_variables(model_config, init_rng)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            buffers=variables.get("buffers", {}),
            opt_state=tx.init(params),
            rng=train_rng,
            loss_scale=loss_scale,
        )

    return init


def create_sharded_state(
    model_config: ModelConfig,
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    mesh,
    variables: Optional[dict] = None,
) -> TrainState:
    """A replicated `TrainState` created directly on the mesh (`jax.jit(init, out_shardings=...)`).

    `variables` ({"params", "buffers"}, e.g. from a converted SAM checkpoint) start the run; None
    initialises the model from `config.seed`.
    """
    init = _state_initializer(model_config, config, tx)
    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=replicated(mesh))(variables)


def abstract_train_state(model_config: ModelConfig, config: ml_collections.ConfigDict,
                         tx: optax.GradientTransformation, mesh) -> TrainState:
    """ShapeDtypeStructs (with their replicated shardings) of the state, allocating nothing: the
    target of an Orbax restore and of `jit(...).lower(...)` for cost analysis."""
    shapes = jax.eval_shape(_state_initializer(model_config, config, tx), None)
    rep = replicated(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


# --------------------------------------------------------------------------------------------------
# Update step
# --------------------------------------------------------------------------------------------------
def _scaled_gradients(model: Sam, loss_config: LossSettings) -> Callable:
    """`grads_and_metrics(trainable, frozen, buffers, scale, batch, parts)`: gradients of scale x loss / parts
    with respect to `trainable`, and metrics / parts."""

    def loss_fn(params, buffers, batch):
        # Only params are differentiated: buffers enter as a constant of this function.
        mask_logits, iou_pred = model.apply({"params": params, "buffers": buffers},
                                            batch["image"], batch_prompts(batch))
        return radsam_loss(mask_logits, iou_pred, batch["target"], loss_config)

    def grads_and_metrics(trainable, frozen, buffers, scale, batch, parts: int):
        def scaled_loss(trainable):
            loss, metrics = loss_fn(optimizer_lib.combine(trainable, frozen), buffers, batch)
            return loss * (scale / parts), jax.tree.map(lambda m: m / parts, metrics)
        return jax.grad(scaled_loss, has_aux=True)(trainable)

    return grads_and_metrics


def _accumulated_gradients(grads_and_metrics: Callable, accum: int, microbatches: int) -> Callable:
    """`accumulated(trainable, frozen, buffers, scale, local_batch)`, to run inside shard_map: this device's
    rows as `accum` microbatches of the `microbatches` of the global batch. The loss and metrics are means
    over equal microbatches, so the sum over all of them of their gradients / metrics, each divided by their
    number, is the whole batch's; the sum is one psum after the loop."""

    def accumulated(trainable, frozen, buffers, scale, local_batch):
        micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), local_batch)

        def add(total, one):
            part = grads_and_metrics(trainable, frozen, buffers, scale, one, microbatches)
            return jax.tree.map(lambda t, x: t + x.astype(jnp.float32), total, part), None

        shapes = jax.eval_shape(lambda one: grads_and_metrics(trainable, frozen, buffers, scale, one, microbatches),
                                jax.tree.map(lambda x: x[0], micro))
        total, _ = jax.lax.scan(add, jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes), micro)
        return jax.lax.psum(total, DATA_AXIS)

    return accumulated


def _batch_gradients(model: Sam, loss_config: LossSettings, accum: int, mesh) -> Callable:
    """`grads(trainable, frozen, buffers, scale, batch) -> (grads, metrics)` of scale x the global batch's
    loss: in one pass, or (accum > 1) as `accum` microbatches per device summed in a shard_map."""
    grads_and_metrics = _scaled_gradients(model, loss_config)
    if accum == 1:  # XLA splits the batch over the mesh and all-reduces the gradients itself
        return functools.partial(grads_and_metrics, parts=1)
    microbatches = accum * mesh.shape[DATA_AXIS]  # equal parts of the global batch
    accumulated = _accumulated_gradients(grads_and_metrics, accum, microbatches)

    def grads(trainable, frozen, buffers, scale, batch):
        rows = batch["image"].shape[0]
        if rows % microbatches:
            raise ValueError(f"grad_accum_steps {accum}: a batch of {rows} does not split into {accum} "
                             f"microbatches on each of the {mesh.shape[DATA_AXIS]} devices")
        # check_vma off: differentiating inside with respect to the replicated parameters would
        # otherwise psum each microbatch's gradients. Every output must go through the final psum.
        return jax.shard_map(
            accumulated, mesh=mesh, in_specs=(P(), P(), P(), P(), P(DATA_AXIS)), out_specs=P(), check_vma=False,
        )(trainable, frozen, buffers, scale, batch)

    return grads


def _all_finite(grads) -> jax.Array:
    """Whether every gradient is finite (a bool scalar): False after a float16 overflow."""
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))


def _apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads, frozen, finite: jax.Array,
                     use_loss_scale: bool) -> TrainState:
    """`state` one step on, updated with the (unscaled) gradients of its trainable parameters. With the
    float16 loss scale, non-finite grads keep the old params / moments and halve the scale."""
    grads = optimizer_lib.combine(grads, jax.tree.map(jnp.zeros_like, frozen))  # the optimiser zeroes those
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if use_loss_scale:
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        loss_scale = state.loss_scale.update(finite)
    else:
        loss_scale = state.loss_scale
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, loss_scale=loss_scale)


def _applied_learning_rate(schedule: Optional[optax.Schedule], state: TrainState) -> jax.Array:
    """The rate the update of `state` applies (0 without a schedule): the schedule follows the optimiser's
    own count, which a step skipped for float16 overflow does not advance (state.step does)."""
    counts = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")
    return jnp.asarray(schedule(counts[0][1] if counts else state.step) if schedule is not None else 0.0,
                       jnp.float32)


def make_train_step(
    model_config: ModelConfig,
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    mesh,
    schedule: Optional[optax.Schedule] = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted `train_step(state, batch) -> (state, metrics)`; `state` is donated.

    batch: global arrays from `to_global_batch`. metrics: replicated float32 scalars (loss terms,
    dice, grad_norm of the trainable parameters, lr, loss_scale, finite). The encoder's attention is
    `config.attention` (see `training_attention`).

    Only the trainable parameters (config.optim's) are differentiated: frozen parts (optim.frozen,
    e.g. the image encoder) enter as constants, so they get no weight gradients and, when no
    trainable parameter lies upstream of them, no backward pass and no activations kept for one.

    With `config.grad_accum_steps` k > 1 each device runs its rows as k microbatches in a `lax.scan`
    (in a `shard_map`), sums their gradients and all-reduces once: the same update as k = 1 (to
    float32 rounding) with about 1/k of the activation memory and one gradient all-reduce per step.
    """
    model = Sam(model_config, dtype=compute_dtype(config.precision), remat=config.remat,
                attention=training_attention(config))
    batch_gradients = _batch_gradients(model, loss_settings(config), int(config.grad_accum_steps), mesh)
    use_loss_scale = config.precision == "float16"

    def train_step(state: TrainState, batch: dict):
        scale = state.loss_scale.scale
        labels = optimizer_lib.trainable_labels(state.params, config.optim.trainable, config.optim.frozen)
        trainable, frozen = optimizer_lib.partition(state.params, labels)
        grads, metrics = batch_gradients(trainable, frozen, state.buffers, scale, batch)
        grads = jax.tree.map(lambda g: (g / scale).astype(jnp.float32), grads)
        # Non-finite grads (fp16 overflow) skip the update (_apply_gradients); other precisions never overflow.
        finite = _all_finite(grads) if use_loss_scale else jnp.asarray(True)
        grad_norm = optax.tree_utils.tree_norm(grads)
        new_state = _apply_gradients(tx, state, grads, frozen, finite, use_loss_scale)
        metrics = dict(metrics, grad_norm=grad_norm, lr=_applied_learning_rate(schedule, state), loss_scale=scale,
                       finite=finite.astype(jnp.float32))
        return new_state, metrics

    rep = replicated(mesh)
    return jax.jit(train_step, in_shardings=(rep, batch_sharding(mesh)), out_shardings=(rep, rep),
                   donate_argnums=(0,))


def make_eval_step(model_config: ModelConfig, config: ml_collections.ConfigDict, mesh) -> Callable:
    """The jitted `eval_step(variables, batch) -> {"<term>_sum", "count"}` (replicated scalars).

    batch additionally holds "weight" (B,): 1 for real rows, 0 for padding rows of a short last
    batch. Sums (not means) so the caller can average over a whole split exactly.
    """
    model = Sam(model_config, dtype=compute_dtype(config.precision), attention=training_attention(config))
    loss_config = loss_settings(config)

    def eval_step(variables, batch):
        mask_logits, iou_pred = model.apply(variables, batch["image"], batch_prompts(batch))
        terms = radsam_loss_per_sample(mask_logits, iou_pred, batch["target"], loss_config)
        w = batch["weight"]
        out = {f"{k}_sum": jnp.sum(v * w) for k, v in terms.items()}
        out["count"] = jnp.sum(w)
        return out

    rep = replicated(mesh)
    return jax.jit(eval_step, in_shardings=(rep, batch_sharding(mesh)), out_shardings=rep)
