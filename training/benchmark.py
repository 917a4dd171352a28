"""Phantom benchmark of unsupervised domain adaptation ceT1 → hrT2: does adaptation close the gap?

    python -m training.benchmark --out docs/benchmark [--config phantom-cpu] [--work work/benchmark]

Data (``vscochleaseg`` phantoms, seeds from the config's ``benchmark`` section, never reused elsewhere):
ceT1 phantoms with labels (source), hrT2 phantoms of other subjects whose labels are set aside (target),
and held-out hrT2 phantoms with labels from a third seed (test). Variants, each exported as a model
folder and scored by the engine itself (``Segmenter`` + CrossMoDA Dice/ASSD; a scan where no ear is found
scores as an empty prediction, as in the challenge):

- ``no_adaptation``: the segmentation members trained on real ceT1 crops, applied to hrT2 (ears found by
  the pipeline's localiser, as CrossMoDA's registration-based crops were found independently of the
  segmenter); ``benchmark.no_adaptation_members`` N keeps only the first N members (time on a CPU budget:
  without adaptation one member scores ≈ 0 as the ensemble does);
- ``translation_only``: the pipeline's stage-3 members (fake hrT2 only);
- ``full_pipeline``: method a, stage-5 members (fake hrT2 + pseudo-labelled real hrT2);
- ``method_b``: Mean Teacher + cleanlab fusion on its translation's fake hrT2 (CutSeg in ``crossmoda``); the
  stages listed in ``benchmark.shared_with_method_b`` — prepare, 2 mm translation, localiser, real hrT2
  crops and, in ``phantom-cpu``, the crop translation — are the method-a run's folders, shared because
  their configs are identical (a stage whose config differs refuses to run in a shared folder);
- ``oracle``: members trained on the target hrT2 phantoms *with* their labels; its localiser is trained on
  those labels too, or, with ``benchmark.oracle_shares_localiser``, is the method-a run's (then every variant
  finds the ears with the same network and differs only in its segmentation members).

Writes ``phantom_uda.json`` ({"variants": {name: {VS_Dice, VS_ASSD, Cochlea_Dice, Cochlea_ASSD, n_test,
train_minutes}}, "config": ...}), ``phantom_uda.md`` and ``phantom_uda.png`` into ``--out``, and
re-exports the full pipeline's model folder with the figures in its provenance (``WORK/model``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from safetensors.torch import load_file, save_file

from VSCochleaSegLib.errors import InputError
from VSCochleaSegLib.metrics import METRIC_NAMES, score_case
from VSCochleaSegLib.model_folder import write_model_folder

from . import pipeline
from .segmentation import TrainConfig, train_network

VARIANTS = ("no_adaptation", "translation_only", "full_pipeline", "method_b", "oracle")
_STAGES_A = ["prepare", "translate_localiser", "localiser", "target_crops", "translate_crops"]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

def _render(job):
    from VSCochleaSegLib.phantoms import make_case, write_case

    kwargs, folder, acquisition = job
    if (Path(folder) / f"{kwargs['name']}_Label.nii.gz").exists():
        return
    write_case(make_case(**kwargs, acquisition=acquisition), Path(folder), overwrite=True)


def phantom_jobs(folder: Path, prefix: str, modality: str, seed: int, n: int, acquisition=None) -> list:
    """Jobs for ``render_phantoms``: cases ``<prefix>_<modality>_<seed>_<index>`` (image + labels) in ``folder``."""
    return [(dict(seed=seed, index=i, modalities=(modality,), stream=modality, name=f"{prefix}_{modality}_{seed}_{i:03d}"),
             folder, acquisition) for i in range(n)]


def render_phantoms(jobs: list, workers: int = 2, progress: bool = True) -> None:
    """Write the phantoms of ``phantom_jobs`` lists (cases already on disk are kept: generation is deterministic)."""
    from tqdm import tqdm

    with Pool(workers) as pool:
        list(tqdm(pool.imap_unordered(_render, jobs), total=len(jobs), desc="phantoms", disable=not progress))


def make_data(work: Path, bench: dict, workers: int = 2, progress: bool = True) -> dict:
    """``uda/`` (ceT1 + labels, hrT2 without), ``target_labels/`` (set aside, oracle only), ``oracle/``
    (target hrT2 + labels, symlinks) and ``test/`` (held-out hrT2 + labels) under ``work/data``."""
    seeds = bench["seeds"]
    d = {k: work / "data" / k for k in ("uda", "target_labels", "oracle", "test")}
    for p in d.values():
        p.mkdir(parents=True, exist_ok=True)
    acq = bench.get("acquisition")
    render_phantoms(phantom_jobs(d["uda"], "src", "ceT1", seeds["source_ceT1"], bench["n_source"], acq)
                    + phantom_jobs(d["target_labels"], "tgt", "hrT2", seeds["target_hrT2"], bench["n_target"], acq)
                    + phantom_jobs(d["test"], "test", "hrT2", seeds["test_hrT2"], bench["n_test"], acq),
                    workers, progress)
    # Target hrT2 images go to the adaptation folder without labels; the oracle folder links both.
    for img in sorted(d["target_labels"].glob("*_hrT2.nii.gz")):
        case = img.name[: -len("_hrT2.nii.gz")]
        for link, src in ((d["uda"] / img.name, img), (d["oracle"] / img.name, img),
                          (d["oracle"] / f"{case}_Label.nii.gz", d["target_labels"] / f"{case}_Label.nii.gz")):
            if not link.exists():
                os.symlink(src.resolve(), link)
    return d


# --------------------------------------------------------------------------------------------------
# Variants that are not a plain pipeline run
# --------------------------------------------------------------------------------------------------

def _plain_members(cfg: dict) -> list:
    """The config's members without domain randomisation (an adaptation technique, not a baseline's):
    the no-adaptation and oracle baselines are plain nnU-Net-style training."""
    return [{**m, "train": {k: v for k, v in m["train"].items() if not k.startswith("random_contrast")}}
            for m in cfg["members"]]


def train_no_adaptation(run_a: pipeline.Run, out: Path, cfg: dict, progress: bool) -> tuple[Path, float]:
    """Members trained on the real ceT1 crops of the method-a run (the first ``benchmark.no_adaptation_members``
    of them, all when unset); exported with its localiser."""
    n_members = cfg.get("benchmark", {}).get("no_adaptation_members")
    if n_members is not None and not (isinstance(n_members, int) and n_members >= 1):
        raise ValueError(f"benchmark.no_adaptation_members must be a whole number ≥ 1 or null, not {n_members!r}.")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    arrays = [c for _, a in pipeline._source_cases(run_a) for c in a["crops"]]
    members = []
    for m in _plain_members(cfg)[:n_members]:
        path = out / f"{m['name']}.safetensors"
        if not path.exists():
            sd = train_network(arrays, TrainConfig(**{**m["train"], "threads": cfg.get("threads")}), out, m["name"],
                               progress=progress)
            save_file(sd, str(path))
        members.append({"name": m["name"], "train": m["train"], "weight": m.get("weight", 1.0), "path": path})
    minutes = (time.time() - t0) / 60
    spec = pipeline.model_spec(cfg, members, "mean", {"hrT2_labels_used": False, "method": "no_adaptation",
                                                      "config": cfg})
    states = {"localiser": load_file(str(run_a.out / "localiser" / "localiser.safetensors"))}
    states.update({m["name"]: load_file(str(m["path"])) for m in members})
    write_model_folder(out / "model", spec, states, overwrite=True)
    return out / "model", minutes


def train_oracle(data: Path, out: Path, cfg: dict, localiser: Path | None = None) -> tuple[Path, float]:
    """The same members, supervised on the target hrT2 phantoms with their labels. With ``localiser`` (the
    method-a run's), ears are found exactly as in the other variants, so the variants differ only in how their
    segmentation members were trained; without it the oracle also trains its own localiser on hrT2 labels."""
    from .train_supervised import train_all

    ocfg = {**cfg, "modality": "hrT2", "name": cfg["name"] + "-oracle",
            "provenance": {**cfg.get("provenance", {}), "hrT2_labels_used": True, "method": "oracle",
                           "localiser": "shared with method a (no hrT2 label)" if localiser else "trained on hrT2 labels"}}
    ocfg["members"] = [{**m, "train": {**m["train"], "threads": cfg.get("threads")}} for m in _plain_members(cfg)]
    out.mkdir(parents=True, exist_ok=True)
    if localiser is not None and not (out / "localiser.safetensors").exists():
        shutil.copyfile(localiser, out / "localiser.safetensors")  # train_all keeps finished networks
    t0 = time.time()
    model = train_all(data, out, ocfg, out / "model", overwrite=True)
    minutes_file = out / "oracle_minutes.json"
    if not minutes_file.exists():
        minutes_file.write_text(json.dumps({"minutes": (time.time() - t0) / 60}))
    return model, json.loads(minutes_file.read_text(encoding="utf-8"))["minutes"]


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------

def evaluate(model_dir: Path, test_dir: Path, threads: int = 2, progress: bool = True) -> dict:
    """Mean and per-case CrossMoDA scores of a model folder on the labelled test scans."""
    from tqdm import tqdm

    from VSCochleaSegLib.pipeline import Segmenter

    segmenter = Segmenter(str(model_dir), device="cpu", threads=threads)
    cases, failures = {}, []
    t0 = time.time()
    for img_path in tqdm(sorted(test_dir.glob("*_hrT2.nii.gz")), desc=f"score {model_dir.parent.name}",
                         disable=not progress):
        case = img_path.name[: -len("_hrT2.nii.gz")]
        image = sitk.ReadImage(str(img_path))
        reference = sitk.ReadImage(str(test_dir / f"{case}_Label.nii.gz"))
        try:
            labels = segmenter.segment_image(image).labels
        except InputError:  # no ear found: scored as an empty prediction, as CrossMoDA does
            labels = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
            labels.CopyInformation(reference)
            failures.append(case)
        cases[case] = score_case(labels, reference)
    mean = {k: float(np.mean([c[k] for c in cases.values()])) for k in METRIC_NAMES}
    return {"mean": mean, "cases": cases, "no_ear_found": failures, "seconds_per_scan": (time.time() - t0) / len(cases)}


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------

def markdown_table(result: dict) -> str:
    lines = ["| variant | VS Dice | VS ASSD (mm) | Cochlea Dice | Cochlea ASSD (mm) | n test | train min |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {v['VS_Dice']:.3f} | {v['VS_ASSD']:.2f} | {v['Cochlea_Dice']:.3f} | "
                     f"{v['Cochlea_ASSD']:.2f} | {v['n_test']} | {v['train_minutes']:.1f} |")
    return "\n".join(lines)


def bar_plot(result: dict, path: Path) -> None:
    """Grouped bars of VS and cochlea Dice per variant (Pillow; no plotting library needed)."""
    from PIL import Image, ImageDraw, ImageFont

    names = list(result["variants"])
    w, h, left, bottom, top = 180 * len(names) + 120, 460, 70, 70, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    plot_h = h - bottom - top
    for tick in np.linspace(0, 1, 6):
        y = h - bottom - tick * plot_h
        draw.line([(left, y), (w - 20, y)], fill=(225, 225, 225))
        draw.text((left - 35, y - 6), f"{tick:.1f}", fill="black", font=font)
    colours = {"VS_Dice": (214, 96, 77), "Cochlea_Dice": (67, 147, 195)}
    for i, name in enumerate(names):
        x0 = left + 30 + i * 180
        for j, (key, colour) in enumerate(colours.items()):
            v = result["variants"][name][key]
            xa = x0 + j * 60
            draw.rectangle([xa, h - bottom - v * plot_h, xa + 50, h - bottom], fill=colour)
            draw.text((xa + 8, h - bottom - v * plot_h - 14), f"{v:.2f}", fill="black", font=font)
        draw.text((x0, h - bottom + 10), name, fill="black", font=font)
    draw.line([(left, h - bottom), (w - 20, h - bottom)], fill="black")
    draw.text((left, 15), "Phantom UDA benchmark: Dice on held-out hrT2 phantoms", fill="black", font=font)
    for j, (key, colour) in enumerate(colours.items()):
        draw.rectangle([w - 260 + j * 120, 14, w - 248 + j * 120, 26], fill=colour)
        draw.text((w - 242 + j * 120, 14), key.replace("_", " "), fill="black", font=font)
    img.save(path)


# --------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------

def machine_description() -> str:
    """CPU model, core count and whether bf16 is fast: benchmark minutes mean little without them."""
    from VSCochleaSegLib.inference import cpu_has_fast_bf16

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPU cores, fast bf16: {cpu_has_fast_bf16()}"


def run_benchmark(out_dir, work, config: str | dict = "phantom-cpu", backend=None, progress: bool = True) -> dict:
    t_start = time.time()
    cfg = pipeline.load_config(config) if isinstance(config, str) else config
    bench = cfg["benchmark"]
    out_dir, work = Path(out_dir), Path(work)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    t = time.time()
    data = make_data(work, bench, cfg.get("workers", 2), progress)
    timings["phantoms"] = (time.time() - t) / 60

    runs = work / "runs"
    # Method a: one run gives translation_only (stage 3) and full_pipeline (stage 5).
    full_model = pipeline.run_pipeline(data["uda"], runs / "method_a", cfg, backend, progress)
    run_a = pipeline.Run(data["uda"], runs / "method_a", cfg, backend, progress)
    run_a.minutes.update(pipeline.stage_minutes(run_a.out))
    m = run_a.minutes
    stage3 = sum(m[s] for s in _STAGES_A + ["segment"])
    minutes = {"translation_only": stage3, "full_pipeline": stage3 + m["pseudo_labels"] + m["self_train"]}

    # Method b: the shared first stages are the method-a run's own folders.
    cfg_b = pipeline.load_config(config, "method_b") if isinstance(config, str) else \
        pipeline.deep_update(cfg, cfg["variants"]["method_b"]) | {"variant": "method_b"}
    run_b_dir = runs / "method_b"
    run_b_dir.mkdir(parents=True, exist_ok=True)
    for stage in bench.get("shared_with_method_b", []):
        if not (run_b_dir / stage).exists():
            os.symlink((runs / "method_a" / stage).resolve(), run_b_dir / stage)
    model_b = pipeline.run_pipeline(data["uda"], run_b_dir, cfg_b, backend, progress)
    minutes["method_b"] = sum(pipeline.stage_minutes(run_b_dir).values())  # the shared (linked) stages once

    no_adapt_model, no_adapt_min = train_no_adaptation(run_a, runs / "no_adaptation", cfg, progress)
    minutes["no_adaptation"] = m["prepare"] + m["translate_localiser"] + m["localiser"] + no_adapt_min
    shared_localiser = run_a.out / "localiser" / "localiser.safetensors" if bench.get("oracle_shares_localiser") else None
    oracle_model, minutes["oracle"] = train_oracle(data["oracle"], runs / "oracle", cfg, shared_localiser)

    models = {"no_adaptation": no_adapt_model, "translation_only": runs / "method_a" / "model_translation_only",
              "full_pipeline": full_model, "method_b": model_b, "oracle": oracle_model}
    scores = {}
    t = time.time()
    for name in VARIANTS:
        scores[name] = evaluate(Path(models[name]), data["test"], cfg.get("threads") or 2, progress)
    timings["evaluation"] = (time.time() - t) / 60
    timings["total"] = (time.time() - t_start) / 60
    result = {
        "variants": {name: {**{k: round(v, 4) for k, v in scores[name]["mean"].items()},
                            "n_test": len(scores[name]["cases"]), "train_minutes": round(minutes[name], 1),
                            "no_ear_found": scores[name]["no_ear_found"],
                            "seconds_per_scan": round(scores[name]["seconds_per_scan"], 2)}
                     for name in VARIANTS},
        "config": {"name": config if isinstance(config, str) else cfg["name"], "benchmark": bench,
                   "pipeline": cfg, "hrT2_labels_used_by_adaptation": False},
        "timings_minutes": {k: round(v, 1) for k, v in timings.items()},
        "per_case": {name: scores[name]["cases"] for name in VARIANTS},
        "machine": machine_description(),
    }
    v = result["variants"]
    result["acceptance"] = {
        "full_pipeline_vs_dice_over_oracle": round(v["full_pipeline"]["VS_Dice"] / max(v["oracle"]["VS_Dice"], 1e-6), 3),
        "full_pipeline_cochlea_dice_over_oracle": round(v["full_pipeline"]["Cochlea_Dice"] / max(v["oracle"]["Cochlea_Dice"], 1e-6), 3),
        "self_training_beats_translation_only": (v["full_pipeline"]["VS_Dice"] + v["full_pipeline"]["Cochlea_Dice"]
                                                 > v["translation_only"]["VS_Dice"] + v["translation_only"]["Cochlea_Dice"]),
    }
    (out_dir / "phantom_uda.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "phantom_uda.md").write_text(
        "# Phantom UDA benchmark\n\nGenerated by `python -m training.benchmark`; held-out hrT2 test phantoms "
        f"(seed {bench['seeds']['test_hrT2']}), CrossMoDA metrics.\n\n" + markdown_table(result) +
        f"\n\nAcceptance: {json.dumps(result['acceptance'])}\n\nTotal wall time {timings['total']:.1f} min on "
        f"{result['machine']}.\n\nSession-by-session analysis: [phantom_uda_history.md](phantom_uda_history.md).\n",
        encoding="utf-8")
    bar_plot(result, out_dir / "phantom_uda.png")
    # The full pipeline's model folder, with the figures it earned in its provenance.
    pipeline.export_model(run_a, "self_train", work / "model", extra_provenance={
        "benchmark": {k: result["variants"][k] for k in VARIANTS}, "benchmark_acceptance": result["acceptance"]})
    print(markdown_table(result))
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/benchmark", help="where phantom_uda.json/.md/.png go")
    ap.add_argument("--work", default="work/benchmark", help="phantoms, runs and model folders")
    ap.add_argument("--config", default="phantom-cpu", help="config name in training/configs/ or a JSON file")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    run_benchmark(args.out, args.work, args.config, progress=not args.no_progress)


if __name__ == "__main__":
    main()
