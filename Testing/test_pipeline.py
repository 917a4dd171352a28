"""The engine end to end with a tiny random-weight model: geometry, stages, cancel, quality, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from VSCochleaSegLib.errors import Cancelled, InputError, ModelError
from VSCochleaSegLib.pipeline import Segmenter


@pytest.fixture(scope="module")
def segmenter(tiny_model):
    return Segmenter(tiny_model, device="cpu", threads=2)


@pytest.fixture(scope="module")
def small_scan(hrt2_phantom):
    """The phantom cropped to a box around both ears (keeps tests fast), oblique direction kept."""
    img = hrt2_phantom.images["hrT2"]
    size = np.array(img.GetSize())
    lo = (size * np.array([0.15, 0.15, 0.0])).astype(int)
    return sitk.RegionOfInterest(img, [int(v) for v in size - 2 * lo], [int(v) for v in lo])


def test_labels_lie_exactly_on_the_input_grid(segmenter, small_scan):
    result = segmenter.segment_image(small_scan)
    labels = result.labels
    assert labels.GetSize() == small_scan.GetSize()
    assert labels.GetSpacing() == small_scan.GetSpacing()
    assert labels.GetOrigin() == small_scan.GetOrigin()
    assert labels.GetDirection() == small_scan.GetDirection()
    assert set(np.unique(sitk.GetArrayViewFromImage(labels))) <= {0, 1, 2}


def test_both_ears_are_located_left_and_right_of_the_midline(segmenter, small_scan):
    result = segmenter.segment_image(small_scan)
    left, right = np.array(result.cochlea_centres_lps["left"]), np.array(result.cochlea_centres_lps["right"])
    assert left[0] > result.midline_point_lps[0] > right[0]


def test_progress_reports_every_stage_in_order(segmenter, small_scan):
    stages = []
    segmenter.segment_image(small_scan, progress=lambda stage, f: stages.append(stage))
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["localise", "predict", "postprocess", "measure"]


def test_cancel_stops_with_cancelled(segmenter, small_scan):
    with pytest.raises(Cancelled):
        segmenter.segment_image(small_scan, cancel=lambda: True)


def test_cancel_during_prediction_stops_before_the_end(segmenter, small_scan):
    seen = []

    def progress(stage, f):
        seen.append(stage)

    with pytest.raises(Cancelled):
        segmenter.segment_image(small_scan, progress=progress, cancel=lambda: "predict" in seen)
    assert "postprocess" not in seen


def test_fast_quality_runs_only_the_first_member(tiny_model):
    fast = Segmenter(tiny_model, device="cpu", quality="fast")
    assert [m.name for m in fast.members] == ["m3d"]
    full = Segmenter(tiny_model, device="cpu", quality="full")
    assert [m.name for m in full.members] == ["m3d", "m2d"]


def test_summary_names_the_model_and_timings(segmenter, small_scan):
    summary = segmenter.segment_image(small_scan).summary()
    assert summary["model"]["name"] == "tiny-test"
    assert {"localise", "predict", "postprocess", "measure", "total"} <= set(summary["timings_s"])


def test_vs_min_probability_in_the_model_folder_reaches_the_labels(tmp_path, small_scan):
    """The model folder's ``postprocess.vs_min_probability`` is applied to the fused map: with a threshold
    below every VS probability, no voxel stays background where the argmax chose background in a crop."""
    import json

    from conftest import write_tiny_model

    folder = write_tiny_model(tmp_path / "low-threshold")
    spec = json.loads((folder.path / "model.json").read_text(encoding="utf-8"))
    spec["postprocess"].update(keep_largest_vs_per_side=False, vs_max_z_distance_from_cochlea_mm=1000.0)
    (folder.path / "model.json").write_text(json.dumps(spec))
    plain = sitk.GetArrayFromImage(Segmenter(folder.path, device="cpu", threads=2).segment_image(small_scan).labels)
    spec["postprocess"]["vs_min_probability"] = 1e-6
    (folder.path / "model.json").write_text(json.dumps(spec))
    low = sitk.GetArrayFromImage(Segmenter(folder.path, device="cpu", threads=2).segment_image(small_scan).labels)
    assert (low == 1).sum() > (plain == 1).sum()
    assert ((low == 1) | (plain != 1)).all()  # every VS voxel stays VS
    assert (low[plain == 2] == 2).all()  # cochlea voxels untouched


def test_scan_without_inner_ears_is_refused(tmp_path, small_scan):
    from conftest import write_tiny_model

    folder = write_tiny_model(tmp_path / "blind", localiser_bias_cochlea=False)
    # Random weights with no cochlea bias: push the localiser to background everywhere.
    import torch
    from safetensors.torch import load_file, save_file

    from VSCochleaSegLib.model_folder import ModelSpec, sha256_file

    weights = load_file(str(folder.path / "localiser.safetensors"))
    weights["output_block.conv.conv.bias"] = torch.tensor([10.0, -10.0, -10.0])
    save_file(weights, str(folder.path / "localiser.safetensors"))
    spec = ModelSpec.from_json_file(folder.path / "model.json").to_dict()
    spec["localiser"]["sha256"] = sha256_file(folder.path / "localiser.safetensors")
    import json

    (folder.path / "model.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="inner ear"):
        Segmenter(folder.path, device="cpu").segment_image(small_scan)


def test_weights_that_do_not_fit_the_network_are_refused(tmp_path):
    import json

    from conftest import write_tiny_model

    folder = write_tiny_model(tmp_path / "mismatch")
    spec = json.loads((folder.path / "model.json").read_text(encoding="utf-8"))
    spec["segmentation"]["members"][0]["network"]["filters"] = [8, 16, 16]
    (folder.path / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ModelError, match="m3d"):
        Segmenter(folder.path, device="cpu")


def test_cuda_request_without_gpu_is_a_clear_error(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(Exception, match="no CUDA GPU"):
        Segmenter(tiny_model, device="cuda")
