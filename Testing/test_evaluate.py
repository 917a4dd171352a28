"""Specification of folder evaluation: pairing by case id, missing/extra predictions, table and JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from VSCochleaSegLib.errors import InputError
from VSCochleaSegLib.evaluate import EvaluationResult, evaluate_folders, format_table, write_json
from VSCochleaSegLib.labels import COCHLEA, VS

METRICS = {"VS_Dice", "VS_ASSD", "Cochlea_Dice", "Cochlea_ASSD"}


def reference_labels() -> np.ndarray:
    """(z, y, x) labels: a 2×2×2 VS cube and a one-voxel cochlea."""
    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[1:3, 1:3, 1:3] = VS
    labels[4, 4, 4] = COCHLEA
    return labels


def write_labels(path, labels: np.ndarray) -> None:
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path))


@pytest.fixture
def folders(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    return pred_dir, gt_dir


def test_pairs_predictions_with_references_by_case_id(folders):
    pred_dir, gt_dir = folders
    for case_id in ("crossmoda2021_ldn_1", "crossmoda2021_ldn_2"):
        write_labels(gt_dir / f"{case_id}_Label.nii.gz", reference_labels())
        write_labels(pred_dir / f"{case_id}_hrT2_seg.nii.gz", reference_labels())
    result = evaluate_folders(pred_dir, gt_dir, progress=False)
    assert sorted(result.cases) == ["crossmoda2021_ldn_1", "crossmoda2021_ldn_2"]
    perfect = {"VS_Dice": 1.0, "VS_ASSD": 0.0, "Cochlea_Dice": 1.0, "Cochlea_ASSD": 0.0}
    assert result.cases["crossmoda2021_ldn_1"] == perfect
    assert result.missing_predictions == [] and result.unmatched_predictions == []


def test_mean_is_over_cases(folders):
    pred_dir, gt_dir = folders
    write_labels(gt_dir / "a_Label.nii.gz", reference_labels())
    write_labels(pred_dir / "a_hrT2_seg.nii.gz", reference_labels())
    no_cochlea = reference_labels()
    no_cochlea[no_cochlea == COCHLEA] = 0
    write_labels(gt_dir / "b_Label.nii.gz", reference_labels())
    write_labels(pred_dir / "b_hrT2_seg.nii.gz", no_cochlea)
    result = evaluate_folders(pred_dir, gt_dir, progress=False)
    # Case a is perfect, case b misses the cochlea (Dice 0, ASSD 350).
    assert result.mean == {"VS_Dice": 1.0, "VS_ASSD": 0.0, "Cochlea_Dice": 0.5, "Cochlea_ASSD": 175.0}


def test_missing_prediction_is_scored_as_empty_and_listed(folders):
    pred_dir, gt_dir = folders
    write_labels(gt_dir / "a_Label.nii.gz", reference_labels())
    write_labels(pred_dir / "a_hrT2_seg.nii.gz", reference_labels())
    write_labels(gt_dir / "b_Label.nii.gz", reference_labels())
    result = evaluate_folders(pred_dir, gt_dir, progress=False)
    assert result.missing_predictions == ["b"]
    assert result.cases["b"] == {"VS_Dice": 0.0, "VS_ASSD": 350.0, "Cochlea_Dice": 0.0, "Cochlea_ASSD": 350.0}
    assert result.mean["VS_Dice"] == 0.5


def test_prediction_without_reference_is_listed_and_ignored(folders):
    pred_dir, gt_dir = folders
    write_labels(gt_dir / "a_Label.nii.gz", reference_labels())
    write_labels(pred_dir / "a_hrT2_seg.nii.gz", reference_labels())
    write_labels(pred_dir / "extra_hrT2_seg.nii.gz", np.zeros((6, 6, 6), np.uint8))
    result = evaluate_folders(pred_dir, gt_dir, progress=False)
    assert result.unmatched_predictions == ["extra"]
    assert list(result.cases) == ["a"]
    assert result.mean["VS_Dice"] == 1.0


def test_no_matching_pair_is_an_input_error(folders):
    pred_dir, gt_dir = folders
    write_labels(gt_dir / "a_Label.nii.gz", reference_labels())
    write_labels(pred_dir / "a_seg.nii.gz", reference_labels())  # wrong naming
    with pytest.raises(InputError, match="_hrT2_seg.nii.gz"):
        evaluate_folders(pred_dir, gt_dir, progress=False)


def test_missing_folder_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        evaluate_folders(tmp_path / "nope", tmp_path, progress=False)


def test_prediction_on_another_grid_names_the_case(folders):
    pred_dir, gt_dir = folders
    write_labels(gt_dir / "a_Label.nii.gz", reference_labels())
    write_labels(pred_dir / "a_hrT2_seg.nii.gz", np.zeros((6, 6, 7), np.uint8))
    with pytest.raises(InputError, match="Case a: .*size"):
        evaluate_folders(pred_dir, gt_dir, progress=False)


def example_result() -> EvaluationResult:
    perfect = {"VS_Dice": 1.0, "VS_ASSD": 0.0, "Cochlea_Dice": 1.0, "Cochlea_ASSD": 0.0}
    empty = {"VS_Dice": 0.0, "VS_ASSD": 350.0, "Cochlea_Dice": 0.0, "Cochlea_ASSD": 350.0}
    mean = {"VS_Dice": 0.5, "VS_ASSD": 175.0, "Cochlea_Dice": 0.5, "Cochlea_ASSD": 175.0}
    return EvaluationResult(
        cases={"a": perfect, "b": empty}, mean=mean, missing_predictions=["b"], unmatched_predictions=["x"]
    )


def test_table_has_a_row_per_case_and_a_mean_row_with_three_decimals():
    table = format_table(example_result())
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line[:1] in ("a", "b", "m")}
    assert rows["a"] == ["1.000", "0.000", "1.000", "0.000"]
    assert rows["b*"] == ["0.000", "350.000", "0.000", "350.000"]  # * marks a missing prediction
    assert rows["mean"] == ["0.500", "175.000", "0.500", "175.000"]


def test_json_has_cases_mean_with_count_and_both_id_lists(tmp_path):
    path = tmp_path / "scores.json"
    write_json(example_result(), path)
    written = json.loads(path.read_text(encoding="utf-8"))
    assert set(written) == {"cases", "mean", "missing_predictions", "unmatched_predictions"}
    assert set(written["cases"]["a"]) == METRICS
    assert written["mean"] == {**example_result().mean, "n_cases": 2}
    assert written["missing_predictions"] == ["b"]
    assert written["unmatched_predictions"] == ["x"]


def test_json_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text("old")
    write_json(example_result(), path)
    assert json.loads(path.read_text(encoding="utf-8"))["mean"]["n_cases"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]
