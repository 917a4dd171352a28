"""MRML glue: run the engine on Slicer volume nodes and turn its label map into an editable segmentation.

This is the only engine module that imports ``slicer`` (MRML classes and ``vtk``; no Qt, no
``slicer.app``), so it runs the same in Slicer's Python console, in the module's Widget and under
pytest with the ``slicer-core`` wheel. The engine works in SimpleITK's LPS frame; MRML works in
RAS. Every conversion goes through :func:`ijk_to_ras_from_sitk` / :func:`sitk_geometry_from_ijk_to_ras`,
which flip the first two axes (LPS → RAS) and keep oblique directions and anisotropic spacing.

The output segmentation has three segments on the input volume's grid (its reference geometry):
"Vestibular schwannoma" (CrossMoDA label 1), "Cochlea left" and "Cochlea right" (both label 2).
The cochleae are two segments so a user can correct one side in Segment Editor without touching the
other; export maps them back to label 2. Sides follow :mod:`VSCochleaSegLib.measure`: each connected
component is given the side of its centroid relative to the midline plane.

Usage in Slicer's Python console::

    from VSCochleaSegLib import mrml
    volume = slicer.util.getNode("phantom_sample_hrT2")
    segmentation, measurements = mrml.segment_volume_node(volume, quality="fast")
    print(measurements.vs_side, measurements.vs_volume_mm3)
    # ... edit in Segment Editor, then:
    print(mrml.measure_segmentation(segmentation).vs_volume_ml)
    mrml.export_segmentation(segmentation, "/tmp/out", reference_volume_node=volume)

    # a whole folder, outside the displayed scene:
    mrml.process_folder("/data/hrT2", "/data/out", quality="fast")

The three steps of :func:`segment_volume_node` are public so a GUI can run the middle one in a worker
thread: :func:`volume_node_to_sitk` and :func:`check_segmentation_writable` (main thread, MRML),
:func:`run_segmenter` (any thread, no MRML), :func:`result_to_segmentation_node` (main thread).
:class:`SegmentationJob` packages exactly that for a GUI that polls it from a timer.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import fnmatch
import json
import logging
import re
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from . import io as vio
from .errors import Cancelled, InputError, OutputExistsError
from .labels import COCHLEA, COLOURS, DISPLAY_NAMES, VS

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float], None]
CancelCallback = Callable[[], bool]

# diag(-1, -1, 1): LPS ↔ RAS (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Grids are "the same" when their IJK-to-RAS matrices agree this closely (mm, and unitless for the
# direction part): NIfTI/NRRD headers store float32 quaternions, so exact equality is too strict.
GRID_TOLERANCE = 1e-4

# ----------------------------------------------------------------------------------- segment identity

SEGMENT_VS = "VestibularSchwannoma"
SEGMENT_COCHLEA_LEFT = "CochleaLeft"
SEGMENT_COCHLEA_RIGHT = "CochleaRight"

# Segment tags (vtkSegment::SetTag) that say what a segment is, so export and measurement do not
# depend on names the user may edit.
TAG_LABEL = "VSCochleaSeg.CrossMoDALabel"
TAG_SIDE = "VSCochleaSeg.Side"

# Segmentation node attributes written at segmentation time and read when re-measuring after edits.
ATTR_MIDLINE = "VSCochleaSeg.MidlineLPS"
ATTR_CONFIDENCE = "VSCochleaSeg.Confidence"
ATTR_MODEL = "VSCochleaSeg.Model"
ATTR_MEASUREMENTS = "VSCochleaSeg.Measurements"

_TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def _terminology(category: Tuple[str, str], type_: Tuple[str, str], modifier: Tuple[str, str] = ("", "")) -> str:
    """Slicer's serialised terminology entry (vtkSlicerTerminologiesModuleLogic format), SNOMED CT codes."""

    def code(value_meaning: Tuple[str, str]) -> str:
        value, meaning = value_meaning
        return f"SCT^{value}^{meaning}" if value else "^^"

    return "~".join([_TERMINOLOGY_CONTEXT, code(category), code(type_), code(modifier), _ANATOMIC_CONTEXT, "^^", "^^"])


_MORPHOLOGICALLY_ALTERED = ("49755003", "Morphologically Altered Structure")
_ANATOMICAL_STRUCTURE = ("123037004", "Anatomical Structure")
_NEOPLASM = ("108369006", "Neoplasm")
_COCHLEA = ("80169004", "Cochlea")
_LEFT = ("7771000", "Left")
_RIGHT = ("24028007", "Right")


@dataclasses.dataclass(frozen=True)
class SegmentSpec:
    """One output segment: its ID, display name, CrossMoDA label, side (None: any) and terminology."""

    segment_id: str
    name: str
    label: int
    side: Optional[str]
    colour: Tuple[float, float, float]
    terminology: str


SEGMENTS: Tuple[SegmentSpec, ...] = (
    SegmentSpec(SEGMENT_VS, DISPLAY_NAMES[VS], VS, None, COLOURS[VS], _terminology(_MORPHOLOGICALLY_ALTERED, _NEOPLASM)),
    SegmentSpec(SEGMENT_COCHLEA_LEFT, f"{DISPLAY_NAMES[COCHLEA]} left", COCHLEA, "left", COLOURS[COCHLEA],
                _terminology(_ANATOMICAL_STRUCTURE, _COCHLEA, _LEFT)),
    SegmentSpec(SEGMENT_COCHLEA_RIGHT, f"{DISPLAY_NAMES[COCHLEA]} right", COCHLEA, "right", COLOURS[COCHLEA],
                _terminology(_ANATOMICAL_STRUCTURE, _COCHLEA, _RIGHT)),
)

# Progress: the engine reports (stage, fraction within the stage); the GUI shows one bar. These are
# the stages' shares of that bar, in the order they run, and the words shown to the user.
STAGES: Tuple[Tuple[str, str, float], ...] = (
    ("load", "Loading model", 0.05),
    ("localise", "Locating the inner ears", 0.10),
    ("predict", "Segmenting", 0.70),
    ("postprocess", "Post-processing", 0.07),
    ("measure", "Measuring", 0.05),
    ("write", "Creating segmentation", 0.03),
)
STAGE_TITLES: Dict[str, str] = {name: title for name, title, _ in STAGES}


def overall_fraction(stage: str, fraction: float) -> float:
    """Fraction of the whole run (0–1) done when ``stage`` is ``fraction`` done; unknown stages map to 0."""
    done = 0.0
    total = sum(share for _, _, share in STAGES)
    for name, _, share in STAGES:
        if name == stage:
            return min(1.0, (done + share * min(max(float(fraction), 0.0), 1.0)) / total)
        done += share
    return 0.0


# ----------------------------------------------------------------------------------- engine protocol


class SegmenterLike(Protocol):
    """What this module needs from :class:`VSCochleaSegLib.pipeline.Segmenter` (tests pass fakes)."""

    def segment_image(self, image: sitk.Image, progress: Optional[ProgressCallback] = None,
                      cancel: Optional[CancelCallback] = None) -> Any: ...

    def release(self) -> None: ...


SegmenterFactory = Callable[[Optional[str], str, str], SegmenterLike]


def default_segmenter_factory(model: Optional[str], device: str, quality: str) -> SegmenterLike:
    """Build the engine's Segmenter; imported here so this module loads before torch is installed."""
    from .pipeline import Segmenter

    return Segmenter(model=model, device=device, quality=quality)


# ------------------------------------------------------------------------------------------ geometry


def ijk_to_ras_from_sitk(image: sitk.Image) -> np.ndarray:
    """4×4 IJK-to-RAS matrix of a 3D SimpleITK image (whose geometry is LPS).

    LPS: ``p = origin + D @ diag(spacing) @ ijk``; RAS flips x and y of both the origin and the
    direction columns.
    """
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(spacing)
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=float)
    return matrix


def sitk_geometry_from_ijk_to_ras(matrix: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """(origin, spacing, direction) in SimpleITK's LPS convention from a 4×4 IJK-to-RAS matrix.

    ``direction`` is flattened row-major, as ``sitk.Image.SetDirection`` takes it.
    """
    matrix = np.asarray(matrix, dtype=float)
    linear_lps = LPS_TO_RAS @ matrix[:3, :3]
    spacing = np.linalg.norm(linear_lps, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"The IJK-to-RAS matrix has a zero-length axis: {matrix[:3, :3].tolist()}.")
    direction = linear_lps / spacing
    origin = LPS_TO_RAS @ matrix[:3, 3]
    return tuple(map(float, origin)), tuple(map(float, spacing)), tuple(map(float, direction.ravel()))


def _vtk_matrix(matrix: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for row in range(4):
        for col in range(4):
            out.SetElement(row, col, float(matrix[row, col]))
    return out


def _numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_ijk_to_ras(volume_node) -> np.ndarray:
    """The volume node's own 4×4 IJK-to-RAS matrix (parent transforms are not applied)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _numpy_matrix(matrix)


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = GRID_TOLERANCE) -> bool:
    """True when two images have the same size and (within ``tolerance``) the same index → physical map."""
    return a.GetSize() == b.GetSize() and np.allclose(ijk_to_ras_from_sitk(a), ijk_to_ras_from_sitk(b), atol=tolerance)


# ----------------------------------------------------------------------------------------- volumes


def volume_node_to_sitk(volume_node) -> sitk.Image:
    """Copy a scalar volume node into a SimpleITK image with the same voxels and LPS geometry.

    The numpy array of the voxels is (k, j, i) in both worlds, so only the geometry is converted.
    Parent transforms of the node are not applied (the output segmentation gets the same parent).

    Raises:
        InputError: not a scalar volume node, no voxels, or more than one component per voxel.
    """
    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        kind = "nothing" if volume_node is None else volume_node.GetClassName()
        raise InputError(f"Select a scalar volume (the hrT2 scan) as input; got {kind}.")
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetNumberOfPoints() == 0 or image_data.GetPointData().GetScalars() is None:
        raise InputError(f"Volume '{volume_node.GetName()}' has no voxels; load the scan again.")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"Volume '{volume_node.GetName()}' has {image_data.GetNumberOfScalarComponents()} components per voxel "
            "(colour or vector image); select a grey-scale hrT2 volume."
        )
    extent = image_data.GetExtent()
    dims_ijk = image_data.GetDimensions()
    voxels_kji = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims_ijk[::-1])
    image = sitk.GetImageFromArray(np.array(voxels_kji, copy=True))
    matrix = volume_ijk_to_ras(volume_node)
    # An extent that does not start at 0 moves the first voxel (rare; MRML normally starts at 0).
    matrix[:3, 3] = (matrix @ np.array([extent[0], extent[2], extent[4], 1.0]))[:3]
    origin, spacing, direction = sitk_geometry_from_ijk_to_ras(matrix)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def sitk_to_volume_node(image: sitk.Image, scene, name: str = "volume", node_class: str = "vtkMRMLScalarVolumeNode"):
    """Add a volume node holding a copy of a 3D scalar SimpleITK image (LPS geometry → RAS) to ``scene``."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"Expected a 3D scalar image, got {image.GetDimension()}-D with "
                         f"{image.GetNumberOfComponentsPerPixel()} components.")
    node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
    node.SetAndObserveImageData(_image_data_from_array(sitk.GetArrayFromImage(image)))
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_from_sitk(image)))
    node.CreateDefaultDisplayNodes()
    return node


def _image_data_from_array(array_kji: np.ndarray, image_data=None):
    array_kji = np.ascontiguousarray(array_kji)
    if array_kji.dtype == np.int64:  # VTK_LONG_LONG volumes do not render in Slicer
        array_kji = array_kji.astype(np.int32)
    image_data = image_data if image_data is not None else vtk.vtkImageData()
    image_data.SetDimensions(array_kji.shape[::-1])
    scalars = numpy_support.numpy_to_vtk(array_kji.ravel(), deep=True,
                                         array_type=numpy_support.get_vtk_array_type(array_kji.dtype))
    image_data.GetPointData().SetScalars(scalars)
    return image_data


def _oriented_image(array_kji: Optional[np.ndarray], ijk_to_ras: np.ndarray, shape_kji: Optional[Sequence[int]] = None):
    """A vtkOrientedImageData with the given voxels (or only geometry when ``array_kji`` is None)."""
    oriented = slicer.vtkOrientedImageData()
    if array_kji is not None:
        _image_data_from_array(array_kji, oriented)
    else:
        k, j, i = shape_kji
        oriented.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    oriented.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras))
    return oriented


# ----------------------------------------------------------------------------------------- sides


def split_by_side(mask_zyx: np.ndarray, image: sitk.Image,
                  midline_point_lps: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(left, right) boolean masks (z, y, x) of a structure, one side per connected component.

    Same rule as :func:`VSCochleaSegLib.measure.measure`: a component is on the patient's left when its
    centroid lies on the +x (LPS) side of the midline plane; default midline is the image centre.
    """
    import cc3d

    from .measure import image_centre_lps, index_to_lps, lateral_offset_mm

    mask_zyx = np.asarray(mask_zyx, dtype=bool)
    left = np.zeros_like(mask_zyx)
    if not mask_zyx.any():
        return left, left.copy()
    midline = image_centre_lps(image) if midline_point_lps is None else midline_point_lps
    components = cc3d.connected_components(mask_zyx.astype(np.uint8), connectivity=26)
    indices = np.nonzero(components)
    ids = components[indices]
    n_components = int(ids.max())
    counts = np.bincount(ids, minlength=n_components + 1)[1:]
    centroids_zyx = np.stack([np.bincount(ids, weights=axis, minlength=n_components + 1)[1:] for axis in indices],
                             axis=1) / counts[:, None]
    is_left = np.concatenate([[False], lateral_offset_mm(index_to_lps(image, centroids_zyx), midline) > 0])
    left = is_left[components]
    return left, mask_zyx & ~left


def default_midline_lps(image: sitk.Image, cochlea_centres_lps: Optional[Mapping[str, Sequence[float]]] = None
                        ) -> Tuple[float, float, float]:
    """The midline point to use when the engine gave none: midway between the cochleae, else the image centre."""
    if cochlea_centres_lps and cochlea_centres_lps.get("left") is not None and cochlea_centres_lps.get("right") is not None:
        mid = (np.asarray(cochlea_centres_lps["left"], float) + np.asarray(cochlea_centres_lps["right"], float)) / 2
        return tuple(map(float, mid))
    from .measure import image_centre_lps

    return tuple(map(float, image_centre_lps(image)))


# ---------------------------------------------------------------------------------- segmentations


def check_segmentation_writable(segmentation_node, overwrite: bool = False) -> None:
    """Refuse to fill a segmentation that already has segments unless ``overwrite`` is True.

    Raises:
        OutputExistsError: the node has segments (the user's work) and overwriting was not asked for.
    """
    if segmentation_node is None or overwrite:
        return
    count = segmentation_node.GetSegmentation().GetNumberOfSegments()
    if count:
        raise OutputExistsError(
            f"Segmentation '{segmentation_node.GetName()}' already has {count} segment(s). Choose "
            "'Create new segmentation' as output, or confirm that it may be overwritten."
        )


def labels_to_segmentation_node(labels: sitk.Image, segmentation_node, *, reference_volume_node=None,
                                midline_point_lps: Optional[Sequence[float]] = None, overwrite: bool = False):
    """Fill ``segmentation_node`` with the VS and the two cochleae of a CrossMoDA label map.

    The segmentation's reference geometry is the label map's grid (or ``reference_volume_node``, which
    must have that grid; it also becomes the Segment Editor's source volume). Existing segments are
    removed only when ``overwrite`` is True. Empty segments are kept so the user can paint them.

    Returns:
        The segmentation node.
    Raises:
        OutputExistsError: see :func:`check_segmentation_writable`.
        InputError: ``labels`` is not 3D, or its grid differs from ``reference_volume_node``'s.
    """
    if labels.GetDimension() != 3:
        raise InputError(f"Expected a 3D label map, got a {labels.GetDimension()}-D image.")
    check_segmentation_writable(segmentation_node, overwrite)
    labels_kji = sitk.GetArrayViewFromImage(labels)
    ijk_to_ras = ijk_to_ras_from_sitk(labels)
    segmentation = segmentation_node.GetSegmentation()

    was_modifying = segmentation_node.StartModify()
    try:
        segmentation.RemoveAllSegments()
        if reference_volume_node is not None:
            if not same_grid(volume_node_to_sitk_geometry(reference_volume_node), labels):
                raise InputError(f"The label map's grid differs from volume '{reference_volume_node.GetName()}'.")
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        else:
            geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(
                _oriented_image(None, ijk_to_ras, labels_kji.shape))
            segmentation.SetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), geometry)
        midline = midline_point_lps if midline_point_lps is not None else default_midline_lps(labels)
        vs_mask = labels_kji == VS
        cochlea_left, cochlea_right = split_by_side(labels_kji == COCHLEA, labels, midline)
        masks = {SEGMENT_VS: vs_mask, SEGMENT_COCHLEA_LEFT: cochlea_left, SEGMENT_COCHLEA_RIGHT: cochlea_right}
        for spec in SEGMENTS:
            segment_id = segmentation.AddEmptySegment(spec.segment_id, spec.name, list(spec.colour))
            segment = segmentation.GetSegment(segment_id)
            segment.SetTerminology(spec.terminology)
            segment.SetTag(TAG_LABEL, str(spec.label))
            if spec.side:
                segment.SetTag(TAG_SIDE, spec.side)
            mask = _oriented_image(masks[spec.segment_id].astype(np.uint8), ijk_to_ras)
            if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(mask, segmentation_node, segment_id):
                raise RuntimeError(f"Slicer could not store segment '{spec.name}'.")
        segmentation.CollapseBinaryLabelmaps(False)
        segmentation_node.SetAttribute(ATTR_MIDLINE, " ".join(repr(float(v)) for v in midline))
    finally:
        segmentation_node.EndModify(was_modifying)
    return segmentation_node


def volume_node_to_sitk_geometry(volume_node) -> sitk.Image:
    """An empty (1-byte) SimpleITK image with the volume node's grid, for geometry comparisons."""
    image_data = volume_node.GetImageData()
    if image_data is None:
        raise InputError(f"Volume '{volume_node.GetName()}' has no voxels.")
    image = sitk.Image([int(d) for d in image_data.GetDimensions()], sitk.sitkUInt8)
    origin, spacing, direction = sitk_geometry_from_ijk_to_ras(volume_ijk_to_ras(volume_node))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def segment_label(segment) -> Optional[int]:
    """The CrossMoDA label (1 VS, 2 cochlea) a segment stands for, or None when it is neither.

    Our own tag first; else the terminology (Neoplasm → VS, Cochlea → cochlea); else the name, so a
    segmentation drawn by hand ("VS", "tumour", "cochlea R") exports sensibly too.
    """
    tag = _segment_tag(segment, TAG_LABEL)
    if tag in (str(VS), str(COCHLEA)):
        return int(tag)
    terminology = segment.GetTerminology() if hasattr(segment, "GetTerminology") else ""
    if f"^{_COCHLEA[0]}^" in terminology:
        return COCHLEA
    if f"^{_NEOPLASM[0]}^" in terminology:
        return VS
    name = (segment.GetName() or "").strip().lower()
    if "cochlea" in name:
        return COCHLEA
    if "schwannoma" in name or "neuroma" in name or "tumo" in name or re.fullmatch(r"vs\b.*", name):
        return VS
    return None


def _segment_tag(segment, tag: str) -> Optional[str]:
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None


def segment_ids_by_label(segmentation_node) -> Tuple[Dict[int, List[str]], List[str]]:
    """({label: [segment IDs]}, [IDs of segments that map to no label]) in the segmentation's order."""
    segmentation = segmentation_node.GetSegmentation()
    by_label: Dict[int, List[str]] = {VS: [], COCHLEA: []}
    unknown: List[str] = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        label = segment_label(segmentation.GetSegment(segment_id))
        (by_label[label] if label is not None else unknown).append(segment_id)
    return by_label, unknown


def _reference_geometry(segmentation_node, reference_volume_node=None) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """(IJK-to-RAS, shape (k, j, i)) of the grid to export on: the volume's, else the segmentation's reference."""
    if reference_volume_node is not None:
        dims = reference_volume_node.GetImageData().GetDimensions()
        return volume_ijk_to_ras(reference_volume_node), (dims[2], dims[1], dims[0])
    geometry = segmentation_node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    oriented = slicer.vtkOrientedImageData()
    if not geometry or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, oriented, False):
        raise InputError(f"Segmentation '{segmentation_node.GetName()}' has no reference geometry; "
                         "give the hrT2 volume as reference.")
    matrix = vtk.vtkMatrix4x4()
    oriented.GetImageToWorldMatrix(matrix)
    ijk_to_ras = _numpy_matrix(matrix)
    extent = oriented.GetExtent()
    ijk_to_ras[:3, 3] = (ijk_to_ras @ np.array([extent[0], extent[2], extent[4], 1.0]))[:3]
    shape = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    return ijk_to_ras, shape


def segmentation_to_labels(segmentation_node, reference_volume_node=None) -> sitk.Image:
    """The segmentation as a CrossMoDA label map (uint8: 0, 1 VS, 2 cochlea) on the reference grid.

    Every segment that maps to a label (see :func:`segment_label`) is included, both cochlea segments
    as 2; where segments overlap, VS wins. Other segments are left out with a logged warning.
    """
    by_label, unknown = segment_ids_by_label(segmentation_node)
    if unknown:
        names = [segmentation_node.GetSegmentation().GetSegment(s).GetName() for s in unknown]
        logger.warning("Segments %s are neither VS nor cochlea and are left out of the label map.", names)
    ijk_to_ras, shape_kji = _reference_geometry(segmentation_node, reference_volume_node)
    labels_kji = np.zeros(shape_kji, dtype=np.uint8)
    ordered = [(segment_id, COCHLEA) for segment_id in by_label[COCHLEA]] + [(s, VS) for s in by_label[VS]]
    if ordered:
        segment_ids = vtk.vtkStringArray()
        label_values = vtk.vtkIntArray()
        for segment_id, label in ordered:
            segment_ids.InsertNextValue(segment_id)
            label_values.InsertNextValue(label)
        merged = slicer.vtkOrientedImageData()
        ok = segmentation_node.GenerateMergedLabelmapForAllSegments(
            merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, _oriented_image(None, ijk_to_ras, shape_kji),
            segment_ids, label_values)
        if not ok:
            raise RuntimeError(f"Slicer could not merge the segments of '{segmentation_node.GetName()}'.")
        dims = merged.GetDimensions()
        merged_kji = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars()).reshape(dims[::-1])
        if merged_kji.shape != labels_kji.shape:
            raise RuntimeError(f"Merged label map has shape {merged_kji.shape}, expected {labels_kji.shape}.")
        labels_kji[:] = merged_kji
    image = sitk.GetImageFromArray(labels_kji)
    origin, spacing, direction = sitk_geometry_from_ijk_to_ras(ijk_to_ras)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


# ------------------------------------------------------------------------------------- measurements


def _read_midline(segmentation_node) -> Optional[Tuple[float, float, float]]:
    text = segmentation_node.GetAttribute(ATTR_MIDLINE)
    try:
        values = tuple(float(v) for v in (text or "").split())
    except ValueError:
        return None
    return values if len(values) == 3 else None


def _read_confidence(segmentation_node) -> Optional[Dict[str, Optional[float]]]:
    text = segmentation_node.GetAttribute(ATTR_CONFIDENCE)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def measure_segmentation(segmentation_node, reference_volume_node=None, measure_fn: Optional[Callable] = None):
    """Measure the segmentation as it is now (after any edits) with the engine's ``measure()``.

    The midline and the model's confidence recorded when the segmentation was made are reused;
    the confidence describes the model's output, not later edits. The result is also stored on
    the node (attribute ``VSCochleaSeg.Measurements``, JSON) so it is saved with the scene.

    Returns:
        :class:`VSCochleaSegLib.measure.Measurements`.
    """
    if measure_fn is None:
        from .measure import measure as measure_fn
    labels = segmentation_to_labels(segmentation_node, reference_volume_node)
    measurements = measure_fn(labels, midline_point_lps=_read_midline(segmentation_node),
                              confidence=_read_confidence(segmentation_node))
    _store_measurements(segmentation_node, measurements)
    return measurements


def _store_measurements(segmentation_node, measurements) -> None:
    segmentation_node.SetAttribute(ATTR_MEASUREMENTS, json.dumps(measurements.to_dict(), allow_nan=False))


def stored_measurements(segmentation_node) -> Optional[Dict[str, Any]]:
    """The measurements last stored on a segmentation node (dict), or None."""
    text = segmentation_node.GetAttribute(ATTR_MEASUREMENTS) if segmentation_node is not None else None
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def format_measurements(values: Optional[Mapping[str, Any]]) -> Dict[str, str]:
    """Display strings for the results panel, keyed ``vs_side``, ``vs_volume``, ``vs_diameter``,
    ``cochlea_left``, ``cochlea_right``, ``confidence``; "–" for anything unknown."""
    dash = "–"
    values = values or {}

    def number(key: str, unit: str, digits: int = 1) -> str:
        value = values.get(key)
        return dash if value is None else f"{float(value):.{digits}f} {unit}"

    side = values.get("vs_side")
    if values and not values.get("vs_present", side is not None):
        side_text = "no tumour found"
    else:
        side_text = {"left": "left", "right": "right", "bilateral": "bilateral (both sides)"}.get(side, dash)
    volume = dash
    if values.get("vs_volume_mm3") is not None:
        ml = values.get("vs_volume_ml", float(values["vs_volume_mm3"]) / 1000.0)
        volume = f"{float(values['vs_volume_mm3']):.1f} mm³ ({float(ml):.3f} mL)"
    confidences = []
    for key, what in (("vs_confidence", "VS"), ("cochlea_confidence", "cochlea")):
        if values.get(key) is not None:
            confidences.append(f"{what} {float(values[key]):.2f}")
    return {
        "vs_side": side_text,
        "vs_volume": volume,
        "vs_diameter": number("vs_max_diameter_mm", "mm"),
        "cochlea_left": number("cochlea_left_volume_mm3", "mm³"),
        "cochlea_right": number("cochlea_right_volume_mm3", "mm³"),
        "confidence": ", ".join(confidences) if confidences else dash,
    }


# ---------------------------------------------------------------------------------------- running


def _is_out_of_memory(error: BaseException) -> bool:
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


def _is_cpu(segmenter: Any, device: str) -> bool:
    actual = getattr(segmenter, "device", None)
    actual = str(getattr(actual, "type", actual) or device)
    return actual.lower().startswith("cpu")


def run_segmenter(image: sitk.Image, *, model: Optional[str] = None, device: str = "auto", quality: str = "full",
                  progress: Optional[ProgressCallback] = None, cancel: Optional[CancelCallback] = None,
                  segmenter: Optional[SegmenterLike] = None, segmenter_factory: Optional[SegmenterFactory] = None,
                  on_message: Optional[Callable[[str], None]] = None) -> Tuple[Any, SegmenterLike]:
    """Run the engine on one image; safe in a worker thread (touches no MRML).

    A GPU out-of-memory error is retried once on the CPU (``on_message`` is told). GPU memory is
    released after the run, also on error or cancel.

    Returns:
        (SegmentationResult, the segmenter that produced it — keep it to reuse the loaded model).
    Raises:
        Cancelled: ``cancel()`` returned True; nothing was produced.
    """
    factory = segmenter_factory or default_segmenter_factory
    report = progress or (lambda stage, fraction: None)
    should_cancel = cancel or (lambda: False)
    if segmenter is None:
        report("load", 0.0)
        segmenter = factory(model, device, quality)
        report("load", 1.0)
    if should_cancel():
        raise Cancelled("Cancelled before the model ran.")
    try:
        try:
            return segmenter.segment_image(image, progress=report, cancel=should_cancel), segmenter
        except Exception as error:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not _is_out_of_memory(error) or _is_cpu(segmenter, device):
                raise
            message = "The GPU ran out of memory; running on the CPU instead (slower)."
            logger.warning(message)
            if on_message:
                on_message(message)
            segmenter.release()
            segmenter = factory(model, "cpu", quality)
            return segmenter.segment_image(image, progress=report, cancel=should_cancel), segmenter
    finally:
        segmenter.release()


def _result_midline(result: Any, labels: sitk.Image) -> Tuple[float, float, float]:
    midline = getattr(result, "midline_point_lps", None)
    if midline is not None:
        return tuple(map(float, midline))
    return default_midline_lps(labels, getattr(result, "cochlea_centres_lps", None))


def result_to_segmentation_node(volume_node, result: Any, segmentation_node=None, *, overwrite: bool = False,
                                show_3d: bool = False):
    """Put an engine result into the scene (main thread): the segmentation next to ``volume_node``.

    A new segmentation node named after the volume is created when ``segmentation_node`` is None.
    Returns the segmentation node; its measurements are stored on it (see :func:`stored_measurements`).
    """
    labels = result.labels
    scene = volume_node.GetScene()
    if scene is None:
        raise InputError(f"Volume '{volume_node.GetName()}' is no longer in the scene.")
    check_segmentation_writable(segmentation_node, overwrite)
    if segmentation_node is not None and segmentation_node.GetScene() is None:
        raise InputError(f"Segmentation '{segmentation_node.GetName()}' was deleted; run again.")
    if not same_grid(volume_node_to_sitk_geometry(volume_node), labels):
        raise InputError("The engine returned a label map on a different grid than the input volume.")
    created = segmentation_node is None
    if created:
        segmentation_node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{volume_node.GetName()} VS-cochlea"))
    try:
        labels_to_segmentation_node(labels, segmentation_node, reference_volume_node=volume_node,
                                    midline_point_lps=_result_midline(result, labels), overwrite=True)
    except Exception:
        if created:
            scene.RemoveNode(segmentation_node)
        raise
    measurements = result.measurements
    confidence = {"vs": getattr(measurements, "vs_confidence", None),
                  "cochlea": getattr(measurements, "cochlea_confidence", None)}
    segmentation_node.SetAttribute(ATTR_CONFIDENCE, json.dumps(confidence))
    segmentation_node.SetAttribute(ATTR_MODEL, f"{getattr(result, 'model_name', '?')} {getattr(result, 'model_version', '?')}")
    _store_measurements(segmentation_node, measurements)
    if volume_node.GetTransformNodeID():
        segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    place_next_to(segmentation_node, volume_node)
    show_segmentation(segmentation_node, show_3d=show_3d)
    return segmentation_node


def place_next_to(node, sibling) -> None:
    """Put ``node`` under the same subject-hierarchy parent (study) as ``sibling`` (for DICOM SEG export)."""
    scene = sibling.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    sibling_item = hierarchy.GetItemByDataNode(sibling)
    parent = hierarchy.GetItemParent(sibling_item) if sibling_item else hierarchy.GetSceneItemID()
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:  # without Slicer's GUI nothing creates items for new nodes
        hierarchy.CreateItem(parent, node)


def show_segmentation(segmentation_node, show_3d: bool = False) -> None:
    """Show the segmentation in the slice views and, when asked, as surfaces in 3D."""
    segmentation_node.CreateDefaultDisplayNodes()
    display = segmentation_node.GetDisplayNode()
    if show_3d:
        segmentation_node.CreateClosedSurfaceRepresentation()
    if display is not None:
        display.SetVisibility(True)
        display.SetVisibility2D(True)
        display.SetVisibility3D(bool(show_3d))


def segment_volume_node(volume_node, segmentation_node=None, model: Optional[str] = None, device: str = "auto",
                        quality: str = "full", progress: Optional[ProgressCallback] = None,
                        cancel: Optional[CancelCallback] = None, overwrite: bool = False,
                        segmenter: Optional[SegmenterLike] = None, *, show_3d: bool = False,
                        segmenter_factory: Optional[SegmenterFactory] = None):
    """Segment the VS and both cochleae of an hrT2 volume node, synchronously.

    Args:
        volume_node: vtkMRMLScalarVolumeNode with the hrT2 scan (any orientation, anisotropic spacing).
        segmentation_node: fill this node; None creates one next to the volume. A node that already
            has segments is refused unless ``overwrite`` is True.
        model, device, quality: passed to :class:`VSCochleaSegLib.pipeline.Segmenter` ("auto"/"cpu"/"cuda";
            "full" ensemble or "fast" single member). Ignored when ``segmenter`` is given.
        progress: ``progress(stage, fraction)`` with the stages of :data:`STAGES`.
        cancel: polled by the engine; returning True stops the run with :class:`Cancelled`, and the
            scene is left exactly as it was.
        segmenter: an already built Segmenter (reused across calls to keep the model loaded).

    Returns:
        (segmentation node, :class:`VSCochleaSegLib.measure.Measurements`).
    """
    image = volume_node_to_sitk(volume_node)
    check_segmentation_writable(segmentation_node, overwrite)
    result, _ = run_segmenter(image, model=model, device=device, quality=quality, progress=progress, cancel=cancel,
                              segmenter=segmenter, segmenter_factory=segmenter_factory)
    if cancel is not None and cancel():
        raise Cancelled("Cancelled; the scene was not changed.")
    for warning in getattr(result, "warnings", None) or []:
        logger.warning("VSCochleaSeg: %s", warning)
    if progress:
        progress("write", 0.0)
    segmentation_node = result_to_segmentation_node(volume_node, result, segmentation_node, overwrite=overwrite,
                                                    show_3d=show_3d)
    if progress:
        progress("write", 1.0)
    return segmentation_node, result.measurements


class SegmentationJob:
    """One segmentation run for a GUI: the engine in a worker thread, MRML only in the caller's thread.

    Create and :meth:`start` it on the main thread (that reads the volume), poll :meth:`progress` /
    :meth:`running` from a timer, call :meth:`cancel` from a button, and when it is no longer running
    call :meth:`finish` on the main thread to put the result in the scene (or raise the worker's error,
    e.g. :class:`Cancelled`, leaving the scene untouched).

    Usage::

        job = SegmentationJob(volume, quality="fast"); job.start()
        while job.running(): time.sleep(0.1); print(job.progress())
        segmentation, measurements = job.finish()
    """

    def __init__(self, volume_node, segmentation_node=None, *, model: Optional[str] = None, device: str = "auto",
                 quality: str = "full", overwrite: bool = False, show_3d: bool = False,
                 segmenter: Optional[SegmenterLike] = None, segmenter_factory: Optional[SegmenterFactory] = None):
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.model, self.device, self.quality = model, device, quality
        self.overwrite, self.show_3d = overwrite, show_3d
        self.segmenter = segmenter
        self._factory = segmenter_factory
        self.messages: List[str] = []
        self._image: Optional[sitk.Image] = None
        self._result: Any = None
        self._error: Optional[BaseException] = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._stage, self._fraction = "load", 0.0
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Read the volume (main thread) and start the worker. Raises InputError/OutputExistsError at once."""
        self._image = volume_node_to_sitk(self.volume_node)
        check_segmentation_writable(self.segmentation_node, self.overwrite)
        self._thread = threading.Thread(target=self._work, name="VSCochleaSeg", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            self._result, self.segmenter = run_segmenter(
                self._image, model=self.model, device=self.device, quality=self.quality, progress=self._progress,
                cancel=self._cancel.is_set, segmenter=self.segmenter, segmenter_factory=self._factory,
                on_message=self.messages.append)
            self.messages.extend(getattr(self._result, "warnings", None) or [])
        except BaseException as error:  # noqa: BLE001 - handed to the main thread by finish()
            self._error = error

    def _progress(self, stage: str, fraction: float) -> None:
        with self._lock:
            self._stage, self._fraction = stage, max(overall_fraction(stage, fraction), self._fraction)

    def progress(self) -> Tuple[str, float]:
        """(stage title for the user, overall fraction 0–1); the fraction never goes back."""
        with self._lock:
            return STAGE_TITLES.get(self._stage, self._stage), self._fraction

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def cancel(self) -> None:
        """Ask the engine to stop at its next check; :meth:`finish` will then raise Cancelled."""
        self._cancel.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the worker ends (tests and scripts); returns False on timeout."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running()

    def finish(self):
        """Main thread, after the worker ended: (segmentation node, measurements), or raise its error."""
        if self._thread is None or self.running():
            raise RuntimeError("finish() called before the segmentation ended.")
        if self._error is not None:
            raise self._error
        if self._cancel.is_set():
            raise Cancelled("Cancelled; the scene was not changed.")
        self._progress("write", 0.0)
        self.segmentation_node = result_to_segmentation_node(
            self.volume_node, self._result, self.segmentation_node, overwrite=self.overwrite, show_3d=self.show_3d)
        self._progress("write", 1.0)
        return self.segmentation_node, self._result.measurements


# ----------------------------------------------------------------------------------------- export

MEASUREMENT_COLUMNS = (
    "vs_present", "vs_side", "vs_volume_mm3", "vs_volume_ml", "vs_max_diameter_mm", "vs_left_volume_mm3",
    "vs_right_volume_mm3", "cochlea_left_volume_mm3", "cochlea_right_volume_mm3", "vs_confidence",
    "cochlea_confidence",
)


def export_paths(output_dir: Union[str, Path], case: str) -> Dict[str, Path]:
    """Where :func:`export_segmentation` writes case ``case``: NIfTI label map, seg.nrrd and CSV."""
    folder = Path(output_dir)
    return {"labels": folder / f"{case}_seg.nii.gz", "segmentation": folder / f"{case}.seg.nrrd",
            "csv": folder / f"{case}_measurements.csv"}


def safe_case_name(name: str) -> str:
    """A file-name-safe case name from a node name ("Patient 1: hrT2" → "Patient_1_hrT2")."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name or "").strip("._")
    return cleaned or "segmentation"


def measurement_row(case: str, measurements: Any, model: str = "") -> Dict[str, Any]:
    """One CSV row: case, model, then :data:`MEASUREMENT_COLUMNS` (None → empty cell)."""
    values = measurements.to_dict() if hasattr(measurements, "to_dict") else dict(measurements)
    row: Dict[str, Any] = {"case": case, "model": model}
    for column in MEASUREMENT_COLUMNS:
        value = values.get(column)
        row[column] = "" if value is None else value
    return row


def write_measurements_csv(rows: Sequence[Mapping[str, Any]], path: Union[str, Path], overwrite: bool = False) -> Path:
    """Write measurement rows (see :func:`measurement_row`) atomically; refuses an existing file."""
    columns = ["case", "model", *MEASUREMENT_COLUMNS]
    with vio.atomic_output(path, overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)


def write_segmentation_file(segmentation_node, path: Union[str, Path], overwrite: bool = False) -> Path:
    """Write a ``.seg.nrrd`` (segment names, colours, terminology kept) atomically."""
    with vio.atomic_output(path, overwrite) as tmp:
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(tmp))
        if not storage.WriteData(segmentation_node):
            raise RuntimeError(f"Slicer could not write {path}.")
    return Path(path)


def export_segmentation(segmentation_node, output_dir: Union[str, Path], case: Optional[str] = None, *,
                        reference_volume_node=None, measurements: Any = None, overwrite: bool = False
                        ) -> Dict[str, Path]:
    """Export a segmentation: CrossMoDA label map (.nii.gz: 1 VS, 2 cochlea), .seg.nrrd and a CSV.

    Nothing is written if any of the three files exists (unless ``overwrite``); each file is written
    to a temporary name and renamed, so no half-written output is left. ``measurements`` default to a
    fresh :func:`measure_segmentation` (so edits are included).

    Returns:
        {"labels": path, "segmentation": path, "csv": path}.
    """
    case = case or safe_case_name(segmentation_node.GetName())
    paths = export_paths(output_dir, case)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"Not exporting: {', '.join(existing)} already exist(s). Choose another folder.")
    labels = segmentation_to_labels(segmentation_node, reference_volume_node)
    if measurements is None:
        measurements = measure_segmentation(segmentation_node, reference_volume_node)
    model = segmentation_node.GetAttribute(ATTR_MODEL) or ""
    vio.write_image_atomic(labels, paths["labels"], overwrite=overwrite)
    write_segmentation_file(segmentation_node, paths["segmentation"], overwrite=overwrite)
    write_measurements_csv([measurement_row(case, measurements, model)], paths["csv"], overwrite=overwrite)
    return paths


# ------------------------------------------------------------------------------------------ batch

INPUT_PATTERNS = ("*.nii.gz", "*.nii", "*.nrrd", "*.mha")
_OUTPUT_PATTERNS = ("*_seg.nii.gz", "*.seg.nrrd")


def find_inputs(input_dir: Union[str, Path], patterns: Iterable[str] = INPUT_PATTERNS) -> List[Path]:
    """Scans in ``input_dir`` (not recursive) matching ``patterns``, sorted; our own outputs are skipped."""
    folder = Path(input_dir)
    if not folder.is_dir():
        raise InputError(f"Input folder '{folder}' does not exist.")
    found = {p for pattern in patterns for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".")}
    return sorted(p for p in found if not any(fnmatch.fnmatch(p.name, o) for o in _OUTPUT_PATTERNS))


def process_folder(input_dir: Union[str, Path], output_dir: Union[str, Path], *, model: Optional[str] = None,
                   device: str = "auto", quality: str = "full", patterns: Iterable[str] = INPUT_PATTERNS,
                   overwrite: bool = False, progress: Optional[ProgressCallback] = None,
                   cancel: Optional[CancelCallback] = None, segmenter: Optional[SegmenterLike] = None,
                   segmenter_factory: Optional[SegmenterFactory] = None, scene=None) -> List[Dict[str, Any]]:
    """Segment every scan in a folder and export each (see :func:`export_segmentation`) plus a summary CSV.

    Runs in a private MRML scene (``scene``, default a new empty one), so the scene shown in Slicer is
    not filled with hundreds of nodes; each case's nodes are removed after export. A case whose
    outputs exist is skipped (so an interrupted batch can be resumed) unless ``overwrite``; a case
    that fails is reported and the batch goes on; :class:`Cancelled` stops the batch.

    ``progress(message, fraction)`` gets "case i/n name: stage" and the fraction of the whole batch.

    Returns:
        One dict per input: {"input", "case", "status": "done" | "skipped" | "failed" | "cancelled",
        "outputs" ({kind: path}), "measurements" (dict or None), "error" (str or None), "summary"
        (path of ``summary_measurements_<time>.csv``, one row per segmented case; absent if none)}.
    """
    inputs = find_inputs(input_dir, patterns)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    scene = scene if scene is not None else slicer.vtkMRMLScene()
    factory = segmenter_factory or default_segmenter_factory
    report = progress or (lambda message, fraction: None)
    should_cancel = cancel or (lambda: False)
    records: List[Dict[str, Any]] = []
    own_segmenter = segmenter is None
    try:
        for index, path in enumerate(inputs):
            case = vio.case_stem(path)
            record: Dict[str, Any] = {"input": str(path), "case": case, "status": "failed", "outputs": {},
                                      "measurements": None, "error": None}
            records.append(record)
            paths = export_paths(output_dir, case)
            if not overwrite and any(p.exists() for p in paths.values()):
                record.update(status="skipped", error="outputs exist", outputs={k: str(v) for k, v in paths.items()})
                continue

            def case_progress(stage: str, fraction: float, index=index, case=case) -> None:
                title = STAGE_TITLES.get(stage, stage)
                report(f"case {index + 1}/{len(inputs)} {case}: {title}",
                       (index + overall_fraction(stage, fraction)) / max(len(inputs), 1))

            try:
                image = vio.read_image(path)
                if segmenter is None:
                    case_progress("load", 0.0)
                    segmenter = factory(model, device, quality)
                result, segmenter = run_segmenter(image, model=model, device=device, quality=quality,
                                                  progress=case_progress, cancel=should_cancel, segmenter=segmenter,
                                                  segmenter_factory=factory)
                case_progress("write", 0.0)
                segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", case)
                try:
                    labels_to_segmentation_node(result.labels, segmentation_node,
                                                midline_point_lps=_result_midline(result, result.labels))
                    segmentation_node.SetAttribute(ATTR_MODEL, f"{result.model_name} {result.model_version}")
                    written = export_segmentation(segmentation_node, output_dir, case,
                                                  measurements=result.measurements, overwrite=overwrite)
                finally:
                    scene.RemoveNode(segmentation_node)
                record.update(status="done", outputs={k: str(v) for k, v in written.items()},
                              measurements=result.measurements.to_dict(),
                              model=f"{result.model_name} {result.model_version}")
            except Cancelled:
                record.update(status="cancelled", error="cancelled")
                raise
            except Exception as error:  # noqa: BLE001 - one bad scan must not stop a batch
                logger.exception("VSCochleaSeg: %s failed", path)
                record["error"] = f"{type(error).__name__}: {error}"
    finally:
        if own_segmenter and segmenter is not None:
            segmenter.release()
        _write_summary(records, output_dir)
    report("done", 1.0)
    return records


def _write_summary(records: Sequence[Mapping[str, Any]], output_dir: Union[str, Path]) -> Optional[Path]:
    done = [r for r in records if r["measurements"] is not None]
    if not done:
        return None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(output_dir) / f"summary_measurements_{stamp}.csv"
    counter = 1
    while path.exists():
        counter += 1
        path = Path(output_dir) / f"summary_measurements_{stamp}-{counter}.csv"
    rows = [measurement_row(r["case"], r["measurements"], r.get("model", "")) for r in done]
    write_measurements_csv(rows, path)
    for record in records:
        record["summary"] = str(path)
    return path
