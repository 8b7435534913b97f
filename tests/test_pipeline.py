"""Grain pipeline: batch format, determinism, state save/restore, sharding, workers, validation."""

import dataclasses
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radsam_jax.data import datasets, pipeline
from radsam_jax.model.config import ModelConfig
from data_fixtures import write_amos, write_generic

SHARED = Path(__file__).parents[2] / "shared"
MODEL = ModelConfig(image_size=64)  # mask prompt 16 x 16
S, M = 64, 16


@pytest.fixture(scope="module")
def amos_root(tmp_path_factory):
    return write_amos(tmp_path_factory.mktemp("amos"))


def _config(root, **overrides):
    c = pipeline.default_data_config()
    c.format = "amos"
    c.root = str(root)
    c.min_area = 4
    c.read_threads = 1
    c.prefetch_buffer_size = 1
    c.include_sample_ids = True
    c.prompts.num_points = 3
    for k, v in overrides.items():
        c[k] = v
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_equal_batches(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_default_config_has_a_comment_per_field():
    source = Path(pipeline.__file__).read_text()
    body = source[source.index("def default_data_config"): source.index("return c\n")]
    for line in body.splitlines():
        if line.strip().startswith("c.") and "= ml_collections.ConfigDict()" not in line and "ConfigDict(" not in line:
            assert "#" in line, f"config field without a comment: {line.strip()}"


def test_batch_format_and_prompt_invariants(amos_root):
    it = pipeline.make_data_iterator(_config(amos_root), MODEL, split="train", batch_size=4, seed=0,
                                     shard_index=0, shard_count=1)
    batches = _take(it, 4)
    b = batches[0]
    expected = {"image": ((4, S, S, 3), np.float32), "target": ((4, S, S), np.uint8),
                "points": ((4, 3, 2), np.float32), "point_labels": ((4, 3), np.int32),
                "box": ((4, 4), np.float32), "has_box": ((4,), np.bool_),
                "mask": ((4, M, M), np.float32), "has_mask": ((4,), np.bool_), "sample_id": ((4,), np.int64)}
    assert set(b) == set(expected)
    for k, (shape, dtype) in expected.items():
        assert b[k].shape == shape and b[k].dtype == dtype, k
    for b in batches:
        assert b["target"].reshape(4, -1).max(axis=1).min() == 1  # every sample holds its object
        assert set(np.unique(b["mask"])) <= {0.0, 1.0}
        assert set(np.unique(b["point_labels"])) <= {-1, 0, 1}
        for i in range(4):
            has_prompt = b["has_box"][i] or b["has_mask"][i] or (b["point_labels"][i] >= 0).any()
            assert has_prompt
            for (x, y), lab in zip(b["points"][i], b["point_labels"][i]):
                if lab == 1 and not b["has_mask"][i]:  # a plain positive point lies on the object
                    assert b["target"][i, int(y), int(x)] == 1
            if b["has_box"][i]:
                x0, y0, x1, y1 = b["box"][i]
                assert 0 <= x0 <= x1 <= S - 1 and 0 <= y0 <= y1 <= S - 1
            if not b["has_mask"][i]:
                assert not b["mask"][i].any()


def test_same_seed_same_batches_and_state_restore(amos_root):
    cfg = _config(amos_root)
    kwargs = dict(split="train", batch_size=2, shard_index=0, shard_count=1)
    a = _take(pipeline.make_data_iterator(cfg, MODEL, seed=3, **kwargs), 3)
    it = pipeline.make_data_iterator(cfg, MODEL, seed=3, **kwargs)
    b = _take(it, 3)
    for x, y in zip(a, b):
        _assert_equal_batches(x, y)
    c = next(pipeline.make_data_iterator(cfg, MODEL, seed=4, **kwargs))
    assert not np.array_equal(a[0]["image"], c["image"]) or not np.array_equal(a[0]["sample_id"], c["sample_id"])
    # Save the state after 3 batches; a fresh iterator restored from it continues identically.
    state = it.get_state()
    expected = _take(it, 2)
    restored = pipeline.make_data_iterator(cfg, MODEL, seed=3, **kwargs)
    restored.set_state(state)
    for x, y in zip(expected, _take(restored, 2)):
        _assert_equal_batches(x, y)


def test_shards_are_disjoint_and_epochs_cover_the_shard(amos_root):
    cfg = _config(amos_root, augment=dict(_config(amos_root).augment.to_dict(), enabled=False))
    cfg.prompts.mixture = dict(point=0.0, box=1.0, mask=0.0, mask_points=0.0, box_mask=0.0)
    _, index = pipeline.load_split(cfg, "train")
    n = len(index)
    seen = []
    for shard in range(2):
        it = pipeline.make_data_iterator(cfg, MODEL, split="train", batch_size=1, seed=0, shard_index=shard,
                                         shard_count=2, num_epochs=1)
        seen.append([int(b["sample_id"][0]) for b in it])
    assert len(seen[0]) == len(seen[1]) == n // 2
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0])) == n // 2  # one epoch visits each sample of the shard once
    # Two epochs: the second is a different permutation of the same samples.
    it = pipeline.make_data_iterator(cfg, MODEL, split="train", batch_size=1, seed=0, shard_index=0,
                                     shard_count=2, num_epochs=2)
    ids = [int(b["sample_id"][0]) for b in it]
    assert sorted(ids[: n // 2]) == sorted(ids[n // 2:]) and ids[: n // 2] != ids[n // 2:]


def test_block_shuffle_keeps_cases_together():
    cases = np.repeat(np.arange(6), 10)
    order = pipeline.EpochOrder(np.arange(60), cases, seed=0, num_epochs=1, shuffle=True, cases_per_block=2)
    got = cases[order.epoch_order(0)]
    for b in range(3):  # each block of 20 samples comes from 2 cases
        assert len(set(got[b * 20: (b + 1) * 20])) == 2


def test_two_workers_match_in_process(amos_root):
    cfg = _config(amos_root)
    kwargs = dict(split="train", batch_size=2, seed=1, shard_index=0, shard_count=1)
    local = _take(pipeline.make_data_iterator(cfg, MODEL, **kwargs), 3)
    cfg.num_workers = 2
    it = pipeline.make_data_iterator(cfg, MODEL, **kwargs)
    workers = _take(it, 3)
    for x, y in zip(local, workers):
        _assert_equal_batches(x, y)
    # A terminal's Ctrl-C reaches the workers too: they ignore it (training saves, then ends them).
    import multiprocessing
    import signal

    children = multiprocessing.active_children()
    assert len(children) >= 2
    for child in children:
        os.kill(child.pid, signal.SIGINT)
    for child in children:
        child.join(timeout=1.0)  # returns at once if the signal ended it
    assert all(child.is_alive() for child in children)
    # Restoring a saved state rewinds the worker pipeline (one iterator: spawning workers is slow).
    state = it.get_state()
    nxt = next(it)
    next(it)
    it.set_state(state)
    _assert_equal_batches(nxt, next(it))


def test_numpy_preprocessing_matches_jax():
    from radsam_jax import preprocess

    hu = np.random.default_rng(0).normal(0, 300, (50, 37)).astype(np.float32)
    for config in (MODEL, ModelConfig(image_size=64, preprocessing="medsam")):
        spec = pipeline.InputSpec.from_model_config(config)
        expected = np.asarray(preprocess.preprocess_ct_slices(hu[None], config, (40.0, 400.0)))[0]
        np.testing.assert_allclose(pipeline.preprocess_slice(hu, spec, 40.0, 400.0), expected, atol=1e-4)
    # Without a window: the one the model was trained with.
    windowed = dataclasses.replace(MODEL, ct_window=(60.0, 350.0))
    np.testing.assert_array_equal(np.asarray(preprocess.preprocess_ct_slices(hu[None], windowed)),
                                  np.asarray(preprocess.preprocess_ct_slices(hu[None], MODEL, (60.0, 350.0))))


def test_each_prompt_type_carries_its_prompts():
    # Inference sends every combination: an edited box slice gets box + mask + clicks (slice-level
    # protocol: a prompt point + up to 10 clicks), so training draws each, with up to P points.
    spec = pipeline.InputSpec(S, M, "sam", (0, 0, 0), (1, 1, 1))
    target = np.zeros((S, S), np.uint8)
    target[10:40, 20:50] = 1
    small = pipeline.mask_to_prompt_np(target.astype(bool), spec)
    settings = pipeline.PromptSettings.from_config(pipeline.default_data_config(), spec)
    assert settings.num_points == 11
    expected = {"point": (False, False, True), "box": (True, False, False), "mask": (False, True, False),
                "mask_points": (False, True, True), "box_mask": (True, True, False),
                "box_mask_points": (True, True, True)}
    assert set(expected) == set(pipeline.PROMPT_TYPES) == set(dict(settings.mixture))
    rng = np.random.default_rng(0)
    for kind, (box, mask, points) in expected.items():
        counts = set()
        for _ in range(200 if points else 1):
            prompt = pipeline.simulate_prompt(target, small, kind, settings, spec, rng)
            assert (bool(prompt["has_box"]), bool(prompt["has_mask"])) == (box, mask), kind
            assert prompt["points"].shape == (11, 2) and prompt["point_labels"].shape == (11,)
            counts.add(int((prompt["point_labels"] >= 0).sum()))
        if kind.endswith("_points"):  # correction clicks: 1..P, where the noisy mask errs
            assert min(counts) >= 1 and max(counts) >= 9, (kind, sorted(counts))
        else:
            assert counts == ({1} if points else {0}), (kind, counts)


def test_thin_objects_keep_a_target_and_a_prompt_when_shrunk_more_than_twice():
    # Plain bilinear reads the two source rows nearest each output row: shrinking a 512 slice to a
    # 64 input, a one- or two-pixel-thick object between them vanished (an empty target, then a crash).
    for size, image_size in ((512, 64), (768, 256)):
        spec = pipeline.InputSpec(image_size, image_size // 4, "sam", (0, 0, 0), (1, 1, 1))
        for first in range(size // image_size):
            for thickness in (1, 2):
                for horizontal in (True, False):
                    mask = np.zeros((size, size), bool)
                    lines = slice(first, first + thickness)
                    mask[(lines, slice(100, 140)) if horizontal else (slice(100, 140), lines)] = True
                    where = f"{size}->{image_size}, rows {first}..{first + thickness - 1}, horizontal {horizontal}"
                    target = pipeline.mask_to_input(mask, spec)
                    assert target.any(), where
                    assert pipeline.mask_to_prompt_np(mask, spec).any(), where
                    # Nowhere but where the object is: within one input pixel of it.
                    rows, cols = np.nonzero(target)
                    scale = image_size / size
                    extent = (rows, cols) if horizontal else (cols, rows)
                    assert extent[0].max() <= (first + thickness) * scale + 1, where
                    assert extent[1].min() >= 100 * scale - 1 and extent[1].max() <= 140 * scale + 1, where
    # Objects the plain resize keeps are unchanged (> 0.5 of bilinear).
    mask = np.zeros((512, 512), bool)
    mask[100:300, 50:200] = True
    spec = pipeline.InputSpec(64, 16, "sam", (0, 0, 0), (1, 1, 1))
    expected = pipeline.resize_linear(mask.astype(np.float32), (64, 64), antialias=False) > 0.5
    np.testing.assert_array_equal(pipeline.mask_to_input(mask, spec), expected)


def test_validation_slices_are_deterministic_and_padded(tmp_path):
    root = write_generic(tmp_path / "gen")
    cfg = _config(root, format="generic", val_max_samples=5)
    a = list(pipeline.iterate_slices(cfg, MODEL, split="val", batch_size=2))
    b = list(pipeline.iterate_slices(cfg, MODEL, split="val", batch_size=2))
    assert len(a) == 3 and a[-1]["valid"].tolist() == [True, False]
    for x, y in zip(a, b):
        _assert_equal_batches(x, y)
    assert all(x["has_box"].all() and not x["has_mask"].any() for x in a)
    # A tight box: exactly the target's bounding box.
    t = a[0]["target"][0]
    ys, xs = np.nonzero(t)
    np.testing.assert_array_equal(a[0]["box"][0], [xs.min(), ys.min(), xs.max(), ys.max()])


@pytest.mark.skipif(not (SHARED / "data").exists(), reason="shared/data not present")
def test_real_data_train_on_nifti_validate_on_dicom():
    cfg = pipeline.default_data_config()
    cfg.format = "generic"
    cfg.root = str(SHARED / "data" / "ct-abdomen-3mm")
    cfg.val_root = str(SHARED / "data" / "ct-thorax-abdomen-dicom")
    cfg.structures = ("liver", "spleen")
    cfg.read_threads = 1
    cfg.prefetch_buffer_size = 1
    batch = next(pipeline.make_data_iterator(cfg, MODEL, split="train", batch_size=2, seed=0,
                                             shard_index=0, shard_count=1))
    assert batch["image"].shape == (2, S, S, 3) and batch["target"].any(axis=(1, 2)).all()
    val = next(pipeline.iterate_slices(cfg, MODEL, split="val", batch_size=2, max_samples=4))
    assert val["image"].shape == (2, S, S, 3) and val["valid"].all()


def test_augment_keeps_image_and_label_aligned():
    from radsam_jax.data import augment

    yy, xx = np.mgrid[0:60, 0:80]
    label = (((yy - 30) / 12.0) ** 2 + ((xx - 35) / 20.0) ** 2 <= 1).astype(np.uint8)
    hu = np.where(label == 1, 500.0, -1000.0).astype(np.float32)
    cfg = augment.AugmentConfig(probability=1.0, noise_std_hu=0.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        out_hu, out_label, drawn = augment.augment_slice(hu, label, rng, cfg)
        assert abs(drawn["rotation_deg"]) <= cfg.rotation_deg and abs(drawn["shear_deg"]) <= cfg.shear_deg
        assert 1 - cfg.zoom <= drawn["zoom"] <= 1 + cfg.zoom
        assert out_label.dtype == label.dtype and set(np.unique(out_label)) <= {0, 1}
        inside = out_hu[out_label == 1]
        assert inside.size and np.mean(inside > 0) > 0.95  # the label still covers the bright object
    identity = augment.AugmentConfig(probability=1.0, rotation_deg=0, shear_deg=0, zoom=0, translation=0, noise_std_hu=0)
    out_hu, out_label, _ = augment.augment_slice(hu, label, rng, identity)
    np.testing.assert_allclose(out_hu, hu, atol=1e-3)
    np.testing.assert_array_equal(out_label, label)
    level, width = augment.jitter_window(40.0, 400.0, 20.0, 0.2, rng)
    assert 20 <= level <= 60 and 320 <= width <= 480


def test_training_validation_reads_the_smaller_of_both_caps(amos_root):
    """data.val_max_samples and eval.max_batches x the eval batch both cap a training validation
    (<= 0: no cap), and the slices are spread evenly over the split."""
    from radsam_jax.train import loop
    from radsam_jax.train.config_lib import base_config

    c = base_config()
    c.data = _config(amos_root)
    total = len(pipeline.load_split(c.data, "val")[1])

    def count(val_max_samples, max_batches):
        c.data.val_max_samples, c.eval.max_batches = val_max_samples, max_batches
        return sum(int(weight.sum()) for _, weight in loop.validation_batches(c, MODEL, 2))

    assert total > 6
    assert count(3, 10) == 3
    assert count(0, 2) == count(9, 2) == 4
    assert count(5, -1) == 5
    assert count(0, -1) == total


def test_training_reads_the_validation_index_once(amos_root, monkeypatch):
    """Building the slice index reads every volume of the split: a run keeps it from its first
    validation, so later validations read each sampled volume once, not twice."""
    from radsam_jax.train import loop
    from radsam_jax.train.config_lib import base_config

    c = base_config()
    c.data = _config(amos_root)
    loaded = []
    real = datasets.load_case
    monkeypatch.setattr(datasets, "load_case", lambda case, **kw: loaded.append(case.case_id) or real(case, **kw))

    def validate(held_out=None):
        loaded.clear()
        weights = [w for _, w in loop.validation_batches(c, MODEL, 2, held_out)]
        return sum(int(w.sum()) for w in weights), list(loaded)

    held_out = loop.held_out_split(c)
    cases = [case.case_id for case in held_out[0]]
    assert validate() == (len(held_out[1]), cases + cases)  # the index, then the samples' volumes
    assert validate(held_out) == validate(held_out) == (len(held_out[1]), cases)


def test_a_selected_structure_no_slice_shows_is_named(tmp_path, caplog):
    """labels.json names "absent" (id 3) but no voxel holds it: selected, it would silently not be trained on."""
    root = write_generic(tmp_path / "gen")
    with caplog.at_level(logging.WARNING, logger="radsam_jax.data.pipeline"):
        pipeline.load_split(_config(root, format="generic", structures=("organ", "bone")), "train")
        assert "not trained or validated on" not in caplog.text
        _, index = pipeline.load_split(_config(root, format="generic", structures=("organ", "absent")), "train")
    assert set(index.label.tolist()) == {1}
    assert "no slice holds absent with >= " in caplog.text, caplog.text


def test_volumes_that_do_not_look_like_hu_are_named_once(tmp_path, caplog):
    root = write_generic(tmp_path / "gen")
    image = nib.load(root / "b" / "ct.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) + 2000, image.affine), root / "b" / "ct.nii.gz")  # MR-like, >= 0
    cases = datasets.read_cases("generic", root, "all")
    with caplog.at_level(logging.WARNING, logger="radsam_jax.data.pipeline"):
        for _ in range(2):  # each validation makes a new cache
            cache = pipeline.VolumeCache(cases, size=1)
            for i in (0, 1, 0, 1):
                cache.get(i)
    assert caplog.text.count("has no value below 0") == 1 and "case b (" in caplog.text, caplog.text
    assert 'give its labels.json "modality": "MR" and set data.intensity="percentile"' in caplog.text


def test_mri_needs_percentile_intensities(amos_root, tmp_path, caplog):
    for modality in ("MRI", "all"):
        with pytest.raises(ValueError, match="Hounsfield"):
            pipeline.make_data_iterator(_config(amos_root, modality=modality), MODEL, split="train", batch_size=2,
                                        seed=0, shard_index=0, shard_count=1)
    with pytest.raises(ValueError, match="data.modality 'MRI' with data.intensity 'hu'.*data.intensity=\"percentile\""):
        pipeline.check_modality(_config(amos_root, modality="MRI"))
    pipeline.check_modality(_config(amos_root, modality="MRI", intensity="percentile"))
    with pytest.raises(ValueError, match="data.intensity 'zscore' is not one of hu, percentile"):
        pipeline.check_modality(_config(amos_root, intensity="zscore"))
    root = write_generic(tmp_path / "gen")
    meta = json.loads((root / "b" / "labels.json").read_text())
    (root / "b" / "labels.json").write_text(json.dumps({**meta, "modality": "MR"}))
    with pytest.raises(ValueError, match=r"case\(s\) b \(MR\) under .* are not CT"):
        next(pipeline.iterate_slices(_config(root, format="generic"), MODEL, split="val", batch_size=2))
    with caplog.at_level(logging.WARNING, logger="radsam_jax.data.pipeline"):
        next(pipeline.iterate_slices(_config(root, format="generic", intensity="percentile", window_level=500.0,
                                             window_width=1000.0), MODEL, split="val", batch_size=2))
    # Case a is still CT: normalising it by percentiles is allowed, with a warning.
    assert "1 CT case(s) under" in caplog.text and "(a) are normalised by their percentiles" in caplog.text
    with pytest.raises(ValueError, match="datasets.amos.modality 'all' with datasets.amos.intensity 'hu'.*"
                                         "set datasets.amos.modality=\"MRI\" and datasets.amos.intensity="):
        pipeline.check_modality(_config(amos_root, modality="all"), "datasets.amos")


def _mr_amos(root, scale: float):
    """The AMOS fixture's MR cases (> 500) as MR-like data: HU + 1000 (background 0) times `scale`."""
    write_amos(root, train=(501, 503), val=(502,))
    for image in root.glob("images*/*.nii.gz"):
        nii = nib.load(str(image))
        mr = np.clip(np.asarray(nii.dataobj, np.float32) + 1000.0, 0, None) * np.float32(scale)
        nib.save(nib.Nifti1Image(mr, nii.affine), str(image))
    return root


def test_percentile_intensities_make_batches_independent_of_the_mr_scale(tmp_path):
    """MR values have no absolute scale: the same scans stored at another scale give the same batches,
    and each cached volume is the percentile-normalised one (p0.5..p99.5 of voxels > 0 -> 0..1000)."""
    batches = []
    for scale in (1.0, 3.7):
        cfg = _config(_mr_amos(tmp_path / f"mr{scale}", scale), modality="MRI", intensity="percentile",
                      window_level=500.0, window_width=1000.0)
        it = pipeline.make_data_iterator(cfg, MODEL, split="train", batch_size=2, seed=0, shard_index=0,
                                         shard_count=1)
        batches.append(_take(it, 3))
        cases, _ = pipeline.load_split(cfg, "train")
        cached, _ = pipeline.VolumeCache(cases, 1, "percentile").get(0)
        raw = datasets.load_case(cases[0], canonical=True)[0].array
        np.testing.assert_allclose(np.percentile(cached[raw > 0], (0.5, 99.5)), (0.0, 1000.0), atol=1e-2)
    for a, b in zip(*batches):
        assert a.keys() == b.keys()
        for k in a:
            # float32 rounding of a rescaled volume only (images are mean/std-normalised, |x| < 3)
            np.testing.assert_allclose(a[k], b[k], atol=1e-4, err_msg=k)
    assert np.ptp(batches[0][0]["image"]) > 1.0  # not a blank window


def test_slice_index_cache_is_reused_and_rebuilt_when_a_file_changes(amos_root, tmp_path, monkeypatch):
    cases = pipeline.load_cases(_config(amos_root), "train")
    cache = tmp_path / "index_cache"
    built = pipeline.build_slice_index(cases, 4, str(cache))
    assert [p.name for p in cache.iterdir()] == [f"slice-index-{pipeline._index_key(cases, 4)}.npz"]  # no temp left
    reads = []
    real_load = datasets.load_case
    monkeypatch.setattr(datasets, "load_case", lambda *a, **k: reads.append(a) or real_load(*a, **k))
    cached = pipeline.build_slice_index(cases, 4, str(cache))
    assert reads == []  # from the cache, no volume read
    for field in dataclasses.fields(built):
        np.testing.assert_array_equal(getattr(cached, field.name), getattr(built, field.name))
    image = Path(cases[0].image_path)
    stat = image.stat()
    os.utime(image, (stat.st_atime, stat.st_mtime + 60))  # a rewritten case file: another key, a rebuild
    try:
        pipeline.build_slice_index(cases, 4, str(cache))
    finally:
        os.utime(image, (stat.st_atime, stat.st_mtime))
    assert len(reads) == len(cases) and len(list(cache.iterdir())) == 2


def test_slice_index_key_follows_every_file_of_a_nested_dicom_series(tmp_path):
    series = tmp_path / "case" / "study" / "series"  # a series folder one level down, as PACS exports it
    series.mkdir(parents=True)
    for i in range(3):
        (series / f"{i}.dcm").write_bytes(b"x" * 10)
    case = datasets.Case("case", str(tmp_path / "case"), {"liver": 1}, label_path=str(tmp_path / "labels.nii.gz"))
    (tmp_path / "labels.nii.gz").write_bytes(b"y")
    before = pipeline._index_key([case], 1)
    stat = (series / "1.dcm").stat()
    os.utime(series / "1.dcm", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, rewritten
    assert pipeline._index_key([case], 1) != before
