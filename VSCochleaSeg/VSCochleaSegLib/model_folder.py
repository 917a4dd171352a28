"""Model folders: read, verify, write and find trained models (``model.json`` + ``.safetensors``).

A trained model is a folder holding ``model.json`` (everything inference needs: labels, spacing,
normalisation, crop, networks, ensemble members, post-processing, model card) and one safetensors
file per network, each with its sha256 recorded in ``model.json``. This module is the only place
that turns such a folder into typed specs and tensors: it validates ``model.json`` field by field
(errors name the file and the field), refuses a weight file whose checksum differs *before* loading
it, loads weights with safetensors only (never pickle / ``torch.load``, so a model file cannot run
code), writes folders atomically for training's export, and resolves a model name to a folder
(bundled models, extra directories, the user cache, or a registry download into that cache).
The format is specified in ``docs/model_folder.md``.

Usage::

    from VSCochleaSegLib.model_folder import resolve_model
    model = resolve_model(None)                      # the default bundled model, checksums verified
    state = model.load_weights(model.spec.localiser)  # dict[str, torch.Tensor]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .errors import ModelError, OutputExistsError
from .labels import LABEL_NAMES

FORMAT_VERSION = 1
"""The newest ``model.json`` format_version this engine reads."""

MODEL_JSON = "model.json"
DEFAULT_MODEL = "phantom-uda"
LOCALISER_KEY = "localiser"
"""Key of the localiser's state dict in ``write_model_folder`` / ``ModelSpec.weight_entries``."""

EXPECTED_LABELS: Dict[str, int] = {name: value for value, name in LABEL_NAMES.items()}
NORMALISATION_METHODS = ("percentile",)
FUSION_METHODS = ("mean", "cleanlab")

ENV_EXTRA_MODEL_DIRS = "VSCOCHLEASEG_MODELS"
ENV_CACHE_DIR = "VSCOCHLEASEG_CACHE"
ENV_REGISTRY = "VSCOCHLEASEG_REGISTRY"
DOWNLOAD_URL_SCHEMES = ("https", "http", "file")

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Names double as folder names in the cache, so they must not be able to climb out of it.
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HASH_CHUNK_BYTES = 1 << 20
_MIN_LEVELS = 3  # MONAI DynUNet.check_kernel_stride refuses fewer levels
_DOWNLOAD_TIMEOUT_S = 60


# --------------------------------------------------------------------------------------------------
# Typed reading of JSON objects, so every error names the file and the dotted field.
# --------------------------------------------------------------------------------------------------

class _JsonObject:
    """One JSON object with its file (``source``) and dotted field path, for precise errors."""

    def __init__(self, data: Any, source: str, field: str) -> None:
        self.source = source
        self.field = field
        if not isinstance(data, Mapping):
            raise ModelError(f"{source}: {self._where()} must be a JSON object, got {_kind(data)}.")
        self.data = data

    def _where(self, key: Optional[str] = None) -> str:
        path = ".".join(p for p in (self.field, key) if p)
        return f"field '{path}'" if path else "the top level"

    def error(self, key: str, message: str) -> ModelError:
        return ModelError(f"{self.source}: {self._where(key)} {message}")

    def check_keys(self, allowed: Sequence[str]) -> None:
        # Unknown keys are refused: a typo ("in_defualt") would otherwise silently take a default.
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            raise self.error(unknown[0], f"is not part of the format (allowed here: {', '.join(allowed)}).")

    def raw(self, key: str, default: Any = dataclasses.MISSING) -> Any:
        if key in self.data:
            return self.data[key]
        if default is not dataclasses.MISSING:
            return default
        raise self.error(key, "is missing.")

    def child(self, key: str) -> _JsonObject:
        return _JsonObject(self.raw(key), self.source, ".".join(p for p in (self.field, key) if p))

    def text(self, key: str, allow_empty: bool = True) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {_kind(value)}.")
        if not allow_empty and not value.strip():
            raise self.error(key, "must not be empty.")
        return value

    def flag(self, key: str, default: Any = dataclasses.MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_kind(value)}.")
        return value

    def integer(self, key: str, minimum: Optional[int] = None) -> int:
        return _as_int(self.raw(key), minimum, lambda m: self.error(key, m))

    def number(self, key: str, default: Any = dataclasses.MISSING, minimum: Optional[float] = None) -> float:
        return _as_float(self.raw(key, default), minimum, lambda m: self.error(key, m))

    def integers(self, key: str, length: Optional[int] = None, minimum: Optional[int] = None) -> Tuple[int, ...]:
        items = self._list(key, length)
        return tuple(_as_int(v, minimum, lambda m, i=i: self.error(f"{key}[{i}]", m)) for i, v in enumerate(items))

    def numbers(self, key: str, length: Optional[int] = None, minimum: Optional[float] = None) -> Tuple[float, ...]:
        items = self._list(key, length)
        return tuple(_as_float(v, minimum, lambda m, i=i: self.error(f"{key}[{i}]", m)) for i, v in enumerate(items))

    def integer_rows(self, key: str, row_length: int, minimum: int) -> Tuple[Tuple[int, ...], ...]:
        rows = []
        for i, row in enumerate(self._list(key, None)):
            if not isinstance(row, list) or len(row) != row_length:
                raise self.error(f"{key}[{i}]", f"must be a list of {row_length} integers (one per spatial "
                                                f"axis, dims={row_length}), got {json.dumps(row)}.")
            rows.append(tuple(_as_int(v, minimum, lambda m, i=i, j=j: self.error(f"{key}[{i}][{j}]", m))
                              for j, v in enumerate(row)))
        return tuple(rows)

    def children(self, key: str) -> List[_JsonObject]:
        return [_JsonObject(item, self.source, f"{'.'.join(p for p in (self.field, key) if p)}[{i}]")
                for i, item in enumerate(self._list(key, None))]

    def _list(self, key: str, length: Optional[int]) -> list:
        value = self.raw(key)
        if not isinstance(value, list):
            raise self.error(key, f"must be a list, got {_kind(value)}.")
        if length is not None and len(value) != length:
            raise self.error(key, f"must have {length} entries, got {len(value)}.")
        return value


def _kind(value: Any) -> str:
    """A JSON-ish name of ``value``'s type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def _as_int(value: Any, minimum: Optional[int], error) -> int:
    # bool is an int subclass in Python; `true` is never a valid size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"must be an integer, got {_kind(value)}.")
    if minimum is not None and value < minimum:
        raise error(f"must be >= {minimum}, got {value}.")
    return value


def _as_float(value: Any, minimum: Optional[float], error) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"must be a number, got {_kind(value)}.")
    if not math.isfinite(value):
        raise error(f"must be finite, got {value}.")
    if minimum is not None and value < minimum:
        raise error(f"must be >= {minimum}, got {value}.")
    return float(value)


def _check_sha256(obj: _JsonObject, key: str) -> str:
    value = obj.text(key)
    if not _SHA256_RE.fullmatch(value):
        raise obj.error(key, f"must be 64 lower-case hex digits (a sha256), got {value!r}.")
    return value


def _check_weights_file_name(obj: _JsonObject, key: str) -> str:
    # Weight files live directly in the folder; a path could point outside it.
    value = obj.text(key, allow_empty=False)
    if (PurePosixPath(value).name != value or "\\" in value or value.startswith(".")
            or not value.endswith(".safetensors")):
        raise obj.error(key, f"must be a plain file name ending in .safetensors inside the model folder, "
                             f"got {value!r}.")
    return value


class _Spec:
    """Shared ``to_dict``: the dataclass as plain JSON types (tuples become lists)."""

    def to_dict(self) -> Dict[str, Any]:
        return _to_json(dataclasses.asdict(self))  # type: ignore[call-overload]


def _to_json(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _format_json(value: Any, level: int) -> str:
    """Like ``json.dumps(indent=2)``, but lists without objects inside stay on one line."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_format_json(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return "[\n" + ",\n".join(inner + _format_json(v, level + 1) for v in value) + "\n" + pad + "]"
    return json.dumps(value, allow_nan=False)


def _field_names(cls: type) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]


# --------------------------------------------------------------------------------------------------
# The specs mirroring model.json
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NetworkSpec(_Spec):
    """Arguments of MONAI ``DynUNet`` (``monai.networks.nets.DynUNet``, Isensee et al., nnU-Net 2021).

    ``kernel_size``/``strides`` hold one row per resolution level (``len(filters)`` rows), each row
    with ``dims`` entries in network axis order (z, y, x) for 3D, (y, x) for 2D.
    ``upsample_kernel_size`` is ``strides[1:]`` and the norm is instance norm (not stored).
    ``in_channels``: 1 for 3D networks; for 2D networks 1 (one axial slice) or 2k + 1 (2.5D: the slice and
    its k neighbours above and below as channels, lowest z first; see ``inference.slice_context``).
    """

    dims: int
    in_channels: int
    out_channels: int
    filters: Tuple[int, ...]
    kernel_size: Tuple[Tuple[int, ...], ...]
    strides: Tuple[Tuple[int, ...], ...]
    res_block: bool = False

    @property
    def total_stride_zyx(self) -> Tuple[int, ...]:
        """Product of the strides per axis: patch sizes must be multiples of it."""
        return tuple(math.prod(row[axis] for row in self.strides) for axis in range(self.dims))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MODEL_JSON, field: str = "network") -> NetworkSpec:
        obj = _JsonObject(data, source, field)
        obj.check_keys(_field_names(cls))
        dims = obj.integer("dims")
        if dims not in (2, 3):
            raise obj.error("dims", f"must be 2 or 3, got {dims}.")
        filters = obj.integers("filters", minimum=1)
        kernel_size = obj.integer_rows("kernel_size", dims, minimum=1)
        strides = obj.integer_rows("strides", dims, minimum=1)
        if not len(filters) == len(kernel_size) == len(strides):
            raise obj.error("filters", f"has {len(filters)} levels but kernel_size has {len(kernel_size)} and "
                                       f"strides {len(strides)}; they need one entry per resolution level each.")
        if len(filters) < _MIN_LEVELS:
            raise obj.error("filters", f"has {len(filters)} levels; DynUNet needs at least {_MIN_LEVELS}.")
        in_channels = obj.integer("in_channels", minimum=1)
        if dims == 3 and in_channels != 1:
            raise obj.error("in_channels", f"is {in_channels}; a 3D network reads the one hrT2 volume, so it must be 1.")
        if dims == 2 and in_channels % 2 == 0:
            raise obj.error("in_channels", f"is {in_channels}; a 2D network reads 1 axial slice, or an odd number "
                                           f"(2.5D: the slice and the same number of neighbours on each side).")
        return cls(dims=dims, in_channels=in_channels,
                   out_channels=obj.integer("out_channels", minimum=1), filters=filters,
                   kernel_size=kernel_size, strides=strides, res_block=obj.flag("res_block", False))


def _check_patch_size(obj: _JsonObject, network: NetworkSpec) -> Tuple[int, ...]:
    patch = obj.integers("patch_size_zyx", length=network.dims, minimum=1)
    stride = network.total_stride_zyx
    if any(p % s for p, s in zip(patch, stride)):
        raise obj.error("patch_size_zyx", f"{list(patch)} is not a multiple of the network's total stride "
                                          f"{list(stride)} (product of 'network.strides' per axis).")
    return patch


@dataclass(frozen=True)
class LocaliserSpec(_Spec):
    """The coarse network that finds both inner ears on the whole head.

    ``spacing_xyz_mm``: resampling spacing, (x, y, z) LPS order, mm. ``patch_size_zyx``: sliding
    window size in voxels, (z, y, x). ``sha256``: lower-case hex of ``weights`` (filled by export).
    """

    spacing_xyz_mm: Tuple[float, float, float]
    network: NetworkSpec
    patch_size_zyx: Tuple[int, ...]
    weights: str
    sha256: str = ""

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MODEL_JSON, field: str = "localiser") -> LocaliserSpec:
        obj = _JsonObject(data, source, field)
        obj.check_keys(_field_names(cls))
        network = NetworkSpec.from_dict(obj.raw("network"), source=source, field=f"{field}.network")
        if network.out_channels < 2:
            raise obj.error("network.out_channels", f"must be >= 2 (background + ears), got {network.out_channels}.")
        return cls(spacing_xyz_mm=obj.numbers("spacing_xyz_mm", 3, minimum=1e-6),  # type: ignore[arg-type]
                   network=network, patch_size_zyx=_check_patch_size(obj, network),
                   weights=_check_weights_file_name(obj, "weights"), sha256=_check_sha256(obj, "sha256"))


@dataclass(frozen=True)
class CropSpec(_Spec):
    """The per-ear crop fed to the segmentation members.

    ``size_xyz_mm``: crop extent, (x, y, z) LPS, mm. ``medial_offset_mm``: the crop centre is the
    cochlea centre moved this far towards the midline (VS grow medially into the cerebellopontine
    angle). ``mirror_right``: right crops are flipped left-right so every crop looks like a left ear.
    """

    size_xyz_mm: Tuple[float, float, float]
    medial_offset_mm: float
    mirror_right: bool

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MODEL_JSON, field: str = "crop") -> CropSpec:
        obj = _JsonObject(data, source, field)
        obj.check_keys(_field_names(cls))
        return cls(size_xyz_mm=obj.numbers("size_xyz_mm", 3, minimum=1e-6),  # type: ignore[arg-type]
                   medial_offset_mm=obj.number("medial_offset_mm"), mirror_right=obj.flag("mirror_right"))


@dataclass(frozen=True)
class MemberSpec(_Spec):
    """One network of the segmentation ensemble.

    ``patch_size_zyx``: sliding window in voxels, (z, y, x) for 3D or (y, x) for 2D (slices along z).
    ``weight``: its weight in the fusion. ``in_default``: used by the default ("full ensemble")
    quality; the "fast" quality uses the first member only.
    """

    name: str
    network: NetworkSpec
    patch_size_zyx: Tuple[int, ...]
    weights: str
    weight: float = 1.0
    sha256: str = ""
    in_default: bool = True

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MODEL_JSON, field: str = "member") -> MemberSpec:
        obj = _JsonObject(data, source, field)
        obj.check_keys(_field_names(cls))
        network = NetworkSpec.from_dict(obj.raw("network"), source=source, field=f"{field}.network")
        weight = obj.number("weight", default=1.0, minimum=0.0)
        if weight == 0.0:
            raise obj.error("weight", "must be > 0; drop the member or set in_default to false instead.")
        return cls(name=obj.text("name", allow_empty=False), network=network,
                   patch_size_zyx=_check_patch_size(obj, network),
                   weights=_check_weights_file_name(obj, "weights"), weight=weight,
                   sha256=_check_sha256(obj, "sha256"), in_default=obj.flag("in_default", True))


WeightEntry = Union[LocaliserSpec, MemberSpec]


@dataclass(frozen=True)
class SegmentationSpec(_Spec):
    """The ensemble that labels each ear crop. ``spacing_xyz_mm``: (x, y, z) LPS, mm."""

    spacing_xyz_mm: Tuple[float, float, float]
    fusion: str
    members: Tuple[MemberSpec, ...]

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MODEL_JSON, field: str = "segmentation") -> SegmentationSpec:
        obj = _JsonObject(data, source, field)
        obj.check_keys(_field_names(cls))
        fusion = obj.text("fusion")
        if fusion not in FUSION_METHODS:
            raise obj.error("fusion", f"must be one of {', '.join(FUSION_METHODS)}, got {fusion!r}.")
        members = tuple(MemberSpec.from_dict(m.data, source=source, field=m.field) for m in obj.children("members"))
        if not members:
            raise obj.error("members", "is empty; a model needs at least one segmentation member.")
        names = [m.name for m in members]
        duplicate = next((n for n in names if names.count(n) > 1 or n == LOCALISER_KEY), None)
        if duplicate is not None:
            raise obj.error("members", f"uses the name {duplicate!r} twice or reserves it for the localiser; "
                                       f"member names must be unique and not {LOCALISER_KEY!r}.")
        if not any(m.in_default for m in members):
            raise obj.error("members", "has no member with in_default true; the default quality would be empty.")
        return cls(spacing_xyz_mm=obj.numbers("spacing_xyz_mm", 3, minimum=1e-6),  # type: ignore[arg-type]
                   fusion=fusion, members=members)


@dataclass(frozen=True)
class NormalisationSpec(_Spec):
    """Intensity normalisation of the hrT2 scan before every network.

    ``percentile``: clip to [lower_percentile, upper_percentile] (in %) of the foreground voxels
    (voxels above ``foreground_threshold_fraction`` × the upper percentile), then rescale.
    """

    method: str
    lower_percentile: float
    upper_percentile: float
    foreground_threshold_fraction: float

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MODEL_JSON, field: str = "normalisation") -> NormalisationSpec:
        obj = _JsonObject(data, source, field)
        obj.check_keys(_field_names(cls))
        method = obj.text("method")
        if method not in NORMALISATION_METHODS:
            raise obj.error("method", f"must be one of {', '.join(NORMALISATION_METHODS)}, got {method!r}.")
        lower = obj.number("lower_percentile", minimum=0.0)
        upper = obj.number("upper_percentile", minimum=0.0)
        if not lower < upper <= 100.0:
            raise obj.error("upper_percentile", f"must satisfy lower < upper <= 100, got {lower} and {upper}.")
        fraction = obj.number("foreground_threshold_fraction", minimum=0.0)
        if fraction >= 1.0:
            raise obj.error("foreground_threshold_fraction", f"must be < 1, got {fraction}.")
        return cls(method=method, lower_percentile=lower, upper_percentile=upper,
                   foreground_threshold_fraction=fraction)


@dataclass(frozen=True)
class PostprocessSpec(_Spec):
    """Clean-up of the fused labels. Distances in mm, volumes in mm³."""

    keep_largest_vs_per_side: bool
    keep_largest_cochlea_per_side: bool
    vs_max_z_distance_from_cochlea_mm: float
    min_vs_volume_mm3: float
    # A VS grows from the vestibular nerve in the internal auditory canal, whose fundus abuts the cochlea: a "VS"
    # component none of whose voxels comes within this distance (3D, mm) of its side's cochlea centre is not one.
    # 0 = no check (optional key; older model folders do not have it).
    vs_max_distance_from_cochlea_mm: float = 0.0
    # A large tumour found without its canal part lies farther from the cochlea than a small one: components of at
    # least vs_large_volume_mm3 (mm³) may come within vs_large_max_distance_mm instead. 0 = off (optional keys).
    vs_large_volume_mm3: float = 0.0
    vs_large_max_distance_mm: float = 0.0
    # The predicted VS is grey like the cerebellum and brainstem it abuts and can leak into them through a thin
    # neck: the VS mask is first opened with a ball of this radius (mm), so necks thinner than the ball and what
    # hangs on them become background before the components are judged. 0 = off (optional key).
    vs_open_mm: float = 0.0
    # Members trained on translated images under-segment: the kept VS is grown by at most this distance (mm) into
    # connected voxels whose intensity lies within the vs_grow_quantiles of its own. 0 = off (optional keys).
    vs_grow_mm: float = 0.0
    vs_grow_quantiles: Tuple[float, float] = (0.1, 0.9)
    # The cochlea is fluid, bright in dark bone on T2: each kept cochlea's edge is moved (by at most this
    # distance, mm, outwards; inwards as far as needed) to the half-way grey between its fluid (this quantile of
    # its own intensities) and the bone around it. 0 = off (optional keys).
    cochlea_refine_mm: float = 0.0
    cochlea_fluid_quantile: float = 0.9
    # On T2 a VS is darker than the CSF around it: voxels within this distance (mm) of each kept VS's edge that
    # are brighter than the half-way grey between the tumour (median of its core) and the CSF (this quantile of
    # a shell around it) are given back to the background, before any growing. 0 = off (optional keys).
    vs_trim_mm: float = 0.0
    vs_csf_quantile: float = 0.9
    # Members trained without hrT2 labels are under-confident on the tumour: a voxel the arg-max gives to the
    # background becomes VS when its fused VS probability reaches this value. 0 = off, arg-max only (optional key).
    vs_min_probability: float = 0.0

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MODEL_JSON, field: str = "postprocess") -> PostprocessSpec:
        obj = _JsonObject(data, source, field)
        obj.check_keys(_field_names(cls))
        spec = cls(keep_largest_vs_per_side=obj.flag("keep_largest_vs_per_side"),
                   keep_largest_cochlea_per_side=obj.flag("keep_largest_cochlea_per_side"),
                   vs_max_z_distance_from_cochlea_mm=obj.number("vs_max_z_distance_from_cochlea_mm", minimum=0.0),
                   min_vs_volume_mm3=obj.number("min_vs_volume_mm3", minimum=0.0),
                   vs_max_distance_from_cochlea_mm=obj.number("vs_max_distance_from_cochlea_mm", default=0.0,
                                                              minimum=0.0),
                   vs_large_volume_mm3=obj.number("vs_large_volume_mm3", default=0.0, minimum=0.0),
                   vs_large_max_distance_mm=obj.number("vs_large_max_distance_mm", default=0.0, minimum=0.0),
                   vs_open_mm=obj.number("vs_open_mm", default=0.0, minimum=0.0),
                   vs_grow_mm=obj.number("vs_grow_mm", default=0.0, minimum=0.0),
                   vs_grow_quantiles=_quantile_pair(obj, "vs_grow_quantiles", cls.vs_grow_quantiles),
                   cochlea_refine_mm=obj.number("cochlea_refine_mm", default=0.0, minimum=0.0),
                   cochlea_fluid_quantile=_quantile(obj, "cochlea_fluid_quantile", cls.cochlea_fluid_quantile),
                   vs_trim_mm=obj.number("vs_trim_mm", default=0.0, minimum=0.0),
                   vs_csf_quantile=_quantile(obj, "vs_csf_quantile", cls.vs_csf_quantile),
                   vs_min_probability=_quantile(obj, "vs_min_probability", cls.vs_min_probability,
                                                       kind="a probability"))
        if spec.vs_large_volume_mm3 > 0 and not (
                0 < spec.vs_max_distance_from_cochlea_mm < spec.vs_large_max_distance_mm):
            raise obj.error("vs_large_max_distance_mm", "must be set, in mm, larger than vs_max_distance_from_cochlea_mm "
                            f"(> 0) when vs_large_volume_mm3 is set; got {spec.vs_large_max_distance_mm} and "
                            f"{spec.vs_max_distance_from_cochlea_mm}.")
        return spec


def _quantile(obj: _JsonObject, key: str, default: float, kind: str = "a quantile") -> float:
    """An optional quantile (or probability: ``kind``), 0 ≤ q ≤ 1."""
    q = obj.number(key, default=default, minimum=0.0)
    if q > 1.0:
        raise obj.error(key, f"must be {kind} between 0 and 1, got {q}.")
    return q


def _quantile_pair(obj: _JsonObject, key: str, default: Tuple[float, float]) -> Tuple[float, float]:
    """An optional [lo, hi] pair of quantiles with 0 ≤ lo < hi ≤ 1."""
    if key not in obj.data:
        return default
    lo, hi = obj.numbers(key, length=2, minimum=0.0)
    if not lo < hi <= 1.0:
        raise obj.error(key, f"must be two quantiles [lo, hi] with 0 ≤ lo < hi ≤ 1, got [{lo}, {hi}].")
    return (lo, hi)


@dataclass(frozen=True)
class ModelSpec(_Spec):
    """Everything in ``model.json``: the model card and all the settings inference needs."""

    name: str
    version: str
    description: str
    labels: Dict[str, int]
    intended_use: str
    limitations: str
    provenance: Dict[str, Any]
    normalisation: NormalisationSpec
    localiser: LocaliserSpec
    crop: CropSpec
    segmentation: SegmentationSpec
    postprocess: PostprocessSpec
    format_version: int = FORMAT_VERSION

    def weight_entries(self) -> Dict[str, WeightEntry]:
        """Every network with a weight file, keyed ``"localiser"`` or by member name (export order)."""
        entries: Dict[str, WeightEntry] = {LOCALISER_KEY: self.localiser}
        entries.update((m.name, m) for m in self.segmentation.members)
        return entries

    def data_seeds(self, with_test: bool = True) -> set:
        """The phantom seeds in ``provenance.data_seeds`` (a {use: seed} dict or a list; none if absent); without
        ``with_test`` the dict's ``test*`` entries are left out (seeds the model was scored on, not trained on)."""
        seeds = self.provenance.get("data_seeds", [])
        if isinstance(seeds, dict):
            return {v for k, v in seeds.items() if with_test or not k.startswith("test")}
        return set(seeds)

    def to_dict(self) -> Dict[str, Any]:
        data = super().to_dict()
        return {"format_version": data.pop("format_version"), **data}  # first, as readers check it first

    def to_json(self) -> str:
        """model.json text: objects indented, lists of numbers kept on one line for reading."""
        return _format_json(self.to_dict(), 0) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str = MODEL_JSON) -> ModelSpec:
        """Validate ``data`` (parsed model.json) into a spec; ``source`` names the file in errors."""
        obj = _JsonObject(data, source, "")
        # The version decides what the rest means, so it is checked before anything else.
        version = obj.raw("format_version", None)
        if version is None:
            raise obj.error("format_version", "is missing; is this a VSCochleaSeg model.json?")
        format_version = obj.integer("format_version", minimum=1)
        if format_version > FORMAT_VERSION:
            raise obj.error("format_version", f"is {format_version}: this model needs a newer VSCochleaSeg "
                                              f"(this one reads format_version {FORMAT_VERSION}). Upgrade "
                                              f"VSCochleaSeg, or use a model exported for this version.")
        obj.check_keys(_field_names(cls))
        labels = obj.raw("labels")
        if labels != EXPECTED_LABELS or not all(type(v) is int for v in labels.values()):
            raise obj.error("labels", f"is {json.dumps(labels)}; this engine needs exactly "
                                      f"{json.dumps(EXPECTED_LABELS)}.")
        provenance = obj.raw("provenance")
        if not isinstance(provenance, dict):
            raise obj.error("provenance", f"must be a JSON object, got {_kind(provenance)}.")
        segmentation = SegmentationSpec.from_dict(obj.raw("segmentation"), source=source)
        for i, member in enumerate(segmentation.members):
            if member.network.out_channels != len(EXPECTED_LABELS):
                raise obj.error(f"segmentation.members[{i}].network.out_channels",
                                f"must be {len(EXPECTED_LABELS)} (one per label), got {member.network.out_channels}.")
        spec = cls(name=obj.text("name", allow_empty=False), version=obj.text("version", allow_empty=False),
                   description=obj.text("description"), labels=dict(labels),
                   intended_use=obj.text("intended_use"), limitations=obj.text("limitations"),
                   provenance=provenance,
                   normalisation=NormalisationSpec.from_dict(obj.raw("normalisation"), source=source),
                   localiser=LocaliserSpec.from_dict(obj.raw("localiser"), source=source),
                   crop=CropSpec.from_dict(obj.raw("crop"), source=source),
                   segmentation=segmentation,
                   postprocess=PostprocessSpec.from_dict(obj.raw("postprocess"), source=source),
                   format_version=format_version)
        files = [entry.weights for entry in spec.weight_entries().values()]
        shared = next((f for f in files if files.count(f) > 1), None)
        if shared is not None:
            raise ModelError(f"{source}: weight file {shared!r} is listed for two networks; each network needs "
                             f"its own file.")
        return spec

    @classmethod
    def from_json_file(cls, path: Union[str, Path]) -> ModelSpec:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(f"{path}: not found; a model folder must contain {MODEL_JSON}.") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ModelError(f"{path}: cannot be read ({error}).") from error
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ModelError(f"{path}: is not valid JSON ({error.msg} at line {error.lineno}, column "
                             f"{error.colno}). The model folder is damaged; re-download or re-export it.") from None
        except RecursionError:  # thousands of nested brackets (found by Testing/test_fuzz.py)
            raise ModelError(f"{path}: is not a model.json (its JSON is nested too deeply to read). The model "
                             f"folder is damaged; re-download or re-export it.") from None
        return cls.from_dict(data, source=str(path))


# --------------------------------------------------------------------------------------------------
# Checksums, loading and writing folders
# --------------------------------------------------------------------------------------------------

def sha256_file(path: Union[str, Path]) -> str:
    """Lower-case hex sha256 of a file, read in 1 MiB chunks (weight files can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelFolder:
    """A model folder on disk: its ``path`` and its validated ``spec``."""

    path: Path
    spec: ModelSpec

    def weights_path(self, entry: WeightEntry) -> Path:
        return self.path / entry.weights

    def verify(self) -> None:
        """Check every weight file exists and matches its recorded sha256 (ModelError otherwise)."""
        for entry in self.spec.weight_entries().values():
            self._verify_entry(entry)

    def load_weights(self, entry: Union[WeightEntry, str]) -> Dict[str, torch.Tensor]:
        """The state dict of one network (``entry`` or its key: "localiser" or a member name), on CPU.

        The file's checksum is verified right before loading, even if ``verify`` ran earlier, so a
        file changed since is refused; loading uses safetensors, which cannot execute code.
        """
        if isinstance(entry, str):
            entries = self.spec.weight_entries()
            if entry not in entries:
                raise ModelError(f"{self.path / MODEL_JSON}: no network named {entry!r} "
                                 f"(available: {', '.join(entries)}).")
            entry = entries[entry]
        path = self._verify_entry(entry)
        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise ModelError(f"{path}: is not a readable safetensors file ({error}). The model folder is "
                             f"damaged; re-download or re-export it.") from error

    def _verify_entry(self, entry: WeightEntry) -> Path:
        path = self.weights_path(entry)
        if not path.is_file():
            raise ModelError(f"{path}: weight file is missing (listed in {self.path / MODEL_JSON}). The model "
                             f"folder is incomplete; re-download or re-export it.")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise ModelError(f"{path}: checksum mismatch (model.json records sha256 {entry.sha256}, the file "
                             f"has {actual}). The model folder is damaged or was changed; re-download or "
                             f"re-export it.")
        return path


def load_model_folder(path: Union[str, Path], verify: bool = True) -> ModelFolder:
    """Read and validate ``<path>/model.json``; with ``verify``, check every weight checksum now,
    so a damaged model is refused before any work starts."""
    folder_path = Path(path).expanduser()
    if not folder_path.is_dir():
        raise ModelError(f"{folder_path}: model folder not found.")
    folder = ModelFolder(path=folder_path.resolve(), spec=ModelSpec.from_json_file(folder_path / MODEL_JSON))
    if verify:
        folder.verify()
    return folder


def write_model_folder(out_dir: Union[str, Path], spec: ModelSpec,
                       state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
                       overwrite: bool = False) -> ModelFolder:
    """Export a trained model: one safetensors file per network, their sha256s, and model.json.

    ``state_dicts`` is keyed like ``spec.weight_entries()``: ``"localiser"`` and each member's name;
    the ``sha256`` fields of ``spec`` are ignored and filled in. The folder is built in a temporary
    sibling and renamed into place, so readers never see a half-written model. An existing
    ``out_dir`` is refused (OutputExistsError) unless ``overwrite``. Returns the written folder
    (spec with the checksums).
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"{out_dir}: already exists; pass overwrite=True to replace it.")
    entries = spec.weight_entries()
    if set(state_dicts) != set(entries):
        raise ModelError(f"{out_dir}: state_dicts has keys {sorted(state_dicts)} but the spec's networks are "
                         f"{sorted(entries)}; give exactly one state dict per network.")
    # Validate with placeholder checksums before writing (possibly large) files that would be refused.
    _with_checksums(spec, {key: "0" * 64 for key in entries}, out_dir / MODEL_JSON)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        hashes = {}
        for key, entry in entries.items():
            # clone(): safetensors refuses tensors that share storage, and state dicts may alias.
            tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state_dicts[key].items()}
            save_file(tensors, str(build_dir / entry.weights), metadata={"format": "pt"})
            os.chmod(build_dir / entry.weights, 0o644)  # readable by every user of a shared installation
            hashes[key] = sha256_file(build_dir / entry.weights)
        spec = _with_checksums(spec, hashes, out_dir / MODEL_JSON)
        (build_dir / MODEL_JSON).write_text(spec.to_json(), encoding="utf-8")
        os.chmod(build_dir, 0o755)  # mkdtemp makes it owner-only
        _publish_dir(build_dir, out_dir)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)
    return ModelFolder(path=out_dir, spec=spec)


def _with_checksums(spec: ModelSpec, hashes: Mapping[str, str], json_path: Path) -> ModelSpec:
    """``spec`` with ``hashes`` (keyed like ``weight_entries``) filled in, validated by a round trip
    through the reader, so an export can never produce a folder the engine would refuse."""
    spec = dataclasses.replace(
        spec,
        localiser=dataclasses.replace(spec.localiser, sha256=hashes[LOCALISER_KEY]),
        segmentation=dataclasses.replace(spec.segmentation, members=tuple(
            dataclasses.replace(m, sha256=hashes[m.name]) for m in spec.segmentation.members)))
    try:
        text = spec.to_json()
    except (TypeError, ValueError) as error:
        raise ModelError(f"{json_path}: the spec is not JSON-serialisable ({error}); check provenance.") from error
    ModelSpec.from_dict(json.loads(text), source=str(json_path))
    return spec


def _publish_dir(source: Path, target: Path) -> None:
    """Move the finished folder ``source`` to ``target`` (same filesystem), replacing ``target``.

    A directory rename cannot replace a non-empty directory, so an old ``target`` is first renamed
    aside and deleted afterwards; ``target`` is missing only between two renames.
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
    os.replace(source, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Registry: names → folders (bundled, extra dirs, user cache, downloads)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RegistryEntry:
    """One model in ``registry.json``: bundled with the code, or downloadable as a zip."""

    name: str
    bundled: bool = False
    url: Optional[str] = None
    sha256: Optional[str] = None
    version: str = ""
    description: str = ""


@dataclass(frozen=True)
class Registry:
    """``registry.json``: ``{"default": NAME, "models": {NAME: {"bundled": true} | {"url", "sha256", ...}}}``."""

    default: str
    models: Dict[str, RegistryEntry]

    @classmethod
    def from_json_file(cls, path: Path) -> Registry:
        """Read a registry file; a missing file is an empty registry (e.g. a pip install without Resources)."""
        if not path.is_file():
            return cls(default=DEFAULT_MODEL, models={})
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise ModelError(f"{path}: the model registry cannot be read ({error}).") from error
        obj = _JsonObject(data, str(path), "")
        obj.check_keys(["default", "models"])
        default = obj.text("default", allow_empty=False) if "default" in obj.data else DEFAULT_MODEL
        models_obj = obj.child("models")
        models = {}
        for name in models_obj.data:
            if not _MODEL_NAME_RE.fullmatch(name):
                raise models_obj.error(name, "is not a valid model name (letters, digits, '.', '_', '-').")
            item = models_obj.child(name)
            item.check_keys(_field_names(RegistryEntry)[1:])
            entry = RegistryEntry(name=name, bundled=item.flag("bundled", False),
                                  url=item.text("url") if "url" in item.data else None,
                                  sha256=_check_sha256(item, "sha256") if "sha256" in item.data else None,
                                  version=item.text("version") if "version" in item.data else "",
                                  description=item.text("description") if "description" in item.data else "")
            if not entry.bundled:
                if entry.url is None or entry.sha256 is None:
                    raise item.error("url", "and 'sha256' are both needed for a model that is not bundled.")
                scheme = urllib.parse.urlsplit(entry.url).scheme
                if scheme not in DOWNLOAD_URL_SCHEMES:
                    raise item.error("url", f"must use {', '.join(DOWNLOAD_URL_SCHEMES)}, got {entry.url!r}.")
            models[name] = entry
        return cls(default=default, models=models)


def bundled_models_dir() -> Path:
    """``<repo>/Resources/Models``: the models shipped with the code (and ``registry.json``)."""
    return Path(__file__).resolve().parents[2] / "Resources" / "Models"


def default_registry_path() -> Path:
    """``$VSCOCHLEASEG_REGISTRY`` if set, else ``Resources/Models/registry.json``."""
    override = os.environ.get(ENV_REGISTRY)
    return Path(override).expanduser() if override else bundled_models_dir() / "registry.json"


def cache_dir() -> Path:
    """The user's model cache, one sub-folder per model: ``$VSCOCHLEASEG_CACHE`` or
    ``~/.cache/vscochleaseg/models``."""
    override = os.environ.get(ENV_CACHE_DIR)
    return Path(override).expanduser() if override else Path.home() / ".cache" / "vscochleaseg" / "models"


def model_search_dirs() -> List[Tuple[str, Path]]:
    """Where names are looked up, first match wins: (kind, directory) for ``$VSCOCHLEASEG_MODELS``
    entries ("extra"; explicit user choice beats the bundled copy), then "bundled", then "cache"."""
    extra = [Path(p).expanduser() for p in os.environ.get(ENV_EXTRA_MODEL_DIRS, "").split(os.pathsep) if p]
    return [("extra", d) for d in extra] + [("bundled", bundled_models_dir()), ("cache", cache_dir())]


def _find_local(name: str) -> Optional[Tuple[str, Path]]:
    for kind, directory in model_search_dirs():
        if (directory / name / MODEL_JSON).is_file():
            return kind, directory / name
    return None


def resolve_model(name_or_path: Optional[str] = None, *, registry_path: Union[str, Path, None] = None,
                  verify: bool = True, progress: bool = True) -> ModelFolder:
    """Find a model and load it (weight checksums verified unless ``verify`` is False).

    ``name_or_path``: a folder holding model.json (used as is), a model name (looked up in
    ``model_search_dirs()``, else downloaded into ``cache_dir()`` if the registry has a URL for it),
    or None for the registry's default (``DEFAULT_MODEL``). ``registry_path`` overrides
    ``default_registry_path()``. ``progress`` shows a tqdm bar while downloading.
    """
    registry = Registry.from_json_file(Path(registry_path) if registry_path else default_registry_path())
    if name_or_path is None:
        name_or_path = registry.default
    else:
        candidate = Path(name_or_path).expanduser()
        if (candidate / MODEL_JSON).is_file():
            return load_model_folder(candidate, verify=verify)
    if not _MODEL_NAME_RE.fullmatch(name_or_path):
        candidate = Path(name_or_path).expanduser()
        reason = "holds no model.json" if candidate.is_dir() else "does not exist"
        raise ModelError(f"{candidate}: {reason}; give a model folder (containing {MODEL_JSON}) or a model name "
                         f"({', '.join(_available_names(registry)) or 'none installed'}).")
    found = _find_local(name_or_path)
    if found is not None:
        return load_model_folder(found[1], verify=verify)
    entry = registry.models.get(name_or_path)
    if entry is not None and entry.url is not None:
        return load_model_folder(_download_model(entry, cache_dir(), progress), verify=verify)
    if entry is not None and entry.bundled:
        raise ModelError(f"model {name_or_path!r} should be bundled in {bundled_models_dir()} but is missing; "
                         f"reinstall VSCochleaSeg.")
    raise ModelError(f"unknown model {name_or_path!r}. Available: "
                     f"{', '.join(_available_names(registry)) or 'none'}. A path to a model folder (containing "
                     f"{MODEL_JSON}) is also accepted.")


def _local_models() -> List[Tuple[str, Path]]:
    """(kind, folder) of every model folder on disk, in lookup order, first of each name only."""
    seen, found = set(), []
    for kind, directory in model_search_dirs():
        if not directory.is_dir():
            continue
        for folder in sorted(directory.iterdir()):
            if folder.name not in seen and (folder / MODEL_JSON).is_file():
                seen.add(folder.name)
                found.append((kind, folder))
    return found


def _available_names(registry: Registry) -> List[str]:
    local = [folder.name for _, folder in _local_models()]
    return local + [n for n, e in registry.models.items() if e.url is not None and n not in local]


def list_models(registry_path: Union[str, Path, None] = None) -> List[Dict[str, Any]]:
    """One dict per model for ``vscochleaseg models``: name, version, where (folder or URL),
    description, source ("extra" | "bundled" | "cache" | "download" | "missing"), default (bool).
    Local folders are read without checking weights; an unreadable one is listed with its error."""
    registry = Registry.from_json_file(Path(registry_path) if registry_path else default_registry_path())
    rows = []
    for kind, folder in _local_models():
        try:
            spec = ModelSpec.from_json_file(folder / MODEL_JSON)
            version, description = spec.version, spec.description
        except ModelError as error:
            version, description = "?", f"unreadable: {error}"
        rows.append({"name": folder.name, "version": version, "where": str(folder),
                     "description": description, "source": kind})
    listed = {row["name"] for row in rows}
    for name, entry in registry.models.items():
        if name in listed:
            continue
        rows.append({"name": name, "version": entry.version, "where": entry.url or str(bundled_models_dir() / name),
                     "description": entry.description, "source": "download" if entry.url else "missing"})
    for row in rows:
        row["default"] = row["name"] == registry.default
    return rows


# --------------------------------------------------------------------------------------------------
# Downloading into the cache
# --------------------------------------------------------------------------------------------------

def _download_model(entry: RegistryEntry, cache_root: Path, progress: bool) -> Path:
    """Fetch ``entry``'s zip, check its sha256, unpack it safely and move it to ``cache_root/<name>``.

    Everything happens in temporary files/folders inside ``cache_root`` (same filesystem, so the
    final rename is atomic) and is removed on any failure: the cache holds whole, verified models or
    nothing. The weight checksums are verified before the rename too.
    """
    assert entry.url is not None and entry.sha256 is not None
    cache_root.mkdir(parents=True, exist_ok=True)
    target = cache_root / entry.name
    fd, zip_name = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".zip.part", dir=cache_root)
    zip_path = Path(zip_name)
    unpack_dir: Optional[Path] = None
    try:
        with os.fdopen(fd, "wb") as stream:
            actual = _fetch(entry.url, stream, f"Downloading {entry.name}", progress)
        if actual != entry.sha256:
            raise ModelError(f"{entry.url}: the downloaded zip has sha256 {actual}, the registry expects "
                             f"{entry.sha256}. The download was damaged or the file changed on the server; "
                             f"try again, or download and unpack it yourself and pass the folder path.")
        unpack_dir = Path(tempfile.mkdtemp(prefix=f".{entry.name}.unpack-", dir=cache_root))
        _safe_unzip(zip_path, unpack_dir, entry.url)
        model_root = _model_root_in(unpack_dir, entry.url)
        load_model_folder(model_root, verify=True)
        if (target / MODEL_JSON).is_file():
            return target  # another process finished the same download first; keep its copy
        _publish_dir(model_root, target)
        return target
    finally:
        zip_path.unlink(missing_ok=True)
        if unpack_dir is not None:
            shutil.rmtree(unpack_dir, ignore_errors=True)


def _fetch(url: str, stream, description: str, progress: bool) -> str:
    """Stream ``url`` into ``stream`` with a progress bar; returns the sha256 of the bytes."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description,
                      disable=not progress, leave=False) as bar:
                for chunk in iter(lambda: response.read(_HASH_CHUNK_BYTES), b""):
                    stream.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise ModelError(f"{url}: download failed ({error}). Check the network connection, or download and "
                         f"unpack the model yourself and pass the folder path.") from error
    return digest.hexdigest()


def _safe_unzip(zip_path: Path, out_dir: Path, origin: str) -> None:
    """Extract ``zip_path`` into ``out_dir`` after refusing any member that would land outside it
    (absolute paths, drive letters, ``..``: the "zip slip" attack)."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for name in archive.namelist():
                parts = name.replace("\\", "/").split("/")
                if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
                    raise ModelError(f"{origin}: the zip contains the unsafe path {name!r} (absolute or with "
                                     f"'..'); refusing to unpack it.")
            archive.extractall(out_dir)
    except zipfile.BadZipFile as error:
        raise ModelError(f"{origin}: is not a valid zip file ({error}).") from error


def _model_root_in(unpack_dir: Path, origin: str) -> Path:
    """The model folder inside an unpacked zip: its root, or its single top-level folder."""
    if (unpack_dir / MODEL_JSON).is_file():
        return unpack_dir
    subdirs = [p for p in unpack_dir.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / MODEL_JSON).is_file():
        return subdirs[0]
    raise ModelError(f"{origin}: the zip holds no model folder ({MODEL_JSON} at its root or in its single "
                     f"top-level folder).")
