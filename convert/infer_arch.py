"""Infers a ModelConfig from tensor shapes alone, so any SAM-architecture checkpoint converts.

Input: the converted Flax paths and shapes (e.g. "params/image_encoder/pos_embed" -> (1, 64, 64, 768)),
so the same code serves segment_anything and Hugging Face checkpoints. What the shapes say:

- encoder width D and patch size p: patch_embed kernel (p, p, 3, D); image size: pos_embed (1, g, g, D) -> g * p;
- depth: number of blocks; head dim: the rel-pos tables' width, so heads = D / head_dim; MLP ratio: lin1;
- global blocks: those whose rel-pos table has length 2g - 1; window w: the other blocks' length 2w - 1;
- prompt width C: the neck's output; mask_in_chans: mask_conv2's output; decoder depth: its layers;
  decoder MLP width: their lin1; IoU head depth and width; number of masks: mask_tokens.

The decoder's head count changes no shape (its attention has no per-head parameters), so it is an
argument: 8 in every released SAM; a Hugging Face config.json states it.
"""

import dataclasses
import re
from typing import Mapping, Optional

from radsam_jax.model.config import ModelConfig, load_model_config

PRESETS = ("vit_b", "vit_l", "vit_h", "small")
# Fields that describe preprocessing, not the weights: ignored when matching presets.
_NON_ARCH_FIELDS = ("name", "preprocessing", "pixel_mean", "pixel_std")


class ArchitectureError(ValueError):
    """The shapes do not describe a SAM architecture that radsam-jax can build."""


def _count(shapes: Mapping[str, tuple], pattern: str) -> int:
    """Number of distinct indices i for which some path matches `pattern` (with one (\\d+) group)."""
    rx = re.compile(pattern)
    return len({m[1] for k in shapes if (m := rx.match(k))})


def infer_config(shapes: Mapping[str, tuple], decoder_heads: int = 8, name: Optional[str] = None) -> ModelConfig:
    """The ModelConfig whose abstract variables have these shapes (named after a matching preset)."""

    def shape(path: str) -> tuple:
        if path not in shapes:
            raise ArchitectureError(f"cannot infer the architecture: no tensor for {path}")
        return tuple(shapes[path])

    enc, dec = "params/image_encoder", "params/mask_decoder"
    kh, kw, in_chans, dim = shape(f"{enc}/patch_embed/kernel")
    if kh != kw or in_chans != 3:
        raise ArchitectureError(f"patch embedding kernel {kh}x{kw} over {in_chans} channels: expected square patches of RGB")
    _, grid_h, grid_w, pos_dim = shape(f"{enc}/pos_embed")
    if grid_h != grid_w or pos_dim != dim:
        raise ArchitectureError(f"pos_embed shape {shape(f'{enc}/pos_embed')} does not fit a square grid of width {dim}")
    grid = grid_h

    depth = _count(shapes, rf"{enc}/blocks_(\d+)/")
    if depth == 0:
        raise ArchitectureError("cannot infer the architecture: no encoder blocks")
    global_len = 2 * grid - 1
    global_blocks, window_lengths, head_dims = [], set(), set()
    for i in range(depth):
        length, head_dim = shape(f"{enc}/blocks_{i}/attn/rel_pos_h")
        head_dims.add(head_dim)
        if length == global_len:
            global_blocks.append(i)
        else:
            window_lengths.add(length)
    if len(head_dims) != 1:
        raise ArchitectureError(f"rel-pos tables of different widths {sorted(head_dims)} across blocks")
    head_dim = head_dims.pop()
    if dim % head_dim:
        raise ArchitectureError(f"encoder width {dim} is not a multiple of the rel-pos table width {head_dim}")
    if len(window_lengths) > 1:
        raise ArchitectureError(f"windowed blocks with different rel-pos table lengths {sorted(window_lengths)}")
    if window_lengths:
        length = window_lengths.pop()
        if length % 2 == 0:
            raise ArchitectureError(f"rel-pos table length {length} is not 2 * window - 1")
        window = (length + 1) // 2
    else:
        window = grid  # every block global; a window covering the grid would be the same computation
    mlp_hidden = shape(f"{enc}/blocks_0/mlp/lin1/kernel")[1]
    prompt_dim = shape(f"{enc}/neck_conv1/kernel")[3]

    decoder_depth = _count(shapes, rf"{dec}/transformer/layers_(\d+)/")
    decoder_mlp = shape(f"{dec}/transformer/layers_0/mlp/lin1/kernel")[1] if decoder_depth else 2048
    iou_depth = _count(shapes, rf"{dec}/iou_prediction_head/layers_(\d+)/")
    iou_hidden = shape(f"{dec}/iou_prediction_head/layers_0/kernel")[1]
    num_masks = shape(f"{dec}/mask_tokens")[0]

    config = ModelConfig(
        name=name or "custom",
        image_size=grid * kh,
        patch_size=kh,
        encoder_dim=dim,
        encoder_depth=depth,
        encoder_heads=dim // head_dim,
        encoder_mlp_ratio=mlp_hidden / dim,
        window_size=window,
        global_attn_indexes=tuple(global_blocks),
        prompt_embed_dim=prompt_dim,
        mask_in_chans=shape("params/prompt_encoder/mask_conv2/kernel")[3],
        decoder_depth=decoder_depth,
        decoder_heads=decoder_heads,
        decoder_mlp_dim=decoder_mlp,
        iou_head_depth=iou_depth,
        iou_head_hidden_dim=iou_hidden,
        num_multimask_outputs=num_masks - 1,
    )
    try:
        config.validate()
    except ValueError as e:
        raise ArchitectureError(f"inferred an invalid architecture: {e}") from e
    if name is None:
        preset = match_preset(config)
        if preset is not None:
            config = dataclasses.replace(config, name=preset)
    return config


def architecture_fields(config: ModelConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in _NON_ARCH_FIELDS}


def match_preset(config: ModelConfig) -> Optional[str]:
    """The name of the preset in configs/ with exactly this architecture, or None."""
    fields = architecture_fields(config)
    for name in PRESETS:
        if architecture_fields(load_model_config(name)) == fields:
            return name
    return None
