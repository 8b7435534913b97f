"""SAM's ViT image encoder: windowed/global attention with decomposed relative positions, and neck.

Shapes: images (B, S, S, 3) -> patch tokens (B, S/16, S/16, dim) -> embeddings (B, S/16, S/16, out_dim).
Parameter names follow `segment_anything.modeling.image_encoder` so the key map stays a short table.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from radsam_jax.model.common import MLPBlock, layer_norm

Dtype = Any
ENCODER_LN_EPS = 1e-6


def get_rel_pos(q_size: int, k_size: int, table: jax.Array) -> jax.Array:
    """Relative-position embeddings (q_size, k_size, C) gathered from a (L, C) table.

    A table whose length is not 2 * max(q_size, k_size) - 1 is first resized along L by linear
    interpolation with half-pixel centres and no antialiasing, as PyTorch's F.interpolate does.
    """
    max_dist = 2 * max(q_size, k_size) - 1
    if table.shape[0] != max_dist:
        table = jax.image.resize(table, (max_dist, table.shape[1]), "linear", antialias=False)
    q_coords = jnp.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = jnp.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[relative.astype(jnp.int32)]


def _rel_pos_bias(q_grid, rel_h, rel_w):
    """Decomposed relative-position terms from the *unscaled* q, as the reference computes them."""
    bias_h = jnp.einsum("bnhwc,hkc->bnhwk", q_grid, rel_h.astype(q_grid.dtype))
    bias_w = jnp.einsum("bnhwc,wkc->bnhwk", q_grid, rel_w.astype(q_grid.dtype))
    return bias_h, bias_w


def _softmax_attend(scores, v):
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bnkc->bnqc", probs, v)


def attention_materialized(q, k, v, rel_h, rel_w, grid, scale):
    """The reference computation: all (H*W)^2 scores at once."""
    b, n, hw, hd = q.shape
    h, w = grid
    bias_h, bias_w = _rel_pos_bias(q.reshape(b, n, h, w, hd), rel_h, rel_w)
    scores = jnp.einsum("bnqc,bnkc->bnqk", q * scale, k).reshape(b, n, h, w, h, w)
    scores = scores + bias_h[..., :, None] + bias_w[..., None, :]
    return _softmax_attend(scores.reshape(b, n, hw, hw), v)


def attention_query_chunked(q, k, v, rel_h, rel_w, grid, scale, rows_per_chunk):
    """Same result, computed over blocks of query rows so only (chunk, H*W) scores live at once.

    For ViT-B's global blocks at 1024 this bounds the score buffer at (12, rows*64, 4096) instead of
    (12, 4096, 4096) per image, which keeps the softmax in cache and memory flat for large batches.
    """
    b, n, hw, hd = q.shape
    h, w = grid
    chunks = h // rows_per_chunk
    q_rows = q.reshape(b, n, chunks, rows_per_chunk, w, hd).transpose(2, 0, 1, 3, 4, 5)
    rel_h_rows = rel_h.reshape(chunks, rows_per_chunk, h, hd)

    def one_chunk(args):
        q_chunk, rel_h_chunk = args  # (b, n, rows, w, hd), (rows, h, hd)
        bias_h, bias_w = _rel_pos_bias(q_chunk, rel_h_chunk, rel_w)
        scores = jnp.einsum("bnrwc,bnkc->bnrwk", q_chunk * scale, k).reshape(b, n, rows_per_chunk, w, h, w)
        scores = scores + bias_h[..., :, None] + bias_w[..., None, :]
        return _softmax_attend(scores.reshape(b, n, rows_per_chunk * w, hw), v)

    out = jax.lax.map(one_chunk, (q_rows, rel_h_rows))  # (chunks, b, n, rows * w, hd)
    return out.transpose(1, 2, 0, 3, 4).reshape(b, n, hw, hd)


def attention_fused(q, k, v, rel_h, rel_w, grid, scale):
    """Relative positions folded into the dot product, then one fused attention call.

    scale * q.k + bias_h[q, row(k)] + bias_w[q, col(k)] equals q'.k' with q' = [scale * q, bias_h(q),
    bias_w(q)] and k' = [k, onehot(row(k)), onehot(col(k))], so a flash-attention kernel never
    materialises the scores. The head dim grows from hd to hd + H + W (192 for ViT-B's global blocks,
    within cuDNN's 256 on Hopper), padded to a multiple of 8. cuDNN runs it on GPUs in bfloat16/float16;
    elsewhere XLA computes the same function.
    """
    b, n, hw, hd = q.shape
    h, w = grid
    bias_h, bias_w = _rel_pos_bias(q.reshape(b, n, h, w, hd), rel_h, rel_w)
    rows = jnp.repeat(jnp.eye(h, dtype=k.dtype), w, axis=0)  # (hw, h): one-hot row of each key
    cols = jnp.tile(jnp.eye(w, dtype=k.dtype), (h, 1))  # (hw, w): one-hot column of each key
    pad = (-(hd + h + w)) % 8
    q_aug = [q * scale, bias_h.reshape(b, n, hw, h), bias_w.reshape(b, n, hw, w)]
    k_aug = [k, jnp.broadcast_to(rows, (b, n, hw, h)), jnp.broadcast_to(cols, (b, n, hw, w))]
    if pad:
        q_aug.append(jnp.zeros((b, n, hw, pad), q.dtype))
        k_aug.append(jnp.zeros((b, n, hw, pad), k.dtype))
    q_aug, k_aug = jnp.concatenate(q_aug, axis=-1), jnp.concatenate(k_aug, axis=-1)
    dim = q_aug.shape[-1]
    v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, dim - hd)))  # equal head dims for every kernel
    on_cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    to_btnh = lambda x: x.transpose(0, 2, 1, 3)
    out = jax.nn.dot_product_attention(
        to_btnh(q_aug), to_btnh(k_aug), to_btnh(v_pad), scale=1.0, implementation="cudnn" if on_cudnn else None
    )
    return to_btnh(out)[..., :hd]


ATTENTION_IMPLEMENTATIONS = ("materialized", "chunked", "fused")


def resolve_attention(name: str, dtype, backend: str | None = None) -> str:
    """"auto" -> the fastest measured path: "fused" (cuDNN) on GPUs in bf16/fp16, else "chunked".

    On an H100 the cuDNN path runs a ViT-B global block in 0.49 ms per slice against 1.36 ms
    materialised (benchmarks/results/gpu_h100_encoder.md); cuDNN has no float32 kernel, and on CPUs
    the chunked path keeps the score buffer in cache.
    """
    if name != "auto":
        if name not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {name!r}; choose from auto, {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        return name
    backend = backend or jax.default_backend()
    return "fused" if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "chunked"


def attention_with_rel_pos(q, k, v, rel_h, rel_w, grid, scale, implementation="chunked"):
    """Softmax attention whose scores carry SAM's decomposed relative-position terms.

    q, k, v: (B, heads, H*W, hd); rel_h: (H, H, hd), rel_w: (W, W, hd); grid = (H, W).
    `implementation` picks how (see ATTENTION_IMPLEMENTATIONS); all compute the same function.
    "chunked" only chunks grids larger than 32x32 (global attention at 1024); smaller score
    matrices, such as the 14x14 windows', are cheap to materialise.
    """
    h, _ = grid
    if implementation == "fused":
        return attention_fused(q, k, v, rel_h, rel_w, grid, scale)
    if implementation == "chunked" and h > 32:
        rows = max(r for r in (16, 8, 4, 2, 1) if h % r == 0)
        return attention_query_chunked(q, k, v, rel_h, rel_w, grid, scale, rows)
    if implementation in ("materialized", "chunked"):
        return attention_materialized(q, k, v, rel_h, rel_w, grid, scale)
    raise ValueError(f"unknown attention implementation {implementation!r}; choose from {ATTENTION_IMPLEMENTATIONS}")


class Attention(nn.Module):
    """Multi-head attention over a (B, H, W, C) grid with fused qkv (`qkv`, `proj`)."""

    num_heads: int
    input_size: tuple[int, int]
    use_rel_pos: bool = True
    attention: str = "chunked"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        hd = c // self.num_heads
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.use_rel_pos:
            size_h, size_w = self.input_size
            table_h = self.param("rel_pos_h", nn.initializers.zeros, (2 * size_h - 1, hd))
            table_w = self.param("rel_pos_w", nn.initializers.zeros, (2 * size_w - 1, hd))
            rel_h, rel_w = get_rel_pos(h, h, table_h), get_rel_pos(w, w, table_w)
        else:
            rel_h = jnp.zeros((h, h, hd), q.dtype)
            rel_w = jnp.zeros((w, w, hd), q.dtype)
        out = attention_with_rel_pos(q, k, v, rel_h, rel_w, (h, w), hd**-0.5, self.attention)
        out = out.reshape(b, self.num_heads, h, w, hd).transpose(0, 2, 3, 1, 4).reshape(b, h, w, c)
        return nn.Dense(c, dtype=self.dtype, name="proj")(out)


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """(B, H, W, C) -> (B * nH * nW, window, window, C), zero-padding bottom and right."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, padded: tuple[int, int], size: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`, cropping the padding away."""
    hp, wp = padded
    h, w = size
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)[:, :h, :w, :]


class Block(nn.Module):
    """Pre-norm transformer block; window_size 0 means global attention."""

    num_heads: int
    mlp_ratio: float
    window_size: int
    grid_size: tuple[int, int]
    attention: str = "chunked"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        shortcut = x
        x = layer_norm(ENCODER_LN_EPS, self.dtype, "norm1")(x)
        attn_size = (self.window_size, self.window_size) if self.window_size > 0 else self.grid_size
        attn = Attention(self.num_heads, attn_size, attention=self.attention, dtype=self.dtype, name="attn")
        if self.window_size > 0:
            h, w = x.shape[1:3]
            windows, padded = window_partition(x, self.window_size)
            x = window_unpartition(attn(windows), self.window_size, padded, (h, w))
        else:
            x = attn(x)
        x = shortcut + x
        y = layer_norm(ENCODER_LN_EPS, self.dtype, "norm2")(x)
        return x + MLPBlock(int(c * self.mlp_ratio), c, "gelu", self.dtype, name="mlp")(y)


class ImageEncoderViT(nn.Module):
    """Patch embedding + absolute positions + ViT blocks + neck (1x1 conv, LN, 3x3 conv, LN)."""

    image_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    out_chans: int
    window_size: int
    global_attn_indexes: Sequence[int]
    remat: bool = False
    attention: str = "chunked"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        grid = self.image_size // self.patch_size
        x = nn.Conv(
            self.embed_dim,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dtype=self.dtype,
            name="patch_embed",
        )(images.astype(self.dtype))
        pos_embed = self.param("pos_embed", nn.initializers.zeros, (1, grid, grid, self.embed_dim))
        x = x + pos_embed.astype(x.dtype)
        block_cls = nn.remat(Block) if self.remat else Block
        for i in range(self.depth):
            window = 0 if i in self.global_attn_indexes else self.window_size
            x = block_cls(self.num_heads, self.mlp_ratio, window, (grid, grid), self.attention, self.dtype, name=f"blocks_{i}")(x)
        x = nn.Conv(self.out_chans, (1, 1), use_bias=False, dtype=self.dtype, name="neck_conv1")(x)
        x = layer_norm(ENCODER_LN_EPS, self.dtype, "neck_norm1")(x)
        x = nn.Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype, name="neck_conv2")(x)
        return layer_norm(ENCODER_LN_EPS, self.dtype, "neck_norm2")(x)
