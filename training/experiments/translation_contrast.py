"""Does a 2 mm ceT1 → hrT2 translator produce hrT2 contrast? Train one on a pipeline run's prepared volumes.

    python -m training.experiments.translation_contrast RUN OUT '{"iterations": 600, "seg_grad_to_generator": false}'
    python -m training.experiments.translation_contrast RUN OUT '{"iterations": 1600}' crops

``RUN`` is a ``training.pipeline`` run folder whose ``prepare`` stage is done (e.g. the benchmark's
``work/benchmark/runs/method_a``); the JSON overrides the config's ``translation.localiser`` section (or,
with ``crops``, the 0.5 mm ear-crop translator's ``translation.crops``, which also needs the run's
``target_crops`` stage). Prints, for the first 10 source cases, the mean intensity of the VS and of the
inner-ear region (2 mm: the localiser's target; crops: the cochlea) and the head's 90th percentile, each
divided by the head's median — for real ceT1 and for fake hrT2. Compare with the same figures of real hrT2
(docs/training.md). Uses only ceT1 labels.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from training.pipeline import load_config, translate_in_head
from training.translation import TranslationConfig, train_translation


def tissue_contrast(volume_zyx: np.ndarray, labels_zyx: np.ndarray) -> list[float]:
    """[VS mean, inner-ear-region mean, 90th percentile] of the head, each / the head's median intensity."""
    v = np.asarray(volume_zyx, np.float32)
    head = v > 0.05
    median = float(np.median(v[head]))
    means = [float(v[labels_zyx == c].mean()) / median if (labels_zyx == c).any() else float("nan") for c in (1, 2)]
    return means + [float(np.percentile(v[head], 90)) / median]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    run, out = Path(argv[0]), Path(argv[1])
    overrides = json.loads(argv[2]) if len(argv) > 2 else {}
    scale = argv[3] if len(argv) > 3 else "localiser"
    cfg = load_config(str(run / "config.json"))
    source = [np.load(p) for p in sorted((run / "prepare" / "cet1").glob("*.npz"))]
    if scale == "crops":
        pairs = [(z[f"crop{k}_image"], z[f"crop{k}_labels"]) for z in source for k in range(4) if f"crop{k}_image" in z.files]
        target = [c for p in sorted((run / "target_crops").glob("*.npz")) for c in np.load(p)["crops"]]
    else:
        pairs = [(z["localiser_image"], z["localiser_labels"]) for z in source]
        target = [np.load(p)["localiser_image"] for p in sorted((run / "prepare" / "hrt2").glob("*.npz"))]
    tcfg = TranslationConfig.from_dict({**cfg["translation"][scale], "threads": cfg.get("threads"), **overrides})
    t0 = time.time()
    translator = train_translation([np.asarray(img, np.float32) for img, _ in pairs], [lab for _, lab in pairs],
                                   [np.asarray(t, np.float32) for t in target], tcfg, out)
    minutes = (time.time() - t0) / 60
    real = [tissue_contrast(img, lab) for img, lab in pairs[:10]]
    fake = [tissue_contrast(translate_in_head(translator, img, translator.snapshots[-1], lab), lab) for img, lab in pairs[:10]]
    print(json.dumps({"scale": scale, "overrides": overrides, "train_minutes": round(minutes, 1),
                      "columns": ["VS/median", "inner_ear/median", "p90/median"],
                      "real_ceT1": np.round(np.nanmean(real, 0), 2).tolist(),
                      "fake_hrT2": np.round(np.nanmean(fake, 0), 2).tolist()}))


if __name__ == "__main__":
    main()
