"""Unsupervised domain adaptation ceT1 → hrT2, end to end: annotated ceT1 + unannotated hrT2 → model folder.

    python -m training.pipeline --data DIR --out RUN --config phantom-cpu [--variant method_b]
    torchrun --nproc_per_node 4 -m training.pipeline --data DIR --out RUN --config crossmoda

``DIR`` is a CrossMoDA-layout folder: ``<id>_ceT1.nii.gz`` + ``<id>_Label.nii.gz`` (source, labelled) and
``<id>_hrT2.nii.gz`` (target; any hrT2 label file is ignored). ``--config`` is a file or a name in
``training/configs/``; ``--variant`` applies that config's ``variants.<name>`` overrides. Stages, each in
its own folder of ``RUN`` with a ``done.json`` marker (finished stages are skipped; a finished stage whose
config differs is refused, so a reused folder can never silently mix settings), ``stages.csv`` timings:

1. ``prepare``: ceT1 per-ear crops (jittered around the label's cochleae) + 2 mm whole-head localiser
   volumes with labels; hrT2 localiser volumes only.
2. ``translate_localiser`` → ``localiser`` → ``target_crops``: hrT2 ears are found without any hrT2 label.
   A first translator maps the 2 mm ceT1 localiser volumes to fake hrT2 (skipped when
   ``translation.localiser`` is null, as in ``phantom-cpu``), the localiser network is trained on those and on
   random-contrast copies of the ceT1 volumes (with the ceT1 labels), then fine-tuned on the real hrT2 scans
   where it finds both ears itself; that localiser — the one the exported model ships — finds both ears on
   every real hrT2 scan, exactly as the engine will at inference, and cuts the real hrT2 ear crops there.
   ``translate_crops``: a second translator maps ceT1 ear crops to fake hrT2 crops (0.5 mm), several
   training snapshots for diversity, plus tumour intensity augmentation (darkened/brightened VS copies).
3. ``segment``: 2D and 3D DynUNets (nnU-Net style) on fake hrT2; k folds over source cases when
   ``data.folds`` > 1. Exported as ``model_translation_only/``.
4. ``pseudo_labels``: the stage-3 ensemble labels the real hrT2 crops (confidence + component filtering).
5. ``self_train``: the members again on fake hrT2 + real hrT2 with pseudo-labels (method a), or Mean
   Teacher on fake hrT2 + unlabelled real hrT2 (method b, ``self_training.mode = "mean_teacher"``, which
   skips stages 3–4); fold selection on held-out fake-hrT2 validation. Exported as ``model/`` with
   ``segmentation.fusion`` from the config ("mean" or "cleanlab") and ``provenance.hrT2_labels_used = false``.

Everything is seeded from the config; each network checkpoints and logs CSV (``segmentation.py``,
``mean_teacher.py``); under ``torchrun`` the networks train with DDP and rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from VSCochleaSegLib.geometry import box_grid, resample_to_grid
from VSCochleaSegLib.inference import predict_softmax
from VSCochleaSegLib.labels import COCHLEA, VS
from VSCochleaSegLib.localise import ears_from_probabilities, localise_ears, localiser_grid
from VSCochleaSegLib.model_folder import (
    CropSpec, ModelSpec, NetworkSpec, NormalisationSpec, write_model_folder,
)
from VSCochleaSegLib.networks import build_network, load_inference_state_dict
from VSCochleaSegLib.normalisation import IntensityScale, fit_intensity_scale

from . import distributed
from .augment import head_mask, random_contrast
from .cases import list_cases
from .mean_teacher import MeanTeacherConfig, train_mean_teacher
from .pseudo_labels import EnsembleMember, PseudoLabelConfig, pseudo_label_crops
from .segmentation import TrainConfig, dice_per_class, train_network
from .synthetic_tumours import SyntheticTumourConfig, synthetic_tumour_crops, tumour_shapes
from .train_supervised import _UNSET_SHA256, _localiser_spec, _prepare_one
from .translation.augment import (
    add_csf_rim, augment_tumour_intensity, match_context_intensity, match_ring_intensity, match_tumour_intensity,
    tumour_ring,
)

CONFIG_DIR = Path(__file__).parent / "configs"

# The config sections each stage depends on, itself and upstream: a stage's done.json records them.
_STAGE_KEYS = {
    "prepare": ["normalisation", "crop", "segmentation_spacing_xyz_mm", "localiser.spacing_xyz_mm",
                "localiser.train.network", "data.jitters", "data.jitter_mm", "seed"],
    "translate_localiser": ["translation.localiser", "translation.localiser_snapshots",
                            "data.translation_target_scans"],
    "localiser": ["localiser.train", "localiser.random_contrast_copies", "localiser.self_training"],
    "target_crops": [],
    "translate_crops": ["translation.crops", "translation.crop_snapshots", "translation.tumour_augmentation",
                        "translation.crops_init_from_localiser", "translation.random_contrast_copies"],
    "segment": ["members", "data.folds", "data.select_folds", "data.min_target_cochlea_rate"],
    "pseudo_labels": ["pseudo_labels", "fusion"],
    "self_train": ["self_training"],
}
_STAGE_ORDER = list(_STAGE_KEYS)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

def deep_update(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_config(name_or_path: str, variant: str | None = None) -> dict:
    """A config by file path or by name in ``training/configs/``, with ``variants[variant]`` applied."""
    path = Path(name_or_path)
    if not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if variant:
        if variant not in cfg.get("variants", {}):
            raise KeyError(f"{path}: no variant {variant!r}; variants are {sorted(cfg.get('variants', {}))}")
        cfg = deep_update(cfg, cfg["variants"][variant])
        cfg["variant"] = variant
    return cfg


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def stage_fingerprint(cfg: dict, stage: str) -> dict:
    """The config values ``stage`` and every stage before it depend on."""
    keys = [k for s in _STAGE_ORDER[: _STAGE_ORDER.index(stage) + 1] for k in _STAGE_KEYS[s]]
    # Unset settings are left out, so adding an optional setting later does not invalidate old runs.
    return json.loads(json.dumps({k: v for k in keys if (v := _get(cfg, k)) is not None}))


# --------------------------------------------------------------------------------------------------
# Translation backend (part A's training.translation); a Protocol so tests swap in a fake.
# --------------------------------------------------------------------------------------------------

class TranslatorLike(Protocol):
    snapshots: Sequence[int]

    def translate_volume(self, volume_zyx: np.ndarray, snapshot=None, vs_mask=None) -> np.ndarray: ...


class TranslationBackend(Protocol):
    def train(self, source_images: list, source_labels: list, target_images: list, cfg: dict, out_dir: Path,
              progress: bool) -> TranslatorLike: ...


class PartATranslation:
    """``training.translation`` (CycleGAN with segmentation heads, CUT, CutSeg): resumable, and a finished
    run folder is loaded instead of retrained, so calling ``train`` again is how a stage resumes."""

    def train(self, source_images, source_labels, target_images, cfg, out_dir, progress=True):
        from training.translation import TranslationConfig, train_translation

        return train_translation(source_images, source_labels, target_images, TranslationConfig.from_dict(cfg),
                                 out_dir, progress=progress)


# --------------------------------------------------------------------------------------------------
# The run: folders, stage markers, logs
# --------------------------------------------------------------------------------------------------

class Run:
    """One pipeline run folder. ``progress``: tqdm bars; ``backend``: the translation implementation."""

    def __init__(self, data_dir, out_dir, cfg: dict, backend: TranslationBackend | None = None, progress: bool = True):
        self.data_dir, self.out, self.cfg = Path(data_dir), Path(out_dir), cfg
        self.backend = backend or PartATranslation()
        self.progress = progress
        self.minutes: dict = {}
        self.out.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            (self.out / "config.json").write_text(json.dumps(cfg, indent=2))

    def stage(self, name: str, fn: Callable[[Path], dict | None]) -> dict:
        """Run ``fn(stage_dir)`` unless done with the same config; returns the stage's ``done.json`` record."""
        d = self.out / name
        marker = d / "done.json"
        fp = stage_fingerprint(self.cfg, name)
        if marker.exists():
            done = json.loads(marker.read_text(encoding="utf-8"))
            if {k: v for k, v in done["config"].items() if v is not None} != fp:
                raise RuntimeError(f"{d} was made with a different config ({name} and the stages before it); "
                                   f"delete {d} and the stages after it to redo them.")
            self.minutes[name] = done["minutes"]
            return done
        d.mkdir(parents=True, exist_ok=True)
        print(f"== stage {name}", flush=True)
        t0 = time.time()
        info = fn(d) or {}
        distributed.barrier()
        done = {"config": fp, "minutes": round((time.time() - t0) / 60, 2), "info": info}
        if distributed.is_main():
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(done, indent=2))
            tmp.replace(marker)
            log = self.out / "stages.csv"
            new = not log.exists()
            with open(log, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["stage", "minutes", "finished_utc"])
                w.writerow([name, done["minutes"], time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())])
        self.minutes[name] = done["minutes"]
        return done


def _save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def _load_net(network: dict, weights: Path) -> torch.nn.Module:
    return _net_from_state(network, load_file(str(weights)))


def _net_from_state(network: dict, state: dict) -> torch.nn.Module:
    net = build_network(NetworkSpec.from_dict(network, source="training config"))
    load_inference_state_dict(net, state)
    return net.eval()


def _f32(a) -> np.ndarray:
    return np.asarray(a, np.float32)


# --------------------------------------------------------------------------------------------------
# Stage 1: prepare
# --------------------------------------------------------------------------------------------------

def _prepare_target(args):
    """hrT2 case → its 2 mm localiser volume and intensity scale. Never reads a label."""
    image_path, case_id, cfg, cache = args
    out = cache / f"{case_id}.npz"
    if out.exists():
        return out
    image = sitk.Cast(sitk.ReadImage(str(image_path)), sitk.sitkFloat32)
    scale = fit_intensity_scale(sitk.GetArrayViewFromImage(image), NormalisationSpec.from_dict(cfg["normalisation"]))
    vol = scale.apply(resample_to_grid(image, localiser_grid(image, _localiser_spec(cfg)))).astype(np.float16)
    _save_npz(out, localiser_image=vol, scale=np.array([scale.low, scale.high]), image_path=str(image_path))
    return out


def stage_prepare(run: Run, d: Path) -> dict:
    cfg = run.cfg
    source = list_cases(run.data_dir, "ceT1", require_labels=True)
    target = list_cases(run.data_dir, "hrT2", require_labels=False)
    (d / "cet1").mkdir(exist_ok=True)
    (d / "hrt2").mkdir(exist_ok=True)
    src_cfg = {**cfg, "modality": "ceT1"}
    jobs_s = [(c, src_cfg, d / "cet1", i) for i, c in enumerate(source)]
    jobs_t = [(c.image, c.case_id, cfg, d / "hrt2") for c in target]
    workers = max(1, int(cfg.get("workers", 2)))
    with Pool(workers) as pool:
        list(tqdm(pool.imap(_prepare_one, jobs_s), total=len(jobs_s), desc="prepare ceT1", disable=not run.progress))
        list(tqdm(pool.imap(_prepare_target, jobs_t), total=len(jobs_t), desc="prepare hrT2", disable=not run.progress))
    return {"n_ceT1": len(source), "n_hrT2": len(target), "ceT1_cases": [c.case_id for c in source],
            "hrT2_cases": [c.case_id for c in target]}


def _source_cases(run: Run) -> list[tuple[str, dict]]:
    """[(case_id, arrays)] of the prepared ceT1 cases: crops [(img, lab)], localiser (img, lab)."""
    out = []
    for p in sorted((run.out / "prepare" / "cet1").glob("*.npz")):
        with np.load(p) as z:
            crops, k = [], 0
            while f"crop{k}_image" in z:
                crops.append((z[f"crop{k}_image"], z[f"crop{k}_labels"]))
                k += 1
            out.append((p.stem, {"crops": crops, "localiser": (z["localiser_image"], z["localiser_labels"])}))
    return out


def _translation_scans(run: Run) -> set[str] | None:
    """Case ids of the unlabelled hrT2 scans that train the translators, self-train the localiser and check the
    stage-3 members: the first ``data.translation_target_scans`` by case id (None: all of them). Pseudo-labels,
    self-training and Mean Teacher always use every scan: more unlabelled scans help them, while a translator
    retrained on more scans is another translator (docs/training.md, session 27)."""
    n = int(run.cfg.get("data", {}).get("translation_target_scans") or 0)
    if n < 0:
        raise ValueError(f"data.translation_target_scans must be 0 (all scans) or positive, not {n}")
    return set(sorted(p.stem for p in (run.out / "prepare" / "hrt2").glob("*.npz"))[:n]) if n else None


def _target_files(run: Run, folder: str, translation: bool) -> list[Path]:
    """The per-scan ``.npz`` files of the hrT2 scans in ``run.out / folder``, by case id; with ``translation`` only
    those of :func:`_translation_scans`."""
    files = sorted((run.out / folder).glob("*.npz"))
    keep = _translation_scans(run) if translation else None
    return files if keep is None else [p for p in files if p.stem in keep]


def _target_localiser_volumes(run: Run, translation: bool = False) -> list[tuple]:
    """[(case_id, 2 mm volume (z, y, x), :class:`IntensityScale`, image path)] of the prepared hrT2 scans; with
    ``translation`` only those of :func:`_translation_scans`."""
    out = []
    for p in _target_files(run, "prepare/hrt2", translation):
        with np.load(p) as z:
            out.append((p.stem, z["localiser_image"], IntensityScale(*map(float, z["scale"])), str(z["image_path"])))
    return out


# --------------------------------------------------------------------------------------------------
# Stage 2: translation (2 mm, optional, and 0.5 mm ear crops), localiser, real hrT2 crops
# --------------------------------------------------------------------------------------------------

def _train_translator(run: Run, d: Path, source_images, source_labels, target_images, tcfg: dict) -> TranslatorLike:
    """Train (or resume, or load when finished) the translator in ``d/translator``."""
    return run.backend.train([_f32(a) for a in source_images], [np.asarray(a, np.uint8) for a in source_labels],
                             [_f32(a) for a in target_images], {"threads": run.cfg.get("threads"), **tcfg},
                             d / "translator", run.progress)


def translate_in_head(translator: TranslatorLike, source_zyx: np.ndarray, snapshot, labels_zyx=None) -> np.ndarray:
    """Fake hrT2 of ``source_zyx``; outside the source's head it is air (0), as on every normalised scan.
    Uses only the source image (and, for a translator trained with ``condition_on_vs``, the VS of the source's
    labels ``labels_zyx``): an unconverged generator's grey background must not teach the networks that air is grey."""
    source = _f32(source_zyx)
    vs_mask = None
    if getattr(translator, "conditioned", False):
        if labels_zyx is None:
            raise ValueError("this translator reads the VS mask: give the source's labels")
        vs_mask = np.asarray(labels_zyx) == VS
    return np.where(head_mask(source), translator.translate_volume(source, snapshot, vs_mask=vs_mask),
                    0.0).astype(np.float32)


def _snapshots(translator: TranslatorLike, which) -> list:
    """Which training snapshots translate: "last" → [None] (the final generator), "all", or a list."""
    if which in (None, "last"):
        return [None]
    if which == "all":
        return list(translator.snapshots) or [None]
    return [s for s in which if s in translator.snapshots] or [None]


def stage_translate_localiser(run: Run, d: Path) -> dict:
    """Fake hrT2 2 mm localiser volumes from the source's; ``translation.localiser`` null skips the translator (the
    localiser then learns from its ``random_contrast_copies`` of the ceT1 volumes and its own self-training)."""
    if run.cfg["translation"].get("localiser") is None:
        (d / "fake").mkdir(exist_ok=True)
        return {"snapshots": [], "skipped": "translation.localiser is null"}
    src = _source_cases(run)
    tgt = _target_localiser_volumes(run, translation=True)
    translator = _train_translator(run, d, [a["localiser"][0] for _, a in src], [a["localiser"][1] for _, a in src],
                                   [v for _, v, _, _ in tgt], run.cfg["translation"]["localiser"])
    snaps = _snapshots(translator, run.cfg["translation"].get("localiser_snapshots", "last"))
    (d / "fake").mkdir(exist_ok=True)
    for case_id, arrays in tqdm(src, desc="fake hrT2 localiser volumes", disable=not run.progress):
        img, lab = arrays["localiser"]
        fakes = [translate_in_head(translator, img, s, lab).astype(np.float16) for s in snaps]
        _save_npz(d / "fake" / f"{case_id}.npz", images=np.stack(fakes), labels=lab)
    return {"snapshots": [s for s in snaps]}


def _fake_localiser_arrays(run: Run) -> list:
    out = []
    for p in sorted((run.out / "translate_localiser" / "fake").glob("*.npz")):
        with np.load(p) as z:
            out += [(img, z["labels"]) for img in z["images"]]
    return out


def stage_localiser(run: Run, d: Path) -> dict:
    """The localiser on fake hrT2 localiser volumes, plus ``random_contrast_copies`` random-contrast copies
    of each ceT1 localiser volume; then, with ``localiser.self_training``, fine-tuned on the real hrT2
    volumes it already locates with confidence (:func:`localiser_pseudo_targets`)."""
    tcfg = TrainConfig(**run.cfg["localiser"]["train"])
    arrays = _fake_localiser_arrays(run)
    copies = int(run.cfg["localiser"].get("random_contrast_copies", 0))
    if copies:
        rng = np.random.default_rng([run.cfg.get("seed", 0), 3])
        arrays += [(random_contrast(a["localiser"][0], rng), a["localiser"][1])
                   for _, a in _source_cases(run) for _ in range(copies)]
    if not arrays:
        raise ValueError("the localiser has nothing to learn from: translation.localiser is null (no fake hrT2) and "
                         "localiser.random_contrast_copies is 0; set random_contrast_copies ≥ 1 or a localiser translator")
    sd = train_network(arrays, tcfg, d, "localiser", progress=run.progress)
    info = {}
    st = run.cfg["localiser"].get("self_training")
    if st:
        pseudo, info = localiser_pseudo_targets(run, _net_from_state(tcfg.network, sd))
        if pseudo:
            tuned = TrainConfig(**{**run.cfg["localiser"]["train"], "iterations": int(st["iterations"]),
                                   "learning_rate": float(st.get("learning_rate", tcfg.learning_rate)),
                                   "seed": tcfg.seed + 1})
            sd = train_network(arrays + pseudo * int(st.get("copies", 1)), tuned, d, "localiser_self_trained",
                               progress=run.progress, init_from=d / "localiser_checkpoint.pt")
    if distributed.is_main():
        save_file(sd, str(d / "localiser.safetensors"))
    return info


def localiser_pseudo_targets(run: Run, net: torch.nn.Module) -> tuple[list, dict]:
    """Localiser pseudo-labels on the real hrT2 2 mm volumes of :func:`_translation_scans`: (volume, target) for
    every scan on which ``net`` finds both inner ears itself (neither mirrored) — class 2 = the 5 mm balls around
    the found centres, class 1 = its own VS prediction (probability > 0.5). Never reads an hrT2 label."""
    from VSCochleaSegLib.errors import InputError

    from .crops import with_ear_balls

    spec = _localiser_spec(run.cfg)
    out, missed, mirrored = [], 0, 0
    for case_id, vol, _, image_path in tqdm(_target_localiser_volumes(run, translation=True),
                                            desc="localiser pseudo-labels", disable=not run.progress):
        v = _f32(vol)
        probs = predict_softmax(net, v, spec.patch_size_zyx, torch.device("cpu"))
        # The grid needs the scan's geometry only: read its header, not its voxels (the reader has the
        # same GetOrigin/GetSpacing/GetSize/GetDirection that GridSpec.of_image uses).
        header = sitk.ImageFileReader()
        header.SetFileName(image_path)
        header.ReadImageInformation()
        grid = localiser_grid(header, spec)
        try:
            ears = ears_from_probabilities(probs[2], v, grid)
        except InputError:
            missed += 1
            continue
        if ears.mirrored:
            mirrored += 1
            continue
        target = (probs[1] > 0.5).astype(np.uint8)
        out.append((vol, with_ear_balls(target, grid, ears.cochlea_lps)))
    return out, {"pseudo_labelled_scans": len(out), "no_ear_found": missed, "one_ear_only": mirrored}


def ear_crops(image: sitk.Image, ears, cfg: dict, scale: IntensityScale) -> list[np.ndarray]:
    """Both normalised ear crops (left, then mirrored right) (z, y, x) as the engine cuts them."""
    crop = CropSpec.from_dict(cfg["crop"])
    out = []
    for side in ("left", "right"):
        centre = ears.cochlea_lps[side] + ears.medial_direction(side) * crop.medial_offset_mm
        grid = box_grid(centre, crop.size_xyz_mm, cfg["segmentation_spacing_xyz_mm"],
                        mirror_x=(side == "right" and crop.mirror_right))
        out.append(scale.apply(resample_to_grid(image, grid)).astype(np.float16))
    return out


def stage_target_crops(run: Run, d: Path) -> dict:
    """Find both ears on every real hrT2 scan with the trained localiser; cut the ear crops there."""
    from VSCochleaSegLib.errors import InputError

    spec = _localiser_spec(run.cfg)
    net = _load_net(run.cfg["localiser"]["train"]["network"], run.out / "localiser" / "localiser.safetensors")
    skipped, mirrored = [], 0
    for case_id, _, scale, image_path in tqdm(_target_localiser_volumes(run), desc="locate hrT2 ears",
                                              disable=not run.progress):
        out = d / f"{case_id}.npz"
        if out.exists():
            continue
        image = sitk.Cast(sitk.ReadImage(image_path), sitk.sitkFloat32)
        try:
            ears = localise_ears(image, net, spec, scale, torch.device("cpu"))
        except InputError:
            skipped.append(case_id)
            continue
        mirrored += len(ears.mirrored)
        crops = ear_crops(image, ears, run.cfg, scale)
        _save_npz(out, crops=np.stack(crops),
                  cochlea_lps=np.stack([ears.cochlea_lps["left"], ears.cochlea_lps["right"]]))
    if not list(d.glob("*.npz")):
        raise RuntimeError(f"the localiser found no inner ear on any hrT2 scan ({len(skipped)} tried); the 2 mm "
                           "translation or the localiser needs more training (see translate_localiser/ and localiser/)")
    return {"skipped_no_ear_found": skipped, "ears_mirrored": mirrored}


def _target_crops(run: Run, translation: bool = False) -> list[tuple[str, np.ndarray]]:
    """[(case_id, ear crop (z, y, x))] of the real hrT2 scans, two per scan on which ears were found; with
    ``translation`` only those of :func:`_translation_scans`."""
    out = []
    for p in _target_files(run, "target_crops", translation):
        with np.load(p) as z:
            out += [(p.stem, c) for c in z["crops"]]
    return out


def _tumour_augmentations(setting: dict | list) -> list[dict]:
    """``translation.tumour_augmentation`` as a list of settings: one dict (one augmented copy per fake) or a list
    of dicts (one copy per entry, e.g. a factor on the translated tumour and one relative to the tissue)."""
    settings = [setting] if isinstance(setting, dict) else list(setting)
    for a in settings:
        if not isinstance(a, dict) or (a.get("probability", 0.0) and "factor_range" not in a):
            raise ValueError("each translation.tumour_augmentation setting is a dict, and one with a probability "
                             f"needs a factor_range: {a!r}")
    return settings


def stage_translate_crops(run: Run, d: Path) -> dict:
    src = _source_cases(run)
    tcfg = run.cfg["translation"]
    src_imgs = [img for _, a in src for img, _ in a["crops"]]
    src_labs = [lab for _, a in src for _, lab in a["crops"]]
    crops_cfg = dict(tcfg["crops"])
    if tcfg.get("crops_init_from_localiser"):
        if tcfg.get("localiser") is None:
            raise ValueError("translation.crops_init_from_localiser needs the 2 mm translator; translation.localiser is null")
        # Fine-tune the 2 mm translator at 0.5 mm (measured: no help at phantom-cpu budgets, docs/training.md).
        crops_cfg["init_weights"] = str(run.out / "translate_localiser" / "translator")
    targets = [c for _, c in _target_crops(run, translation=True)]
    translator = _train_translator(run, d, src_imgs, src_labs, targets, crops_cfg)
    snaps = _snapshots(translator, tcfg.get("crop_snapshots", "all"))
    augs = _tumour_augmentations(tcfg.get("tumour_augmentation", {}))
    rng = np.random.default_rng([run.cfg.get("seed", 0), 2])
    n_copies = int(tcfg.get("random_contrast_copies", 0))
    rng_contrast = np.random.default_rng([run.cfg.get("seed", 0), 4])
    (d / "fake").mkdir(exist_ok=True)
    n_aug = n_rim = n_contrast = 0
    for case_id, arrays in tqdm(src, desc="fake hrT2 crops", disable=not run.progress):
        out = d / "fake" / f"{case_id}.npz"
        if out.exists():
            continue
        images, labels = [], []
        for img, lab in arrays["crops"]:
            has_vs = bool((lab == VS).any())
            for s in snaps:
                fake = translate_in_head(translator, img, s, lab)
                images.append(fake.astype(np.float16))
                labels.append(lab)
                # Extra copies with the tumour darkened or brightened, one per augmentation setting: real VS
                # intensity on hrT2 varies more than translation reproduces (CrossMoDA 2021 reports: +0.1 VS Dice).
                for aug in augs:
                    if not has_vs or rng.random() >= aug.get("probability", 0.0):
                        continue
                    augmented = augment_tumour_intensity(
                        fake, lab, rng, tuple(aug["factor_range"]), tuple(aug.get("sigma_voxels", (0.5, 1.0, 1.0))),
                        heterogeneity=float(aug.get("heterogeneity", 0.0)),
                        relative_to_tissue=bool(aug.get("relative_to_tissue", False)))
                    # ... and, on some copies, the bright CSF outline a VS has on hrT2 (translation/augment.py).
                    if aug.get("csf_rim_probability", 0.0) and rng.random() < aug["csf_rim_probability"]:
                        augmented = add_csf_rim(augmented, lab, rng)
                        n_rim += 1
                    images.append(augmented.astype(np.float16))
                    labels.append(lab)
                    n_aug += 1
            # Domain randomisation, as for the localiser: the ceT1 crop through random intensity curves, so
            # the members also learn anatomy under contrasts the translator does not produce.
            for _ in range(n_copies):
                images.append(random_contrast(img, rng_contrast))
                labels.append(lab)
                n_contrast += 1
        _save_npz(out, images=np.stack(images), labels=np.stack(labels))
    return {"snapshots": snaps, "tumour_augmented_copies": n_aug, "csf_rim_copies": n_rim,
            "random_contrast_copies": n_contrast}


def _fake_crops_by_case(run: Run) -> list[tuple[str, list]]:
    out = []
    for p in sorted((run.out / "translate_crops" / "fake").glob("*.npz")):
        with np.load(p) as z:
            out.append((p.stem, list(zip(z["images"], z["labels"]))))
    return out


# --------------------------------------------------------------------------------------------------
# Stages 3-5: segmentation, pseudo-labels, self-training
# --------------------------------------------------------------------------------------------------

def fold_split(case_ids: Sequence[str], folds: int, seed: int) -> list[tuple[list, list]]:
    """[(train ids, validation ids)] per fold; one fold = everything for training, no validation."""
    ids = list(case_ids)
    if folds <= 1:
        return [(ids, [])]
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = [sorted(ids[i] for i in order[f::folds]) for f in range(folds)]
    return [([c for c in ids if c not in set(p)], p) for p in parts]


def _member_name(member: dict, fold: int, folds: int) -> str:
    return member["name"] if folds <= 1 else f"{member['name']}_f{fold}"


def validation_dice(net: torch.nn.Module, patch_size, arrays: list) -> float:
    """Mean of VS and cochlea Dice over held-out (image, labels) crops."""
    scores = []
    for img, lab in arrays:
        pred = predict_softmax(net, _f32(img), tuple(patch_size), torch.device("cpu")).argmax(0)
        d = dice_per_class(pred, lab)
        scores.append((d[1] + d[2]) / 2)
    return float(np.mean(scores)) if scores else float("nan")


def target_cochlea_rate(net: torch.nn.Module, patch_size, crops: list, min_voxels: int) -> float:
    """Share of real hrT2 ear crops (z, y, x) on which ``net`` predicts at least ``min_voxels`` cochlea voxels.

    Needs no label: every crop is centred on an inner ear, so a member that finds no cochlea on most of them
    has not carried over to real hrT2 (measured: a 300-iteration 3D member found no cochlea on any real crop
    while validating well on fake hrT2)."""
    hits = [int((predict_softmax(net, _f32(c), tuple(patch_size), torch.device("cpu")).argmax(0) == COCHLEA).sum()) >= min_voxels
            for c in crops]
    return float(np.mean(hits)) if hits else float("nan")


def _train_members(run: Run, d: Path, train_arrays_for: Callable[[list], list], trainer: Callable | None = None,
                   overrides: dict | None = None, fake: list | None = None) -> dict:
    """Train every config member on every fold, validate, select; returns the stage record. ``overrides``
    replace training settings of every member (self-training's ``train``: e.g. fewer iterations when fine-tuning);
    ``fake`` replaces the stage-2 fakes ``[(case, [(image, label)])]`` (self-training's matched tumours)."""
    cfg = run.cfg
    folds = int(cfg.get("data", {}).get("folds", 1))
    fake = _fake_crops_by_case(run) if fake is None else fake
    splits = fold_split([c for c, _ in fake], folds, cfg.get("seed", 0))
    by_case = dict(fake)
    # Label-free check on the target domain: members that find no cochlea on most real hrT2 crops are left out
    # of the ensemble (their probabilities would only dilute the others'); the best one is kept if all fail.
    min_rate = float(cfg.get("data", {}).get("min_target_cochlea_rate", 0.0))
    target = [c for _, c in _target_crops(run, translation=True)] if min_rate > 0 else []
    target = target[:: max(1, len(target) // 16)][:16]  # an even sample of at most 16 crops
    min_voxels = int(cfg.get("pseudo_labels", {}).get("min_cochlea_voxels", 0)) or 1
    members = []
    for m in cfg["members"]:
        for f, (train_ids, val_ids) in enumerate(splits):
            name = _member_name(m, f, folds)
            final = d / f"{name}.safetensors"
            if not final.exists():
                labelled = [a for c in train_ids for a in by_case[c]]
                arrays = train_arrays_for(labelled)
                tcfg = TrainConfig(**{**m["train"], **(overrides or {}), "threads": cfg.get("threads")})
                sd = (trainer or _plain_trainer)(arrays, tcfg, d, name, run)
                if distributed.is_main():
                    save_file(sd, str(final))
            distributed.barrier()
            val = [a for c in val_ids for a in by_case[c]]
            net = _load_net(m["train"]["network"], final) if val or target else None
            record = {"name": name, "member": m["name"], "fold": f,
                      "validation_dice": validation_dice(net, m["train"]["patch_size_zyx"], val) if val else None}
            if target:
                record["target_cochlea_rate"] = target_cochlea_rate(net, m["train"]["patch_size_zyx"], target, min_voxels)
            members.append(record)
    passes = [r for r in members if r.get("target_cochlea_rate", 1.0) >= min_rate]
    keep = int(cfg.get("data", {}).get("select_folds", folds))
    for m in cfg["members"]:
        mine = [r for r in members if r["member"] == m["name"]]
        ranked = sorted(mine, key=lambda r: -(r["validation_dice"] if r["validation_dice"] is not None else 0.0))
        for r in mine:
            r["selected"] = r in ranked[:keep] and r in passes
    if not any(r["selected"] for r in members):  # never an empty ensemble
        max(members, key=lambda r: (r.get("target_cochlea_rate", 0.0), r["validation_dice"] or 0.0))["selected"] = True
    return {"members": members}


def _plain_trainer(arrays, tcfg, d, name, run):
    return train_network(arrays, tcfg, d, name, progress=run.progress)


def _selected_members(run: Run, stage: str) -> list[dict]:
    """[{name, train, weight, path}] of the selected members of a finished stage, config order."""
    record = json.loads((run.out / stage / "done.json").read_text(encoding="utf-8"))["info"]["members"]
    return _members_of(run, record, run.out / stage)


def _members_of(run: Run, record: list[dict], folder: Path) -> list[dict]:
    """[{name, train, weight, path}] of the selected members of a ``_train_members`` record, weights in ``folder``."""
    by_name = {m["name"]: m for m in run.cfg["members"]}
    return [{"name": r["name"], "train": by_name[r["member"]]["train"], "weight": by_name[r["member"]].get("weight", 1.0),
             "path": folder / f"{r['name']}.safetensors"} for r in record if r["selected"]]


def stage_segment(run: Run, d: Path) -> dict:
    return _train_members(run, d, lambda labelled: labelled)


def stage_pseudo_labels(run: Run, d: Path) -> dict:
    return make_pseudo_labels(run, _selected_members(run, "segment"), d)


def make_pseudo_labels(run: Run, selected: list[dict], d: Path, overrides: dict | None = None) -> dict:
    """Label every real hrT2 ear crop with the ensemble of ``selected`` members (``_members_of``): writes
    ``d/pseudo_labels.csv`` (one row per crop: confidence, voxel counts, used) and then, as the completion
    marker, ``d/pseudo_labels.npz`` (images and labels (N, z, y, x) of the used crops). ``overrides`` replace
    settings of the config's ``pseudo_labels`` (self-training's ``relabel``)."""
    members = [EnsembleMember(_load_net(m["train"]["network"], m["path"]), m["train"]["patch_size_zyx"], m["weight"])
               for m in selected]
    crops = _target_crops(run)
    spacing_zyx = tuple(float(s) for s in run.cfg["segmentation_spacing_xyz_mm"][::-1])
    pcfg = PseudoLabelConfig(**{"spacing_zyx_mm": spacing_zyx, **run.cfg.get("pseudo_labels", {}), **(overrides or {})})
    labelled, records = pseudo_label_crops(members, [c for _, c in crops], pcfg, run.cfg.get("fusion", "mean"),
                                           run.progress, scan_ids=[case for case, _ in crops])
    keep = [r["crop"] for r in records if r["used"]]
    if distributed.is_main():
        with open(d / "pseudo_labels.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["case", "crop", "confidence", "vs_voxels", "cochlea_voxels", "used"])
            w.writeheader()
            for r in records:
                w.writerow({"case": crops[r["crop"]][0], **r})
        _save_npz(d / "pseudo_labels.npz", images=np.stack([crops[k][1] for k in keep]) if keep else np.zeros((0,)),
                  labels=np.stack([lab for _, lab in labelled]) if keep else np.zeros((0,)))
    distributed.barrier()
    return {"n_crops": len(records), "n_used": len(keep)}


def _pseudo_arrays(folder: Path) -> list:
    """[(image, label)] of the used crops of ``make_pseudo_labels``'s output folder."""
    with np.load(folder / "pseudo_labels.npz") as z:
        return list(zip(z["images"], z["labels"])) if z["images"].ndim == 4 else []


class RealReference(NamedTuple):
    """How one pseudo-labelled real crop looks (sorted float32 voxel values; None where the option is off)."""

    vs: np.ndarray  # its tumour
    ring: np.ndarray | None  # the tumour's in-plane ring (``ring_voxels`` > 0)
    context: np.ndarray | None  # the rest of the crop (``context``)
    cochlea: np.ndarray | None  # its pseudo-labelled cochlea (``cochlea``, at least ``min_cochlea_voxels``)


def _real_tumour_references(pseudo: list, setting: dict) -> list[RealReference]:
    """How tumours look on the real hrT2, as far as the pseudo-labels know: a :class:`RealReference` for every
    pseudo-labelled tumour of at least ``setting["min_vs_voxels"]`` voxels (default 100); the ring is
    ``translation.augment.tumour_ring`` of width ``ring_voxels``; ``min_cochlea_voxels`` defaults to 20. Values
    are sorted here, once, not by every fake crop matched to them."""
    min_voxels, ring_voxels = int(setting.get("min_vs_voxels", 100)), int(setting.get("ring_voxels", 0))
    min_cochlea = int(setting.get("min_cochlea_voxels", 20))
    out = []
    for img, lab in pseudo:
        lab = np.asarray(lab)
        vs = lab == VS
        if vs.sum() < min_voxels:
            continue
        img = np.asarray(img, np.float32)
        cochlea = lab == COCHLEA if setting.get("cochlea", False) else None  # only read with the option on
        out.append(RealReference(
            np.sort(img[vs]),
            np.sort(img[tumour_ring(vs, ring_voxels)]) if ring_voxels > 0 else None,
            np.sort(img[~vs]) if setting.get("context", False) else None,
            np.sort(img[cochlea]) if cochlea is not None and cochlea.sum() >= min_cochlea else None))
    return out


def _match_fake_tumours(fake_by_case: list, references: list, setting: dict, seed: int) -> list:
    """``self_training.fake_vs_match``: in a share ``probability`` (default 1) of the fake (image, label) crops with a
    tumour, the tumour takes the grey levels of a randomly drawn real pseudo-labelled one
    (``translation.augment.match_tumour_intensity``, ``scale_range`` default [1, 1]); with ``ring_voxels`` > 0,
    its surroundings those of the same real tumour's (``match_ring_intensity``). With ``context``, the rest of the
    crop first takes the grey levels of the same real crop's (``match_context_intensity``); with ``cochlea``, the
    fake cochlea those of the same real crop's pseudo-labelled cochlea (``match_tumour_intensity`` on the cochlea
    label, no scaling) — with either, in the same share of the tumour-free fakes too. ``fake_by_case`` is
    ``[(case, [(image, label)])]`` as ``_fake_crops_by_case`` returns it; returns a new list of that shape."""
    rng = np.random.default_rng([seed, 7])
    probability = float(setting.get("probability", 1.0))
    scale_range = tuple(setting.get("scale_range", (1.0, 1.0)))
    ring_voxels = int(setting.get("ring_voxels", 0))
    every_crop = bool(setting.get("context", False) or setting.get("cochlea", False))  # not only those with a tumour

    def match(img, lab):
        tumour = (lab == VS).any()
        if (tumour or every_crop) and rng.random() < probability:
            ref = references[int(rng.integers(len(references)))]
            if ref.context is not None:
                img = match_context_intensity(img, lab, ref.context)
            if ref.cochlea is not None:
                img = match_tumour_intensity(img, lab, ref.cochlea, rng, label=COCHLEA)
            if tumour:
                if ref.ring is not None:
                    img = match_ring_intensity(img, lab, ref.ring, ring_voxels)
                img = match_tumour_intensity(img, lab, ref.vs, rng, scale_range)
            img = np.asarray(img, np.float16)
        return img, lab

    return [(case, [match(img, lab) for img, lab in crops]) for case, crops in fake_by_case]


def _retrain_on_pseudo_labels(run: Run, d: Path, pseudo: list, init_dir: Path, st: dict) -> dict:
    """One self-training round: every member trained again in ``d`` on fake hrT2 + ``pseudo`` [(image, label)]
    (repeated so they make ``pseudo_fraction`` of the draws); with ``warm_start`` fine-tuned from its weights in
    ``init_dir``; ``real_random_contrast_probability`` (default: the members' ``random_contrast_probability``)
    applies to the real crops, which need no domain randomisation. Returns the ``_train_members`` record."""
    share = float(st.get("pseudo_fraction", 0.5))
    match = st.get("fake_vs_match")
    references = _real_tumour_references(pseudo, match) if match else []  # real pseudo-labels only, not drawn ones
    synth = SyntheticTumourConfig(**{"seed": run.cfg.get("seed", 0), **st.get("synthetic_tumours", {})})
    if synth.copies_per_free_crop > 0:
        # Tumours of the ceT1 labels drawn into the real hrT2 ears the pseudo-labels call tumour-free
        # (training/synthetic_tumours.py); they join the pseudo-labelled crops' share of the draws.
        spacing_zyx = [float(v) for v in run.cfg["segmentation_spacing_xyz_mm"][::-1]]
        shapes = tumour_shapes([lab for _, a in _source_cases(run) for _, lab in a["crops"]], synth.min_vs_voxels,
                               spacing_zyx, synth.max_distance_to_cochlea_mm)
        pseudo = list(pseudo) + synthetic_tumour_crops(pseudo, shapes, synth)

    # Matched once, for every member and fold.
    fake = (_match_fake_tumours(_fake_crops_by_case(run), references, match, run.cfg.get("seed", 0))
            if references else None)

    def mix(labelled):
        if not pseudo or share <= 0:
            return labelled
        reps = max(1, int(round(share / (1 - share) * len(labelled) / len(pseudo))))
        return labelled + pseudo * reps

    real_contrast = st.get("real_random_contrast_probability")  # None: as the fakes
    real_ids = {id(lab) for _, lab in pseudo}

    def trainer(arrays, tcfg, dd, name, run):
        init = init_dir / f"{name}.safetensors" if st.get("warm_start", False) else None
        contrast = None if real_contrast is None else [
            float(real_contrast) if id(lab) in real_ids else tcfg.random_contrast_probability for _, lab in arrays]
        return train_network(arrays, tcfg, dd, name, progress=run.progress, init_from=init,
                             contrast_probability=contrast)

    record = _train_members(run, d, mix, trainer, st.get("train"), fake)
    if match:  # 0: no pseudo-labelled tumour was large enough, the fakes were left as translated
        record["fake_vs_match_references"] = len(references)
    return record


def stage_self_train(run: Run, d: Path) -> dict:
    """Method a: ``self_training.rounds`` rounds (default 1) of retraining the members on fake hrT2 + pseudo-labelled
    real hrT2. Round 1 uses stage 4's pseudo-labels (and, with ``warm_start``, starts from the stage-3 weights);
    round r > 1 relabels the real crops with round r-1's selected members (``d/round<r>_pseudo_labels``; the
    ``pseudo_labels`` settings, with ``self_training.relabel`` overriding some) and starts from their weights.
    Earlier rounds' members live in ``d/round<r>``, the last round's in ``d``.
    Method b (``mode = "mean_teacher"``): Mean Teacher members on fake hrT2 + unlabelled real hrT2."""
    st = run.cfg.get("self_training", {})
    mode = st.get("mode", "pseudo_labels")
    if mode == "pseudo_labels":
        rounds = int(st.get("rounds", 1))
        if rounds < 1:
            raise ValueError(f"self_training.rounds must be at least 1, not {rounds}")
        start_dir, pseudo_dir, info = run.out / "segment", run.out / "pseudo_labels", {}
        for r in range(1, rounds + 1):
            rd = d if r == rounds else d / f"round{r}"
            rd.mkdir(parents=True, exist_ok=True)
            if r > 1:
                pseudo_dir = d / f"round{r}_pseudo_labels"
                if not (pseudo_dir / "pseudo_labels.npz").exists():
                    pseudo_dir.mkdir(parents=True, exist_ok=True)
                    info[f"round{r}_pseudo_labels"] = make_pseudo_labels(
                        run, _members_of(run, record["members"], start_dir), pseudo_dir, st.get("relabel"))
            record = _retrain_on_pseudo_labels(run, rd, _pseudo_arrays(pseudo_dir), start_dir, st)
            if r < rounds:
                info[f"round{r}_members"] = record["members"]
            start_dir = rd
        return {**info, **record}
    if mode == "mean_teacher":
        mt = MeanTeacherConfig(**st.get("mean_teacher", {}))
        unlabelled = [c for _, c in _target_crops(run)]

        def mt_trainer(arrays, tcfg, dd, name, run):
            return train_mean_teacher(arrays, unlabelled, tcfg, mt, dd, name, progress=run.progress)

        return _train_members(run, d, lambda labelled: labelled, mt_trainer, st.get("train"))
    raise ValueError(f"self_training.mode must be pseudo_labels or mean_teacher, not {mode!r}")


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------

def model_spec(cfg: dict, members: list[dict], fusion: str, provenance: dict) -> ModelSpec:
    spec = {
        "format_version": 1,
        "name": cfg["name"], "version": cfg["version"], "description": cfg["description"],
        "labels": {"background": 0, "vs": 1, "cochlea": 2},
        "intended_use": cfg["intended_use"], "limitations": cfg["limitations"],
        "provenance": provenance,
        "normalisation": cfg["normalisation"],
        "localiser": _localiser_spec(cfg).to_dict(),
        "crop": cfg["crop"],
        "segmentation": {"spacing_xyz_mm": cfg["segmentation_spacing_xyz_mm"], "fusion": fusion, "members": [
            {"name": m["name"], "network": m["train"]["network"], "patch_size_zyx": m["train"]["patch_size_zyx"],
             "weights": f"{m['name']}.safetensors", "weight": m["weight"], "sha256": _UNSET_SHA256} for m in members]},
        "postprocess": cfg["postprocess"],
    }
    return ModelSpec.from_dict(spec)


def export_model(run: Run, stage: str, target: Path, fusion: str | None = None, extra_provenance: dict | None = None):
    """Write the localiser + ``stage``'s selected members as a model folder (replacing ``target``); with the
    config's ``export.with_segment_members``, the self-trained model also holds the stage-3 members."""
    cfg = run.cfg
    members = _selected_members(run, stage)
    if stage == "self_train" and cfg.get("export", {}).get("with_segment_members", False):
        # Final ensemble of the self-trained members and the stage-3 members they were warm-started from (an
        # export-time choice: no stage depends on it). Both run on every crop; names must differ in the folder.
        members += [{**m, "name": f"{m['name']}_stage3"} for m in _selected_members(run, "segment")]
    prepare = json.loads((run.out / "prepare" / "done.json").read_text(encoding="utf-8"))["info"]
    provenance = {
        **cfg.get("provenance", {}),
        "hrT2_labels_used": False,
        "method": cfg.get("variant", "method_a") if stage == "self_train" else "translation_only",
        "stage": stage,
        "training_data": str(run.data_dir),
        "n_ceT1_cases": prepare["n_ceT1"], "n_hrT2_cases": prepare["n_hrT2"],
        "train_minutes": dict(run.minutes),
        "config": cfg, "torch": torch.__version__, "machine": platform.machine(),
        "trained_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra_provenance or {}),
    }
    spec = model_spec(cfg, members, fusion or cfg.get("fusion", "mean"), provenance)
    states = {"localiser": load_file(str(run.out / "localiser" / "localiser.safetensors"))}
    states.update({m["name"]: load_file(str(m["path"])) for m in members})
    return write_model_folder(target, spec, states, overwrite=True)


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------

STAGE_FUNCTIONS: dict[str, Callable[[Run, Path], dict | None]] = {
    "prepare": stage_prepare, "translate_localiser": stage_translate_localiser, "localiser": stage_localiser,
    "target_crops": stage_target_crops, "translate_crops": stage_translate_crops, "segment": stage_segment,
    "pseudo_labels": stage_pseudo_labels, "self_train": stage_self_train}


def stage_minutes(run_dir) -> dict[str, float]:
    """Minutes of every finished stage of a run folder (its ``done.json`` markers, linked stages included)."""
    run_dir = Path(run_dir)
    return {name: json.loads((run_dir / name / "done.json").read_text(encoding="utf-8"))["minutes"]
            for name in _STAGE_ORDER if (run_dir / name / "done.json").exists()}


def run_pipeline(data_dir, out_dir, cfg: dict, backend: TranslationBackend | None = None, progress: bool = True,
                 model_out=None, until: str | None = None) -> Path | None:
    """Run every stage (up to ``until``) and export the model folder(s); returns the final model folder."""
    run = Run(data_dir, out_dir, cfg, backend, progress)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    mode = cfg.get("self_training", {}).get("mode", "pseudo_labels")
    stages = ["prepare", "translate_localiser", "localiser", "target_crops", "translate_crops"]
    if mode != "mean_teacher":
        stages += ["segment"]
    if mode == "pseudo_labels":
        stages += ["pseudo_labels"]
    if mode != "none":
        stages += ["self_train"]
    for name in stages:
        run.stage(name, lambda d, fn=STAGE_FUNCTIONS[name]: fn(run, d))
        if distributed.is_main() and name == "segment":
            export_model(run, "segment", run.out / "model_translation_only")
        if name == until:
            return None
    final_stage = stages[-1]
    target = Path(model_out) if model_out else run.out / "model"
    if distributed.is_main():
        export_model(run, final_stage, target)
        print(f"model folder written to {target}")
    return target


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="CrossMoDA-layout folder: labelled ceT1 + unlabelled hrT2")
    ap.add_argument("--out", required=True, help="run folder (stage outputs, checkpoints, logs)")
    ap.add_argument("--config", required=True, help="config name in training/configs/ or a JSON file")
    ap.add_argument("--variant", help="apply the config's variants.<name> overrides (e.g. method_b)")
    ap.add_argument("--model-out", help="where to write the final model folder (default OUT/model)")
    ap.add_argument("--until", choices=_STAGE_ORDER, help="stop after this stage")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.variant)
    if distributed.is_main():
        print(json.dumps(cfg, indent=2))
    run_pipeline(args.data, args.out, cfg, progress=not args.no_progress, model_out=args.model_out, until=args.until)


if __name__ == "__main__":
    main()
