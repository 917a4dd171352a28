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
