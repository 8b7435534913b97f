"""SAM ViT-H: 637 M encoder parameters."""

from radsam_jax.configs import vit_b


def get_config():
    c = vit_b.get_config()
    c.name = "vit_h"
    c.encoder_dim = 1280
    c.encoder_depth = 32
    c.encoder_heads = 16
    c.global_attn_indexes = (7, 15, 23, 31)
    return c
