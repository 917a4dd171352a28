"""Accuracy of a model on fresh hrT2 phantoms, scored with ``vscochleaseg evaluate`` (CrossMoDA metrics).

    python Testing/benchmarks/eval_phantoms.py [--model NAME|DIR] [--n 20] [--seed 9001] [--work DIR]

Seed 9001 is reserved for evaluation: no bundled model trained on it (the training seeds are read from the
model's ``provenance.data_seeds`` and the run refuses a model trained on the evaluation seed), the sample is
seed 4242, the speed benchmark seed 7777. Also measures the localiser: distance (mm) between each predicted cochlea
centre and the centre of that cochlea's label. Writes ``docs/results/phantom_eval.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(cmd):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=9001)
    ap.add_argument("--work", default=str(REPO / "work" / "eval"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "docs" / "results"))
    args = ap.parse_args(argv)
    import numpy as np
    import SimpleITK as sitk

    from VSCochleaSegLib.localise import cochlea_centres_from_labels
    from VSCochleaSegLib.model_folder import resolve_model

    spec = resolve_model(args.model).spec
    provenance = spec.provenance
    seeds = provenance.get("data_seeds", [])
    seed_text = ", ".join(f"{k} {v}" for k, v in seeds.items()) if isinstance(seeds, dict) else ", ".join(map(str, seeds))
    if args.seed in spec.data_seeds():
        sys.exit(f"seed {args.seed} was used to train this model (data seeds: {seed_text}); pick another --seed.")

    work = Path(args.work)
    data, pred = work / f"hrT2_seed{args.seed}", work / f"pred_seed{args.seed}"
    exe = [sys.executable, "-m", "VSCochleaSegLib.cli"]
    if len(list(data.glob("*_hrT2.nii.gz"))) < args.n:
        run(exe + ["phantom", str(data), "--n", str(args.n), "--seed", str(args.seed), "--modality", "hrT2", "--overwrite"])
    inputs = sorted(str(p) for p in data.glob("*_hrT2.nii.gz"))[: args.n]
    model = ["--model", args.model] if args.model else []
    run(exe + ["segment", *inputs, "-o", str(pred), "--device", "cpu", "--threads", str(args.threads), "--overwrite", "-q"] + model)
    scores_json = work / f"scores_seed{args.seed}.json"
    run(exe + ["evaluate", "--pred", str(pred), "--gt", str(data), "--json", str(scores_json), "-q"])
    scores = json.loads(scores_json.read_text(encoding="utf-8"))

    loc_err, timings, model_info = [], [], None
    for path in inputs:
        stem = Path(path).name[: -len(".nii.gz")]
        doc = json.loads((pred / f"{stem}.json").read_text(encoding="utf-8"))
        model_info = doc["model"]
        timings.append(doc["timings_s"]["total"])
        truth = cochlea_centres_from_labels(sitk.ReadImage(path.replace("_hrT2.nii.gz", "_Label.nii.gz")))
        for side in ("left", "right"):
            loc_err.append(float(np.linalg.norm(np.array(doc["cochlea_centres_lps_mm"][side]) - truth[side])))
    result = {
        "model": model_info, "seed": args.seed, "n_cases": len(inputs),
        "model_data_seeds": seeds, "hrT2_labels_used": provenance.get("hrT2_labels_used"),
        "mean": scores["mean"], "cases": scores["cases"],
        "localisation_error_mm": {"mean": statistics.mean(loc_err), "max": max(loc_err), "n_ears": len(loc_err)},
        "segment_seconds_mean": statistics.mean(timings),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "phantom_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    m = scores["mean"]
    md = [
        "# Bundled model on fresh hrT2 phantoms",
        "",
        f"`python Testing/benchmarks/eval_phantoms.py --n {args.n} --seed {args.seed}`: {len(inputs)} phantoms from "
        f"seed {args.seed} (model's data seeds: {seed_text}; hrT2 labels used in training: "
        f"{'yes' if provenance.get('hrT2_labels_used') else 'no'}), model `{model_info['name']}` {model_info['version']} "
        f"(members {', '.join(model_info['members'])}), scored by `vscochleaseg evaluate`.",
        "",
        "| | VS Dice | VS ASSD (mm) | Cochlea Dice | Cochlea ASSD (mm) |",
        "|---|---|---|---|---|",
        f"| mean | {m['VS_Dice']:.3f} | {m['VS_ASSD']:.2f} | {m['Cochlea_Dice']:.3f} | {m['Cochlea_ASSD']:.2f} |",
        f"| min / max Dice | {min(c['VS_Dice'] for c in scores['cases'].values()):.3f} / "
        f"{max(c['VS_Dice'] for c in scores['cases'].values()):.3f} | | "
        f"{min(c['Cochlea_Dice'] for c in scores['cases'].values()):.3f} / "
        f"{max(c['Cochlea_Dice'] for c in scores['cases'].values()):.3f} | |",
        "",
        f"Localiser: cochlea centre error {result['localisation_error_mm']['mean']:.1f} mm mean, "
        f"{result['localisation_error_mm']['max']:.1f} mm max over {len(loc_err)} ears. "
        f"Mean time per case (2 threads, CPU): {result['segment_seconds_mean']:.1f} s.",
        "",
        "Phantoms are synthetic: these figures say the engine and training work, not how a model does on real MRI.",
        "",
    ]
    (out / "phantom_eval.md").write_text("\n".join(md), encoding="utf-8")
    print("\n".join(md))


if __name__ == "__main__":
    main()
