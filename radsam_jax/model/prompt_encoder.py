"""SAM's prompt encoder over RadSAM's static-shape prompts.

Sparse tokens: N point slots + 2 extra slots. With a box the extra slots hold its two corners; without
one the first holds SAM's padding point (0, 0) with label -1 (when there are points) and the second is
switched off. Point slots labelled -1 are padding and switched off, so each prompt combination yields
exactly the tokens that `segment_anything` builds for it, whatever N the slots are padded to; the
decoder masks switched-off tokens out of attention, which makes them contribute nothing.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from radsam_jax.model.common import gelu, layer_norm
from radsam_jax.prompts import Prompts

Dtype = Any


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier features of coordinates in [0, 1]; the Gaussian matrix is a fixed buffer."""

    num_pos_feats: int

    def setup(self):
        self.gaussian = self.variable(
            "buffers",
            "positional_encoding_gaussian_matrix",
            lambda: jax.random.normal(self.make_rng("params"), (2, self.num_pos_feats)),
        )

    def encode(self, coords: jax.Array) -> jax.Array:
        coords = (2.0 * coords - 1.0) @ self.gaussian.value
        coords = 2.0 * math.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def dense(self, size: tuple[int, int]) -> jax.Array:
        """(h, w, 2 * num_pos_feats) encoding of pixel centres, stacked as [x, y]."""
        h, w = size
        y = (jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5) / h
        x = (jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5) / w
        grid = jnp.stack([jnp.broadcast_to(x, (h, w)), jnp.broadcast_to(y, (h, w))], axis=-1)
        return self.encode(grid)

    def points(self, coords: jax.Array, image_size: int) -> jax.Array:
        """Encode (..., 2) pixel coordinates (x, y) of a square input of side `image_size`."""
        return self.encode(coords / image_size)


def _fan_in_uniform(fan_in: int):
    """PyTorch's default bias initialisation: uniform in +-1/sqrt(fan_in)."""
    bound = fan_in ** -0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class PromptEncoder(nn.Module):
    """Embeds points, box and mask prompts: returns (sparse (B, N+2, C), valid (B, N+2), dense (B, h, w, C))."""

    embed_dim: int
    image_size: int
    embedding_size: int
    mask_in_chans: int
    dtype: Dtype = jnp.float32

    def setup(self):
        normal = nn.initializers.normal(1.0)  # nn.Embedding's default initialisation
        self.pe_layer = PositionEmbeddingRandom(self.embed_dim // 2)
        self.point_embeddings = self.param("point_embeddings", normal, (4, self.embed_dim))
        self.not_a_point_embed = self.param("not_a_point_embed", normal, (self.embed_dim,))
        self.no_mask_embed = self.param("no_mask_embed", normal, (self.embed_dim,))
        # Biases start as nn.Conv2d's, uniform in +-1/sqrt(fan in), not Flax's zeros: with zero biases
        # an empty mask's features are all 0, and the LayerNorm after them (eps 1e-6) multiplies the
        # first gradients of a model trained from scratch by ~1000 in mask_conv1's bias.
        c = self.mask_in_chans
        self.mask_conv1 = nn.Conv(c // 4, (2, 2), strides=(2, 2), padding="VALID", bias_init=_fan_in_uniform(4),
                                  name="mask_conv1")
        self.mask_norm1 = layer_norm(1e-6, jnp.float32, "mask_norm1")
        self.mask_conv2 = nn.Conv(c, (2, 2), strides=(2, 2), padding="VALID", bias_init=_fan_in_uniform(4 * (c // 4)),
                                  name="mask_conv2")
        self.mask_norm2 = layer_norm(1e-6, jnp.float32, "mask_norm2")
        self.mask_conv3 = nn.Conv(self.embed_dim, (1, 1), bias_init=_fan_in_uniform(c), name="mask_conv3")

    def dense_pe(self) -> jax.Array:
        """(h, w, C) positional encoding of the image-embedding grid."""
        return self.pe_layer.dense((self.embedding_size, self.embedding_size))

    def embed_mask(self, mask: jax.Array) -> jax.Array:
        x = mask[..., None].astype(jnp.float32)
        x = gelu(self.mask_norm1(self.mask_conv1(x)))
        x = gelu(self.mask_norm2(self.mask_conv2(x)))
        return self.mask_conv3(x)

    def __call__(self, prompts: Prompts) -> tuple[jax.Array, jax.Array, jax.Array]:
        labels = prompts.point_labels
        b = labels.shape[0]
        has_points = jnp.any(labels != -1, axis=1)
        has_box = prompts.has_box.astype(bool)
        has_mask = prompts.has_mask.astype(bool)

        # Points: PE of pixel centres; label -1 -> PE dropped + not-a-point; 0/1 -> + learned type embedding.
        point_pe = self.pe_layer.points(prompts.points.astype(jnp.float32) + 0.5, self.image_size)
        lab = labels[..., None]
        point_tokens = jnp.where(lab == -1, self.not_a_point_embed, point_pe)
        point_tokens = point_tokens + jnp.where(lab == 0, self.point_embeddings[0], 0.0)
        point_tokens = point_tokens + jnp.where(lab == 1, self.point_embeddings[1], 0.0)

        corners = self.pe_layer.points(prompts.box.astype(jnp.float32).reshape(b, 2, 2) + 0.5, self.image_size)
        corner0 = corners[:, 0] + self.point_embeddings[2]
        corner1 = corners[:, 1] + self.point_embeddings[3]
        pad_token = jnp.broadcast_to(self.not_a_point_embed, (b, self.embed_dim))
        slot0 = jnp.where(has_box[:, None], corner0, pad_token)
        sparse = jnp.concatenate([point_tokens, slot0[:, None], corner1[:, None]], axis=1)
        valid = jnp.concatenate(
            [
                labels != -1,
                (has_points | has_box)[:, None],
                has_box[:, None],
            ],
            axis=1,
        )

        h = self.embedding_size
        no_mask = jnp.broadcast_to(self.no_mask_embed, (b, h, h, self.embed_dim))
        dense = jnp.where(has_mask[:, None, None, None], self.embed_mask(prompts.mask), no_mask)
        return sparse.astype(self.dtype), valid, dense.astype(self.dtype)
