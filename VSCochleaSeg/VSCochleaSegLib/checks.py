"""Checks on a scan before any network runs: field of view, memory, and whether it looks like hrT2.

:func:`io.validate_image` already refuses what makes a file unusable as a 3D scan (dimensionality,
components, spacing, direction, NaN/Inf, constant). The checks here need the model or the machine: the
scan's physical extent must be able to hold both inner ears, the run must fit in memory (estimated from
the scan's size before reading it when possible), and a scan whose intensities do not look like hrT2
gets a warning — never a refusal, because the heuristic can be wrong. Thresholds are data
(:class:`ScanChecks`); their reasons and limits are in docs/reliability.md.
"""

from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import read_image_information
from .model_folder import ModelSpec


@dataclass(frozen=True)
class ScanChecks:
    """Thresholds of the pre-flight checks.

    min_extent_lps_mm: smallest physical extent (mm) along LPS x (left-right), y (anterior-posterior)
        and z (inferior-superior). Adult cochleae lie ~55–75 mm apart (69 mm in the phantom sample), so a
        scan narrower than 40 mm left-right cannot hold both; 10 mm is about two cochlea heights.
    memory_limit_bytes: refuse scans whose estimated peak memory exceeds this; None: the RAM available
        when the scan is checked.
    min_bright_plateau: hrT2 scans have a bright-plateau fraction above this (see
        :func:`bright_plateau_fraction`); below it the scan gets a "does not look like hrT2" warning.
    contrast_sample_voxels: the contrast heuristic looks at a regular subsample of about this many voxels.
    """

    min_extent_lps_mm: tuple = (40.0, 10.0, 10.0)
    memory_limit_bytes: Optional[int] = None
    min_bright_plateau: float = 0.22
    contrast_sample_voxels: int = 200_000


def check_scan(image: sitk.Image, spec: ModelSpec, checks: ScanChecks = ScanChecks()) -> List[str]:
    """Run every pre-flight check on a scan already in memory; return warnings (possibly empty).

    Raises:
        InputError: the field of view is too small, or segmenting would exceed the memory budget.
    """
    check_field_of_view(image, checks)
    held = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    check_memory(image.GetSize(), image.GetSpacing(), spec, checks.memory_limit_bytes, held_bytes=held,
                 direction=image.GetDirection())
    warning = contrast_warning(image, checks)
    return [warning] if warning else []


# ---------------------------------------------------------------------------------- field of view


_AXIS_NAMES = ("left-right", "anterior-posterior", "inferior-superior")


def physical_extent_lps_mm(size_xyz: Sequence[int], spacing_xyz: Sequence[float],
                           direction: Sequence[float]) -> np.ndarray:
    """Extent (mm) of the volume the voxels fill, along LPS x, y, z (voxel edges, oblique allowed)."""
    d = np.asarray(direction, float).reshape(3, 3)
    edge = np.array([[a, b, c] for a in (-0.5, size_xyz[0] - 0.5) for b in (-0.5, size_xyz[1] - 0.5)
                     for c in (-0.5, size_xyz[2] - 0.5)])
    corners = (edge * np.asarray(spacing_xyz, float)) @ d.T
    return corners.max(0) - corners.min(0)


def check_field_of_view(image: sitk.Image, checks: ScanChecks = ScanChecks()) -> None:
    """Refuse a scan too small along some LPS axis to hold both inner ears."""
    extent = physical_extent_lps_mm(image.GetSize(), image.GetSpacing(), image.GetDirection())
    minimum = np.asarray(checks.min_extent_lps_mm, float)
    if np.all(extent >= minimum):
        return
    short = [f"{_AXIS_NAMES[a]} {extent[a]:.0f} mm < {minimum[a]:.0f} mm" for a in range(3) if extent[a] < minimum[a]]
    raise InputError(
        f"The scan covers only {extent[0]:.0f} × {extent[1]:.0f} × {extent[2]:.0f} mm (left-right × "
        f"anterior-posterior × inferior-superior): too small to hold both inner ears ({'; '.join(short)}). "
        "Use the series that covers both internal auditory canals and cochleae (e.g. the whole "
        "posterior-fossa CISS/FIESTA slab), not a cropped or single-ear reconstruction."
    )


# ----------------------------------------------------------------------------------------- memory


# Bytes held per voxel of the input grid at the engine's peak (pipeline.Segmenter._segment, dividing the
# class sums by the coverage): the scan as read and the engine's copy (float32), the three class sums and
# the crop coverage (float32), the division's temporary (float32), then labels and masks (uint8/bool).
# Measured peak RSS growth, scan included: 28.9 bytes a voxel (25 M voxels; docs/reliability.md).
_BYTES_PER_INPUT_VOXEL = 4 + 4 + 3 * 4 + 4 + 4 + 3
# Per voxel of a network grid (localiser grid, ear crop): the resampled and normalised volume, MONAI's
# sliding-window output, count map and importance map, softmax and the accumulated probabilities.
_BYTES_PER_NETWORK_VOXEL = 96
# Per voxel of the part of the input grid one crop maps back onto: class maps + coverage (float32) and
# SimpleITK's resampling buffers.
_BYTES_PER_MAPPED_VOXEL = 32
# PyTorch and allocator working space that does not scale with the scan.
_FIXED_BYTES = 64 * 2**20


def estimate_peak_bytes(size_xyz: Sequence[int], spacing_xyz: Sequence[float], spec: ModelSpec,
                        direction: Optional[Sequence[float]] = None) -> int:
    """Estimated peak memory (bytes) of reading and segmenting one scan, weights excluded.

    Args:
        size_xyz: voxels along i, j, k; spacing_xyz: mm along i, j, k; direction: the 3×3 direction
            (LPS, row-major; None: identity), which sets the LPS box the localiser grid covers.
        spec: the model (its localiser spacing and crop size set the network grids).
    """
    size = np.asarray(size_xyz, float)
    spacing = np.asarray(spacing_xyz, float)
    n_input = float(np.prod(size))
    box_mm = physical_extent_lps_mm(size_xyz, spacing_xyz, direction if direction is not None else np.eye(3).ravel())
    n_localiser = float(np.prod(np.ceil(box_mm / np.asarray(spec.localiser.spacing_xyz_mm, float)) + 16))
    crop_mm = np.asarray(spec.crop.size_xyz_mm, float)
    n_crop = float(np.prod(np.ceil(crop_mm / np.asarray(spec.segmentation.spacing_xyz_mm, float))))
    n_members = len(spec.segmentation.members)
    # The input-grid box one crop maps back onto; oblique grids make it up to sqrt(3) wider per axis.
    n_mapped = min(n_input, float(np.prod(np.ceil(crop_mm * math.sqrt(3) / spacing) + 3)))
    total = (_BYTES_PER_INPUT_VOXEL * n_input + _BYTES_PER_NETWORK_VOXEL * (n_localiser + n_crop)
             + 12 * n_members * n_crop + _BYTES_PER_MAPPED_VOXEL * n_mapped + _FIXED_BYTES)
    return int(total)


def available_memory_bytes() -> Optional[int]:
    """RAM the system can give this process now (Linux MemAvailable, else free pages); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if os.name == "nt":
        return _windows_available_memory()
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _windows_available_memory() -> Optional[int]:
    class MemoryStatus(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                    ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                    ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                    ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                    ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

    status = MemoryStatus()
    status.dwLength = ctypes.sizeof(MemoryStatus)
    try:
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return int(status.ullAvailPhys)
    except (AttributeError, OSError):
        pass
    return None


def check_memory(size_xyz: Sequence[int], spacing_xyz: Sequence[float], spec: ModelSpec,
                 limit_bytes: Optional[int] = None, held_bytes: int = 0,
                 direction: Optional[Sequence[float]] = None) -> None:
    """Refuse a scan whose estimated peak memory exceeds the budget.

    The budget is ``limit_bytes`` if given, else the RAM available now plus ``held_bytes`` (memory the
    scan already occupies, so it is not counted twice). With no limit and no way to know the available
    RAM, nothing is refused.
    """
    need = estimate_peak_bytes(size_xyz, spacing_xyz, spec, direction)
    if limit_bytes is not None:
        budget, what = int(limit_bytes), "the limit set (--max-memory-gb)"
    else:
        available = available_memory_bytes()
        if available is None:
            return
        budget, what = available + int(held_bytes), "the memory available"
    if need <= budget:
        return
    size = " × ".join(str(int(s)) for s in size_xyz)
    spacing = "/".join(f"{s:g}" for s in spec.segmentation.spacing_xyz_mm)
    raise InputError(
        f"The scan is too large for {what}: {size} voxels need about {need / 1e9:.2g} GB to segment, "
        f"but only {budget / 1e9:.2g} GB is there. Crop it to the posterior fossa around both inner ears "
        f"(e.g. Slicer's Crop Volume), or resample it to a coarser spacing (the model works at {spacing} mm), "
        "or close other programs, or raise --max-memory-gb."
    )


def check_memory_before_reading(path, spec: ModelSpec, checks: ScanChecks = ScanChecks()) -> None:
    """:func:`check_memory` from a file's header alone, so a huge scan is refused before it is read.
    Folders (DICOM) and unreadable headers pass: the check runs again once the scan is read."""
    info = read_image_information(Path(path))
    if info is None or len(info[0]) != 3:
        return
    size, spacing, direction = info
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        return  # read_image refuses it with the reason
    check_memory(size, spacing, spec, checks.memory_limit_bytes, direction=direction)


# --------------------------------------------------------------------------------------- contrast


# Voxels above _BRIGHT_FLOOR × top count as bright; above _PLATEAU_FLOOR × top they are on the plateau.
_BRIGHT_FLOOR = 0.4
_PLATEAU_FLOOR = 0.85
_TOP_PERCENTILE = 99.5


def bright_plateau_fraction(voxels: np.ndarray, sample_voxels: int = 200_000) -> Optional[float]:
    """Of the bright voxels (> 40 % of the scan's 99.5th percentile), the fraction within 15 % of it.

    In hrT2 (CISS/FIESTA) the brightest tissue is fluid — CSF in the cisterns and internal auditory
    canals, the labyrinth — a large compartment of nearly uniform, maximal intensity: most bright voxels
    sit on that plateau (median 0.48 on phantoms). In ceT1 fluid is dark and the bright end is a gradual
    tail of white matter, fat and enhancing vessels/tumour, so few bright voxels reach the top (median
    0.08). Computed on a regular subsample of ``sample_voxels`` (any array shape). None if the scan has
    no bright voxels (e.g. all values ≤ 0).
    """
    flat = np.asarray(voxels).reshape(-1)
    sample = flat[:: max(1, flat.size // max(int(sample_voxels), 1))].astype(np.float32)
    top = float(np.percentile(sample, _TOP_PERCENTILE))
    if not top > 0:
        return None
    bright = np.count_nonzero(sample > _BRIGHT_FLOOR * top)
    if bright == 0:
        return None
    return float(np.count_nonzero(sample > _PLATEAU_FLOOR * top)) / bright


def contrast_warning(image: sitk.Image, checks: ScanChecks = ScanChecks()) -> Optional[str]:
    """A warning if the scan's intensities do not look like hrT2, else None (see docs/reliability.md)."""
    fraction = bright_plateau_fraction(sitk.GetArrayViewFromImage(image), checks.contrast_sample_voxels)
    if fraction is None or fraction >= checks.min_bright_plateau:
        return None
    return (
        f"The scan does not look like an hrT2 (CISS/FIESTA): its brightest voxels do not form the bright "
        f"fluid plateau of hrT2 (bright-plateau fraction {fraction:.3f}, hrT2 scans have ≥ "
        f"{checks.min_bright_plateau:.3f}). If it is a ceT1, T1, FLAIR or another contrast, the "
        "segmentation is unreliable: load the hrT2 series instead. If it is an hrT2, check the result; "
        "strong shading or little CSF in the field of view can cause this warning."
    )
