"""The target hrT2 scans' true labels on a finished pipeline run's own ear-crop grids (diagnostics only).

The benchmark writes the target scans' ``<case>_Label.nii.gz`` to ``work/.../data/target_labels`` for diagnosis;
the pipeline never reads them. Each label map is cut exactly as the pipeline cut the image crops
(``target_crops/<case>.npz``: the crops and the two cochlea positions it found; 0.5 × 0.5 × 1 mm grid).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from VSCochleaSegLib.labels import VS
from VSCochleaSegLib.localise import EarLocations
from VSCochleaSegLib.normalisation import IntensityScale

from training import pipeline


def target_crops_with_truth(run_dir: Path, labels_dir: Path, label: int = VS
                            ) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(case, image crop (z, y, x) as stored, true ``label`` mask (z, y, x) bool) for every target ear crop, in
    the order of ``pipeline._target_crops`` (the index the pseudo-label stage's ``crop`` column counts)."""
    cfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    for p in sorted((run_dir / "target_crops").glob("*.npz")):
        with np.load(p) as z:
            crops, (left, right) = z["crops"], z["cochlea_lps"]
        mask = sitk.Cast(sitk.ReadImage(str(labels_dir / f"{p.stem}_Label.nii.gz")) == label, sitk.sitkFloat32)
        ears = EarLocations.from_cochleae({"left": left, "right": right})  # as the pipeline cut the crops
        for crop, true in zip(crops, pipeline.ear_crops(mask, ears, cfg, IntensityScale(0.0, 1.0))):
            yield p.stem, crop, np.asarray(true, np.float32) > 0.5
