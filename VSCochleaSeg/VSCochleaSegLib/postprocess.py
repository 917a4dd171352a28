"""Clean the fused label map on the input grid, per side of the head.

Following both CrossMoDA methods: for each side keep only the largest cochlea component and the largest
VS component, and drop VS components whose centre lies farther than a set distance (mm, along the
superior-inferior axis) from that side's cochlea — the seed rule was 15 slices. Thresholds come from the
model folder's ``postprocess`` section.
"""

from __future__ import annotations

import cc3d
import numpy as np
import SimpleITK as sitk

from .labels import COCHLEA, VS
from .measure import index_to_lps, lateral_offset_mm
from .model_folder import PostprocessSpec


def postprocess_labels(labels_zyx: np.ndarray, reference: sitk.Image, ears, spec: PostprocessSpec) -> np.ndarray:
    """Cleaned copy of ``labels_zyx`` (z, y, x) uint8; ``reference`` gives the geometry, ``ears`` the
    cochlea centres and midline (``localise.EarLocations``)."""
    out = labels_zyx.copy()
    voxel_mm3 = float(np.prod(reference.GetSpacing()))
    for label, keep_largest in ((VS, spec.keep_largest_vs_per_side), (COCHLEA, spec.keep_largest_cochlea_per_side)):
        mask = labels_zyx == label
        if not mask.any():
            continue
        comps = cc3d.connected_components(mask, connectivity=26)
        stats = cc3d.statistics(comps)
        ids = np.arange(1, len(stats["voxel_counts"]))
        counts = stats["voxel_counts"][1:]
        if len(ids) == 0:
            continue
        centroids_lps = index_to_lps(reference, stats["centroids"][1:])
        lateral = lateral_offset_mm(centroids_lps, ears.midline_point_lps, ears.left_axis_lps)
        sides = np.where(lateral > 0, "left", "right")
        keep = np.ones(len(ids), bool)
        if label == VS:
            keep &= counts * voxel_mm3 >= spec.min_vs_volume_mm3
            for k, side in enumerate(sides):
                dz = abs(centroids_lps[k][2] - ears.cochlea_lps[side][2])
                keep[k] &= dz <= spec.vs_max_z_distance_from_cochlea_mm
        if keep_largest:
            for side in ("left", "right"):
                candidates = np.nonzero(keep & (sides == side))[0]
                if len(candidates) > 1:
                    winner = candidates[np.argmax(counts[candidates])]
                    keep[candidates] = False
                    keep[winner] = True
        drop = ids[~keep]
        if len(drop):
            out[np.isin(comps, drop) & mask] = 0
    return out
