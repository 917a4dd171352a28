"""How right the pseudo-labels of a finished pipeline run are, against the target scans' true labels (diagnostics only).

    python -m training.experiments.pseudo_label_quality RUN_DIR LABELS_DIR [--json OUT.json]

``RUN_DIR`` is a pipeline run with ``target_crops/`` and ``pseudo_labels/`` (``pseudo_labels.csv``: which ear
crops were used; ``pseudo_labels.npz``: their label maps, 0 background, 1 VS, 2 cochlea, 255 IGNORE).
``LABELS_DIR`` holds ``<case>_Label.nii.gz`` of the *target* hrT2 scans; the benchmark writes them to
``work/.../data/target_labels`` for diagnosis and the pipeline never reads them. The true labels are cut on the
pipeline's own crop grids (``target_truth``, 0.5 × 0.5 × 1 mm).

Per used crop, for the tumour (all counts in voxels of the crop grid, one voxel = 0.25 mm³):

- ``true_vs``: true VS voxels in the crop; ``pseudo_vs``: voxels labelled VS;
- ``vs_dice``: Dice of the pseudo VS against the true VS over the crop (IGNORE counts as not VS);
- ``true_vs_as_background``: true VS voxels labelled background — what teaches the network to shrink or miss the
  tumour; ``true_vs_ignored``: true VS voxels carrying no loss;
- ``false_vs``: voxels labelled VS that are not tumour.

The summary splits the used crops into: tumour found (true and pseudo VS overlap), tumour missed (true VS, no
pseudo VS overlap), false tumour (pseudo VS on a tumour-free crop or away from the true one), tumour-free and right.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from VSCochleaSegLib.labels import VS

from training.experiments.target_truth import target_crops_with_truth
from training.segmentation import IGNORE


def crop_quality(pseudo: np.ndarray, true_vs: np.ndarray) -> dict:
    """Counts of one crop. ``pseudo``: (z, y, x) pseudo-label map; ``true_vs``: (z, y, x) bool, same shape."""
    p_vs = pseudo == VS
    inter = int((p_vs & true_vs).sum())
    n_true, n_pseudo = int(true_vs.sum()), int(p_vs.sum())
    return {"true_vs": n_true, "pseudo_vs": n_pseudo,
            "vs_dice": round(2 * inter / (n_true + n_pseudo), 3) if n_true + n_pseudo else None,
            "true_vs_as_background": int((true_vs & (pseudo == 0)).sum()),
            "true_vs_ignored": int((true_vs & (pseudo == IGNORE)).sum()),
            "false_vs": n_pseudo - inter,
            "kind": ("found" if inter else "missed") if n_true else ("false" if n_pseudo else "free"),
            }


def summarise(rows: list[dict]) -> dict:
    """Crop counts per kind; over crops with a true tumour, the share of true VS voxels taught as background,
    ignored and labelled VS, and the mean Dice of found tumours."""
    kinds = {k: sum(r["kind"] == k for r in rows) for k in ("found", "missed", "false", "free")}
    with_vs = [r for r in rows if r["true_vs"]]
    total = sum(r["true_vs"] for r in with_vs) or 1
    found = [r["vs_dice"] for r in rows if r["kind"] == "found"]
    missed_with_false_vs = sum(r["true_vs"] > 0 and r["kind"] == "missed" and r["pseudo_vs"] > 0 for r in rows)
    return {"crops_used": len(rows), "kinds": kinds,
            "missed_with_false_vs": missed_with_false_vs,
            "true_vs_share_background": round(sum(r["true_vs_as_background"] for r in with_vs) / total, 3),
            "true_vs_share_ignored": round(sum(r["true_vs_ignored"] for r in with_vs) / total, 3),
            "true_vs_share_labelled_vs": round(1 - sum(r["true_vs_as_background"] + r["true_vs_ignored"]
                                                       for r in with_vs) / total, 3),
            "found_vs_dice_mean": round(float(np.mean(found)), 3) if found else None,
            "pseudo_over_true_volume_found": round(float(np.median([r["pseudo_vs"] / r["true_vs"] for r in rows
                                                                     if r["kind"] == "found"])), 3) if found else None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="pipeline run folder with target_crops/ and pseudo_labels/")
    ap.add_argument("labels", type=Path, help="folder of the target scans' <case>_Label.nii.gz (diagnosis only)")
    ap.add_argument("--json", type=Path, help="write the per-crop rows and the summary here")
    ap.add_argument("--pseudo", default="pseudo_labels",
                    help="pseudo-label folder inside RUN (default pseudo_labels; a later self-training round's: "
                         "self_train/round2_pseudo_labels)")
    args = ap.parse_args(argv)

    truth = [vs for _, _, vs in target_crops_with_truth(args.run, args.labels)]
    folder = args.run / args.pseudo
    with open(folder / "pseudo_labels.csv", newline="") as f:
        used = [(r["case"], int(r["crop"])) for r in csv.DictReader(f) if r["used"] == "True"]
    with np.load(folder / "pseudo_labels.npz") as z:
        labels = z["labels"] if z["labels"].ndim == 4 else np.zeros((0,))
    if len(labels) != len(used):
        raise SystemExit(f"{folder}: {len(labels)} label maps for {len(used)} used crops")
    rows = [{"case": case, "crop": k, **crop_quality(lab, truth[k])}
            for (case, k), lab in zip(used, labels)]
    result = {"run": str(args.run), "pseudo_labels": args.pseudo, "summary": summarise(rows), "crops": rows}
    print(json.dumps(result["summary"], indent=2))
    if args.json:
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
        tmp.replace(args.json)
    return result


if __name__ == "__main__":
    main()
