"""Specification of the synthetic phantoms: reproducible subjects with VS and cochlea labels in CrossMoDA layout.

Rendering a case takes seconds, so the cases are made once per module and shared; each test reads one
property of them. Physical positions are LPS mm (x → patient left); label arrays are numpy (z, y, x).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from VSCochleaSegLib.errors import OutputExistsError
from VSCochleaSegLib.labels import COCHLEA, VS
from VSCochleaSegLib.phantoms import make_case, write_phantoms

# Seeds whose random acquisitions have small matrices, so the cases render fast.
FORCED_SEED = 194  # cases with a forced tumour side and size class
UNPAIRED_SEED = 0
PAIRED_SEED = 91
REFUSED_SEED = 221

# An intrameatal VS lies inside the internal auditory canal (radius ≤ ~2.7 mm, length ≤ ~12 mm), so even
# one filling the whole canal is under ~300 mm³. A large (Koos IV-like) VS has a cerebellopontine-angle
# lobe of ≥ 12 mm semi-axis: a 20 mm sphere is 4.2 mL, and clinically "large" starts around there.
INTRAMEATAL_MAX_MM3 = 500.0
LARGE_MIN_MM3 = 4000.0


# ----------------------------------------------------------------------------------------- helpers


def label_array(case) -> np.ndarray:
    return sitk.GetArrayFromImage(case.labels)


def centroid_lps(labels: sitk.Image, mask_zyx: np.ndarray) -> np.ndarray:
    """Physical (LPS mm) centre of a mask given as a (z, y, x) array on ``labels``' grid."""
    centre_zyx = np.argwhere(mask_zyx).mean(axis=0)
    return np.array(labels.TransformContinuousIndexToPhysicalPoint(centre_zyx[::-1].tolist()))


def midline_x(case) -> float:
    """LPS x of the midpoint between the two recorded cochlea centres."""
    centres = case.info["cochlea_centres_lps"]
    return (centres["left"][0] + centres["right"][0]) / 2.0


def vs_volume_mm3(case) -> float:
    return float(np.count_nonzero(label_array(case) == VS) * np.prod(case.labels.GetSpacing()))


def header(path) -> sitk.ImageFileReader:
    """An image file's geometry (size, spacing, origin, direction) without reading its voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def geometry(image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


# ----------------------------------------------------------------------------------------- cases


@pytest.fixture(scope="module")
def left_large():
    return make_case(FORCED_SEED, 2, tumour_side="left", size_class="large")


@pytest.fixture(scope="module")
def right_intrameatal():
    return make_case(FORCED_SEED, 3, tumour_side="right", size_class="intrameatal")


@pytest.fixture(scope="module")
def unpaired_set(tmp_path_factory):
    """Two ceT1 and two hrT2 subjects written as CrossMoDA's unpaired training data; (folder, cases)."""
    folder = tmp_path_factory.mktemp("unpaired")
    cases = write_phantoms(folder, n=2, seed=UNPAIRED_SEED, modality="both", progress=False)
    return folder, {case.name: case for case in cases}


@pytest.fixture(scope="module")
def paired_set(tmp_path_factory):
    """One subject shown in both contrasts on one grid; (folder, cases)."""
    folder = tmp_path_factory.mktemp("paired")
    cases = write_phantoms(folder, n=1, seed=PAIRED_SEED, modality="both", unpaired=False, progress=False)
    return folder, cases


# ----------------------------------------------------------------------------------------- reproducibility


def test_same_seed_and_index_give_the_identical_case(hrt2_phantom):
    again = make_case(31337, 0, modalities=("hrT2",))
    assert again.info == hrt2_phantom.info
    assert geometry(again.images["hrT2"]) == geometry(hrt2_phantom.images["hrT2"])
    assert np.array_equal(sitk.GetArrayViewFromImage(again.images["hrT2"]),
                          sitk.GetArrayViewFromImage(hrt2_phantom.images["hrT2"]))
    assert np.array_equal(label_array(again), label_array(hrt2_phantom))


def test_another_index_gives_another_subject_and_acquisition(unpaired_set):
    _, cases = unpaired_set
    first, second = cases[f"phantom_hrT2_{UNPAIRED_SEED}_000"].info, cases[f"phantom_hrT2_{UNPAIRED_SEED}_001"].info
    assert first["spacing_xyz_mm"] != second["spacing_xyz_mm"]
    moved = np.subtract(first["cochlea_centres_lps"]["left"], second["cochlea_centres_lps"]["left"])
    assert np.linalg.norm(moved) > 1.0


def test_another_seed_gives_another_subject_and_acquisition(hrt2_phantom, paired_set):
    _, (other_seed,) = paired_set  # case 0 of PAIRED_SEED; hrt2_phantom is case 0 of seed 31337
    assert other_seed.info["spacing_xyz_mm"] != hrt2_phantom.info["spacing_xyz_mm"]
    moved = np.subtract(other_seed.info["cochlea_centres_lps"]["left"], hrt2_phantom.info["cochlea_centres_lps"]["left"])
    assert np.linalg.norm(moved) > 1.0


# ----------------------------------------------------------------------------------------- labels


def test_labels_are_background_vs_and_cochlea(hrt2_phantom):
    assert set(np.unique(label_array(hrt2_phantom))) == {0, VS, COCHLEA}
    assert hrt2_phantom.labels.GetPixelID() == sitk.sitkUInt8


def test_each_ear_has_one_cochlea_at_its_recorded_centre(hrt2_phantom):
    components, n = ndimage.label(label_array(hrt2_phantom) == COCHLEA, structure=np.ones((3, 3, 3)))
    assert n == 2
    centres = hrt2_phantom.info["cochlea_centres_lps"]
    sides = {}
    for component in (1, 2):
        centre = centroid_lps(hrt2_phantom.labels, components == component)
        side = "left" if centre[0] > midline_x(hrt2_phantom) else "right"
        sides[side] = centre
    assert sorted(sides) == ["left", "right"]
    for side, centre in sides.items():
        # The recorded centre is the mean of the spiral's centreline; the label's is volume-weighted.
        assert np.linalg.norm(centre - np.array(centres[side])) < 3.0, side


def test_tumour_side_left_puts_the_vs_on_the_patients_left(left_large):
    assert left_large.info["vs_sides"] == ["left"]
    vs_centre = centroid_lps(left_large.labels, label_array(left_large) == VS)
    assert vs_centre[0] > midline_x(left_large)  # LPS: +x is patient left


def test_tumour_side_right_puts_the_vs_on_the_patients_right(right_intrameatal):
    assert right_intrameatal.info["vs_sides"] == ["right"]
    vs_centre = centroid_lps(right_intrameatal.labels, label_array(right_intrameatal) == VS)
    assert vs_centre[0] < midline_x(right_intrameatal)


def test_intrameatal_vs_is_small(right_intrameatal):
    assert right_intrameatal.info["size_classes"] == ["intrameatal"]
    assert 0 < vs_volume_mm3(right_intrameatal) < INTRAMEATAL_MAX_MM3


def test_large_vs_is_big(left_large):
    assert left_large.info["size_classes"] == ["large"]
    assert vs_volume_mm3(left_large) > LARGE_MIN_MM3


# ----------------------------------------------------------------------------------------- acquisition


def test_every_case_has_a_clinical_hrt2_or_cet1_grid(hrt2_phantom, left_large, right_intrameatal, unpaired_set, paired_set):
    grids = [hrt2_phantom.labels, left_large.labels, right_intrameatal.labels]
    grids += [header(p) for folder, _ in (unpaired_set, paired_set) for p in sorted(folder.glob("*_Label.nii.gz"))]
    assert len(grids) == 8
    for grid in grids:
        sx, sy, sz = grid.GetSpacing()
        assert 0.4 <= sx <= 0.6 and 0.4 <= sy <= 0.6, grid.GetSpacing()
        assert 1.0 <= sz <= 1.5, grid.GetSpacing()
        direction = np.reshape(grid.GetDirection(), (3, 3))
        assert np.allclose(direction @ direction.T, np.eye(3), atol=1e-5)


def mean_inside(image_path, labels: np.ndarray, label: int) -> float:
    return float(sitk.GetArrayFromImage(sitk.ReadImage(str(image_path)))[labels == label].mean())


def test_hrt2_shows_cochlear_fluid_brighter_than_the_vs(paired_set):
    folder, (case,) = paired_set
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case.name}_Label.nii.gz")))
    hrt2 = folder / f"{case.name}_hrT2.nii.gz"
    assert mean_inside(hrt2, labels, COCHLEA) > mean_inside(hrt2, labels, VS)


def test_cet1_shows_the_enhancing_vs_brighter_than_the_cochlea(paired_set):
    folder, (case,) = paired_set
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case.name}_Label.nii.gz")))
    cet1 = folder / f"{case.name}_ceT1.nii.gz"
    assert mean_inside(cet1, labels, VS) > mean_inside(cet1, labels, COCHLEA)


# ----------------------------------------------------------------------------------------- writing


def test_unpaired_set_is_written_in_crossmoda_layout(unpaired_set):
    folder, _ = unpaired_set
    expected = {f"phantom_{m}_{UNPAIRED_SEED}_{i:03d}_{suffix}.nii.gz"
                for m in ("ceT1", "hrT2") for i in (0, 1) for suffix in (m, "Label")}
    assert {p.name for p in folder.iterdir()} == expected


def test_unpaired_cet1_and_hrt2_cases_are_different_subjects(unpaired_set):
    folder, cases = unpaired_set
    cet1, hrt2 = cases[f"phantom_ceT1_{UNPAIRED_SEED}_000"], cases[f"phantom_hrT2_{UNPAIRED_SEED}_000"]
    assert geometry(header(folder / f"{cet1.name}_Label.nii.gz")) != geometry(header(folder / f"{hrt2.name}_Label.nii.gz"))
    moved = np.subtract(cet1.info["cochlea_centres_lps"]["left"], hrt2.info["cochlea_centres_lps"]["left"])
    assert np.linalg.norm(moved) > 1.0


def test_paired_set_shows_one_subject_in_both_contrasts_with_one_label(paired_set):
    folder, (case,) = paired_set
    assert {p.name for p in folder.iterdir()} == {f"{case.name}_{s}.nii.gz" for s in ("hrT2", "ceT1", "Label")}
    label_grid = geometry(header(folder / f"{case.name}_Label.nii.gz"))
    assert geometry(header(folder / f"{case.name}_hrT2.nii.gz")) == label_grid
    assert geometry(header(folder / f"{case.name}_ceT1.nii.gz")) == label_grid


def test_write_phantoms_refuses_to_overwrite_an_existing_file(tmp_path):
    existing = tmp_path / f"phantom_hrT2_{REFUSED_SEED}_000_hrT2.nii.gz"
    existing.write_bytes(b"someone's scan")
    with pytest.raises(OutputExistsError):
        write_phantoms(tmp_path, n=1, seed=REFUSED_SEED, modality="hrT2", progress=False)
    assert existing.read_bytes() == b"someone's scan"
