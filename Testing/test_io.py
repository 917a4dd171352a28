"""Specification of VSCochleaSegLib.io: reading scans (files, DICOM folders), input checks, atomic writes.

All data are made in the test, small (a few thousand voxels), in pytest's tmp_path.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from VSCochleaSegLib import io
from VSCochleaSegLib.errors import InputError, OutputExistsError

SPACING = (0.5, 0.45, 1.3)  # mm along i, j, k: anisotropic on purpose
ORIGIN = (-12.5, 30.25, 4.0)  # LPS mm


def rotation_matrix(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (Rodrigues' formula)."""
    a = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    t = math.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


OBLIQUE = rotation_matrix((1.0, 2.0, 0.5), 20.0)


def oblique_image(shape_kji=(6, 9, 11), dtype=np.float32) -> sitk.Image:
    """A random volume with anisotropic spacing, an off-zero origin and a 20° oblique direction."""
    values = np.random.default_rng(0).uniform(10, 500, size=shape_kji).astype(dtype)
    img = sitk.GetImageFromArray(values)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(OBLIQUE.ravel().tolist())
    return img


def assert_same_geometry(a: sitk.Image, b: sitk.Image, tol_mm: float = 1e-3) -> None:
    """Same size and the same index → physical (LPS mm) mapping at the corners and a middle voxel."""
    assert a.GetSize() == b.GetSize()
    sx, sy, sz = a.GetSize()
    for idx in [(0, 0, 0), (sx - 1, 0, 0), (0, sy - 1, 0), (0, 0, sz - 1), (sx - 1, sy - 1, sz - 1),
                (sx // 2, sy // 3, sz // 2)]:
        pa = a.TransformIndexToPhysicalPoint(idx)
        pb = b.TransformIndexToPhysicalPoint(idx)
        assert np.allclose(pa, pb, atol=tol_mm), (idx, pa, pb)


def write_dicom_series(folder: Path, img: sitk.Image, series_uid: str) -> None:
    """Write a 3D int16 image as one MR DICOM file per slice, geometry in the standard tags."""
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    row_cosine, column_cosine, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    sx, sy, sz = img.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # else GDCM gives every file a new series UID
    for k in range(img.GetSize()[2]):
        slice_2d = sitk.Cast(img[:, :, k], sitk.sitkInt16)
        position = np.asarray(img.GetOrigin()) + k * sz * normal
        tags = {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*row_cosine, *column_cosine)),
            "0028|0030": f"{sy:.6f}\\{sx:.6f}",  # row spacing (between rows: j), then column (i)
            "0018|0050": f"{sz:.6f}",
        }
        for key, value in tags.items():
            slice_2d.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_2d)


def read_error(path) -> str:
    with pytest.raises(InputError) as info:
        io.read_image(path)
    return str(info.value)


def validate_error(img: sitk.Image) -> str:
    with pytest.raises(InputError) as info:
        io.validate_image(img, "scan.nii.gz")
    return str(info.value)


# ------------------------------------------------------------------------------ reading: happy paths


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.nrrd", "scan.mha"])
def test_file_round_trip_keeps_oblique_geometry(tmp_path, name):
    original = oblique_image()
    sitk.WriteImage(original, str(tmp_path / name))
    read = io.read_image(tmp_path / name)
    assert_same_geometry(original, read)
    assert np.allclose(read.GetSpacing(), SPACING, atol=1e-5)


def test_read_image_returns_float32(tmp_path):
    sitk.WriteImage(oblique_image(dtype=np.int16), str(tmp_path / "scan.nrrd"))
    assert io.read_image(tmp_path / "scan.nrrd").GetPixelID() == sitk.sitkFloat32


def test_read_image_keeps_voxel_values(tmp_path):
    original = oblique_image(dtype=np.int16)
    sitk.WriteImage(original, str(tmp_path / "scan.mha"))
    read = io.read_image(tmp_path / "scan.mha")
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(original))


def test_dicom_series_folder_reads_with_spacing_and_geometry(tmp_path):
    original = oblique_image(shape_kji=(6, 32, 32), dtype=np.int16)
    write_dicom_series(tmp_path / "series", original, "1.2.826.0.1.3680043.2.1125.2")
    read = io.read_image(tmp_path / "series")
    assert read.GetSize() == (32, 32, 6)
    assert np.allclose(read.GetSpacing(), SPACING, atol=1e-4)
    assert_same_geometry(original, read)
    assert read.GetPixelID() == sitk.sitkFloat32


def test_4d_image_with_one_volume_is_read_as_3d(tmp_path):
    volume = oblique_image()
    sitk.WriteImage(sitk.JoinSeries([volume]), str(tmp_path / "scan.mha"))
    read = io.read_image(tmp_path / "scan.mha")
    assert read.GetDimension() == 3
    assert_same_geometry(volume, read)


# ------------------------------------------------------------------------------ reading: bad inputs


def test_missing_path_is_reported(tmp_path):
    assert "does not exist" in read_error(tmp_path / "nowhere.nii.gz")


def test_folder_without_dicom_is_reported(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    assert "no DICOM" in read_error(tmp_path)


def test_folder_with_two_dicom_series_lists_both_uids(tmp_path):
    img = oblique_image(shape_kji=(3, 16, 16), dtype=np.int16)
    write_dicom_series(tmp_path / "a", img, "1.2.826.0.1.3680043.2.1125.11")
    write_dicom_series(tmp_path / "b", img, "1.2.826.0.1.3680043.2.1125.22")
    for f in (tmp_path / "b").iterdir():
        f.rename(tmp_path / "a" / ("b_" + f.name))
    message = read_error(tmp_path / "a")
    assert "1.2.826.0.1.3680043.2.1125.11" in message
    assert "1.2.826.0.1.3680043.2.1125.22" in message


def test_unreadable_file_is_reported_with_its_name(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(b"this is not an image")
    message = read_error(tmp_path / "junk.nii.gz")
    assert "junk.nii.gz" in message and "Could not read" in message
    assert "sitk" not in message and ".cxx" not in message  # no SimpleITK internals


@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.nrrd", "scan.mha"])
def test_truncated_file_is_reported(tmp_path, name):
    sitk.WriteImage(oblique_image(shape_kji=(10, 20, 20)), str(tmp_path / name))
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: int(len(data) * 0.6)])
    message = read_error(tmp_path / name)
    assert name in message
    assert "truncated" in message


def test_2d_image_is_reported(tmp_path):
    sitk.WriteImage(oblique_image()[:, :, 0], str(tmp_path / "slice.nrrd"))
    assert "2D" in read_error(tmp_path / "slice.nrrd")


def test_single_slice_volume_is_reported_as_2d(tmp_path):
    sitk.WriteImage(oblique_image(shape_kji=(1, 9, 11)), str(tmp_path / "slice.nii.gz"))
    assert "2D" in read_error(tmp_path / "slice.nii.gz")


def test_4d_time_series_is_reported(tmp_path):
    data = np.random.default_rng(1).random((8, 8, 8, 3)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(tmp_path / "series.nii.gz"))
    assert "4D" in read_error(tmp_path / "series.nii.gz")


def test_vector_image_is_reported(tmp_path):
    volume = oblique_image()
    sitk.WriteImage(sitk.Compose([volume, volume, volume]), str(tmp_path / "rgb.nrrd"))
    assert "components" in read_error(tmp_path / "rgb.nrrd")


def test_empty_image_is_reported():
    assert "empty" in validate_error(sitk.Image([0, 0, 0], sitk.sitkFloat32))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_nan_or_inf_voxels_are_reported(tmp_path, bad_value):
    values = sitk.GetArrayFromImage(oblique_image())
    values[2, 3, 4] = bad_value
    sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / "scan.nrrd"))
    assert "NaN or Inf" in read_error(tmp_path / "scan.nrrd")


def test_spacing_above_10_mm_is_reported(tmp_path):
    img = oblique_image()
    img.SetSpacing((0.5, 0.5, 20.0))
    sitk.WriteImage(img, str(tmp_path / "scan.mha"))
    assert "spacing" in read_error(tmp_path / "scan.mha")


def test_zero_spacing_in_header_is_reported(tmp_path):
    sitk.WriteImage(oblique_image(), str(tmp_path / "scan.mha"))
    header = (tmp_path / "scan.mha").read_bytes()
    header = re.sub(rb"ElementSpacing = [^\n]*", b"ElementSpacing = 0 0.45 1.3", header, count=1)
    (tmp_path / "scan.mha").write_bytes(header)
    assert "spacing" in read_error(tmp_path / "scan.mha")


def test_non_finite_spacing_is_reported():
    img = oblique_image()
    img.SetSpacing((float("nan"), 0.45, 1.3))
    assert "spacing" in validate_error(img)


def test_sheared_direction_is_reported(tmp_path):
    img = oblique_image()
    img.SetDirection((1.0, 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(tmp_path / "scan.mha"))
    assert "orthonormal" in read_error(tmp_path / "scan.mha")


def test_left_handed_direction_is_accepted():
    img = oblique_image()
    img.SetDirection((OBLIQUE @ np.diag([1.0, 1.0, -1.0])).ravel().tolist())
    io.validate_image(img, "scan.nii.gz")  # no exception


def test_constant_image_is_reported(tmp_path):
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkInt16), str(tmp_path / "blank.nrrd"))
    assert "constant" in read_error(tmp_path / "blank.nrrd")


# ------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name, stem",
    [
        ("crossmoda_1_hrT2.nii.gz", "crossmoda_1_hrT2"),
        ("case.NII.GZ", "case"),
        ("case.nii", "case"),
        ("case.nrrd", "case"),
        ("case.nhdr", "case"),
        ("case.mha", "case"),
        ("case.mhd", "case"),
        ("sub-01_acq-0.5mm", "sub-01_acq-0.5mm"),
    ],
)
def test_case_stem_strips_image_extensions(name, stem):
    assert io.case_stem(Path("/data") / name) == stem


def test_case_stem_of_dicom_folder_is_the_folder_name(tmp_path):
    (tmp_path / "patient_042").mkdir()
    assert io.case_stem(tmp_path / "patient_042") == "patient_042"


# ----------------------------------------------------------------------------------- atomic writes


def test_write_image_atomic_writes_readable_image_and_no_temp_file(tmp_path):
    target = tmp_path / "out" / "case_seg.nii.gz"
    io.write_image_atomic(oblique_image(), target)
    assert_same_geometry(oblique_image(), sitk.ReadImage(str(target)))
    assert sorted(p.name for p in target.parent.iterdir()) == ["case_seg.nii.gz"]


def test_temp_file_is_hidden_partial_and_keeps_the_real_extension(tmp_path, monkeypatch):
    seen = []
    real_write = sitk.WriteImage
    monkeypatch.setattr(sitk, "WriteImage", lambda img, name, *a: (seen.append(name), real_write(img, name, *a)))
    io.write_image_atomic(oblique_image(), tmp_path / "case_seg.nii.gz")
    (temp_name,) = (Path(n).name for n in seen)
    assert temp_name.startswith(".case_seg.tmp-")
    assert temp_name.endswith(".part.nii.gz")


def test_failed_image_write_leaves_no_file(tmp_path, monkeypatch):
    def failing_write(img, name, *args):
        Path(name).write_bytes(b"half a file")  # the writer got part-way
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        io.write_image_atomic(oblique_image(), tmp_path / "case_seg.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_by_default(tmp_path):
    target = tmp_path / "case_seg.nii.gz"
    target.write_bytes(b"previous result")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        io.write_image_atomic(oblique_image(), target)
    assert target.read_bytes() == b"previous result"
    assert list(tmp_path.iterdir()) == [target]


def test_overwrite_true_replaces_existing_output(tmp_path):
    target = tmp_path / "case_seg.nii.gz"
    target.write_bytes(b"previous result")
    io.write_image_atomic(oblique_image(), target, overwrite=True)
    assert sitk.ReadImage(str(target)).GetSize() == oblique_image().GetSize()


def test_label_images_are_written_compressed(tmp_path):
    labels = sitk.Image([20, 20, 10], sitk.sitkUInt8)
    io.write_image_atomic(labels, tmp_path / "labels.nrrd")
    assert b"encoding: gzip" in (tmp_path / "labels.nrrd").read_bytes()[:400]


def test_header_plus_data_formats_are_refused(tmp_path):
    with pytest.raises(ValueError, match="single-file"):
        io.write_image_atomic(oblique_image(), tmp_path / "case.mhd")
    assert list(tmp_path.iterdir()) == []


def test_write_json_atomic_round_trips_numpy_values(tmp_path):
    obj = {"vs_volume_ml": np.float32(1.5), "sizes": np.arange(3), "side": "left"}
    io.write_json_atomic(obj, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text("utf-8")) == {
        "vs_volume_ml": 1.5, "sizes": [0, 1, 2], "side": "left"
    }


def test_write_json_atomic_refuses_nan_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError):
        io.write_json_atomic({"dice": float("nan")}, tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []


def test_write_bytes_atomic_refuses_then_overwrites(tmp_path):
    target = tmp_path / "a.png"
    io.write_bytes_atomic(b"one", target)
    with pytest.raises(OutputExistsError):
        io.write_bytes_atomic(b"two", target)
    io.write_bytes_atomic(b"two", target, overwrite=True)
    assert target.read_bytes() == b"two"


def test_atomic_output_removes_temp_file_when_body_fails(tmp_path):
    with pytest.raises(KeyError):
        with io.atomic_output(tmp_path / "report.json") as tmp:
            tmp.write_text("{")
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []
