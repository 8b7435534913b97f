"""A small RadSAM that trains on a laptop CPU: 256x256 input, 6-block ViT of width 192, 128-wide decoder.

About 3.8 M parameters (15 MB in float32), so it ships inside the repository.
"""

from radsam_jax.configs import vit_b


def get_config():
    c = vit_b.get_config()
    c.name = "small"
    c.image_size = 256  # embeddings 16x16, mask logits 64x64
    c.encoder_dim = 192
    c.encoder_depth = 6
    c.encoder_heads = 3
    c.window_size = 8  # 2x2 windows over the 16x16 grid
    c.global_attn_indexes = (2, 5)
    c.prompt_embed_dim = 128
    c.decoder_heads = 8
    c.decoder_mlp_dim = 512
    c.iou_head_hidden_dim = 128
    return c
