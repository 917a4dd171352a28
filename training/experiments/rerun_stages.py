"""Re-run some stages of a finished pipeline run with config overrides, and score the result on test phantoms.

    python -m training.experiments.rerun_stages SRC_RUN OUT '{"translation.crops.iterations": 1200}' \\
        --stages translate_crops segment --data work/bench9/data/uda --test work/bench9/data/test
    python -m training.experiments.rerun_stages SRC_RUN OUT '{"members.0.train.seed": 13}' --stages segment ...
    python -m training.experiments.rerun_stages SRC_RUN OUT '{"self_training.train.learning_rate": 3e-4}' \\
        --stages pseudo_labels self_train ...
    python -m training.experiments.rerun_stages SRC_RUN OUT '{}' --stages target_crops pseudo_labels self_train \\
        --data MORE_TARGETS/uda ...   # more unlabelled hrT2 scans, translator and stage-3 members kept
    python -m training.experiments.rerun_stages SRC_RUN OUT '{"members.1": {...member seg2d_b, seed 13...}}' \\
        --reuse-weights seg2d=SRC_RUN/segment/seg2d.safetensors seg2d_b=RUN13/segment/seg2d.safetensors \\
        --stages segment pseudo_labels self_train ...

This is how the one-change-at-a-time measurements in docs/training.md are made: every stage not listed is
``SRC_RUN``'s own folder (a symbolic link), so only the listed stages — and nothing upstream — differ.
The overrides are dotted config paths (list items by index, e.g. ``members.0.train.seed``) applied to
``SRC_RUN/config.json``. ``translate_crops`` re-uses ``SRC_RUN``'s trained crop translator (only the fakes are
made again, e.g. with another tumour augmentation) unless ``--fresh-translator``. Exports
``OUT/model_translation_only`` after ``segment`` and ``OUT/model`` after ``self_train``; with ``--test`` scores
each with the engine and the CrossMoDA metrics exactly as ``training.benchmark`` does, and writes
``OUT/scores.json``. Test labels are read only for scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from training import pipeline


def apply_overrides(cfg: dict, overrides: dict) -> dict:
    """Set ``cfg[a][b][0][c] = value`` for every ``"a.b.0.c": value``; list items by index, and the index one
    past a list's end appends (``"members.1": {...}`` adds a second member to a one-member config). Returns ``cfg``."""
    for key, value in overrides.items():
        node = cfg
        *head, last = key.split(".")
        for part in head:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list) and int(last) == len(node):
            node.append(value)
        else:
            node[int(last) if isinstance(node, list) else last] = value
    return cfg


def reuse_weights(out: Path, pairs: list[str]) -> None:
    """Copy trained stage-3 weights into ``out/segment`` so the segment stage keeps them instead of training:
    every ``NAME=FILE`` becomes ``out/segment/NAME.safetensors`` (the stage still validates and checks them)."""
    seg = out / "segment"
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise SystemExit(f"--reuse-weights wants NAME=FILE with an existing .safetensors FILE, not {pair!r}")
        seg.mkdir(parents=True, exist_ok=True)
        if (seg / f"{name}.safetensors").exists():
            raise SystemExit(f"{seg / name}.safetensors exists already; use a new OUT folder")
        shutil.copyfile(path, seg / f"{name}.safetensors")


def link_other_stages(src: Path, out: Path, stages: list[str], fresh_translator: bool) -> None:
    """Symlink ``src``'s folders of the stages not re-run into ``out`` (and its crop translator, unless fresh)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in pipeline._STAGE_ORDER:
        if name not in stages and (src / name).exists() and not (out / name).exists():
            os.symlink((src / name).resolve(), out / name)
    translator = src / "translate_crops" / "translator"
    if "translate_crops" in stages and not fresh_translator and translator.exists():
        (out / "translate_crops").mkdir(exist_ok=True)
        if not (out / "translate_crops" / "translator").exists():
            os.symlink(translator.resolve(), out / "translate_crops" / "translator")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="finished pipeline run folder")
    ap.add_argument("out", type=Path, help="new run folder (must not hold other results)")
    ap.add_argument("overrides", nargs="?", default="{}", help='JSON {"dotted.config.path": value}')
    ap.add_argument("--stages", nargs="+", default=["translate_crops", "segment"], choices=pipeline._STAGE_ORDER[3:])
    ap.add_argument("--data", required=True, type=Path, help="the source run's data folder (ceT1 + hrT2)")
    ap.add_argument("--test", type=Path, help="labelled hrT2 test folder to score the exported models on")
    ap.add_argument("--fresh-translator", action="store_true", help="train the crop translator again")
    ap.add_argument("--reuse-weights", nargs="+", default=[], metavar="NAME=FILE",
                    help="stage-3 member weights to keep instead of training them (e.g. members of other runs "
                         "trained with other seeds on the same fakes); needs the segment stage")
    args = ap.parse_args(argv)

    overrides = json.loads(args.overrides)
    if args.reuse_weights and "segment" not in args.stages:
        raise SystemExit("--reuse-weights needs --stages segment ...")
    cfg = apply_overrides(json.loads((args.src / "config.json").read_text(encoding="utf-8")), overrides)
    link_other_stages(args.src, args.out, args.stages, args.fresh_translator)
    reuse_weights(args.out, args.reuse_weights)
    run = pipeline.Run(args.data, args.out, cfg, progress=False)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    for name in pipeline._STAGE_ORDER:
        if name in args.stages:
            done = run.stage(name, lambda d, fn=pipeline.STAGE_FUNCTIONS[name]: fn(run, d))
            print(f"{name}: {done['minutes']} min", flush=True)
    models = {}
    if "segment" in args.stages:
        models["translation_only"] = args.out / "model_translation_only"
        pipeline.export_model(run, "segment", models["translation_only"])
    if "self_train" in args.stages:
        models["self_trained"] = args.out / "model"
        pipeline.export_model(run, "self_train", models["self_trained"])
    scores = {}
    if args.test:
        from training.benchmark import evaluate

        for name, folder in models.items():
            result = evaluate(folder, args.test, int(cfg.get("threads") or 2), False)
            scores[name] = {"mean": {k: round(v, 4) for k, v in result["mean"].items()},
                            "per_case_dice": {case: {k: round(v, 3) for k, v in c.items() if "Dice" in k}
                                              for case, c in result["cases"].items()}}
            print(name, json.dumps(scores[name]["mean"]), flush=True)
        tmp = args.out / "scores.json.tmp"
        tmp.write_text(json.dumps({"overrides": overrides, "stages": args.stages,
                                   "source_run": str(args.src), "scores": scores}, indent=2), encoding="utf-8")
        tmp.replace(args.out / "scores.json")
    return scores


if __name__ == "__main__":
    main()
