"""Synthetic VS drawn into tumour-free real hrT2 crops (training/synthetic_tumours.py)."""

import numpy as np
import pytest

from training.segmentation import IGNORE
from training.synthetic_tumours import SyntheticTumourConfig, draw_tumour, synthetic_tumour_crops, tumour_shapes
from VSCochleaSegLib.labels import COCHLEA, VS


def host_crop(seed=0):
    """A (24, 40, 48) crop: bone (0.02) left half, brain (0.3) right half with a CSF cistern (0.95) block,
    a cochlea on the bone/brain border; noise 0.01. Label: background, cochlea, IGNORE in the far corner."""
    rng = np.random.default_rng(seed)
    image = np.full((24, 40, 48), 0.02, np.float32)
    image[:, :, 24:] = 0.3
    image[6:18, 10:30, 28:40] = 0.95
    image += rng.normal(0, 0.01, image.shape).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:13, 18:21, 22:25] = COCHLEA
    labels[:, :5, 44:] = IGNORE
    return image, labels


def test_a_tumour_is_drawn_only_on_soft_tissue_and_labelled_where_drawn():
    image, labels = host_crop()
    shape = np.zeros(image.shape, bool)
    shape[8:16, 14:26, 16:36] = True  # half over bone, half over brain and cistern, touching the cochlea
    cfg = SyntheticTumourConfig(copies_per_free_crop=1, factor_range=(1.5, 1.5), heterogeneity=0.0)
    new_image, new_labels = draw_tumour(image, labels, shape, np.random.default_rng(1), cfg)
    vs = new_labels == VS
    assert vs.sum() > 100
    assert not (vs & (image <= cfg.tissue_threshold)).any()      # bone stays bone
    assert vs[:, :, 26:36].any() and not vs[:, :, :24].any()
    assert (new_labels == COCHLEA).sum() == (labels == COCHLEA).sum()
    assert not (vs & np.isin(labels, [COCHLEA])).any()
    assert vs.sum() <= (shape & (image > cfg.tissue_threshold)).sum()
    # darker than CSF, brighter than brain here (factor 1.5 × tissue median), noisy like the host
    inside = new_image[10:14, 16:24, 30:34]  # deep inside the drawn tumour, where it replaced the cistern
    assert 0.3 < np.median(inside) < 0.8
    assert 0.003 < inside.std() < 0.03
    # far from the tumour nothing changed; unlabelled (IGNORE) voxels stay IGNORE outside it
    far = np.ones(image.shape, bool)
    far[4:20, 10:30, 12:40] = False
    assert np.array_equal(new_image[far], image[far])
    assert np.array_equal(new_labels[~vs], labels[~vs])


def test_a_tumour_shape_on_bone_only_is_not_drawn_and_a_host_with_a_vs_is_refused():
    image, labels = host_crop()
    shape = np.zeros(image.shape, bool)
    shape[8:16, 14:26, 2:14] = True  # all bone
    cfg = SyntheticTumourConfig(copies_per_free_crop=1)
    assert draw_tumour(image, labels, shape, np.random.default_rng(0), cfg) is None
    labels[0, 0, 30] = VS
    with pytest.raises(ValueError, match="already holds a VS"):
        draw_tumour(image, labels, shape, np.random.default_rng(0), cfg)


def test_the_tumour_median_stays_below_csf_whatever_the_factor():
    image, labels = host_crop()
    shape = np.zeros(image.shape, bool)
    shape[8:16, 14:26, 28:40] = True  # inside the cistern
    cfg = SyntheticTumourConfig(copies_per_free_crop=1, factor_range=(10.0, 10.0), heterogeneity=0.0)
    new_image, new_labels = draw_tumour(image, labels, shape, np.random.default_rng(0), cfg)
    core = np.zeros(image.shape, bool)
    core[10:14, 16:24, 30:38] = True
    assert np.median(new_image[core]) < cfg.max_fraction_of_csf * 0.97


def test_tumour_shapes_keep_only_tumours_reaching_their_own_cochlea():
    labels = np.zeros((20, 40, 40), np.uint8)
    labels[10, 20, 30] = COCHLEA
    near, far, small = labels.copy(), labels.copy(), labels.copy()
    near[8:12, 18:22, 10:26] = VS     # ends 2 mm from the cochlea (0.5 mm in-plane)
    far[8:12, 18:22, 0:6] = VS        # 12 mm away: the other ear's tumour at the crop's medial edge
    small[10, 20, 26] = VS
    shapes = tumour_shapes([near, far, small, labels], min_voxels=20, spacing_zyx_mm=(1, 0.5, 0.5),
                           max_distance_to_cochlea_mm=10)
    assert len(shapes) == 1 and np.array_equal(shapes[0], near == VS)


def test_synthetic_crops_come_only_from_tumour_free_hosts_and_are_reproducible():
    free1, free2 = host_crop(1), host_crop(2)
    with_vs = host_crop(3)
    with_vs[1][8:10, 14:16, 30:32] = VS
    shape = np.zeros(free1[0].shape, bool)
    shape[8:16, 14:26, 20:36] = True
    cfg = SyntheticTumourConfig(copies_per_free_crop=2, seed=5)
    out = synthetic_tumour_crops([free1, with_vs, free2], [shape], cfg)
    assert len(out) == 4
    assert all((lab == VS).sum() > 100 and img.dtype == np.float16 for img, lab in out)
    again = synthetic_tumour_crops([free1, with_vs, free2], [shape], cfg)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(out, again))
    assert not np.array_equal(out[0][0], out[1][0])  # two copies, two draws
    assert synthetic_tumour_crops([free1], [shape], SyntheticTumourConfig()) == []  # off by default


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="factor_range"):
        SyntheticTumourConfig(factor_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="copies_per_free_crop"):
        SyntheticTumourConfig(copies_per_free_crop=-1)


def test_a_tumour_can_be_limited_to_where_it_displaces_fluid():
    image, labels = host_crop()
    shape = np.zeros(image.shape, bool)
    shape[8:16, 14:26, 24:40] = True  # over brain (x 24-28) and the cistern (x 28-40)
    cfg = SyntheticTumourConfig(copies_per_free_crop=1, fluid_margin_voxels=0)
    _, new_labels = draw_tumour(image, labels, shape, np.random.default_rng(0), cfg)
    vs = new_labels == VS
    assert vs[:, :, 28:40].sum() == (shape[:, :, 28:40] & (image[:, :, 28:40] > 0.5)).sum()
    assert not vs[:, :, 24:28].any()
    cfg = SyntheticTumourConfig(copies_per_free_crop=1, fluid_margin_voxels=2)
    _, new_labels = draw_tumour(image, labels, shape, np.random.default_rng(0), cfg)
    assert (new_labels == VS)[:, :, 26:28].any() and not (new_labels == VS)[:, :, 24:26].any()


def test_a_negative_size_exponent_draws_small_tumour_shapes_more_often():
    image, labels = host_crop()
    small, large = np.zeros(image.shape, bool), np.zeros(image.shape, bool)
    small[10:13, 16:19, 30:33] = True      # 27 voxels
    large[6:18, 10:30, 26:40] = True       # 3 360 voxels
    hosts = [(image, labels)] * 40

    def share_small(exponent):
        out = synthetic_tumour_crops(hosts, [small, large], SyntheticTumourConfig(
            copies_per_free_crop=1, size_exponent=exponent, min_vs_voxels=5))
        return np.mean([(lab == VS).sum() < 100 for _, lab in out])

    assert 0.25 < share_small(0.0) < 0.75
    assert share_small(-1.0) > 0.9


def test_shapes_can_be_moved_and_must_fit_the_hosts_soft_tissue():
    from training.synthetic_tumours import shifted

    mask = np.zeros((4, 6, 6), bool)
    mask[1, 2, 2] = mask[3, 5, 5] = True
    moved = shifted(mask, (1, -1, 2))
    assert moved.sum() == 1 and moved[2, 1, 4]  # the voxel pushed off the edge is dropped, nothing wraps
    image, labels = host_crop()
    half_bone = np.zeros(image.shape, bool)
    half_bone[8:16, 14:26, 16:32] = True  # half of it over bone (x < 24)
    strict = SyntheticTumourConfig(copies_per_free_crop=1, min_fit_fraction=0.9, tries=3)
    assert synthetic_tumour_crops([(image, labels)], [half_bone], strict) == []
    loose = SyntheticTumourConfig(copies_per_free_crop=1, min_fit_fraction=0.4, tries=3)
    assert len(synthetic_tumour_crops([(image, labels)], [half_bone], loose)) == 1
    jitter = SyntheticTumourConfig(copies_per_free_crop=3, max_shift_voxels=(1, 3, 3), seed=2)
    drawn = [lab == VS for _, lab in synthetic_tumour_crops([(image, labels)], [half_bone], jitter)]
    assert len(drawn) == 3 and len({d.tobytes() for d in drawn}) > 1
