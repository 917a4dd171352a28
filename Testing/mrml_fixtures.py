"""Fixtures and fakes for the MRML tests: a real MRML scene from the ``slicer-core`` wheel, and a fast fake
Segmenter that follows the engine's protocol (``segment_image`` / ``release``).

Without the Slicer application nothing registers the module logics, so this sets them up the way
Slicer does at start-up: application logic, Colors logic (volume loading needs it), Volumes,
Subject hierarchy and Segmentations logics. The Segmentations logic registers the segmentation
converter rules in a process-wide factory every time it is given a scene, so there is one scene
and one set of logics per test session; each test gets the scene cleared.

Import into a test module with ``from mrml_fixtures import *`` (pytest collects imported fixtures).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module found has no MRML classes (not slicer-core)", allow_module_level=True)

from VSCochleaSegLib.errors import Cancelled  # noqa: E402
from VSCochleaSegLib.labels import COCHLEA, VS  # noqa: E402
from VSCochleaSegLib.measure import image_centre_lps, index_to_lps, measure  # noqa: E402

__all__ = ["mrml", "scene", "FakeSegmenter", "FakeResult", "make_image", "phantom_labels", "rotation",
           "add_volume", "node_ids", "OBLIQUE", "FLIPPED", "segment_mask"]


class MRMLApp:
    """The scene and module logics a running Slicer would own."""

    def __init__(self) -> None:
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        self.color_logic = slicer.vtkSlicerColorLogic()
        self.color_logic.SetMRMLApplicationLogic(self.app_logic)
        self.color_logic.SetMRMLScene(self.scene)
        self.app_logic.SetModuleLogic("Colors", self.color_logic)
        self.volumes_logic = slicer.vtkSlicerVolumesLogic()
        self.volumes_logic.SetMRMLApplicationLogic(self.app_logic)
        self.volumes_logic.SetMRMLScene(self.scene)
        self.app_logic.SetModuleLogic("Volumes", self.volumes_logic)
        self.subject_hierarchy_logic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
        self.subject_hierarchy_logic.SetMRMLApplicationLogic(self.app_logic)
        self.subject_hierarchy_logic.SetMRMLScene(self.scene)
        self.segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        self.segmentations_logic.SetMRMLApplicationLogic(self.app_logic)
        self.segmentations_logic.SetMRMLScene(self.scene)
        self.app_logic.SetModuleLogic("Segmentations", self.segmentations_logic)


@pytest.fixture(scope="session")
def mrml() -> MRMLApp:
    return MRMLApp()


@pytest.fixture
def scene(mrml):
    """The session's scene, emptied before and after the test."""
    mrml.scene.Clear(False)
    yield mrml.scene
    mrml.scene.Clear(False)


# ------------------------------------------------------------------------------------------ images


def rotation(degrees_xyz: Sequence[float]) -> np.ndarray:
    """3×3 rotation matrix R = Rz · Ry · Rx from angles in degrees."""
    ax, ay, az = (math.radians(a) for a in degrees_xyz)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# An oblique acquisition (rotated about all three axes) and one whose first axis is flipped
# (determinant −1, as from a scanner storing right-to-left columns).
OBLIQUE = rotation((12.0, -17.0, 23.0))
FLIPPED = rotation((0.0, 8.0, -5.0)) @ np.diag([-1.0, 1.0, 1.0])


def make_image(size_xyz=(40, 36, 16), spacing=(0.8, 0.7, 2.0), origin=(-12.5, 30.0, -7.0),
               direction: np.ndarray = OBLIQUE, pixel_type=sitk.sitkInt16, seed: int = 0) -> sitk.Image:
    """A small anisotropic, oblique LPS image with noise (voxel values do not matter to the fake)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 1000, size=tuple(reversed(size_xyz))).astype(sitk.GetArrayViewFromImage(
        sitk.Image([1, 1, 1], pixel_type)).dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(map(float, spacing)))
    image.SetOrigin(tuple(map(float, origin)))
    image.SetDirection(tuple(map(float, np.asarray(direction).ravel())))
    return image


def phantom_labels(image: sitk.Image, vs_side: Optional[str] = "left", cochlea_offset_mm: float = 9.0,
                   cochlea_radius_mm: float = 2.5, vs_offset_mm: float = 4.0, vs_radius_mm: float = 3.2
                   ) -> Tuple[sitk.Image, Dict[str, Tuple[float, float, float]]]:
    """CrossMoDA labels on ``image``'s grid: a cochlea ball on each side, a VS ball on ``vs_side``.

    Balls are placed in physical LPS space around the image centre (+x = patient's left), so the
    sides are right whatever the direction matrix. ``vs_side``: "left", "right", "both" or None.
    Returns (labels, {"left": centre, "right": centre} of the cochleae in LPS).
    """
    size = image.GetSize()
    grid_zyx = np.stack(np.meshgrid(*[np.arange(n) for n in reversed(size)], indexing="ij"), axis=-1).reshape(-1, 3)
    points = index_to_lps(image, grid_zyx)
    centre = np.asarray(image_centre_lps(image))
    left_axis = np.array([1.0, 0.0, 0.0])
    labels = np.zeros(len(points), dtype=np.uint8)
    centres = {"left": tuple(centre + cochlea_offset_mm * left_axis), "right": tuple(centre - cochlea_offset_mm * left_axis)}
    for side in ("left", "right"):
        labels[np.linalg.norm(points - np.asarray(centres[side]), axis=1) <= cochlea_radius_mm] = COCHLEA
    vs_sides = {"left": ["left"], "right": ["right"], "both": ["left", "right"], None: []}[vs_side]
    for side in vs_sides:
        sign = 1.0 if side == "left" else -1.0
        labels[np.linalg.norm(points - (centre + sign * vs_offset_mm * left_axis), axis=1) <= vs_radius_mm] = VS
    out = sitk.GetImageFromArray(labels.reshape(tuple(reversed(size))))
    out.CopyInformation(image)
    return out, {k: tuple(map(float, v)) for k, v in centres.items()}


def add_volume(scene, image: sitk.Image, name: str = "hrT2"):
    """A scalar volume node built with MRML's own setters (spacing, RAS origin, RAS directions),
    independently of the code under test."""
    flip = np.diag([-1.0, -1.0, 1.0])
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    node.SetSpacing(image.GetSpacing())
    node.SetOrigin(tuple(flip @ np.asarray(image.GetOrigin())))
    directions_ras = flip @ np.asarray(image.GetDirection()).reshape(3, 3)
    node.SetIJKToRASDirections([list(row) for row in directions_ras])
    node.CreateDefaultDisplayNodes()
    return node


def node_ids(scene) -> List[str]:
    """IDs of all nodes in the scene, in order."""
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def segment_mask(segmentation_node, segment_id: str, reference_volume_node) -> np.ndarray:
    """A segment as a (k, j, i) bool array on the reference volume's grid, via Slicer's own export."""
    scene = segmentation_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, [segment_id], labelmap, reference_volume_node,
            slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        assert ok, f"export of {segment_id} failed"
        return slicer.util.arrayFromVolume(labelmap).copy() > 0
    finally:
        scene.RemoveNode(labelmap)


# ------------------------------------------------------------------------------------------- fakes


@dataclass
class FakeResult:
    """Follows VSCochleaSegLib.pipeline.SegmentationResult."""

    labels: sitk.Image
    measurements: Any
    cochlea_centres_lps: Dict[str, Tuple[float, float, float]]
    midline_point_lps: Optional[Tuple[float, float, float]]
    model_name: str = "fake"
    model_version: str = "0.0"
    timings_s: Dict[str, float] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)


class FakeSegmenter:
    """Stands in for VSCochleaSegLib.pipeline.Segmenter: draws phantom_labels on the input grid.

    It reports progress through the engine's four stages in ``windows`` steps each, polls ``cancel``
    before every step (like the engine between sliding windows) and can pretend the GPU ran out of
    memory (``out_of_memory=True``: on a GPU only; ``"always"``: on any device). ``calls``, ``threads`` and ``released`` record what happened.
    """

    def __init__(self, vs_side: Optional[str] = "left", device: str = "cpu", windows: int = 3,
                 delay_s: float = 0.0, out_of_memory: bool = False, gate: Optional[threading.Event] = None):
        self.vs_side, self.device, self.windows, self.delay_s = vs_side, device, windows, delay_s
        self.out_of_memory = out_of_memory
        self.gate = gate
        self.calls = 0
        self.released = 0
        self.threads: List[int] = []
        self.progress_seen: List[Tuple[str, float]] = []
        self.warnings: List[str] = []

    def segment_image(self, image, progress=None, cancel=None):
        self.calls += 1
        self.threads.append(threading.get_ident())
        if self.out_of_memory == "always" or (self.out_of_memory and self.device != "cpu"):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        for stage in ("localise", "predict", "postprocess", "measure"):
            for step in range(self.windows):
                if self.gate is not None:
                    self.gate.wait(5.0)
                if cancel is not None and cancel():
                    raise Cancelled("cancelled by the user")
                if self.delay_s:
                    time.sleep(self.delay_s)
                fraction = (step + 1) / self.windows
                self.progress_seen.append((stage, fraction))
                if progress is not None:
                    progress(stage, fraction)
        labels, centres = phantom_labels(image, self.vs_side)
        midline = tuple((np.asarray(centres["left"]) + np.asarray(centres["right"])) / 2)
        measurements = measure(labels, midline_point_lps=midline, confidence={"vs": 0.9, "cochlea": 0.8})
        return FakeResult(labels, measurements, centres, midline, warnings=list(self.warnings))

    def release(self) -> None:
        self.released += 1
