"""Specification of training/crops.py's localiser target: the inner-ear region the localiser learns."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from training.crops import localiser_target
from VSCochleaSegLib.geometry import GridSpec
from VSCochleaSegLib.labels import COCHLEA, VS
from VSCochleaSegLib.localise import cochlea_centres_from_labels


def label_image() -> sitk.Image:
    """60 × 50 × 40 voxels of 0.5 mm, oblique-free, two small cochleae and a VS next to the left one."""
    arr = np.zeros((40, 50, 60), np.uint8)  # (z, y, x)
    arr[18:22, 23:27, 8:12] = COCHLEA  # patient right (low LPS x)
    arr[18:22, 23:27, 48:52] = COCHLEA  # patient left
    arr[10:16, 20:30, 30:40] = VS
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.5, 0.5))
    img.SetOrigin((-15.0, -12.0, -10.0))
    return img


def test_the_inner_ear_region_is_a_ball_around_each_cochlea_centre_and_the_vs_is_kept():
    labels = label_image()
    grid = GridSpec(origin=(-15.0, -12.0, -10.0), spacing=(1.0, 1.0, 1.0), size=(30, 25, 20))
    centres = cochlea_centres_from_labels(labels)
    target = localiser_target(labels, grid, centres, radius_mm=4.0)

    zyx = np.argwhere(target == COCHLEA)
    lps = grid.index_to_lps(zyx[:, ::-1].astype(float))
    for side, centre in centres.items():
        mine = lps[np.linalg.norm(lps - centre, axis=1) < 10.0]
        assert np.allclose(mine.mean(0), centre, atol=0.6), side  # the centroid is the cochlea centre
        # a 4 mm ball at 1 mm holds ~ 4/3·π·4³ = 268 voxels (257 whole voxel centres inside)
        assert 230 <= len(mine) <= 300, side
    assert np.linalg.norm(lps[:, None] - np.stack(list(centres.values()))[None], axis=2).min(1).max() <= 4.0
    assert (target == VS).sum() > 0  # the VS stays labelled outside the balls
    assert set(np.unique(target)) <= {0, VS, COCHLEA}
