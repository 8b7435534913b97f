"""SAM's mask decoder, returning all 4 masks: index 0 the single-mask token, 1-3 the multimask ones.

RadSAM keeps all four: mask 0 is the primary prediction, masks 1-3 the secondary ones (oracle).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from radsam_jax.model.common import MLP, gelu, layer_norm
from radsam_jax.model.two_way_transformer import TwoWayTransformer

Dtype = Any


class MaskDecoder(nn.Module):
    embed_dim: int
    num_multimask_outputs: int = 3
    transformer_depth: int = 2
    transformer_heads: int = 8
    transformer_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embeddings, image_pe, sparse, token_valid, dense):
        """image_embeddings, dense: (B, h, w, C); image_pe: (h, w, C); sparse: (B, T, C); token_valid: (B, T).

        Returns mask logits (B, M, 4h, 4w) and IoU predictions (B, M), M = num_multimask_outputs + 1.
        """
        c = self.embed_dim
        num_masks = self.num_multimask_outputs + 1
        normal = nn.initializers.normal(1.0)
        iou_token = self.param("iou_token", normal, (1, c))
        mask_tokens = self.param("mask_tokens", normal, (num_masks, c))
        b, h, w, _ = image_embeddings.shape

        output_tokens = jnp.broadcast_to(jnp.concatenate([iou_token, mask_tokens]), (b, 1 + num_masks, c))
        tokens = jnp.concatenate([output_tokens.astype(sparse.dtype), sparse], axis=1)
        valid = jnp.concatenate([jnp.ones((b, 1 + num_masks), bool), token_valid], axis=1)

        src = (image_embeddings + dense).reshape(b, h * w, c)
        pos = jnp.broadcast_to(image_pe.reshape(1, h * w, c), (b, h * w, c)).astype(src.dtype)
        hs, src = TwoWayTransformer(
            self.transformer_depth, c, self.transformer_heads, self.transformer_mlp_dim,
            self.attention_downsample_rate, self.dtype, name="transformer",
        )(src, pos, tokens, valid)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + num_masks]

        # Upscale x4 with transposed convs; kernels stored (kh, kw, out, in) as transpose_kernel expects.
        up = lambda feats, name: nn.ConvTranspose(feats, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True, dtype=self.dtype, name=name)
        x = src.reshape(b, h, w, c)
        x = gelu(layer_norm(1e-6, self.dtype, "upscale_norm")(up(c // 4, "upscale_conv1")(x)))
        x = gelu(up(c // 8, "upscale_conv2")(x))

        hyper_in = jnp.stack(
            [MLP(c, c // 8, 3, self.dtype, name=f"output_hypernetworks_mlps_{i}")(mask_tokens_out[:, i]) for i in range(num_masks)],
            axis=1,
        )
        masks = jnp.einsum("bmc,bhwc->bmhw", hyper_in, x)
        iou_pred = MLP(self.iou_head_hidden_dim, num_masks, self.iou_head_depth, self.dtype, name="iou_prediction_head")(iou_token_out)
        return masks.astype(jnp.float32), iou_pred.astype(jnp.float32)
