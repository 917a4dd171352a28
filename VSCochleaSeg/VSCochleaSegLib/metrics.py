"""CrossMoDA scoring: Dice and average symmetric surface distance (ASSD) of the VS and cochlea labels.

The surface-distance definition follows ``medpy.metric.binary.assd`` exactly (the code the
CrossMoDA organisers used): a mask's surface is the mask minus its erosion by the 6-connected
3D structuring element (outside the image counts as background), and ASSD is the mean of the
two directed mean surface-to-surface distances, in mm. medpy refuses empty masks; CrossMoDA
scored an empty prediction with a fixed ASSD of ``EMPTY_MASK_ASSD_MM`` (350 mm), and this
module does the same. Arrays are numpy IJK in (z, y, x) order and spacings are (z, y, x) in mm;
``score_case`` takes SimpleITK images and does the (x, y, z) → (z, y, x) reversal itself.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from .errors import InputError
from .labels import COCHLEA, VS

# CrossMoDA's penalty when one mask is empty and the other is not: no surface to measure to.
EMPTY_MASK_ASSD_MM = 350.0

# Geometry of prediction and reference must agree to this absolute tolerance (mm for
# spacing and origin, unitless for direction cosines); NIfTI stores them as float32.
GEOMETRY_TOLERANCE = 1e-4

METRIC_NAMES = ("VS_Dice", "VS_ASSD", "Cochlea_Dice", "Cochlea_ASSD")


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice overlap 2|P∩G| / (|P| + |G|) of two boolean masks of the same shape.

    Both masks empty → 1.0 (the prediction is perfect: there was nothing to find). medpy's
    ``dc`` returns 0 in that case; it never happens in CrossMoDA, where every case has a VS
    and cochleae, so the choice only matters for other data.
    """
    pred, gt = _as_bool_pair(pred, gt)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(gt))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & gt)) / total


def assd(pred: np.ndarray, gt: np.ndarray, spacing_zyx_mm: Sequence[float]) -> float:
    """Average symmetric surface distance in mm between two boolean masks (z, y, x).

    ``spacing_zyx_mm`` is the voxel size along (z, y, x) in mm. Both empty → 0.0; exactly one
    empty → ``EMPTY_MASK_ASSD_MM`` (CrossMoDA's rule for an empty prediction; we apply it to an
    empty reference too, since the distance is just as undefined).
    """
    pred, gt = _as_bool_pair(pred, gt)
    spacing = tuple(float(s) for s in spacing_zyx_mm)
    if len(spacing) != pred.ndim:
        raise InputError(f"spacing {spacing} has {len(spacing)} values but the masks are {pred.ndim}-D.")
    pred_empty, gt_empty = not pred.any(), not gt.any()
    if pred_empty and gt_empty:
        return 0.0
    if pred_empty or gt_empty:
        return EMPTY_MASK_ASSD_MM
    # Distances only depend on the two surfaces, which both lie inside the union's bounding
    # box; cropping to it (plus one background voxel so erosion sees the same border) gives
    # the same numbers as the whole image, far faster on a 512 × 512 × 100 scan.
    crop = _union_bounding_box(pred, gt, margin=1)
    pred, gt = pred[crop], gt[crop]
    pred_surface, gt_surface = _surface(pred), _surface(gt)
    pred_to_gt = _mean_distance_to(pred_surface, gt_surface, spacing)
    gt_to_pred = _mean_distance_to(gt_surface, pred_surface, spacing)
    return float((pred_to_gt + gt_to_pred) / 2.0)


def score_case(pred_labels: sitk.Image, gt_labels: sitk.Image) -> dict[str, float]:
    """Score one case: ``{"VS_Dice", "VS_ASSD", "Cochlea_Dice", "Cochlea_ASSD"}`` (ASSD in mm).

    Both images are label maps (0 background, 1 VS, 2 cochlea) on the same grid; raises
    InputError if size, spacing, origin or direction differ (beyond ``GEOMETRY_TOLERANCE``).
    """
    check_same_grid(pred_labels, gt_labels)
    pred = sitk.GetArrayViewFromImage(pred_labels)  # (z, y, x)
    gt = sitk.GetArrayViewFromImage(gt_labels)
    spacing_zyx_mm = tuple(reversed(pred_labels.GetSpacing()))
    scores: dict[str, float] = {}
    for name, label in (("VS", VS), ("Cochlea", COCHLEA)):
        pred_mask, gt_mask = pred == label, gt == label
        scores[f"{name}_Dice"] = dice(pred_mask, gt_mask)
        scores[f"{name}_ASSD"] = assd(pred_mask, gt_mask, spacing_zyx_mm)
    return scores


def check_same_grid(pred_labels: sitk.Image, gt_labels: sitk.Image) -> None:
    """Raise InputError naming the first geometric property in which the two images differ."""
    if pred_labels.GetDimension() != gt_labels.GetDimension():
        raise InputError(
            f"Prediction is {pred_labels.GetDimension()}-D but the reference is {gt_labels.GetDimension()}-D."
        )
    if pred_labels.GetSize() != gt_labels.GetSize():
        raise InputError(
            f"Prediction size {pred_labels.GetSize()} differs from reference size {gt_labels.GetSize()}; "
            "resample the prediction onto the reference grid before scoring."
        )
    for prop in ("Spacing", "Origin", "Direction"):
        pred_value = np.asarray(getattr(pred_labels, f"Get{prop}")(), dtype=float)
        gt_value = np.asarray(getattr(gt_labels, f"Get{prop}")(), dtype=float)
        if not np.allclose(pred_value, gt_value, rtol=0.0, atol=GEOMETRY_TOLERANCE):
            raise InputError(
                f"Prediction {prop.lower()} {tuple(pred_value)} differs from reference "
                f"{prop.lower()} {tuple(gt_value)} (tolerance {GEOMETRY_TOLERANCE}); "
                "the two label maps are not on the same grid."
            )


def _as_bool_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise InputError(f"Prediction shape {pred.shape} differs from reference shape {gt.shape}.")
    return pred, gt


def _union_bounding_box(a: np.ndarray, b: np.ndarray, margin: int) -> tuple[slice, ...]:
    union = a | b
    crop = []
    for axis in range(union.ndim):
        other_axes = tuple(i for i in range(union.ndim) if i != axis)
        present = np.flatnonzero(union.any(axis=other_axes))
        crop.append(slice(max(present[0] - margin, 0), min(present[-1] + 1 + margin, union.shape[axis])))
    return tuple(crop)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one 6-neighbour outside it (medpy's border definition)."""
    structure = generate_binary_structure(mask.ndim, 1)
    return mask ^ binary_erosion(mask, structure=structure, iterations=1)


def _mean_distance_to(from_surface: np.ndarray, to_surface: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Mean over ``from_surface`` voxels of the distance in mm to the nearest ``to_surface`` voxel."""
    distance_mm = distance_transform_edt(~to_surface, sampling=spacing)
    return float(distance_mm[from_surface].mean())
