"""Stopping ``vscochleaseg segment`` mid-batch — Ctrl-C (SIGINT), ``kill`` (SIGTERM), ``kill -9``
(SIGKILL) — leaves every file under an output's real name complete, and re-running with ``--resume``
gives the same label maps and measurements as an uninterrupted run.

The batch runs as a real subprocess with the tiny random-weight model: a small first case, then two
larger scans (256 × 256 × 48, ~2 s each) so the batch is surely still running when the signal is sent —
as soon as the first case's JSON (written last) appears.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from reliability_fixtures import files_in, read_json, segment, small_scan

START_TIMEOUT_S = 300  # generous: the machine may be busy; the test itself needs a few seconds


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    paths = [folder / f"case{i}_hrT2.nii.gz" for i in range(3)]
    sitk.WriteImage(small_scan(seed=20), str(paths[0]))
    for i, path in enumerate(paths[1:], start=1):
        scan = small_scan(seed=20 + i, crop=False)
        finer = sitk.Resample(scan, [256, 256, 48], sitk.Transform(), sitk.sitkLinear, scan.GetOrigin(),
                              [s / 2 for s in scan.GetSpacing()], scan.GetDirection())
        sitk.WriteImage(finer, str(path))
    return paths


@pytest.fixture(scope="module")
def uninterrupted(batch, tiny_model, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("uninterrupted")
    assert segment(batch, out_dir, tiny_model.path) == 0
    return out_dir


def start_batch(batch, out_dir, model_path) -> subprocess.Popen:
    command = [sys.executable, "-m", "VSCochleaSegLib.cli", "segment", *map(str, batch), "-o", str(out_dir),
               "--model", str(model_path), "--device", "cpu", "--threads", "1", "-q"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_file(path, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the batch ended (exit {process.returncode}) before {path.name} appeared: "
                                 f"{process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path.name} did not appear within {timeout_s} s")
        time.sleep(0.02)


def assert_every_output_is_complete(out_dir, batch) -> None:
    """Each file under a real output name opens completely: labels on the input grid, JSON, PNG."""
    sizes = {p.name[: -len(".nii.gz")]: sitk.ReadImage(str(p)).GetSize() for p in batch}
    for name in files_in(out_dir):
        path = out_dir / name
        if name.startswith("."):
            continue
        if name.endswith("_seg.nii.gz"):
            labels = sitk.ReadImage(str(path))
            assert labels.GetSize() == sizes[name[: -len("_seg.nii.gz")]]
            assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1, 2}
        elif name.endswith(".json"):
            read_json(path)
        elif name.endswith(".png"):
            with Image.open(path) as png:
                png.load()
        else:
            raise AssertionError(f"unexpected file {name}")


@pytest.mark.parametrize("sig, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGKILL, -9)],
                         ids=["Ctrl-C", "kill", "kill -9"])
def test_interrupted_batch_leaves_complete_files_and_resume_matches_an_uninterrupted_run(
        sig, exit_code, batch, uninterrupted, tiny_model, tmp_path):
    out_dir = tmp_path / "out"
    process = start_batch(batch, out_dir, tiny_model.path)
    wait_for_file(out_dir / "case0_hrT2.json", process, START_TIMEOUT_S)
    process.send_signal(sig)
    assert process.wait(timeout=START_TIMEOUT_S) == exit_code, "the batch finished before the signal arrived"

    names = files_in(out_dir)
    assert "case2_hrT2.json" not in names  # it was stopped mid-batch
    assert_every_output_is_complete(out_dir, batch)
    if sig != signal.SIGKILL:  # SIGKILL runs no clean-up: its temporaries are removed by the re-run
        assert not any(".tmp-" in name for name in names)
        summary = read_json(out_dir / "summary.json")
        assert summary["interrupted"] is True and summary["cases"][0]["status"] == "ok"

    assert segment(batch, out_dir, tiny_model.path, "--resume") == 0
    assert not any(".tmp-" in name for name in files_in(out_dir))
    statuses = [c["status"] for c in read_json(out_dir / "summary.json")["cases"]]
    assert statuses[0] == "skipped (complete)" and set(statuses) <= {"skipped (complete)", "ok"}
    for path in batch:
        stem = path.name[: -len(".nii.gz")]
        resumed = sitk.ReadImage(str(out_dir / f"{stem}_seg.nii.gz"))
        reference = sitk.ReadImage(str(uninterrupted / f"{stem}_seg.nii.gz"))
        assert np.array_equal(sitk.GetArrayViewFromImage(resumed), sitk.GetArrayViewFromImage(reference))
        assert resumed.GetOrigin() == reference.GetOrigin() and resumed.GetDirection() == reference.GetDirection()
        assert (read_json(out_dir / f"{stem}.json")["measurements"]
                == read_json(uninterrupted / f"{stem}.json")["measurements"])
