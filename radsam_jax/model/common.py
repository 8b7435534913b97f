"""Layers shared by the SAM model parts."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def gelu(x: jax.Array) -> jax.Array:
    # SAM uses PyTorch's exact (erf) GELU; jax.nn.gelu defaults to the tanh approximation.
    return jax.nn.gelu(x, approximate=False)


def layer_norm(eps: float, dtype: Dtype, name: str) -> nn.LayerNorm:
    """LayerNorm over the channel axis with PyTorch's two-pass variance.

    Flax's default `use_fast_variance` computes E[x^2] - E[x]^2, which loses precision against the
    reference; SAM's LayerNorm2d is the same operation on channels-last tensors.
    """
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class MLPBlock(nn.Module):
    """Linear -> activation -> linear (`lin1`, `lin2`), the transformer MLP."""

    hidden_dim: int
    out_dim: int
    activation: str = "gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="lin1")(x)
        x = gelu(x) if self.activation == "gelu" else nn.relu(x)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="lin2")(x)


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (`layers_0` ... `layers_{n-1}`)."""

    hidden_dim: int
    out_dim: int
    num_layers: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(self.out_dim if last else self.hidden_dim, dtype=self.dtype, name=f"layers_{i}")(x)
            if not last:
                x = nn.relu(x)
        return x
