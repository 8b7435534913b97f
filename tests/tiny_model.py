"""The tiny SAM-architecture model every test file shares: 64 px input (a 4 x 4 embedding grid,
16 x 16 mask logits), 2 ViT blocks of width 32 (the second global), a decoder of width 32."""

from radsam_jax.model import ModelConfig

# The widths, also the model.* overrides of the training tests (on the "small" preset, a name the
# training config's loader knows).
TINY_MODEL = dict(image_size=64, encoder_dim=32, encoder_depth=2, encoder_heads=2, window_size=2,
                  global_attn_indexes=(1,), prompt_embed_dim=32, decoder_heads=2, decoder_mlp_dim=64,
                  iou_head_hidden_dim=32)


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig(**{"name": "tiny", **TINY_MODEL, **overrides})
