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


def _softmax_attend_deferred(scores, v):
    """`_softmax_attend` on scores (g, rows, W, H, W) over the (H, W) key grid, with the division
    moved after the product with v: the (q, hd) output is divided by the row sums instead of the
    (q, k) scores, one pass less over the largest buffer (a ViT-B global attention on the 2-core
    CPU: 0.91 s -> 0.79 s). Max, exp and sums stay in the scores' grid shape, so XLA fuses them with
    the relative-position terms without a reshape between (0.88 s -> 0.80 s, and 1.44 s -> 1.07 s with
    XLA's own loops in place of YNNPACK's)."""
    g, keys = scores.shape[0], (-2, -1)
    scores = scores.astype(jnp.float32)
    unnormalized = jnp.exp(scores - jnp.max(scores, axis=keys, keepdims=True))
    sums = jnp.sum(unnormalized, axis=keys)
    flat = unnormalized.reshape(g, -1, v.shape[1]).astype(v.dtype)
    out = jnp.einsum("gqk,gkc->gqc", flat, v, preferred_element_type=jnp.float32)
    return (out / sums.reshape(g, -1, 1)).astype(v.dtype)


def attention_materialized(q, k, v, rel_h, rel_w, grid, scale):
    """The reference computation: all (H*W)^2 scores at once."""
    b, n, hw, hd = q.shape
    h, w = grid
    bias_h, bias_w = _rel_pos_bias(q.reshape(b, n, h, w, hd), rel_h, rel_w)
    scores = jnp.einsum("bnqc,bnkc->bnqk", q * scale, k).reshape(b, n, h, w, h, w)
    scores = scores + bias_h[..., :, None] + bias_w[..., None, :]
    return _softmax_attend(scores.reshape(b, n, hw, hw), v)


# The chunked path on CPUs keeps each step's float32 scores in cache: at most 1024 queries of one
# head (1024 x 4096 = 16 MiB for a ViT-B global block, within a 32 MiB L3; 5 windows x 196 queries x
# 196 keys = 0.8 MiB, within a 1 MiB L2), and everything at once when all the scores fit in 16 MiB.
# Against all heads per step, on the 2-core EPYC of benchmarks/results/cpu_vs_torch.md: a ViT-B
# global attention 2.1 s -> 1.0 s, a windowed one 0.24 s -> 0.14 s (batch 1).
CPU_QUERIES_PER_STEP = 1024
CPU_SCORES_AT_ONCE = 1024 * 4096


def _largest_divisor(n: int, fits) -> int:
    return max(d for d in range(1, n + 1) if n % d == 0 and (d == 1 or fits(d)))


def chunk_plan(batch: int, heads: int, grid: tuple[int, int], backend: str) -> tuple[int, int, int]:
    """(images, heads, query rows) computed per step by `attention_query_chunked`.

    CPUs: everything at once when all the scores fit in CPU_SCORES_AT_ONCE, else one head and at most
    CPU_QUERIES_PER_STEP queries (rows of the grid, then whole images or windows). Accelerators: every
    image and head at once (wide steps keep the device busy), in blocks of 16 query rows for grids
    above 32x32 (the 12 x 4096^2 scores of a ViT-B global block take 800 MB per image in float32).
    """
    h, w = grid
    if backend == "cpu":
        if batch * heads * (h * w) ** 2 <= CPU_SCORES_AT_ONCE:
            return batch, heads, h
        rows = _largest_divisor(h, lambda r: r * w <= CPU_QUERIES_PER_STEP)
        images = _largest_divisor(batch, lambda g: g * rows * w <= CPU_QUERIES_PER_STEP) if rows == h else 1
        return images, 1, rows
    return batch, heads, _largest_divisor(h, lambda r: r <= 16) if h > 32 else h


def attention_query_chunked(q, k, v, rel_h, rel_w, grid, scale, plan, recompute_in_backward=True):
    """Same result as `attention_materialized`, computed in steps of `plan` = (images, heads, rows)
    (see `chunk_plan`): a `lax.map` over groups of images x heads, and inside it over blocks of query
    rows, so only (images * heads, rows * W, H * W) scores live at once.

    `recompute_in_backward`: differentiating keeps only each step's inputs and recomputes its
    scores in the backward pass, so training also holds one step's scores at a time rather than all
    of them stacked by the map. A ViT-B global attention differentiated at batch 1 in float32 on the
    2-core CPU: 2.58 -> 0.09 GiB of temporaries and 3.4 -> 1.7 s, the recomputation costing less than
    the traffic of the stored scores (benchmarks/results/train_throughput.md). Forward-only
    computation is the same either way.
    """
    b, n, hw, hd = q.shape
    h, w = grid
    gi, gh, rows = plan
    if b % gi or n % gh or h % rows:
        raise ValueError(f"chunk plan {plan} does not divide batch {b}, heads {n}, grid rows {h}")
    chunks, g = h // rows, gi * gh

    def grouped(x):  # (b, n, hw, hd) -> (groups, g, hw, hd), a group = gi images x gh heads
        x = x.reshape(b // gi, gi, n // gh, gh, hw, hd).transpose(0, 2, 1, 3, 4, 5)
        return x.reshape(-1, g, hw, hd)

    def one_chunk(k_group, v_group, q_chunk, rel_h_chunk):  # (g, hw, hd) x2, (g, rows, w, hd), (rows, h, hd)
        bias_h, bias_w = _rel_pos_bias(q_chunk[None], rel_h_chunk, rel_w)
        scores = jnp.einsum("grwc,gkc->grwk", q_chunk * scale, k_group).reshape(g, rows, w, h, w)
        scores = scores + bias_h[0, ..., :, None] + bias_w[0, ..., None, :]
        return _softmax_attend_deferred(scores, v_group)

    if recompute_in_backward:
        one_chunk = jax.checkpoint(one_chunk)

    def one_group(args):
        q_group, k_group, v_group = args
        q_rows = q_group.reshape(g, chunks, rows, w, hd).transpose(1, 0, 2, 3, 4)
        if chunks == 1:
            out = one_chunk(k_group, v_group, q_rows[0], rel_h)[None]
        else:
            rel_h_rows = rel_h.reshape(chunks, rows, h, hd)
            out = jax.lax.map(lambda a: one_chunk(k_group, v_group, *a), (q_rows, rel_h_rows))
        return out.transpose(1, 0, 2, 3).reshape(g, hw, hd)  # (chunks, g, rows * w, hd) -> (g, hw, hd)

    groups = (grouped(q), grouped(k), grouped(v))
    out = one_group([x[0] for x in groups])[None] if groups[0].shape[0] == 1 else jax.lax.map(one_group, groups)
    out = out.reshape(b // gi, n // gh, gi, gh, hw, hd).transpose(0, 2, 1, 3, 4, 5)
    return out.reshape(b, n, hw, hd)


def fold_rel_pos_into_qk(q, k, rel_h, rel_w, grid, scale):
    """(q', k') with q'.k' = scale * q.k + bias_h[q, row(k)] + bias_w[q, col(k)].

    q' = [scale * q, bias_h(q), bias_w(q)] and k' = [k, onehot(row(k)), onehot(col(k))]: the head
    dim grows from hd to hd + H + W (192 for ViT-B's global blocks), zero-padded to a multiple of 8.
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
    return jnp.concatenate(q_aug, axis=-1), jnp.concatenate(k_aug, axis=-1)


def attention_fused(q, k, v, rel_h, rel_w, grid, scale):
    """Relative positions folded into the dot product (`fold_rel_pos_into_qk`), then one fused
    attention call, so a flash-attention kernel never materialises the scores. cuDNN runs it on GPUs
    in bfloat16/float16 (head dim <= 256 on Hopper); elsewhere XLA computes the same function.
    """
    hd = q.shape[-1]
    q_aug, k_aug = fold_rel_pos_into_qk(q, k, rel_h, rel_w, grid, scale)
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
    "chunked" steps through the scores as `chunk_plan` says for the current backend.
    """
    if implementation == "fused":
        return attention_fused(q, k, v, rel_h, rel_w, grid, scale)
    if implementation == "chunked":
        plan = chunk_plan(q.shape[0], q.shape[1], grid, jax.default_backend())
        return attention_query_chunked(q, k, v, rel_h, rel_w, grid, scale, plan)
    if implementation == "materialized":
        return attention_materialized(q, k, v, rel_h, rel_w, grid, scale)
    raise ValueError(f"unknown attention implementation {implementation!r}; choose from {ATTENTION_IMPLEMENTATIONS}")


class DenseParts(nn.Module):
    """`nn.Dense` (same parameters, initialisers and dtype promotion) returning x @ kernel and the bias
    apart, so the bias can be added after a zero padding."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.linear.default_kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))), bias


class Attention(nn.Module):
    """Multi-head attention over a (B, H, W, C) grid with fused qkv (`qkv`, `proj`); window > 0:
    within non-overlapping window x window tiles, the grid zero-padded at the bottom and right.

    The reference pads the block's input and projects every padded token. Projections are per token
    and a zero token projects to the qkv bias, so here the qkv product runs on the H x W tokens, is
    padded with zeros and gets its bias after the window partition (padded keys and values enter the
    edge windows exactly as in the reference); `proj` runs after the padding is cropped. For ViT-B at
    1024 that skips the 20 % of padded tokens (64 -> 70 per side) in both projections, and the zero
    padding and the bias fuse into the partition's copy.
    """

    num_heads: int
    input_size: tuple[int, int]
    window: int = 0
    attention: str = "chunked"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        hd = c // self.num_heads
        qkv, bias = DenseParts(3 * c, dtype=self.dtype, name="qkv")(x)
        if self.window > 0:
            pad_h, pad_w = window_padding(h, w, self.window)
            qkv = window_partition(jnp.pad(qkv, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))), self.window)
        qkv = qkv + bias
        n, gh, gw = qkv.shape[:3]
        qkv = qkv.reshape(n, gh * gw, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        size_h, size_w = self.input_size  # SAM's encoders all use relative positions (use_rel_pos=True)
        table_h = self.param("rel_pos_h", nn.initializers.zeros, (2 * size_h - 1, hd))
        table_w = self.param("rel_pos_w", nn.initializers.zeros, (2 * size_w - 1, hd))
        rel_h, rel_w = get_rel_pos(gh, gh, table_h), get_rel_pos(gw, gw, table_w)
        out = attention_with_rel_pos(q, k, v, rel_h, rel_w, (gh, gw), hd**-0.5, self.attention)
        out = out.reshape(n, self.num_heads, gh, gw, hd).transpose(0, 2, 3, 1, 4).reshape(n, gh, gw, c)
        if self.window > 0:
            out = window_unpartition(out, self.window, b, (h, w))
        return nn.Dense(c, dtype=self.dtype, name="proj")(out)


def window_padding(h: int, w: int, window: int) -> tuple[int, int]:
    """Rows and columns to add at the bottom and right so window x window tiles cover an H x W grid."""
    return (-h) % window, (-w) % window


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(B, Hp, Wp, C), Hp and Wp multiples of `window` -> (B * nH * nW, window, window, C)."""
    b, hp, wp, c = x.shape
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c)


def window_unpartition(windows: jax.Array, window: int, batch: int, size: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition` for B = `batch` images, cropped to `size` = (H, W)."""
    h, w = size
    pad_h, pad_w = window_padding(h, w, window)
    hp, wp, c = h + pad_h, w + pad_w, windows.shape[-1]
    x = windows.reshape(batch, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, hp, wp, c)[:, :h, :w, :]


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
        attn_size = (self.window_size, self.window_size) if self.window_size > 0 else self.grid_size
        y = layer_norm(ENCODER_LN_EPS, self.dtype, "norm1")(x)
        x = x + Attention(self.num_heads, attn_size, self.window_size, attention=self.attention, dtype=self.dtype, name="attn")(y)
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
