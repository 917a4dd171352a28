"""Read input scans and write outputs safely.

This module is the engine's only door to the file system for images. Reading turns whatever the
user points at — an image file SimpleITK understands (NIfTI, NRRD, MetaImage, ...) or a folder holding
one DICOM series — into a 3D scalar ``sitk.Image`` of ``sitkFloat32`` with its geometry (origin,
spacing, direction; oblique allowed, all in LPS millimetres as SimpleITK reports them) untouched, or
raises :class:`~VSCochleaSegLib.errors.InputError` with a message that says what is wrong and what to
do. Writing goes through one atomic mechanism (:func:`atomic_output`): a hidden temporary file in the
target folder, fsync, then ``os.replace``, so a crash or a full disk never leaves a half-written
output under the real name, and an existing output is only replaced when the caller asks.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import re
import secrets
import zlib
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputExistsError

PathLike = Union[str, "os.PathLike[str]"]

# Extensions stripped by case_stem and kept at the end of temporary names (so SimpleITK picks the
# writer from them). Longest first, so ".nii.gz" wins over ".gz".
KNOWN_EXTENSIONS: tuple[str, ...] = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm",
)

# Formats that write a header plus a separate data file named inside the header: renaming the header
# after writing would leave it pointing at the temporary data file, so they cannot be written atomically.
_TWO_FILE_EXTENSIONS: tuple[str, ...] = (".nhdr", ".mhd", ".hdr", ".img")

# Clinical MRI voxels are 0.2–6 mm; above 10 mm the header is almost surely in cm/m or broken.
MAX_SPACING_MM = 10.0

# The largest clinical 3D MRI is ~10^8 voxels (768 × 768 × 400); a header claiming more than 2^30 is
# damaged or not one MRI volume, and ITK would try to allocate it before noticing the file is short.
MAX_VOXELS = 2**30

# DICOM stores direction cosines with ~6 decimals and NIfTI quaternions lose a little more, so an
# honest rotation matrix can be off by ~1e-5; a shear or scaling in the matrix is far above 1e-3.
_ORTHONORMAL_TOLERANCE = 1e-3

# Streaming chunk for the gzip completeness check (bytes); bounded memory for any file size.
_GZIP_CHUNK_BYTES = 1 << 22

# A MetaImage text header is a few hundred bytes; 64 KiB leaves room for long metadata.
_METAIMAGE_HEADER_BYTES = 1 << 16


# --------------------------------------------------------------------------------------- reading


def read_image(path: PathLike) -> sitk.Image:
    """Read a 3D scan from an image file or a DICOM series folder.

    Args:
        path: an image file SimpleITK can read (``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``,
            ``.mha``/``.mhd``, a single-file DICOM volume, ...) or a folder holding exactly one
            DICOM series.

    Returns:
        A 3D scalar image of pixel type ``sitkFloat32``; size (i, j, k) as SimpleITK reports it
        (the numpy view is (k, j, i)). Origin, spacing (mm) and direction (LPS, possibly oblique)
        are those of the file. A 4D image whose 4th size is 1 is returned as its 3D volume.

    Raises:
        InputError: the path does not exist, holds no or several DICOM series, cannot be read
            (unknown format, damaged or truncated), or fails :func:`validate_image`.
    """
    p = Path(path)
    source = p.name or str(p)
    if not p.exists():
        raise InputError(
            f"Input '{p}' does not exist. Check the path (and that the drive is mounted)."
        )
    img = _read_dicom_folder(p) if p.is_dir() else _read_file(p)
    img = _squeeze_singleton_fourth_dimension(img)
    validate_image(img, source)
    return sitk.Cast(img, sitk.sitkFloat32)


def _read_file(p: Path) -> sitk.Image:
    """Read one image file; turn SimpleITK's RuntimeError into an InputError naming the file."""
    _check_metaimage_header(p)
    info = read_image_information(p)
    if info is not None and math.prod(info[0]) > MAX_VOXELS:
        raise InputError(
            f"'{p.name}' claims {' × '.join(map(str, info[0]))} voxels in its header, far more than any MRI "
            "scan; the header is damaged or this is not a single MRI volume. Copy or export the scan again."
        )
    if _is_single_file_nifti(p):
        # Before ITK reads: its NIfTI reader allocates what the header claims and silently zero-fills
        # missing data, so a cut download would read "fine" (and a damaged header could claim gigabytes).
        _check_nifti_complete(p)
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError as err:
        if "spacing" in str(err).lower():
            raise InputError(
                f"'{p.name}' has an invalid voxel spacing in its header (zero, negative or not a "
                "number). Fix the header or re-export the scan from the scanner/PACS."
            ) from err
        raise InputError(
            f"Could not read '{p.name}': SimpleITK does not recognise it as an image, or the file "
            "is damaged or truncated. Copy the file again, check that it opens in a viewer, or "
            "convert it to NIfTI (.nii.gz)."
        ) from err
    return img


def _check_metaimage_header(p: Path) -> None:
    """Refuse a MetaImage (.mha/.mhd) whose NDims is not a small integer, before ITK parses it.

    ITK's MetaIO reader crashes the process (segmentation fault) on e.g. ``NDims = -1`` or
    ``NDims = 1000`` (found by Testing/test_fuzz.py), so such headers must never reach it.
    """
    if not p.name.lower().endswith((".mha", ".mhd")):
        return
    try:
        with open(p, "rb") as f:
            head = f.read(_METAIMAGE_HEADER_BYTES).decode("latin-1")
    except OSError:
        return  # unreadable: SimpleITK reports it
    for line in head.splitlines():
        key, eq, value = line.partition("=")
        key = key.strip().lower()
        if key == "elementdatafile":  # the header ends here; binary voxel data may follow
            break
        if eq and key == "ndims" and not re.fullmatch(r"\s*[1-9]\s*", value):
            raise InputError(
                f"'{p.name}' has a damaged MetaImage header (NDims = {value.strip()[:20]!r}; a 3D scan "
                "has NDims = 3). Copy the file again or re-export the scan."
            )


def read_image_information(path: PathLike) -> Optional[tuple]:
    """(size (i, j, ...), spacing mm, direction) from an image file's header, without reading its voxels.

    Lets callers estimate memory before reading a huge scan. Returns None for folders (DICOM
    series) and for files whose header SimpleITK cannot read (:func:`read_image` then reports why).
    """
    p = Path(path)
    if not p.is_file():
        return None
    try:
        _check_metaimage_header(p)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
    except (InputError, RuntimeError):
        return None
    return tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetDirection())


def _is_single_file_nifti(p: Path) -> bool:
    name = p.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _check_nifti_complete(p: Path) -> None:
    """Raise InputError if a .nii/.nii.gz file holds fewer data bytes than its header promises."""
    import nibabel  # local: only this check needs it

    try:
        header = nibabel.load(str(p)).header
        expected = int(header.get_data_offset()) + int(
            np.prod(header.get_data_shape(), dtype=np.int64)
        ) * header.get_data_dtype().itemsize
    except Exception:  # nibabel disagrees with ITK about the header: ITK's read stands
        return
    if p.name.lower().endswith(".gz"):
        try:
            available = _gzip_uncompressed_size(p)
        except (EOFError, OSError, zlib.error) as err:
            raise InputError(
                f"'{p.name}' is truncated or damaged (its gzip stream does not end properly). "
                "Copy or download the file again."
            ) from err
    else:
        available = p.stat().st_size
    if available < expected:
        raise InputError(
            f"'{p.name}' is truncated: the header promises {expected} bytes but the file holds "
            f"{available}. Copy or download the file again."
        )


def _gzip_uncompressed_size(p: Path) -> int:
    """Decompress a gzip file as a stream and count its bytes; raises EOFError if it is cut."""
    total = 0
    with gzip.open(p, "rb") as f:
        while chunk := f.read(_GZIP_CHUNK_BYTES):
            total += len(chunk)
    return total


def _read_dicom_folder(folder: Path) -> sitk.Image:
    """Read the single DICOM series in ``folder`` (not recursive)."""
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError:
        series_ids = ()
    if not series_ids:
        raise InputError(
            f"Folder '{folder.name}' holds no DICOM series. Pass a folder that directly holds the "
            "DICOM files of one series, or an image file (.nii.gz, .nrrd, .mha)."
        )
    if len(series_ids) > 1:
        listing = "\n  ".join(series_ids)
        raise InputError(
            f"Folder '{folder.name}' holds {len(series_ids)} DICOM series:\n  {listing}\n"
            "Put the hrT2 series in a folder of its own and pass that folder."
        )
    file_names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(file_names)
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise InputError(
            f"Could not read the DICOM series in '{folder.name}': a file is damaged, missing or "
            "not an image slice. Export the series again from the scanner/PACS."
        ) from err


def _squeeze_singleton_fourth_dimension(img: sitk.Image) -> sitk.Image:
    """Return the 3D volume of a 4D image whose 4th size is 1; any other image unchanged."""
    if img.GetDimension() != 4 or img.GetSize()[3] != 1:
        return img
    extractor = sitk.ExtractImageFilter()
    extractor.SetSize(list(img.GetSize()[:3]) + [0])  # size 0 drops that axis
    extractor.SetIndex([0, 0, 0, 0])
    # The spatial 3x3 block of a 4D direction is the 3D direction; keep it exactly (no guessing).
    extractor.SetDirectionCollapseToStrategy(sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
    return extractor.Execute(img)


# ------------------------------------------------------------------------------------ validation


def validate_image(img: sitk.Image, source: str) -> None:
    """Check that an image is a usable 3D scalar scan; raise InputError naming the first problem.

    Checks, in order: 3D (not 2D, not a single slice, not 4D), one component per voxel (not
    vector/RGB/complex), no size 0, spacing finite and in (0, ``MAX_SPACING_MM``] mm, direction
    matrix orthonormal (rotations, oblique and left-handed allowed; shear or scaling not), voxels
    finite (no NaN/Inf), and not constant.

    Args:
        img: any SimpleITK image (any pixel type); not modified.
        source: how to name the image in messages, e.g. the file name.

    Raises:
        InputError: with a message saying what is wrong and what the user can do.
    """
    _check_shape(img, source)
    _check_spacing(img.GetSpacing(), source)
    _check_direction(img.GetDirection(), source)
    _check_values(img, source)


def _check_shape(img: sitk.Image, source: str) -> None:
    dim, size = img.GetDimension(), img.GetSize()
    if dim == 2 or (dim == 3 and 1 in size):
        raise InputError(
            f"'{source}' is a 2D image (size {size}); a 3D volume is needed. If it is one file of a "
            "DICOM series, pass the folder holding the whole series."
        )
    if dim != 3:
        raise InputError(
            f"'{source}' is a {dim}D image (size {size}); a single 3D volume is needed. "
            "Extract the hrT2 volume (e.g. one time point) and save it as its own file."
        )
    if img.GetNumberOfComponentsPerPixel() != 1 or "complex" in img.GetPixelIDTypeAsString():
        raise InputError(
            f"'{source}' has {img.GetNumberOfComponentsPerPixel()} components per voxel "
            f"({img.GetPixelIDTypeAsString()}); a scalar (grey-level) image is needed, not a "
            "vector, RGB or complex one. Save the grey-level hrT2 magnitude image instead."
        )
    if 0 in size:
        raise InputError(f"'{source}' is empty (size {size}). Check the export of the scan.")


def _check_spacing(spacing: Sequence[float], source: str) -> None:
    if not all(math.isfinite(s) and 0.0 < s <= MAX_SPACING_MM for s in spacing):
        raise InputError(
            f"'{source}' has an implausible voxel spacing {tuple(spacing)} mm (expected finite "
            f"values in (0, {MAX_SPACING_MM:g}] mm). Fix the header: it may be in cm or m, or broken."
        )


def _check_direction(direction: Sequence[float], source: str) -> None:
    n = int(round(math.sqrt(len(direction))))
    d = np.asarray(direction, dtype=np.float64).reshape(n, n)
    if not np.all(np.isfinite(d)) or not np.allclose(
        d @ d.T, np.eye(n), atol=_ORTHONORMAL_TOLERANCE
    ):
        raise InputError(
            f"'{source}' has a direction matrix that is not orthonormal (it contains shear or "
            "scaling), so its voxels have no well-defined physical position. Re-export the scan, "
            "or fix the header's direction/space directions."
        )


def _check_values(img: sitk.Image, source: str) -> None:
    voxels = sitk.GetArrayViewFromImage(img)  # (k, j, i), no copy
    if np.issubdtype(voxels.dtype, np.floating) and not np.all(np.isfinite(voxels)):
        n_bad = int(np.count_nonzero(~np.isfinite(voxels)))
        raise InputError(
            f"'{source}' has {n_bad} voxels that are NaN or Inf (not a number). Re-export the scan; "
            "such values usually come from a failed conversion or registration."
        )
    if voxels.min() == voxels.max():
        raise InputError(
            f"'{source}' is a constant image (every voxel is {voxels.flat[0]}). Check that the "
            "right series was exported; a blank scan cannot be segmented."
        )


# ----------------------------------------------------------------------------------------- names


def _known_extension(name: str) -> str:
    """The entry of KNOWN_EXTENSIONS that ``name`` ends with (any letter case), or ""."""
    lower = name.lower()
    for ext in KNOWN_EXTENSIONS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[-len(ext):]
    return ""


def _split_extension(name: str) -> tuple[str, str]:
    """Split a file name into (stem, extension), knowing compound extensions such as .nii.gz."""
    ext = _known_extension(name)
    if not ext:
        stem, dot, last = name.rpartition(".")
        ext = "." + last if dot and stem else ""
    return name[: len(name) - len(ext)], ext


def case_stem(path: PathLike) -> str:
    """Output stem for an input: ``case1.nii.gz`` → ``case1``; a DICOM folder → the folder name.

    Known extensions (``KNOWN_EXTENSIONS``: .nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd, .dcm, any
    letter case) are stripped from file names; other names are kept whole, because a dot may
    belong to the case identifier (``sub-01_acq-0.5mm``).
    """
    p = Path(path)
    if p.is_dir():
        return p.resolve().name if p.name in ("", ".", "..") else p.name
    ext = _known_extension(p.name)
    return p.name[: len(p.name) - len(ext)]


# ---------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_output(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to; on success move it onto ``path`` atomically.

    The temporary file lives in the target's folder (so ``os.replace`` is an atomic rename on the
    same file system) and is named ``.<stem>.tmp-<random>.part<ext>`` — hidden, recognisable as
    partial, and ending in the real extension so writers that choose a format by extension
    (SimpleITK) pick the right one. After the body returns, the file is fsynced and renamed; if the
    body raises, the temporary file is removed and the exception propagates. Parent folders are
    created.

    Usage::

        with atomic_output("out/case1_seg.nii.gz", overwrite=False) as tmp:
            sitk.WriteImage(labels, str(tmp), True)

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False (checked before the body runs
            and again before the rename).
    """
    target = Path(path)
    _refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    stem, ext = _split_extension(target.name)
    tmp = target.with_name(f".{stem}.tmp-{secrets.token_hex(6)}.part{ext}")
    try:
        yield tmp
        _fsync_file(tmp)
        _refuse_existing(target, overwrite)
        os.replace(tmp, target)
        _fsync_directory(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def stale_temporaries(path: PathLike) -> List[Path]:
    """Temporary files :func:`atomic_output` left for ``path`` when its process was killed (SIGKILL,
    power loss: no ``finally`` runs). Callers about to write ``path`` again remove them."""
    target = Path(path)
    stem, ext = _split_extension(target.name)
    pattern = re.compile(re.escape(f".{stem}.tmp-") + r"[0-9a-f]{12}" + re.escape(f".part{ext}"))
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if pattern.fullmatch(p.name))


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if not overwrite and target.exists():
        raise OutputExistsError(
            f"Output '{target}' already exists. Pass --overwrite (overwrite=True) to replace it, "
            "or choose another output folder."
        )


def _fsync_file(p: Path) -> None:
    # "r+b": Windows refuses to flush a read-only handle.
    with open(p, "r+b") as f:
        os.fsync(f.fileno())


def _fsync_directory(folder: Path) -> None:
    """Persist the rename itself (POSIX); Windows cannot open folders and needs no such step."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_image_atomic(
    img: sitk.Image, path: PathLike, overwrite: bool = False, use_compression: bool = True
) -> Path:
    """Write an image atomically with SimpleITK; the format follows ``path``'s extension.

    Compression is on by default (label maps shrink ~50×; ``.nii.gz`` is compressed anyway).
    Only single-file formats are accepted (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ...): header +
    data pairs (``.nhdr``, ``.mhd``, ``.hdr``/``.img``) name their data file inside the header and
    cannot be renamed into place.

    Returns:
        The final path.
    Raises:
        OutputExistsError: see :func:`atomic_output`.
        ValueError: a two-file format was asked for.
        RuntimeError: SimpleITK could not write (e.g. unknown extension); nothing is left behind.
    """
    target = Path(path)
    if target.name.lower().endswith(_TWO_FILE_EXTENSIONS):
        raise ValueError(
            f"Cannot write '{target.name}' atomically: header+data formats are not supported. "
            "Use a single-file format such as .nii.gz, .nrrd or .mha."
        )
    with atomic_output(target, overwrite) as tmp:
        sitk.WriteImage(img, str(tmp), use_compression)
    return target


def write_bytes_atomic(data: bytes, path: PathLike, overwrite: bool = False) -> Path:
    """Write raw bytes (e.g. an encoded PNG) atomically; returns the final path."""
    target = Path(path)
    with atomic_output(target, overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return target


def write_json_atomic(obj: Any, path: PathLike, overwrite: bool = False) -> Path:
    """Write ``obj`` as UTF-8 JSON (indent 2, trailing newline) atomically; returns the final path.

    numpy scalars/arrays and paths are converted (``.item()``, ``.tolist()``, ``str``). The JSON is
    strict: NaN or Inf raise ValueError before anything is written, because many readers
    (JavaScript, jq, spreadsheets) reject them — store ``None`` for "not measurable".
    """
    # Serialise before touching the disk so an unserialisable object leaves nothing behind.
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
    return write_bytes_atomic((text + "\n").encode("utf-8"), path, overwrite)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serialisable")
