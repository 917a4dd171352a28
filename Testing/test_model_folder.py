"""Specification of model folders (docs/model_folder.md): validation, checksums, safe loading,
atomic export, and name resolution (bundled / extra dirs / cache / download from a registry)."""

from __future__ import annotations

import copy
import functools
import hashlib
import http.server
import json
import os
import threading
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch

from VSCochleaSegLib import model_folder as mf
from VSCochleaSegLib.errors import ModelError, OutputExistsError
from VSCochleaSegLib.model_folder import (
    CropSpec, LocaliserSpec, MemberSpec, ModelSpec, NetworkSpec, NormalisationSpec, PostprocessSpec,
    SegmentationSpec, list_models, load_model_folder, resolve_model, sha256_file, write_model_folder)


# ---------------------------------------------------------------------------------------------- data

def tiny_network(dims: int = 3) -> NetworkSpec:
    return NetworkSpec(dims=dims, in_channels=1, out_channels=3, filters=(4, 8, 16),
                       kernel_size=((3,) * dims,) * 3, strides=((1,) * dims, (2,) * dims, (2,) * dims))


def tiny_spec(name: str = "tiny") -> ModelSpec:
    return ModelSpec(
        name=name, version="0.0.1", description="a test model", labels={"background": 0, "vs": 1, "cochlea": 2},
        intended_use="tests only", limitations="random weights", provenance={"seed": 0},
        normalisation=NormalisationSpec(method="percentile", lower_percentile=0.5, upper_percentile=99.5,
                                        foreground_threshold_fraction=0.05),
        localiser=LocaliserSpec(spacing_xyz_mm=(2.0, 2.0, 2.0), network=tiny_network(), patch_size_zyx=(8, 16, 16),
                                weights="localiser.safetensors"),
        crop=CropSpec(size_xyz_mm=(56.0, 56.0, 48.0), medial_offset_mm=12.0, mirror_right=True),
        segmentation=SegmentationSpec(spacing_xyz_mm=(0.5, 0.5, 1.0), fusion="mean", members=(
            MemberSpec(name="seg2d_fold0", network=tiny_network(2), patch_size_zyx=(16, 16),
                       weights="seg2d_fold0.safetensors"),)),
        postprocess=PostprocessSpec(keep_largest_vs_per_side=True, keep_largest_cochlea_per_side=True,
                                    vs_max_z_distance_from_cochlea_mm=22.5, min_vs_volume_mm3=0.0))


def tiny_state_dicts() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"localiser": {"conv.weight": torch.randn(4, 1, 3, 3, 3, generator=generator),
                          "conv.bias": torch.arange(4, dtype=torch.float32)},
            "seg2d_fold0": {"conv.weight": torch.randn(4, 1, 3, 3, generator=generator).transpose(0, 1),  # non-contiguous
                            "step": torch.tensor(7)}}


def write_tiny(folder: Path, name: str = "tiny"):
    return write_model_folder(folder, tiny_spec(name), tiny_state_dicts())


def valid_json_dict() -> dict:
    spec = tiny_spec()
    hashes = {"localiser": "a" * 64, "seg2d_fold0": "b" * 64}
    return mf._with_checksums(spec, hashes, Path("model.json")).to_dict()


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path, monkeypatch):
    """Never touch the user's cache or the repository's models; never go through a proxy."""
    monkeypatch.setenv("VSCOCHLEASEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VSCOCHLEASEG_MODELS", raising=False)
    monkeypatch.setenv("VSCOCHLEASEG_REGISTRY", str(tmp_path / "no-registry.json"))
    monkeypatch.setattr(mf, "bundled_models_dir", lambda: tmp_path / "bundled")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


# ------------------------------------------------------------------------------ write / load / verify

def test_round_trip_write_then_load_gives_identical_tensors(tmp_path):
    write_tiny(tmp_path / "model")
    model = load_model_folder(tmp_path / "model")
    for key, expected in tiny_state_dicts().items():
        loaded = model.load_weights(key)
        assert loaded.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype


def test_written_model_json_records_each_files_sha256(tmp_path):
    written = write_tiny(tmp_path / "model")
    on_disk = ModelSpec.from_json_file(tmp_path / "model" / "model.json")
    assert on_disk == written.spec
    assert on_disk.localiser.sha256 == hashlib.sha256((tmp_path / "model/localiser.safetensors").read_bytes()).hexdigest()
    assert on_disk.segmentation.members[0].sha256 == sha256_file(tmp_path / "model/seg2d_fold0.safetensors")


def test_spec_round_trips_through_dict_and_puts_format_version_first():
    data = valid_json_dict()
    assert list(data)[0] == "format_version"
    assert ModelSpec.from_dict(data).to_dict() == data


def test_sha256_file_streams_files_larger_than_one_chunk(tmp_path):
    payload = bytes(range(256)) * 9000  # > 2 MiB: several 1 MiB chunks
    (tmp_path / "blob").write_bytes(payload)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(payload).hexdigest()


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_byte_is_refused_naming_the_file_and_both_hashes(tmp_path):
    written = write_tiny(tmp_path / "model")
    flip_one_byte(tmp_path / "model/seg2d_fold0.safetensors")
    with pytest.raises(ModelError) as refused:
        load_model_folder(tmp_path / "model")
    message = str(refused.value)
    assert "seg2d_fold0.safetensors" in message and "damaged or was changed" in message
    assert written.spec.segmentation.members[0].sha256 in message
    assert sha256_file(tmp_path / "model/seg2d_fold0.safetensors") in message


def test_load_weights_checks_the_checksum_again_right_before_loading(tmp_path):
    write_tiny(tmp_path / "model")
    model = load_model_folder(tmp_path / "model")  # verified now ...
    flip_one_byte(tmp_path / "model/localiser.safetensors")  # ... changed afterwards
    with pytest.raises(ModelError, match="localiser.safetensors.*checksum mismatch"):
        model.load_weights(model.spec.localiser)


def test_missing_weight_file_is_refused(tmp_path):
    write_tiny(tmp_path / "model")
    (tmp_path / "model/localiser.safetensors").unlink()
    with pytest.raises(ModelError, match="localiser.safetensors: weight file is missing"):
        load_model_folder(tmp_path / "model")


def test_loading_never_calls_torch_load(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must never be used for model weights")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    write_tiny(tmp_path / "model")
    model = load_model_folder(tmp_path / "model")
    assert set(model.load_weights("localiser")) == {"conv.weight", "conv.bias"}


def test_write_refuses_to_overwrite_an_existing_folder(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model/keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        write_tiny(tmp_path / "model")
    assert [p.name for p in (tmp_path / "model").iterdir()] == ["keep.txt"]


def test_write_with_overwrite_replaces_the_folder_and_leaves_no_temporaries(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model/old.txt").write_text("old")
    write_model_folder(tmp_path / "model", tiny_spec(), tiny_state_dicts(), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "localiser.safetensors", "model.json", "seg2d_fold0.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_write_needs_exactly_one_state_dict_per_network_and_leaves_nothing(tmp_path):
    state_dicts = tiny_state_dicts()
    del state_dicts["seg2d_fold0"]
    with pytest.raises(ModelError, match="one state dict per network"):
        write_model_folder(tmp_path / "model", tiny_spec(), state_dicts)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ json validation

def write_json(folder: Path, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_malformed_json_is_refused_naming_the_file(tmp_path):
    path = write_json(tmp_path / "model", '{"format_version": 1, "name": ')
    with pytest.raises(ModelError, match="is not valid JSON .*line 1") as refused:
        load_model_folder(tmp_path / "model")
    assert str(path) in str(refused.value)


def test_unknown_label_map_is_refused(tmp_path):
    data = valid_json_dict()
    data["labels"] = {"background": 0, "tumour": 1, "cochlea": 2}
    path = write_json(tmp_path / "model", data)
    with pytest.raises(ModelError) as refused:
        ModelSpec.from_json_file(path)
    assert str(path) in str(refused.value) and "field 'labels'" in str(refused.value)


def test_newer_format_version_asks_for_a_newer_engine():
    data = valid_json_dict()
    data["format_version"] = 2
    data["something_new"] = {}  # a newer format may add fields; the version message must win
    with pytest.raises(ModelError, match="this model needs a newer VSCochleaSeg"):
        ModelSpec.from_dict(data)


def _set(path: str, value):
    """A mutation of the valid dict: set the dotted ``path`` (list indices as numbers) to ``value``."""
    def mutate(data: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for part in parents:
            data = data[part]
        if value is _DELETE:
            del data[last]
        else:
            data[last] = value
    return mutate


_DELETE = object()
_SEG_NET = "segmentation.members.0.network"


@pytest.mark.parametrize("mutate, expected", [
    (_set("name", _DELETE), "field 'name' is missing"),
    (_set("localiser.weights", _DELETE), "field 'localiser.weights' is missing"),
    (_set("localiser.spacing_xyz_mm", [2.0, 2.0]), "field 'localiser.spacing_xyz_mm' must have 3 entries"),
    (_set("crop.mirror_right", "yes"), "field 'crop.mirror_right' must be true or false"),
    (_set(f"{_SEG_NET}.in_channels", 1.5), f"field 'segmentation.members[0].network.in_channels' must be an integer"),
    (_set(f"{_SEG_NET}.dims", 4), "network.dims' must be 2 or 3"),
    (_set(f"{_SEG_NET}.in_channels", 2), "a 2D network reads 1 axial slice, or an odd number"),
    (_set("localiser.network.in_channels", 3), "a 3D network reads the one hrT2 volume, so it must be 1"),
    (_set(f"{_SEG_NET}.filters", [4, 8, 16, 32]), "has 4 levels but kernel_size has 3"),
    (_set(f"{_SEG_NET}.filters", [4, 8]), "has 2 levels but kernel_size has 3"),
    (_set(f"{_SEG_NET}.strides", [[1, 1], [2, 2, 2], [2, 2]]), "network.strides[1]' must be a list of 2 integers"),
    (_set(f"{_SEG_NET}", {**tiny_network(2).to_dict(), "filters": [4, 8], "kernel_size": [[3, 3]] * 2,
                          "strides": [[1, 1], [2, 2]]}), "DynUNet needs at least 3"),
    (_set(f"{_SEG_NET}.out_channels", 2), "out_channels' must be 3"),
    (_set("segmentation.members.0.patch_size_zyx", [14, 16]), "is not a multiple of the network's total stride"),
    (_set("segmentation.members", []), "field 'segmentation.members' is empty"),
    (_set("segmentation.members.0.in_default", False), "no member with in_default true"),
    (_set("segmentation.fusion", "max"), "field 'segmentation.fusion' must be one of mean, cleanlab"),
    (_set("localiser.sha256", "ABC"), "field 'localiser.sha256' must be 64 lower-case hex digits"),
    (_set("localiser.weights", "../elsewhere.safetensors"), "must be a plain file name"),
    (_set("localiser.wieghts", "x"), "field 'localiser.wieghts' is not part of the format"),
    (_set("normalisation.upper_percentile", 0.1), "lower < upper <= 100"),
    (_set("provenance", []), "field 'provenance' must be a JSON object"),
    (_set("postprocess.vs_grow_quantiles", [0.9, 0.1]), "field 'postprocess.vs_grow_quantiles' must be two quantiles"),
    (_set("postprocess.vs_grow_quantiles", [0.1]), "field 'postprocess.vs_grow_quantiles' must have 2 entries"),
    (_set("postprocess.vs_grow_mm", -1.0), "field 'postprocess.vs_grow_mm'"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_invalid_field_is_refused_naming_the_field(mutate, expected):
    data = copy.deepcopy(valid_json_dict())
    mutate(data)
    with pytest.raises(ModelError) as refused:
        ModelSpec.from_dict(data, source="/models/x/model.json")
    assert str(refused.value).startswith("/models/x/model.json: ")
    assert expected in str(refused.value)


# ------------------------------------------------------------------------------------------ registry

def test_resolve_by_path_loads_that_folder(tmp_path):
    write_tiny(tmp_path / "somewhere/my-model")
    model = resolve_model(str(tmp_path / "somewhere/my-model"))
    assert model.spec.name == "tiny" and model.path == (tmp_path / "somewhere/my-model").resolve()


def test_resolve_by_name_finds_it_in_an_extra_models_dir(tmp_path, monkeypatch):
    write_tiny(tmp_path / "extra/my-model", name="my-model")
    monkeypatch.setenv("VSCOCHLEASEG_MODELS", os.pathsep.join([str(tmp_path / "elsewhere"), str(tmp_path / "extra")]))
    assert resolve_model("my-model").spec.name == "my-model"


def test_resolve_none_uses_the_registry_default_among_bundled_models(tmp_path):
    write_tiny(tmp_path / "bundled/phantom-demo", name="phantom-demo")
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"default": "phantom-demo", "models": {"phantom-demo": {"bundled": True}}}))
    assert resolve_model(None, registry_path=registry).spec.name == "phantom-demo"


def test_unknown_name_lists_available_names_and_mentions_paths(tmp_path):
    write_tiny(tmp_path / "bundled/phantom-demo", name="phantom-demo")
    with pytest.raises(ModelError) as refused:
        resolve_model("no-such-model")
    assert "phantom-demo" in str(refused.value) and "path to a model folder" in str(refused.value)


def test_list_models_reports_local_and_downloadable_models(tmp_path):
    write_tiny(tmp_path / "bundled/phantom-demo", name="phantom-demo")
    registry = tmp_path / "registry.json"
    registry.write_text(json.dumps({"default": "phantom-demo", "models": {
        "phantom-demo": {"bundled": True},
        "big": {"url": "https://example.org/big.zip", "sha256": "c" * 64, "description": "remote"}}}))
    rows = {row["name"]: row for row in list_models(registry_path=registry)}
    assert rows["phantom-demo"]["source"] == "bundled" and rows["phantom-demo"]["default"]
    assert rows["phantom-demo"]["version"] == "0.0.1" and rows["phantom-demo"]["description"] == "a test model"
    assert rows["big"]["source"] == "download" and rows["big"]["where"] == "https://example.org/big.zip"


def test_repository_registry_is_valid_and_defaults_to_the_adapted_phantom_model():
    repo_registry = Path(mf.__file__).resolve().parents[2] / "Resources" / "Models" / "registry.json"
    registry = mf.Registry.from_json_file(repo_registry)
    assert registry.default == mf.DEFAULT_MODEL == "phantom-uda"
    assert registry.models["phantom-uda"].bundled


# ------------------------------------------------------------------------------------------ download

@pytest.fixture
def http_server(tmp_path):
    """Serves ``tmp_path / "www"`` on 127.0.0.1 (free port); yields (base_url, www_dir, stop)."""
    www = tmp_path / "www"
    www.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopped = []

    def stop():
        if not stopped:
            server.shutdown()
            server.server_close()
            stopped.append(True)

    yield f"http://127.0.0.1:{server.server_address[1]}", www, stop
    stop()


def zip_folder(folder: Path, zip_path: Path, prefix: str) -> str:
    """Zip ``folder``'s files under ``prefix/``; returns the zip's sha256."""
    with zipfile.ZipFile(zip_path, "w") as archive:
        for file in sorted(folder.iterdir()):
            archive.write(file, f"{prefix}/{file.name}")
    return sha256_file(zip_path)


def remote_registry(tmp_path: Path, url: str, sha256: str) -> Path:
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"default": "remote", "models": {"remote": {"url": url, "sha256": sha256}}}))
    return path


def test_download_goes_into_the_cache_and_later_calls_need_no_network(tmp_path, http_server, monkeypatch):
    base_url, www, stop = http_server
    write_tiny(tmp_path / "export/remote", name="remote")
    sha = zip_folder(tmp_path / "export/remote", www / "remote.zip", prefix="remote")
    registry = remote_registry(tmp_path, f"{base_url}/remote.zip", sha)

    model = resolve_model("remote", registry_path=registry, progress=False)
    assert model.path == (tmp_path / "cache/remote").resolve()
    assert torch.equal(model.load_weights("localiser")["conv.bias"], torch.arange(4, dtype=torch.float32))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["remote"]  # no temporaries left

    stop()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    assert resolve_model("remote", registry_path=registry).spec.name == "remote"


def test_zip_with_wrong_sha256_is_refused_and_leaves_the_cache_empty(tmp_path, http_server):
    base_url, www, _ = http_server
    write_tiny(tmp_path / "export/remote", name="remote")
    zip_folder(tmp_path / "export/remote", www / "remote.zip", prefix="remote")
    registry = remote_registry(tmp_path, f"{base_url}/remote.zip", "d" * 64)
    with pytest.raises(ModelError, match="remote.zip: the downloaded zip has sha256 .* expects d{64}"):
        resolve_model("remote", registry_path=registry, progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_zip_with_a_path_escaping_the_folder_is_refused(tmp_path, http_server):
    base_url, www, _ = http_server
    write_tiny(tmp_path / "export/remote", name="remote")
    zip_folder(tmp_path / "export/remote", www / "evil.zip", prefix="remote")
    with zipfile.ZipFile(www / "evil.zip", "a") as archive:
        archive.writestr("../../escaped.txt", "gotcha")
    sha = sha256_file(www / "evil.zip")
    registry = remote_registry(tmp_path, f"{base_url}/evil.zip", sha)
    with pytest.raises(ModelError, match="unsafe path '../../escaped.txt'"):
        resolve_model("remote", registry_path=registry, progress=False)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_downloaded_model_with_damaged_weights_never_reaches_the_cache(tmp_path, http_server):
    base_url, www, _ = http_server
    write_tiny(tmp_path / "export/remote", name="remote")
    flip_one_byte(tmp_path / "export/remote/seg2d_fold0.safetensors")
    sha = zip_folder(tmp_path / "export/remote", www / "remote.zip", prefix="remote")
    with pytest.raises(ModelError, match="seg2d_fold0.safetensors: checksum mismatch"):
        resolve_model("remote", registry_path=remote_registry(tmp_path, f"{base_url}/remote.zip", sha),
                      progress=False)
    assert list((tmp_path / "cache").iterdir()) == []
