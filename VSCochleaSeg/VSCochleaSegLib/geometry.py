"""Image grids in physical space: build the grids networks run on, resample into them and back.

Every grid here is a :class:`GridSpec` — origin, spacing (x, y, z) mm, size (x, y, z) voxels and a
direction matrix, all in the LPS patient frame that SimpleITK uses. Networks never see the input's own
voxel grid: the localiser sees an LPS-aligned grid over the whole scan, the segmentation networks see a
box around each inner ear. Right-ear boxes are mirrored (direction diag(-1, 1, 1)) so both ears reach the
network with the lateral side at high x-index. Resampling back to the input grid uses the input's exact
size, spacing, origin and direction, so outputs overlay the input voxel for voxel (oblique included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class GridSpec:
    """A sampling grid. ``direction`` is 3×3 (columns = index axes in LPS), spacing/size in (x, y, z)."""

    origin: tuple
    spacing: tuple
    size: tuple
    direction: tuple = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def shape_zyx(self) -> tuple:
        return (int(self.size[2]), int(self.size[1]), int(self.size[0]))

    def reference(self) -> sitk.Image:
        """An empty image with this geometry (what sitk.Resample needs as a reference)."""
        img = sitk.Image([int(s) for s in self.size], sitk.sitkUInt8)
        img.SetOrigin([float(v) for v in self.origin])
        img.SetSpacing([float(v) for v in self.spacing])
        img.SetDirection([float(v) for v in self.direction])
        return img

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) continuous indices in (i=x, j=y, k=z) order → (N, 3) LPS mm."""
        d = np.asarray(self.direction, float).reshape(3, 3)
        return np.asarray(self.origin) + (np.asarray(ijk, float) * np.asarray(self.spacing)) @ d.T

    def corners_lps(self) -> np.ndarray:
        """(8, 3) LPS mm of the outer voxel centres."""
        hi = np.asarray(self.size) - 1
        ijk = np.array([[a, b, c] for a in (0, hi[0]) for b in (0, hi[1]) for c in (0, hi[2])], float)
        return self.index_to_lps(ijk)

    @classmethod
    def of_image(cls, image: sitk.Image) -> "GridSpec":
        return cls(tuple(image.GetOrigin()), tuple(image.GetSpacing()), tuple(image.GetSize()), tuple(image.GetDirection()))


def image_corners_lps(image: sitk.Image) -> np.ndarray:
    """(8, 3) LPS mm of the image's corner voxel centres."""
    return GridSpec.of_image(image).corners_lps()


def lps_aligned_grid(image: sitk.Image, spacing_xyz_mm, multiple_of=(1, 1, 1)) -> GridSpec:
    """An identity-direction grid covering the image's physical extent at ``spacing_xyz_mm``.

    The size is rounded up to a multiple of ``multiple_of`` (x, y, z) so network strides divide it.
    """
    corners = image_corners_lps(image)
    lo, hi = corners.min(0), corners.max(0)
    spacing = np.asarray(spacing_xyz_mm, float)
    size = np.ceil((hi - lo) / spacing).astype(int) + 1
    mult = np.asarray(multiple_of, int)
    size = ((size + mult - 1) // mult) * mult
    centre = (lo + hi) / 2
    origin = centre - spacing * (size - 1) / 2
    return GridSpec(tuple(origin), tuple(spacing), tuple(int(s) for s in size))


def box_grid(centre_lps, size_xyz_mm, spacing_xyz_mm, mirror_x: bool = False) -> GridSpec:
    """A box of ``size_xyz_mm`` centred on ``centre_lps``, axis-aligned with LPS.

    ``mirror_x`` flips the x index axis (direction diag(-1, 1, 1)): used for right ears so that
    index i grows laterally on both sides.
    """
    spacing = np.asarray(spacing_xyz_mm, float)
    size = np.maximum(np.round(np.asarray(size_xyz_mm, float) / spacing).astype(int), 1)
    sign = np.array([-1.0 if mirror_x else 1.0, 1.0, 1.0])
    direction = np.diag(sign)
    origin = np.asarray(centre_lps, float) - sign * spacing * (size - 1) / 2
    return GridSpec(tuple(origin), tuple(spacing), tuple(int(s) for s in size), tuple(direction.ravel()))


def resample_to_grid(image: sitk.Image, grid: GridSpec, interpolator=sitk.sitkLinear, default: float = 0.0) -> np.ndarray:
    """Sample ``image`` on ``grid``; returns a (z, y, x) float32 array. Outside the image → ``default``."""
    out = sitk.Resample(image, grid.reference(), sitk.Transform(), interpolator, float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def array_to_image(array_zyx: np.ndarray, grid: GridSpec) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    img.SetOrigin([float(v) for v in grid.origin])
    img.SetSpacing([float(v) for v in grid.spacing])
    img.SetDirection([float(v) for v in grid.direction])
    return img


def covered_region(grid: GridSpec, reference: sitk.Image, margin: int = 1):
    """Index box of ``reference`` that ``grid`` covers: (lo_xyz, hi_xyz) exclusive, or None if disjoint."""
    corners = grid.corners_lps()
    idx = np.array([reference.TransformPhysicalPointToContinuousIndex([float(v) for v in c]) for c in corners])
    lo = np.maximum(np.floor(idx.min(0)).astype(int) - margin, 0)
    hi = np.minimum(np.ceil(idx.max(0)).astype(int) + margin + 1, np.asarray(reference.GetSize()))
    if np.any(hi <= lo):
        return None
    return lo, hi


def resample_channels_to_reference(channels_czyx: np.ndarray, grid: GridSpec, reference: sitk.Image):
    """Resample per-class maps (C, z, y, x) on ``grid`` into the part of ``reference`` that ``grid`` covers.

    Linear interpolation; returns ``(slices_zyx, maps (C, dz, dy, dx), coverage (dz, dy, dx))`` where
    coverage is 1 inside the grid and falls to 0 outside it, or None if the grid misses the reference.
    """
    region = covered_region(grid, reference)
    if region is None:
        return None
    lo, hi = region
    sub = sitk.Image([int(v) for v in hi - lo], sitk.sitkUInt8)
    sub.SetSpacing(reference.GetSpacing())
    sub.SetDirection(reference.GetDirection())
    sub.SetOrigin(reference.TransformIndexToPhysicalPoint([int(v) for v in lo]))
    maps = []
    for ch in list(channels_czyx) + [np.ones(channels_czyx.shape[1:], np.float32)]:
        src = array_to_image(ch.astype(np.float32), grid)
        res = sitk.Resample(src, sub, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        maps.append(sitk.GetArrayFromImage(res))
    sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
    return sl, np.stack(maps[:-1]), maps[-1]


def labels_to_image(labels_zyx: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """uint8 label array (z, y, x) → image with ``reference``'s exact geometry."""
    img = sitk.GetImageFromArray(labels_zyx.astype(np.uint8))
    img.CopyInformation(reference)
    return img
