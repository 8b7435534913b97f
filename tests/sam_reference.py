"""The PyTorch references for parity tests: segment_anything and transformers' SamModel, random weights.

segment_anything is imported without its torchvision-dependent __init__ through
`radsam_jax.convert.reference.import_segment_anything` (see that module).
"""

from functools import partial

import numpy as np

from radsam_jax.convert.reference import import_segment_anything, randomize_


def build_small_sam(image_size=256, dim=96, depth=4, heads=3, window=6, global_attn=(1, 3), prompt_dim=128, decoder_mlp=256, seed=0):
    """A small random segment_anything.modeling.Sam (window 6 over a 16x16 grid exercises the padding)."""
    import torch

    _, modeling = import_segment_anything()
    grid = image_size // 16
    torch.manual_seed(seed)
    sam = modeling.Sam(
        image_encoder=modeling.ImageEncoderViT(
            depth=depth, embed_dim=dim, img_size=image_size, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=heads, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_attn,
            window_size=window, out_chans=prompt_dim,
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=16,
        ),
        mask_decoder=modeling.MaskDecoder(
            num_multimask_outputs=3,
            transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=decoder_mlp, num_heads=8),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=prompt_dim,
        ),
    )
    return randomize_(sam.eval(), seed)


def build_sam_vit_b(seed=0):
    sam_model_registry, _ = import_segment_anything()
    return randomize_(sam_model_registry["vit_b"](checkpoint=None).eval(), seed)


def sam_reference_outputs(sam, image, points=None, labels=None, box=None, mask=None, embeddings=None):
    """segment_anything's image embeddings (B, C, h, w) and all 4 masks (B, 4, 4h, 4w) + IoU (B, 4), numpy.

    Calls `mask_decoder.predict_masks`, which returns every mask token's output (multimask_output
    only slices them). Pass `embeddings` to skip the encoder.
    """
    import torch

    t = lambda x: None if x is None else torch.as_tensor(np.asarray(x, np.float32))
    with torch.no_grad():
        emb = sam.image_encoder(t(image)) if embeddings is None else t(embeddings)
        pts = None if points is None else (t(points), torch.as_tensor(np.asarray(labels), dtype=torch.int64))
        sparse, dense = sam.prompt_encoder(points=pts, boxes=t(box), masks=None if mask is None else t(mask)[:, None])
        masks, iou = sam.mask_decoder.predict_masks(
            image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
        )
    return emb.numpy(), masks.numpy(), iou.numpy()


def build_small_hf_sam(image_size=256, dim=96, depth=4, heads=3, window=6, global_attn=(1, 3), prompt_dim=128,
                       decoder_mlp=256, decoder_layer_norm_eps=1e-6, seed=0):
    """A small random transformers.SamModel; eps 1e-6 is HF's default for the decoder's LayerNorms."""
    from transformers import SamConfig, SamModel

    grid = image_size // 16
    config = SamConfig(
        vision_config=dict(
            hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, image_size=image_size, patch_size=16,
            window_size=window, global_attn_indexes=list(global_attn), output_channels=prompt_dim, mlp_dim=4 * dim,
            num_pos_feats=prompt_dim // 2,
        ),
        prompt_encoder_config=dict(hidden_size=prompt_dim, image_size=image_size, patch_size=16, image_embedding_size=grid, mask_input_channels=16),
        mask_decoder_config=dict(
            hidden_size=prompt_dim, mlp_dim=decoder_mlp, num_hidden_layers=2, num_attention_heads=8,
            iou_head_hidden_dim=prompt_dim, iou_head_depth=3, layer_norm_eps=decoder_layer_norm_eps,
        ),
    )
    model = SamModel(config).eval()
    randomize_(model, seed)
    # The random-Fourier matrix is a tied pair in SamModel: keep both copies identical.
    model.prompt_encoder.shared_embedding.positional_embedding = model.shared_image_embedding.positional_embedding
    return model


def hf_reference_outputs(model, image, points=None, labels=None, box=None, mask=None):
    """HF SamModel's image embeddings and all 4 masks + IoU: masks 1-3 from multimask_output=True, 0 from False."""
    import torch

    t = lambda x: None if x is None else torch.as_tensor(np.asarray(x, np.float32))
    with torch.no_grad():
        emb = model.get_image_embeddings(t(image))
        kwargs = dict(
            image_embeddings=emb,
            input_points=None if points is None else t(points)[:, None],
            input_labels=None if labels is None else torch.as_tensor(np.asarray(labels), dtype=torch.int64)[:, None],
            input_boxes=None if box is None else t(box)[:, None],
            input_masks=None if mask is None else t(mask)[:, None],
        )
        multi = model(multimask_output=True, **kwargs)
        single = model(multimask_output=False, **kwargs)
    masks = torch.cat([single.pred_masks[:, 0], multi.pred_masks[:, 0]], dim=1)
    iou = torch.cat([single.iou_scores[:, 0], multi.iou_scores[:, 0]], dim=1)
    return emb.numpy(), masks.numpy(), iou.numpy()


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
