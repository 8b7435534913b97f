"""The train state: everything a resumed run needs besides the data iterator's position."""

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class DynamicLossScale:
    """float16 training's dynamic loss scale, carried in the train state (so it is checkpointed).

    The loss is multiplied by `scale` before differentiation and the grads divided by it after, so
    small float16 gradients do not underflow. After `period` consecutive finite steps the scale
    doubles; on a non-finite gradient it halves (not below 1) and the update is skipped.
    With float32 / bfloat16 the scale stays 1 and `period` is irrelevant.
    """

    scale: jax.Array  # float32 scalar
    good_steps: jax.Array  # int32 scalar: finite steps since the last change
    period: int = flax.struct.field(pytree_node=False, default=2000)
    factor: float = flax.struct.field(pytree_node=False, default=2.0)

    @classmethod
    def create(cls, initial_scale: float = 1.0, period: int = 2000, factor: float = 2.0) -> "DynamicLossScale":
        return cls(jnp.asarray(initial_scale, jnp.float32), jnp.asarray(0, jnp.int32), period, factor)

    def update(self, grads_finite: jax.Array) -> "DynamicLossScale":
        grown = self.good_steps + 1 >= self.period
        scale = jnp.where(
            grads_finite,
            jnp.where(grown, self.scale * self.factor, self.scale),
            jnp.maximum(self.scale / self.factor, 1.0),
        )
        good = jnp.where(grads_finite & ~grown, self.good_steps + 1, 0)
        return self.replace(scale=scale.astype(jnp.float32), good_steps=good.astype(jnp.int32))


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps done (skipped fp16 steps count too)
    params: dict  # trained (or frozen by regex) parameters
    buffers: dict  # fixed random-Fourier matrix etc.: never differentiated, never updated
    opt_state: optax.OptState
    rng: jax.Array  # uint32[2] raw PRNG key; per-step keys are fold_in(rng, step)
    loss_scale: DynamicLossScale

    @property
    def variables(self) -> dict:
        return {"params": self.params, "buffers": self.buffers}
