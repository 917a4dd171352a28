"""Specification of the ``vscochleaseg`` command line, run in-process through ``main(argv)``.

Segmentation uses the random-weight ``tiny_model`` (meaningless labels, but every stage runs) on a phantom
cropped to a box around both cochleae, so one case takes about a second.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from VSCochleaSegLib import cli
from VSCochleaSegLib.cli import main
from VSCochleaSegLib.labels import COCHLEA, VS
from VSCochleaSegLib.model_folder import Registry, default_registry_path

from reliability_fixtures import crop_around_cochleae

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def small_case(hrt2_phantom):
    """(hrT2, labels) of the conftest phantom cropped around both ears: ~170 × 45 × 30 voxels."""
    centres = hrt2_phantom.info["cochlea_centres_lps"]
    return (crop_around_cochleae(hrt2_phantom.images["hrT2"], centres),
            crop_around_cochleae(hrt2_phantom.labels, centres))


@pytest.fixture(scope="module")
def scan(small_case, tmp_path_factory):
    """The small hrT2 scan as a NIfTI file."""
    path = tmp_path_factory.mktemp("scans") / "case1_hrT2.nii.gz"
    sitk.WriteImage(small_case[0], str(path))
    return path


def segment(inputs, out_dir, tiny_model, *options) -> int:
    return main(["segment", *map(str, inputs), "-o", str(out_dir), "--model", str(tiny_model.path),
                 "--device", "cpu", "--threads", "2", "-q", *options])


def read_json(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def assert_same_grid(a, b, atol: float = 0.0) -> None:
    """Same size, and spacing/origin (mm) and direction equal to within ``atol`` (exactly by default)."""
    assert a.GetSize() == b.GetSize()
    for get in ("GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(a, get)(), getattr(b, get)(), rtol=0.0, atol=atol), get


# ----------------------------------------------------------------------------------------- segment


@pytest.fixture(scope="module")
def segmented(scan, tiny_model, tmp_path_factory):
    """One successful ``segment`` run on the NIfTI scan: (exit code, output folder)."""
    out_dir = tmp_path_factory.mktemp("segmented")
    return segment([scan], out_dir, tiny_model), out_dir


def test_segment_succeeds(segmented):
    code, out_dir = segmented
    assert code == 0
    assert read_json(out_dir / "summary.json")["cases"][0]["status"] == "ok"


def test_segment_writes_labels_on_the_input_grid(segmented, scan):
    _, out_dir = segmented
    labels = sitk.ReadImage(str(out_dir / "case1_hrT2_seg.nii.gz"))
    assert_same_grid(labels, sitk.ReadImage(str(scan)))
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, VS, COCHLEA}


def test_segment_writes_measurements_model_and_timings(segmented, tiny_model):
    _, out_dir = segmented
    doc = read_json(out_dir / "case1_hrT2.json")
    assert {"vs_volume_mm3", "vs_side", "vs_max_diameter_mm"} <= set(doc["measurements"])
    assert doc["model"]["name"] == tiny_model.spec.name
    assert doc["model"]["version"] == tiny_model.spec.version
    assert {"read", "localise", "predict", "write"} <= set(doc["timings_s"])


def test_segment_writes_an_overlay_png(segmented):
    _, out_dir = segmented
    assert (out_dir / "case1_hrT2_overlay.png").read_bytes().startswith(PNG_SIGNATURE)


def test_segment_summary_names_model_and_case_outputs(segmented, tiny_model):
    _, out_dir = segmented
    summary = read_json(out_dir / "summary.json")
    assert summary["model"] == tiny_model.spec.name
    assert summary["n_cases"] == 1 and summary["n_failed"] == 0
    assert summary["cases"][0]["outputs"]["labels"] == str(out_dir / "case1_hrT2_seg.nii.gz")


def test_segment_reads_nrrd(small_case, tiny_model, tmp_path):
    scan = tmp_path / "case2.nrrd"
    sitk.WriteImage(small_case[0], str(scan))
    assert segment([scan], tmp_path / "out", tiny_model) == 0
    # NRRD keeps the grid in double precision, the .nii.gz output in float32.
    labels = sitk.ReadImage(str(tmp_path / "out" / "case2_seg.nii.gz"))
    assert_same_grid(labels, sitk.ReadImage(str(scan)), atol=1e-5)


def test_segment_reads_a_dicom_series_folder(small_case, tiny_model, tmp_path):
    from test_io import write_dicom_series

    write_dicom_series(tmp_path / "case3", small_case[0], series_uid="1.2.826.0.1.3680043.2.1125.2")
    assert segment([tmp_path / "case3"], tmp_path / "out", tiny_model) == 0
    # DICOM stores the grid as 6-decimal text: the series read back is the scan to within 1e-5 mm.
    labels = sitk.ReadImage(str(tmp_path / "out" / "case3_seg.nii.gz"))
    assert_same_grid(labels, small_case[0], atol=1e-5)


def test_existing_output_is_kept_without_overwrite(scan, tiny_model, tmp_path):
    stale = tmp_path / "case1_hrT2_seg.nii.gz"
    stale.write_bytes(b"an earlier result")
    assert segment([scan], tmp_path, tiny_model) == 1
    assert stale.read_bytes() == b"an earlier result"
    (case,) = read_json(tmp_path / "summary.json")["cases"]
    assert case["status"] == "failed" and "--overwrite" in case["error"]


def test_existing_output_is_replaced_with_overwrite(scan, tiny_model, tmp_path):
    stale = tmp_path / "case1_hrT2_seg.nii.gz"
    stale.write_bytes(b"an earlier result")
    assert segment([scan], tmp_path, tiny_model, "--overwrite") == 0
    assert_same_grid(sitk.ReadImage(str(stale)), sitk.ReadImage(str(scan)))


def test_resume_skips_complete_cases_and_segments_the_rest(scan, tiny_model, tmp_path):
    done, todo = tmp_path / "done_hrT2.nii.gz", tmp_path / "todo_hrT2.nii.gz"
    shutil.copy(scan, done)
    shutil.copy(scan, todo)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    finished = [out_dir / name for name in ("done_hrT2_seg.nii.gz", "done_hrT2_overlay.png", "done_hrT2.json")]
    for path in finished:
        path.write_bytes(b"finished earlier")
    assert segment([done, todo], out_dir, tiny_model, "--resume") == 0
    assert all(path.read_bytes() == b"finished earlier" for path in finished)
    assert (out_dir / "todo_hrT2_seg.nii.gz").exists()
    statuses = {c["stem"]: c["status"] for c in read_json(out_dir / "summary.json")["cases"]}
    assert statuses == {"done_hrT2": "skipped (complete)", "todo_hrT2": "ok"}


def test_resume_skips_a_case_finished_with_no_overlay(scan, tiny_model, tmp_path):
    finished = [tmp_path / "case1_hrT2_seg.nii.gz", tmp_path / "case1_hrT2.json"]  # a --no-overlay run
    for path in finished:
        path.write_bytes(b"finished earlier")
    assert segment([scan], tmp_path, tiny_model, "--resume", "--no-overlay") == 0
    assert all(path.read_bytes() == b"finished earlier" for path in finished)
    assert read_json(tmp_path / "summary.json")["cases"][0]["status"] == "skipped (complete)"


def test_resume_redoes_a_case_interrupted_before_its_json(scan, tiny_model, tmp_path):
    # The per-case JSON is written last, so labels without it are what an interrupted run leaves.
    (tmp_path / "case1_hrT2_seg.nii.gz").write_bytes(b"left by an interrupted run")
    assert segment([scan], tmp_path, tiny_model, "--resume") == 0
    assert_same_grid(sitk.ReadImage(str(tmp_path / "case1_hrT2_seg.nii.gz")), sitk.ReadImage(str(scan)))
    assert (tmp_path / "case1_hrT2.json").exists()


@pytest.mark.parametrize("bad_input, reason", [
    ("missing_hrT2.nii.gz", "does not exist"),
    ("garbage_hrT2.nii.gz", "Could not read"),
])
def test_batch_continues_past_an_unreadable_input_and_reports_it(scan, tiny_model, tmp_path, bad_input, reason):
    (tmp_path / "garbage_hrT2.nii.gz").write_bytes(b"this is not an image")
    out_dir = tmp_path / "out"
    assert segment([tmp_path / bad_input, scan], out_dir, tiny_model) == 1
    assert (out_dir / "case1_hrT2_seg.nii.gz").exists()
    summary = read_json(out_dir / "summary.json")
    assert summary["n_failed"] == 1
    failed, ok = summary["cases"]
    assert failed["status"] == "failed" and reason in failed["error"]
    assert ok["status"] == "ok"


# ----------------------------------------------------------------------------------------- evaluate


def write_labels(path, labels_zyx: np.ndarray) -> None:
    image = sitk.GetImageFromArray(labels_zyx.astype(np.uint8))  # spacing 1 mm
    sitk.WriteImage(image, str(path))


def test_evaluate_prints_a_table_and_writes_the_mean_scores(tmp_path, capsys):
    """Case "a": the predicted 4×4×4 VS cube is shifted one voxel along x. Overlap 4·4·3 = 48 voxels, so
    Dice = 2·48 / (64 + 64) = 0.75. Each cube's surface is its 56 outer voxels; 20 of them (the 16 of the
    face beyond the other cube, and the 4 face-centre voxels of the face inside it) are 1 mm from the other
    surface and 36 lie on it, so ASSD = 20/56 mm either way. Cochleae (a 2×2×2 cube) match. Case "b" is
    perfect. Means over the two cases: VS Dice 0.875, VS ASSD 10/56 mm, cochlea Dice 1, ASSD 0."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    gt = np.zeros((10, 10, 10), np.uint8)
    gt[2:6, 2:6, 2:6] = VS
    gt[7:9, 7:9, 7:9] = COCHLEA
    shifted = np.zeros_like(gt)
    shifted[2:6, 2:6, 3:7] = VS
    shifted[7:9, 7:9, 7:9] = COCHLEA
    for case_id, pred in (("a", shifted), ("b", gt)):
        write_labels(gt_dir / f"{case_id}_Label.nii.gz", gt)
        write_labels(pred_dir / f"{case_id}_hrT2_seg.nii.gz", pred)
    scores = tmp_path / "scores.json"
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--json", str(scores), "-q"]) == 0
    mean = read_json(scores)["mean"]
    assert mean["VS_Dice"] == pytest.approx(0.875)
    assert mean["VS_ASSD"] == pytest.approx(10 / 56)
    assert mean["Cochlea_Dice"] == pytest.approx(1.0)
    assert mean["Cochlea_ASSD"] == pytest.approx(0.0)
    assert mean["n_cases"] == 2
    table = capsys.readouterr().out
    assert "VS_Dice" in table
    assert any(line.startswith("mean") and "0.875" in line for line in table.splitlines())


# ----------------------------------------------------------------------------------------- phantom, demo, models


def test_phantom_writes_crossmoda_layout(tmp_path):
    assert main(["phantom", str(tmp_path), "--modality", "hrT2", "--n", "1", "--seed", "221", "-q"]) == 0  # a small-matrix case
    assert {p.name for p in tmp_path.iterdir()} == {"phantom_hrT2_221_000_hrT2.nii.gz", "phantom_hrT2_221_000_Label.nii.gz"}


def demo(out_dir, tiny_model) -> int:
    return main(["demo", "-o", str(out_dir), "--model", str(tiny_model.path), "--device", "cpu", "--threads", "2", "-q"])


def test_demo_segments_the_bundled_sample(small_case, tiny_model, tmp_path, monkeypatch, capsys):
    samples = tmp_path / "Samples"
    samples.mkdir()
    sitk.WriteImage(small_case[0], str(samples / "phantom_sample_hrT2.nii.gz"))
    sitk.WriteImage(small_case[1], str(samples / "phantom_sample_Label.nii.gz"))
    monkeypatch.setattr(cli, "SAMPLE_HRT2", samples / "phantom_sample_hrT2.nii.gz")
    monkeypatch.setattr(cli, "SAMPLE_LABEL", samples / "phantom_sample_Label.nii.gz")
    assert demo(tmp_path / "demo", tiny_model) == 0
    names = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {"phantom_sample_hrT2_seg.nii.gz", "phantom_sample_hrT2_overlay.png", "phantom_sample_hrT2.json"} <= names
    assert "against the sample's ground truth" in capsys.readouterr().out


def test_demo_makes_the_sample_phantom_when_none_is_bundled(small_case, tiny_model, tmp_path, monkeypatch):
    from VSCochleaSegLib.phantoms import PhantomCase, generator

    made = []

    def small_make_case(seed, index, name=None, **kwargs):  # the real one renders a full scan (seconds)
        made.append((seed, index))
        return PhantomCase(name, {"hrT2": small_case[0]}, small_case[1])

    monkeypatch.setattr(cli, "SAMPLE_HRT2", tmp_path / "not-bundled_hrT2.nii.gz")
    monkeypatch.setattr(generator, "make_case", small_make_case)
    assert demo(tmp_path / "demo", tiny_model) == 0
    assert made == [(cli.SAMPLE_SEED, 0)]
    names = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {"phantom_sample_hrT2.nii.gz", "phantom_sample_hrT2_seg.nii.gz", "phantom_sample_hrT2_overlay.png"} <= names


def test_models_lists_the_default_model(capsys):
    assert main(["models"]) == 0
    default = Registry.from_json_file(default_registry_path()).default
    assert any(line.startswith(f"{default} (default)") for line in capsys.readouterr().out.splitlines())
