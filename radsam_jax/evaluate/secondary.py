"""STOPGAP for the oracle Dice: all 4 output masks (primary + 3 secondary) of slice-level prompts.

`VolumePredictor` only returns the primary mask. Until it offers e.g.
`segment_slices(prompts, all_masks=True)` -> VolumeResult with `.all_masks` (4, X, Y, Z) uint8, this
module decodes the same prompts again from the predictor's cached embeddings. It reaches into the
predictor's private prompt conversion (`_points_to_model`, `_box_to_model`) and
`volume_predictor._logits_to_masks`, so it is kept apart here, to be deleted when that API lands.
Call it right after `predictor.segment_slices(prompts)` (which encodes the slices).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from radsam_jax.prompts import Prompts

CHUNK = 16  # slices decoded (and upscaled x4 masks) per call: bounds device memory


@functools.partial(jax.jit, static_argnames=("decode_fn",))
def _decode_all(decode_fn, variables, embeddings, indices, prompts: Prompts):
    logits, _ = decode_fn(variables, embeddings[indices], prompts)
    return logits.astype(jnp.float32)  # (B, 4, m, m)


def slice_level_all_masks(predictor, prompts: dict) -> np.ndarray:
    """(M, X, Y, Z) uint8: every output mask (index 0 primary, 1.. secondary) of the slice prompts
    {slice: {"points", "point_labels", "box"}} on the volume's grid; unprompted slices are empty."""
    from radsam_jax.inference.volume_predictor import _logits_to_masks

    items = sorted(prompts.items())
    n_slices = predictor.num_slices
    m = predictor.config.mask_size
    canon = None
    for start in range(0, len(items), CHUNK):
        chunk = items[start: start + CHUNK]
        b = CHUNK
        idx = np.zeros((b,), np.int32)
        pts = np.zeros((b, predictor.max_points, 2), np.float32)
        labels = -np.ones((b, predictor.max_points), np.int32)
        boxes = np.zeros((b, 4), np.float32)
        has_box = np.zeros((b,), bool)
        for i, (k, p) in enumerate(chunk):
            idx[i] = int(k)
            pts[i], labels[i] = predictor._points_to_model(p.get("points"), p.get("point_labels"))
            if p.get("box") is not None:
                boxes[i], has_box[i] = predictor._box_to_model(p["box"]), True
        batch = Prompts(jnp.asarray(pts), jnp.asarray(labels), jnp.asarray(boxes), jnp.asarray(has_box),
                        jnp.zeros((b, m, m), jnp.float32), jnp.zeros((b,), bool))
        logits = _decode_all(predictor.decode_fn, predictor.variables, predictor.embeddings, jnp.asarray(idx), batch)
        num_masks = logits.shape[1]
        masks = _logits_to_masks(logits.reshape(b * num_masks, m, m), geo=predictor.geo,
                                 preprocessing=predictor.config.preprocessing)
        masks = np.asarray(masks).reshape(b, num_masks, *masks.shape[1:])  # (B, M, H, W) model frame
        if canon is None:
            h, w = masks.shape[2:]
            canon = np.zeros((num_masks, n_slices, h, w), np.uint8)
        for i, (k, _) in enumerate(chunk):
            canon[:, int(k)] = masks[i]
    if canon is None:
        raise ValueError("slice_level_all_masks needs at least one slice prompt")
    out = [np.ascontiguousarray(predictor.frame.from_canonical(np.transpose(c, (2, 1, 0))), dtype=np.uint8) for c in canon]
    return np.stack(out)
