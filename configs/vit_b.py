"""SAM ViT-B (the paper's main model): 89.7 M encoder parameters, 1024x1024 input."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "vit_b"
    c.image_size = 1024  # model input side S; embeddings are S/16, mask logits and mask prompt S/4
    c.patch_size = 16  # ViT patch side (pixels)
    c.encoder_dim = 768  # ViT width
    c.encoder_depth = 12  # number of ViT blocks
    c.encoder_heads = 12  # attention heads per block
    c.encoder_mlp_ratio = 4.0  # MLP width / ViT width
    c.window_size = 14  # side of the local attention windows (tokens)
    c.global_attn_indexes = (2, 5, 8, 11)  # blocks with global attention over the whole grid
    c.prompt_embed_dim = 256  # neck output channels = prompt-token and decoder width
    c.mask_in_chans = 16  # hidden channels of the mask-prompt downscaler
    c.decoder_depth = 2  # two-way transformer blocks
    c.decoder_heads = 8  # decoder attention heads
    c.decoder_mlp_dim = 2048  # decoder MLP width
    c.iou_head_depth = 3  # layers of the IoU prediction head
    c.iou_head_hidden_dim = 256  # width of the IoU prediction head
    c.num_multimask_outputs = 3  # secondary masks (plus the primary one)
    c.preprocessing = "sam"  # "sam" (resize longest side, mean/std, pad) or "medsam"
    c.pixel_mean = (123.675, 116.28, 103.53)  # per-channel mean on the 0..255 scale
    c.pixel_std = (58.395, 57.12, 57.375)  # per-channel std on the 0..255 scale
    return c
