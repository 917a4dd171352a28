"""Turn labelled scans into the exact network inputs the engine builds at inference.

For each case: fit the intensity scale on the whole scan (as the engine does), find the cochlea centres
from the label map (the engine finds them with the localiser; here a random offset of a few mm stands in
for the localiser's error), and resample the per-ear crops (right ears mirrored) and the whole-head
localiser volume with the engine's own geometry functions. Labels are resampled as one-hot maps with
linear interpolation and arg-maxed, which keeps thin cochlear turns that nearest-neighbour would drop.
The localiser's target is not the thin cochlea itself (a few partial voxels at 2 mm, which a small network
does not learn to call with probability > 0.5) but an "inner-ear region": a ball of
``LOCALISER_EAR_RADIUS_MM`` around each cochlea centre, whose centroid is the cochlea centre the engine
needs (docs/localisation.md). Arrays are (z, y, x); images float16 in [0, 1.5], labels uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from VSCochleaSegLib.geometry import GridSpec, box_grid, resample_to_grid
from VSCochleaSegLib.labels import COCHLEA
from VSCochleaSegLib.localise import cochlea_centres_from_labels, localiser_grid
from VSCochleaSegLib.model_folder import CropSpec, LocaliserSpec, NormalisationSpec
from VSCochleaSegLib.normalisation import fit_intensity_scale


LOCALISER_EAR_RADIUS_MM = 5.0


@dataclass
class CaseArrays:
    case_id: str
    crops: list  # [(image (z, y, x) float16, labels uint8)] per ear and jitter
    localiser: tuple  # (image, labels) on the localiser grid


def resample_labels(labels: sitk.Image, grid: GridSpec, n_classes: int = 3, min_fraction=None) -> np.ndarray:
    """Labels on ``grid`` via linear one-hot resampling + arg-max. ``min_fraction``: {label: f} keeps a
    class wherever its fraction exceeds f even if another class is larger (for coarse localiser grids)."""
    arr = sitk.GetArrayViewFromImage(labels)
    fractions = []
    for c in range(n_classes):
        onehot = sitk.GetImageFromArray((np.asarray(arr) == c).astype(np.float32))
        onehot.CopyInformation(labels)
        fractions.append(resample_to_grid(onehot, grid, default=1.0 if c == 0 else 0.0))
    fractions = np.stack(fractions)
    out = fractions.argmax(0).astype(np.uint8)
    for c, f in (min_fraction or {}).items():
        out[fractions[c] > f] = c
    return out


def prepare_case(case_id, image: sitk.Image, labels: sitk.Image, norm: NormalisationSpec, crop: CropSpec,
                 seg_spacing_xyz_mm, localiser: LocaliserSpec, rng: np.random.Generator,
                 jitters: int = 2, jitter_mm: float = 3.0) -> CaseArrays:
    image = sitk.Cast(image, sitk.sitkFloat32)
    scale = fit_intensity_scale(sitk.GetArrayViewFromImage(image), norm)
    centres = cochlea_centres_from_labels(labels)
    left_axis = centres["left"] - centres["right"]
    left_axis /= np.linalg.norm(left_axis)
    crops = []
    for side, sign in (("left", 1.0), ("right", -1.0)):
        for _ in range(jitters):
            centre = centres[side] - sign * left_axis * crop.medial_offset_mm + rng.normal(0, jitter_mm, 3)
            grid = box_grid(centre, crop.size_xyz_mm, seg_spacing_xyz_mm, mirror_x=(side == "right" and crop.mirror_right))
            img = scale.apply(resample_to_grid(image, grid)).astype(np.float16)
            crops.append((img, resample_labels(labels, grid)))
    lgrid = localiser_grid(image, localiser)
    limg = scale.apply(resample_to_grid(image, lgrid)).astype(np.float16)
    llab = localiser_target(labels, lgrid, centres)
    return CaseArrays(case_id, crops, (limg, llab))


def localiser_target(labels: sitk.Image, grid: GridSpec, centres: dict,
                     radius_mm: float = LOCALISER_EAR_RADIUS_MM) -> np.ndarray:
    """Localiser labels on ``grid`` (z, y, x): VS as resampled, class 2 = a ball of ``radius_mm`` around
    each cochlea centre (LPS mm, ``centres`` from ``cochlea_centres_from_labels``); the ball wins overlaps."""
    out = resample_labels(labels, grid)
    out[out == COCHLEA] = 0
    return with_ear_balls(out, grid, centres, radius_mm)


def with_ear_balls(labels_zyx: np.ndarray, grid: GridSpec, centres: dict,
                   radius_mm: float = LOCALISER_EAR_RADIUS_MM) -> np.ndarray:
    """``labels_zyx`` (on ``grid``) with a class-2 ball of ``radius_mm`` around each centre (LPS mm), in place."""
    zyx = np.indices(grid.shape_zyx).reshape(3, -1).T
    lps = grid.index_to_lps(zyx[:, ::-1])
    for centre in centres.values():
        inside = np.linalg.norm(lps - np.asarray(centre), axis=1) <= radius_mm
        labels_zyx.reshape(-1)[inside] = COCHLEA
    return labels_zyx
