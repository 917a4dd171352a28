"""Specification of VSCochleaSegLib.overlay: the three-panel quick-look PNG."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from VSCochleaSegLib import labels as label_values
from VSCochleaSegLib.errors import OutputExistsError
from VSCochleaSegLib.overlay import GAP_PX, PANEL_SIZE_PX, render_overlay_png


def scan(size_ijk=(40, 36, 12), spacing=(0.5, 0.5, 1.5)) -> sitk.Image:
    """A smooth grey volume (a bright ball on a darker background) with anisotropic spacing."""
    k, j, i = np.indices(size_ijk[::-1], dtype=np.float32)
    centre = [(s - 1) / 2 for s in size_ijk[::-1]]
    r2 = (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2
    img = sitk.GetImageFromArray(100 + 400 * np.exp(-r2 / 60).astype(np.float32))
    img.SetSpacing(spacing)
    return img


def label_map_like(img: sitk.Image, fill: int = 0) -> sitk.Image:
    labels = sitk.Image(img.GetSize(), sitk.sitkUInt8) + fill
    labels.CopyInformation(img)
    return labels


def with_vs_and_cochlea(img: sitk.Image) -> sitk.Image:
    values = np.zeros(img.GetSize()[::-1], dtype=np.uint8)  # (k, j, i)
    values[4:8, 10:20, 8:18] = label_values.VS
    values[5:7, 12:15, 26:29] = label_values.COCHLEA
    labels = sitk.GetImageFromArray(values)
    labels.CopyInformation(img)
    return labels


def is_grey(rgb: np.ndarray) -> np.ndarray:
    """(h, w, 3) → (h, w) bool: the pixel has R == G == B."""
    return (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])


def test_writes_a_png_with_three_panels_side_by_side(tmp_path):
    img = scan()
    out = render_overlay_png(img, with_vs_and_cochlea(img), tmp_path / "case.png")
    with Image.open(out) as png:
        assert png.format == "PNG"
        png.verify()
    with Image.open(out) as png:
        assert png.width > png.height


def test_labels_are_drawn_in_colour(tmp_path):
    img = scan()
    out = render_overlay_png(img, with_vs_and_cochlea(img), tmp_path / "case.png")
    rgb = np.asarray(Image.open(out).convert("RGB"))
    vs_colour = tuple(round(c * 255) for c in label_values.COLOURS[label_values.VS])
    assert (~is_grey(rgb)).any()
    assert (rgb == vs_colour).all(axis=2).any()  # the VS outline, in full colour


def test_empty_label_map_gives_a_grey_picture(tmp_path):
    img = scan()
    out = render_overlay_png(img, label_map_like(img), tmp_path / "case.png")
    rgb = np.asarray(Image.open(out).convert("RGB"))
    assert rgb.shape[1] > rgb.shape[0]
    assert is_grey(rgb).all()


def test_panels_have_square_pixels_in_mm(tmp_path):
    # 20 mm × 20 mm × 10 mm: the axial panel is 20×20 mm, coronal and sagittal are 20 mm wide, 10 mm tall.
    img = scan(size_ijk=(40, 40, 5), spacing=(0.5, 0.5, 2.0))
    out = render_overlay_png(img, label_map_like(img, fill=label_values.VS), tmp_path / "case.png")
    rgb = np.asarray(Image.open(out).convert("RGB"))
    assert rgb.shape[:2] == (PANEL_SIZE_PX, 3 * PANEL_SIZE_PX + 2 * GAP_PX)
    coronal = rgb[:, PANEL_SIZE_PX + GAP_PX : 2 * PANEL_SIZE_PX + GAP_PX]
    drawn_rows = np.flatnonzero(coronal.any(axis=(1, 2)))
    assert len(drawn_rows) == PANEL_SIZE_PX // 2


def test_measurements_add_a_caption_row(tmp_path):
    img = scan()
    labels = with_vs_and_cochlea(img)
    plain = render_overlay_png(img, labels, tmp_path / "plain.png")
    captioned = render_overlay_png(
        img, labels, tmp_path / "captioned.png",
        measurements={"vs_volume_ml": 1.234, "vs_side": "left"},
    )
    with Image.open(plain) as a, Image.open(captioned) as b:
        assert b.width == a.width
        assert b.height > a.height


def test_existing_png_is_not_overwritten_by_default(tmp_path):
    img = scan()
    target = tmp_path / "case.png"
    target.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        render_overlay_png(img, label_map_like(img), target)
    render_overlay_png(img, label_map_like(img), target, overwrite=True)
    with Image.open(target) as png:
        assert png.format == "PNG"


def test_label_map_of_another_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="size"):
        render_overlay_png(scan(), label_map_like(scan(size_ijk=(8, 8, 8))), tmp_path / "case.png")
