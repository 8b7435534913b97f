"""The propagation loop: one jitted call decodes the prompted slice, then scans up and down the volume.

Everything here works in the *model frame*: slice k of the padded embedding stack (Zp, e, e, C),
prompts in model-input pixels, masks as (m, m) low-resolution logits (m = S/4).

`propagate_volume` is the whole of a volume-level segmentation or edit:

    start slice j:  decode(embeddings[j], user prompt (+ stored corrections on j) (+ current mask))
    lax.scan, step i = 0, 1, ...: both directions in lockstep, one decoder call for both
        up    k = j+1+i while k <= hi:  decode(embeddings[k], previous mask (+ corrections on k))
        down  k = j-1-i while k >= lo:  decode(embeddings[k], previous mask (+ corrections on k))

Each scan step carries each direction's previous primary low-resolution logits (its mask: logits > 0)
and builds the next prompts from them on device: the mask itself (propagation="mask", RadSAM; sent
binary or as logits, the model's `mask_prompt` encoding) or the box around it (propagation="box",
for SAM/MedSAM, never trained to segment from a neighbouring slice's mask). Nothing
returns to the host between slices. The scan has the static length Zp (the bucketed slice count);
a direction past its bound is left out of the step's decoder call (`lax.switch`: batch 2, 1 or
none), so one compiled function serves every bound, prompted slice and volume whose slice count
falls into the same bucket, and a volume takes max(up, down) sequential decoder calls, not the sum.

Corrections: a static table `points (Zp, P, 2)`, `labels (Zp, P)` (label -1 = empty slot) holds the
correction points stored per slice. Whenever the scan passes a slice, that slice's points are added
to the propagated prompt, so earlier edits are re-applied by later re-propagations.

Stored boxes: likewise an optional table `boxes (Zp, 4)`, `has_box (Zp,)` holds the user's box
prompt per slice (the initial box of a segmentation, on its slice). The scan passing such a slice
re-sends the box with the propagated prompt: propagation="mask": box + previous mask (+ points);
propagation="box": the stored box replaces the box derived from the previous mask.

Edits (`previous` given, `anchor` = the object's prompt slice): if the re-propagation from the edited
slice towards the prompt slice vanishes before reaching it, that direction ends there, whatever the
policy below, and every slice it did not reach (up to its bound, past the prompt slice too) keeps
its previous mask. The object is known to lie between the two, so a click that empties a leaked
slice beyond the object's end must not erase the object behind it. A direction that reaches the
prompt slice goes on from there under the policy, as a segmentation does.

Vanished masks (the previous slice's mask is empty before the bound is reached):
- "stop" (default): the object is taken to have ended; every later slice in that direction stays
  empty and the decoder is not run, except on slices holding a stored *positive* correction point
  or a stored box, which restart the propagation from there (the user said the object is present).
- "continue": the decoder keeps running without a mask prompt (propagation="box": without a box),
  with any stored corrections, so the object may reappear. An untrained prompt-free decode may also
  hallucinate; "stop" is the safer default.

An empty mask is never sent as a mask prompt, only as "no mask" (`encode_mask_prompt`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from radsam_jax.model.config import ModelConfig
from radsam_jax.model.sam import Sam
from radsam_jax.prompts import Prompts

VANISH_POLICIES = ("stop", "continue")
PROPAGATION_MODES = ("mask", "box")
# Written into the logits of slices that were not segmented (outside the bounds, or stopped).
EMPTY_LOGIT = -1e4

# decode_fn(variables, embeddings (B, e, e, C), prompts (B leading)) -> (logits (B, M, m, m), iou (B, M)).
DecodeFn = Callable[[Any, jax.Array, Prompts], tuple[jax.Array, jax.Array]]


@functools.lru_cache(maxsize=None)
def sam_decoder(config: ModelConfig, dtype) -> DecodeFn:
    """The model's prompt encoder + mask decoder as a plain function; cached so the same
    (config, dtype) gives the same object, a stable static argument for `jax.jit`."""
    dtype = jnp.dtype(dtype)

    def decode(variables, embeddings, prompts):
        return Sam(config, dtype).apply(variables, embeddings, prompts, method=Sam.decode)

    decode.__name__ = f"sam_decode_{config.name}_{dtype.name}"
    return decode


def single_prompt(points, point_labels, box, has_box, mask, has_mask) -> Prompts:
    """A batch-of-one `Prompts` from unbatched jnp arrays (works on traced values: no host trip)."""
    return Prompts(
        points=jnp.asarray(points, jnp.float32)[None],
        point_labels=jnp.asarray(point_labels, jnp.int32)[None],
        box=jnp.asarray(box, jnp.float32)[None],
        has_box=jnp.asarray(has_box, bool).reshape(1),
        mask=jnp.asarray(mask, jnp.float32)[None],
        has_mask=jnp.asarray(has_mask, bool).reshape(1),
    )


def box_from_mask(mask: jax.Array, image_size: int) -> tuple[jax.Array, jax.Array]:
    """(m, m) low-res mask (on where > 0: binary or logits) -> (box (4,) x0, y0, x1, y1 in model-input
    pixels, non-empty flag).

    Low-res pixel c covers input pixels [c * S/m, (c + 1) * S/m - 1]; the box spans those extremes.
    """
    m = mask.shape[-1]
    on = mask > 0
    cols, rows = jnp.any(on, axis=0), jnp.any(on, axis=1)
    idx = jnp.arange(m)
    x0 = jnp.min(jnp.where(cols, idx, m))
    x1 = jnp.max(jnp.where(cols, idx, -1))
    y0 = jnp.min(jnp.where(rows, idx, m))
    y1 = jnp.max(jnp.where(rows, idx, -1))
    scale = image_size / m
    box = jnp.stack([x0 * scale, y0 * scale, (x1 + 1) * scale - 1, (y1 + 1) * scale - 1]).astype(jnp.float32)
    nonempty = jnp.any(on)
    return jnp.where(nonempty, box, 0.0), nonempty


def encode_mask_prompt(logits: jax.Array, encoding: str, resized=None) -> tuple[jax.Array, jax.Array]:
    """(..., m, m) primary low-res logits -> (the mask prompt, whether it is sent).

    encoding (ModelConfig.mask_prompt): "binary" sends the 0/1 mask the way RadSAM's training makes a
    mask prompt from a mask (data.pipeline.mask_to_prompt_np): the mask at the model's input size
    S = 4m (SAM's first postprocessing step: bilinear to S x S, logits > 0, inside the `resized`
    (h, w) image, not its padding; None: all of it), then antialiased bilinear to m x m and > 0.5 (> 0 where that erases
    it). Thresholding the low-res logits directly marks a pixel whose centre is inside the mask,
    where training asks for half its area: a prompt about 7 % larger on average, which propagation
    compounds (over-segmented volumes). "logits" sends the logits themselves, as SAM fed its previous
    prediction back in training.
    Only a non-empty mask is sent: RadSAM's prompt simulation never shows an empty mask prompt, so an
    empty one (a vanished propagation restarted by a stored click or box, an edit clicked on a slice
    the object's mask misses) goes as "no mask", SAM's no-mask embedding, with the clicks or box as
    the prompt; slices never decoded hold EMPTY_LOGIT, which no model was trained to read.
    """
    logits = logits.astype(jnp.float32)
    if encoding != "binary":
        sent = jnp.any(logits > 0, axis=(-2, -1))
        return jnp.where(sent[..., None, None], logits, 0.0), sent
    lead, m = logits.shape[:-2], logits.shape[-1]
    s = 4 * m  # SAM's masks: S/4 per side
    resized = jnp.full((2,), s, jnp.int32) if resized is None else resized
    inside = (jnp.arange(s)[:, None] < resized[0]) & (jnp.arange(s)[None, :] < resized[1])
    up = (jax.image.resize(logits, (*lead, s, s), "linear", antialias=False) > 0) & inside
    soft = jax.image.resize(up.astype(jnp.float32), (*lead, m, m), "linear", antialias=True)
    on = soft > 0.5
    on = jnp.where(jnp.any(on, axis=(-2, -1), keepdims=True), on, soft > 0)
    sent = jnp.any(on, axis=(-2, -1))
    return on.astype(jnp.float32), sent


def _propagated_prompts(points, labels, box, has_box, prev_logits, resized, *, image_size: int, mode: str,
                        mask_prompt: str) -> Prompts:
    """The propagated prompts of B slices (every argument B-leading): stored points (+ stored box
    where has_box) + the previous slice's mask (mode="mask", encoded as `mask_prompt`) or the box
    around it (mode="box"; a stored box takes its place)."""
    if mode == "mask":
        return Prompts(points, labels, box, has_box,
                       *encode_mask_prompt(prev_logits, mask_prompt, resized))
    derived, nonempty = jax.vmap(box_from_mask, in_axes=(0, None))(prev_logits, image_size)
    bx = jnp.where(has_box[:, None], box, derived)
    return Prompts(points, labels, bx, has_box | nonempty, jnp.zeros_like(prev_logits), jnp.zeros(has_box.shape, bool))


def _scan_both_directions(decode_fn, variables, embeddings, init_logits, start, lo, hi, table_points, table_labels,
                          table_boxes, table_has_box, resized, anchor, *, image_size: int, mode: str, vanish_policy: str,
                          mask_prompt: str):
    """Both directions in lockstep: step i decodes slice start + 1 + i (up, towards `hi`) and slice
    start - 1 - i (down, towards `lo`), bounds inclusive. anchor: a direction whose mask vanishes
    before it reaches this slice ends for good (an edit heading to its prompt slice), no stored
    prompt restarts it.

    One decoder call per step serves both directions: batch 2 while both run, batch 1 once one has
    ended (its bound reached, or its mask vanished under "stop"), none when neither runs. A volume is
    then max(up, down) sequential decoder calls instead of up + down; on a GPU, where a batch-1
    decoder call is bound by kernel launches, a batch of 2 costs about as much as a batch of 1.

    Returns per scan step i, direction d (0 up, 1 down): primary logits (Zp, 2, m, m), IoU (Zp, 2),
    written (Zp, 2) bool = the slice lies within the bound (its logits are the answer for that slice),
    ended (Zp, 2) bool = written, but its direction ended before the anchor (it keeps its previous mask).
    """
    num_slices = embeddings.shape[0]
    m = init_logits.shape[-1]
    step = jnp.array([1, -1])

    def decode(emb, prompts):
        logits, iou = decode_fn(variables, emb, prompts)
        return logits[:, 0].astype(jnp.float32), iou[:, 0].astype(jnp.float32)

    def decode_none(kc, prompts, run):
        return jnp.full((2, m, m), EMPTY_LOGIT, jnp.float32), jnp.full((2,), jnp.nan, jnp.float32)

    def decode_one(kc, prompts, run):  # the direction that runs, alone, as a batch of one
        d = jnp.argmax(run)
        pick = lambda x: jax.lax.dynamic_index_in_dim(x, d, keepdims=True)
        logits, iou = decode(pick(embeddings[kc]), jax.tree.map(pick, prompts))
        mine = jnp.arange(2) == d
        return jnp.where(mine[:, None, None], logits, EMPTY_LOGIT), jnp.where(mine, iou, jnp.nan)

    def decode_both(kc, prompts, run):
        return decode(embeddings[kc], prompts)

    def body(carry, i):  # each direction's previous slice (2, m, m), its mask = logits > 0; ended (2,)
        prev_logits, ended = carry
        k = start + step * (i + 1)
        in_range = jnp.where(step > 0, k <= hi, k >= lo) & (k >= 0) & (k < num_slices)
        kc = jnp.clip(k, 0, num_slices - 1)
        points, labels, box, has_box = table_points[kc], table_labels[kc], table_boxes[kc], table_has_box[kc]
        prompts = _propagated_prompts(points, labels, box, has_box, prev_logits, resized, image_size=image_size,
                                      mode=mode, mask_prompt=mask_prompt)
        # Vanished: no mask to send (mode "mask"), no box around it (mode "box").
        present = prompts.has_mask if mode == "mask" else jnp.any(prev_logits > 0, axis=(1, 2))
        restart = jnp.any(labels == 1, axis=1) | has_box
        policy = (present | restart) if vanish_policy == "stop" else jnp.ones_like(present)
        before_anchor = jnp.where(step > 0, k <= anchor, k >= anchor)  # the carried mask is from before it
        ended = ended | (in_range & before_anchor & ~present)
        run = in_range & ~ended & jnp.where(before_anchor, present, policy)
        logits, iou = jax.lax.switch(jnp.sum(run), (decode_none, decode_one, decode_both), kc, prompts, run)
        return (jnp.where(in_range[:, None, None], logits, prev_logits), ended), (logits, iou, in_range, in_range & ended)

    init = jnp.broadcast_to(init_logits, (2, m, m)), jnp.zeros((2,), bool)
    _, (logits, iou, written, ended) = jax.lax.scan(body, init, jnp.arange(num_slices))
    return logits, iou, written, ended


@functools.partial(jax.jit, static_argnames=("decode_fn", "image_size", "mode", "vanish_policy", "mask_prompt"))
def propagate_volume(decode_fn: DecodeFn, variables, embeddings, start, lo, hi, start_prompt: Prompts,
                     table_points, table_labels, table_boxes=None, table_has_box=None, resized=None, previous=None,
                     anchor=None, *, image_size: int, mode: str = "mask", vanish_policy: str = "stop",
                     mask_prompt: str = "binary"):
    """Segments slice `start` with `start_prompt` (batch of one) and propagates to `lo` and `hi`.

    embeddings (Zp, e, e, C); start, lo, hi int scalars (traced: no recompilation per bound);
    table_points (Zp, P, 2), table_labels (Zp, P) stored corrections in model-input pixels;
    table_boxes (Zp, 4), table_has_box (Zp,) stored box prompts (None: none), re-sent when a scan
    passes their slice (the start slice's box, if any, belongs in `start_prompt`). mask_prompt: the
    model's mask-prompt encoding (ModelConfig.mask_prompt, `encode_mask_prompt`); resized (2,) the
    image's (h, w) within the S x S input (traced; None: all of it). An edit: previous (logits (Zp, m, m),
    iou (Zp,)) the object's current outputs and anchor (int scalar) its prompt slice; the direction
    from `start` towards `anchor` ends where its mask vanishes and leaves the slices it did not reach
    as they were (module docstring). A segmentation passes anchor = start (or None).
    Returns (logits (Zp, m, m) float32, primary-mask logits per slice, EMPTY_LOGIT outside [lo, hi]
    and on stopped slices; iou (Zp,) primary IoU prediction, NaN outside [lo, hi]).
    """
    if mode not in PROPAGATION_MODES:
        raise ValueError(f"propagation must be one of {PROPAGATION_MODES}, got {mode!r}")
    if vanish_policy not in VANISH_POLICIES:
        raise ValueError(f"vanish_policy must be one of {VANISH_POLICIES}, got {vanish_policy!r}")
    num_slices = embeddings.shape[0]
    if table_boxes is None:
        table_boxes = jnp.zeros((num_slices, 4), jnp.float32)
    if table_has_box is None:
        table_has_box = jnp.zeros((num_slices,), bool)
    emb0 = jax.lax.dynamic_index_in_dim(embeddings, start, keepdims=True)
    logits0, iou0 = decode_fn(variables, emb0, start_prompt)
    logits0, iou0 = logits0[0, 0].astype(jnp.float32), iou0[0, 0].astype(jnp.float32)
    m = logits0.shape[-1]

    step_logits, step_iou, written, ended = _scan_both_directions(
        decode_fn, variables, embeddings, logits0, start, lo, hi, table_points, table_labels, table_boxes, table_has_box,
        resized, start if anchor is None else anchor, image_size=image_size, mode=mode, vanish_policy=vanish_policy,
        mask_prompt=mask_prompt)
    # Step i, direction d wrote slice start + (1, -1)[d] * (i + 1); unwritten ones get index num_slices,
    # which mode="drop" discards.
    slices = start + jnp.arange(1, num_slices + 1)[:, None] * jnp.array([1, -1])
    if previous is not None:  # an edit's direction that ended before the prompt slice: its slices keep their masks
        step_logits = jnp.where(ended[..., None, None], previous[0][jnp.clip(slices, 0, num_slices - 1)], step_logits)
        step_iou = jnp.where(ended, previous[1][jnp.clip(slices, 0, num_slices - 1)], step_iou)
    idx = jnp.where(written, slices, num_slices)
    logits = jnp.full((num_slices, m, m), EMPTY_LOGIT, jnp.float32).at[idx].set(step_logits, mode="drop")
    iou = jnp.full((num_slices,), jnp.nan, jnp.float32).at[idx].set(step_iou, mode="drop")
    logits = logits.at[start].set(logits0)
    iou = iou.at[start].set(iou0)
    return logits, iou


@functools.partial(jax.jit, static_argnames=("mask_prompt",))
def start_prompt(points, point_labels, box, has_box, logits, start, use_current, resized=None, *,
                 mask_prompt: str = "binary") -> Prompts:
    """The prompt (batch of one) of the slice a segmentation or an edit starts from.

    points (P, 2), point_labels (P,), box (4,), has_box (): the user's prompt on slice `start`;
    logits (Zp, m, m) the object's current primary logits. Where `use_current` (an edit), the current
    mask of slice `start` joins the prompt as the mask prompt (encoded as `mask_prompt`), whatever
    the propagation mode: the paper's edit feeds the previous mask along with the correction points
    (section 3.5), and a mask + points prompt is in the training of RadSAM and of SAM alike; the mode
    only decides how the result then passes from slice to slice. resized: see `encode_mask_prompt`."""
    current = jnp.where(jnp.asarray(use_current, bool), jax.lax.dynamic_index_in_dim(logits, start, keepdims=False),
                        EMPTY_LOGIT)
    return single_prompt(points, point_labels, box, has_box, *encode_mask_prompt(current, mask_prompt, resized))


@functools.partial(jax.jit, static_argnames=("decode_fn", "all_masks"))
def decode_slices(decode_fn: DecodeFn, variables, embeddings, slice_indices, prompts: Prompts, all_masks: bool = False):
    """Slice-level prompting: one prompt per slice in one batched decoder call.

    slice_indices (B,) into embeddings (Zp, ...), index Zp for padding rows (dropped); prompts with
    batch B. Returns (logits (Zp, m, m), EMPTY_LOGIT on unprompted slices; iou (Zp,), NaN there);
    all_masks=True: every output mask, logits (Zp, M, m, m) and iou (Zp, M), index 0 the primary.
    """
    num_slices = embeddings.shape[0]
    emb = embeddings[jnp.clip(slice_indices, 0, num_slices - 1)]
    logits, iou = decode_fn(variables, emb, prompts)
    if not all_masks:
        logits, iou = logits[:, 0], iou[:, 0]
    out_logits = jnp.full((num_slices, *logits.shape[1:]), EMPTY_LOGIT, jnp.float32)
    out_iou = jnp.full((num_slices, *iou.shape[1:]), jnp.nan, jnp.float32)
    out_logits = out_logits.at[slice_indices].set(logits.astype(jnp.float32), mode="drop")
    out_iou = out_iou.at[slice_indices].set(iou.astype(jnp.float32), mode="drop")
    return out_logits, out_iou


@functools.partial(jax.jit, static_argnames=("decode_fn", "mask_prompt"))
def redecode_slices(decode_fn: DecodeFn, variables, embeddings, slice_indices, points, point_labels, boxes, has_box,
                    logits, iou, resized=None, *, mask_prompt: str = "binary"):
    """Slice-level edits: decodes slices again, each with its points (+ box) and its current mask as
    the mask prompt (encoded as `mask_prompt`), in one batched decoder call; no propagation.

    slice_indices (B,), index Zp for padding rows (dropped); points (B, P, 2), point_labels (B, P),
    boxes (B, 4), has_box (B,); logits (Zp, m, m), iou (Zp,) the current primary outputs; resized:
    see `encode_mask_prompt`. Returns them with the decoded slices replaced.
    """
    num_slices = embeddings.shape[0]
    rows = jnp.clip(slice_indices, 0, num_slices - 1)
    prompts = Prompts(points.astype(jnp.float32), point_labels.astype(jnp.int32), boxes.astype(jnp.float32),
                      has_box.astype(bool), *encode_mask_prompt(logits[rows], mask_prompt, resized))
    new_logits, new_iou = decode_fn(variables, embeddings[rows], prompts)
    logits = logits.at[slice_indices].set(new_logits[:, 0].astype(jnp.float32), mode="drop")
    iou = iou.at[slice_indices].set(new_iou[:, 0].astype(jnp.float32), mode="drop")
    return logits, iou
