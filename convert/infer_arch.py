"""Infers a ModelConfig from tensor shapes alone, so any SAM-architecture checkpoint converts.

Input: the converted Flax paths and shapes (e.g. "params/image_encoder/pos_embed" -> (1, 64, 64, 768)),
so the same code serves segment_anything and Hugging Face checkpoints. What the shapes say:

- encoder width D and patch size p: patch_embed kernel (p, p, 3, D); image size: pos_embed (1, g, g, D) -> g * p;
- depth: number of blocks; head dim: the rel-pos tables' width, so heads = D / head_dim; MLP ratio: lin1;
- global blocks: those whose rel-pos table has length 2g - 1; window w: the other blocks' length 2w - 1;
- prompt width C: the neck's output; mask_in_chans: mask_conv2's output; decoder depth: its layers;
  decoder MLP width: their lin1; IoU head depth and width; number of masks: mask_tokens.

Every size is read from all the tensors that carry it (the encoder width from every block's norms,
projections and MLP, ...) and the majority wins, so one corrupted tensor is named as the odd one
instead of skewing the architecture and making its healthy neighbours look mis-shaped. Numbered
modules (blocks, layers) must be numbered 0..n-1.

The decoder's head count changes no shape (its attention has no per-head parameters), so it is an
argument: 8 in every released SAM; a Hugging Face config.json states it.
"""

import collections
import dataclasses
import re
from typing import Iterable, Mapping, Optional

from radsam_jax.model.config import ModelConfig, load_model_config

PRESETS = ("vit_b", "vit_l", "vit_h", "small")
# Fields that describe preprocessing, not the weights: ignored when matching presets.
_NON_ARCH_FIELDS = ("name", "preprocessing", "pixel_mean", "pixel_std", "ct_window", "intensity", "mask_prompt")


class ArchitectureError(ValueError):
    """The shapes do not describe a SAM architecture that radsam-jax can build."""


class _Shapes:
    """The shapes, with what was found while reading them: conflicts (a size that a few tensors
    contradict, decided by the majority) and problems (no architecture can be read)."""

    def __init__(self, shapes: Mapping[str, tuple], names: Optional[Mapping[str, str]]):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.names = names or {}
        self.conflicts: list[str] = []
        self.problems: list[str] = []

    def label(self, path: str) -> str:
        """The tensor as the user knows it (its source key and shape when given), else its Flax path."""
        return self.names.get(path) or (f"{path} {self.shapes[path]}" if path in self.shapes else path)

    def shape(self, path: str) -> tuple:
        if path not in self.shapes:
            raise ArchitectureError(f"cannot infer the architecture: no tensor for {path}")
        return self.shapes[path]

    def dims(self, carriers: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
        """(path, size) of each (path, axis) whose tensor exists with that axis."""
        return [(p, self.shapes[p][a]) for p, a in carriers if p in self.shapes and len(self.shapes[p]) > a]

    def size(self, what: str, votes: list[tuple[str, int]]) -> int:
        """The size most tensors give for `what` (a conflict names those that give another one); a
        problem without a majority."""
        if not votes:
            raise ArchitectureError(f"cannot infer the {what}: no tensor carries it")
        counts = collections.Counter(v for _, v in votes).most_common()
        best, n = counts[0]
        if len(counts) > 1:
            by_value = {v: [self.label(p) for p, x in votes if x == v] for v, _ in counts}
            if counts[1][1] == n:
                self.problems.append(f"{what}: no majority, " + "; ".join(
                    f"{v} from {_some(ls)}" for v, ls in by_value.items()))
            else:
                odd = "; ".join(f"{_some(ls)} give{'s' if len(ls) == 1 else ''} {v}" for v, ls in by_value.items() if v != best)
                self.conflicts.append(f"{what} {best} (from {n} tensors: {_some(by_value[best], 2)}), but {odd}")
        return best

    def count(self, what: str, pattern: str) -> int:
        """n, for modules numbered 0..n-1 by the (\\d+) group of `pattern`; other numbers are a problem."""
        rx = re.compile(pattern)
        first: dict[int, str] = {}
        for k in sorted(self.shapes):
            if m := rx.match(k):
                first.setdefault(int(m[1]), k)
        n = 0
        while n in first:
            n += 1
        odd = sorted(i for i in first if i >= n)
        if odd:
            self.problems.append(f"{what} numbers {sorted(first)} are not 0..{len(first) - 1}: unexpected "
                                 f"{_some([self.label(first[i]) for i in odd])}")
        return n


def _some(labels: list[str], shown: int = 3) -> str:
    return ", ".join(labels[:shown]) + (f" and {len(labels) - shown} more" if len(labels) > shown else "")


def infer_config(shapes: Mapping[str, tuple], decoder_heads: int = 8,
                 names: Optional[Mapping[str, str]] = None) -> ModelConfig:
    """The ModelConfig whose abstract variables have these shapes (named after a matching preset).

    names: Flax path -> how to call that tensor in errors (e.g. its PyTorch key and shape).
    Shapes that disagree about a size are an ArchitectureError naming the odd tensors.
    """
    config, conflicts = infer_config_by_majority(shapes, decoder_heads, names)
    if conflicts:
        raise ArchitectureError("the shapes disagree: " + "; ".join(conflicts))
    return config


def _mlp_ratio(hidden: int, dim: int) -> float:
    """The ratio the encoder turns back into `hidden` (int(dim * ratio)): hidden / dim itself unless its
    float product rounds below (56 * (61 / 56) = 60.99...), then a half unit more."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim


_ENC, _PE, _DEC = "params/image_encoder", "params/prompt_encoder", "params/mask_decoder"


def infer_config_by_majority(shapes: Mapping[str, tuple], decoder_heads: int = 8,
                             names: Optional[Mapping[str, str]] = None) -> tuple[ModelConfig, list[str]]:
    """`infer_config`, where a size that a minority of its tensors contradicts is the majority's:
    (the config, one line per such size naming the tensors it came from and those that disagree).
    The converter reports these with the model check, which names the same odd tensors mis-shaped
    and every other problem of the checkpoint at once."""
    s = _Shapes(shapes, names)
    encoder = _encoder_fields(s)
    head_dim = encoder.pop("head_dim")
    decoder = _prompt_and_decoder_fields(s)
    if s.problems:
        raise ArchitectureError("cannot infer the architecture, the shapes disagree:\n    " + "\n    ".join(s.problems + s.conflicts))
    dim = encoder["encoder_dim"]
    if dim % head_dim:
        raise ArchitectureError(f"encoder width {dim} is not a multiple of the rel-pos table width {head_dim}")
    config = ModelConfig(name="custom", encoder_heads=dim // head_dim, decoder_heads=decoder_heads, **encoder, **decoder)
    try:
        config.validate()
    except ValueError as e:
        raise ArchitectureError(f"inferred an invalid architecture: {e}") from e
    preset = match_preset(config)
    if preset is not None:
        config = dataclasses.replace(config, name=preset)
    return config, s.conflicts


def _encoder_fields(s: _Shapes) -> dict:
    """The image encoder's ModelConfig fields, and "head_dim" (the heads follow once the width is
    known to be a multiple of it)."""
    kh, kw, in_chans, _ = s.shape(f"{_ENC}/patch_embed/kernel")
    if kh != kw or in_chans != 3:
        raise ArchitectureError(f"patch embedding kernel {kh}x{kw} over {in_chans} channels: expected square patches of RGB")
    pos = s.shape(f"{_ENC}/pos_embed")
    if len(pos) != 4 or pos[0] != 1 or pos[1] != pos[2]:
        raise ArchitectureError(f"{s.label(f'{_ENC}/pos_embed')} is not (1, g, g, width): a square grid of patches")
    grid = pos[1]

    depth = s.count("encoder block", rf"{_ENC}/blocks_(\d+)/")
    if depth == 0:
        raise ArchitectureError("cannot infer the architecture: no encoder blocks")
    blocks = [f"{_ENC}/blocks_{i}" for i in range(depth)]
    dim = s.size("encoder width", s.dims(
        [(f"{_ENC}/patch_embed/kernel", 3), (f"{_ENC}/patch_embed/bias", 0), (f"{_ENC}/pos_embed", 3),
         (f"{_ENC}/neck_conv1/kernel", 2)]
        + [(f"{b}/{leaf}", 0) for b in blocks for leaf in ("norm1/scale", "norm1/bias", "norm2/scale", "norm2/bias",
                                                            "attn/qkv/kernel", "attn/proj/kernel", "attn/proj/bias",
                                                            "mlp/lin1/kernel", "mlp/lin2/bias")]
        + [(f"{b}/{leaf}", 1) for b in blocks for leaf in ("attn/proj/kernel", "mlp/lin2/kernel")]))
    mlp_hidden = s.size("encoder MLP width", s.dims(
        [(f"{b}/{leaf}", axis) for b in blocks for leaf, axis in (("mlp/lin1/kernel", 1), ("mlp/lin1/bias", 0), ("mlp/lin2/kernel", 0))]))
    tables = {b: [f"{b}/attn/rel_pos_{a}" for a in "hw" if f"{b}/attn/rel_pos_{a}" in s.shapes] for b in blocks}
    head_dim = s.size("rel-pos table width (head dim)", s.dims((t, 1) for ts in tables.values() for t in ts))
    window, global_blocks = _window_and_global_blocks(s, tables, grid)
    return dict(image_size=grid * kh, patch_size=kh, encoder_dim=dim, encoder_depth=depth,
                encoder_mlp_ratio=_mlp_ratio(mlp_hidden, dim), window_size=window,
                global_attn_indexes=tuple(global_blocks), head_dim=head_dim)


def _window_and_global_blocks(s: _Shapes, tables: dict, grid: int) -> tuple[int, list[int]]:
    """(window size, indices of the global-attention blocks) from each block's rel-pos tables
    (`tables`: block path -> its table paths, in block order): a block's two tables are both 2g - 1
    long (global attention over the g x g grid) or both 2w - 1 (windowed)."""
    global_len = 2 * grid - 1
    lengths = {}  # block -> its tables' length
    for i, (b, ts) in enumerate(tables.items()):
        if not ts:
            raise ArchitectureError(f"cannot infer the architecture: no rel-pos table for encoder block {i} ({b}/attn/rel_pos_h)")
        block_lengths = {s.shapes[t][0] for t in ts}
        if len(block_lengths) > 1:
            s.problems.append(f"encoder block {i}: its rel-pos tables {_some([s.label(t) for t in ts])} differ in length")
        lengths[b] = global_len if global_len in block_lengths else max(block_lengths)
    global_blocks = [i for i, b in enumerate(tables) if lengths[b] == global_len]
    distinct = sorted(set(lengths.values()))
    windowed = [(t, s.shapes[t][0]) for b, ts in tables.items() if lengths[b] != global_len for t in ts]
    if not global_blocks and len(distinct) == 2:  # global and windowed blocks, but pos_embed fits neither
        long = [b for b in tables if lengths[b] == distinct[1]]
        g = (distinct[1] + 1) // 2
        s.problems.append(
            f"image grid {grid}x{grid} from {s.label(f'{_ENC}/pos_embed')} (global rel-pos tables of length {global_len}), "
            f"but the encoder's rel-pos tables have lengths {distinct[0]} and {distinct[1]}, and those of length "
            f"{distinct[1]} ({_some([s.label(t) for b in long for t in tables[b]], 2)}) fit a {g}x{g} grid")
        return grid, global_blocks  # unknown until the grid is; the problem is reported by the caller
    if windowed:
        length = s.size("windowed rel-pos table length", windowed)
        if length % 2 == 0:
            raise ArchitectureError(f"rel-pos table length {length} is not 2 * window - 1")
        return (length + 1) // 2, global_blocks
    return grid, global_blocks  # every block global; a window covering the grid would be the same computation


def _prompt_and_decoder_fields(s: _Shapes) -> dict:
    """The prompt encoder's and mask decoder's ModelConfig fields (all but the head count, which no
    shape carries)."""
    neck = [(f"{_ENC}/neck_conv1/kernel", 3), (f"{_ENC}/neck_conv2/kernel", 2), (f"{_ENC}/neck_conv2/kernel", 3)]
    neck += [(f"{_ENC}/{n}/{leaf}", 0) for n in ("neck_norm1", "neck_norm2") for leaf in ("scale", "bias")]
    prompt = [(f"{_PE}/point_embeddings", 1), (f"{_PE}/not_a_point_embed", 0), (f"{_PE}/no_mask_embed", 0),
              (f"{_PE}/mask_conv3/kernel", 3), (f"{_PE}/mask_conv3/bias", 0), (f"{_DEC}/iou_token", 1), (f"{_DEC}/mask_tokens", 1),
              (f"{_DEC}/upscale_conv1/kernel", 3), (f"{_DEC}/transformer/norm_final_attn/scale", 0)]
    prompt_dim = s.size("prompt width", s.dims(neck + prompt))
    mask_in_chans = s.size("mask_in_chans", s.dims(
        [(f"{_PE}/mask_conv2/kernel", 3), (f"{_PE}/mask_conv2/bias", 0), (f"{_PE}/mask_norm2/scale", 0),
         (f"{_PE}/mask_norm2/bias", 0), (f"{_PE}/mask_conv3/kernel", 2)]))

    decoder_depth = s.count("mask decoder layer", rf"{_DEC}/transformer/layers_(\d+)/")
    if decoder_depth == 0:
        raise ArchitectureError("cannot infer the architecture: no mask decoder transformer layers")
    layers = [f"{_DEC}/transformer/layers_{i}/mlp" for i in range(decoder_depth)]
    decoder_mlp = s.size("mask decoder MLP width", s.dims(
        [(f"{m}/{leaf}", axis) for m in layers for leaf, axis in (("lin1/kernel", 1), ("lin1/bias", 0), ("lin2/kernel", 0))]))
    iou_depth = s.count("IoU head layer", rf"{_DEC}/iou_prediction_head/layers_(\d+)/")
    iou = [f"{_DEC}/iou_prediction_head/layers_{i}" for i in range(iou_depth)]
    iou_hidden = s.size("IoU head width", s.dims(
        [(f"{m}/kernel", 1) for m in iou[:-1]] + [(f"{m}/bias", 0) for m in iou[:-1]] + [(f"{m}/kernel", 0) for m in iou[1:]]))
    hypernetworks = s.count("output hypernetwork MLP", rf"{_DEC}/output_hypernetworks_mlps_(\d+)/")
    num_masks = s.size("number of masks", s.dims(
        [(f"{_DEC}/mask_tokens", 0)] + ([(f"{iou[-1]}/kernel", 1), (f"{iou[-1]}/bias", 0)] if iou else []))
        + ([(f"{_DEC}/output_hypernetworks_mlps_0..{hypernetworks - 1} ({hypernetworks} MLPs)", hypernetworks)] if hypernetworks else []))
    return dict(prompt_embed_dim=prompt_dim, mask_in_chans=mask_in_chans, decoder_depth=decoder_depth,
                decoder_mlp_dim=decoder_mlp, iou_head_depth=iou_depth, iou_head_hidden_dim=iou_hidden,
                num_multimask_outputs=num_masks - 1)


def architecture_fields(config: ModelConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in _NON_ARCH_FIELDS}


def match_preset(config: ModelConfig) -> Optional[str]:
    """The name of the preset in configs/ with exactly this architecture, or None."""
    fields = architecture_fields(config)
    for name in PRESETS:
        if architecture_fields(load_model_config(name)) == fields:
            return name
    return None
