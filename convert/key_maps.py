"""Declarative PyTorch -> Flax key maps for SAM-family checkpoints.

Each table is a list of `Rule(pattern, target, transform)`: `pattern` must match a whole PyTorch
state-dict key; `target` is the slash-separated path in the Flax variables pytree
({"params": ..., "buffers": ...}), written with `\\1`-style back-references to the pattern's groups;
`transform` turns the PyTorch tensor (as a numpy array) into the Flax layout. Two target
conventions go beyond a plain path:

- `name[\\1]` stacks several PyTorch tensors into one Flax array along a new leading axis, the
  group giving the slot (SAM's 4 separate point embeddings -> one (4, C) array);
- `layers_LAST` is the last layer of an MLP whose Hugging Face name (`proj_out`) does not carry its
  index; the converter renames it to `layers_{n}` after the `n` other layers of that MLP.

A key that no rule and no `IGNORED_*` pattern matches is an error, as is a target the model does
not have; `convert.py` does the matching and reports every problem at once.

Layouts: Linear (out, in) -> kernel (in, out). Conv2d (out, in, kh, kw) -> (kh, kw, in, out).
ConvTranspose2d (in, out, kh, kw) -> (kh, kw, out, in), the layout of Flax's
`ConvTranspose(transpose_kernel=True)` (tests/test_convert.py checks it against
torch.nn.functional.conv_transpose2d). LayerNorm weight -> scale. Embedding tables, relative-position
tables, pos_embed (already (1, H, W, C)) and the random-Fourier matrix keep their layout.
"""

import dataclasses
import re
from typing import Callable, Union

import numpy as np

# --------------------------------------------------------------------------- transforms


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named layout change; `ndim` is the rank the PyTorch tensor must have (None: any)."""

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    ndim: Union[int, None] = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.ndim is not None and x.ndim != self.ndim:
            raise ValueError(f"{self.name} expects a {self.ndim}-D tensor, got shape {tuple(x.shape)}")
        return self.fn(x)


def _squeeze_leading(x: np.ndarray) -> np.ndarray:
    if x.shape[0] != 1:
        raise ValueError(f"squeeze expects a (1, C) embedding, got shape {tuple(x.shape)}")
    return x[0]


IDENTITY = Transform("identity", lambda x: x)
LINEAR = Transform("linear", lambda x: x.T, ndim=2)  # (out, in) -> (in, out)
CONV = Transform("conv", lambda x: x.transpose(2, 3, 1, 0), ndim=4)  # (out, in, kh, kw) -> (kh, kw, in, out)
# (in, out, kh, kw) -> (kh, kw, out, in): the same permutation as CONV, because PyTorch stores a
# transposed conv's kernel as (in, out, ...) and Flax's transpose_kernel=True reads it as (kh, kw, out, in).
CONV_TRANSPOSE = Transform("conv_transpose", lambda x: x.transpose(2, 3, 1, 0), ndim=4)
SQUEEZE = Transform("squeeze", _squeeze_leading, ndim=2)  # nn.Embedding(1, C).weight (1, C) -> (C,)

Target = Union[str, Callable[[re.Match], str]]


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    target: Target
    transform: Transform

    def target_for(self, match: re.Match) -> str:
        return self.target(match) if callable(self.target) else match.expand(self.target)


# --------------------------------------------------------------------------- row builders


def _join(dst: Target, leaf: str) -> Target:
    if callable(dst):
        return lambda m: f"{dst(m)}/{leaf}"
    return f"{dst}/{leaf}"


def linear(src: str, dst: Target) -> list[Rule]:
    """nn.Linear `src.weight`/`src.bias` -> Dense `dst/kernel`/`dst/bias`."""
    return [Rule(src + r"\.weight", _join(dst, "kernel"), LINEAR), Rule(src + r"\.bias", _join(dst, "bias"), IDENTITY)]


def conv(src: str, dst: Target, bias: bool = True) -> list[Rule]:
    rules = [Rule(src + r"\.weight", _join(dst, "kernel"), CONV)]
    return rules + ([Rule(src + r"\.bias", _join(dst, "bias"), IDENTITY)] if bias else [])


def conv_transpose(src: str, dst: Target) -> list[Rule]:
    return [Rule(src + r"\.weight", _join(dst, "kernel"), CONV_TRANSPOSE), Rule(src + r"\.bias", _join(dst, "bias"), IDENTITY)]


def layer_norm(src: str, dst: Target) -> list[Rule]:
    """nn.LayerNorm / LayerNorm2d `weight`, `bias` -> Flax LayerNorm `scale`, `bias`."""
    return [Rule(src + r"\.weight", _join(dst, "scale"), IDENTITY), Rule(src + r"\.bias", _join(dst, "bias"), IDENTITY)]


def shifted(template: str, by: dict[int, int]) -> Callable[[re.Match], str]:
    """A `str.format` target over the pattern's groups ({1}, {2}, ...), numeric group i shifted by by[i].

    For Hugging Face MLPs, whose `layers.N` is Flax `layers_{N+1}` (proj_in being layers_0).
    """

    def target(m: re.Match) -> str:
        groups = [str(int(g) + by[i]) if i in by else g for i, g in enumerate(m.groups(), 1)]
        return template.format(m[0], *groups)

    return target


P = "params"
ENC = f"{P}/image_encoder"
PE = f"{P}/prompt_encoder"
DEC = f"{P}/mask_decoder"
GAUSSIAN = "buffers/prompt_encoder/pe_layer/positional_encoding_gaussian_matrix"
ATTN_PROJ = r"(q_proj|k_proj|v_proj|out_proj)"
TWO_WAY_ATTN = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"

# --------------------------------------------------------------------------- segment_anything (SAM, MedSAM)

SEGMENT_ANYTHING_KEY_MAP: list[Rule] = [
    # Image encoder.
    *conv(r"image_encoder\.patch_embed\.proj", f"{ENC}/patch_embed"),
    Rule(r"image_encoder\.pos_embed", f"{ENC}/pos_embed", IDENTITY),
    *layer_norm(r"image_encoder\.blocks\.(\d+)\.norm([12])", rf"{ENC}/blocks_\1/norm\2"),
    *linear(r"image_encoder\.blocks\.(\d+)\.attn\.(qkv|proj)", rf"{ENC}/blocks_\1/attn/\2"),
    Rule(r"image_encoder\.blocks\.(\d+)\.attn\.(rel_pos_[hw])", rf"{ENC}/blocks_\1/attn/\2", IDENTITY),
    *linear(r"image_encoder\.blocks\.(\d+)\.mlp\.(lin[12])", rf"{ENC}/blocks_\1/mlp/\2"),
    *conv(r"image_encoder\.neck\.0", f"{ENC}/neck_conv1", bias=False),
    *layer_norm(r"image_encoder\.neck\.1", f"{ENC}/neck_norm1"),
    *conv(r"image_encoder\.neck\.2", f"{ENC}/neck_conv2", bias=False),
    *layer_norm(r"image_encoder\.neck\.3", f"{ENC}/neck_norm2"),
    # Prompt encoder.
    Rule(r"prompt_encoder\.pe_layer\.positional_encoding_gaussian_matrix", GAUSSIAN, IDENTITY),
    Rule(r"prompt_encoder\.point_embeddings\.(\d+)\.weight", rf"{PE}/point_embeddings[\1]", SQUEEZE),
    Rule(r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", rf"{PE}/\1", SQUEEZE),
    *conv(r"prompt_encoder\.mask_downscaling\.0", f"{PE}/mask_conv1"),
    *layer_norm(r"prompt_encoder\.mask_downscaling\.1", f"{PE}/mask_norm1"),
    *conv(r"prompt_encoder\.mask_downscaling\.3", f"{PE}/mask_conv2"),
    *layer_norm(r"prompt_encoder\.mask_downscaling\.4", f"{PE}/mask_norm2"),
    *conv(r"prompt_encoder\.mask_downscaling\.6", f"{PE}/mask_conv3"),
    # Mask decoder.
    Rule(r"mask_decoder\.(iou_token|mask_tokens)\.weight", rf"{DEC}/\1", IDENTITY),
    *linear(rf"mask_decoder\.transformer\.layers\.(\d+)\.{TWO_WAY_ATTN}\.{ATTN_PROJ}", rf"{DEC}/transformer/layers_\1/\2/\3"),
    *layer_norm(r"mask_decoder\.transformer\.layers\.(\d+)\.norm([1-4])", rf"{DEC}/transformer/layers_\1/norm\2"),
    *linear(r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])", rf"{DEC}/transformer/layers_\1/mlp/\2"),
    *linear(rf"mask_decoder\.transformer\.final_attn_token_to_image\.{ATTN_PROJ}", rf"{DEC}/transformer/final_attn_token_to_image/\1"),
    *layer_norm(r"mask_decoder\.transformer\.norm_final_attn", f"{DEC}/transformer/norm_final_attn"),
    *conv_transpose(r"mask_decoder\.output_upscaling\.0", f"{DEC}/upscale_conv1"),
    *layer_norm(r"mask_decoder\.output_upscaling\.1", f"{DEC}/upscale_norm"),
    *conv_transpose(r"mask_decoder\.output_upscaling\.3", f"{DEC}/upscale_conv2"),
    *linear(r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\.layers\.(\d+)", rf"{DEC}/output_hypernetworks_mlps_\1/layers_\2"),
    *linear(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)", rf"{DEC}/iou_prediction_head/layers_\1"),
]

# Preprocessing constants some checkpoints carry as buffers (segment_anything registers them as
# non-persistent, but older or re-saved checkpoints include them). Not weights: the converter
# records their values in the metadata and, where they differ from SAM's, in the model config.
IGNORED_SEGMENT_ANYTHING = {r"pixel_mean": "pixel_mean", r"pixel_std": "pixel_std"}

# --------------------------------------------------------------------------- Hugging Face SamModel

HF_KEY_MAP: list[Rule] = [
    # The random-Fourier matrix is stored twice (tied weights); both copies must agree.
    Rule(r"shared_image_embedding\.positional_embedding", GAUSSIAN, IDENTITY),
    Rule(r"prompt_encoder\.shared_embedding\.positional_embedding", GAUSSIAN, IDENTITY),
    # Image encoder.
    *conv(r"vision_encoder\.patch_embed\.projection", f"{ENC}/patch_embed"),
    Rule(r"vision_encoder\.pos_embed", f"{ENC}/pos_embed", IDENTITY),
    *layer_norm(r"vision_encoder\.layers\.(\d+)\.layer_norm([12])", rf"{ENC}/blocks_\1/norm\2"),
    *linear(r"vision_encoder\.layers\.(\d+)\.attn\.(qkv|proj)", rf"{ENC}/blocks_\1/attn/\2"),
    Rule(r"vision_encoder\.layers\.(\d+)\.attn\.(rel_pos_[hw])", rf"{ENC}/blocks_\1/attn/\2", IDENTITY),
    *linear(r"vision_encoder\.layers\.(\d+)\.mlp\.(lin[12])", rf"{ENC}/blocks_\1/mlp/\2"),
    *conv(r"vision_encoder\.neck\.conv([12])", rf"{ENC}/neck_conv\1", bias=False),
    *layer_norm(r"vision_encoder\.neck\.layer_norm([12])", rf"{ENC}/neck_norm\1"),
    # Prompt encoder.
    Rule(r"prompt_encoder\.point_embed\.(\d+)\.weight", rf"{PE}/point_embeddings[\1]", SQUEEZE),
    Rule(r"prompt_encoder\.(not_a_point_embed|no_mask_embed)\.weight", rf"{PE}/\1", SQUEEZE),
    *conv(r"prompt_encoder\.mask_embed\.conv([123])", rf"{PE}/mask_conv\1"),
    *layer_norm(r"prompt_encoder\.mask_embed\.layer_norm([12])", rf"{PE}/mask_norm\1"),
    # Mask decoder.
    Rule(r"mask_decoder\.(iou_token|mask_tokens)\.weight", rf"{DEC}/\1", IDENTITY),
    *linear(rf"mask_decoder\.transformer\.layers\.(\d+)\.{TWO_WAY_ATTN}\.{ATTN_PROJ}", rf"{DEC}/transformer/layers_\1/\2/\3"),
    *layer_norm(r"mask_decoder\.transformer\.layers\.(\d+)\.layer_norm([1-4])", rf"{DEC}/transformer/layers_\1/norm\2"),
    *linear(r"mask_decoder\.transformer\.layers\.(\d+)\.mlp\.(lin[12])", rf"{DEC}/transformer/layers_\1/mlp/\2"),
    *linear(rf"mask_decoder\.transformer\.final_attn_token_to_image\.{ATTN_PROJ}", rf"{DEC}/transformer/final_attn_token_to_image/\1"),
    *layer_norm(r"mask_decoder\.transformer\.layer_norm_final_attn", f"{DEC}/transformer/norm_final_attn"),
    *conv_transpose(r"mask_decoder\.upscale_conv([12])", rf"{DEC}/upscale_conv\1"),
    *layer_norm(r"mask_decoder\.upscale_layer_norm", f"{DEC}/upscale_norm"),
    # SamFeedForward: proj_in, layers.0 .. layers.(n-3), proj_out == Flax layers_0 .. layers_{n-1}.
    *linear(r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\.proj_in", rf"{DEC}/output_hypernetworks_mlps_\1/layers_0"),
    *linear(r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\.layers\.(\d+)", shifted(f"{DEC}/output_hypernetworks_mlps_{{1}}/layers_{{2}}", {2: 1})),
    *linear(r"mask_decoder\.output_hypernetworks_mlps\.(\d+)\.proj_out", rf"{DEC}/output_hypernetworks_mlps_\1/layers_LAST"),
    *linear(r"mask_decoder\.iou_prediction_head\.proj_in", f"{DEC}/iou_prediction_head/layers_0"),
    *linear(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)", shifted(f"{DEC}/iou_prediction_head/layers_{{1}}", {1: 1})),
    *linear(r"mask_decoder\.iou_prediction_head\.proj_out", f"{DEC}/iou_prediction_head/layers_LAST"),
]
IGNORED_HF: dict[str, str] = {}

KEY_MAPS = {"segment_anything": SEGMENT_ANYTHING_KEY_MAP, "hf": HF_KEY_MAP}
IGNORED_KEYS = {"segment_anything": IGNORED_SEGMENT_ANYTHING, "hf": IGNORED_HF}
