"""Tumour intensity augmentation of translated images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds training/

from training.translation.augment import (  # noqa: E402
    add_csf_rim, augment_tumour_intensity, match_context_intensity, match_ring_intensity, match_tumour_intensity,
    tumour_ring,
)


def scene():
    """A uniform 0.6 volume with a 10-voxel VS cube and a small cochlea far from it."""
    image = np.full((16, 32, 32), 0.6, np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[3:13, 5:15, 5:15] = 1
    labels[7:9, 25:27, 25:27] = 2
    return image, labels


def test_darkening_scales_the_tumour_core_by_the_factor():
    image, labels = scene()
    out = augment_tumour_intensity(image, labels, np.random.default_rng(0), factor_range=(0.5, 0.5))
    assert np.allclose(out[8, 10, 10], 0.3, atol=1e-3)


def test_brightening_is_possible_too():
    image, labels = scene()
    out = augment_tumour_intensity(image, labels, np.random.default_rng(0), factor_range=(1.5, 1.5))
    assert np.allclose(out[8, 10, 10], 0.9, atol=1e-3)


def test_voxels_far_from_the_tumour_and_the_cochlea_are_unchanged():
    image, labels = scene()
    out = augment_tumour_intensity(image, labels, np.random.default_rng(0), factor_range=(0.5, 0.5))
    assert np.array_equal(out[:, 20:, :], image[:, 20:, :])


def test_the_edge_is_smooth_not_a_step():
    image, labels = scene()
    out = augment_tumour_intensity(image, labels, np.random.default_rng(0), factor_range=(0.5, 0.5), sigma_voxels=1.0)
    profile = out[8, 10, 10:20]  # from the core across the boundary at x = 15
    assert np.all(np.diff(profile) >= -1e-6)  # rises monotonically back to 0.6
    between = (profile > 0.31) & (profile < 0.59)
    assert between.sum() >= 2  # at least two intermediate voxels around the boundary
    assert 0.3 < out[8, 10, 14] < 0.6 and 0.3 < out[8, 10, 15] < 0.6


def test_factor_is_drawn_from_the_range():
    image, labels = scene()
    rng = np.random.default_rng(1)
    factors = [augment_tumour_intensity(image, labels, rng)[8, 10, 10] / 0.6 for _ in range(40)]
    assert 0.5 <= min(factors) < 0.7 and 1.3 < max(factors) <= 1.5


def test_scan_without_tumour_is_returned_unchanged():
    image, labels = scene()
    labels[labels == 1] = 0
    out = augment_tumour_intensity(image, labels, np.random.default_rng(0))
    assert np.array_equal(out, image) and out is not image


def test_probability_zero_never_applies():
    image, labels = scene()
    out = augment_tumour_intensity(image, labels, np.random.default_rng(0), probability=0.0)
    assert np.array_equal(out, image)


def test_heterogeneity_gives_the_tumour_a_patchy_texture_around_the_mean_factor():
    image, labels = scene()
    flat = augment_tumour_intensity(image, labels, np.random.default_rng(0), factor_range=(2.0, 2.0))
    patchy = augment_tumour_intensity(image, labels, np.random.default_rng(0), factor_range=(2.0, 2.0),
                                      heterogeneity=0.3, texture_sigma_voxels=1.0)
    core = (slice(5, 11), slice(7, 13), slice(7, 13))
    assert flat[core].std() < 0.005  # only the smoothed edge weight varies
    assert patchy[core].std() > 0.05
    assert 1.0 < np.median(patchy[core]) < 1.5  # 0.6 × 2 = 1.2 on average
    assert np.array_equal(patchy[:, 20:, :], image[:, 20:, :])  # far from the tumour: unchanged


def test_csf_rim_brightens_a_ring_around_the_tumour_only():
    image, labels = scene()
    image[0, 31, 31] = 1.2  # the brightest voxel sets the rim's brightness at the 100th percentile
    out = add_csf_rim(image, labels, np.random.default_rng(0), width_voxels=(2, 2), brightness_percentile=100,
                      brightness_range=(1.0, 1.0), coverage_range=(1.0, 1.0))
    assert np.array_equal(out[labels == 1], image[labels == 1])  # the tumour keeps its intensity
    assert np.all(out >= image)  # a rim never darkens
    for rim_voxel in [(8, 10, 4), (8, 10, 3), (8, 4, 10), (8, 15, 10), (8, 10, 16)]:  # 2 voxels out, in-plane
        assert out[rim_voxel] > 0.9
    assert np.array_equal(out[:, 21:, :], image[:, 21:, :]) and np.array_equal(out[:, :, 20:25], image[:, :, 20:25])


def test_csf_rim_coverage_makes_it_partial_and_no_tumour_means_no_change():
    image, labels = scene()
    image[0, 31, 31] = 1.2
    kw = dict(width_voxels=(1, 1), brightness_percentile=100)
    full = add_csf_rim(image, labels, np.random.default_rng(1), coverage_range=(1.0, 1.0), **kw)
    part = add_csf_rim(image, labels, np.random.default_rng(1), coverage_range=(0.4, 0.4), **kw)
    brightened_full, brightened_part = (full > image + 0.05).sum(), (part > image + 0.05).sum()
    assert 0.25 * brightened_full < brightened_part < 0.65 * brightened_full
    no_vs = np.where(labels == 1, 0, labels)
    assert np.array_equal(add_csf_rim(image, no_vs, np.random.default_rng(0)), image)


def test_relative_factor_sets_the_tumour_against_the_other_tissue_whatever_its_translated_brightness():
    image, labels = scene()
    for tumour in (0.2, 1.8):  # a translator's too-dark and ceT1-bright tumour
        image[labels == 1] = tumour
        out = augment_tumour_intensity(image, labels, np.random.default_rng(0), factor_range=(1.5, 1.5),
                                       relative_to_tissue=True)
        assert np.isclose(out[8, 10, 10], 0.9, atol=1e-3)  # 1.5 × the 0.6 of the rest of the volume


def test_matching_gives_the_tumour_core_the_reference_grey_levels_and_keeps_its_texture_order():
    image, labels = scene()
    rng = np.random.default_rng(0)
    image[labels == 1] = rng.uniform(0.05, 0.15, int((labels == 1).sum()))  # a dark, noisy fake tumour
    reference = np.linspace(0.4, 0.6, 1001)  # a real tumour: grey, 0.4 to 0.6
    out = match_tumour_intensity(image, labels, reference, np.random.default_rng(1))
    core = (slice(6, 10), slice(8, 12), slice(8, 12))  # deep inside: the smoothed mask's weight is ~1
    assert 0.4 - 1e-3 <= out[core].min() and out[core].max() <= 0.6 + 1e-3
    assert abs(np.median(out[labels == 1]) - 0.5) < 0.03
    # the texture's ranks stay: the darkest fake voxel of the core is still the darkest
    assert np.argmin(out[core]) == np.argmin(image[core])
    assert np.array_equal(out[:, 20:, :], image[:, 20:, :])  # far from the tumour nothing changes
    assert np.array_equal(out[labels == 0][:10], image[labels == 0][:10])


def test_matching_scale_and_edge_cases():
    image, labels = scene()
    out = match_tumour_intensity(image, labels, np.full(50, 0.5), np.random.default_rng(0), scale_range=(2.0, 2.0))
    assert np.allclose(out[8, 10, 10], 1.0, atol=1e-3)
    no_tumour = np.where(labels == 1, 0, labels)
    assert np.array_equal(match_tumour_intensity(image, no_tumour, np.full(5, 0.5), np.random.default_rng(0)), image)
    try:
        match_tumour_intensity(image, labels, np.zeros(0), np.random.default_rng(0))
    except ValueError as e:
        assert "reference" in str(e)
    else:
        raise AssertionError("an empty reference must be refused")


def test_tumour_ring_is_in_plane_and_excludes_the_tumour():
    _, labels = scene()
    mask = labels == 1
    ring = tumour_ring(mask, 2)
    assert not (ring & mask).any()
    assert ring[8, 10, 3] and ring[8, 10, 16] and not ring[8, 10, 17]  # 2 voxels beyond the cube's x faces
    assert not ring[2].any() and not ring[13].any()  # nothing above or below the tumour's slices


def test_ring_matching_gives_the_surroundings_the_real_grey_levels_in_their_own_order():
    image, labels = scene()  # tissue 0.6 everywhere
    image[:, :, :10] = 0.1  # a dark wall on one side of the tumour (x < 10), grey fluid on the other
    image[labels == 1] = 0.3
    real_ring = np.concatenate([np.full(500, 0.02), np.full(500, 0.95)])  # real: black bone, bright CSF
    out = match_ring_intensity(image, labels, real_ring, width_voxels=3)
    assert np.isclose(out[8, 10, 16], 0.95, atol=0.02)  # grey fluid next to the tumour becomes CSF-bright
    assert out[8, 25, 2] == image[8, 25, 2] and out[8, 25, 25] == image[8, 25, 25]  # far away: unchanged
    assert np.isclose(out[8, 3, 8], 0.02, atol=0.02)  # the wall stays the darkest
    assert np.array_equal(out[labels == 1], image[labels == 1])  # the tumour itself is not touched
    with pytest.raises(ValueError, match="ring"):
        match_ring_intensity(image, labels, np.zeros(0))


def test_context_matching_gives_the_rest_of_the_crop_the_real_histogram_in_its_own_order():
    image, labels = scene()
    rng = np.random.default_rng(0)
    image[:] = rng.uniform(0.3, 0.7, image.shape).astype(np.float16)  # a fake's narrow grey range, float16 ties
    image[labels == 1] = 0.2
    real = rng.normal(0.3, 0.1, 5000) ** 2 * 5  # a real crop: skewed, another range
    out = match_context_intensity(image, labels, real)
    outside = labels != 1
    assert np.array_equal(out[~outside], image[~outside])  # the tumour is left to match_tumour_intensity
    probs = np.array([0.05, 0.25, 0.5, 0.75, 0.95])
    assert np.allclose(np.quantile(out[outside], probs), np.quantile(real, probs), atol=0.02)
    # one monotone curve: order kept, and equal fake values stay equal (no noise added)
    order = np.argsort(image[outside], kind="stable")
    assert np.all(np.diff(out[outside][order]) >= 0)
    assert np.unique(out[outside]).size <= np.unique(image[outside]).size
    with pytest.raises(ValueError, match="context"):
        match_context_intensity(image, labels, np.zeros(0))
    with pytest.raises(ValueError, match="shape"):
        match_context_intensity(image, labels[:-1], real)
