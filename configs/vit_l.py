"""SAM ViT-L: 308 M encoder parameters; the paper reports +0.5 to +1 Dice over ViT-B."""

from radsam_jax.configs import vit_b


def get_config():
    c = vit_b.get_config()
    c.name = "vit_l"
    c.encoder_dim = 1024
    c.encoder_depth = 24
    c.encoder_heads = 16
    c.global_attn_indexes = (5, 11, 17, 23)
    return c
