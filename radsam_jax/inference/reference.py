"""The straightforward per-slice loop that `propagate_volume` replaces: a correctness reference for
tests and the baseline of benchmarks/volume_inference.py.

For each slice: encode it (batch of one), decode, copy the logits to the host, build the next
prompt in NumPy. Same model frame, prompts and vanish policy as `VolumePredictor.segment`.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from radsam_jax.inference.propagation import EMPTY_LOGIT, encode_mask_prompt
from radsam_jax.preprocess import preprocess_ct_slices


def _np_box_from_mask(mask: np.ndarray, image_size: int):
    m = mask.shape[-1]
    ys, xs = np.nonzero(mask > 0)
    if xs.size == 0:
        return np.zeros(4, np.float32), False
    s = image_size / m
    return np.array([xs.min() * s, ys.min() * s, (xs.max() + 1) * s - 1, (ys.max() + 1) * s - 1], np.float32), True


def per_slice_loop(predictor, slice_index, points=None, point_labels=None, box=None, bounds=None, propagation="mask"):
    """Volume-level segmentation slice by slice on the host. `predictor` has a volume set (its
    frame, geometry and device slices (in its intensity's units) are used; its embedding cache is not).

    Returns (logits (Z, m, m) np.float32 in the model frame, EMPTY_LOGIT where not segmented,
    iou (Z,), timings {"encode_s", "decode_s", "total_s"}).
    """
    model, config = predictor.model, predictor.config
    if predictor.dtype != model.dtype:
        model = model.with_options(dtype=predictor.dtype)
    lo, hi = predictor._check_bounds(bounds, slice_index)
    pts, labels = predictor._points_to_model(points, point_labels)
    bx = predictor._box_to_model(box) if box is not None else None
    m = config.mask_size
    z = predictor.num_slices
    resized = np.asarray(predictor.geo.resized, np.int32)
    logits_out = np.full((z, m, m), EMPTY_LOGIT, np.float32)
    iou_out = np.full((z,), np.nan, np.float32)
    timings = {"encode_s": 0.0, "decode_s": 0.0}

    def run(k, p, lab, b, mask):
        t = time.perf_counter()
        image = preprocess_ct_slices(predictor._slices[k][None], config, predictor.window)
        emb = jax.block_until_ready(model.encode_image(image))
        timings["encode_s"] += time.perf_counter() - t
        t = time.perf_counter()
        logits, iou = model.predict(emb, p[None], lab[None], None if b is None else b[None], None if mask is None else mask[None])
        logits, iou = np.asarray(logits[0, 0]), float(iou[0, 0])  # copy to host
        timings["decode_s"] += time.perf_counter() - t
        return logits, iou

    t0 = time.perf_counter()
    logits0, iou0 = run(slice_index, pts, labels, bx, None)
    logits_out[slice_index], iou_out[slice_index] = logits0, iou0
    no_pts = np.zeros((1, 2), np.float32), -np.ones((1,), np.int32)
    for step, stop in ((1, hi), (-1, lo)):
        prev = logits0
        for k in range(slice_index + step, stop + step, step):
            # The mask as the scan sends it (the model's encoding; never empty).
            mask, sent = (np.asarray(x) for x in encode_mask_prompt(prev, config.mask_prompt, resized))
            present = sent if propagation == "mask" else (prev > 0).any()
            if predictor.vanish_policy == "stop" and not present:
                break  # later slices stay empty
            if propagation == "mask":
                logits, iou = run(k, *no_pts, None, mask if sent else None)
            else:
                b, ok = _np_box_from_mask(prev, config.image_size)
                logits, iou = run(k, *no_pts, b if ok else None, None)
            logits_out[k], iou_out[k] = logits, iou
            prev = logits
    timings["total_s"] = time.perf_counter() - t0
    return logits_out, iou_out, timings
