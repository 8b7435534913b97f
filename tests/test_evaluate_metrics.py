"""Benchmark metrics and the simulated user, without a model: exact Dice on synthetic cases (also
through the runner with a scripted predictor), bootstrap CI vs. the normal approximation, oracle,
correction clicks only on error voxels with the right label, report schema."""

import json
from pathlib import Path

import numpy as np
import pytest

from radsam_jax.evaluate import metrics, report, runner, simulated_user as su


def cube(shape=(20, 18, 16), lo=(4, 5, 3), hi=(12, 13, 11)):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


# ------------------------------------------------------------------------------------------ Dice


def test_dice_known_values():
    gt = cube()  # 8 x 8 x 8 = 512 voxels
    assert metrics.dice(gt, gt) == 1.0
    assert metrics.dice(np.zeros_like(gt), gt) == 0.0
    assert metrics.dice(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    half = gt.copy()
    half[:, :, 7:] = False  # slices 3..6 kept: 256 voxels
    assert metrics.dice(half, gt) == pytest.approx(2 * 256 / (256 + 512))
    shifted = np.roll(gt, 2, axis=0)  # overlap 6 x 8 x 8
    assert metrics.dice(shifted, gt) == pytest.approx(2 * 384 / 1024)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.dice(gt[:-1], gt)


def test_oracle_picks_the_best_candidate_per_slice():
    gt = cube()
    wrong = np.roll(gt, 5, axis=1)
    # candidate 0 right on slices < 7, candidate 1 right on slices >= 7, candidate 2 always wrong
    c0, c1 = wrong.copy(), wrong.copy()
    c0[:, :, :7], c1[:, :, 7:] = gt[:, :, :7], gt[:, :, 7:]
    candidates = np.stack([c0, c1, wrong])
    assert metrics.oracle_dice(candidates, gt) == 1.0
    np.testing.assert_array_equal(metrics.oracle_mask(candidates, gt), gt)
    assert metrics.oracle_dice(wrong[None], gt) == metrics.dice(wrong, gt)


# ------------------------------------------------------------------------------------------ CI


def test_bootstrap_matches_the_normal_approximation_on_a_large_sample():
    rng = np.random.default_rng(1)
    values = rng.beta(8, 2, size=4000)  # skewed, Dice-like
    mean, lo, hi = metrics.bootstrap_ci(values, num_resamples=4000, seed=3)
    m_n, lo_n, hi_n = metrics.normal_ci(values)
    half = (hi_n - lo_n) / 2
    assert mean == pytest.approx(m_n)
    assert lo < mean < hi
    assert lo == pytest.approx(lo_n, abs=0.1 * half)
    assert hi == pytest.approx(hi_n, abs=0.1 * half)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.08)


def test_bootstrap_is_seeded_and_handles_small_samples():
    v = [0.2, 0.9, 0.5, 0.7]
    assert metrics.bootstrap_ci(v, seed=5) == metrics.bootstrap_ci(v, seed=5)
    assert metrics.bootstrap_ci([0.4]) == (0.4, 0.4, 0.4)
    lo, hi = metrics.bootstrap_ci(v)[1:]
    assert 0.2 <= lo <= hi <= 0.9
    with pytest.raises(ValueError):
        metrics.bootstrap_ci([])


def test_simulated_user_streams_differ_for_every_seed_and_object():
    from radsam_jax.evaluate.runner import _rng

    draws = {seed: _rng(seed, "case", "liver", "volume/box/mask").integers(1 << 62) for seed in (0, 1, 2**32, 2**40)}
    assert len(set(draws.values())) == 4  # a seed is not folded to 32 bits (0 and 2**32 drew the same clicks)
    assert _rng(0, "case", "liver", "volume/box/mask").integers(1 << 62) == draws[0]
    assert _rng(0, "case", "spleen", "volume/box/mask").integers(1 << 62) != draws[0]


def test_parse_known_classes(tmp_path):
    assert metrics.parse_known_classes(None) is None
    assert metrics.parse_known_classes("liver, spleen") == {"liver", "spleen"}
    f = tmp_path / "dataset.json"
    f.write_text(json.dumps({"labels": {"0": "background", "1": "spleen", "2": "liver"}}))
    assert metrics.parse_known_classes(str(f)) == {"spleen", "liver"}
    f.write_text(json.dumps({"labels": {"background": 0, "spleen": 1, "liver": 2}}))  # nnU-Net v2's dataset.json
    assert metrics.parse_known_classes(str(f), valid=["spleen", "liver", "aorta"]) == {"spleen", "liver"}
    t = tmp_path / "known.txt"
    t.write_text("aorta\nliver\n")
    assert metrics.parse_known_classes(str(t)) == {"aorta", "liver"}
    assert metrics.parse_known_classes("liver,spleen", valid=["aorta", "liver", "spleen"]) == {"liver", "spleen"}
    # Saved by an editor that writes a byte-order mark; JSON that does not parse is an error, not one class name.
    f.write_text(json.dumps({"labels": {"1": "spleen", "2": "liver"}}), encoding="utf-8-sig")
    assert metrics.parse_known_classes(str(f)) == {"spleen", "liver"}
    t.write_text("aorta\nliver\n", encoding="utf-8-sig")
    assert metrics.parse_known_classes(str(t)) == {"aorta", "liver"}
    f.write_text('{"labels": {"1": "spleen",}}')
    with pytest.raises(ValueError, match=f"--known-classes {f} is not valid JSON"):
        metrics.parse_known_classes(str(f))


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data absent")
def test_the_amos_known_classes_preset_finds_amos_classes_under_each_naming():
    amos = ["spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver", "stomach", "arota",
            "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
            "prostate/uterus"]  # AMOS22 dataset.json
    assert metrics.parse_known_classes("amos", valid=amos + ["background"]) == set(amos)
    # TotalSegmentator v2 (the DICOM case's label map) has all 15; v1 has no prostate.
    for case, count in (("ct-thorax-abdomen-dicom", 15), ("ct-abdomen-3mm", 14)):
        names = json.loads((SHARED / case / "labels.json").read_text())["label_map"].values()
        known = metrics.parse_known_classes("amos", valid=names)
        assert len(known) == count and {"liver", "kidney_left", "inferior_vena_cava", "urinary_bladder"} <= known
        assert not known & {"colon", "portal_vein_and_splenic_vein", "lung_upper_lobe_left", "heart"}
    with pytest.raises(ValueError, match="--known-classes amos: none of its classes"):
        metrics.parse_known_classes("amos", valid=["brain", "skull"])


def test_known_classes_mistyped_path_or_name_is_an_error(tmp_path):
    # A path that does not exist was read as one class name, making every structure "unknown".
    for spec in (str(tmp_path / "knwon.txt"), "known_classes.json"):
        with pytest.raises(ValueError, match="no such file"):
            metrics.parse_known_classes(spec)
    with pytest.raises(ValueError, match="a folder, not a file"):
        metrics.parse_known_classes(str(tmp_path))
    with pytest.raises(ValueError) as info:
        metrics.parse_known_classes("liver,spleeen", valid=["aorta", "liver", "spleen"])
    assert "spleeen is not a structure" in str(info.value) and "valid names: aorta, liver, spleen" in str(info.value)


# ------------------------------------------------------------------------------------------ user


def test_initial_slice_bounds_and_prompts():
    gt = cube()
    gt[6:10, 7:11, 9] = True  # no change in extent; same area on every slice -> middle of 3..10
    assert su.object_bounds(gt) == (3, 10)
    assert su.initial_slice(gt) == 6  # ties: nearest the middle 6.5, then the lower index
    gt2 = gt.copy()
    gt2[2:15, 2:15, 4] = True
    assert su.initial_slice(gt2) == 4
    rng = np.random.default_rng(0)
    sl = su.slice_2d(gt2, 4)
    # x = first array axis, y = second: the box spans the x and y extents
    box = su.slice_prompt(sl, "box", rng)["box"]
    np.testing.assert_array_equal(box, [2, 2, 14, 14])
    narrow = np.zeros((20, 18, 4), bool)
    narrow[3:5, 10:16, 1] = True
    np.testing.assert_array_equal(su.slice_prompt(su.slice_2d(narrow, 1), "box", rng)["box"], [3, 10, 4, 15])
    for _ in range(50):
        p = su.slice_prompt(su.slice_2d(narrow, 1), "point", rng)
        x, y = p["points"][0].astype(int)
        assert narrow[x, y, 1] and p["point_labels"].tolist() == [1]
    # The jitter is in pixels at a 1024 input, training's unit: 64 px there are 8 voxels of a 128-voxel
    # slice (the model sees both at the same size), 64 voxels of a 1024-voxel one.
    for side in (128, 1024):
        gt_slice = np.zeros((side // 2, side), bool)
        gt_slice[20:30, 40:60] = True
        jb = su.slice_prompt(gt_slice, "box", rng, box_jitter=(64, 64))["box"]
        d = 64 * side / 1024
        np.testing.assert_allclose(jb, np.clip([40 - d, 20 - d, 59 + d, 29 + d], 0, [side - 1, side // 2 - 1] * 2))


def test_correction_clicks_land_on_errors_with_the_right_label():
    rng = np.random.default_rng(0)
    gt = cube()
    pred = np.roll(gt, 3, axis=0)
    fn, fp = gt & ~pred, pred & ~gt
    labels = set()
    for _ in range(300):
        c = su.correction_3d(pred, gt, rng)
        x, y = int(c.point[0]), int(c.point[1])
        assert (x, y) == c.point
        if c.label == 1:
            assert fn[x, y, c.slice]
        else:
            assert c.label == 0 and fp[x, y, c.slice]
        labels.add(c.label)
    assert labels == {0, 1}
    assert su.correction_3d(gt, gt, rng) is None
    for _ in range(100):
        c = su.correction_2d(su.slice_2d(pred, 5), su.slice_2d(gt, 5), rng, 5)
        x, y = int(c.point[0]), int(c.point[1])
        assert c.slice == 5 and (fn if c.label == 1 else fp)[x, y, 5]


# ------------------------------------------------------------------------ runner with a script


class ScriptedPredictor:
    """Stands in for VolumePredictor: segment returns the object on slices lo..k only; every edit
    fixes the clicked slice completely; slice-level prompts give the object minus its first row."""

    def __init__(self, gt):
        self.gt = gt
        self.calls = []

    def set_volume(self, volume):
        self.calls.append("set_volume")
        self.num_slices = volume.array.shape[2]
        self.intensities = volume.array

    def encode_slices(self, lo, hi):
        return hi - lo + 1

    @property
    def embeddings(self):
        return np.zeros(1)

    def _res(self):
        import types

        return types.SimpleNamespace(mask=self.pred.astype(np.uint8).copy())

    def segment(self, k, points=None, point_labels=None, box=None, bounds=None, propagation="mask"):
        self.calls.append(("segment", k, bounds, box is not None))
        self.pred = self.gt.copy()
        self.pred[:, :, k + 1:] = False
        return self._res()

    def edit(self, k, points, point_labels):
        x, y = points[0]
        assert self.pred[int(x), int(y), k] != self.gt[int(x), int(y), k]
        assert point_labels[0] == int(self.gt[int(x), int(y), k])
        self.calls.append(("edit", k))
        self.pred[:, :, k] = self.gt[:, :, k]
        return self._res()

    def edit_slices(self, edits):
        self.calls.append(("edit_slices", sorted(edits)))
        for k, (points, point_labels) in edits.items():
            self.edit(k, points, point_labels)
        return self._res()

    def segment_slices(self, prompts, all_masks=False):
        assert not all_masks  # these runs set oracle=False
        self.pred = np.zeros_like(self.gt)
        for k in prompts:
            self.pred[:, :, k] = self.gt[:, :, k]
            first = np.flatnonzero(self.gt[:, :, k].any(axis=1))[0]
            self.pred[first, :, k] = False
        return self._res()


def test_runner_reads_the_next_case_while_evaluating_this_one():
    """Case c2 is read (in the background) before the evaluation of c1 ends, and rows keep case order."""
    import threading
    import types

    from radsam_jax.data.datasets import Case

    gt = cube()
    labels = gt.astype(np.uint8) * 3
    volume = types.SimpleNamespace(array=np.zeros(gt.shape, np.float32), affine=np.eye(4), spacing=(1.0, 1.0, 1.0))
    reading = {}

    def load_case(case):
        reading[case.case_id] = threading.current_thread().name
        if case.case_id == "c2":
            c2_started.set()
        return volume, labels

    c2_started = threading.Event()

    class WaitingPredictor(ScriptedPredictor):
        def segment(self, *args, **kw):
            if self.calls.count("set_volume") == 1:  # evaluating c1: c2 must be on its way already
                assert c2_started.wait(timeout=30), "case c2 was not read while c1 was evaluated"
            return super().segment(*args, **kw)

    cases = [Case(f"c{i}", "img", {"organ": 3}, label_path="lab") for i in (1, 2)]
    res = runner.evaluate_cases(cases, WaitingPredictor(gt), runner.make_settings(["volume"], ["box"], ["mask"]),
                                runner.EvalOptions(edits=(0,), oracle=False, worst_count=0), load_case=load_case,
                                progress=False)
    assert [r["case"] for r in res.rows] == ["c1", "c2"]
    assert threading.current_thread().name not in reading.values()  # not read by the evaluating thread


def test_runner_scores_a_synthetic_case_exactly():
    import types

    from radsam_jax.data.datasets import Case

    gt = cube()  # slices 3..10, 64 voxels each; largest-area tie -> initial slice 6
    labels = gt.astype(np.uint8) * 3
    volume = types.SimpleNamespace(array=np.zeros(gt.shape, np.float32), affine=np.eye(4), spacing=(1.0, 1.0, 1.0))
    case = Case("c1", "img", {"organ": 3, "absent": 4}, label_path="lab")
    pred = ScriptedPredictor(gt)
    settings = runner.make_settings(["volume", "slice"], ["box", "point"], ["mask"])
    opts = runner.EvalOptions(edits=(0, 1, 2, 5, 20), seed=0, oracle=False, worst_count=2)
    res = runner.evaluate_cases([case], pred, settings, opts, load_case=lambda c: (volume, labels), progress=False)
    assert pred.calls.count("set_volume") == 1
    vol = {(r["prompt"], r["edits"]): r["dice"] for r in res.rows if r["protocol"] == "volume"}
    # slices 3..6 right (4 x 64 voxels), 7..10 missing; each edit fixes one missing slice
    for e, right in ((0, 4), (1, 5), (2, 6), (5, 8), (20, 8)):
        assert vol[("box", e)] == pytest.approx(2 * right * 64 / (right * 64 + 512)), e
        assert vol[("point", e)] == vol[("box", e)]
    # the scripted edits fix the clicked slice: every click is honoured; clicks stop once the mask is perfect
    clicks = {(r["protocol"], r["prompt"], r["edits"]): (r["clicks"], r["clicks_honoured"]) for r in res.rows}
    assert [clicks[("volume", "box", e)] for e in (0, 1, 2, 5, 20)] == [(0, 0), (1, 1), (2, 2), (4, 4), (4, 4)]
    assert [clicks[("slice", "point", e)] for e in (0, 1, 2)] == [(0, 0), (8, 8), (8, 8)]
    edits = [c for c in pred.calls if c[0] == "edit"]
    # volume: 4 clicks per prompt, then perfect (no more clicks); slice: one round of 8 slices per prompt
    assert len(edits) == 2 * 4 + 2 * 8
    # slice level: each round is one batched edit_slices call over the 8 slices with errors
    assert [c for c in pred.calls if c[0] == "edit_slices"] == [("edit_slices", list(range(3, 11)))] * 2
    sl = {(r["prompt"], r["edits"]): r["dice"] for r in res.rows if r["protocol"] == "slice"}
    assert sl[("box", 0)] == pytest.approx(2 * 56 * 8 / (56 * 8 + 512))  # one row of 8 missing per slice
    assert sl[("box", 1)] == 1.0 and sl[("box", 5)] == 1.0
    assert ("box", 20) not in sl  # slice-level: at most 10 points per slice
    assert ("c1", "absent", "absent") in res.skipped
    assert len(res.worst) == 2 and res.worst[0].dice <= res.worst[1].dice
    # same seed, same numbers
    res2 = runner.evaluate_cases([case], ScriptedPredictor(gt), settings, opts, load_case=lambda c: (volume, labels), progress=False)
    assert [r["dice"] for r in res2.rows] == [r["dice"] for r in res.rows]


class IgnoringPredictor(ScriptedPredictor):
    """Answers every edit with the mask it had: no click is honoured and the Dice stays put."""

    def edit(self, k, points, point_labels):
        self.calls.append(("edit", k))
        return self._res()


def test_runner_counts_ignored_clicks():
    import types

    from radsam_jax.data.datasets import Case

    gt = cube()
    volume = types.SimpleNamespace(array=np.zeros(gt.shape, np.float32), affine=np.eye(4), spacing=(1.0, 1.0, 1.0))
    opts = runner.EvalOptions(edits=(0, 2, 3), seed=0, oracle=False, worst_count=0)
    res = runner.evaluate_cases([Case("c1", "img", {"organ": 3}, label_path="lab")], IgnoringPredictor(gt),
                                runner.make_settings(["volume"], ["box"], ["mask"]), opts,
                                load_case=lambda c: (volume, gt.astype(np.uint8) * 3), progress=False)
    assert [(r["edits"], r["clicks"], r["clicks_honoured"]) for r in res.rows] == [(0, 0, 0), (2, 2, 0), (3, 3, 0)]
    assert len({r["dice"] for r in res.rows}) == 1
    summary = report.summarize(res.rows, num_resamples=100)
    assert [(s["clicks"], s["clicks_honoured"]) for s in summary["settings"]] == [(0, None), (2, 0.0), (3, 0.0)]


class InterruptedPredictor(ScriptedPredictor):
    """Ctrl-C during the 4th segment: the second object's second setting."""

    def segment(self, *args, **kw):
        if sum(c[0] == "segment" for c in self.calls) == 3:
            raise KeyboardInterrupt
        return super().segment(*args, **kw)


def test_runner_interrupted_keeps_the_rows_of_finished_objects():
    import types

    from radsam_jax.data.datasets import Case

    gt = cube()
    labels = gt.astype(np.uint8) * 3
    labels[14:18, 2:6, 4:9] = 5
    volume = types.SimpleNamespace(array=np.zeros(gt.shape, np.float32), affine=np.eye(4), spacing=(1.0, 1.0, 1.0))
    settings = runner.make_settings(["volume"], ["box", "point"], ["mask"])
    with pytest.raises(runner.EvaluationInterrupted) as info:
        runner.evaluate_cases([Case("c1", "img", {"organ": 3, "other": 5}, label_path="lab")], InterruptedPredictor(gt),
                              settings, runner.EvalOptions(edits=(0,), oracle=False),
                              load_case=lambda c: (volume, labels), progress=False)
    # organ, both settings; none of the half-done "other"
    assert [(r["structure"], r["prompt"]) for r in info.value.rows] == [("organ", "box"), ("organ", "point")]


def _two_cases():
    import types

    from radsam_jax.data.datasets import Case

    gt = cube()
    labels = gt.astype(np.uint8) * 3
    labels[14:18, 2:6, 4:9] = 5
    volume = types.SimpleNamespace(array=np.zeros(gt.shape, np.float32), affine=np.eye(4), spacing=(1.0, 1.0, 1.0))
    cases = [Case(c, "img", {"organ": 3, "other": 5}, label_path="lab") for c in ("c1", "c2")]
    return gt, cases, lambda case: (volume, labels)


def test_a_record_killed_between_its_writes_continues_to_the_same_result(tmp_path, monkeypatch):
    """Killed after an object's worst-case slices were saved but before its rows: continuing runs that
    object again and ends with the rows and worst objects of an uninterrupted run, no object twice."""
    from radsam_jax.evaluate.record import RunRecord

    gt, cases, load = _two_cases()
    settings = runner.make_settings(["volume"], ["box", "point"], ["mask"])
    options = runner.EvalOptions(edits=(0,), oracle=False, worst_count=3)
    expected = runner.evaluate_cases(cases, ScriptedPredictor(gt), settings, options, load_case=load, progress=False)
    run = {"identity": {"seed": 0, "worst": 3}, "shard": [0, 1], "report": {}}
    real_add, added = RunRecord.add_object, []

    def killed_at_the_second_object(self, *args):
        added.append(args)
        if len(added) == 2:  # c1's "other": its low Dice entered the worst objects just before
            raise KeyboardInterrupt
        real_add(self, *args)

    monkeypatch.setattr(RunRecord, "add_object", killed_at_the_second_object)
    with RunRecord.open(tmp_path, run) as record, pytest.raises(runner.EvaluationInterrupted):
        runner.evaluate_cases(cases, ScriptedPredictor(gt), settings, options, load_case=load, progress=False, record=record)
    monkeypatch.undo()
    assert {w.structure for w in RunRecord.load(tmp_path).worst} == {"organ"}
    with RunRecord.open(tmp_path, run) as record:
        result = runner.evaluate_cases(cases, ScriptedPredictor(gt), settings, options, load_case=load, progress=False,
                                       record=record)
    assert result.rows == expected.rows
    worst = lambda r: [(w.case, w.structure, w.setting, w.dice, w.order) for w in r.worst]
    assert worst(result) == worst(expected) and len(set(worst(result))) == 3


def test_damaged_or_foreign_records_are_named(tmp_path):
    from radsam_jax.evaluate.record import RecordError, RunRecord

    run = {"identity": {"seed": 0, "worst": 3}, "shard": [0, 1], "report": {}}
    RunRecord.open(tmp_path, {**run, "identity": {"seed": 7, "worst": 3}}).close()  # e.g. stopped on bad input at once:
    record = RunRecord.open(tmp_path, run)  # another run may take its place, nothing is lost
    assert json.loads((tmp_path / "run.json").read_text())["identity"]["seed"] == 0
    record.add_skipped("c1", "organ", "absent")
    record.add_timing({"case": "c1", "slices": 3, "encoded": 0, "encode_s": 0.0, "total_s": 0.1, "objects": 0})
    with pytest.raises(RecordError, match="another process is evaluating into"):  # the lock: one writer per folder
        RunRecord.open(tmp_path, run)
    with pytest.raises(RecordError, match="c1:organ is recorded a second time"):
        record.add_skipped("c1", "organ", "absent")
    record.close()
    with pytest.raises(RecordError, match="seed 0 there, 1 here"):
        RunRecord.open(tmp_path, {**run, "identity": {"seed": 1, "worst": 3}})
    with pytest.raises(RecordError, match="it is shard 0/1, this run is shard 1/2"):
        RunRecord.open(tmp_path, {**run, "shard": [1, 2]})
    lines = (tmp_path / "objects.jsonl").read_text().splitlines()
    (tmp_path / "objects.jsonl").write_text(f"{lines[0][:-3]}\n{lines[1]}\n")  # a damaged line before a whole one
    with pytest.raises(RecordError, match="objects.jsonl line 1 is not JSON"):
        RunRecord.load(tmp_path)
    (tmp_path / "objects.jsonl").write_text(f'{lines[1]}\n{{"object": {{"case": "c1"}}}}\n')
    with pytest.raises(RecordError, match='objects.jsonl line 2 is not a record entry: {"object": {"case": "c1"}}'):
        RunRecord.load(tmp_path)
    (tmp_path / "objects.jsonl").write_text(f"{lines[1]}\n")
    (tmp_path / "worst_cases.npz").write_bytes(b"PK\x03\x04 cut")  # a zip file cut short
    with pytest.raises(RecordError, match="worst_cases.npz cannot be read .*delete it to keep the scores"):
        RunRecord.load(tmp_path)
    (tmp_path / "run.json").unlink()
    with pytest.raises(RecordError, match="has objects.jsonl and worst_cases.npz but no run.json"):
        RunRecord.open(tmp_path, run)
    with RunRecord.open(tmp_path, run, restart=True) as record:
        assert record.finished() == set()


def test_partial_reports_and_what_runs_no_case(tmp_path, monkeypatch):
    """A partial report (a shard missing, another unfinished) counts the finished objects and does not call the
    structures not evaluated yet absent; duplicate case ids stop before any case runs; a file system without
    flock runs unlocked with a warning."""
    import errno
    import fcntl

    from radsam_jax.data.datasets import Case
    from radsam_jax.evaluate.record import RunRecord, merge_records

    identity = {"cases": [["c1", {"organ": 3, "other": 5}], ["c2", {"organ": 3, "other": 5}]],
                "structures": ["organ", "other"], "worst": 0, "seed": 0}
    run = {"identity": identity, "shard": [0, 2], "report": {"model": "m", "options": {}, "window": [40, 400]}}
    rows = [{"case": "c1", "structure": "organ", "label": 3, "known": None, "protocol": "volume", "prompt": "box",
             "propagation": "mask", "edits": 0, "dice": 0.5}]
    with RunRecord.open(tmp_path / "s0", run) as record:
        record.add_object("c1", "organ", rows)
    with pytest.raises(ValueError, match=r"shard\(s\) 1/2 .* not among the records given \(--partial reports without them\)"):
        merge_records([RunRecord.load(tmp_path / "s0")])
    merged = merge_records([RunRecord.load(tmp_path / "s0")], partial=True)
    summary, result = report.write_record_report(tmp_path / "r", merged, num_resamples=10)
    assert result.missing_structures == [] and summary["settings"][0]["n"] == 1
    assert "Partial report of an unfinished run: 1 of 4 objects finished" in (tmp_path / "r" / "summary.md").read_text()

    twice = [Case("x", "a.nii", {"organ": 3}, label_path="l"), Case("x", "a.nii.gz", {"organ": 3}, label_path="l")]
    with pytest.raises(runner.EvaluationInputError, match=r"case id\(s\) \['x'\] name more than one case"):
        runner.evaluate_cases(twice, None, [], runner.EvalOptions(), load_case=None, progress=False)

    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="cannot lock .*run.lock \\(Function not implemented\\)"):
        RunRecord.open(tmp_path / "s1", {**run, "shard": [1, 2]}).close()


def _report_result(rows, worst):
    return runner.EvalResult(rows, worst, [{"case": "c0", "slices": 9, "encoded": 5, "encode_s": 0.5, "total_s": 1.0, "objects": 2}],
                             [("c0", "aorta", "absent")])


def test_report_removes_its_own_stale_outputs_only(tmp_path):
    """--worst 0 into a folder of an earlier run: no worst_cases.png of that run is left to mislead;
    the user's files stay."""
    rows = [{"case": "c0", "structure": "liver", "label": 1, "known": None, "protocol": "volume", "prompt": "box",
             "propagation": "mask", "edits": 0, "dice": 0.5}]
    gt = cube()[:, :, 5]
    worst = [runner.WorstCase(0.5, "c0", "liver", "volume/box/mask", 0, 5, np.zeros(gt.shape, np.float32), gt, gt, (1.0, 1.0))]
    report.write_report(tmp_path, _report_result(rows, worst), model="m", options={}, window=(40.0, 400.0), num_resamples=10)
    assert (tmp_path / "worst_cases.png").is_file()
    (tmp_path / "notes.txt").write_text("mine")
    expected = ["breakdown.json", "edits.png", "notes.txt", "per_structure.png", "scores.csv", "summary.json", "summary.md"]
    report.write_report(tmp_path, _report_result(rows, []), model="m", options={}, window=(40.0, 400.0), num_resamples=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == expected


def test_report_files_and_schema(tmp_path):
    rows = []
    rng = np.random.default_rng(0)
    for case in range(5):
        for s in ("liver", "spleen"):
            for proto, prop in (("volume", "mask"), ("volume", "box"), ("slice", "none")):
                for prompt in ("box", "point"):
                    for e in (0, 1, 5):
                        rows.append({"case": f"c{case}", "structure": s, "label": 1, "known": s == "liver", "protocol": proto,
                                     "prompt": prompt, "propagation": prop, "edits": e, "dice": float(rng.uniform(0.5, 1)),
                                     "oracle_dice": 0.9 if (proto == "slice" and e == 0) else None,
                                     "initial_slice": 3, "lo": 1, "hi": 5, "voxels": 10})
    gt = cube()[:, :, 5]
    worst = [runner.WorstCase(0.1, "c0", "liver", "volume/box/mask", 0, 5, np.zeros(gt.shape, np.float32), gt, np.roll(gt, 2, 0), (1.0, 2.0))]
    summary = report.write_report(tmp_path, _report_result(rows, worst), model="m", options={"data": "d", "cases": 5},
                                  window=(40.0, 400.0), num_resamples=500)
    for f in ("scores.csv", "summary.json", "summary.md", "breakdown.json", "edits.png", "per_structure.png", "worst_cases.png"):
        assert (tmp_path / f).is_file(), f
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data == summary and list(data) == ["settings"]
    assert len(data["settings"]) == 3 * 2 * 3
    for s in data["settings"]:
        assert list(s) == list(report.SETTING_KEYS)
        assert 0 <= s["ci_low"] <= s["mean_dice"] <= s["ci_high"] <= 1 and s["n"] == 10
    md = (tmp_path / "summary.md").read_text()
    assert "| clicks honoured |" in md and "Clicks honoured: of the correction clicks" in md
    assert "| Model | Volume-level" in md and "Known / unknown" in md and "Oracle" in md and "m (box propagation)" in md
    assert len((tmp_path / "scores.csv").read_text().splitlines()) == len(rows) + 1


def test_report_order_is_fixed_whatever_the_order_of_the_rows(tmp_path):
    """The same rows in other orders give byte-identical files: structures by label id (not by name
    or first appearance), settings volume then slice, box then point, mask then box propagation."""
    rng = np.random.default_rng(1)
    rows = []
    for case in ("c0", "c1", "c2", "c10"):
        for s, label in (("spleen", 1), ("aorta", 8), ("liver", 6)):
            for proto, prop in (("slice", "none"), ("volume", "box"), ("volume", "mask")):
                for prompt in ("point", "box"):
                    for e in (1, 0):
                        rows.append({"case": case, "structure": s, "label": label, "known": s != "aorta", "protocol": proto,
                                     "prompt": prompt, "propagation": prop, "edits": e, "dice": float(rng.uniform(0.3, 1)),
                                     "oracle_dice": float(rng.uniform(0.3, 1)) if (proto == "slice" and e == 0) else None})
    folders = []
    for i, order in enumerate((rows, rows[::-1], [rows[j] for j in rng.permutation(len(rows))])):
        folders.append(tmp_path / str(i))
        report.write_report(folders[-1], _report_result(order, []), model="m", options={}, window=(40.0, 400.0),
                            num_resamples=200)
    for f in ("summary.md", "summary.json", "breakdown.json", "per_structure.png"):
        assert len({(d / f).read_bytes() for d in folders}) == 1, f
    settings = [(s["protocol"], s["prompt"], s["propagation"], s["edits"])
                for s in json.loads((tmp_path / "0" / "summary.json").read_text())["settings"]]
    assert settings == [(proto, prompt, prop, e) for proto, props in (("volume", ("mask", "box")), ("slice", ("none",)))
                        for prompt in ("box", "point") for prop in props for e in (0, 1)]
    extra = json.loads((tmp_path / "0" / "breakdown.json").read_text())
    assert list(dict.fromkeys(r["structure"] for r in extra["per_structure"])) == ["spleen", "liver", "aorta"]
    assert [(r["structure"], r["prompt"], r["propagation"]) for r in extra["per_structure"][:3:2]] == [("spleen", "box", "mask"),
                                                                                                       ("spleen", "box", "box")]
    assert [r["group"] for r in extra["known_unknown"]] == ["known"] * 12 + ["unknown"] * 12
    md = (tmp_path / "0" / "summary.md").read_text()
    table = md[md.index("## Per structure"):]
    assert table.index("| spleen |") < table.index("| liver |") < table.index("| aorta |")
    assert ("| structure | volume/box/mask/0 | volume/box/box/0 | volume/point/mask/0 | volume/point/box/0 | slice/box/none/0 "
            "| slice/point/none/0 |") in table


def test_worst_cases_montage_uses_the_models_window(tmp_path):
    """worst_cases.png shows the CT through the window the model saw, which summary.md states."""
    from PIL import Image

    rows = [{"case": "c0", "structure": "liver", "label": 1, "known": None, "protocol": "volume", "prompt": "box",
             "propagation": "mask", "edits": 0, "dice": 0.5}]
    gt = cube()[:, :, 5]
    worst = [runner.WorstCase(0.5, "c0", "liver", "volume/box/mask", 0, 5, np.full(gt.shape, -50.0, np.float32), gt, gt, (1.0, 1.0))]
    for window, grey in (((40.0, 400.0), 70), ((-500.0, 1200.0), 223)):  # -50 HU: 110/400 and 1050/1200 of 255
        report.write_report(tmp_path, _report_result(rows, worst), model="m", options={}, window=window, num_resamples=10)
        with Image.open(tmp_path / "worst_cases.png") as im:
            pixel = im.convert("RGB").getpixel((128, 30 + 3))  # under the caption, above the contours
        assert pixel == (grey,) * 3
        assert f"CT window {window[0]:g}/{window[1]:g} HU" in (tmp_path / "summary.md").read_text()
