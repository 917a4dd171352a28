"""Score a folder of predicted label maps against a folder of reference labels, CrossMoDA style.

Predictions are ``<id>_hrT2_seg.nii.gz`` and references ``<id>_Label.nii.gz``; a case is a
reference id. As in the challenge, a reference case without a prediction is scored as an empty
prediction (Dice 0, ASSD 350 mm when the reference has the structure) and listed in
``missing_predictions``; predictions without a reference are listed in
``unmatched_predictions`` and otherwise ignored. Means are over all reference cases.

Usage::

    result = evaluate_folders("outputs/val", "data/crossmoda/val_labels")
    print(format_table(result))
    write_json(result, "outputs/val/scores.json")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from .errors import InputError
from .metrics import METRIC_NAMES, score_case

PREDICTION_SUFFIX = "_hrT2_seg.nii.gz"
REFERENCE_SUFFIX = "_Label.nii.gz"

PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class EvaluationResult:
    """Scores of every reference case and their mean.

    ``cases`` maps case id → {"VS_Dice", "VS_ASSD", "Cochlea_Dice", "Cochlea_ASSD"} (ASSD in mm);
    ``mean`` holds the same four keys averaged over all cases (missing predictions included).
    """

    cases: dict[str, dict[str, float]]
    mean: dict[str, float]
    missing_predictions: list[str] = field(default_factory=list)
    unmatched_predictions: list[str] = field(default_factory=list)

    @property
    def n_cases(self) -> int:
        return len(self.cases)

    def to_dict(self) -> dict:
        """The JSON layout written by ``write_json``."""
        return {
            "cases": {case_id: dict(scores) for case_id, scores in self.cases.items()},
            "mean": {**self.mean, "n_cases": self.n_cases},
            "missing_predictions": list(self.missing_predictions),
            "unmatched_predictions": list(self.unmatched_predictions),
        }


def evaluate_folders(pred_dir: PathLike, gt_dir: PathLike, progress: bool = True) -> EvaluationResult:
    """Pair predictions with references by case id, score each pair and average.

    Raises InputError if a folder is missing, holds no reference labels, or no prediction
    matches any reference (almost always a wrong folder or naming, not a 0-score model).
    """
    predictions = _files_by_id(pred_dir, PREDICTION_SUFFIX, "prediction")
    references = _files_by_id(gt_dir, REFERENCE_SUFFIX, "reference")
    if not references:
        raise InputError(f"No reference labels '*{REFERENCE_SUFFIX}' in {gt_dir}.")
    matched = sorted(set(references) & set(predictions))
    if not matched:
        raise InputError(
            f"No prediction in {pred_dir} matches a reference in {gt_dir}: expected files named "
            f"'<id>{PREDICTION_SUFFIX}' for references '<id>{REFERENCE_SUFFIX}' "
            f"(found {len(predictions)} predictions, {len(references)} references)."
        )
    missing = sorted(set(references) - set(predictions))
    unmatched = sorted(set(predictions) - set(references))

    cases: dict[str, dict[str, float]] = {}
    for case_id in tqdm(sorted(references), desc="Scoring", unit="case", disable=not progress):
        reference = sitk.ReadImage(str(references[case_id]))
        if case_id in predictions:
            prediction = sitk.ReadImage(str(predictions[case_id]))
        else:
            prediction = _empty_like(reference)
        try:
            cases[case_id] = score_case(prediction, reference)
        except InputError as error:
            raise InputError(f"Case {case_id}: {error}") from error

    mean = {name: float(np.mean([scores[name] for scores in cases.values()])) for name in METRIC_NAMES}
    return EvaluationResult(cases=cases, mean=mean, missing_predictions=missing, unmatched_predictions=unmatched)


def format_table(result: EvaluationResult) -> str:
    """A plain-text table: one row per case (missing predictions marked ``*``), then the mean."""
    id_width = max([len("mean")] + [len(case_id) + 1 for case_id in result.cases])
    header = f"{'case':<{id_width}}" + "".join(f"  {name:>12}" for name in METRIC_NAMES)
    lines = [header, "-" * len(header)]
    for case_id, scores in result.cases.items():
        marked_id = case_id + ("*" if case_id in result.missing_predictions else "")
        lines.append(f"{marked_id:<{id_width}}" + "".join(f"  {scores[name]:>12.3f}" for name in METRIC_NAMES))
    lines.append("-" * len(header))
    lines.append(f"{'mean':<{id_width}}" + "".join(f"  {result.mean[name]:>12.3f}" for name in METRIC_NAMES))
    if result.missing_predictions:
        lines.append(f"* no prediction: scored as empty ({len(result.missing_predictions)} cases)")
    if result.unmatched_predictions:
        lines.append(f"ignored predictions without reference: {', '.join(result.unmatched_predictions)}")
    return "\n".join(lines)


def write_json(result: EvaluationResult, path: PathLike) -> None:
    """Write ``result.to_dict()`` to ``path`` atomically (replacing it), so a reader never sees half a file."""
    from .io import write_json_atomic

    write_json_atomic(result.to_dict(), path, overwrite=True)


def _files_by_id(folder: PathLike, suffix: str, role: str) -> dict[str, Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"The {role} folder {folder} does not exist or is not a folder.")
    return {
        path.name[: -len(suffix)]: path
        for path in folder.iterdir()
        if path.name.endswith(suffix) and len(path.name) > len(suffix) and path.is_file()
    }


def _empty_like(reference: sitk.Image) -> sitk.Image:
    empty = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(reference)
    return empty
