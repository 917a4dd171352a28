"""Geometry round trips: crops in LPS boxes (mirrored for right ears) map back onto any input grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from VSCochleaSegLib.geometry import (
    GridSpec, box_grid, lps_aligned_grid, resample_channels_to_reference, resample_to_grid,
)
from VSCochleaSegLib.measure import index_to_lps
from VSCochleaSegLib.phantoms.shapes import rotation_matrix


def make_image(size=(60, 50, 30), spacing=(0.45, 0.55, 1.3), angles=(0.0, 0.0, 0.0), flip=(1, 1, 1), origin=(-13.0, -12.0, -18.0)):
    img = sitk.Image(list(size), sitk.sitkFloat32)
    img.SetSpacing(spacing)
    d = rotation_matrix(angles) @ np.diag(flip)
    img.SetDirection(tuple(d.ravel()))
    img.SetOrigin(origin)
    return img


def sphere_on(image: sitk.Image, centre, radius) -> np.ndarray:
    """Voxels of ``image`` whose centres lie within ``radius`` mm of ``centre`` (LPS)."""
    zyx = np.argwhere(np.ones(image.GetSize()[::-1], bool))
    pts = index_to_lps(image, zyx)
    inside = np.linalg.norm(pts - np.asarray(centre), axis=1) <= radius
    return inside.reshape(image.GetSize()[::-1])


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


GRIDS = {
    "identity": dict(),
    "oblique": dict(angles=(0.2, -0.15, 0.35)),
    "ras_storage": dict(flip=(-1, -1, 1), origin=(13.0, 12.0, -18.0)),
    "left_handed_oblique": dict(angles=(0.1, 0.1, -0.3), flip=(1, 1, -1), origin=(-13.0, -12.0, 18.0)),
}


@pytest.mark.parametrize("mirror", [False, True], ids=["left_ear_box", "right_ear_box_mirrored"])
@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_sphere_survives_crop_and_map_back(grid_name, mirror):
    image = make_image(**GRIDS[grid_name])
    centre = index_to_lps(image, np.array([[15.0, 25.0, 30.0]]))[0] + np.array([1.0, -1.5, 0.5])
    truth = sphere_on(image, centre, 5.0)
    box = box_grid(centre + np.array([2.0, 1.0, 0.0]), (24, 24, 20), (0.5, 0.5, 1.0), mirror_x=mirror)
    onehot = sitk.GetImageFromArray(truth.astype(np.float32))
    onehot.CopyInformation(image)
    crop = resample_to_grid(onehot, box)
    sl, maps, coverage = resample_channels_to_reference(crop[None], box, image)
    back = np.zeros(truth.shape, np.float32)
    back[sl] = maps[0]
    assert dice(back > 0.5, truth) > 0.9
    assert coverage.max() == pytest.approx(1.0)


def test_mirrored_box_puts_lateral_side_at_high_x_index():
    left = box_grid((30.0, 0.0, 0.0), (20, 10, 10), (1.0, 1.0, 1.0), mirror_x=False)
    right = box_grid((-30.0, 0.0, 0.0), (20, 10, 10), (1.0, 1.0, 1.0), mirror_x=True)
    last = np.array([[19.0, 0.0, 0.0]])
    first = np.array([[0.0, 0.0, 0.0]])
    # Left ear: lateral is +x (patient left). Right ear: lateral is -x. Both at high i.
    assert left.index_to_lps(last)[0, 0] > left.index_to_lps(first)[0, 0]
    assert right.index_to_lps(last)[0, 0] < right.index_to_lps(first)[0, 0]


def test_box_grid_is_centred_on_its_centre():
    g = box_grid((10.0, -5.0, 3.0), (64, 56, 48), (0.5, 0.5, 1.0), mirror_x=True)
    assert g.shape_zyx == (48, 112, 128)
    np.testing.assert_allclose(g.corners_lps().mean(0), (10.0, -5.0, 3.0), atol=1e-9)


def test_lps_aligned_grid_covers_an_oblique_image_and_respects_multiples():
    image = make_image(**GRIDS["oblique"])
    g = lps_aligned_grid(image, (2.0, 2.0, 2.0), multiple_of=(8, 8, 8))
    assert all(s % 8 == 0 for s in g.size)
    corners = GridSpec.of_image(image).corners_lps()
    lo, hi = g.corners_lps().min(0), g.corners_lps().max(0)
    assert np.all(corners >= lo - 1e-6) and np.all(corners <= hi + 1e-6)


def test_grid_that_misses_the_image_maps_to_nothing():
    image = make_image()
    far = box_grid((500.0, 500.0, 500.0), (10, 10, 10), (1.0, 1.0, 1.0))
    assert resample_channels_to_reference(np.zeros((1, 10, 10, 10), np.float32), far, image) is None
