"""Specification of the CrossMoDA metrics: Dice, ASSD (medpy definition, 350 mm for empty masks) and score_case."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from VSCochleaSegLib.errors import InputError
from VSCochleaSegLib.labels import COCHLEA, VS
from VSCochleaSegLib.metrics import EMPTY_MASK_ASSD_MM, assd, dice, score_case


def cube(shape=(8, 8, 8), start=(2, 2, 2), size=3) -> np.ndarray:
    """Boolean (z, y, x) mask with a size³ cube whose lowest corner is at ``start``."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def medpy_assd(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    """medpy.metric.binary.assd, transcribed (medpy is not installed): whole image, no cropping."""
    footprint = generate_binary_structure(3, 1)

    def asd(a, b):
        a_border = a ^ binary_erosion(a, structure=footprint, iterations=1)
        b_border = b ^ binary_erosion(b, structure=footprint, iterations=1)
        return distance_transform_edt(~b_border, sampling=spacing)[a_border].mean()

    return float(np.mean((asd(pred, gt), asd(gt, pred))))


# --- Dice -----------------------------------------------------------------------------------


def test_dice_of_identical_masks_is_one():
    assert dice(cube(), cube()) == 1.0


def test_dice_of_cubes_shifted_by_one_voxel():
    # Two 2×2×2 cubes (8 voxels each), one shifted by one voxel along x: they share a 2×2×1
    # slab of 4 voxels, so Dice = 2·4 / (8 + 8) = 0.5.
    a = cube(start=(2, 2, 2), size=2)
    b = cube(start=(2, 2, 3), size=2)
    assert dice(a, b) == pytest.approx(0.5)


def test_dice_of_disjoint_masks_is_zero():
    assert dice(cube(start=(0, 0, 0), size=2), cube(start=(5, 5, 5), size=2)) == 0.0


def test_dice_when_both_masks_are_empty_is_one():
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert dice(empty, empty) == 1.0


def test_dice_of_empty_prediction_is_zero():
    assert dice(np.zeros((8, 8, 8), dtype=bool), cube()) == 0.0


def test_dice_rejects_masks_of_different_shapes():
    with pytest.raises(InputError, match="shape"):
        dice(np.zeros((4, 4, 4), dtype=bool), np.zeros((4, 4, 5), dtype=bool))


# --- ASSD -----------------------------------------------------------------------------------


def test_assd_of_identical_masks_is_zero():
    assert assd(cube(), cube(), (2.0, 0.5, 1.0)) == 0.0


def test_assd_of_cube_shifted_along_anisotropic_axis():
    # A = 3×3×3 cube at z, y, x ∈ {2, 3, 4}; B = A shifted by +1 voxel along z (z ∈ {3, 4, 5}).
    # Spacing (z, y, x) = (2.0, 0.5, 1.0) mm. The surface of a 3×3×3 cube is all 27 voxels but
    # the centre: 26 voxels.
    # A's surface → B's surface:
    #   - the bottom face z = 2 (9 voxels): B has nothing at z = 2, its nearest surface voxels
    #     are one z step away: 2.0 mm each;
    #   - z = 3, 4 (18 voxels minus A's centre (3, 3, 3) = 17): all inside B and on B's surface
    #     (0 mm), except (4, 3, 3), which is B's centre: its nearest B-surface voxel is a
    #     neighbour one y step away, 0.5 mm (the smallest spacing).
    #   mean = (9 · 2.0 + 1 · 0.5) / 26 = 18.5 / 26 mm.
    # B → A is the mirror image (top face z = 5 at 2.0 mm; A's centre (3, 3, 3) at 0.5 mm): 18.5 / 26.
    # ASSD = mean of the two = 18.5 / 26 ≈ 0.7115 mm.
    a = cube(start=(2, 2, 2))
    b = cube(start=(3, 2, 2))
    assert assd(a, b, (2.0, 0.5, 1.0)) == pytest.approx(18.5 / 26)


def test_assd_of_empty_prediction_is_the_crossmoda_penalty():
    assert EMPTY_MASK_ASSD_MM == 350.0
    assert assd(np.zeros((8, 8, 8), dtype=bool), cube(), (1.0, 1.0, 1.0)) == 350.0


def test_assd_of_empty_reference_with_a_prediction_is_the_penalty_too():
    assert assd(cube(), np.zeros((8, 8, 8), dtype=bool), (1.0, 1.0, 1.0)) == EMPTY_MASK_ASSD_MM


def test_assd_when_both_masks_are_empty_is_zero():
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert assd(empty, empty, (1.0, 1.0, 1.0)) == 0.0


def test_assd_counts_the_image_border_as_background():
    # medpy erodes with background outside the image, so a cube cut by the border keeps a
    # surface there; padding the image with background must not change the answer.
    a = cube(start=(0, 0, 0), size=4)
    b = cube(start=(0, 1, 0), size=4)
    padded = [np.pad(m, 3) for m in (a, b)]
    assert assd(a, b, (1.5, 1.0, 0.7)) == pytest.approx(assd(*padded, (1.5, 1.0, 0.7)))


def test_assd_rejects_spacing_of_wrong_length():
    with pytest.raises(InputError, match="spacing"):
        assd(cube(), cube(), (1.0, 1.0))


SHAPE = (9, 10, 11)
voxel_lists = st.lists(st.tuples(*[st.integers(0, n - 1) for n in SHAPE]), min_size=1, max_size=15)


def mask_of(voxels) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[tuple(np.array(voxels).T)] = True
    return mask


@settings(max_examples=60, deadline=None)
@given(pred_voxels=voxel_lists, gt_voxels=voxel_lists, spacing=st.tuples(*[st.floats(0.3, 3.0)] * 3))
def test_assd_matches_medpy_on_the_whole_image(pred_voxels, gt_voxels, spacing):
    # Our ASSD crops to the masks' bounding box for speed; it must equal medpy's uncropped value.
    pred, gt = mask_of(pred_voxels), mask_of(gt_voxels)
    assert assd(pred, gt, spacing) == pytest.approx(medpy_assd(pred, gt, spacing), rel=1e-9, abs=1e-9)


# --- score_case -------------------------------------------------------------------------------


def label_image(array_zyx: np.ndarray, spacing_xyz=(0.5, 0.5, 1.5), origin=(10.0, -20.0, 5.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx.astype(np.uint8))
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    return image


def test_score_case_of_a_perfect_prediction():
    labels = np.zeros((8, 10, 12), dtype=np.uint8)
    labels[cube((8, 10, 12), (2, 2, 2))] = VS
    labels[cube((8, 10, 12), (2, 2, 8), size=2)] = COCHLEA
    scores = score_case(label_image(labels), label_image(labels))
    assert scores == {"VS_Dice": 1.0, "VS_ASSD": 0.0, "Cochlea_Dice": 1.0, "Cochlea_ASSD": 0.0}


def test_score_case_reverses_sitk_spacing_to_zyx():
    # Same shifted cubes as the hand-computed ASSD test, shift along numpy axis 0 (z).
    # SimpleITK spacing is (x, y, z) = (1.0, 0.5, 2.0), i.e. (z, y, x) = (2.0, 0.5, 1.0): 18.5 / 26 mm.
    gt, pred = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    gt[cube(start=(2, 2, 2))] = VS
    pred[cube(start=(3, 2, 2))] = VS
    scores = score_case(label_image(pred, (1.0, 0.5, 2.0)), label_image(gt, (1.0, 0.5, 2.0)))
    assert scores["VS_ASSD"] == pytest.approx(18.5 / 26)


def test_score_case_with_no_cochlea_predicted():
    gt, pred = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    gt[cube(start=(2, 2, 2))] = VS
    gt[0, 0, 0] = COCHLEA
    pred[cube(start=(2, 2, 2))] = VS
    scores = score_case(label_image(pred), label_image(gt))
    assert (scores["Cochlea_Dice"], scores["Cochlea_ASSD"]) == (0.0, 350.0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda image: image.SetSpacing((0.5, 0.5, 1.6)), "spacing"),
        (lambda image: image.SetOrigin((10.0, -20.0, 5.01)), "origin"),
        (lambda image: image.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, 1)), "direction"),
    ],
    ids=["spacing", "origin", "direction"],
)
def test_score_case_rejects_images_on_different_grids(change, message):
    gt = label_image(np.zeros((4, 5, 6), np.uint8))
    pred = label_image(np.zeros((4, 5, 6), np.uint8))
    change(pred)
    with pytest.raises(InputError, match=message):
        score_case(pred, gt)


def test_score_case_rejects_images_of_different_size():
    with pytest.raises(InputError, match="size"):
        score_case(label_image(np.zeros((4, 5, 6), np.uint8)), label_image(np.zeros((4, 5, 7), np.uint8)))


def test_score_case_tolerates_float32_rounding_of_the_geometry():
    gt = label_image(np.zeros((4, 5, 6), np.uint8))
    pred = label_image(np.zeros((4, 5, 6), np.uint8), origin=(10.00001, -20.0, 5.0))
    assert score_case(pred, gt)["VS_Dice"] == 1.0
