"""Specification of the clinical measurements: volumes, sides (oblique grids), Feret diameter, (de)serialisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from VSCochleaSegLib.errors import InputError
from VSCochleaSegLib.labels import COCHLEA, VS
from VSCochleaSegLib.measure import (
    Measurements,
    image_centre_lps,
    index_to_lps,
    lateral_offset_mm,
    max_feret_diameter_mm,
    measure,
    side_of_points,
)

COS30, SIN30 = math.cos(math.radians(30)), math.sin(math.radians(30))
# Rotation by 30° about z, row-major as SimpleITK wants: voxel axis i points along
# (cos 30°, sin 30°, 0) in LPS, axis j along (-sin 30°, cos 30°, 0).
ROTATION_Z_30 = (COS30, -SIN30, 0.0, SIN30, COS30, 0.0, 0.0, 0.0, 1.0)


def label_image(array_zyx, spacing_xyz=(1.0, 1.0, 1.0), direction=ROTATION_Z_30, origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array_zyx, dtype=np.uint8))
    image.SetSpacing(spacing_xyz)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


# A 41 × 41 × 5 (x, y, z) grid whose centre voxel is (i, j, k) = (20, 20, 2).
SHAPE_ZYX = (5, 41, 41)


def labels_at(*voxels_ijk_label) -> np.ndarray:
    """(z, y, x) label array with the given ((i, j, k), label) voxels set."""
    labels = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    for (i, j, k), label in voxels_ijk_label:
        labels[k, j, i] = label
    return labels


# With isotropic 1 mm voxels and the 30° rotation, a voxel offset (di, dj) from the centre has
# LPS x offset di·cos30 − dj·sin30. Offset (+10, +2): 8.66 − 1 = +7.66 mm → patient's left.
# Offset (+2, +10): 1.73 − 5 = −3.27 mm → right, although its i index is above the centre's
# (a check that ignored the direction matrix would say left).
LEFT_VOXEL = (30, 22, 2)
RIGHT_VOXEL = (22, 30, 2)


# --- geometry helpers ----------------------------------------------------------------------


def test_index_to_lps_matches_simpleitk_on_an_oblique_anisotropic_grid():
    image = label_image(np.zeros((4, 5, 6)), spacing_xyz=(0.5, 0.8, 2.0), origin=(-30.0, 12.0, 7.5))
    indices_zyx = np.array([[0, 0, 0], [3, 4, 5], [1.5, 2.0, 2.5]])
    expected = [image.TransformContinuousIndexToPhysicalPoint(tuple(idx[::-1])) for idx in indices_zyx]
    np.testing.assert_allclose(index_to_lps(image, indices_zyx), expected, atol=1e-12)


def test_image_centre_is_halfway_between_the_end_voxel_centres():
    image = label_image(np.zeros((4, 5, 6)), spacing_xyz=(0.5, 0.8, 2.0), origin=(-30.0, 12.0, 7.5))
    expected = image.TransformContinuousIndexToPhysicalPoint((2.5, 2.0, 1.5))
    np.testing.assert_allclose(image_centre_lps(image), expected, atol=1e-12)


def test_lateral_offset_is_positive_to_the_patients_left_and_in_mm():
    points = np.array([[5.0, 1.0, 2.0], [-3.0, 0.0, 0.0]])
    np.testing.assert_allclose(lateral_offset_mm(points, (1.0, 0.0, 0.0)), [4.0, -4.0])


def test_side_of_points_normalises_the_axis():
    points = np.array([[5.0, 0.0, 0.0], [-5.0, 0.0, 0.0]])
    assert list(side_of_points(points, (0.0, 0.0, 0.0), (-7.0, 0.0, 0.0))) == ["right", "left"]


def test_zero_left_right_axis_is_an_input_error():
    with pytest.raises(InputError, match="zero length"):
        side_of_points(np.zeros((1, 3)), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0))


# --- volumes ---------------------------------------------------------------------------------


def test_volumes_are_voxel_count_times_voxel_volume_on_an_oblique_grid():
    labels = np.zeros((6, 7, 8), dtype=np.uint8)
    labels[1:3, 1:4, 1:3] = VS  # 2 · 3 · 2 = 12 voxels
    labels[4, 5, 6] = COCHLEA
    m = measure(label_image(labels, spacing_xyz=(0.5, 0.8, 2.0)))
    voxel_mm3 = 0.5 * 0.8 * 2.0
    assert m.vs_volume_mm3 == pytest.approx(12 * voxel_mm3)
    assert m.vs_volume_ml == pytest.approx(12 * voxel_mm3 / 1000)
    assert m.cochlea_left_volume_mm3 + m.cochlea_right_volume_mm3 == pytest.approx(voxel_mm3)


def test_empty_labels_have_no_vs_and_zero_volumes():
    m = measure(label_image(np.zeros((3, 4, 5))))
    assert (m.vs_present, m.vs_side, m.vs_volume_mm3, m.vs_max_diameter_mm) == (False, None, 0.0, 0.0)
    assert m.cochlea_left_volume_mm3 == m.cochlea_right_volume_mm3 == 0.0


def test_a_2d_image_is_an_input_error():
    with pytest.raises(InputError, match="3D"):
        measure(sitk.Image(4, 4, sitk.sitkUInt8))


# --- sides -----------------------------------------------------------------------------------


def test_vs_on_the_left_of_an_oblique_image():
    m = measure(label_image(labels_at((LEFT_VOXEL, VS))))
    assert (m.vs_present, m.vs_side) == (True, "left")
    assert (m.vs_left_volume_mm3, m.vs_right_volume_mm3) == (1.0, 0.0)


def test_vs_side_uses_the_direction_matrix_not_the_voxel_index():
    m = measure(label_image(labels_at((RIGHT_VOXEL, VS))))
    assert m.vs_side == "right"
    assert (m.vs_left_volume_mm3, m.vs_right_volume_mm3) == (0.0, 1.0)


def test_vs_components_on_both_sides_are_bilateral():
    m = measure(label_image(labels_at((LEFT_VOXEL, VS), (RIGHT_VOXEL, VS))))
    assert m.vs_side == "bilateral"
    assert (m.vs_left_volume_mm3, m.vs_right_volume_mm3) == (1.0, 1.0)


def test_a_vs_crossing_the_midline_gets_the_side_of_its_centroid():
    # A bar along i from the centre voxel − 2 to + 6 (one component, centroid at +2 voxels
    # along i, i.e. +1.73 mm in x): its whole volume is left.
    labels = np.zeros(SHAPE_ZYX, dtype=np.uint8)
    labels[2, 20, 18:27] = VS
    m = measure(label_image(labels))
    assert m.vs_side == "left"
    assert (m.vs_left_volume_mm3, m.vs_right_volume_mm3) == (9.0, 0.0)


def test_cochlea_volumes_are_split_by_side():
    labels = labels_at((LEFT_VOXEL, COCHLEA), (RIGHT_VOXEL, COCHLEA))
    labels[2, 30, 21] = COCHLEA  # touches the right cochlea: same component
    m = measure(label_image(labels))
    assert (m.cochlea_left_volume_mm3, m.cochlea_right_volume_mm3) == (1.0, 2.0)


def test_a_given_midline_point_replaces_the_image_centre():
    # The left voxel is 7.66 mm left of the centre; a midline 10 mm further left puts it on the right.
    centre = np.array(image_centre_lps(label_image(labels_at())))
    m = measure(label_image(labels_at((LEFT_VOXEL, VS))), midline_point_lps=tuple(centre + (10.0, 0.0, 0.0)))
    assert m.vs_side == "right"


def test_a_given_left_right_axis_replaces_lps_x():
    # Along the grid's own j axis, (−sin30, cos30, 0), the "right" voxel's offset (+2, +10) is
    # +10 mm: positive, so left.
    axis = (-SIN30, COS30, 0.0)
    m = measure(label_image(labels_at((RIGHT_VOXEL, VS))), left_right_axis_lps=axis)
    assert m.vs_side == "left"


# --- Feret diameter --------------------------------------------------------------------------


def test_diameter_of_a_line_of_voxels_is_centre_to_centre():
    # 21 voxels along i with 0.5 mm spacing: (21 − 1) · 0.5 = 10 mm, whatever the rotation.
    labels = np.zeros((3, 3, 25), dtype=np.uint8)
    labels[1, 1, 2:23] = VS
    m = measure(label_image(labels, spacing_xyz=(0.5, 0.8, 2.0)))
    assert m.vs_max_diameter_mm == pytest.approx(10.0)


def test_diameter_of_a_diagonal_segment_uses_anisotropic_spacing():
    # Voxels (i, j) = (t, t), t = 0..10 (one 26-connected component): the ends are 10 voxels
    # apart along i (0.5 mm) and along j (0.8 mm): √(5² + 8²) = √89 mm.
    labels = np.zeros((1, 12, 12), dtype=np.uint8)
    for t in range(11):
        labels[0, t, t] = VS
    m = measure(label_image(labels, spacing_xyz=(0.5, 0.8, 2.0)))
    assert m.vs_max_diameter_mm == pytest.approx(math.sqrt(89.0))


def test_diameter_of_a_single_slice_disk():
    # Disk of radius 4 mm in one slice (0.5 mm pixels): opposite pixels 8 mm apart on each axis.
    yy, xx = np.mgrid[-10:11, -10:11] * 0.5
    labels = ((yy**2 + xx**2) <= 16.0)[None].astype(np.uint8) * VS
    m = measure(label_image(labels, spacing_xyz=(0.5, 0.5, 3.0)))
    assert m.vs_max_diameter_mm == pytest.approx(8.0)


def test_diameter_of_a_digital_sphere_is_twice_its_radius():
    # All voxel centres within 5 mm of the centre, on a (0.5, 0.5, 1.0) mm oblique grid. No two
    # such points are more than 10 mm apart, and the two poles along any axis are exactly 10 mm apart.
    zz, yy, xx = np.mgrid[-6:7, -11:12, -11:12] * np.array([1.0, 0.5, 0.5])[:, None, None, None]
    labels = ((zz**2 + yy**2 + xx**2) <= 25.0).astype(np.uint8) * VS
    m = measure(label_image(labels, spacing_xyz=(0.5, 0.5, 1.0)))
    assert m.vs_max_diameter_mm == pytest.approx(10.0)


def test_diameter_of_a_single_voxel_is_zero():
    assert measure(label_image(labels_at((LEFT_VOXEL, VS)))).vs_max_diameter_mm == 0.0


def test_bilateral_diameter_is_the_larger_side_not_across_the_head():
    labels = labels_at((LEFT_VOXEL, VS), (RIGHT_VOXEL, VS))
    labels[2, 22, 31] = VS  # the left VS becomes two voxels, 1 mm apart
    assert measure(label_image(labels)).vs_max_diameter_mm == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(5))
def test_hull_diameter_equals_brute_force_on_random_clouds(seed):
    points = np.random.default_rng(seed).normal(size=(300, 3)) * (10.0, 3.0, 1.0)
    brute_force = max(np.linalg.norm(p - q) for p in points for q in points)
    assert max_feret_diameter_mm(points) == pytest.approx(brute_force)


# --- confidence and (de)serialisation ---------------------------------------------------------


def test_confidence_is_passed_through():
    m = measure(label_image(labels_at((LEFT_VOXEL, VS))), confidence={"vs": 0.9, "cochlea": 0.75})
    assert (m.vs_confidence, m.cochlea_confidence) == (0.9, 0.75)


def test_unknown_confidence_key_is_an_input_error():
    with pytest.raises(InputError, match="confidence"):
        measure(label_image(labels_at()), confidence={"tumour": 0.9})


def test_measurements_survive_a_json_round_trip():
    labels = labels_at((LEFT_VOXEL, VS), (RIGHT_VOXEL, COCHLEA))
    m = measure(label_image(labels, spacing_xyz=(0.4, 0.4, 1.3)), confidence={"vs": 0.8})
    assert Measurements.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_from_dict_names_missing_fields():
    with pytest.raises(InputError, match="vs_side"):
        Measurements.from_dict({"vs_present": False})
