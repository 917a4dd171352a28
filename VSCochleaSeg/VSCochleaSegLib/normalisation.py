"""Intensity normalisation of an hrT2 scan, as its model folder prescribes.

MRI intensities have no physical unit and differ by scanner, coil and protocol by orders of magnitude,
so every network sees the scan rescaled by robust percentiles of the head (foreground) voxels:
``(value - p_lower) / (p_upper - p_lower)``, clipped to [0, CLIP_HIGH]. The percentiles are computed
once per scan, on the whole scan, and applied to the localiser grid and to both ear crops alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model_folder import NormalisationSpec

CLIP_HIGH = 1.5  # keeps very bright fluid/fat from dominating while leaving headroom above p_upper
_MAX_SAMPLES = 2_000_000  # percentiles from a regular subsample: same value, 10× less time


@dataclass(frozen=True)
class IntensityScale:
    """The two intensities mapped to 0 and 1."""

    low: float
    high: float

    def apply(self, array: np.ndarray) -> np.ndarray:
        out = (array.astype(np.float32) - np.float32(self.low)) / np.float32(self.high - self.low)
        return np.clip(out, 0.0, CLIP_HIGH, out=out)


def fit_intensity_scale(volume: np.ndarray, spec: NormalisationSpec) -> IntensityScale:
    """Percentiles of the foreground of ``volume`` (any shape, raw scanner values)."""
    flat = volume.reshape(-1)
    step = max(1, flat.size // _MAX_SAMPLES)
    sample = flat[::step].astype(np.float32)
    top = float(np.percentile(sample, spec.upper_percentile))
    fg = sample[sample > spec.foreground_threshold_fraction * top]
    if fg.size < 100:
        fg = sample
    low, high = np.percentile(fg, [spec.lower_percentile, spec.upper_percentile])
    if not high > low:
        high = low + 1.0
    return IntensityScale(float(low), float(high))
