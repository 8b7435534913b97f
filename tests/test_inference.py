"""Volume inference: propagation bookkeeping (stub decoder, known answer), the real decoder path end
to end against the per-slice loop, orientation handling, bucketing (compilation counts), bad input."""

import contextlib
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from radsam_jax.inference import SliceFrame, VolumePredictor, bucket_size
from radsam_jax.inference.propagation import (
    box_from_mask, decode_slices, encode_mask_prompt, propagate_volume, redecode_slices, single_prompt, start_prompt,
)
from radsam_jax.inference.reference import per_slice_loop
from radsam_jax.inference.volume_predictor import _logits_to_masks, default_encoder_batch_size
from radsam_jax.io import Volume
from radsam_jax.model import ModelConfig, RadSam, abstract_variables
from radsam_jax.model.sam import Sam, encode_images
from tiny_model import tiny_model_config


def random_variables(config: ModelConfig, seed: int = 0) -> dict:
    """Small random weights without running (or compiling) the Flax initialisers: fast on CPU."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        base = 1.0 if "scale" in name else 0.0  # layer-norm scales near 1
        return (base + rng.normal(0, 0.2, s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract_variables(config))


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_model_config()
    return RadSam(config, random_variables(config))


def synthetic_volume(shape=(40, 36, 20), affine=None, seed=0):
    """A water-like background with a bright ellipsoid (slices 5..14) and noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    ball = ((x - 20) / 10.0) ** 2 + ((y - 16) / 8.0) ** 2 + ((z - 10) / 5.0) ** 2 <= 1.0
    array = (rng.normal(0, 20, shape) + np.where(ball, 200.0, 0.0)).astype(np.float32)
    return Volume(array, np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine, "synthetic")


# ------------------------------------------------------------------------------------------------
# Propagation with a stub decoder: a known answer
# ------------------------------------------------------------------------------------------------

M = 16  # stub mask size
IMAGE = 64  # stub input size (4 input pixels per mask pixel)


def _dilate(mask):
    p = jnp.pad(mask, 1)
    return jnp.maximum(jnp.maximum(jnp.maximum(p[1:-1, 1:-1], p[:-2, 1:-1]), jnp.maximum(p[2:, 1:-1], p[1:-1, :-2])), p[1:-1, 2:])


def stub_decode(variables, embeddings, prompts):
    """Answer = the object on this slice (embedding channel 0 at mask resolution) restricted to what
    the prompt touches: the dilated mask prompt, the box, positive points (minus negative points).
    Batched like the real decoder: (B, M, M, 1) embeddings -> (B, 4, M, M) logits, (B, 4) IoU."""
    return jax.vmap(_stub_decode_one)(embeddings, prompts)


def _stub_decode_one(embedding, prompt):
    obj = embedding[:, :, 0] > 0  # (M, M): the stub's "embeddings" are already at mask size
    yy, xx = jnp.mgrid[0:M, 0:M]
    cx, cy = (xx + 0.5) * IMAGE / M, (yy + 0.5) * IMAGE / M
    region = jnp.where(prompt.has_mask, _dilate(prompt.mask) > 0, False)
    b = prompt.box
    pad = IMAGE / M  # the stub tolerates one mask pixel of drift, like the dilated mask prompt
    region |= prompt.has_box & (cx >= b[0] - pad) & (cx <= b[2] + 1 + pad) & (cy >= b[1] - pad) & (cy <= b[3] + 1 + pad)
    near = jnp.hypot(cx[None] - prompt.points[:, 0, None, None], cy[None] - prompt.points[:, 1, None, None]) < 6
    lab = prompt.point_labels[:, None, None]
    region |= jnp.any(near & (lab == 1), axis=0)
    # A positive point grows the region to its whole connected blob on this slice (good enough: one blob per slice).
    region = jnp.where(jnp.any(near & (lab == 1) & obj[None]), obj | region, region)
    region &= ~jnp.any(near & (lab == 0), axis=0)
    logits = jnp.where(obj & region, 5.0, -5.0)
    iou = jnp.where(jnp.any(obj & region), 0.9, 0.1)
    return jnp.broadcast_to(logits, (4, M, M)), jnp.broadcast_to(iou, (4,))


def stub_embeddings(num_slices=32):
    """Object A: a square drifting by one pixel per slice on slices 8..20; object B on 24..28."""
    e = np.zeros((num_slices, M, M, 1), np.float32) - 1
    for k in range(8, 21):
        s = (k - 8) // 3
        e[k, 4 + s: 9 + s, 5: 10, 0] = 1
    for k in range(24, 29):
        e[k, 2:5, 10:14, 0] = 1
    return jnp.asarray(e)


def run_stub(emb, start, lo, hi, prompt, table=None, mode="mask", vanish_policy="stop"):
    zp = emb.shape[0]
    tp = np.zeros((zp, 4, 2), np.float32) if table is None else table[0]
    tl = -np.ones((zp, 4), np.int32) if table is None else table[1]
    logits, iou = propagate_volume(stub_decode, {}, emb, jnp.int32(start), jnp.int32(lo), jnp.int32(hi), prompt,
                                   jnp.asarray(tp), jnp.asarray(tl), image_size=IMAGE, mode=mode, vanish_policy=vanish_policy)
    return np.asarray(logits) > 0, np.asarray(iou)


def point_prompt(x_px, y_px, label=1):
    pts = np.zeros((4, 2), np.float32)
    lab = -np.ones(4, np.int32)
    pts[0], lab[0] = (x_px, y_px), label
    return single_prompt(pts, lab, np.zeros(4), False, np.zeros((M, M)), False)


@pytest.mark.parametrize("mode", ["mask", "box"])
@pytest.mark.parametrize("vanish_policy", ["stop", "continue"])
@pytest.mark.parametrize("start", [10, 14, 18])  # object A spans 8..20: down, both or up ends first
def test_stub_propagation_known_answer(mode, vanish_policy, start):
    emb = stub_embeddings()
    obj = np.asarray(emb[..., 0] > 0)
    answer = obj.copy()
    answer[21:] = False  # object B is not connected to A through the slices
    # A positive point inside object A on every slice 8..20 (mask pixel (7, 7) -> input pixels ~ (30, 30)).
    masks, iou = run_stub(emb, start, 2, 30, point_prompt(7.5 * 4, 7.5 * 4), mode=mode, vanish_policy=vanish_policy)
    np.testing.assert_array_equal(masks, answer)
    assert np.isnan(iou[:2]).all() and np.isnan(iou[31:]).all()  # outside the bounds
    assert np.isfinite(iou[8:21]).all()
    if vanish_policy == "stop":  # the decoder runs on the first empty slice (21, 7), then no more
        assert np.isfinite(iou[[7, 21]]).all()
        assert np.isnan(iou[22:31]).all() and np.isnan(iou[2:7]).all()
    else:
        assert np.isfinite(iou[2:31]).all()


def test_stub_propagation_respects_bounds_and_corrections():
    emb = stub_embeddings()
    obj = np.asarray(emb[..., 0] > 0)
    masks, _ = run_stub(emb, 14, 11, 17, point_prompt(30, 30))
    expected = np.zeros_like(obj)
    expected[11:18] = obj[11:18]
    np.testing.assert_array_equal(masks, expected)

    # A stored positive correction on slice 26 (object B) restarts propagation there: 26..28.
    zp = emb.shape[0]
    tp, tl = np.zeros((zp, 4, 2), np.float32), -np.ones((zp, 4), np.int32)
    tp[26, 0], tl[26, 0] = (12.5 * 4, 3.5 * 4), 1
    # A stored negative correction on slice 10 cuts the top-left corner of object A there.
    tp[10, 0], tl[10, 0] = (5.5 * 4, 4.5 * 4), 0
    masks, _ = run_stub(emb, 14, 0, 31, point_prompt(30, 30), table=(tp, tl))
    assert masks[26:29].sum() == obj[26:29].sum() and not masks[24:26].any() and not masks[29:].any()
    assert masks[10].sum() < obj[10].sum() and not masks[10, 4, 5]
    np.testing.assert_array_equal(masks[11:21], obj[11:21])


@pytest.mark.parametrize("vanish_policy", ["stop", "continue"])
def test_an_edit_that_empties_its_slice_keeps_the_object_towards_the_prompt_slice(vanish_policy):
    emb = stub_embeddings()
    obj = np.asarray(emb[..., 0] > 0)  # object A on 8..20
    zp = emb.shape[0]
    table = (jnp.zeros((zp, 4, 2)), -jnp.ones((zp, 4), jnp.int32))
    kw = dict(image_size=IMAGE, mode="mask", vanish_policy=vanish_policy)
    previous = propagate_volume(stub_decode, {}, emb, jnp.int32(14), jnp.int32(2), jnp.int32(30), point_prompt(30, 30),
                                *table, **kw)
    # A click on slice 20 that empties it (as a click-following model would on a leaked slice):
    # going down, towards the prompt slice 14, the mask vanishes at once; 8..19 keep their masks.
    empty = point_prompt(30, 30, label=0)
    logits, iou = propagate_volume(stub_decode, {}, emb, jnp.int32(20), jnp.int32(2), jnp.int32(30), empty, *table,
                                   None, None, None, previous, jnp.int32(14), **kw)
    masks = np.asarray(logits) > 0
    np.testing.assert_array_equal(masks[:20], np.asarray(previous[0])[:20] > 0)
    np.testing.assert_array_equal(masks[8:20], obj[8:20])
    assert not masks[20:].any()
    np.testing.assert_array_equal(np.asarray(iou)[2:20], np.asarray(previous[1])[2:20])
    # Past the prompt slice the scan goes on under the policy: a previous leak there (21..25 above a
    # prompt on 26) is not kept once the re-propagation, reaching 26 with a mask, finds the object ended.
    leak = np.asarray(previous[0]).copy()
    leak[21:26] = np.where(obj[20], 5.0, -5.0)  # the previous result leaked onto 21..25
    logits, _ = propagate_volume(stub_decode, {}, emb, jnp.int32(10), jnp.int32(2), jnp.int32(30), point_prompt(30, 30),
                                 *table, None, None, None, (jnp.asarray(leak), previous[1]), jnp.int32(14), **kw)
    np.testing.assert_array_equal(np.asarray(logits) > 0, np.asarray(previous[0]) > 0)
    # The same click re-propagated as a new start (anchor = its own slice) erases everything: the old defect.
    erased = np.asarray(propagate_volume(stub_decode, {}, emb, jnp.int32(20), jnp.int32(2), jnp.int32(30), empty,
                                         *table, **kw)[0]) > 0
    assert not erased.any()


@pytest.mark.parametrize("mode", ["mask", "box"])
def test_stub_propagation_re_sends_stored_boxes(mode):
    emb = stub_embeddings()
    obj = np.asarray(emb[..., 0] > 0)
    zp = emb.shape[0]
    tp, tl = np.zeros((zp, 4, 2), np.float32), -np.ones((zp, 4), np.int32)
    boxes, has_box = np.zeros((zp, 4), np.float32), np.zeros((zp,), bool)
    boxes[26], has_box[26] = (10 * 4, 2 * 4, 14 * 4 - 1, 5 * 4 - 1), True  # around object B on slice 26
    args = (stub_decode, {}, emb, jnp.int32(14), jnp.int32(0), jnp.int32(31), point_prompt(30, 30), jnp.asarray(tp), jnp.asarray(tl))
    kw = dict(image_size=IMAGE, mode=mode, vanish_policy="stop")
    without = np.asarray(propagate_volume(*args, **kw)[0]) > 0
    assert not without[21:].any()  # object A vanishes at 21: the scan stops
    # A stored box on slice 26 is re-sent when the scan passes it and restarts the propagation there.
    masks = np.asarray(propagate_volume(*args, jnp.asarray(boxes), jnp.asarray(has_box), **kw)[0]) > 0
    np.testing.assert_array_equal(masks[:21], without[:21])
    assert masks[26:29].sum() == obj[26:29].sum() and not masks[21:26].any() and not masks[29:].any()


def _mask_flag_decode(variables, embeddings, prompts):
    """Answers +5 everywhere when the prompt carries a mask prompt, -5 otherwise."""
    logits = jnp.where(prompts.has_mask[:, None, None, None], 5.0, -5.0) * jnp.ones((1, 4, M, M))
    return logits, jnp.ones((embeddings.shape[0], 4))


def test_an_empty_mask_is_never_sent_as_a_mask_prompt():
    emb = stub_embeddings()
    # "continue": every slice from 2 to 30 is decoded; the start (a point) yields an empty mask, so no
    # slice may get a mask prompt (the old code sent the empty mask as one: +5 on every other slice).
    logits, _ = propagate_volume(_mask_flag_decode, {}, emb, jnp.int32(14), jnp.int32(2), jnp.int32(30),
                                 point_prompt(30, 30), jnp.zeros((32, 4, 2)), -jnp.ones((32, 4), jnp.int32),
                                 image_size=IMAGE, mode="mask", vanish_policy="continue")
    assert (np.asarray(logits)[2:31] == -5).all()
    # Slice-level edits: the current mask is the mask prompt only where it is non-empty.
    current = jnp.full((32, M, M), -5.0).at[3, 2:4, 2:4].set(5.0)
    out, _ = redecode_slices(_mask_flag_decode, {}, emb, jnp.array([3, 4]), jnp.zeros((2, 4, 2)),
                             -jnp.ones((2, 4), jnp.int32), jnp.zeros((2, 4)), jnp.zeros((2,), bool), current, jnp.zeros(32))
    assert (np.asarray(out[3]) == 5).all() and (np.asarray(out[4]) == -5).all()


def _mask_echo_decode(variables, embeddings, prompts):
    """Answers the mask prompt + 1 where one is sent, +5 everywhere otherwise: shows what was sent."""
    logits = jnp.where(prompts.has_mask[:, None, None], prompts.mask + 1.0, 5.0)
    b = embeddings.shape[0]
    return jnp.broadcast_to(logits[:, None], (b, 4, M, M)), jnp.ones((b, 4))


@pytest.mark.parametrize("encoding", ["binary", "logits"])
def test_mask_prompts_are_sent_in_the_models_encoding(encoding):
    emb = stub_embeddings()
    # Propagation from slice 14 to 10..18: each slice gets the previous one's mask as 0/1 (every
    # answer 1 + 1) or as its logits (the answer grows by 1 per slice away from the start).
    logits, _ = propagate_volume(_mask_echo_decode, {}, emb, jnp.int32(14), jnp.int32(10), jnp.int32(18),
                                 point_prompt(30, 30), jnp.zeros((32, 4, 2)), -jnp.ones((32, 4), jnp.int32),
                                 image_size=IMAGE, mode="mask", mask_prompt=encoding)
    distance = np.abs(np.arange(10, 19) - 14)
    expected = 5.0 + distance if encoding == "logits" else np.where(distance == 0, 5.0, 2.0)
    np.testing.assert_array_equal(np.asarray(logits)[10:19, 0, 0], expected)
    # Slice-level edit and volume edit: the current mask of the slice, in the same encoding.
    current = jnp.full((32, M, M), -5.0).at[3].set(3.0)
    sent = 3.0 if encoding == "logits" else 1.0
    out, _ = redecode_slices(_mask_echo_decode, {}, emb, jnp.array([3, 4]), jnp.zeros((2, 4, 2)), -jnp.ones((2, 4), jnp.int32),
                             jnp.zeros((2, 4)), jnp.zeros((2,), bool), current, jnp.zeros(32), mask_prompt=encoding)
    assert (np.asarray(out[3]) == sent + 1).all() and (np.asarray(out[4]) == 5).all()  # slice 4: empty, not sent
    pr = start_prompt(jnp.zeros((4, 2)), -jnp.ones((4,), jnp.int32), jnp.zeros(4), False, current, jnp.int32(3), True,
                      mask_prompt=encoding)
    assert bool(pr.has_mask[0]) and (np.asarray(pr.mask[0]) == sent).all()


@pytest.mark.parametrize("seed", range(4))
def test_binary_mask_prompt_is_the_one_training_makes_of_the_mask(tiny_model, seed):
    """What propagation sends for a slice's logits is what training makes into a prompt from the mask
    those logits show (data.pipeline.mask_to_prompt_np of logits_to_mask), on a slice of the input's
    own size (64 x 52 in a 64 px model: no resampling besides SAM's); thresholding the low-res
    logits directly marked extra edge pixels."""
    from radsam_jax.data.pipeline import InputSpec, mask_to_prompt_np, resize_linear
    from radsam_jax.inference.propagation import EMPTY_LOGIT
    from radsam_jax.preprocess import geometry, logits_to_mask

    config = tiny_model.config
    geo = geometry(config, 64, 52)
    assert geo.resized == (64, 52)
    rng = np.random.default_rng(seed)
    m = config.mask_size
    blobs = jax.image.resize(jnp.asarray(rng.normal(size=(4, 4)), jnp.float32), (m, m), "cubic")  # smooth shapes
    logits = np.asarray(blobs) * 4 - 1.0
    logits[:, 13:] = EMPTY_LOGIT  # columns beyond the 52-pixel image: padding
    prompt, sent = encode_mask_prompt(jnp.asarray(logits), "binary", jnp.asarray(geo.resized))
    visible = np.asarray(logits_to_mask(logits, geo))
    spec = InputSpec.from_model_config(config)
    expected = mask_to_prompt_np(visible, spec)
    assert bool(sent) == expected.any() and expected.any()
    # Binary masks averaged over 2x2... windows make exact halves: there the two float32 roundings
    # (JAX's and the pipeline's NumPy) may fall either side of 0.5.
    padded = np.zeros((64, 64), np.float32)
    padded[:, :52] = visible
    coverage = resize_linear(padded, (config.mask_size,) * 2, antialias=True)
    differ = (np.asarray(prompt) > 0) != expected
    assert np.all(np.abs(coverage[differ] - 0.5) < 1e-6), np.argwhere(differ)
    assert ((logits > 0) != expected).any() or seed  # the low-res threshold is another mask (checked on seed 0)


def test_start_prompt_for_segment_and_edit():
    m = 16
    logits = jnp.full((4, m, m), -5.0).at[2, 3:6, 7:9].set(5.0)
    pts, lab = jnp.zeros((4, 2)), -jnp.ones((4,), jnp.int32)
    box = jnp.asarray([1.0, 2.0, 30.0, 40.0])
    # segment (no current mask): the user's prompt only
    pr = start_prompt(pts, lab, box, True, logits, jnp.int32(2), False)
    assert bool(pr.has_box[0]) and not bool(pr.has_mask[0]) and not np.asarray(pr.mask).any()
    np.testing.assert_allclose(np.asarray(pr.box[0]), np.asarray(box))
    # edit: stored box + current mask (+ the clicks), whatever the propagation mode
    pr = start_prompt(pts, lab, box, True, logits, jnp.int32(2), True)
    assert bool(pr.has_box[0]) and bool(pr.has_mask[0])
    np.testing.assert_array_equal(np.asarray(pr.mask[0]), np.asarray(logits[2] > 0))
    pr = start_prompt(pts, lab, jnp.zeros(4), False, logits, jnp.int32(2), True)
    assert not bool(pr.has_box[0]) and bool(pr.has_mask[0])
    # edit on a slice the current mask misses: no mask prompt (the model never saw an empty one)
    pr = start_prompt(pts, lab, box, True, logits, jnp.int32(1), True)
    assert bool(pr.has_box[0]) and not bool(pr.has_mask[0])


def test_box_from_mask():
    mask = jnp.zeros((16, 16)).at[3:6, 7:9].set(1)
    box, ok = box_from_mask(mask, 64)
    assert bool(ok)
    np.testing.assert_allclose(np.asarray(box), [28, 12, 35, 23])
    _, ok = box_from_mask(jnp.zeros((16, 16)), 64)
    assert not bool(ok)


# ------------------------------------------------------------------------------------------------
# Orientation
# ------------------------------------------------------------------------------------------------


def test_slice_frame_matches_nibabel_canonical():
    rng = np.random.default_rng(0)
    array = rng.normal(size=(5, 7, 3))
    for perm, s0, s1 in itertools.product([(0, 1), (1, 0)], [1, -1], [1, -1]):
        affine = np.eye(4)
        affine[:3, :3] = 0
        affine[perm[0], 0], affine[perm[1], 1], affine[2, 2] = 2.0 * s0, 2.0 * s1, 3.0
        frame = SliceFrame.from_affine(affine, array.shape)
        canon = nib.as_closest_canonical(nib.Nifti1Image(array, affine)).get_fdata()
        np.testing.assert_allclose(frame.to_canonical(array), canon)
        np.testing.assert_allclose(frame.from_canonical(frame.to_canonical(array)), array)
        # The voxel at file (x, y) lands at canonical points_to_canonical((x, y)).
        x, y = 3, 5
        cx, cy = frame.points_to_canonical([x, y]).astype(int)
        assert frame.to_canonical(array)[cx, cy, 1] == array[x, y, 1]
        np.testing.assert_allclose(frame.points_from_canonical([cx, cy]), [x, y])


def test_slice_frame_of_a_coronal_file_slices_along_its_s_axis():
    affine = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # axes R, S, A
    array = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    frame = SliceFrame.from_affine(affine, array.shape)
    assert frame.slice_axis == 1 and frame.shape == (4, 6)
    canon = frame.to_canonical(array)  # (R, A, S)
    assert canon.shape == (4, 6, 5) and canon[1, 2, 3] == array[1, 3, 2]
    np.testing.assert_array_equal(frame.from_canonical(canon), array)


def test_predictor_segments_a_sagittal_file_as_its_axial_twin(tiny_model):
    """The same voxels stored sagittally, (A, S, R): slices index S, x runs along A and y along R; the
    mask comes back on the sagittal grid, equal to the axial result re-indexed."""
    vol = synthetic_volume()
    stored = np.ascontiguousarray(np.transpose(vol.array, (1, 2, 0)))  # stored[a, s, r] = array[r, a, s]
    sagittal = Volume(stored, vol.affine[:, [1, 2, 0, 3]], "sagittal")
    assert "".join(nib.aff2axcodes(sagittal.affine)) == "ASR"
    p = VolumePredictor(tiny_model, bucket=32, vanish_policy="continue")
    p.set_volume(vol)
    r1 = p.segment(10, points=[[20, 16]], point_labels=[1], box=[12, 9, 28, 23], bounds=(4, 15))
    p.set_volume(sagittal)
    assert p.num_slices == vol.array.shape[2]
    r2 = p.segment(10, points=[[16, 20]], point_labels=[1], box=[9, 12, 23, 28], bounds=(4, 15))
    assert r1.mask.any() and r2.mask.shape == stored.shape
    np.testing.assert_array_equal(r2.mask, np.transpose(r1.mask, (1, 2, 0)))
    np.testing.assert_allclose(r1.iou, r2.iou, rtol=1e-5, equal_nan=True)


def test_thick_sagittal_slices_draw_a_warning(tiny_model):
    """A 2D sagittal series (4 mm between sagittal slices, 0.5 mm in plane) gives axial slices of
    0.5 x 4 mm pixels: set_volume says so (nothing is resampled)."""
    affine = np.zeros((4, 4))
    affine[1, 0], affine[2, 1], affine[0, 2], affine[3, 3] = 0.5, 0.5, 4.0, 1.0  # axes A, S, R
    p = VolumePredictor(tiny_model, bucket=32)
    with pytest.warns(UserWarning, match=r"mr_sag: its axial slices have pixels of 0.5 x 4 mm"):
        p.set_volume(Volume(synthetic_volume().array, affine, "mr_sag"))
    assert p.frame.slice_axis == 1


def test_predictor_is_orientation_invariant(tiny_model):
    """The same anatomy stored transposed and flipped (L, P in-plane) gives the same mask, mapped back."""
    vol = synthetic_volume()
    # Stored file: array'[i, j, k] = array[n0-1-j', ...]: build from an affine that is (P, L, S).
    stored = np.ascontiguousarray(np.flip(np.flip(np.swapaxes(vol.array, 0, 1), 0), 1))
    n0, n1 = vol.array.shape[:2]
    affine = np.zeros((4, 4))
    affine[0, 1] = -1.5  # stored axis 1 runs R->L
    affine[1, 0] = -1.5  # stored axis 0 runs A->P
    affine[2, 2], affine[3, 3] = 3.0, 1.0
    affine[0, 3], affine[1, 3] = 1.5 * (n0 - 1), 1.5 * (n1 - 1)
    stored_vol = Volume(stored, affine, "stored")
    assert "".join(nib.aff2axcodes(affine)) == "PLS"
    p = VolumePredictor(tiny_model, bucket=32, vanish_policy="continue")
    p.set_volume(vol)
    r1 = p.segment(10, points=[[20, 16]], point_labels=[1], box=[12, 9, 28, 23], bounds=(4, 15))
    p.set_volume(stored_vol)
    # File point (x, y) = (20, 16) in RAS is at stored (n1-1-16, n0-1-20).
    sx, sy = n1 - 1 - 16, n0 - 1 - 20
    r2 = p.segment(10, points=[[sx, sy]], point_labels=[1], box=[n1 - 1 - 23, n0 - 1 - 28, n1 - 1 - 9, n0 - 1 - 12], bounds=(4, 15))
    back = np.flip(np.flip(r2.mask, 0), 1).swapaxes(0, 1)
    assert r1.mask.shape == vol.array.shape and r2.mask.shape == stored.shape
    np.testing.assert_array_equal(back, r1.mask)
    np.testing.assert_allclose(r1.iou, r2.iou, rtol=1e-5, equal_nan=True)
    # All 4 slice-level masks come back through the same orientation code as the primary one.
    s2 = p.segment_slices({10: {"points": [[sx, sy]], "point_labels": [1]}}, all_masks=True)
    p.set_volume(vol)
    s1 = p.segment_slices({10: {"points": [[20, 16]], "point_labels": [1]}}, all_masks=True)
    assert s1.all_masks.shape == (4, *vol.array.shape) and s1.all_masks.dtype == np.uint8
    assert s2.all_masks.shape == (4, *stored.shape)
    np.testing.assert_array_equal(s1.all_masks[0], s1.mask)
    np.testing.assert_array_equal(np.flip(np.flip(s2.all_masks, 1), 2).swapaxes(1, 2), s1.all_masks)


# ------------------------------------------------------------------------------------------------
# The real decoder path, end to end
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("propagation,encoding", [("mask", "binary"), ("box", "binary"), ("mask", "logits")])
def test_scan_matches_per_slice_loop(tiny_model, propagation, encoding):
    vol = synthetic_volume()
    model = RadSam(dataclasses.replace(tiny_model.config, mask_prompt=encoding), tiny_model.variables)
    p = VolumePredictor(model, encoder_batch_size=4, bucket=32, vanish_policy="continue")
    p.set_volume(vol)
    result = p.segment(10, points=[[20, 16]], point_labels=[1], bounds=(3, 17), propagation=propagation)
    ref_logits, ref_iou, _ = per_slice_loop(p, 10, points=[[20, 16]], point_labels=[1], bounds=(3, 17), propagation=propagation)
    logits = np.asarray(result.logits)[: p.num_slices]
    # Float32 decoders fused differently: ~1e-6 of the logits' scale (about 8) per slice when a binary
    # mask goes to the next slice. Logits sent on (SAM's encoding) meet the mask downscaler's LayerNorms
    # (eps 1e-6) on near-constant 2x2 patches, which scale a difference by up to 1 / sqrt(eps) = 1e3:
    # 1e3 x 1.2e-7 (float32 epsilon) x 8 = 1e-3 (measured: 6e-4 two slices from the start).
    atol = 1e-4 if encoding == "binary" else 2e-3
    np.testing.assert_allclose(logits, ref_logits, atol=atol, rtol=1e-5)
    np.testing.assert_allclose(result.iou, ref_iou, atol=1e-5, equal_nan=True)
    assert result.mask.dtype == np.uint8 and result.mask.shape == vol.array.shape
    assert not result.mask[:, :, :3].any() and not result.mask[:, :, 18:].any()
    assert np.isnan(result.iou[:3]).all() and np.isfinite(result.iou[3:18]).all()
    # Only the slices in the bounds were encoded (lazily).
    assert p._encoded[3:18].all() and not p._encoded[:3].any() and not p._encoded[18:].any()


def test_edit_re_propagates_and_remembers(tiny_model):
    vol = synthetic_volume()
    p = VolumePredictor(tiny_model, bucket=32, vanish_policy="continue")
    p.set_volume(vol)
    p.segment(10, box=[12, 9, 28, 23], bounds=(4, 15))
    before = int(p._encoded.sum())
    r1 = p.edit(12, [[20, 16]], [0])
    assert int(p._encoded.sum()) == before  # edits never re-run the encoder
    assert (p._state.table_labels[12] == 0).sum() == 1
    r2 = p.edit(6, [[21, 15]], [1])
    # Both corrections are stored; re-propagating from 6 passes 12 and re-applies its point.
    assert (p._state.table_labels[12] == 0).sum() == 1 and (p._state.table_labels[6] == 1).sum() == 1
    assert r2.mask.shape == vol.array.shape and r2.bounds == (4, 15)
    assert not r1.mask[:, :, :4].any() and not r2.mask[:, :, 16:].any()


def test_segment_slices_batched(tiny_model):
    vol = synthetic_volume()
    p = VolumePredictor(tiny_model, bucket=32)
    p.set_volume(vol)
    prompts = {7: {"box": [12, 9, 28, 23]}, 10: {"points": [[20, 16]], "point_labels": [1]}, 12: {"box": [14, 10, 26, 22]}}
    r = p.segment_slices(prompts)
    assert np.isfinite(r.iou[[7, 10, 12]]).all() and np.isnan(np.delete(r.iou, [7, 10, 12])).all()
    assert not np.delete(r.mask, [7, 10, 12], axis=2).any()
    # Same answer as volume-level prompting restricted to that single slice.
    single = p.segment(10, points=[[20, 16]], point_labels=[1], bounds=(10, 10))
    np.testing.assert_array_equal(single.mask[:, :, 10], r.mask[:, :, 10])


def _predict(model, p, k, points, labels, box=None, mask=None):
    """Reference: one slice decoded on its own from the predictor's cached embedding."""
    logits, iou = model.predict(p.embeddings[k][None], np.asarray(points)[None], np.asarray(labels)[None],
                                None if box is None else np.asarray(box)[None],
                                None if mask is None else np.asarray(mask, np.float32)[None])
    return np.asarray(logits[0, 0]), float(iou[0, 0])


def _mask_prompt(p, logits):
    """The mask prompt the predictor makes of a slice's current low-res logits (`encode_mask_prompt`,
    tested on its own by test_binary_mask_prompt_is_the_one_training_makes_of_the_mask), not `logits > 0`."""
    return np.asarray(encode_mask_prompt(jnp.asarray(logits), p.config.mask_prompt, jnp.asarray(p._resized))[0])


def test_segment_slices_all_masks(tiny_model):
    vol = synthetic_volume()
    p = VolumePredictor(tiny_model, bucket=32)
    p.set_volume(vol)
    prompts = {7: {"box": [12, 9, 28, 23]}, 10: {"points": [[20, 16]], "point_labels": [1]}}
    plain = p.segment_slices(prompts)
    r = p.segment_slices(prompts, all_masks=True)
    assert plain.all_masks is None
    assert r.all_masks.shape == (4, *vol.array.shape) and r.all_masks.dtype == np.uint8
    np.testing.assert_array_equal(r.mask, plain.mask)
    np.testing.assert_array_equal(r.all_masks[0], r.mask)
    np.testing.assert_allclose(r.iou, plain.iou, equal_nan=True)
    assert not np.delete(r.all_masks, [7, 10], axis=3).any()
    # The secondary masks are the decoder's outputs 1..3 (here: mapped through the identity frame).
    logits, _ = decode_slices(p.decode_fn, p.variables, p.embeddings, jnp.asarray([10], jnp.int32),
                              single_prompt(*p._points_to_model([[20, 16]], [1]), np.zeros(4), False,
                                            np.zeros((16, 16)), False), all_masks=True)
    for i in range(1, 4):
        expected = np.asarray(_logits_to_masks(logits[:, i], geo=p.geo, preprocessing=p.config.preprocessing))[10]
        np.testing.assert_array_equal(r.all_masks[i][:, :, 10], expected.T)
    assert r.all_masks[1:].any()


def test_edit_slices_batched_without_propagation(tiny_model):
    vol = synthetic_volume()
    p = VolumePredictor(tiny_model, bucket=32)
    p.set_volume(vol)
    box = [12, 9, 28, 23]
    p.segment_slices({7: {"box": box}, 10: {"points": [[20, 16]], "point_labels": [1]}, 12: {"box": [14, 10, 26, 22]}})
    before = p._state
    r = p.edit_slices({7: ([[20, 16]], [0]), 10: ([[22, 17], [15, 12]], [1, 0])})
    after = p._state
    assert (after.table_labels[7] != -1).sum() == 1 and (after.table_labels[10] != -1).sum() == 3
    # Each slice: its stored points + stored box + its current mask, decoded once; others unchanged.
    for k, bx in ((7, p._box_to_model(box)), (10, None)):
        ref, ref_iou = _predict(tiny_model, p, k, after.table_points[k], after.table_labels[k], bx,
                                _mask_prompt(p, before.logits[k]))
        np.testing.assert_allclose(np.asarray(r.logits[k]), ref, atol=1e-4, rtol=1e-5)
        assert r.iou[k] == pytest.approx(ref_iou, abs=1e-5)
    untouched = [k for k in range(p.padded_slices) if k not in (7, 10)]
    np.testing.assert_array_equal(np.asarray(r.logits)[untouched], np.asarray(before.logits)[untouched])
    assert r.bounds == (7, 12)
    # Another round (different slices, different count) re-uses the compiled batch; `edit` is the
    # same path for one slice.
    n = redecode_slices._cache_size()
    p.edit_slices({12: ([[20, 16]], [1])})
    r2 = p.edit(7, [[18, 14]], [1])
    assert redecode_slices._cache_size() == n and (p._state.table_labels[7] != -1).sum() == 2
    assert not np.delete(r2.mask, [7, 10, 12], axis=2).any()
    r3 = p.edit_slices({15: ([[20, 16]], [1])})  # a slice no prompt segmented: the bounds now reach it
    assert r3.bounds == (7, 15) and np.isfinite(r3.iou[15]) and p._state.hi == 15
    with pytest.raises(ValueError, match="at least one correction point"):
        p.edit_slices({7: ([], [])})
    with pytest.raises(ValueError, match="must be \\(points, point_labels\\)"):
        p.edit_slices({7: [[1, 2]]})
    p.segment(10, box=box, bounds=(8, 12))
    with pytest.raises(RuntimeError, match="slice-level"):
        p.edit_slices({10: ([[20, 16]], [1])})


def test_segment_from_a_drawn_mask(tiny_model):
    """The paper's drawn-mask prompt: slice k decoded from the mask alone (at the mask-prompt
    resolution training uses), then propagated; on a flipped file the same drawing gives the flipped mask."""
    from radsam_jax.data.pipeline import InputSpec, mask_to_prompt_np

    vol = synthetic_volume()
    p = VolumePredictor(tiny_model, bucket=32, vanish_policy="continue")
    p.set_volume(vol)
    drawn = np.zeros(vol.array.shape[:2], bool)
    drawn[12:29, 9:24] = True
    r = p.segment(10, mask=drawn, bounds=(6, 14))
    low = mask_to_prompt_np(drawn.T, InputSpec.from_model_config(tiny_model.config))  # identity frame: model rows = y
    ref, ref_iou = _predict(tiny_model, p, 10, np.zeros((1, 2)), [-1], None, low)
    np.testing.assert_allclose(np.asarray(r.logits[10]), ref, atol=1e-4, rtol=1e-5)
    assert r.iou[10] == pytest.approx(ref_iou, abs=1e-5)
    assert np.isfinite(r.iou[6:15]).all() and np.isnan(np.delete(r.iou, range(6, 15))).all()
    flipped = VolumePredictor(tiny_model, bucket=32, vanish_policy="continue")
    flipped.set_volume(Volume(vol.array[::-1].copy(), np.diag([-1.5, 1.5, 3.0, 1.0]), "flipped"))
    np.testing.assert_array_equal(flipped.segment(10, mask=drawn[::-1], bounds=(6, 14)).mask, r.mask[::-1])
    for bad, message in ((drawn[:, :30], r"mask must have the shape of slice 10 of the volume's array, \(40, 36\), got \(40, 30\)"),
                         (drawn * 2, r"mask must be binary \(bool or 0/1\), got values \[0, 2\]"),
                         (np.zeros_like(drawn), "mask is empty: draw the object on slice 10")):
        with pytest.raises(ValueError, match=message):
            p.segment(10, mask=bad)
    sam_like = VolumePredictor(RadSam(dataclasses.replace(tiny_model.config, mask_prompt="logits"), tiny_model.variables), bucket=32)
    sam_like.set_volume(vol)
    with pytest.raises(ValueError, match="a drawn mask prompt needs a model trained on binary mask prompts"):
        sam_like.segment(10, mask=drawn)


def test_box_is_stored_and_re_sent_on_edits(tiny_model):
    vol = synthetic_volume()
    p = VolumePredictor(tiny_model, bucket=32, vanish_policy="continue")
    p.set_volume(vol)
    box = [12, 9, 28, 23]
    bx = p._box_to_model(box)
    p.segment(10, box=box, bounds=(4, 15))
    state = p._state
    assert state.table_has_box[10] and state.table_has_box.sum() == 1
    np.testing.assert_allclose(state.table_boxes[10], bx)
    # An edit on the box's slice: box + points + current mask.
    r1 = p.edit(10, [[20, 16]], [0])
    ref, _ = _predict(tiny_model, p, 10, p._state.table_points[10], p._state.table_labels[10], bx,
                      _mask_prompt(p, state.logits[10]))
    np.testing.assert_allclose(np.asarray(r1.logits[10]), ref, atol=1e-4, rtol=1e-5)
    # A re-propagation passing slice 10 (edit on 6, going up) re-sends the box there, with slice 9's mask.
    r2 = p.edit(6, [[21, 15]], [1])
    prev = _mask_prompt(p, r2.logits[9])
    pts, labels = p._state.table_points[10], p._state.table_labels[10]
    ref, _ = _predict(tiny_model, p, 10, pts, labels, bx, prev)
    np.testing.assert_allclose(np.asarray(r2.logits[10]), ref, atol=1e-4, rtol=1e-5)
    without_box, _ = _predict(tiny_model, p, 10, pts, labels, None, prev)
    assert not np.allclose(ref, without_box, atol=2e-3)  # the box does matter here
    assert p._state.table_has_box.sum() == 1  # edits do not add boxes


def test_encoder_uses_the_models_attention(tiny_model, monkeypatch):
    from radsam_jax.inference import volume_predictor

    seen = []
    original = volume_predictor._encode_into

    def spy(*args, **kw):
        seen.append(kw["attention"])
        return original(*args, **kw)

    monkeypatch.setattr(volume_predictor, "_encode_into", spy)
    vol = synthetic_volume()
    fused = VolumePredictor(RadSam(tiny_model.config, tiny_model.variables, attention="fused"), bucket=32, encoder_batch_size=4)
    fused.set_volume(vol)
    fused.encode_slices(8, 11)
    assert seen == ["fused"]
    chunked = VolumePredictor(tiny_model, bucket=32, encoder_batch_size=4)
    chunked.set_volume(vol)
    chunked.encode_slices(8, 11)
    assert seen == ["fused", "chunked"]
    np.testing.assert_allclose(np.asarray(fused.embeddings[8:12]), np.asarray(chunked.embeddings[8:12]), atol=1e-5, rtol=1e-5)


def test_encode_slices_refuses_indices_outside_the_volume(tiny_model):
    """A negative lo wrapped: the slices were marked encoded while the padding rows got their embeddings."""
    p = VolumePredictor(tiny_model, bucket=32)
    p.set_volume(synthetic_volume())
    for lo, hi, match in ((-2, 19, "lo -2 is outside the image, which has slices 0..19"),
                          (0, 20, "hi 20 is outside the image"), (2.5, 3, "lo index must be an integer, got 2.5"),
                          (5, 4, "encode_slices needs lo <= hi, got 5 > 4")):
        with pytest.raises(ValueError, match=match):
            p.encode_slices(lo, hi)
    assert not p._encoded.any() and not np.asarray(p.embeddings).any()
    assert p.encode_slices(18, 19) == 2 and np.asarray(p.embeddings[18:20]).any()


def test_bfloat16_runs(tiny_model):
    p = VolumePredictor(tiny_model, dtype=jnp.bfloat16, bucket=32, encoder_batch_size=3)
    p.set_volume(synthetic_volume())
    r = p.segment(10, box=[12, 9, 28, 23], bounds=(8, 12))
    assert p.embeddings.dtype == jnp.bfloat16
    assert r.mask.shape == (40, 36, 20) and np.isfinite(r.iou[8:13]).all()


# ------------------------------------------------------------------------------------------------
# Buckets: a new volume does not recompile
# ------------------------------------------------------------------------------------------------


def test_bucket_size():
    assert bucket_size(1, 32) == 32 and bucket_size(32, 32) == 32 and bucket_size(33, 32) == 64
    assert bucket_size(20, (16, 64, 128)) == 64 and bucket_size(200, (16, 64, 128)) == 256


@contextlib.contextmanager
def backend_compiles():
    """Collects every XLA compilation (jitted functions and eager ops alike) inside the block."""
    events = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(kw.get("fun_name", event))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_new_volume_in_same_bucket_does_not_recompile(tiny_model, monkeypatch):
    p = VolumePredictor(tiny_model, bucket=32, encoder_batch_size=4)
    p.set_volume(synthetic_volume((40, 36, 20), seed=1))
    p.segment(10, box=[12, 9, 28, 23], bounds=(3, 17))
    caches = lambda: (propagate_volume._cache_size(), start_prompt._cache_size(), encode_images._cache_size(),
                      _logits_to_masks._cache_size())
    counts = caches()
    # segment -> edit -> edit: the edits go through the segment's path and compile nothing at all.
    with backend_compiles() as compiled:
        p.edit(12, [[20, 16]], [0])
        p.edit(5, [[21, 15]], [1])
    assert compiled == [] and caches() == counts
    # Another volume: different slice count (27), same bucket (32); other prompts, bounds, propagation.
    # Not even traced again: tracing the encoder costs more than encoding a small volume.
    traces, encode = [], Sam.encode
    monkeypatch.setattr(Sam, "encode", lambda module, images: traces.append(images.shape) or encode(module, images))
    p.set_volume(synthetic_volume((40, 36, 27), seed=2))
    with backend_compiles() as compiled:
        p.segment(20, points=[[5, 6], [30, 30]], point_labels=[1, 0], bounds=(0, 26))
        p.edit(3, [[20, 16]], [1])
        p.edit(22, [[20, 16]], [0])
        p.segment(13, box=[10, 10, 20, 20], bounds=(13, 13))
    assert caches() == counts and traces == []
    assert not [name for name in compiled if "propagate" in str(name) or "prompt" in str(name)], compiled
    # A slice count in the next bucket compiles the propagation once more (and only once).
    p.set_volume(synthetic_volume((40, 36, 40), seed=3))
    p.segment(20, box=[12, 9, 28, 23], bounds=(10, 30))
    p.segment(25, box=[12, 9, 28, 23], bounds=(0, 39))
    assert propagate_volume._cache_size() == counts[0] + 1
    # Another in-plane size (and bucket): the encoder is neither traced nor compiled again, only the
    # small programs around it are (a dataset of varied sizes compiled the encoder per volume).
    with backend_compiles() as compiled:
        p.set_volume(synthetic_volume((48, 30, 70), seed=4))
        p.segment(30, box=[12, 9, 28, 23], bounds=(20, 40))
    assert traces == [] and encode_images._cache_size() == counts[2]
    # Named programs (and the new bucket's buffers), not the 35-50 eager operations (upscaling
    # matrices) that a new size compiled before.
    programs = {"jit(_preprocess_chunk)", "jit(_store_embeddings)", "jit(start_prompt)", "jit(propagate_volume)",
                "jit(_upscale_matrix)", "jit(_logits_to_masks)", "jit(stage)", "jit(broadcast_in_dim)"}
    assert set(map(str, compiled)) <= programs and compiled.count("jit(broadcast_in_dim)") <= 2, compiled


# ------------------------------------------------------------------------------------------------
# Bad input through the Python API
# ------------------------------------------------------------------------------------------------


def test_encoder_batch_size_default_and_check(tiny_model):
    assert (default_encoder_batch_size("cpu"), default_encoder_batch_size("gpu")) == (1, 8)
    assert VolumePredictor(tiny_model).encoder_batch_size == default_encoder_batch_size(jax.default_backend())
    with pytest.raises(ValueError, match="encoder_batch_size must be a positive integer, got 0"):
        VolumePredictor(tiny_model, encoder_batch_size=0)


def test_bad_prompts_raise_clear_errors(tiny_model):
    p = VolumePredictor(tiny_model)
    with pytest.raises(RuntimeError, match="set_volume"):
        p.segment(3, box=[1, 1, 5, 5])
    p.set_volume(synthetic_volume())
    with pytest.raises(ValueError, match=r"point \(50, 3\) is outside the image"):
        p.segment(10, points=[[50, 3]], point_labels=[1])
    with pytest.raises(ValueError, match="slice 25 is outside the image"):
        p.segment(25, box=[1, 1, 5, 5])
    with pytest.raises(ValueError, match="slice 3 is outside the bounds 5..15"):
        p.segment(3, box=[1, 1, 5, 5], bounds=(5, 15))
    with pytest.raises(ValueError, match="lo=15 > hi=5"):
        p.segment(10, box=[1, 1, 5, 5], bounds=(15, 5))
    with pytest.raises(ValueError, match="needs a prompt"):
        p.segment(10)
    with pytest.raises(RuntimeError, match="call segment"):
        p.edit(10, [[3, 3]], [1])
    with pytest.raises(ValueError, match="3D"):
        p.set_volume(Volume(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)))
