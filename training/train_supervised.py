"""Supervised training of a complete model folder (localiser + 2D/3D members) on labelled scans.

    python -m training.train_supervised --data DIR --out DIR --config training/configs/phantom-demo.json

``DIR`` is a CrossMoDA-layout folder (``<id>_hrT2.nii.gz`` + ``<id>_Label.nii.gz``). Stages are resumable:
prepared arrays are cached per case, each network checkpoints, and finished networks are not retrained.
This trains on hrT2 labels (the bundled phantom demo); the domain-adaptation pipeline that needs only
ceT1 labels builds on the same pieces.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file

from VSCochleaSegLib.model_folder import (
    CropSpec, LocaliserSpec, ModelSpec, NormalisationSpec, write_model_folder,
)

from .cases import list_cases
from .crops import prepare_case
from .segmentation import TrainConfig, train_network


# write_model_folder replaces this with each weight file's real checksum.
_UNSET_SHA256 = "0" * 64


def load_config(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _localiser_spec(cfg: dict) -> LocaliserSpec:
    tc = cfg["localiser"]["train"]
    return LocaliserSpec.from_dict({"spacing_xyz_mm": cfg["localiser"]["spacing_xyz_mm"], "network": tc["network"],
                                    "patch_size_zyx": tc["patch_size_zyx"], "weights": "localiser.safetensors",
                                    "sha256": _UNSET_SHA256},
                                   source="training config")


def _prepare_one(args):
    case, cfg, cache_dir, index = args
    out = cache_dir / f"{case.case_id}.npz"
    if out.exists():
        return out
    rng = np.random.default_rng([cfg.get("seed", 0), index])
    arrays = prepare_case(
        case.case_id, sitk.ReadImage(str(case.image)), sitk.ReadImage(str(case.label)),
        NormalisationSpec.from_dict(cfg["normalisation"]), CropSpec.from_dict(cfg["crop"]),
        cfg["segmentation_spacing_xyz_mm"], _localiser_spec(cfg), rng,
        jitters=cfg["data"]["jitters"], jitter_mm=cfg["data"]["jitter_mm"],
    )
    payload = {"localiser_image": arrays.localiser[0], "localiser_labels": arrays.localiser[1]}
    for k, (img, lab) in enumerate(arrays.crops):
        payload[f"crop{k}_image"] = img
        payload[f"crop{k}_labels"] = lab
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez(tmp, **payload)
    tmp.replace(out)
    return out


def prepare_all(data_dir, cfg: dict, cache_dir: Path, workers: int = 2) -> list:
    cache_dir.mkdir(parents=True, exist_ok=True)
    cases = list_cases(data_dir, cfg.get("modality", "hrT2"))
    jobs = [(c, cfg, cache_dir, i) for i, c in enumerate(cases)]
    from tqdm import tqdm

    with Pool(workers) as pool:
        paths = list(tqdm(pool.imap(_prepare_one, jobs), total=len(jobs), desc="prepare", unit="case"))
    return paths


def load_arrays(paths) -> tuple[list, list]:
    crops, loc = [], []
    for p in paths:
        with np.load(p) as z:
            loc.append((z["localiser_image"], z["localiser_labels"]))
            k = 0
            while f"crop{k}_image" in z:
                crops.append((z[f"crop{k}_image"], z[f"crop{k}_labels"]))
                k += 1
    return crops, loc


def train_all(data_dir, out_dir, cfg: dict, model_out=None, overwrite=False, only=None) -> Path | None:
    """Prepare, train every network (or only those named in ``only``), export the model folder.

    With ``only``, several processes can train different networks of one run side by side; the
    model folder is written by a final run without ``only`` once every network has finished.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    print(json.dumps(cfg, indent=2))
    t0 = time.time()
    paths = prepare_all(data_dir, cfg, out_dir / "cache", cfg.get("workers", 2))
    crops, loc = load_arrays(paths)
    minutes = {"prepare": (time.time() - t0) / 60}
    state_dicts = {}
    jobs = [("localiser", cfg["localiser"]["train"], loc)] + [(m["name"], m["train"], crops) for m in cfg["members"]]
    if only:
        unknown = set(only) - {name for name, _, _ in jobs}
        if unknown:
            raise SystemExit(f"--only names unknown networks: {sorted(unknown)}")
        jobs = [j for j in jobs if j[0] in only]
    for name, tcfg, arrays in jobs:
        final = out_dir / f"{name}.safetensors"
        t = time.time()
        timing = out_dir / f"{name}_minutes.json"
        if final.exists():
            state_dicts[name] = load_file(str(final))
            if timing.exists():
                minutes[name] = json.loads(timing.read_text(encoding="utf-8"))["minutes"]
            continue
        sd = train_network(arrays, TrainConfig(**tcfg), out_dir, name)
        save_file(sd, str(final))
        state_dicts[name] = sd
        minutes[name] = (time.time() - t) / 60
        timing.write_text(json.dumps({"minutes": minutes[name], "note": "this process only; resumed runs add up"}))
    if only:
        print(f"trained {', '.join(only)}; run again without --only to export the model folder")
        return None
    spec = build_spec(cfg, data_dir, len(paths), minutes)
    target = Path(model_out) if model_out else out_dir / "model"
    write_model_folder(target, spec, state_dicts, overwrite=overwrite)
    print(f"model folder written to {target}")
    return target


def build_spec(cfg: dict, data_dir, n_cases: int, minutes: dict) -> ModelSpec:
    members = []
    for m in cfg["members"]:
        t = m["train"]
        members.append({"name": m["name"], "network": t["network"], "patch_size_zyx": t["patch_size_zyx"],
                        "weights": f"{m['name']}.safetensors", "weight": m.get("weight", 1.0), "sha256": _UNSET_SHA256,
                        "in_default": m.get("in_default", True)})
    spec = {
        "format_version": 1,
        "name": cfg["name"], "version": cfg["version"], "description": cfg["description"],
        "labels": {"background": 0, "vs": 1, "cochlea": 2},
        "intended_use": cfg["intended_use"], "limitations": cfg["limitations"],
        "provenance": {
            **cfg.get("provenance", {}),
            "training_data": str(data_dir), "n_training_cases": n_cases,
            "train_minutes": {k: round(v, 1) for k, v in minutes.items()},
            "config": cfg, "torch": torch.__version__, "machine": platform.machine(),
            "trained_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "normalisation": cfg["normalisation"],
        "localiser": _localiser_spec(cfg).to_dict(),
        "crop": cfg["crop"],
        "segmentation": {"spacing_xyz_mm": cfg["segmentation_spacing_xyz_mm"], "fusion": "mean", "members": members},
        "postprocess": cfg["postprocess"],
    }
    return ModelSpec.from_dict(spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="CrossMoDA-layout folder with hrT2 scans and labels")
    ap.add_argument("--out", required=True, help="run folder (cache, checkpoints, logs)")
    ap.add_argument("--config", required=True, help="config JSON file")
    ap.add_argument("--model-out", help="where to write the model folder (default OUT/model)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    ap.add_argument("--only", help="comma-separated networks to train in this process (localiser, member names)")
    args = ap.parse_args(argv)
    only = args.only.split(",") if args.only else None
    train_all(args.data, args.out, load_config(args.config), args.model_out, args.overwrite, only)


if __name__ == "__main__":
    main()
