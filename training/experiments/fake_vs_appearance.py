"""How the tumour looks in fake hrT2 crops against real hrT2 crops of a finished pipeline run (diagnostics only).

    python -m training.experiments.fake_vs_appearance RUN_DIR LABELS_DIR [--json OUT.json]

``RUN_DIR`` is a pipeline run (``translate_crops/fake/*.npz``: fake crops with their ceT1 labels;
``target_crops/*.npz``: the real hrT2 ear crops the pipeline cut, with the cochlea positions it found).
``LABELS_DIR`` holds ``<case>_Label.nii.gz`` of the *target* hrT2 scans — the benchmark writes them to
``work/.../data/target_labels`` for diagnosis; the pipeline never reads them. Both sides are measured in the same
crop space (0.5 × 0.5 × 1 mm, engine-normalised intensities, 0 = air, 1 = upper percentile):

- VS median intensity;
- the median of a ring around the VS (the tumour dilated 3 voxels = 1.5 mm in-plane, minus the tumour);
- the share of ring voxels brighter than 0.6 (CSF on hrT2; the cisterns a real VS sits in);
- VS / ring median ratio.

Only the plain fakes (each translator snapshot's output) are measured, not their tumour-augmented or
random-contrast copies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from training.experiments.target_truth import target_crops_with_truth
from training.translation.augment import tumour_ring

BRIGHT = 0.6  # engine-normalised intensity above which a voxel counts as CSF-bright
RING_VOXELS = 3  # in-plane dilation of the ring (0.5 mm voxels: 1.5 mm)


def ring_stats(image_zyx: np.ndarray, vs_zyx: np.ndarray, width: int = RING_VOXELS) -> dict:
    """VS and ring statistics of one crop. ``image_zyx`` float (z, y, x); ``vs_zyx`` boolean, same shape, not empty."""
    vs = np.asarray(vs_zyx, bool)
    ring = tumour_ring(vs, width)
    img = np.asarray(image_zyx, np.float32)
    vs_median, ring_median = float(np.median(img[vs])), float(np.median(img[ring]))
    return {"vs_median": vs_median, "ring_median": ring_median, "ring_bright_share": float(np.mean(img[ring] > BRIGHT)),
            "vs_over_ring": vs_median / ring_median if ring_median > 0 else float("nan"), "vs_voxels": int(vs.sum())}


def fake_crop_stats(run_dir: Path, snapshots: int) -> list[dict]:
    """Stats of the plain fakes: per source crop the npz holds, in order, for each snapshot the fake and (VS crops)
    its tumour-augmented copy, then the random-contrast copies (``pipeline.stage_translate_crops``)."""
    tcfg = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["translation"]
    contrast = int(tcfg.get("random_contrast_copies", 0))
    probability = float(tcfg.get("tumour_augmentation", {}).get("probability", 0.0))
    if probability not in (0.0, 1.0):
        raise ValueError(f"tumour augmentation probability {probability}: the plain fakes cannot be told apart "
                         "from augmented copies; measure a run made with probability 0 or 1")
    augmented = probability == 1.0
    out = []
    for p in sorted((run_dir / "translate_crops" / "fake").glob("*.npz")):
        with np.load(p) as z:
            images, labels = z["images"], z["labels"]
        i = 0
        while i < len(images):
            has_vs = bool((labels[i] == 1).any())
            step = 2 if has_vs and augmented else 1
            if has_vs:
                out += [ring_stats(images[i + k * step].astype(np.float32), labels[i + k * step] == 1)
                        for k in range(snapshots)]
            i += snapshots * step + contrast
    return out


def real_crop_stats(run_dir: Path, labels_dir: Path, min_voxels: int = 20) -> list[dict]:
    """Stats of the real hrT2 ear crops, their VS cut from the target label maps on the pipeline's crop grids."""
    return [ring_stats(crop.astype(np.float32), vs) for _, crop, vs in target_crops_with_truth(run_dir, labels_dir)
            if vs.sum() >= min_voxels]


def summarise(stats: list[dict]) -> dict:
    """Medians over crops (and the VS median's quartiles)."""
    a = {k: np.array([s[k] for s in stats], float) for k in stats[0]}
    return {"n_crops": len(stats), **{k: round(float(np.nanmedian(v)), 3) for k, v in a.items()},
            "vs_median_quartiles": [round(float(q), 3) for q in np.percentile(a["vs_median"], [25, 75])]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("labels_dir", type=Path, help="target hrT2 label maps (diagnosis only)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    snapshots = len(json.loads((args.run_dir / "translate_crops" / "done.json").read_text())["info"]["snapshots"])
    result = {"fake": summarise(fake_crop_stats(args.run_dir, snapshots)),
              "real": summarise(real_crop_stats(args.run_dir, args.labels_dir))}
    for name, s in result.items():
        print(f"{name:5s} n={s['n_crops']:3d}  VS {s['vs_median']:.2f} (IQR {s['vs_median_quartiles'][0]:.2f}–"
              f"{s['vs_median_quartiles'][1]:.2f})  ring {s['ring_median']:.2f}  VS/ring {s['vs_over_ring']:.2f}  "
              f"bright ring share {s['ring_bright_share']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
