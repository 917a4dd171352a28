"""Post-processing rules on hand-made label maps: one VS and one cochlea per side, distance rule."""

from __future__ import annotations

import dataclasses

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from VSCochleaSegLib.localise import EarLocations, ears_from_probabilities
from VSCochleaSegLib.geometry import GridSpec
from VSCochleaSegLib.metrics import dice
from VSCochleaSegLib.model_folder import PostprocessSpec
from VSCochleaSegLib.postprocess import (labels_from_probabilities, postprocess_labels, refine_cochlea_edges,
                                         trim_vs_edges)

SPEC = PostprocessSpec(True, True, 20.0, 0.0)


def reference(shape_zyx=(40, 40, 80), spacing=(1.0, 1.0, 1.0)):
    img = sitk.Image(list(shape_zyx[::-1]), sitk.sitkUInt8)
    img.SetSpacing(spacing)
    return img


def ears():
    # x index 20 → left ear at x = 60 mm, right ear at x = 20 mm; midline x = 40 mm; z = 20 mm.
    return EarLocations({"left": np.array([60.0, 20.0, 20.0]), "right": np.array([20.0, 20.0, 20.0])},
                        np.array([40.0, 20.0, 20.0]), np.array([1.0, 0.0, 0.0]))


def components(mask):
    return int(cc3d.connected_components(mask, connectivity=26).max())


def test_keeps_the_largest_vs_per_side_and_drops_the_rest():
    lab = np.zeros((40, 40, 80), np.uint8)
    lab[15:25, 15:25, 45:55] = 1  # big VS, left
    lab[15:17, 15:17, 65:67] = 1  # small VS blob, left
    lab[18:20, 18:20, 10:12] = 1  # small VS blob, right: kept (largest on its side)
    out = postprocess_labels(lab, reference(), ears(), SPEC)
    assert out[20, 20, 50] == 1
    assert out[16, 16, 66] == 0
    assert out[19, 19, 11] == 1


def test_drops_vs_far_from_the_cochlea_along_z():
    lab = np.zeros((40, 40, 80), np.uint8)
    lab[0:3, 15:20, 50:55] = 1  # centre z ≈ 1 mm, cochlea z = 20 mm → 19 mm: kept
    out = postprocess_labels(lab, reference(), ears(), SPEC)
    assert out.sum() > 0
    lab2 = np.zeros((40, 40, 80), np.uint8)
    lab2[:, :, :] = 0
    lab2[0:3, 15:20, 50:55] = 1
    far = EarLocations({"left": np.array([60.0, 20.0, 35.0]), "right": np.array([20.0, 20.0, 35.0])},
                       np.array([40.0, 20.0, 35.0]), np.array([1.0, 0.0, 0.0]))
    assert postprocess_labels(lab2, reference(), far, SPEC).sum() == 0


def test_one_cochlea_per_side_and_labels_stay_in_0_1_2():
    lab = np.zeros((40, 40, 80), np.uint8)
    lab[18:22, 18:22, 58:62] = 2
    lab[5:7, 5:7, 70:72] = 2
    lab[18:22, 18:22, 18:22] = 2
    out = postprocess_labels(lab, reference(), ears(), SPEC)
    assert set(np.unique(out)) <= {0, 1, 2}
    left = out[:, :, 40:] == 2
    right = out[:, :, :40] == 2
    assert components(left) == 1 and components(right) == 1


def test_localiser_picks_one_cochlea_each_side_and_mirrors_a_missing_one():
    grid = GridSpec((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (40, 20, 10))
    volume = np.ones((10, 20, 40), np.float32)
    prob = np.zeros((10, 20, 40), np.float32)
    prob[4:6, 9:11, 30:32] = 0.9  # left (x ≈ 61 mm)
    ears_found = ears_from_probabilities(prob, volume, grid)
    assert ears_found.mirrored == {"right": True}
    assert ears_found.cochlea_lps["left"][0] > ears_found.midline_point_lps[0] > ears_found.cochlea_lps["right"][0]
    assert ears_found.warnings


def test_a_vs_far_from_the_cochlea_in_3d_is_dropped_before_the_largest_is_chosen():
    """Left cochlea centre at (60, 20, 20) mm. A large blob whose nearest voxel is 16.2 mm away (cerebellum) and a
    small one 4 mm away (the canal): without the 3D rule the large one wins, with 15 mm the small one is kept."""
    lab = np.zeros((40, 40, 80), np.uint8)
    lab[15:25, 35:40, 45:55] = 1  # large: nearest voxel (54, 35, 20) → √(36 + 225) ≈ 16.2 mm
    lab[18:21, 18:21, 64:67] = 1  # small: x 64–66, nearest voxel (64, 19…20, 19…20) → 4 mm
    plain = postprocess_labels(lab, reference(), ears(), SPEC)
    assert plain[20, 37, 50] == 1 and plain[19, 19, 65] == 0
    spec = PostprocessSpec(True, True, 20.0, 0.0, vs_max_distance_from_cochlea_mm=15.0)
    out = postprocess_labels(lab, reference(), ears(), spec)
    assert out[20, 37, 50] == 0 and out[19, 19, 65] == 1
    # the same blob alone is kept when it comes within the distance, and the right side has its own cochlea
    near = np.zeros_like(lab)
    near[15:25, 30:35, 45:55] = 1  # nearest voxel (54, 30, 20) → √(36 + 100) ≈ 11.7 mm
    assert postprocess_labels(near, reference(), ears(), spec).sum() == near.sum()


def test_a_large_vs_may_lie_farther_from_the_cochlea_than_a_small_one():
    """Left cochlea centre at (60, 20, 20) mm. The 500 mm³ blob whose nearest voxel is 16.2 mm away is dropped by a
    15 mm rule unless components of at least 400 mm³ may come within 18 mm; a 100 mm³ blob as far stays dropped."""
    big = np.zeros((40, 40, 80), np.uint8)
    big[15:25, 35:40, 45:55] = 1  # 500 mm³, nearest voxel ≈ 16.2 mm
    small = np.zeros_like(big)
    small[15:25, 35:40, 53:55] = 1  # 100 mm³, nearest voxel (54, 35, 20) ≈ 16.2 mm
    rule = dict(vs_max_distance_from_cochlea_mm=15.0)
    assert postprocess_labels(big, reference(), ears(), PostprocessSpec(True, True, 20.0, 0.0, **rule)).sum() == 0
    large = PostprocessSpec(True, True, 20.0, 0.0, **rule, vs_large_volume_mm3=400.0, vs_large_max_distance_mm=18.0)
    assert (postprocess_labels(big, reference(), ears(), large) == big).all()
    assert postprocess_labels(small, reference(), ears(), large).sum() == 0
    too_far = dataclasses.replace(large, vs_large_max_distance_mm=16.0)
    assert postprocess_labels(big, reference(), ears(), too_far).sum() == 0


def test_the_large_vs_distance_keys_are_optional_and_checked():
    base = {"keep_largest_vs_per_side": True, "keep_largest_cochlea_per_side": True,
            "vs_max_z_distance_from_cochlea_mm": 20.0, "min_vs_volume_mm3": 0.0, "vs_max_distance_from_cochlea_mm": 11.0}
    assert PostprocessSpec.from_dict(base).vs_large_volume_mm3 == 0.0
    spec = PostprocessSpec.from_dict({**base, "vs_large_volume_mm3": 2000, "vs_large_max_distance_mm": 20})
    assert (spec.vs_large_volume_mm3, spec.vs_large_max_distance_mm) == (2000.0, 20.0)
    for bad in ({"vs_large_volume_mm3": 2000}, {"vs_large_volume_mm3": 2000, "vs_large_max_distance_mm": 10}):
        with pytest.raises(Exception, match="vs_large_max_distance_mm"):
            PostprocessSpec.from_dict({**base, **bad})


def test_vs_opening_cuts_a_thin_leak_away_and_keeps_the_tumour_and_the_cochlea():
    """A 10 mm tumour cube (left ear), joined by a 1-voxel neck to a 2 mm thick sheet of leaked "VS" larger than
    itself (as a prediction spreading along the cerebellar surface); 1 mm voxels."""
    lab = np.zeros((40, 40, 80), np.uint8)
    lab[15:25, 15:25, 45:55] = 1  # tumour, 1000 mm³
    lab[20, 20, 55:60] = 1  # neck
    lab[5:35, 5:35, 60:62] = 1  # sheet, 1800 mm³
    lab[2:5, 2:5, 70:73] = 2  # cochlea: 3 voxels wide, thinner than the ball
    plain = postprocess_labels(lab, reference(), ears(), SPEC)
    assert (plain == 1).sum() == (lab == 1).sum()  # without the opening, one component: all of it is "VS"
    opened = postprocess_labels(lab, reference(), ears(), PostprocessSpec(True, True, 20.0, 0.0, vs_open_mm=1.5))
    assert (opened[15:25, 15:25, 45:55] == 1).sum() >= 900  # the tumour stays (a 1.5 mm ball rounds its edges)
    assert (opened[:, :, 55:] == 1).sum() == 0  # neck and sheet are background
    assert (opened == 2).sum() == (lab == 2).sum()  # the cochlea is not opened


def test_vs_growing_fills_the_tumour_border_of_its_own_intensity_and_stops_at_other_tissue_and_distance():
    """A grey 12 mm tumour (intensity 100) in bright CSF (300) beside grey brain (100) 5 mm away, of which the
    prediction holds only the central 8 mm; 1 mm voxels."""
    img = np.full((40, 40, 80), 300.0, np.float32)
    img[14:26, 14:26, 44:56] = 100.0  # tumour
    img[:, :, 0:12] = 100.0  # brain of the same grey, far from the tumour
    img[14:26, 14:26, 61:80] = 100.0  # cerebellum of the same grey, behind a 5 mm CSF gap
    img += np.random.default_rng(0).normal(0, 5, img.shape).astype(np.float32)
    ref = sitk.GetImageFromArray(img)
    lab = np.zeros((40, 40, 80), np.uint8)
    lab[16:24, 16:24, 46:54] = 1  # the prediction: the tumour's core
    lab[14:16, 20:22, 46:48] = 2  # a (mislabelled) cochlea inside the tumour border is never overwritten
    spec = PostprocessSpec(True, True, 20.0, 0.0, vs_grow_mm=3.0)
    out = postprocess_labels(lab, ref, ears(), spec)
    tumour = np.zeros_like(lab, bool)
    tumour[14:26, 14:26, 44:56] = True
    border = tumour.sum() - (lab == 1).sum() - 8
    assert ((out == 1) & tumour).sum() - (lab == 1).sum() >= 0.7 * border  # most of the border (noise: 0.1–0.9 band)
    assert ((out == 1) & ~tumour).sum() == 0  # not into CSF, nor across it into the cerebellum
    assert (out == 2).sum() == 8
    off = postprocess_labels(lab, ref, ears(), PostprocessSpec(True, True, 20.0, 0.0))
    assert (off == 1).sum() == (lab == 1).sum()


def test_vs_growing_is_limited_to_its_distance():
    img = np.full((40, 40, 80), 100.0, np.float32)  # all one grey: only the distance stops the growth
    img += np.random.default_rng(1).normal(0, 1, img.shape).astype(np.float32)
    lab = np.zeros((40, 40, 80), np.uint8)
    lab[18:22, 18:22, 48:52] = 1
    out = postprocess_labels(lab, sitk.GetImageFromArray(img), ears(), PostprocessSpec(True, True, 20.0, 0.0,
                                                                                         vs_grow_mm=2.0))
    zz, yy, xx = np.nonzero(out == 1)
    assert (out == 1).sum() > (lab == 1).sum()
    assert zz.min() >= 16 and zz.max() <= 23 and xx.min() >= 46 and xx.max() <= 53


def _fluid_ball(shape=(30, 30, 30), spacing=(1.0, 0.5, 0.5), radius_mm=3.0, fluid=400.0, bone=50.0, seed=0):
    """A bright fluid ball (the cochlea) in dark bone, with partial volume at its edge: image (z, y, x) float32,
    the true mask (voxel centres inside), the spacing (z, y, x) mm."""
    sp = np.asarray(spacing)
    grid = np.indices(shape).astype(float) * sp[:, None, None, None]
    r = np.sqrt(((grid - grid.reshape(3, -1).mean(1)[:, None, None, None]) ** 2).sum(0))
    fraction = np.clip(radius_mm + 0.5 - r, 0.0, 1.0)  # 1 mm partial-volume ramp centred on the surface
    img = bone + (fluid - bone) * fraction + np.random.default_rng(seed).normal(0, 10, shape)
    return img.astype(np.float32), r <= radius_mm, sp


def test_cochlea_refinement_moves_a_too_small_or_too_large_cochlea_to_the_fluid_edge():
    img, true, sp = _fluid_ball()
    for start in (ndimage.binary_erosion(true), ndimage.binary_dilation(true)):  # inside / outside the edge
        lab = start.astype(np.uint8) * 2
        out = refine_cochlea_edges(lab, img, sp, max_mm=1.0)
        assert dice(out == 2, true) > 0.93 > dice(start, true) + 0.05
        assert set(np.unique(out)) <= {0, 2}


def test_cochlea_refinement_leaves_vs_and_other_structures_and_non_t2_contrast_alone():
    img, true, sp = _fluid_ball()
    lab = np.zeros(true.shape, np.uint8)
    lab[true] = 2
    lab[true & (np.indices(true.shape)[2] > 17)] = 1  # "VS" on part of the fluid: never becomes cochlea
    out = refine_cochlea_edges(lab, img, sp, max_mm=1.0)
    assert ((lab == 1) == (out == 1)).all()
    dark = (img.max() + img.min() - img).astype(np.float32)  # inverted (ceT1-like): fluid darker than bone
    lab = true.astype(np.uint8) * 2
    assert (refine_cochlea_edges(lab, dark, sp, max_mm=1.0) == lab).all()
    # through postprocess_labels, only when the model folder asks for it
    ref = sitk.GetImageFromArray(img)
    ref.SetSpacing(tuple(float(s) for s in sp[::-1]))
    small = np.where(ndimage.binary_erosion(true), 2, 0).astype(np.uint8)
    e = EarLocations({"left": np.array([10.0, 7.0, 15.0]), "right": np.array([2.0, 7.0, 15.0])},
                     np.array([6.0, 7.0, 15.0]), np.array([1.0, 0.0, 0.0]))
    off = postprocess_labels(small, ref, e, PostprocessSpec(False, False, 50.0, 0.0))
    on = postprocess_labels(small, ref, e, PostprocessSpec(False, False, 50.0, 0.0, cochlea_refine_mm=1.0))
    assert (off == small).all() and dice(on == 2, true) > dice(small == 2, true) + 0.05


def test_vs_trim_gives_a_border_drawn_into_the_csf_back_and_adds_nothing():
    """A grey VS ball in bright CSF (T2), predicted 1–2 voxels too wide: the trim brings it back to the tumour's
    edge (within its distance only); a prediction inside the edge is not grown; the cochlea and a VS in darker
    tissue are left alone."""
    img, true, sp = _fluid_ball(radius_mm=4.0, fluid=300.0, bone=900.0)  # "fluid" = tumour grey, "bone" = CSF
    wide = ndimage.binary_dilation(true, iterations=2)  # 1 mm too wide in-plane, 2 mm in z
    assert dice(trim_vs_edges(wide.astype(np.uint8), img, sp, max_mm=2.0) == 1, true) > 0.97
    lab = wide.astype(np.uint8)
    out = trim_vs_edges(lab, img, sp, max_mm=1.0)
    assert 0.97 > dice(out == 1, true) > 0.88 > dice(wide, true) + 0.05  # the outer z layer is out of reach
    assert not ((out == 1) & ~wide).any()
    inner = ndimage.binary_erosion(true).astype(np.uint8)
    assert (trim_vs_edges(inner, img, sp, max_mm=1.0) == inner).all()
    with_cochlea = lab.copy()
    with_cochlea[0:2, 0:2, 0:2] = 2
    assert (trim_vs_edges(with_cochlea, img, sp, max_mm=1.0) == 2).sum() == 8
    dark = (img.max() + img.min() - img).astype(np.float32)  # VS brighter than its surroundings: not T2 CSF
    assert (trim_vs_edges(lab, dark, sp, max_mm=1.0) == lab).all()
    # through postprocess_labels, only when the model folder asks for it
    ref = sitk.GetImageFromArray(img)
    ref.SetSpacing(tuple(float(v) for v in sp[::-1]))
    e = EarLocations({"left": np.array([10.0, 7.0, 15.0]), "right": np.array([2.0, 7.0, 15.0])},
                     np.array([6.0, 7.0, 15.0]), np.array([1.0, 0.0, 0.0]))
    off = postprocess_labels(lab, ref, e, PostprocessSpec(False, False, 50.0, 0.0))
    on = postprocess_labels(lab, ref, e, PostprocessSpec(False, False, 50.0, 0.0, vs_trim_mm=1.0))
    assert (off == lab).all() and dice(on == 1, true) > dice(wide, true) + 0.05


@pytest.mark.parametrize("distance_key, quantile_key, quantile, bad_quantile, bad_distance", [
    ("cochlea_refine_mm", "cochlea_fluid_quantile", 0.8, 1.5, -1),
    ("vs_trim_mm", "vs_csf_quantile", 0.75, 2.0, -0.5),
])
def test_intensity_edge_keys_are_optional_and_checked(distance_key, quantile_key, quantile, bad_quantile, bad_distance):
    base = {"keep_largest_vs_per_side": True, "keep_largest_cochlea_per_side": True,
            "vs_max_z_distance_from_cochlea_mm": 20.0, "min_vs_volume_mm3": 0.0}
    assert getattr(PostprocessSpec.from_dict(base), distance_key) == 0.0
    spec = PostprocessSpec.from_dict({**base, distance_key: 1.0, quantile_key: quantile})
    assert (getattr(spec, distance_key), getattr(spec, quantile_key)) == (1.0, quantile)
    with pytest.raises(Exception, match=quantile_key):
        PostprocessSpec.from_dict({**base, quantile_key: bad_quantile})
    with pytest.raises(Exception, match=distance_key):
        PostprocessSpec.from_dict({**base, distance_key: bad_distance})


def test_labels_from_probabilities_is_the_argmax_then_the_vs_threshold():
    rng = np.random.default_rng(7)
    probs = rng.dirichlet((1.0, 1.0, 1.0), size=(4, 5, 6)).transpose(3, 0, 1, 2).astype(np.float32)
    probs[:, 0, 0, 0] = (0.4, 0.4, 0.2)  # a tie goes to the lower class, as with argmax
    expected = probs.argmax(0)
    assert (labels_from_probabilities(probs.copy()) == expected).all()
    out = labels_from_probabilities(probs.copy(), vs_min_probability=0.3)
    promoted = (expected == 0) & (probs[1] >= 0.3)
    assert promoted.any() and (out[promoted] == 1).all()
    assert (out[~promoted] == expected[~promoted]).all()  # cochlea voxels and the rest untouched
    assert ((expected == 2) & (probs[1] >= 0.3)).any()


def test_vs_min_probability_is_optional_and_checked():
    base = {"keep_largest_vs_per_side": True, "keep_largest_cochlea_per_side": True,
            "vs_max_z_distance_from_cochlea_mm": 20.0, "min_vs_volume_mm3": 0.0}
    assert PostprocessSpec.from_dict(base).vs_min_probability == 0.0
    assert PostprocessSpec.from_dict({**base, "vs_min_probability": 0.3}).vs_min_probability == 0.3
    for bad in (1.5, -0.1):
        with pytest.raises(Exception, match="vs_min_probability"):
            PostprocessSpec.from_dict({**base, "vs_min_probability": bad})
