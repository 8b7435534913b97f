"""Dataset layouts: AMOS, TotalSegmentator and generic readers on tiny fixtures, and the real data."""

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radsam_jax.data import datasets
from data_fixtures import synthetic_case, write_amos, write_generic, write_totalsegmentator

SHARED = Path(__file__).parents[2] / "shared"


def test_amos_splits_and_modality(tmp_path):
    root = write_amos(tmp_path / "amos")
    train = datasets.read_cases("amos", root, "train")
    assert [c.case_id for c in train] == ["amos_0001", "amos_0002", "amos_0003"]  # 501 is MRI
    assert train[0].structures == {"organ": 1, "bone": 2} and train[0].modality == "CT"
    mri = datasets.read_cases("amos", root, "train", modality="MRI")
    assert [c.case_id for c in mri] == ["amos_0501"] and mri[0].modality == "MRI"
    assert len(datasets.read_cases("amos", root, "train", modality="all")) == 4
    assert [c.case_id for c in datasets.read_cases("amos", root, "val")] == ["amos_0004"]
    with pytest.raises(ValueError, match="no AMOS cases"):
        datasets.read_cases("amos", root, "val", modality="MRI")


def test_label_tables_of_amos_and_nnunet_v2_and_their_errors(tmp_path):
    root = write_amos(tmp_path / "amos")
    meta = root / "dataset.json"
    meta.write_text(json.dumps({"labels": {"background": 0, "organ": 1, "bone": 2}}))  # nnU-Net v2's form
    assert datasets.read_cases("amos", root, "train")[0].structures == {"organ": 1, "bone": 2}
    for image in (root / "imagesTr").iterdir():  # and its image names: <case>_0000.nii.gz
        image.rename(image.with_name(image.name.replace(".nii.gz", "_0000.nii.gz")))
    # nnU-Net's conversion merges imagesVa into imagesTr: the missing validation split says so.
    shutil.rmtree(root / "imagesVa"), shutil.rmtree(root / "labelsVa")
    assert "nnU-Net's AMOS conversion merges the validation cases into imagesTr/" in datasets.layout_problem("amos", root, "val")
    assert datasets.layout_problem("amos", root, "train") is None
    nnunet = datasets.read_cases("amos", root, "train", modality="all")
    assert [(c.case_id, c.modality) for c in nnunet] == [("amos_0001", "CT"), ("amos_0002", "CT"), ("amos_0003", "CT"),
                                                         ("amos_0501", "MRI")]
    assert all(c.label_path.endswith(f"labelsTr/{c.case_id}.nii.gz") for c in nnunet)
    datasets.load_case(nnunet[0])
    # A plain AMOS name is not taken for nnU-Net's: its missing label map is named as it is.
    plain = write_amos(tmp_path / "plain")
    (plain / "labelsTr" / "amos_0501.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"has no label map {plain / 'labelsTr' / 'amos_0501.nii.gz'}")):
        datasets.read_cases("amos", plain, "train", modality="MRI")
    assert [c.case_id for c in datasets.read_cases("amos", plain, "train")] == ["amos_0001", "amos_0002", "amos_0003"]
    for text, message in [
        ('{"labels": {"0": "background", "1": "organ",}}', f"{meta} is not valid JSON: Expecting property name"),
        ('{"name": "AMOS"}', f"{meta} has no 'labels' table"),
        ('{"labels": {"0": "background", "one": "organ"}}', f"{meta} 'labels': label id 'one' (for 'organ') is not an integer >= 0"),
        ('{"labels": {"background": 0, "organ": [1, 2]}}', f"{meta} 'labels': the label id of 'organ' is [1, 2], not an integer"),
        ('{"labels": {"0": "background", "1": "organ", "2": "organ"}}', f"{meta} 'labels': 'organ' has two label ids, 1 and 2"),
        ('{"labels": {"background": 0, "organ": 1, "bone": 1}}', f"{meta} 'labels': label id 1 has two names, 'organ' and 'bone'"),
        ('{"labels": {"0": "background", "-1": "organ"}}', f"{meta} 'labels': label id -1 (for 'organ') is negative"),
        ('{"labels": {"\u00b2": "organ"}}', f"{meta} 'labels': the label id of '\u00b2' is 'organ', not an integer >= 0"),
        ('{"labels": {"0": "background"}}', "has no 'labels' besides background"),
    ]:
        meta.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            datasets.read_cases("amos", root, "train")
    generic = write_generic(tmp_path / "generic", ("a",))
    (generic / "a" / "labels.json").write_text('{"label_map": {"1": "organ"')
    with pytest.raises(ValueError, match=re.escape(f"{generic / 'a' / 'labels.json'} is not valid JSON")):
        datasets.read_cases("generic", generic, "all")
    (generic / "a" / "labels.json").write_text(json.dumps({"label_map": {"organ": 1, "bone": 2}}))
    assert datasets.read_cases("generic", generic, "all")[0].structures == {"organ": 1, "bone": 2}


def test_amos_case_loads_canonical_with_aligned_labels(tmp_path):
    root = write_amos(tmp_path / "amos")
    case = datasets.read_cases("amos", root, "train")[1]  # amos_0002 is stored L,A,S
    volume, labels = datasets.load_case(case)
    assert volume.axcodes == ("R", "A", "S") and labels.shape == volume.array.shape
    hu, lab = synthetic_case(2)
    np.testing.assert_array_equal(labels, lab[::-1])  # flipped back to RAS
    assert np.all(volume.array[labels == 2] > 500)


def test_totalsegmentator_layout(tmp_path):
    root = write_totalsegmentator(tmp_path / "ts")
    train = datasets.read_cases("totalsegmentator", root, "train")
    assert [c.case_id for c in train] == ["s0001", "s0002"]
    assert train[0].structures == {"liver": 1, "vertebrae_L1": 2}
    assert train[0].label_path is None and set(train[0].structure_paths) == {"liver", "vertebrae_L1"}
    assert [c.case_id for c in datasets.read_cases("totalsegmentator", root, "test")] == ["s0004"]
    volume, labels = datasets.load_case(train[0])
    _, expected = synthetic_case(10)
    np.testing.assert_array_equal(labels, expected)
    with pytest.raises(ValueError, match="splits there"):
        datasets.read_cases("totalsegmentator", root, "validation")


def test_overlapping_totalsegmentator_masks_are_named(tmp_path, caplog):
    """One label map holds one structure per voxel: where masks overlap the later name takes the voxels,
    so the earlier structure's ground truth shrinks; the warning says which and how many."""
    root = write_totalsegmentator(tmp_path / "ts")
    case = datasets.read_cases("totalsegmentator", root, "train")[0]
    liver_file = root / "s0001" / "segmentations" / "liver.nii.gz"
    liver = np.asanyarray(nib.load(str(liver_file)).dataobj) > 0
    spine_file = root / "s0001" / "segmentations" / "vertebrae_L1.nii.gz"
    spine = nib.load(str(spine_file))
    grown = np.asanyarray(spine.dataobj).copy()
    inside = np.argwhere(liver)[:7]
    grown[tuple(inside.T)] = 1
    nib.save(nib.Nifti1Image(grown, spine.affine), str(spine_file))
    with caplog.at_level("WARNING", logger="radsam_jax.data.datasets"):
        _, labels = datasets.load_case(case)
    assert "case s0001: its structure masks overlap (vertebrae_L1 over 7 voxel(s) of liver)" in caplog.text
    assert (labels == 1).sum() == liver.sum() - 7
    caplog.clear()
    with caplog.at_level("WARNING", logger="radsam_jax.data.datasets"):
        datasets.load_case(datasets.read_cases("totalsegmentator", root, "train")[1])
    assert "overlap" not in caplog.text


def test_totalsegmentator_comma_meta_csv(tmp_path):
    root = write_totalsegmentator(tmp_path / "ts", splits={"s0001": "train", "s0002": "val"}, delimiter=",")
    assert [c.case_id for c in datasets.read_cases("totalsegmentator", root, "val")] == ["s0002"]
    meta = root / "meta.csv"
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())  # a byte-order mark, as a spreadsheet saves it
    assert [c.case_id for c in datasets.read_cases("totalsegmentator", root, "val")] == ["s0002"]
    meta.write_text("image_id,age,split\ns0001,50,train\ns0002\n")
    with pytest.raises(ValueError, match=r"meta.csv line 3: no split"):
        datasets.read_cases("totalsegmentator", root, "train")


def test_totalsegmentator_ids_are_the_same_in_every_split(tmp_path):
    """A structure present only in some subjects (here aorta, in the val subject) shifts no id of another split."""
    root = write_totalsegmentator(tmp_path / "ts")
    (root / "s0003" / "segmentations" / "aorta.nii.gz").write_bytes(
        (root / "s0003" / "segmentations" / "liver.nii.gz").read_bytes())
    ids = {split: datasets.read_cases("totalsegmentator", root, split)[0].structures for split in ("train", "val", "all")}
    assert ids["train"] == {"liver": 2, "vertebrae_L1": 3}
    assert ids["val"] == {"aorta": 1, "liver": 2, "vertebrae_L1": 3}
    assert ids["all"] == ids["train"]  # s0001 first


def test_generic_layout_and_structure_filter(tmp_path):
    root = write_generic(tmp_path / "gen")
    cases = datasets.read_cases("generic", root, "train")
    assert [c.case_id for c in cases] == ["a", "b"]  # no splits.json: every case in every split
    one = datasets.read_cases("generic", root / "a", "all")
    assert len(one) == 1 and one[0].image_path.endswith("ct.nii.gz")
    kept = datasets.read_cases("generic", root, "all", structures=["bone"])
    assert kept[0].structures == {"bone": 2}
    with pytest.raises(ValueError, match=r"unknown structure.*'kidney'.*valid names: absent, bone, organ"):
        datasets.read_cases("generic", root, "all", structures=["kidney"])
    (root / "splits.json").write_text(json.dumps({"train": ["a"], "val": ["b"]}), encoding="utf-8-sig")  # a BOM too
    assert [c.case_id for c in datasets.read_cases("generic", root, "val")] == ["b"]
    (root / "splits.json").write_text(json.dumps({"train": ["a"], "val": ["b", "B", "c"]}))  # typos shrink no split
    with pytest.raises(ValueError, match=r"split 'val' of .*splits.json names 2 case\(s\) not found under .*: B, c"):
        datasets.read_cases("generic", root, "val")
    (root / "splits.json").write_text(json.dumps({"train": ["a"], "val": ["b"]}))
    labels = json.loads((root / "b" / "labels.json").read_text())
    (root / "b" / "labels.json").write_text(json.dumps(labels), encoding="utf-8-sig")  # as some editors save it
    assert datasets.read_cases("generic", root, "val")[0].structures == {"organ": 1, "bone": 2, "absent": 3}


def test_errors_for_empty_folders_and_misaligned_labels(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no cases"):
        datasets.read_cases("generic", tmp_path / "empty", "all")
    with pytest.raises(ValueError, match="no TotalSegmentator cases"):
        datasets.read_cases("totalsegmentator", tmp_path / "empty", "all")
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        datasets.read_cases("amos", tmp_path / "empty", "train")
    with pytest.raises(ValueError, match="unknown dataset format"):
        datasets.read_cases("nnunet", tmp_path / "empty", "train")
    root = write_generic(tmp_path / "gen", case_ids=("a",))
    labels = np.asanyarray(nib.load(str(root / "a" / "labels.nii.gz")).dataobj)
    far = np.diag([1.5, 1.5, 3.0, 1.0])
    far[:3, 3] = 5000.0
    nib.save(nib.Nifti1Image(labels, far), str(root / "a" / "labels.nii.gz"))
    case = datasets.read_cases("generic", root, "all")[0]
    with pytest.raises(ValueError, match="does not overlap"):
        datasets.load_case(case)


@pytest.mark.skipif(not (SHARED / "data").exists(), reason="shared/data not present")
def test_real_generic_cases():
    cases = datasets.read_cases("generic", SHARED / "data", "all", structures=["liver", "spleen"])
    assert sorted(c.case_id for c in cases) == ["ct-abdomen-3mm", "ct-thorax-abdomen-dicom"]
    dicom = next(c for c in cases if c.case_id == "ct-thorax-abdomen-dicom")
    assert dicom.image_path.endswith("dicom")
    volume, labels = datasets.load_case(dicom)
    assert volume.axcodes == ("R", "A", "S")
    liver = volume.array[labels == dicom.structures["liver"]]
    assert abs(float(np.median(liver)) - 93) < 5


def test_layout_problem_names_the_folder_and_the_layout(tmp_path):
    amos, ts, gen = write_amos(tmp_path / "amos"), write_totalsegmentator(tmp_path / "ts"), write_generic(tmp_path / "gen")
    for format, root in (("amos", amos), ("totalsegmentator", ts), ("generic", gen), ("generic", gen / "a")):
        for split in ("train", "val", "all"):
            assert datasets.layout_problem(format, root, split) is None, (format, root, split)
    assert datasets.layout_problem("amos", "", "train") == "not set; expected an AMOS folder (dataset.json, imagesTr/ and labelsTr/)"
    assert datasets.layout_problem("amos", amos / "dataset.json", "val") == (
        f"{amos / 'dataset.json'} is a file, not a folder; expected an AMOS folder (dataset.json, imagesVa/ and labelsVa/)")
    assert datasets.layout_problem("generic", tmp_path / "nothing") == (
        f"{tmp_path / 'nothing'} does not exist; expected a case folder with labels.json, or a folder of them")
    assert datasets.layout_problem("totalsegmentator", amos, "all") == (
        f"{amos} is not a TotalSegmentator folder (subject folders with ct.nii.gz and segmentations/)")
    (ts / "meta.csv").unlink()  # needed for a split, not for "all"
    assert datasets.layout_problem("totalsegmentator", ts, "all") is None
    assert datasets.layout_problem("totalsegmentator", ts, "train").startswith(f"{ts} is not a TotalSegmentator folder")
