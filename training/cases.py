"""Find training cases in a CrossMoDA-layout folder: ``<id>_<modality>.nii.gz`` + ``<id>_Label.nii.gz``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None


def list_cases(folder, modality: str = "hrT2", require_labels: bool = True) -> list[Case]:
    folder = Path(folder)
    suffix = f"_{modality}.nii.gz"
    cases = []
    for image in sorted(folder.glob(f"*{suffix}")):
        case_id = image.name[: -len(suffix)]
        label = folder / f"{case_id}_Label.nii.gz"
        if not label.exists():
            if require_labels:
                continue
            label = None
        cases.append(Case(case_id, image, label))
    if not cases:
        raise FileNotFoundError(f"No *{suffix} cases{' with labels' if require_labels else ''} in {folder}")
    return cases
