"""The assembled model: `Sam` (Flax module) and `RadSam` (config + variables + jitted entry points).

Variables are a plain pytree {"params": ..., "buffers": ...}; "buffers" holds the fixed random-Fourier
matrix of the prompt encoder, which is loaded from checkpoints and never trained.
"""

from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from radsam_jax.model.config import ModelConfig
from radsam_jax.model.image_encoder import ImageEncoderViT, resolve_attention
from radsam_jax.model.mask_decoder import MaskDecoder
from radsam_jax.model.prompt_encoder import PromptEncoder
from radsam_jax.prompts import Prompts, make_prompts

Dtype = Any
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_compute_dtype(dtype, what: str = "dtype"):
    """`dtype` as a jnp.dtype if it is a supported compute dtype (float32, bfloat16, float16), else a
    ValueError naming `what` and the value (before anything is loaded or traced)."""
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        d = None
    if d is None or d.name not in COMPUTE_DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
    return d


class Sam(nn.Module):
    config: ModelConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "chunked"  # global-attention implementation, see image_encoder.ATTENTION_IMPLEMENTATIONS

    def setup(self):
        c = self.config
        self.image_encoder = ImageEncoderViT(
            image_size=c.image_size, patch_size=c.patch_size, embed_dim=c.encoder_dim,
            depth=c.encoder_depth, num_heads=c.encoder_heads, mlp_ratio=c.encoder_mlp_ratio,
            out_chans=c.prompt_embed_dim, window_size=c.window_size,
            global_attn_indexes=tuple(c.global_attn_indexes), remat=self.remat,
            attention=self.attention, dtype=self.dtype,
        )
        self.prompt_encoder = PromptEncoder(
            embed_dim=c.prompt_embed_dim, image_size=c.image_size, embedding_size=c.embedding_size,
            mask_in_chans=c.mask_in_chans, dtype=self.dtype,
        )
        self.mask_decoder = MaskDecoder(
            embed_dim=c.prompt_embed_dim, num_multimask_outputs=c.num_multimask_outputs,
            transformer_depth=c.decoder_depth, transformer_heads=c.decoder_heads,
            transformer_mlp_dim=c.decoder_mlp_dim, iou_head_depth=c.iou_head_depth,
            iou_head_hidden_dim=c.iou_head_hidden_dim, dtype=self.dtype,
        )

    def encode(self, images: jax.Array) -> jax.Array:
        """(B, S, S, 3) preprocessed images -> (B, S/16, S/16, C) embeddings."""
        return self.image_encoder(images)

    def decode(self, embeddings: jax.Array, prompts: Prompts) -> tuple[jax.Array, jax.Array]:
        """(B, S/16, S/16, C) embeddings + prompts -> mask logits (B, 4, S/4, S/4), IoU (B, 4)."""
        sparse, valid, dense = self.prompt_encoder(prompts)
        image_pe = self.prompt_encoder.dense_pe().astype(self.dtype)
        return self.mask_decoder(embeddings.astype(self.dtype), image_pe, sparse, valid, dense)

    def __call__(self, images: jax.Array, prompts: Prompts) -> tuple[jax.Array, jax.Array]:
        return self.decode(self.encode(images), prompts)


def example_inputs(config: ModelConfig, batch_size: int = 1, num_points: int = 1) -> tuple[jax.Array, Prompts]:
    images = jnp.zeros((batch_size, config.image_size, config.image_size, 3), jnp.float32)
    return images, make_prompts(batch_size, config.mask_size, num_points=num_points)


def init_variables(config: ModelConfig, rng: jax.Array) -> dict:
    """Freshly initialised variables {"params", "buffers"} for training from scratch."""
    images, prompts = example_inputs(config)
    return Sam(config).init(rng, images, prompts)


def abstract_variables(config: ModelConfig) -> dict:
    """Shapes and dtypes of every variable, without allocating them (the conversion target)."""
    return jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))


@partial(jax.jit, static_argnames=("config", "dtype", "attention"))
def encode_images(variables, images, *, config, dtype, attention):
    """(B, S, S, 3) model input -> (B, e, e, C) image embeddings; one compiled encoder per batch shape
    for the whole process (RadSam.encode_image, VolumePredictor, the benchmarks)."""
    return Sam(config, dtype, attention=attention).apply(variables, images, method=Sam.encode)


@partial(jax.jit, static_argnames=("config", "dtype"))
def _decode(variables, embeddings, prompts, *, config, dtype):
    return Sam(config, dtype).apply(variables, embeddings, prompts, method=Sam.decode)


class RadSam:
    """A model ready to run: architecture config, variables and jitted encode/decode.

    `dtype` is the compute dtype (COMPUTE_DTYPES: float32, bfloat16, float16); parameters stay float32. `attention` picks the
    encoder's attention implementation; "auto" resolves to cuDNN "fused" on GPUs in bf16, else "chunked".
    """

    def __init__(self, config: ModelConfig, variables: dict, dtype: Dtype = jnp.float32, metadata: Optional[dict] = None,
                 attention: str = "auto"):
        self.config = config
        self.variables = variables
        self.dtype = check_compute_dtype(dtype)
        self.metadata = dict(metadata or {})
        self.requested_attention = attention  # kept so with_options re-resolves "auto" for a new dtype
        self.attention = resolve_attention(attention, self.dtype)

    @property
    def params(self) -> dict:
        return self.variables["params"]

    def with_options(self, dtype: Optional[Dtype] = None, attention: Optional[str] = None) -> "RadSam":
        """The same weights with another compute dtype or attention implementation."""
        return RadSam(self.config, self.variables, dtype or self.dtype, self.metadata,
                      attention or self.requested_attention)

    def encode_image(self, images) -> jax.Array:
        """images float32 (B, S, S, 3), already preprocessed -> embeddings (B, S/16, S/16, C)."""
        images = jnp.asarray(images, jnp.float32)
        s = self.config.image_size
        if images.ndim != 4 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"images must have shape (B, {s}, {s}, 3), got {tuple(images.shape)}")
        return encode_images(self.variables, images, config=self.config, dtype=self.dtype, attention=self.attention)

    def decode(self, embeddings, prompts: Prompts) -> tuple[jax.Array, jax.Array]:
        """Jitted decoder on a ready `Prompts` batch (see `predict` for the plain-array form)."""
        return _decode(self.variables, embeddings, prompts, config=self.config, dtype=self.dtype)

    def predict(self, embeddings, points=None, point_labels=None, box=None, mask=None) -> tuple[jax.Array, jax.Array]:
        """Mask logits (B, 4, S/4, S/4) and IoU predictions (B, 4) from plain prompt arrays.

        points (B, N, 2) as (x, y) in input pixels, point_labels (B, N) with 1 / 0 / -1 (padding),
        box (B, 4) as x0, y0, x1, y1, mask (B, S/4, S/4) binary (logits for SAM-family weights:
        ModelConfig.mask_prompt). Index 0 is the primary mask.
        """
        e = self.config.embedding_size
        embeddings = jnp.asarray(embeddings)
        if embeddings.ndim != 4 or embeddings.shape[1:] != (e, e, self.config.prompt_embed_dim):
            raise ValueError(f"embeddings must have shape (B, {e}, {e}, {self.config.prompt_embed_dim}), got {tuple(embeddings.shape)}")
        prompts = make_prompts(embeddings.shape[0], self.config.mask_size, points, point_labels, box, mask)
        return self.decode(embeddings, prompts)

    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.variables["params"])))
