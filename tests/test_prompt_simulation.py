"""Prompt simulation: drawn magnitudes stay in range, prompts land where they should."""

import json
from pathlib import Path

import numpy as np
import pytest

from radsam_jax.data import prompt_simulation as ps

SHARED = Path(__file__).parents[2] / "shared"
NIFTI_CASE = SHARED / "data" / "ct-abdomen-3mm"


def _ellipse(h=96, w=128, cy=50, cx=60, ry=20, rx=30):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def test_morphology_matches_definitions():
    m = np.zeros((9, 9), bool)
    m[4, 4] = True
    cross = ps.dilate(m, 1, "cross")
    assert cross.sum() == 5 and cross[3, 4] and cross[4, 3] and not cross[3, 3]
    assert ps.dilate(m, 1, "square").sum() == 9
    assert ps.dilate(m, 2, "cross").sum() == 13  # diamond of radius 2
    block = np.zeros((9, 9), bool)
    block[2:7, 2:7] = True
    assert ps.erode(block, 1, "square").sum() == 9
    assert ps.erode(block, 1, "cross").sum() == 9
    # An object on the border is not eaten from the border side.
    edge = np.zeros((5, 5), bool)
    edge[:, :3] = True
    assert ps.erode(edge, 1).sum() == 10 and ps.erode(edge, 1)[:, 0].all()


def test_point_and_box():
    rng = np.random.default_rng(0)
    mask = _ellipse()
    for _ in range(50):
        x, y = ps.positive_point(mask, rng).astype(int)
        assert mask[y, x]
    tight = ps.bounding_box(mask)
    for _ in range(200):
        box, jitter = ps.jittered_box(mask, rng, (-5, 20))
        assert ((jitter >= -5) & (jitter <= 20)).all()
        assert 0 <= box[0] <= box[2] <= mask.shape[1] - 1 and 0 <= box[1] <= box[3] <= mask.shape[0] - 1
        expected = np.clip(tight + np.array([-1, -1, 1, 1]) * jitter, 0, [127, 95, 127, 95])
        np.testing.assert_allclose(box, expected, atol=1e-4)
    # A shrinking jitter larger than the object keeps a valid (collapsed) box.
    tiny = np.zeros((20, 20), bool)
    tiny[10, 10] = True
    box, _ = ps.jittered_box(tiny, rng, (-5, -5))
    assert box[0] <= box[2] and box[1] <= box[3]


def test_correction_points_labels():
    rng = np.random.default_rng(1)
    target = _ellipse()
    pred = np.roll(target, 8, axis=1)
    pts, labels = ps.correction_points(pred, target, rng, 30)
    assert pts.shape == (30, 2) and labels.shape == (30,)
    for (x, y), lab in zip(pts.astype(int), labels):
        assert pred[y, x] != target[y, x]
        assert lab == int(target[y, x])  # missed object -> 1, false positive -> 0
    assert set(labels.tolist()) == {0, 1}
    pts, labels = ps.correction_points(target, target, rng, 3)
    assert pts.shape == (0, 2)


def _check_drawn(drawn, cfg):
    assert abs(drawn["rotation_deg"]) <= cfg.rotation_deg
    assert 1 - cfg.scale <= drawn["scale"] <= 1 + cfg.scale
    assert abs(drawn["translation_x"]) <= cfg.translation and abs(drawn["translation_y"]) <= cfg.translation
    assert 0 <= drawn["erosion_steps"] <= cfg.erosion_steps
    assert 0 <= drawn["dilation_steps"] <= cfg.dilation_steps
    assert 0 <= drawn["erosion_applied"] <= round(cfg.erosion_steps * cfg.steps_scale)


def _iou_report(name, ious):
    ious = np.asarray(ious)
    p = np.percentile(ious, [5, 25, 50, 75, 95])
    print(f"\n{name}: IoU(perturbed, true) over {ious.size}: mean {ious.mean():.3f} min {ious.min():.3f} "
          f"p5 {p[0]:.3f} p25 {p[1]:.3f} p50 {p[2]:.3f} p75 {p[3]:.3f} p95 {p[4]:.3f}")
    return ious


def test_perturb_mask_magnitudes_and_iou_on_synthetic_shapes():
    rng = np.random.default_rng(2)
    cfg = ps.MaskPerturbation()
    shapes = [_ellipse(256, 256, 128, 128, 60, 40), _ellipse(256, 256, 100, 150, 15, 25)]
    square = np.zeros((256, 256), bool)
    square[80:160, 60:200] = True
    shapes.append(square)
    ious = []
    for i in range(150):
        mask = shapes[i % len(shapes)]
        out, drawn = ps.perturb_mask(mask, rng, cfg)
        _check_drawn(drawn, cfg)
        assert out.dtype == bool and out.any()
        ious.append(ps.iou(out, mask))
    ious = _iou_report("synthetic 256", ious)
    # Noisy enough not to be copied, close enough to be a neighbouring slice's mask.
    assert 0.4 < ious.mean() < 0.95 and ious.max() < 1.0


def test_perturb_mask_respects_custom_ranges_and_keeps_small_objects():
    rng = np.random.default_rng(3)
    cfg = ps.MaskPerturbation(rotation_deg=1.0, scale=0.02, translation=0.05, erosion_steps=2, dilation_steps=0)
    small = np.zeros((32, 32), bool)
    small[15:17, 15:17] = True
    for _ in range(50):
        out, drawn = ps.perturb_mask(small, rng, cfg)
        _check_drawn(drawn, cfg)
        assert drawn["dilation_applied"] == 0
        assert out.any()  # erosion never erases the object
    none = ps.MaskPerturbation(rotation_deg=0, scale=0, translation=0, erosion_steps=0, dilation_steps=0)
    mask = _ellipse()
    out, _ = ps.perturb_mask(mask, rng, none)
    np.testing.assert_array_equal(out, mask)


@pytest.mark.skipif(not NIFTI_CASE.exists(), reason="shared/data not present")
def test_perturb_mask_iou_on_real_liver_slices():
    from radsam_jax import io
    from radsam_jax.data.pipeline import InputSpec, mask_to_prompt_np

    vol = io.load_volume(NIFTI_CASE / "ct.nii.gz")
    labels = io.load_label_map(NIFTI_CASE / "labels.nii.gz", vol)
    liver = {n: int(k) for k, n in json.loads((NIFTI_CASE / "labels.json").read_text())["label_map"].items()}["liver"]
    areas = (labels == liver).sum(axis=(0, 1))
    slices = np.flatnonzero(areas > 50)
    spec = InputSpec(1024, 256, "sam", (0, 0, 0), (1, 1, 1))
    rng = np.random.default_rng(4)
    cfg = ps.MaskPerturbation()
    ious = []
    for k in slices[:: max(1, len(slices) // 10)]:
        prompt = mask_to_prompt_np(labels[:, :, k].T == liver, spec)
        for _ in range(5):
            out, drawn = ps.perturb_mask(prompt, rng, cfg)
            _check_drawn(drawn, cfg)
            ious.append(ps.iou(out, prompt))
    ious = _iou_report("liver, 256 mask prompt", ious)
    assert 0.4 < ious.mean() < 0.97
