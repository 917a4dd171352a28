"""The domain-adaptation benchmark's full pipeline and oracle on extra sets of hrT2 phantoms: how far one test set's
full-over-oracle ratio can be trusted.

    python Testing/benchmarks/uda_extra_sets.py --work work/benchmark [--sets 9001:20 3401:16 3402:16 3501:20]

``--work`` is a ``python -m training.benchmark --work`` folder (its ``runs/method_a/model`` and ``runs/oracle/model``
are scored, and its own ``data/test`` set too). Each extra set is ``SEED:N`` hrT2 phantoms with labels, made by the
same generator as the benchmark's (``training.benchmark.phantom_jobs``); a seed the models were trained on is refused.
Seeds 3401 / 3402 chose ``postprocess.vs_min_probability`` (docs/training.md, session 34); 9001 is the bundled model's
evaluation seed (its case 009 motivated ``postprocess.vs_large_volume_mm3``); 3501 was made in session 35, after the
last choice, and has informed none. Writes ``phantom_uda_extra.json`` and ``.md`` into ``--out`` (default ``docs/benchmark``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

MODELS = {"full_pipeline": Path("runs/method_a/model"), "oracle": Path("runs/oracle/model")}
METRICS = ("VS_Dice", "Cochlea_Dice")


def summarise(scores: dict, work: Path) -> dict:
    """``{set: {model: evaluate() result}}`` → per-set means (and VS Dice per case) and the means pooled over all
    cases, with the full-over-oracle ratios."""
    rows, pooled = {}, {name: {m: [] for m in METRICS} for name in MODELS}
    for s, by_model in scores.items():
        rows[s] = {name: {**{m: round(r["mean"][m], 4) for m in METRICS}, "n": len(r["cases"]),
                          "VS_Dice_cases": [round(c["VS_Dice"], 4) for c in r["cases"].values()]}
                   for name, r in by_model.items()}
        for name, r in by_model.items():
            for m in METRICS:
                pooled[name][m] += [c[m] for c in r["cases"].values()]
    means = {name: {m: sum(v) / len(v) for m, v in by_metric.items()} for name, by_metric in pooled.items()}
    full, oracle = means["full_pipeline"], means["oracle"]
    return {"work": str(work), "sets": rows,
            "pooled": {**{name: {m: round(v, 4) for m, v in by_metric.items()} for name, by_metric in means.items()},
                       "n": len(pooled["oracle"]["VS_Dice"]),
                       "vs_ratio": round(_ratio(full, oracle, "VS_Dice"), 3),
                       "cochlea_ratio": round(_ratio(full, oracle, "Cochlea_Dice"), 3)}}


def _ratio(full: dict, oracle: dict, metric: str) -> float:
    return full[metric] / max(oracle[metric], 1e-6)


def markdown(result: dict) -> list:
    """The table of :func:`summarise`'s result, one line per set and a bold pooled line."""
    def row(label, n, f, o, ratios):
        return (f"| {label} | {n} | {f['VS_Dice']:.3f} / {f['Cochlea_Dice']:.3f} | "
                f"{o['VS_Dice']:.3f} / {o['Cochlea_Dice']:.3f} | {ratios} |")

    lines = ["# Phantom UDA benchmark: the same models on extra test sets", "",
             f"`python Testing/benchmarks/uda_extra_sets.py --work {result['work']}`: full pipeline and oracle of that run "
             "on its own test set and on extra hrT2 phantom sets of the same generator (VS / cochlea Dice).", "",
             "| set | n | full pipeline | oracle | VS ratio | cochlea ratio |", "|---|---|---|---|---|---|"]
    for s, r in result["sets"].items():
        f, o = r["full_pipeline"], r["oracle"]
        lines.append(row(s, f["n"], f, o, " | ".join(f"{_ratio(f, o, m):.3f}" for m in METRICS)))
    p = result["pooled"]
    lines.append(row("**pooled**", p["n"], p["full_pipeline"], p["oracle"],
                     f"**{p['vs_ratio']:.3f}** | **{p['cochlea_ratio']:.3f}**"))
    return lines


def main(argv=None):
    from VSCochleaSegLib.model_folder import ModelSpec
    from training.benchmark import evaluate, phantom_jobs, render_phantoms

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="a training.benchmark --work folder")
    ap.add_argument("--sets", nargs="+", default=["9001:20", "3401:16", "3402:16", "3501:20"], help="SEED:N hrT2 phantom sets")
    ap.add_argument("--data", default=str(REPO / "work" / "uda_extra"), help="where the extra phantoms are made")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmark"))
    args = ap.parse_args(argv)

    work = Path(args.work)
    models = {name: work / rel for name, rel in MODELS.items()}
    for name, folder in models.items():
        if not (folder / "model.json").is_file():
            sys.exit(f"{folder} has no model.json: --work must be a finished `python -m training.benchmark` folder.")
    used = set().union(*(ModelSpec.from_json_file(f / "model.json").data_seeds(with_test=False) for f in models.values()))
    sets, jobs = {"benchmark test": work / "data" / "test"}, []
    for spec in args.sets:
        seed, n = (int(v) for v in spec.split(":"))
        if seed in used:
            sys.exit(f"seed {seed} was used to train these models (seeds {sorted(used)}); pick another.")
        sets[f"seed {seed}"] = folder = Path(args.data) / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs += phantom_jobs(folder, "extra", "hrT2", seed, n)
    render_phantoms(jobs, progress=False)

    scores = {s: {name: evaluate(folder, d, args.threads, False) for name, folder in models.items()}
              for s, d in sets.items()}
    result = summarise(scores, work)
    lines = markdown(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "phantom_uda_extra.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "phantom_uda_extra.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
