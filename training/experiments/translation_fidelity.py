"""How close a trained translator's fake hrT2 is to the true hrT2 of the same subject (diagnostics only).

    python -m training.experiments.translation_fidelity TRANSLATOR_DIR PAIRED_DIR CONFIG [--json OUT.json]

``PAIRED_DIR`` holds phantoms rendered in both contrasts on one grid with one label map
(``vscochleaseg phantom PAIRED_DIR --n 8 --seed S --modality both --paired``; use a seed no training set uses).
``CONFIG`` is the pipeline config (name or file) whose crop geometry and normalisation the translator was
trained with; ``TRANSLATOR_DIR`` a ``translate_crops/translator`` folder of a pipeline run.

Both contrasts are cut on the same ear-crop grids (cochlea centres from the label map, no jitter; 0.5 × 0.5 × 1 mm,
engine-normalised intensities, 0 = air, 1 = upper percentile), the ceT1 crop is translated, and the fake is
compared with the true hrT2 crop inside the head:

- ``corr``: Pearson correlation of fake and true hrT2 intensities; ``mae``: their mean absolute difference;
- ``csf_recall``: share of true CSF-bright voxels (true hrT2 > 0.6) that are bright in the fake too;
  ``csf_precision``: share of the fake's bright voxels that are bright on the true hrT2;
- ``vs_over_ring`` (fake and true): VS median over the median of a 1.5 mm ring around it
  (``fake_vs_appearance.ring_stats``), and the ring's bright share — how the tumour stands out from its cisterns.

The ceT1 crop itself is scored the same way (``identity`` row): the floor any translation must beat.
This measures translation without training a segmentation member, whose seed swings VS Dice more than most
translator changes do (docs/training.md). It needs paired subjects, which only phantoms have.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from VSCochleaSegLib.labels import VS
from VSCochleaSegLib.localise import EarLocations, cochlea_centres_from_labels
from VSCochleaSegLib.model_folder import NormalisationSpec
from VSCochleaSegLib.normalisation import IntensityScale, fit_intensity_scale

from training import pipeline
from training.experiments.fake_vs_appearance import BRIGHT, ring_stats
from training.translation import Translator


def crop_pair(case_prefix: Path, cfg: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """[(ceT1 crop, hrT2 crop, VS mask)] of both ears of one paired case, each (z, y, x) on the same grid."""
    labels = sitk.ReadImage(f"{case_prefix}_Label.nii.gz")
    ears = EarLocations.from_cochleae(cochlea_centres_from_labels(labels))
    norm = NormalisationSpec.from_dict(cfg["normalisation"])
    crops = {}
    for modality in ("ceT1", "hrT2"):
        image = sitk.Cast(sitk.ReadImage(f"{case_prefix}_{modality}.nii.gz"), sitk.sitkFloat32)
        scale = fit_intensity_scale(sitk.GetArrayViewFromImage(image), norm)
        crops[modality] = pipeline.ear_crops(image, ears, cfg, scale)
    vs = sitk.Cast(labels == VS, sitk.sitkFloat32)
    masks = pipeline.ear_crops(vs, ears, cfg, IntensityScale(0.0, 1.0))
    return [(np.float32(a), np.float32(b), np.asarray(m, np.float32) > 0.5)
            for a, b, m in zip(crops["ceT1"], crops["hrT2"], masks)]


def fidelity(fake: np.ndarray, true: np.ndarray, vs: np.ndarray) -> dict:
    """Scores of one fake crop against the true hrT2 crop; arrays (z, y, x), ``vs`` bool."""
    head = true > 0.05
    f, t = fake[head], true[head]
    bright_t, bright_f = t > BRIGHT, f > BRIGHT
    out = {"corr": float(np.corrcoef(f, t)[0, 1]), "mae": float(np.abs(f - t).mean()),
           "csf_recall": float(bright_f[bright_t].mean()) if bright_t.any() else float("nan"),
           "csf_precision": float(bright_t[bright_f].mean()) if bright_f.any() else float("nan")}
    if vs.sum() >= 20:
        fs, ts = ring_stats(fake, vs), ring_stats(true, vs)
        out.update(vs_over_ring_fake=fs["vs_over_ring"], vs_over_ring_true=ts["vs_over_ring"],
                   ring_bright_fake=fs["ring_bright_share"], ring_bright_true=ts["ring_bright_share"])
    return out


def _mean(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r})
    return {k: round(float(np.nanmean([r[k] for r in rows if k in r])), 3) for k in keys}


def evaluate(translator_dir: Path, paired_dir: Path, cfg: dict, snapshot=None) -> dict:
    """Mean scores of the translator's ``snapshot`` (None = last) and of the ceT1 crop itself over every ear crop."""
    translator = Translator.load(translator_dir)
    rows, identity = [], []
    for label_file in sorted(paired_dir.glob("*_Label.nii.gz")):
        prefix = paired_dir / label_file.name[: -len("_Label.nii.gz")]
        for cet1, hrt2, vs in crop_pair(prefix, cfg):
            rows.append(fidelity(pipeline.translate_in_head(translator, cet1, snapshot, np.where(vs, VS, 0)), hrt2, vs))
            identity.append(fidelity(cet1, hrt2, vs))
    return {"translator": str(translator_dir), "snapshot": snapshot, "n_crops": len(rows),
            "fake": _mean(rows), "identity": _mean(identity)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("translator", type=Path)
    ap.add_argument("paired", type=Path)
    ap.add_argument("config")
    ap.add_argument("--snapshot", type=int, default=None, help="training iteration of the generator (default: last)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    result = evaluate(args.translator, args.paired, pipeline.load_config(args.config), args.snapshot)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
