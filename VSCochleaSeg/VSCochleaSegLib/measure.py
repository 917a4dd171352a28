"""Clinical measurements from a label map on the input grid: VS volume, side and maximal diameter, cochlea volumes.

Everything is measured in physical LPS space (mm), using the image's own index → physical
transform ``p = origin + D @ (spacing * ijk)`` with ``ijk`` = (i, j, k) = (x, y, z) voxel index,
so oblique direction matrices are handled. Left and right are the *patient's*: LPS +x points to
the patient's left, and a point is on the left when its offset from a midline point, projected
on the left-right axis, is positive. Each connected component (26-connectivity) of a structure
is given one side, from its centroid, so a single lesion is never split in two by the midline
plane. Only labelled voxels are turned into physical points, never the whole grid.

Usage::

    m = measure(sitk.ReadImage("case_hrT2_seg.nii.gz"))
    print(m.vs_side, m.vs_volume_ml, m.vs_max_diameter_mm)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy.ndimage import binary_erosion, generate_binary_structure
from scipy.spatial import ConvexHull, QhullError

from .errors import InputError
from .labels import COCHLEA, LABEL_NAMES, VS

# LPS +x is towards the patient's left.
LEFT_AXIS_LPS = (1.0, 0.0, 0.0)

MM3_PER_ML = 1000.0

# A point set whose extent along a principal direction is below this fraction of its largest
# extent is treated as flat (coplanar / collinear): Qhull needs a full-dimensional set.
_FLATNESS_TOLERANCE = 1e-7

# Bound the memory of brute-force pairwise distances (number of point-pair differences held at once).
_PAIRS_PER_CHUNK = 2_000_000

Point = tuple[float, float, float]


@dataclass
class Measurements:
    """Measurements of one segmentation. Volumes in mm³ (and ml), lengths in mm.

    ``vs_side`` is "left", "right", "bilateral" (VS components on both sides) or None (no VS).
    ``vs_max_diameter_mm`` is the maximal 3D Feret diameter: the largest distance between the
    centres of two VS voxels on the same side, in physical space. It is centre to centre: no
    voxel extent is added, so a line of n voxels with spacing s measures (n - 1) · s. With a
    bilateral VS it is the larger of the two sides' diameters.
    ``vs_confidence`` / ``cochlea_confidence`` are the model's confidence scores if the caller
    supplied them, else None.
    """

    vs_present: bool
    vs_side: Optional[str]
    vs_volume_mm3: float
    vs_volume_ml: float
    vs_max_diameter_mm: float
    vs_left_volume_mm3: float
    vs_right_volume_mm3: float
    cochlea_left_volume_mm3: float
    cochlea_right_volume_mm3: float
    vs_confidence: Optional[float] = None
    cochlea_confidence: Optional[float] = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field, floats kept at full precision."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Measurements":
        """Inverse of ``to_dict``. Unknown keys are ignored, so files from newer versions still load."""
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields if f.default is dataclasses.MISSING]
        missing = [name for name in required if name not in values]
        if missing:
            raise InputError(f"Measurements are missing {', '.join(missing)}.")
        return cls(**{f.name: values[f.name] for f in fields if f.name in values})


def measure(
    labels: sitk.Image,
    midline_point_lps: Optional[Sequence[float]] = None,
    left_right_axis_lps: Optional[Sequence[float]] = None,
    confidence: Optional[Mapping[str, Optional[float]]] = None,
) -> Measurements:
    """Measure the VS and cochleae of a 3D label map (0 background, 1 VS, 2 cochlea).

    ``midline_point_lps``: a point (mm, LPS) on the mid-sagittal plane; default the physical
    centre of the image. ``left_right_axis_lps``: a vector pointing to the patient's left
    (normalised here); default (1, 0, 0). ``confidence``: optional {"vs": float, "cochlea": float}.
    Volumes are voxel count × voxel volume (product of the spacing; the direction matrix is a
    rotation and does not change volumes). Every VS component counts, however small, so a
    stray false-positive blob on the other side makes the VS "bilateral": clean the label map
    (post-processing) before measuring.
    """
    if labels.GetDimension() != 3:
        raise InputError(f"Expected a 3D label map, got a {labels.GetDimension()}-D image.")
    midline = image_centre_lps(labels) if midline_point_lps is None else _as_point(midline_point_lps, "midline point")
    axis = _unit_axis(LEFT_AXIS_LPS if left_right_axis_lps is None else left_right_axis_lps)
    vs_confidence, cochlea_confidence = _split_confidence(confidence)

    label_array = sitk.GetArrayViewFromImage(labels)  # (z, y, x)
    crop, offset_zyx = _crop_to_labelled(label_array)
    voxel_volume_mm3 = float(np.prod(labels.GetSpacing()))

    vs = _StructureBySide.of(crop == VS, offset_zyx, labels, midline, axis)
    cochlea = _StructureBySide.of(crop == COCHLEA, offset_zyx, labels, midline, axis)

    vs_volume_mm3 = (vs.left_voxels + vs.right_voxels) * voxel_volume_mm3
    # Per side, so a bilateral VS is not measured across the head.
    vs_diameter_mm = max(max_feret_diameter_mm(vs.left_boundary_lps), max_feret_diameter_mm(vs.right_boundary_lps))
    return Measurements(
        vs_present=vs.left_voxels + vs.right_voxels > 0,
        vs_side=vs.side,
        vs_volume_mm3=vs_volume_mm3,
        vs_volume_ml=vs_volume_mm3 / MM3_PER_ML,
        vs_max_diameter_mm=vs_diameter_mm,
        vs_left_volume_mm3=vs.left_voxels * voxel_volume_mm3,
        vs_right_volume_mm3=vs.right_voxels * voxel_volume_mm3,
        cochlea_left_volume_mm3=cochlea.left_voxels * voxel_volume_mm3,
        cochlea_right_volume_mm3=cochlea.right_voxels * voxel_volume_mm3,
        vs_confidence=vs_confidence,
        cochlea_confidence=cochlea_confidence,
    )


def index_to_lps(image: sitk.Image, indices_zyx: np.ndarray) -> np.ndarray:
    """Physical LPS points (N, 3) in mm of voxel indices (N, 3) given in numpy (z, y, x) order.

    Indices may be fractional (e.g. a centroid). Equivalent to SimpleITK's
    ``TransformContinuousIndexToPhysicalPoint`` on (x, y, z), vectorised.
    """
    indices_zyx = np.asarray(indices_zyx, dtype=float).reshape(-1, 3)
    ijk = indices_zyx[:, ::-1]
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    return origin + (ijk * spacing) @ direction.T


def image_centre_lps(image: sitk.Image) -> Point:
    """Physical LPS point (mm) at the centre of the image grid, halfway between the end voxel centres."""
    centre_zyx = (np.asarray(image.GetSize(), dtype=float)[::-1] - 1.0) / 2.0
    return tuple(float(v) for v in index_to_lps(image, centre_zyx)[0])


def lateral_offset_mm(
    points_lps: np.ndarray, midline_point_lps: Sequence[float], left_axis_lps: Sequence[float] = LEFT_AXIS_LPS
) -> np.ndarray:
    """Signed distance (N,) in mm of LPS points (N, 3) from the midline plane; positive = patient's left.

    The plane passes through ``midline_point_lps`` and is normal to ``left_axis_lps`` (any length).
    """
    points = np.asarray(points_lps, dtype=float).reshape(-1, 3)
    return (points - _as_point(midline_point_lps, "midline point")) @ _unit_axis(left_axis_lps)


def side_of_points(
    points_lps: np.ndarray, midline_point_lps: Sequence[float], left_axis_lps: Sequence[float] = LEFT_AXIS_LPS
) -> np.ndarray:
    """The side, "left" or "right", of each LPS point (N, 3), as an array of str of shape (N,).

    A point exactly on the midline plane is called "right", so every point gets a side; for a
    voxel-wise left mask use ``lateral_offset_mm(...) > 0`` directly.
    """
    return np.where(lateral_offset_mm(points_lps, midline_point_lps, left_axis_lps) > 0, "left", "right")


def max_feret_diameter_mm(points_lps: np.ndarray) -> float:
    """Largest distance (mm) between two of the points (N, 3); 0.0 for fewer than two points.

    Only convex-hull vertices can be the ends of the diameter, so the pairwise search runs on
    them; flat sets (one slice, one line) are reduced to their 2D/1D span first because Qhull
    needs a full-dimensional set.
    """
    points = np.asarray(points_lps, dtype=float).reshape(-1, 3)
    if len(points) < 5:
        return _brute_force_diameter(points)
    centred = points - points.mean(axis=0)
    _, singular_values, basis = np.linalg.svd(centred, full_matrices=False)
    if singular_values[0] == 0.0:
        return 0.0
    rank = int(np.count_nonzero(singular_values > _FLATNESS_TOLERANCE * singular_values[0]))
    # Coordinates in an orthonormal basis of the points' span: distances are unchanged.
    in_span = centred @ basis[:rank].T
    if rank == 1:
        return float(np.ptp(in_span[:, 0]))
    try:
        vertices = ConvexHull(in_span).vertices
    except QhullError:
        return _brute_force_diameter(points)
    return _brute_force_diameter(points[vertices])


@dataclass
class _StructureBySide:
    """One label's voxels split by side (one side per connected component) and its boundary points."""

    left_voxels: int
    right_voxels: int
    side: Optional[str]
    left_boundary_lps: np.ndarray  # (N, 3) mm
    right_boundary_lps: np.ndarray  # (M, 3) mm

    @classmethod
    def of(
        cls, mask: np.ndarray, offset_zyx: np.ndarray, image: sitk.Image, midline: np.ndarray, axis: np.ndarray
    ) -> "_StructureBySide":
        """``mask`` is a (z, y, x) crop of the image grid starting at voxel ``offset_zyx``."""
        components = cc3d.connected_components(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=26)
        indices = np.nonzero(components)
        ids = components[indices]
        if ids.size == 0:
            nothing = np.empty((0, 3))
            return cls(0, 0, None, nothing, nothing)
        n_components = int(ids.max())
        counts = np.bincount(ids, minlength=n_components + 1)[1:]
        centroid_zyx = np.stack(
            [np.bincount(ids, weights=axis_index, minlength=n_components + 1)[1:] for axis_index in indices], axis=1
        ) / counts[:, None] + offset_zyx
        component_is_left = lateral_offset_mm(index_to_lps(image, centroid_zyx), midline, axis) > 0
        left_voxels = int(counts[component_is_left].sum())
        right_voxels = int(counts[~component_is_left].sum())
        side = "bilateral" if left_voxels and right_voxels else ("left" if left_voxels else "right")

        # The ends of the largest diameter are on the boundary: interior voxels are midpoints of two neighbours.
        boundary = mask & ~binary_erosion(mask, structure=generate_binary_structure(3, 1))
        boundary_indices = np.argwhere(boundary)
        boundary_is_left = np.concatenate([[False], component_is_left])[components[boundary]]
        boundary_lps = index_to_lps(image, boundary_indices + offset_zyx)
        return cls(left_voxels, right_voxels, side, boundary_lps[boundary_is_left], boundary_lps[~boundary_is_left])


def _crop_to_labelled(label_array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bounding box of the non-zero labels plus one voxel (so erosion sees background), and its start (z, y, x)."""
    labelled = label_array != 0
    if not labelled.any():
        return np.zeros((1, 1, 1), dtype=label_array.dtype), np.zeros(3)
    start, stop = [], []
    for axis in range(3):
        present = np.flatnonzero(labelled.any(axis=tuple(a for a in range(3) if a != axis)))
        start.append(max(int(present[0]) - 1, 0))
        stop.append(min(int(present[-1]) + 2, label_array.shape[axis]))
    crop = np.asarray(label_array[tuple(slice(a, b) for a, b in zip(start, stop))])
    return crop, np.asarray(start, dtype=float)


def _brute_force_diameter(points: np.ndarray) -> float:
    if len(points) < 2:
        return 0.0
    best_squared = 0.0
    chunk = max(1, _PAIRS_PER_CHUNK // len(points))
    for start in range(0, len(points), chunk):
        differences = points[start : start + chunk, None, :] - points[None, :, :]
        best_squared = max(best_squared, float(np.einsum("abk,abk->ab", differences, differences).max()))
    return float(np.sqrt(best_squared))


def _as_point(values: Sequence[float], what: str) -> np.ndarray:
    point = np.asarray(values, dtype=float).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise InputError(f"The {what} must be three finite LPS coordinates in mm, got {values!r}.")
    return point


def _unit_axis(values: Sequence[float]) -> np.ndarray:
    axis = _as_point(values, "left-right axis")
    length = float(np.linalg.norm(axis))
    if length == 0.0:
        raise InputError("The left-right axis has zero length; give a vector pointing to the patient's left.")
    return axis / length


def _split_confidence(confidence: Optional[Mapping[str, Optional[float]]]) -> tuple[Optional[float], Optional[float]]:
    if confidence is None:
        return None, None
    known = {LABEL_NAMES[VS], LABEL_NAMES[COCHLEA]}
    unknown = set(confidence) - known
    if unknown:
        raise InputError(f"Unknown confidence keys {sorted(unknown)}; expected {sorted(known)}.")

    def as_float(value: Optional[float]) -> Optional[float]:
        return None if value is None else float(value)

    return as_float(confidence.get(LABEL_NAMES[VS])), as_float(confidence.get(LABEL_NAMES[COCHLEA]))
