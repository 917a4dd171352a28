"""Quick-look PNG of a segmentation: three orthogonal slices of the scan with the labels blended in.

One job: given the scan and its label map on the same grid, draw an axial, a coronal and a sagittal
slice through the tumour (or a cochlea, or the volume centre) side by side, grey-level windowed, the
labels in :data:`labels.COLOURS`, and write the PNG atomically. It is meant for a glance in a file
browser or a report, not for reading: no interpolation of the label map, no oblique reslicing.
Pillow only (no matplotlib), so it runs wherever the engine runs.
"""

from __future__ import annotations

import io as _stdio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont

from . import labels as label_values
from .io import PathLike, write_bytes_atomic

# Side of the largest panel in pixels; all panels share one mm-per-pixel scale derived from it.
PANEL_SIZE_PX = 320
GAP_PX = 4
LABEL_OPACITY = 0.45
# Grey window from these percentiles: robust to a few very bright voxels (vessels, fat, artefacts).
WINDOW_PERCENTILES = (1.0, 99.0)
# Percentiles come from a strided sample of at most this many voxels: a quick look needs no more.
_MAX_WINDOW_SAMPLES = 1_000_000
CAPTION_FONT_PX = 14
_CAPTION_PADDING_PX = 4


@dataclass(frozen=True)
class _Panel:
    """One slice ready to draw: rows top to bottom, columns left to right.

    grey: (rows, cols) uint8 windowed intensities; labels: (rows, cols) uint8 label values;
    row_mm, col_mm: the physical size of a pixel along the rows and the columns.
    """

    grey: np.ndarray
    labels: np.ndarray
    row_mm: float
    col_mm: float


def render_overlay_png(
    image: sitk.Image,
    labels: sitk.Image,
    path: PathLike,
    overwrite: bool = False,
    measurements: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Render axial | coronal | sagittal slices with labels blended in, and write them as a PNG.

    Both images are first reoriented to the nearest LPS axes with ``sitk.DICOMOrient`` (a pure
    permutation/flip of the voxel grid, no interpolation); slices are then taken along those array
    axes, so an oblique scan is shown in its own (tilted) planes. In the LPS array (k, j, i) the panels
    are: axial = ``[k_c, :, :]`` (anterior up, patient right on the left: radiological view),
    coronal = ``[:, j_c, :]`` and sagittal = ``[:, :, i_c]`` (both superior up). The slice point
    (k_c, j_c, i_c) is the centroid of the VS voxels, else of the cochlea voxels, else the volume
    centre. Each panel is resized so pixels are square in mm, all at one shared mm-per-pixel scale.

    Args:
        image: the 3D scan (any scalar pixel type), windowed at its 1st–99th percentile.
        labels: 3D label map (0 background, ``labels.VS``, ``labels.COCHLEA``) with the same size as
            ``image`` (the same grid; only the size is checked).
        path: output ``.png`` path; written via :func:`io.write_bytes_atomic`.
        overwrite: replace an existing file (else ``OutputExistsError``).
        measurements: optional mapping, e.g. ``dataclasses.asdict(measure(...))``; when given, a
            caption row "VS: X.XX mL  <side>" is added, from ``vs_volume_ml`` (or
            ``vs_volume_mm3`` / 1000) and ``vs_side``.

    Returns:
        The final path. Image size: width = the three panels + gaps, height = the tallest panel
        (+ a caption row).
    Raises:
        ValueError: the label map's size differs from the image's.
    """
    if tuple(labels.GetSize()) != tuple(image.GetSize()):
        raise ValueError(
            f"Label map size {labels.GetSize()} differs from image size {image.GetSize()}; "
            "resample the labels onto the image grid first."
        )
    image_lps = sitk.DICOMOrient(image, "LPS")
    labels_lps = sitk.DICOMOrient(labels, "LPS")
    grey = _window(sitk.GetArrayViewFromImage(image_lps))  # (k, j, i) uint8
    label_array = sitk.GetArrayFromImage(labels_lps).astype(np.uint8)  # (k, j, i)
    spacing_ijk = image_lps.GetSpacing()  # mm along i, j, k
    centre_kji = _slice_point(label_array)

    panels = _orthogonal_panels(grey, label_array, centre_kji, spacing_ijk)
    rendered = _render_panels(panels)
    canvas = _assemble(rendered, _caption(measurements) if measurements is not None else None)

    buffer = _stdio.BytesIO()
    canvas.save(buffer, format="PNG")
    return write_bytes_atomic(buffer.getvalue(), path, overwrite)


def _window(volume: np.ndarray) -> np.ndarray:
    """Map intensities to uint8 with a percentile window; same shape as ``volume``."""
    flat = volume.reshape(-1)
    step = max(1, flat.size // _MAX_WINDOW_SAMPLES)
    lo, hi = np.percentile(flat[::step], WINDOW_PERCENTILES)
    if hi <= lo:  # nearly constant image: any window shows it; avoid dividing by zero
        hi = lo + 1.0
    scaled = (volume.astype(np.float32) - lo) / (hi - lo)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _slice_point(label_array: np.ndarray) -> tuple[int, int, int]:
    """(k, j, i) of the VS centroid, else the cochlea centroid, else the array centre."""
    for value in (label_values.VS, label_values.COCHLEA):
        voxels = np.argwhere(label_array == value)
        if len(voxels):
            k, j, i = np.rint(voxels.mean(axis=0)).astype(int)
            return int(k), int(j), int(i)
    k, j, i = (s // 2 for s in label_array.shape)
    return k, j, i


def _orthogonal_panels(
    grey: np.ndarray,
    label_array: np.ndarray,
    centre_kji: tuple[int, int, int],
    spacing_ijk: Sequence[float],
) -> list[_Panel]:
    """Axial, coronal, sagittal panels of LPS-ordered (k, j, i) arrays, superior up."""
    k, j, i = centre_kji
    sx, sy, sz = spacing_ijk
    # k grows superior, image rows grow downward: flip k so the head is at the top.
    return [
        _Panel(grey[k], label_array[k], row_mm=sy, col_mm=sx),
        _Panel(grey[::-1, j, :], label_array[::-1, j, :], row_mm=sz, col_mm=sx),
        _Panel(grey[::-1, :, i], label_array[::-1, :, i], row_mm=sz, col_mm=sy),
    ]


def _render_panels(panels: Sequence[_Panel]) -> list[Image.Image]:
    """Resize every panel to square pixels at one shared scale and blend its labels; RGB images."""
    extent_mm = max(
        max(p.grey.shape[0] * p.row_mm, p.grey.shape[1] * p.col_mm) for p in panels
    )
    mm_per_px = extent_mm / PANEL_SIZE_PX
    rendered = []
    for p in panels:
        size_wh = (
            max(1, round(p.grey.shape[1] * p.col_mm / mm_per_px)),
            max(1, round(p.grey.shape[0] * p.row_mm / mm_per_px)),
        )
        grey = np.asarray(
            Image.fromarray(np.ascontiguousarray(p.grey)).resize(size_wh, Image.BILINEAR)
        )
        # Nearest neighbour: label values must stay label values.
        lab = np.asarray(
            Image.fromarray(np.ascontiguousarray(p.labels)).resize(size_wh, Image.NEAREST)
        )
        rendered.append(Image.fromarray(_blend(grey, lab)))
    return rendered


def _blend(grey: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """Blend label colours into a grey slice. grey, lab: (h, w) uint8 → (h, w, 3) uint8 RGB.

    Inside a label: ``LABEL_OPACITY`` of its colour; on its 1-pixel inner outline: the full colour,
    so small structures (a cochlea is a few pixels) stay visible.
    """
    rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=2)
    outline = _outline(lab)
    for value, colour in label_values.COLOURS.items():
        colour_255 = np.asarray(colour, dtype=np.float32) * 255.0
        inside = lab == value
        rgb[inside] = (1.0 - LABEL_OPACITY) * rgb[inside] + LABEL_OPACITY * colour_255
        rgb[inside & outline] = colour_255
    return (rgb + 0.5).astype(np.uint8)


def _outline(lab: np.ndarray) -> np.ndarray:
    """(h, w) bool: labelled pixels with a 4-neighbour of another value (the image edge counts)."""
    padded = np.pad(lab, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    return differs & (lab != 0)


def _caption(measurements: Mapping[str, Any]) -> str:
    """The caption text, e.g. ``VS: 1.23 mL  left``, from a measurement mapping (see render_overlay_png)."""
    volume_ml = measurements.get("vs_volume_ml")
    if volume_ml is None and measurements.get("vs_volume_mm3") is not None:
        volume_ml = float(measurements["vs_volume_mm3"]) / 1000.0
    volume_text = "n/a" if volume_ml is None else f"{float(volume_ml):.2f} mL"
    side = measurements.get("vs_side") or "no VS"
    return f"VS: {volume_text}  {side}"


def _caption_font() -> ImageFont.ImageFont:
    """Pillow's built-in font at ``CAPTION_FONT_PX``; Pillow < 10.1 only has a fixed small bitmap."""
    try:
        return ImageFont.load_default(size=CAPTION_FONT_PX)
    except TypeError:
        return ImageFont.load_default()


def _assemble(panels: Sequence[Image.Image], caption: Optional[str]) -> Image.Image:
    """Place panels left to right on black, top-aligned, with an optional caption row below."""
    width = sum(p.width for p in panels) + GAP_PX * (len(panels) - 1)
    panels_height = max(p.height for p in panels)
    font = _caption_font()
    caption_height = 0
    if caption is not None:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        left, top, right, bottom = probe.textbbox((0, 0), caption, font=font)
        caption_height = int(bottom) + 2 * _CAPTION_PADDING_PX
    canvas = Image.new("RGB", (width, panels_height + caption_height), (0, 0, 0))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + GAP_PX
    if caption is not None:
        ImageDraw.Draw(canvas).text(
            (_CAPTION_PADDING_PX, panels_height + _CAPTION_PADDING_PX),
            caption,
            fill=(255, 255, 255),
            font=font,
        )
    return canvas
