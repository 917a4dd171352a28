"""Pseudo-labels for unlabelled real hrT2 ear crops from a trained ensemble (self-training, method a).

The ensemble's fused probabilities on each crop become a label map, cleaned the way the CrossMoDA
methods clean their outputs and filtered by confidence:

- voxel confidence: a foreground voxel whose fused probability is below ``min_voxel_confidence`` is
  set to background (a false background costs less than a false tumour in the retrained network);
- connected components: only the largest cochlea component of the crop is kept (a crop holds one ear);
  a "VS" component farther than ``vs_max_distance_to_cochlea_mm`` from that cochlea is not a tumour of
  this ear's internal auditory canal and is dropped, then the largest VS left is kept, and dropped if
  smaller than ``min_vs_voxels``;
- a crop whose label map has (almost) no cochlea is a failed prediction (``min_cochlea_voxels``);
- optionally (``ignore_uncertain``, ``no_vs_label_beyond_cochlea_mm``) unsure voxels, removed components and,
  in crops without a found VS, everything far from the cochlea get the IGNORE label (no loss);
- optionally (``hard_negative_beyond_cochlea_mm``) confident "VS" components far from the cochlea are labelled
  background even where IGNORE would otherwise apply: label-free hard negatives (cerebellum, brainstem edges);
- optionally (``vs_ignore_margin_mm``) background around a pseudo-labelled VS is IGNORE (members under-segment);
- optionally (``vs_grow_mm``) each pseudo-VS is grown into connected voxels of its own intensity (members
  under-segment), and (``vs_open_mm``) opened with a ball so that a leak through a thin neck into the abutting
  cerebellum or brainstem is cut off and becomes IGNORE; (``vs_trim_mm``) the VS edge drawn into the CSF is
  trimmed as the engine's post-processing does, and the voxels around the VS brighter than the half-way grey
  between tumour and CSF are labelled background even inside the IGNORE margin (on T2 they are CSF);
- optionally (``vs_gap_ignore_beyond_mm``) a VS found far from the cochlea (its canal part missed) leaves the
  corridor between them IGNORE instead of background;
- optionally (``vs_free_ear_ignore_beyond_cochlea_mm``) the far (medial) part of a tumour-free ear's crop, which
  reaches into the other ear's cerebellopontine angle, is IGNORE;
- optionally (``one_vs_per_scan``) the CrossMoDA prior that every scan holds one unilateral VS: the crops of
  a scan where the ensemble found no VS are not used (it missed the tumour), only the largest found VS of a
  scan is kept (smaller "VS" in its other ear become IGNORE), and the other ear is then known to be
  tumour-free, so it is labelled in full;
- case confidence: the mean fused probability of the predicted class over the predicted foreground;
  crops below ``min_case_confidence`` are not used, and at most the ``keep_fraction`` most confident
  crops are.

Arrays are (z, y, x); probabilities (C, z, y, x) with C = 3 (background, VS, cochlea).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import cc3d
import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from VSCochleaSegLib.fusion import FUSERS
from VSCochleaSegLib.inference import InferenceSettings, predict_softmax
from VSCochleaSegLib.labels import COCHLEA, VS
from VSCochleaSegLib.postprocess import ball, grow_into_own_intensity, refine_cochlea_edges, vs_edge_in_csf

from .segmentation import IGNORE


@dataclass
class PseudoLabelConfig:
    min_voxel_confidence: float = 0.5
    min_case_confidence: float = 0.7
    keep_fraction: float = 1.0
    keep_largest: bool = True
    min_vs_voxels: int = 20
    # Every ear crop holds a cochlea (the localiser centred it there): a label map with fewer cochlea voxels
    # than this is a failed prediction, and its crop gets confidence 0 (never used). 0 = no such check.
    min_cochlea_voxels: int = 0
    # Anatomical check: a VS grows from the internal auditory canal, whose fundus abuts the cochlea (on the
    # 32 source ceT1 label maps of the benchmark every VS comes within 6.6 mm of its cochlea), so a "VS"
    # component whose nearest voxel is farther than this from the crop's cochlea is brainstem, cerebellum or
    # vessel. 0 = no check. Needs ``spacing_zyx_mm``, the crops' voxel size (the pipeline sets it).
    vs_max_distance_to_cochlea_mm: float = 0.0
    spacing_zyx_mm: tuple = (1.0, 1.0, 1.0)
    # Self-training that does not teach "no tumour" where the ensemble is merely unsure: voxels whose fused
    # probability (any class) is below ``min_voxel_confidence`` and foreground components the checks above
    # remove are labelled IGNORE (no loss) instead of background.
    ignore_uncertain: bool = False
    # A crop where the ensemble found no VS is not evidence that there is none (it misses tumours more often
    # than it finds false ones): beyond this distance (mm) from the crop's cochlea its voxels are IGNORE, so it
    # teaches the cochlea and its surroundings only. 0 = off (the whole crop is labelled).
    no_vs_label_beyond_cochlea_mm: float = 0.0
    # Up to this share of the kept crops is reserved for the most confident crops *with* a found VS (a plain
    # confidence ranking keeps mostly tumour-free crops: measured 1-9 of 39). 0 = one ranking for all.
    vs_crop_share: float = 0.0
    # CrossMoDA's cohort: every scan holds exactly one (unilateral, sporadic) VS. A scan whose crops show no
    # found VS is a missed tumour, not two tumour-free ears: its crops are not used. Of several found VS the
    # largest is kept. The other ear of a scan with a found VS is tumour-free and is labelled in full
    # (``no_vs_label_beyond_cochlea_mm`` is not applied to it). Off for cohorts with VS-free or NF2 scans.
    one_vs_per_scan: bool = False
    # Label-free hard negatives: a confident "VS" component none of whose voxels comes within this distance (mm)
    # of the crop's cochlea is cerebellum or brainstem edge, never a tumour of this ear (on real hrT2 the members'
    # false "VS" lie 16-35 mm from the cochlea centre, true ones within 13 mm; docs/training.md). Such components
    # are labelled background, overriding IGNORE, so retraining learns "not VS" there instead of "no loss".
    # Must exceed ``vs_max_distance_to_cochlea_mm`` (components in between stay dropped/IGNORE). 0 = off.
    hard_negative_beyond_cochlea_mm: float = 0.0
    # Fake-trained members under-segment the tumour (they miss its canal part, docs/training.md): background
    # voxels within this distance (mm) of a pseudo-labelled VS are IGNORE, so retraining is not taught to
    # shrink the tumour further. 0 = off.
    vs_ignore_margin_mm: float = 0.0
    # The tumour-free ear of a scan (``one_vs_per_scan``) is labelled in full, but its crop reaches past the
    # midline into the other cerebellopontine angle (with ``crop.medial_offset_mm`` 16 a 64 mm crop spans 48 mm
    # medially), where the scan's tumour lies: on the phantom target scans every true VS voxel in such crops was
    # 27-47 mm from the crop's cochlea and was taught as background. Beyond this distance (mm) from the
    # cochlea such a crop is IGNORE. 0 = off (the whole crop labelled).
    vs_free_ear_ignore_beyond_cochlea_mm: float = 0.0
    # Label-free growing of an under-segmented pseudo-VS (members miss the canal part; found pseudo-VS are 0.64 x
    # the true volume): voxels within this distance (mm) of the found VS whose intensity lies within the
    # ``vs_grow_quantiles`` of the found VS's own intensities, and that connect to it through such voxels
    # (6-connected), become VS. Never the cochlea or a hard negative. Needs the crop image. 0 = off.
    vs_grow_mm: float = 0.0
    vs_grow_quantiles: tuple = (0.1, 0.9)
    # Label-free trimming of a pseudo-VS that leaked into the cerebellum or brainstem it abuts (grey like the
    # tumour on hrT2; on the phantom target crops pseudo-VS were 1.23 x the true volume where found): after any
    # growing, the VS is opened with a ball of this radius (mm) and its largest remaining part kept; the voxels
    # cut off (thin necks and the tissue beyond them) become IGNORE, neither VS nor background; a VS that the
    # opening would remove entirely is left as it is. 0 = off.
    vs_open_mm: float = 0.0
    # Label-free correction of the pseudo-cochlea's edge (the engine's ``postprocess.cochlea_refine_mm``): moved by
    # at most this distance (mm) outwards to the half-way grey between its fluid (the ``cochlea_fluid_quantile``
    # of its intensities) and the surrounding bone; the voxels it gains are labelled even where the members were
    # unsure. Needs the crop image. 0 = off.
    cochlea_refine_mm: float = 0.0
    cochlea_fluid_quantile: float = 0.9
    # Label-free CSF around the pseudo-VS (the engine's ``postprocess.vs_trim_mm``): after growing and opening, the
    # VS voxels within this distance (mm) of its edge brighter than the half-way grey between the tumour and the CSF
    # around it (the ``vs_csf_quantile`` of a 1 mm shell) become background, and so do the voxels of its IGNORE
    # margin (``vs_ignore_margin_mm``) that are brighter than that grey: the members learn where the tumour ends
    # against CSF instead of never being told. Needs the crop image. 0 = off.
    vs_trim_mm: float = 0.0
    vs_csf_quantile: float = 0.9
    # A VS grows from the fundus of the internal auditory canal, next to the cochlea, but fake-trained members miss
    # the canal part, so on large tumours they find the cisternal part alone, 10-13 mm from the cochlea
    # (docs/training.md). When the kept VS's nearest voxel lies farther than this (mm) from the crop's cochlea, the
    # background voxels of the corridor between them (distance to the VS + distance to the cochlea at most that
    # gap + ``vs_gap_ignore_width_mm``) become IGNORE, so retraining is not taught that the canal part is
    # background. Pair with a ``vs_max_distance_to_cochlea_mm`` that keeps such cisternal parts. 0 = off.
    vs_gap_ignore_beyond_mm: float = 0.0
    vs_gap_ignore_width_mm: float = 6.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EnsembleMember:
    """A trained network and how to run it: ``patch_size_zyx`` 3 entries (3D) or 2 (2D, axial slices)."""

    net: torch.nn.Module
    patch_size_zyx: Sequence[int]
    weight: float = 1.0


def ensemble_probabilities(members: list, crop_zyx: np.ndarray, fusion: str = "mean",
                           settings: InferenceSettings = InferenceSettings()) -> np.ndarray:
    """Fused class probabilities (C, z, y, x) of ``members`` on one normalised crop, as the engine fuses."""
    probs = [predict_softmax(m.net, np.asarray(crop_zyx, np.float32), tuple(m.patch_size_zyx), torch.device("cpu"),
                             settings) for m in members]
    return FUSERS[fusion](probs, [m.weight for m in members])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    comps = cc3d.connected_components(mask, connectivity=26)
    if comps.max() == 0:
        return mask
    counts = np.bincount(comps.ravel())
    counts[0] = 0
    return comps == counts.argmax()


def _distance_mm(anchor: np.ndarray, spacing_zyx_mm) -> np.ndarray:
    """Euclidean distance (mm) of every voxel to the nearest ``anchor`` voxel; inf everywhere without one."""
    if not anchor.any():
        return np.full(anchor.shape, np.inf)
    return ndimage.distance_transform_edt(~anchor, sampling=spacing_zyx_mm)


def _nearest_per_component(mask: np.ndarray, distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(26-connected components of ``mask``, the smallest ``distance`` over each component's voxels indexed by
    component label; entry 0, the background, is inf)."""
    comps = cc3d.connected_components(mask, connectivity=26)
    n = int(comps.max())
    nearest = np.full(n + 1, np.inf)
    if n:
        nearest[1:] = ndimage.minimum(distance, comps, np.arange(1, n + 1))
    return comps, nearest


def open_vs(vs: np.ndarray, radius_mm: float, spacing_zyx_mm) -> np.ndarray:
    """The pseudo-VS mask ``vs`` (bool (z, y, x)) opened with a ball of ``radius_mm`` (mm), its largest
    26-connected part kept; empty when nothing survives the opening."""
    return _largest_component(ndimage.binary_opening(vs, structure=ball(radius_mm, spacing_zyx_mm)))


def grow_vs(labels: np.ndarray, image: np.ndarray, cfg: PseudoLabelConfig, protected: np.ndarray) -> np.ndarray:
    """Voxels (bool (z, y, x)) to add to the pseudo-VS of ``labels``: within ``cfg.vs_grow_mm`` of it, with an
    intensity of ``image`` (same grid, normalised) inside the ``cfg.vs_grow_quantiles`` of the VS's intensities,
    reachable from it through such voxels (6-connectivity); never COCHLEA or ``protected`` voxels."""
    return grow_into_own_intensity(labels == VS, image, cfg.vs_grow_mm, cfg.vs_grow_quantiles, cfg.spacing_zyx_mm,
                                   allowed=(labels != COCHLEA) & ~protected)


def vs_canal_gap(vs: np.ndarray, cochlea_mm: np.ndarray, cfg: PseudoLabelConfig) -> np.ndarray:
    """The corridor (bool (z, y, x)) between the VS ``vs`` (bool, not empty) and the cochlea, given each voxel's
    distance to the cochlea ``cochlea_mm`` (mm, finite), where the members may have missed the tumour's canal part:
    voxels whose distance to the VS plus distance to the cochlea is at most the VS's gap to the cochlea +
    ``cfg.vs_gap_ignore_width_mm``; empty when that gap is ``cfg.vs_gap_ignore_beyond_mm`` or less."""
    gap = float(cochlea_mm[vs].min())
    if gap <= cfg.vs_gap_ignore_beyond_mm:
        return np.zeros(vs.shape, bool)
    return cochlea_mm + _distance_mm(vs, cfg.spacing_zyx_mm) <= gap + cfg.vs_gap_ignore_width_mm


def pseudo_label(probs: np.ndarray, cfg: PseudoLabelConfig, vs_free: bool = False,
                 image: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(labels uint8 (z, y, x): 0, VS, COCHLEA or IGNORE, case confidence in [0, 1]) from fused probabilities
    (C, z, y, x). ``vs_free``: the crop is known to hold no tumour (its label map is not trimmed to the cochlea
    surroundings, and any "VS" found in it becomes IGNORE). ``image``: the crop (z, y, x), for ``vs_grow_mm`` and
    ``cochlea_refine_mm`` and ``vs_trim_mm``."""
    img = None if image is None else np.asarray(image, np.float32)  # converted once for every intensity rule
    labels = probs.argmax(0).astype(np.uint8)
    top = probs.max(0)
    unsure = top < cfg.min_voxel_confidence
    labels[(labels > 0) & unsure] = 0
    dropped = np.zeros(labels.shape, bool)  # foreground components the checks below remove
    hard_negative = np.zeros(labels.shape, bool)  # confident "VS" far from the cochlea: taught as background
    members_cochlea = None  # the members' own cochlea, kept when cochlea_refine_mm moves its edge
    cochlea_mm = None  # distance (mm) to the kept cochlea, made once when a rule needs it (the cochlea is final
    # once its components are chosen: nothing after that labels a voxel COCHLEA or removes one)

    def distance_to_cochlea_mm() -> np.ndarray:
        nonlocal cochlea_mm
        if cochlea_mm is None:
            cochlea_mm = _distance_mm(labels == COCHLEA, cfg.spacing_zyx_mm)
        return cochlea_mm

    for c in (COCHLEA, VS):
        mask = labels == c
        if not mask.any():
            continue
        if c == VS and (cfg.hard_negative_beyond_cochlea_mm > 0 or cfg.vs_max_distance_to_cochlea_mm > 0):
            comps, nearest = _nearest_per_component(mask, distance_to_cochlea_mm())
            if cfg.hard_negative_beyond_cochlea_mm > 0 and (labels == COCHLEA).any():
                hard_negative = mask & (nearest > cfg.hard_negative_beyond_cochlea_mm)[comps]
                labels[hard_negative] = 0
                mask = mask & ~hard_negative
            if cfg.vs_max_distance_to_cochlea_mm > 0:
                near = mask & (nearest <= cfg.vs_max_distance_to_cochlea_mm)[comps]
                dropped |= mask & ~near
                labels[mask & ~near] = 0
                mask = near
        keep = _largest_component(mask) if cfg.keep_largest else mask
        if c == VS and keep.sum() < cfg.min_vs_voxels:
            keep = np.zeros_like(mask)
        dropped |= mask & ~keep
        labels[mask & ~keep] = 0
        if c == COCHLEA and cfg.cochlea_refine_mm > 0 and keep.any():
            if image is None:
                raise ValueError("cochlea_refine_mm needs the crop image")
            members_cochlea = labels == COCHLEA  # the case confidence stays the members'
            labels = refine_cochlea_edges(labels, img, cfg.spacing_zyx_mm, cfg.cochlea_refine_mm,
                                          cfg.cochlea_fluid_quantile)
            unsure &= labels != COCHLEA
            dropped &= labels != COCHLEA
    fg = (labels == VS) | (labels == COCHLEA if members_cochlea is None else members_cochlea)
    confidence = float(top[fg].mean()) if fg.any() else 0.0
    if (labels == COCHLEA).sum() < cfg.min_cochlea_voxels:
        confidence = 0.0
    if vs_free:
        labels[labels == VS] = IGNORE
    if cfg.ignore_uncertain:
        labels[unsure | dropped] = IGNORE
    # Only the cochlea surroundings are taught where the crop may hold a tumour the label map does not show: a
    # crop without a found VS (a missed one may lie anywhere), or a tumour-free ear (the scan's tumour lies in the
    # far part of its crop, across the midline).
    if vs_free:
        ignore_beyond_mm = cfg.vs_free_ear_ignore_beyond_cochlea_mm
    else:
        ignore_beyond_mm = 0.0 if (labels == VS).any() else cfg.no_vs_label_beyond_cochlea_mm
    if ignore_beyond_mm > 0 and (labels == COCHLEA).any():
        labels[distance_to_cochlea_mm() > ignore_beyond_mm] = IGNORE
    if cfg.vs_gap_ignore_beyond_mm > 0 and (labels == VS).any() and (labels == COCHLEA).any():
        labels[vs_canal_gap(labels == VS, distance_to_cochlea_mm(), cfg) & (labels == 0)] = IGNORE
    if cfg.vs_grow_mm > 0 and (labels == VS).any():
        if image is None:
            raise ValueError("vs_grow_mm needs the crop image")
        labels[grow_vs(labels, img, cfg, hard_negative)] = VS
    if cfg.vs_open_mm > 0:
        vs = labels == VS
        kept = open_vs(vs, cfg.vs_open_mm, cfg.spacing_zyx_mm) if vs.any() else vs
        if kept.any():  # a VS thinner than the ball everywhere is left as it is
            labels[vs & ~kept] = IGNORE
    half_way = None
    if cfg.vs_trim_mm > 0 and (labels == VS).any():
        if image is None:
            raise ValueError("vs_trim_mm needs the crop image")
        half_way, edge = vs_edge_in_csf(labels == VS, img, cfg.spacing_zyx_mm, cfg.vs_trim_mm,
                                        cfg.vs_csf_quantile, shell_excluded=labels == COCHLEA)
        labels[edge] = 0
    if cfg.vs_ignore_margin_mm > 0 and (labels == VS).any():
        margin = _distance_mm(labels == VS, cfg.spacing_zyx_mm) <= cfg.vs_ignore_margin_mm
        labels[margin & (labels == 0)] = IGNORE
        if half_way is not None:  # CSF in the margin: background, whatever made it IGNORE
            labels[margin & (labels == IGNORE) & (img > half_way)] = 0
    labels[hard_negative] = 0
    return labels, confidence


def select_confident(confidences: Sequence[float], cfg: PseudoLabelConfig,
                     has_vs: Sequence[bool] | None = None) -> list[int]:
    """Indices of the crops to train on: above ``min_case_confidence`` and within the top ``keep_fraction``;
    with ``cfg.vs_crop_share`` and ``has_vs``, that share of the places goes first to the most confident
    crops with a VS."""
    conf = np.asarray(confidences, float)
    order = [int(i) for i in np.argsort(-conf, kind="stable") if conf[i] >= cfg.min_case_confidence]
    n_keep = int(np.ceil(cfg.keep_fraction * len(conf)))
    chosen: list[int] = []
    if cfg.vs_crop_share > 0 and has_vs is not None:
        chosen = [i for i in order if has_vs[i]][: int(round(cfg.vs_crop_share * n_keep))]
    taken = set(chosen)
    chosen += [i for i in order if i not in taken][: n_keep - len(chosen)]
    return sorted(chosen)


def _record(k: int, labels: np.ndarray, confidence: float) -> dict:
    return {"crop": k, "confidence": round(confidence, 4), "vs_voxels": int((labels == VS).sum()),
            "cochlea_voxels": int((labels == COCHLEA).sum())}


def pseudo_label_crops(members: list, crops: list, cfg: PseudoLabelConfig, fusion: str = "mean",
                       progress: bool = True, scan_ids: Sequence[str] | None = None) -> tuple[list, list]:
    """Label every crop; returns ([(image, labels)] of the selected crops, per-crop records for the log).
    ``scan_ids`` (one per crop) groups the crops of one scan, for ``cfg.one_vs_per_scan``; crops are labelled
    scan by scan, so only one scan's probabilities are held at a time."""
    if cfg.one_vs_per_scan and (scan_ids is None or len(scan_ids) != len(crops)):
        raise ValueError("one_vs_per_scan needs the scan id of every crop")
    scans: dict = {}
    for k, scan in enumerate(scan_ids if cfg.one_vs_per_scan else range(len(crops))):
        scans.setdefault(scan, []).append(k)
    labelled, records = [None] * len(crops), [None] * len(crops)
    with tqdm(total=len(crops), desc="pseudo-labels", unit="crop", disable=not progress) as bar:
        for mine in scans.values():
            probs = {k: ensemble_probabilities(members, crops[k], fusion) for k in mine}
            for k in mine:
                labels, conf = pseudo_label(probs[k], cfg, image=crops[k])
                labelled[k], records[k] = (crops[k], labels), _record(k, labels, conf)
            if cfg.one_vs_per_scan:
                tumour = max(mine, key=lambda k: records[k]["vs_voxels"])
                for k in mine:
                    if records[tumour]["vs_voxels"] == 0:  # the ensemble missed this scan's tumour
                        records[k]["confidence"] = 0.0
                    elif k != tumour:
                        labels, conf = pseudo_label(probs[k], cfg, vs_free=True, image=crops[k])
                        labelled[k], records[k] = (crops[k], labels), _record(k, labels, conf)
            bar.update(len(mine))
    keep = set(select_confident([r["confidence"] for r in records], cfg, [r["vs_voxels"] > 0 for r in records]))
    for r in records:
        r["used"] = r["crop"] in keep
    return [labelled[i] for i in sorted(keep)], records
