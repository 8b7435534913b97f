"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

queries: (B, T, C) prompt and output tokens; keys: (B, h*w, C) image tokens. `token_valid` (B, T)
switches tokens off as attention keys (the static-shape prompt slots that SAM would not have built).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from radsam_jax.model.common import MLPBlock, layer_norm

Dtype = Any
DECODER_LN_EPS = 1e-5  # plain torch.nn.LayerNorm in the reference


class Attention(nn.Module):
    """Attention with q/k/v projections to embed_dim // downsample_rate (`q_proj`...`out_proj`)."""

    embed_dim: int
    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, q, k, v, key_valid: Optional[jax.Array] = None):
        inner = self.embed_dim // self.downsample_rate
        hd = inner // self.num_heads

        def heads(x, name):
            x = nn.Dense(inner, dtype=self.dtype, name=name)(x)
            return x.reshape(x.shape[0], x.shape[1], self.num_heads, hd)

        q, k, v = heads(q, "q_proj"), heads(k, "k_proj"), heads(v, "v_proj")
        scores = jnp.einsum("bqnc,bknc->bnqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(hd))
        if key_valid is not None:
            scores = jnp.where(key_valid[:, None, None, :], scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnqk,bknc->bqnc", probs, v).reshape(q.shape[0], q.shape[1], inner)
        return nn.Dense(self.embed_dim, dtype=self.dtype, name="out_proj")(out)


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, token->image, MLP, image->token; post-norm after each."""

    embed_dim: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int
    skip_first_layer_pe: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe, token_valid):
        attn = lambda rate, name: Attention(self.embed_dim, self.num_heads, rate, self.dtype, name=name)
        if self.skip_first_layer_pe:
            queries = attn(1, "self_attn")(queries, queries, queries, token_valid)
        else:
            q = queries + query_pe
            queries = queries + attn(1, "self_attn")(q, q, queries, token_valid)
        queries = layer_norm(DECODER_LN_EPS, self.dtype, "norm1")(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = queries + attn(self.downsample_rate, "cross_attn_token_to_image")(q, k, keys)
        queries = layer_norm(DECODER_LN_EPS, self.dtype, "norm2")(queries)

        queries = queries + MLPBlock(self.mlp_dim, self.embed_dim, "relu", self.dtype, name="mlp")(queries)
        queries = layer_norm(DECODER_LN_EPS, self.dtype, "norm3")(queries)

        q, k = queries + query_pe, keys + key_pe
        # Image tokens query the prompt tokens: q = image, k = tokens, v = tokens.
        keys = keys + attn(self.downsample_rate, "cross_attn_image_to_token")(k, q, queries, token_valid)
        keys = layer_norm(DECODER_LN_EPS, self.dtype, "norm4")(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    depth: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embedding, image_pe, point_embedding, token_valid):
        """image_embedding, image_pe: (B, h*w, C); point_embedding: (B, T, C) -> (tokens, image tokens)."""
        queries, keys = point_embedding, image_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.embed_dim, self.num_heads, self.mlp_dim, self.downsample_rate,
                skip_first_layer_pe=(i == 0), dtype=self.dtype, name=f"layers_{i}",
            )(queries, keys, point_embedding, image_pe, token_valid)
        q, k = queries + point_embedding, keys + image_pe
        attn_out = Attention(self.embed_dim, self.num_heads, self.downsample_rate, self.dtype, name="final_attn_token_to_image")(q, k, keys)
        queries = layer_norm(DECODER_LN_EPS, self.dtype, "norm_final_attn")(queries + attn_out)
        return queries, keys
