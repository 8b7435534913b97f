"""radsam_jax.io: NIfTI/DICOM reading, label alignment through world coordinates, atomic writing."""

import json
import re
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radsam_jax import io

SHARED = Path(__file__).parents[2] / "shared"
DICOM_CASE = SHARED / "data" / "ct-thorax-abdomen-dicom"
NIFTI_CASE = SHARED / "data" / "ct-abdomen-3mm"


def _affine(spacing=(1.0, 2.0, 3.0), origin=(10.0, -20.0, 5.0)):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def _save(path, data, affine, slope=None, inter=None):
    img = nib.Nifti1Image(data, affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


# --------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize("name, stem", [("ct.nii.gz", "ct"), ("CT.NII.GZ", "CT"), ("case_01.nii", "case_01"),
                                        ("case.nii.v2.nii.gz", "case.nii.v2"), ("notes.txt", "notes.txt")])
def test_nifti_stem_strips_one_suffix_in_any_case(name, stem):
    assert io.nifti_stem(name) == stem


def test_nifti_applies_scaling_and_keeps_voxel_order(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    path = _save(tmp_path / "ct.nii.gz", data, _affine(), slope=2.0, inter=-1024.0)
    vol = io.load_volume(path)
    assert vol.array.dtype == np.float32 and vol.array.shape == (4, 5, 6)
    np.testing.assert_allclose(vol.array, data * 2.0 - 1024.0)
    np.testing.assert_allclose(vol.affine, _affine())
    assert vol.spacing == (1.0, 2.0, 3.0)
    assert vol.path == str(path)


def test_nifti_with_nan_voxels_names_the_files_own_index(tmp_path):
    """Checked as read, on the file's grid: training and evaluation reorient to RAS afterwards, where the
    index would be another."""
    data = np.zeros((4, 5, 6), np.float32)
    data[3, 1, 2] = np.nan
    flipped = _affine().copy()
    flipped[0, 0] = -1.0  # stored L-first: RAS reverses the first axis
    path = _save(tmp_path / "ct.nii.gz", data, flipped)
    with pytest.raises(ValueError, match=re.escape(f"image {path} holds 1 NaN or infinite voxel(s), the first at voxel "
                                                   f"index (3, 1, 2)")):
        io.load_volume(path)


def test_nifti_trailing_singleton_axis_is_squeezed(tmp_path):
    path = _save(tmp_path / "ct.nii", np.zeros((3, 4, 5, 1), np.int16), _affine())
    assert io.load_volume(path).array.shape == (3, 4, 5)


def test_nifti_4d_and_2d_are_errors_naming_the_shape(tmp_path):
    p4 = _save(tmp_path / "t.nii.gz", np.zeros((3, 4, 5, 2), np.int16), _affine())
    with pytest.raises(ValueError, match=r"\(3, 4, 5, 2\)"):
        io.load_volume(p4)
    p2 = _save(tmp_path / "s.nii.gz", np.zeros((3, 4), np.int16), np.eye(4))
    with pytest.raises(ValueError, match="2D"):
        io.load_volume(p2)
    with pytest.raises(ValueError, match=r"\(3, 4, 5, 2\)"):
        io.load_label_map(p4, io.Volume(np.zeros((3, 4, 5), np.float32), _affine()))


def test_missing_unknown_and_empty_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        io.load_volume(tmp_path / "nope.nii.gz")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(ValueError, match="not a NIfTI"):
        io.load_volume(txt)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no dicom here")
    with pytest.raises(ValueError, match="no DICOM"):
        io.load_volume(empty)


def _truncated(path, data):
    """A NIfTI whose header reads but whose voxel data stops half-way (a copy cut short)."""
    _save(path, data, _affine())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_truncated_nifti_is_an_error_naming_the_file(tmp_path, name):
    rng = np.random.default_rng(0)
    path = _truncated(tmp_path / name, rng.integers(-1000, 1000, (16, 16, 16)).astype(np.int16))
    with pytest.raises(ValueError, match=rf"cannot read NIfTI file {path} \(image\)"):
        io.load_volume(path)
    labels = _truncated(tmp_path / f"labels_{name}", rng.integers(0, 5, (16, 16, 16)).astype(np.uint8))
    with pytest.raises(ValueError, match=rf"cannot read NIfTI file {labels} \(label map\)"):
        io.read_label_array(labels)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=rf"cannot read NIfTI file {garbage} \(label map\)"):
        io.read_label_array(garbage)


# --------------------------------------------------------------------------- label alignment


def _world(affine, idx):
    return (affine @ np.append(idx, 1.0))[:3]


def test_label_identical_grid_is_returned_as_is(tmp_path):
    labels = np.random.default_rng(0).integers(0, 4, (6, 7, 8)).astype(np.uint8)
    path = _save(tmp_path / "lab.nii.gz", labels, _affine())
    like = io.Volume(np.zeros((6, 7, 8), np.float32), _affine())
    out = io.load_label_map(path, like)
    np.testing.assert_array_equal(out, labels)


def test_label_stored_in_another_orientation_aligns_through_world(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, (6, 7, 8)).astype(np.uint8)
    img_affine = _affine()
    like = io.Volume(np.zeros((6, 7, 8), np.float32), img_affine)
    # Store the labels flipped along x and with axes 0/1 swapped, with the matching affine.
    flipped = labels[::-1]
    flip_aff = img_affine @ np.array([[-1, 0, 0, 5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    swapped = flipped.transpose(1, 0, 2)
    swap_aff = flip_aff[:, [1, 0, 2, 3]]
    path = _save(tmp_path / "lab.nii.gz", swapped, swap_aff)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same grid in another order: nothing to warn about
        out = io.load_label_map(path, like)
    np.testing.assert_array_equal(out, labels)
    # The general (non-permutation) nearest-neighbour path agrees.
    general, inside = io.resample_labels(swapped, swap_aff + np.diag([0, 0, 1e-7, 0]), (6, 7, 8), img_affine)
    np.testing.assert_array_equal(general, labels)
    assert inside == 1.0


def test_label_on_coarser_grid_nearest_neighbour(tmp_path):
    # A 2x coarser label grid covering the same space: each image voxel takes its label voxel.
    coarse = np.arange(3 * 3 * 3, dtype=np.uint8).reshape(3, 3, 3) + 1
    aff_img = np.eye(4)
    aff_lab = np.diag([2.0, 2.0, 2.0, 1.0])
    aff_lab[:3, 3] = 0.4  # avoid exact half-voxel ties
    path = _save(tmp_path / "lab.nii.gz", coarse, aff_lab)
    like = io.Volume(np.zeros((6, 6, 6), np.float32), aff_img)
    out = io.load_label_map(path, like)
    for idx in [(0, 0, 0), (5, 5, 5), (2, 3, 4), (1, 4, 0)]:
        src = np.rint(np.linalg.inv(aff_lab) @ np.append(idx, 1.0))[:3].astype(int)
        assert out[idx] == coarse[tuple(np.clip(src, 0, 2))]


def test_label_without_overlap_is_an_error_naming_both(tmp_path):
    path = _save(tmp_path / "lab.nii.gz", np.ones((4, 4, 4), np.uint8), _affine(origin=(1000, 0, 0)))
    like = io.Volume(np.zeros((5, 5, 5), np.float32), _affine(), path="img.nii.gz")
    with pytest.raises(ValueError, match=r"\(4, 4, 4\).*does not overlap.*img\.nii\.gz.*\(5, 5, 5\)"):
        io.load_label_map(path, like)


def test_label_with_the_images_voxel_counts_but_another_header_warns(tmp_path):
    """Same shape, 0.8 mm in the label header against the image's 0.7 mm: most likely a wrong header;
    resampled (its structure moves), and said."""
    labels = np.zeros((20, 20, 5), np.uint8)
    labels[5:10, 5:10, 2] = 1
    path = _save(tmp_path / "lab.nii.gz", labels, np.diag([0.8, 0.8, 3.0, 1.0]))
    like = io.Volume(np.zeros((20, 20, 5), np.float32), np.diag([0.7, 0.7, 3.0, 1.0]), path="img.nii.gz")
    with pytest.warns(UserWarning, match=r"has the voxel counts of image img\.nii\.gz.*spacing \[0\.8, 0\.8, 3\.0\] mm.*"
                                         r"against spacing \[0\.7, 0\.7, 3\.0\] mm.*header is wrong"):
        out = io.load_label_map(path, like)
    assert not np.array_equal(out, labels)


def test_label_covering_part_of_the_image_warns_with_the_fraction(tmp_path):
    # Truncated in z with the image's affine: slices 3..4 of the image lie outside the label map.
    labels = np.ones((5, 5, 5), np.uint8)
    path = _save(tmp_path / "lab.nii.gz", labels[:, :, :3], _affine())
    like = io.Volume(np.zeros((5, 5, 5), np.float32), _affine(), path="img.nii.gz")
    with pytest.warns(UserWarning, match=r"lab\.nii\.gz.*\(5, 5, 3\).*covers 60\.0% .*img\.nii\.gz.*background"):
        out = io.load_label_map(path, like)
    assert out[:, :, :3].all() and not out[:, :, 3:].any()


# --------------------------------------------------------------------------- reorientation and saving


def test_to_canonical_preserves_world_coordinates():
    rng = np.random.default_rng(2)
    arr = rng.normal(size=(4, 5, 6)).astype(np.float32)
    aff = np.array([[0, -2, 0, 30], [1.5, 0, 0, -7], [0, 0, -3, 12], [0, 0, 0, 1]], float)  # axes P? L? I
    vol = io.Volume(arr, aff, "x")
    can = io.to_canonical(vol)
    assert can.axcodes == ("R", "A", "S")
    # The same world point holds the same value.
    for idx in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        w = _world(aff, idx)
        j = np.rint(np.linalg.inv(can.affine) @ np.append(w, 1))[:3].astype(int)
        assert can.array[tuple(j)] == arr[idx]
    labels = (arr > 0).astype(np.uint8)
    np.testing.assert_array_equal(io.reorient_labels_like(labels, vol), (can.array > 0).astype(np.uint8))


def test_save_label_map_round_trip_and_atomic(tmp_path):
    like = io.Volume(np.zeros((4, 5, 6), np.float32), _affine())
    labels = np.zeros((4, 5, 6), np.int64)
    labels[1, 2, 3] = 7
    out = io.save_label_map(tmp_path / "sub" / "seg.nii.gz", labels, like)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, like.affine)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), labels)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["seg.nii.gz"]  # no temp file left
    (tmp_path / "plain").write_bytes(b"")  # the output gets a plain file's permissions, not mkstemp's 0600
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    labels[0, 0, 0] = 300
    io.save_label_map(tmp_path / "big.nii", labels, like)
    assert nib.load(str(tmp_path / "big.nii")).get_data_dtype() == np.uint16
    with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
        io.save_label_map(tmp_path / "seg.png", labels, like)
    with pytest.raises(ValueError, match="shape"):
        io.save_label_map(tmp_path / "seg.nii", labels[:2], like)


def test_replacing_a_file_keeps_its_mode_and_a_failed_write_leaves_it(tmp_path):
    like = io.Volume(np.zeros((4, 5, 6), np.float32), _affine())
    out = io.save_label_map(tmp_path / "seg.nii.gz", np.zeros((4, 5, 6), np.uint8), like)
    out.chmod(0o640)
    io.save_label_map(out, np.ones((4, 5, 6), np.uint8), like)
    assert out.stat().st_mode & 0o777 == 0o640

    def fail(tmp):
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.write_atomically(out, fail, ".nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]
    assert np.asanyarray(nib.load(str(out)).dataobj).all()  # the previous file, untouched


def test_output_checks(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir").mkdir()
    io.check_output_path(tmp_path / "new" / "deeper" / "m.nii.gz", "--out")  # folders are created later
    with pytest.raises(ValueError, match=r"--out .*afile/sub/m.nii.gz cannot be created: .*afile is a file"):
        io.check_output_path(afile / "sub" / "m.nii.gz", "--out")
    with pytest.raises(ValueError, match="adir is a folder, not a file"):
        io.check_output_path(tmp_path / "adir", "--out")
    with pytest.raises(ValueError, match="afile is a file, not a folder"):
        io.check_output_path(afile, "--out-dir", folder=True)
    image = tmp_path / "ct.nii.gz"
    image.write_bytes(b"ct")
    (tmp_path / "link.nii.gz").symlink_to(image)
    (tmp_path / "hard.nii.gz").hardlink_to(image)
    for out in (image, tmp_path / "adir" / ".." / "ct.nii.gz", tmp_path / "nosuch" / ".." / "ct.nii.gz",
                tmp_path / "link.nii.gz", tmp_path / "hard.nii.gz"):
        with pytest.raises(ValueError, match="is the image .*ct.nii.gz; writing it would destroy the input"):
            io.check_outputs_spare_inputs([("--out", out)], [("image", image)])
    with pytest.raises(ValueError, match="--preview .* and --out .* are the same file"):
        io.check_outputs_spare_inputs([("--out", tmp_path / "m.nii"), ("--preview", tmp_path / "m.nii")], [])
    io.check_outputs_spare_inputs([("--out", tmp_path / "m.nii.gz")], [("image", image), ("labels", tmp_path / "missing")])


def test_output_folder_created_and_writable(tmp_path, monkeypatch):
    """create=True (radsam evaluate --out): the folder exists and takes files before hours of work."""
    out = io.check_output_path(tmp_path / "new" / "deeper", "--out", folder=True, create=True)
    assert out == tmp_path / "new" / "deeper" and out.is_dir()
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(ValueError, match="--out .*afile is a file, not a folder"):
        io.check_output_path(afile, "--out", folder=True, create=True)
    with pytest.raises(ValueError, match=r"--out .*afile/sub: cannot create the folder \("):
        io.check_output_path(afile / "sub", "--out", folder=True, create=True)
    assert afile.read_text() == "mine"
    with pytest.raises(ValueError, match="create=True needs folder=True"):
        io.check_output_path(tmp_path / "p.png", "--preview", create=True)

    def refused(*args, **kwargs):  # root may write anywhere: fake a folder that takes no new file
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.tempfile, "mkstemp", refused)
    with pytest.raises(ValueError, match=r"--out .*deeper: the folder is not writable \(Permission denied\)"):
        io.check_output_path(out, "--out", folder=True, create=True)
    with pytest.raises(ValueError, match=r"--out .*deeper/m.nii.gz cannot be written: no file can be created in .*deeper "
                                         r"\(Permission denied\)"):
        io.check_output_path(out / "m.nii.gz", "--out")
    with pytest.raises(ValueError, match=r"--out-dir .*deeper/more cannot be written: no file can be created in .*deeper"):
        io.check_output_path(out / "more", "--out-dir", folder=True)


def test_sheared_grid_is_saved_without_a_qform_that_would_misplace_it(tmp_path):
    """A qform holds rotations and zooms only: for a sheared (gantry-tilted) grid nibabel's nearest qform
    would place the mask elsewhere than the sform, so the qform is left unset (code 0)."""
    sheared = _affine().copy()
    sheared[1, 2] = 0.5
    for affine, qform_code in ((_affine(), 1), (sheared, 0)):
        like = io.Volume(np.zeros((4, 5, 6), np.float32), affine)
        img = nib.load(str(io.save_label_map(tmp_path / "seg.nii.gz", np.zeros((4, 5, 6), np.uint8), like)))
        assert int(img.header["qform_code"]) == qform_code and int(img.header["sform_code"]) == 1
        np.testing.assert_allclose(img.get_sform(), affine, atol=1e-6)
        np.testing.assert_allclose(img.affine, affine, atol=1e-6)
        if qform_code:
            np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not DICOM_CASE.exists(), reason="shared/data not present")
def test_real_dicom_series_aligns_with_its_labels():
    vol = io.load_volume(DICOM_CASE / "dicom")
    assert vol.array.shape == (512, 512, 20)
    np.testing.assert_allclose(vol.spacing, (0.9765625, 0.9765625, 2.0))
    assert vol.axcodes == ("L", "P", "S")  # DICOM pixel grid: columns go to patient left, rows posterior
    labels = io.load_label_map(DICOM_CASE / "labels.nii.gz", vol)
    names = {n: int(k) for k, n in json.loads((DICOM_CASE / "labels.json").read_text())["label_map"].items()}
    liver = vol.array[labels == names["liver"]]
    spleen = vol.array[labels == names["spleen"]]
    t12 = vol.array[labels == names["vertebrae_T12"]]
    assert abs(liver.mean() - 89) < 5 and abs(np.median(liver) - 93) < 5
    assert abs(spleen.mean() - 80) < 5
    assert abs(np.median(t12) - 206) < 10
    # The check would catch a wrong alignment: reading the label pixels as stored gives ~-75.
    raw, _ = io.read_label_array(DICOM_CASE / "labels.nii.gz")
    assert vol.array[raw == names["liver"]].mean() < 0


@pytest.mark.skipif(not DICOM_CASE.exists(), reason="shared/data not present")
def test_dicom_mixed_orientation_is_an_error(tmp_path):
    import pydicom

    files = sorted((DICOM_CASE / "dicom").iterdir())[:3]
    for i, f in enumerate(files):
        ds = pydicom.dcmread(str(f))
        if i == 1:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.save_as(str(tmp_path / f"im{i}.dcm"))
    with pytest.raises(ValueError, match="inconsistent ImageOrientationPatient"):
        io.load_volume(tmp_path)
    with pytest.raises(ValueError, match="single DICOM file"):
        io.load_volume(tmp_path / "im0.dcm")


@pytest.mark.skipif(not DICOM_CASE.exists(), reason="shared/data not present")
def test_dicom_slices_sorted_by_position_not_name(tmp_path):
    import pydicom

    files = sorted((DICOM_CASE / "dicom").iterdir())[:4]
    zs = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(str(f))
        zs.append(float(ds.ImagePositionPatient[2]))
        shutil.copy(f, tmp_path / f"{i:02d}.dcm")
    vol = io.load_volume(tmp_path)
    # Reading back the slice whose position is lowest must give slice 0.
    lowest = int(np.argmin(zs))
    ds = pydicom.dcmread(str(files[lowest]))
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(vol.array[:, :, 0], hu.T)
    assert vol.affine[2, 2] > 0 and np.isclose(vol.affine[2, 3], min(zs))
