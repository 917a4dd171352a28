"""Reliability and safety (issue 5): every bad input, damaged model and fault a user can meet gives a
clear message and a non-zero exit, writes nothing and loses nothing; batches survive failing cases;
resources degrade gracefully. Each test backs a row of docs/reliability.md.

Segmentation uses the random-weight ``tiny_model`` on small phantom crops (well under a second a case).
"""

from __future__ import annotations

import json
import re
import tracemalloc

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from reliability_fixtures import files_in, read_json, segment, small_scan, write_blind_model
from VSCochleaSegLib import checks, io
from VSCochleaSegLib.checks import bright_plateau_fraction, contrast_warning, estimate_peak_bytes
from VSCochleaSegLib.errors import InputError
from VSCochleaSegLib.pipeline import Segmenter


@pytest.fixture(scope="module")
def scan():
    return small_scan(seed=7)


@pytest.fixture(scope="module")
def scan_file(scan, tmp_path_factory):
    path = tmp_path_factory.mktemp("scans") / "case1_hrT2.nii.gz"
    sitk.WriteImage(scan, str(path))
    return path


@pytest.fixture(scope="module")
def segmenter(tiny_model):
    return Segmenter(tiny_model, device="cpu", threads=1)


def random_volume(shape_kji=(20, 20, 20), spacing=(1.0, 1.0, 1.0), dtype=np.float32) -> sitk.Image:
    img = sitk.GetImageFromArray(np.random.default_rng(0).uniform(10, 500, size=shape_kji).astype(dtype))
    img.SetSpacing(spacing)
    return img


# --------------------------------------------------------------------------------- bad input files

def _missing(folder):
    return folder / "missing_hrT2.nii.gz"


def _unreadable(folder):
    path = folder / "garbage_hrT2.nii.gz"
    path.write_bytes(b"this is not an image")
    return path


def _truncated(folder):
    path = folder / "cut_hrT2.nii.gz"
    sitk.WriteImage(random_volume(), str(path))
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    return path


def _two_d(folder):
    path = folder / "slice.nrrd"
    sitk.WriteImage(random_volume()[:, :, 0], str(path))
    return path


def _four_d(folder):
    path = folder / "timeseries.nii.gz"
    data = np.random.default_rng(1).random((20, 20, 20, 3)).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _vector(folder):
    path = folder / "rgb.nrrd"
    volume = random_volume()
    sitk.WriteImage(sitk.Compose([volume, volume, volume]), str(path))
    return path


def _constant(folder):
    path = folder / "blank.nrrd"
    sitk.WriteImage(sitk.Image([20, 20, 20], sitk.sitkInt16), str(path))
    return path


def _nan_voxels(folder):
    path = folder / "nan.nrrd"
    values = sitk.GetArrayFromImage(random_volume())
    values[2, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(values), str(path))
    return path


def _zero_spacing(folder):
    path = folder / "zero.mha"
    sitk.WriteImage(random_volume(), str(path))
    header = re.sub(rb"ElementSpacing = [^\n]*", b"ElementSpacing = 0 1 1", path.read_bytes(), count=1)
    path.write_bytes(header)
    return path


def _huge_spacing(folder):
    path = folder / "cm.mha"
    sitk.WriteImage(random_volume(spacing=(0.5, 0.5, 20.0)), str(path))
    return path


def _sheared(folder):
    path = folder / "sheared.mha"
    img = random_volume()
    img.SetDirection((1.0, 0.3, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(img, str(path))
    return path


def _absurd_ndims(folder):
    path = folder / "ndims.mha"
    sitk.WriteImage(random_volume(), str(path))
    path.write_bytes(path.read_bytes().replace(b"NDims = 3", b"NDims = -1", 1))
    return path


def _narrow_field_of_view(folder):
    path = folder / "one_ear.nii.gz"
    sitk.WriteImage(random_volume(shape_kji=(20, 60, 30), spacing=(1.0, 0.5, 1.0)), str(path))  # 30 mm left-right
    return path


BAD_INPUTS = {
    "missing file": (_missing, "does not exist"),
    "unreadable file": (_unreadable, "Could not read"),
    "truncated file": (_truncated, "truncated"),
    "2D image": (_two_d, "is a 2D image"),
    "4D time series": (_four_d, "is a 4D image"),
    "vector (RGB) image": (_vector, "components per voxel"),
    "constant image": (_constant, "is a constant image"),
    "NaN voxels": (_nan_voxels, "NaN or Inf"),
    "zero spacing": (_zero_spacing, "invalid voxel spacing"),
    "spacing above 10 mm": (_huge_spacing, "implausible voxel spacing"),
    "sheared direction": (_sheared, "not orthonormal"),
    "MetaImage NDims = -1 (crashes ITK)": (_absurd_ndims, "damaged MetaImage header"),
    "field of view narrower than both ears": (_narrow_field_of_view, "too small to hold both inner ears"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_bad_input_fails_its_case_with_a_clear_message_exit_1_and_no_output(kind, tiny_model, tmp_path):
    make, message = BAD_INPUTS[kind]
    bad = make(tmp_path)
    out_dir = tmp_path / "out"
    assert segment([bad], out_dir, tiny_model) == 1
    (case,) = read_json(out_dir / "summary.json")["cases"]
    assert case["status"] == "failed" and message in case["error"]
    assert files_in(out_dir) == {"summary.json"}


def test_negative_spacing_in_a_header_is_read_as_a_flipped_axis_at_the_same_positions(tmp_path):
    """ITK turns a negative MetaImage spacing into a positive one with the axis's direction reversed: the
    voxels keep their physical positions, so the scan is valid and accepted."""
    path = tmp_path / "negative.mha"
    sitk.WriteImage(random_volume(), str(path))
    header = re.sub(rb"ElementSpacing = [^\n]*", b"ElementSpacing = -0.5 1 1", path.read_bytes(), count=1)
    path.write_bytes(header)
    image = io.read_image(path)
    assert image.GetSpacing() == (0.5, 1.0, 1.0)
    assert image.TransformIndexToPhysicalPoint((4, 0, 0)) == pytest.approx((-2.0, 0.0, 0.0))


def test_narrow_field_of_view_is_refused_before_any_network_runs(segmenter, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a network ran on a scan that should have been refused")

    monkeypatch.setattr("VSCochleaSegLib.localise.predict_softmax", no_network)
    monkeypatch.setattr("VSCochleaSegLib.pipeline.predict_softmax", no_network)
    with pytest.raises(InputError, match=r"covers only 30 × 30 × 20 mm .*left-right 30 mm < 40 mm"):
        segmenter.segment_image(random_volume(shape_kji=(20, 60, 30), spacing=(1.0, 0.5, 1.0)))


def test_oblique_scan_field_of_view_is_measured_along_the_patient_axes():
    img = random_volume(shape_kji=(20, 20, 100), spacing=(0.5, 1.0, 1.0))  # 50 mm along i
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # i runs anterior-posterior
    img.SetDirection(rotation.ravel().tolist())
    with pytest.raises(InputError, match="left-right 20 mm < 40 mm"):
        checks.check_field_of_view(img)


def test_scan_without_inner_ears_fails_with_exit_1_and_no_output(scan_file, tmp_path):
    blind = write_blind_model(tmp_path / "blind")
    out_dir = tmp_path / "out"
    assert segment([scan_file], out_dir, blind.path) == 1
    (case,) = read_json(out_dir / "summary.json")["cases"]
    assert case["status"] == "failed" and "No inner ear was found" in case["error"]
    assert files_in(out_dir) == {"summary.json"}


# ------------------------------------------------------------------------------------------ memory

def test_scan_above_the_memory_limit_is_refused_before_it_is_read(scan_file, tiny_model, tmp_path, monkeypatch):
    def not_read(path):
        raise AssertionError("the scan was read although its header showed it is too large")

    monkeypatch.setattr(io, "read_image", not_read)
    out_dir = tmp_path / "out"
    assert segment([scan_file], out_dir, tiny_model, "--max-memory-gb", "0.01") == 1
    (case,) = read_json(out_dir / "summary.json")["cases"]
    assert "too large for the limit set (--max-memory-gb)" in case["error"]
    assert "Crop it" in case["error"] and "coarser spacing" in case["error"]
    assert files_in(out_dir) == {"summary.json"}


def test_default_memory_budget_is_the_ram_available_now(segmenter, scan, monkeypatch):
    monkeypatch.setattr(checks, "available_memory_bytes", lambda: 1000)
    with pytest.raises(InputError, match="too large for the memory available"):
        segmenter.segment_image(scan)


def test_memory_estimate_grows_with_the_number_of_voxels(tiny_model):
    spec = tiny_model.spec
    small = estimate_peak_bytes((256, 256, 64), (0.5, 0.5, 1.0), spec)
    large = estimate_peak_bytes((512, 512, 128), (0.25, 0.25, 0.5), spec)  # same extent, 8× the voxels
    added_voxels = 512 * 512 * 128 - 256 * 256 * 64
    assert 30 * added_voxels < large - small < 45 * added_voxels  # ~3 float32 class maps + working copies


def test_memory_estimate_bounds_the_engines_measured_peak(tiny_model, scan):
    """tracemalloc sees every NumPy buffer (not SimpleITK's or PyTorch's); the estimate must cover them."""
    segmenter = Segmenter(tiny_model, device="cpu", threads=1)
    image = sitk.Resample(scan, [s * 2 for s in scan.GetSize()], sitk.Transform(), sitk.sitkLinear,
                          scan.GetOrigin(), [s / 2 for s in scan.GetSpacing()], scan.GetDirection())
    tracemalloc.start()
    try:
        segmenter.segment_image(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < estimate_peak_bytes(image.GetSize(), image.GetSpacing(), tiny_model.spec, image.GetDirection())


# ---------------------------------------------------------------------------------------- contrast

@pytest.mark.parametrize("crop", [False, True], ids=["whole scan", "cropped to the ears"])
def test_contrast_heuristic_warns_on_ceT1_and_not_on_hrT2_phantoms(crop):
    """Held-out subjects (the thresholds were chosen on seeds 0–29): 10 per contrast, none misjudged."""
    for seed in range(100, 110):
        assert contrast_warning(small_scan(seed, "hrT2", crop)) is None, f"hrT2 seed {seed} was warned about"
        assert contrast_warning(small_scan(seed, "ceT1", crop)) is not None, f"ceT1 seed {seed} passed as hrT2"


def test_bright_plateau_fraction_is_high_for_a_fluid_plateau_and_low_for_a_gradual_tail():
    rng = np.random.default_rng(0)
    plateau = np.concatenate([rng.normal(0.3, 0.05, 8000), rng.normal(1.0, 0.03, 2000)])  # brain + CSF
    tail = rng.uniform(0.0, 1.0, 10000)  # intensities spread evenly up to the top
    assert bright_plateau_fraction(plateau) > 0.8
    assert bright_plateau_fraction(tail) < 0.3


def test_ceT1_scan_is_segmented_with_a_warning_in_the_json_and_the_log(tiny_model, tmp_path, caplog):
    path = tmp_path / "case_ceT1.nii.gz"
    sitk.WriteImage(small_scan(seed=100, modality="ceT1"), str(path))
    out_dir = tmp_path / "out"
    assert segment([path], out_dir, tiny_model) == 0
    doc = read_json(out_dir / "case_ceT1.json")
    assert any("does not look like an hrT2" in w for w in doc["warnings"])
    assert any("does not look like an hrT2" in w for w in read_json(out_dir / "summary.json")["cases"][0]["warnings"])
    assert any("does not look like an hrT2" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


# ------------------------------------------------------------------------------------ determinism

def test_cpu_segmentation_is_identical_for_the_same_scan_and_model(tiny_model, scan):
    first = Segmenter(tiny_model, device="cpu", threads=1).segment_image(scan)
    again = Segmenter(tiny_model, device="cpu", threads=1).segment_image(scan)
    assert np.array_equal(sitk.GetArrayViewFromImage(first.labels), sitk.GetArrayViewFromImage(again.labels))
    assert first.measurements.to_dict() == again.measurements.to_dict()


def test_threads_option_caps_pytorch_cpu_threads(tiny_model):
    before = torch.get_num_threads()
    try:
        Segmenter(tiny_model, device="cpu", threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------- CUDA out of memory

@pytest.fixture
def fake_cuda(tiny_model, monkeypatch):
    """A Segmenter that believes it runs on CUDA; ``fail_when(device, settings, patch)`` decides which
    network calls run out of memory, the others run on the CPU. Yields (segmenter, calls)."""
    from VSCochleaSegLib import inference

    real = inference.predict_softmax
    calls = []
    rule = {}

    def predict(net, volume, patch_size_zyx, device, settings=inference.InferenceSettings(), *args):
        calls.append((device.type, settings.slice_batch_size, len(patch_size_zyx)))
        if rule["fail_when"](device, settings, patch_size_zyx):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(net, volume, patch_size_zyx, torch.device("cpu"), settings, *args)

    monkeypatch.setattr("VSCochleaSegLib.localise.predict_softmax", predict)
    monkeypatch.setattr("VSCochleaSegLib.pipeline.predict_softmax", predict)
    segmenter = Segmenter(tiny_model, device="cpu", threads=1)
    segmenter.device = torch.device("cuda")
    return segmenter, calls, rule


def test_cuda_out_of_memory_first_retries_with_smaller_batches(fake_cuda, scan):
    segmenter, calls, rule = fake_cuda
    rule["fail_when"] = lambda device, settings, patch: len(patch) == 2 and settings.slice_batch_size > 1
    result = segmenter.segment_image(scan)
    assert segmenter.device.type == "cuda" and segmenter.settings.slice_batch_size == 1
    assert any("one window per batch" in w for w in result.warnings)
    assert not any("CPU" in w for w in result.warnings)


def test_cuda_out_of_memory_with_minimal_batches_falls_back_to_the_cpu(fake_cuda, scan):
    segmenter, calls, rule = fake_cuda
    rule["fail_when"] = lambda device, settings, patch: device.type == "cuda"
    result = segmenter.segment_image(scan)
    assert segmenter.device.type == "cpu" and result.device == "cpu"
    assert [w for w in result.warnings if "CUDA ran out of memory" in w] == [
        "CUDA ran out of memory; retrying with one window per batch (slower).",
        "CUDA ran out of memory; this scan was segmented on the CPU (slower)."]
    assert calls[-1][0] == "cpu"


def test_out_of_memory_on_the_cpu_is_reported_not_retried(fake_cuda, scan):
    segmenter, calls, rule = fake_cuda
    segmenter.device = torch.device("cpu")
    rule["fail_when"] = lambda device, settings, patch: True
    with pytest.raises(torch.cuda.OutOfMemoryError):
        segmenter.segment_image(scan)
    assert len(calls) == 1


# ------------------------------------------------------------------------------ batch robustness

def _failing_once(monkeypatch, error: BaseException):
    """Make Segmenter.segment_image raise ``error`` on its first call only."""
    real = Segmenter.segment_image
    state = {"calls": 0}

    def segment_image(self, image, *args, **kwargs):
        state["calls"] += 1
        if state["calls"] == 1:
            raise error
        return real(self, image, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "segment_image", segment_image)


@pytest.fixture
def two_scans(scan_file, tmp_path):
    import shutil

    paths = [tmp_path / "a_hrT2.nii.gz", tmp_path / "b_hrT2.nii.gz"]
    for p in paths:
        shutil.copy(scan_file, p)
    return paths


def test_running_out_of_ram_fails_only_that_case(two_scans, tiny_model, tmp_path, monkeypatch):
    _failing_once(monkeypatch, MemoryError())
    out_dir = tmp_path / "out"
    assert segment(two_scans, out_dir, tiny_model) == 1
    failed, ok = read_json(out_dir / "summary.json")["cases"]
    assert failed["status"] == "failed" and failed["error"].startswith("ran out of memory while segmenting")
    assert ok["status"] == "ok"
    assert not any(name.startswith("a_hrT2") for name in files_in(out_dir))


def test_an_unexpected_error_fails_only_that_case_and_keeps_its_traceback(two_scans, tiny_model, tmp_path, monkeypatch):
    _failing_once(monkeypatch, IndexError("index 7 is out of bounds"))
    out_dir = tmp_path / "out"
    assert segment(two_scans, out_dir, tiny_model) == 1
    failed, ok = read_json(out_dir / "summary.json")["cases"]
    assert failed["error"] == "unexpected error (please report it): IndexError: index 7 is out of bounds"
    assert "Traceback" in failed["traceback"] and ok["status"] == "ok"


def test_ctrl_c_mid_batch_exits_130_and_records_the_cases_not_run(two_scans, tiny_model, tmp_path, monkeypatch):
    real = Segmenter.segment_image
    calls = []

    def interrupted_second_time(self, image, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, image, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "segment_image", interrupted_second_time)
    out_dir = tmp_path / "out"
    assert segment(two_scans, out_dir, tiny_model) == 130
    summary = read_json(out_dir / "summary.json")
    assert summary["interrupted"] is True
    assert [c["status"] for c in summary["cases"]] == ["ok", "not run (interrupted)"]
    assert not any(name.startswith("b_hrT2") or ".tmp-" in name for name in files_in(out_dir))


def test_temporaries_a_killed_run_left_are_removed_when_the_case_is_redone(scan_file, tiny_model, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    stale = out_dir / ".case1_hrT2_seg.tmp-0123456789ab.part.nii.gz"
    stale.write_bytes(b"half a label map")
    other = out_dir / ".other_seg.tmp-0123456789ab.part.nii.gz"  # another case's: not touched
    other.write_bytes(b"half")
    assert segment([scan_file], out_dir, tiny_model) == 0
    assert not stale.exists() and other.exists()


# -------------------------------------------------------------------------------- damaged models

def _checksum_mismatch(folder):
    path = folder / "m3d.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    return "m3d.safetensors: checksum mismatch"


def _missing_weights(folder):
    (folder / "localiser.safetensors").unlink()
    return "localiser.safetensors: weight file is missing"


def _malformed_json(folder):
    (folder / "model.json").write_text('{"format_version": 1, "name": ')
    return "model.json: is not valid JSON"


def _edit_json(folder, edit):
    data = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    edit(data)
    (folder / "model.json").write_text(json.dumps(data))


def _unknown_labels(folder):
    _edit_json(folder, lambda d: d.__setitem__("labels", {"background": 0, "tumour": 1, "cochlea": 2}))
    return "model.json: field 'labels' is"


def _newer_version(folder):
    _edit_json(folder, lambda d: d.__setitem__("format_version", 99))
    return "this model needs a newer VSCochleaSeg"


def _pickle_weights(folder):
    (folder / "m3d.safetensors").rename(folder / "m3d.pt")
    _edit_json(folder, lambda d: d["segmentation"]["members"][0].__setitem__("weights", "m3d.pt"))
    return "must be a plain file name ending in .safetensors"


DAMAGED_MODELS = {
    "checksum mismatch": _checksum_mismatch,
    "missing weight file": _missing_weights,
    "malformed model.json": _malformed_json,
    "unknown label map": _unknown_labels,
    "newer format version": _newer_version,
    "pickle weights (.pt)": _pickle_weights,
}


@pytest.mark.parametrize("damage", list(DAMAGED_MODELS))
def test_damaged_model_stops_with_exit_2_naming_the_file_before_anything_is_written(
        damage, scan_file, tmp_path, capsys):
    from conftest import write_tiny_model

    folder = write_tiny_model(tmp_path / "model").path
    expected = DAMAGED_MODELS[damage](folder)
    out_dir = tmp_path / "out"
    assert segment([scan_file], out_dir, folder) == 2
    assert expected in capsys.readouterr().err
    assert not out_dir.exists()
