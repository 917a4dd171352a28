"""The figures behind docs/training.md's translation-contrast table."""

from __future__ import annotations

import numpy as np
import pytest

from training.experiments.translation_contrast import tissue_contrast


def test_tissue_contrast_divides_class_means_and_the_90th_percentile_by_the_head_median():
    volume = np.zeros((4, 10, 10), np.float32)
    volume[:, 2:8, 2:8] = 1.0  # head, median 1
    labels = np.zeros(volume.shape, np.uint8)
    volume[0, 2:4, 2:4], labels[0, 2:4, 2:4] = 2.0, 1  # VS: twice the median
    volume[1, 2:4, 2:4], labels[1, 2:4, 2:4] = 0.5, 2  # inner ear: half
    vs, ear, p90 = tissue_contrast(volume, labels)
    assert vs == pytest.approx(2.0) and ear == pytest.approx(0.5) and p90 == pytest.approx(1.0)


def test_an_absent_class_gives_nan_not_an_error():
    volume = np.ones((2, 4, 4), np.float32)
    vs, ear, _ = tissue_contrast(volume, np.zeros(volume.shape, np.uint8))
    assert np.isnan(vs) and np.isnan(ear)


def _paired_crop():
    rng = np.random.default_rng(0)
    true = np.full((4, 20, 20), 0.3, np.float32)  # brain
    true[:, :, :6] = 1.0  # CSF, bright
    true[:, :, 16:] = 0.0  # air, outside the head
    vs = np.zeros(true.shape, bool)
    vs[1:3, 8:12, 7:11] = True
    true[vs] = 0.45
    return true + rng.normal(0, 0.01, true.shape).astype(np.float32), vs


def test_fidelity_of_the_true_image_itself_is_perfect():
    from training.experiments.translation_fidelity import fidelity
    true, vs = _paired_crop()
    f = fidelity(true, true, vs)
    assert f["corr"] == pytest.approx(1.0) and f["mae"] == 0.0
    assert f["csf_recall"] == 1.0 and f["csf_precision"] == 1.0
    assert f["vs_over_ring_fake"] == pytest.approx(f["vs_over_ring_true"])


def test_fidelity_sees_an_inverted_image_and_a_fake_without_bright_csf():
    from training.experiments.translation_fidelity import fidelity
    true, vs = _paired_crop()
    head = true > 0.05
    inverted = np.where(head, 1.2 - true, 0.0).astype(np.float32)
    assert fidelity(inverted, true, vs)["corr"] < -0.9
    grey_csf = np.where(true > 0.6, 0.4, true).astype(np.float32)  # the translator failed to make CSF bright
    f = fidelity(grey_csf, true, vs)
    assert f["csf_recall"] == 0.0 and np.isnan(f["csf_precision"])
    assert f["mae"] == pytest.approx(0.6 * np.mean(true[head] > 0.6), abs=0.01)
