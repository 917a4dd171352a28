"""Fuzzing the two doors user files come through: the image reader and the model-folder loader.

Random bytes, and valid files with bytes cut, flipped or header fields replaced, must give either a valid
result or a VSCochleaSegError subclass (InputError / ModelError, whose messages are written for users) —
never another exception, and never a crash of the process. Fuzzing found two: MetaImage headers with
``NDims = -1`` or ``NDims = 1000`` crash ITK's reader (segmentation fault; io.py now refuses them before
ITK sees them), and a deeply nested model.json raised RecursionError (now a ModelError). Both are pinned
below as explicit examples.

Derandomised and few examples in the default suite; set VSCOCHLEASEG_FUZZ_EXAMPLES to search longer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from VSCochleaSegLib.errors import InputError, ModelError, VSCochleaSegError
from VSCochleaSegLib.io import read_image
from VSCochleaSegLib.model_folder import load_model_folder

EXAMPLES = int(os.environ.get("VSCOCHLEASEG_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

IMAGE_NAMES = ["scan.nii.gz", "scan.nii", "scan.nrrd", "scan.mha", "scan.nhdr", "scan.mhd", "scan.dcm", "scan.json"]


def assert_read_is_clean(path) -> None:
    """read_image gives a 3D float32 image or a VSCochleaSegError; anything else propagates and fails."""
    try:
        image = read_image(path)
    except VSCochleaSegError:
        return
    assert image.GetDimension() == 3 and image.GetPixelID() == sitk.sitkFloat32


def _valid_image_bytes() -> dict:
    """A small valid image in each single-file format, raw and compressed: {(name, compressed): bytes}."""
    import tempfile

    img = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 100, (5, 6, 7)).astype(np.int16))
    img.SetSpacing((0.5, 0.5, 1.0))
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ("scan.nii.gz", "scan.nii", "scan.nrrd", "scan.mha"):
            for compressed in (False, True):
                path = os.path.join(folder, name)
                sitk.WriteImage(img, path, compressed)
                with open(path, "rb") as f:
                    out[(name, compressed)] = f.read()
    return out


VALID_IMAGES = _valid_image_bytes()
# Header values that break parsers: empty, signs, absurd sizes (never a size that would really be
# allocated: anything ≥ 1e11 voxels is refused from the header), non-numbers, other types and paths.
HEADER_VALUES = ["", "0", "-1", "4", "1e308", "nan", "abc", "99999999999", "18446744073709551615", "double",
                 "(nan,0,0)", "(1e308,1e308,1e308)", "none", "bzip2", "big", "/etc/passwd", "LIST", "=", ":"]
HEADER_TOKENS = ["NDims", "DimSize", "ElementSpacing", "ElementType", "ElementDataFile", "TransformMatrix",
                 "dimension", "sizes", "space directions", "type", "encoding", "endian", "kinds", "space origin",
                 "CompressedData", "ElementNumberOfChannels"]


@st.composite
def mutated_images(draw):
    (name, compressed), data = draw(st.sampled_from(sorted(VALID_IMAGES.items())))
    data = bytearray(data)
    how = draw(st.sampled_from(["cut", "flip", "header"]))
    if how == "cut":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, min(len(data), 400) - 1))] = draw(st.integers(0, 255))
    else:
        text = data.decode("latin-1")
        token = draw(st.sampled_from(HEADER_TOKENS))
        value = draw(st.sampled_from(HEADER_VALUES))
        text = re.sub(rf"(?m)^({re.escape(token)}\s*[=:]).*$", lambda m: f"{m.group(1)} {value}", text, count=1)
        data = bytearray(text.encode("latin-1"))
    return name, bytes(data)


@FUZZ
@given(name=st.sampled_from(IMAGE_NAMES), data=st.binary(max_size=2048))
def test_random_bytes_with_image_names_give_only_clean_errors(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    assert_read_is_clean(path)


@FUZZ
@given(case=mutated_images())
@example(case=("scan.mha", VALID_IMAGES[("scan.mha", False)].replace(b"NDims = 3", b"NDims = -1")))
@example(case=("scan.mha", VALID_IMAGES[("scan.mha", False)].replace(b"NDims = 3", b"NDims = 1000")))
@example(case=("scan.nrrd", VALID_IMAGES[("scan.nrrd", False)].replace(b"sizes: 7 6 5", b"sizes: 99999 99999 99999")))
def test_damaged_image_files_give_a_valid_image_or_a_clean_error(tmp_path, case):
    name, data = case
    path = tmp_path / name
    path.write_bytes(data)
    assert_read_is_clean(path)


def test_metaimage_with_absurd_ndims_is_refused_before_itk_reads_it(tmp_path):
    path = tmp_path / "scan.mha"
    path.write_bytes(VALID_IMAGES[("scan.mha", False)].replace(b"NDims = 3", b"NDims = -1"))
    with pytest.raises(InputError, match=r"damaged MetaImage header \(NDims = '-1'"):
        read_image(path)


def test_header_claiming_more_voxels_than_any_mri_is_refused_before_allocation(tmp_path):
    path = tmp_path / "scan.nrrd"
    path.write_bytes(VALID_IMAGES[("scan.nrrd", False)].replace(b"sizes: 7 6 5", b"sizes: 99999 99999 99999"))
    with pytest.raises(InputError, match="far more than any MRI"):
        read_image(path)


# ------------------------------------------------------------------------------------ model loader

@pytest.fixture(scope="module")
def valid_model_json(tiny_model) -> dict:
    return json.loads((tiny_model.path / "model.json").read_text(encoding="utf-8"))


def copy_model(tiny_model, folder):
    import shutil

    shutil.copytree(tiny_model.path, folder, dirs_exist_ok=True)
    return folder


def assert_load_is_clean(folder) -> None:
    """load_model_folder + every network's weights load, or a ModelError; nothing else."""
    try:
        model = load_model_folder(folder)
        for key in model.spec.weight_entries():
            model.load_weights(key)
    except ModelError:
        return


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10)


def _paths(data, prefix=()):
    """Every (key path) inside a JSON document."""
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, prefix + (i,))


@FUZZ
@given(data=st.binary(max_size=1024))
@example(data=b'{"format_version": 1, "provenance": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
@example(data=b"\xff\xfe\x00 not utf-8")
def test_random_bytes_as_model_json_give_only_model_errors(tiny_model, tmp_path_factory, data):
    folder = copy_model(tiny_model, tmp_path_factory.mktemp("model"))
    (folder / "model.json").write_bytes(data)
    with pytest.raises(ModelError):
        load_model_folder(folder)


@FUZZ
@given(st.data())
def test_model_json_with_a_field_replaced_by_any_json_value_loads_or_gives_a_model_error(
        tiny_model, valid_model_json, tmp_path_factory, data):
    spec = json.loads(json.dumps(valid_model_json))
    path = data.draw(st.sampled_from(list(_paths(spec))[1:]))
    value = data.draw(json_values)
    parent = spec
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    folder = copy_model(tiny_model, tmp_path_factory.mktemp("model"))
    (folder / "model.json").write_text(json.dumps(spec))
    assert_load_is_clean(folder)


@FUZZ
@given(how=st.sampled_from(["random", "cut", "flip"]), data=st.data())
def test_damaged_weight_files_with_a_matching_checksum_give_only_model_errors(
        tiny_model, valid_model_json, tmp_path_factory, how, data):
    """The checksum is updated to match, so the damage reaches the safetensors parser itself."""
    folder = copy_model(tiny_model, tmp_path_factory.mktemp("model"))
    weights = folder / "localiser.safetensors"
    original = bytearray(weights.read_bytes())
    if how == "random":
        damaged = data.draw(st.binary(max_size=512))
    elif how == "cut":
        damaged = bytes(original[: data.draw(st.integers(0, len(original) - 1))])
    else:
        for _ in range(data.draw(st.integers(1, 6))):
            original[data.draw(st.integers(0, min(len(original), 300) - 1))] = data.draw(st.integers(0, 255))
        damaged = bytes(original)
    weights.write_bytes(damaged)
    spec = json.loads(json.dumps(valid_model_json))
    spec["localiser"]["sha256"] = hashlib.sha256(damaged).hexdigest()
    (folder / "model.json").write_text(json.dumps(spec))
    assert_load_is_clean(folder)
