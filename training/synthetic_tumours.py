"""Synthetic vestibular schwannomas drawn into real hrT2 ear crops that the pseudo-labels call tumour-free.

Why: members trained on fake hrT2 miss what a translator cannot render — the tumour as a grey mass that fills
the bright CSF of the internal auditory canal and the cerebellopontine cistern. Small intracanalicular tumours
are never found, so they never get pseudo-labels either. Self-training can instead be shown such tumours in
*real* hrT2 context: with the CrossMoDA prior of one unilateral VS per scan (``pseudo_labels.one_vs_per_scan``)
the other ear of a scan whose tumour was found is tumour-free, and a ceT1 tumour shape (its label, from an
annotated source crop cut in the same cochlea-centred frame) is drawn into it.

What is drawn, from a prior and the host crop alone (no hrT2 label is read):

- the shape: a source crop's VS label, in the same crop coordinates (crops are cut around the cochlea with the
  same offset and the right ear mirrored, so a source tumour lands at the host's porus and canal), restricted
  to the host's soft tissue and fluid (voxels above ``tissue_threshold``: bone and air stay) and kept away from
  the host's cochlea — optionally (``fluid_margin_voxels`` ≥ 0) only where it displaces fluid (voxels brighter than
  ``fluid_fraction_of_csf`` × the CSF level, dilated by the margin), as a real tumour pushes the brain away rather
  than lying invisibly over it; its largest connected piece is used;
- the intensity: on T2 (CISS/FIESTA) a schwannoma is darker than CSF and iso- to hyperintense to brain, often
  heterogeneous, so its median is ``factor`` × the median of the host's tissue (``factor`` uniform in
  ``factor_range``), at most ``max_fraction_of_csf`` × the host's CSF level (its 99th intensity percentile),
  times a smooth random field (``heterogeneity``) plus noise of the host's own level;
- the edge: blended through a Gaussian-smoothed mask (partial volume), so no hard edge gives it away.

Arrays are (z, y, x) in the crop frame; intensities engine-normalised (about 0 air to 1 CSF).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cc3d
import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter

from VSCochleaSegLib.labels import COCHLEA, VS

from .augment import log_normal_texture


@dataclass
class SyntheticTumourConfig:
    """``self_training.synthetic_tumours`` of a training config; ``copies_per_free_crop`` 0 switches it off."""
    copies_per_free_crop: int = 0
    factor_range: tuple[float, float] = (0.8, 2.0)
    max_fraction_of_csf: float = 0.85
    csf_percentile: float = 99.0
    heterogeneity: float = 0.2
    texture_sigma_voxels: tuple[float, float, float] = (1.0, 2.0, 2.0)
    edge_sigma_voxels: tuple[float, float, float] = (0.5, 0.7, 0.7)
    tissue_threshold: float = 0.05
    cochlea_clearance_voxels: int = 2
    min_vs_voxels: int = 20
    fluid_margin_voxels: int = -1
    size_exponent: float = 0.0
    min_fit_fraction: float = 0.0
    max_shift_voxels: tuple[int, int, int] = (0, 0, 0)
    tries: int = 5
    fluid_fraction_of_csf: float = 0.5
    max_distance_to_cochlea_mm: float = 10.0
    seed: int = 0

    def __post_init__(self):
        lo, hi = self.factor_range
        if not 0 < lo <= hi:
            raise ValueError(f"synthetic_tumours.factor_range must be 0 < low <= high, not {self.factor_range}")
        if self.copies_per_free_crop < 0:
            raise ValueError(f"synthetic_tumours.copies_per_free_crop must be >= 0, not {self.copies_per_free_crop}")


def noise_level(image: np.ndarray, tissue: np.ndarray) -> float:
    """Robust standard deviation (MAD × 1.4826) of the image minus its 1-voxel Gaussian blur over ``tissue``."""
    residual = (image - gaussian_filter(image, 1.0))[tissue]
    if residual.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))))


@dataclass
class HostCrop:
    """What drawing needs from a tumour-free host crop, independent of the tumour drawn: computed once per host."""
    image: np.ndarray      # float32 (z, y, x), engine-normalised
    labels: np.ndarray     # its pseudo-label
    soft: np.ndarray       # bool: soft tissue and fluid (above ``tissue_threshold``)
    allowed: np.ndarray    # bool: where a tumour may be drawn (soft, clear of the cochlea, optionally near fluid)
    csf: float             # the host's CSF level (``csf_percentile`` of its soft tissue)

    @classmethod
    def of(cls, image_zyx: np.ndarray, labels_zyx: np.ndarray, cfg: SyntheticTumourConfig) -> HostCrop:
        image = np.asarray(image_zyx, dtype=np.float32)
        labels = np.asarray(labels_zyx)
        if labels.shape != image.shape:
            raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
        if (labels == VS).any():
            raise ValueError("the host crop already holds a VS label; draw tumours only into tumour-free crops")
        soft = image > cfg.tissue_threshold
        cochlea = labels == COCHLEA
        if cfg.cochlea_clearance_voxels > 0 and cochlea.any():
            cochlea = binary_dilation(cochlea, iterations=cfg.cochlea_clearance_voxels)
        allowed = soft & ~cochlea
        csf = float(np.percentile(image[soft], cfg.csf_percentile)) if soft.any() else 1.0
        if cfg.fluid_margin_voxels >= 0:
            # A schwannoma grows in the cistern and canal and pushes the brain away: draw it only where it
            # displaces fluid (and up to the margin beyond), never as an invisible patch over brain tissue.
            fluid = image > cfg.fluid_fraction_of_csf * csf
            if cfg.fluid_margin_voxels > 0:
                fluid = binary_dilation(fluid, iterations=cfg.fluid_margin_voxels)
            allowed &= fluid
        return cls(image, labels, soft, allowed, csf)


def draw_tumour(image_zyx: np.ndarray, labels_zyx: np.ndarray, tumour_zyx: np.ndarray, rng: np.random.Generator,
                cfg: SyntheticTumourConfig, host: HostCrop | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Draw the tumour shape ``tumour_zyx`` (bool, same shape) into a tumour-free host crop.

    Args:
        image_zyx: host real hrT2 crop (z, y, x), engine-normalised.
        labels_zyx: its pseudo-label (0 background, 2 cochlea, IGNORE elsewhere; no VS).
        tumour_zyx: a source VS mask in the same crop frame.
        host: ``HostCrop.of(image_zyx, labels_zyx, cfg)`` when already made (several draws into one host).

    Returns ``(image, labels)`` new float32 / uint8 arrays with the drawn voxels labelled VS, or ``None`` when
    fewer than ``cfg.min_vs_voxels`` of the shape fall on the host's soft tissue away from its cochlea.
    """
    host = host or HostCrop.of(image_zyx, labels_zyx, cfg)
    image, labels, soft, csf = host.image, host.labels, host.soft, host.csf
    if tumour_zyx.shape != image.shape:
        raise ValueError(f"image {image.shape} and tumour {tumour_zyx.shape} differ in shape")
    mask = np.asarray(tumour_zyx, bool) & host.allowed
    if mask.sum() < cfg.min_vs_voxels:
        return None
    comps = cc3d.connected_components(mask.astype(np.uint8), connectivity=6)
    sizes = np.bincount(comps.ravel())[1:]
    mask = comps == 1 + int(np.argmax(sizes))
    if mask.sum() < cfg.min_vs_voxels:
        return None
    tissue = soft & ~mask
    reference = float(np.median(image[tissue])) if tissue.any() else 0.3
    median = min(rng.uniform(*cfg.factor_range) * reference, cfg.max_fraction_of_csf * csf)
    tumour = np.full(image.shape, median, np.float32)
    if cfg.heterogeneity > 0:
        tumour *= log_normal_texture(image.shape, rng, cfg.heterogeneity, cfg.texture_sigma_voxels)
    tumour += rng.standard_normal(image.shape).astype(np.float32) * np.float32(noise_level(image, tissue))
    alpha = np.clip(gaussian_filter(mask.astype(np.float32), cfg.edge_sigma_voxels), 0.0, 1.0)
    alpha[mask] = np.maximum(alpha[mask], 0.5)
    out = image * (1.0 - alpha) + tumour * alpha
    new_labels = labels.copy()
    new_labels[mask] = VS
    return out.astype(np.float32), new_labels


def tumour_shapes(labels: Sequence[np.ndarray], min_voxels: int, spacing_zyx_mm: Sequence[float],
                  max_distance_to_cochlea_mm: float = 10.0) -> list[np.ndarray]:
    """The VS masks (bool, z, y, x) of the source label crops whose own ear's tumour it is: at least
    ``min_voxels`` VS voxels, one of them within ``max_distance_to_cochlea_mm`` of the crop's cochlea centre
    (a tumour-free ear's crop can hold the far edge of the other ear's tumour, which is not a canal tumour)."""
    spacing = np.asarray(spacing_zyx_mm, float)
    out = []
    for lab in labels:
        vs, cochlea = lab == VS, np.argwhere(lab == COCHLEA)
        if int(vs.sum()) < min_voxels or not len(cochlea):
            continue
        gap = np.linalg.norm((np.argwhere(vs) - cochlea.mean(0)) * spacing, axis=1).min()
        if gap <= max_distance_to_cochlea_mm:
            out.append(vs)
    return out


def synthetic_tumour_crops(pseudo: Sequence[tuple[np.ndarray, np.ndarray]], shapes: Sequence[np.ndarray],
                           cfg: SyntheticTumourConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """``cfg.copies_per_free_crop`` crops with a drawn tumour for every pseudo-labelled crop without a VS.

    Args:
        pseudo: [(image, label)] pseudo-labelled real hrT2 crops (label with IGNORE); crops holding a VS label
            are left alone.
        shapes: source VS masks (``tumour_shapes``), drawn at random with probability ∝ volume ** ``size_exponent``
            (0: every shape alike; < 0 favours small, intracanalicular tumours), moved by a random whole-voxel
            offset up to ``max_shift_voxels``; a shape of which less than ``min_fit_fraction`` falls on the host's
            soft tissue (a canal tumour that would lie in the host's bone), or that does not fit at all, is
            replaced by another draw, at most ``tries`` per copy.

    Returns [(image float16, label uint8)], deterministic for ``cfg.seed``.
    """
    if cfg.copies_per_free_crop <= 0 or not shapes:
        return []
    rng = np.random.default_rng([cfg.seed, 7])
    weights = np.array([float(s.sum()) for s in shapes]) ** cfg.size_exponent
    weights /= weights.sum()
    shift_range = np.asarray(cfg.max_shift_voxels, int)
    out = []
    for image, labels in pseudo:
        if (labels == VS).any():
            continue
        host = HostCrop.of(image, labels, cfg)
        for _ in range(cfg.copies_per_free_crop):
            for _try in range(cfg.tries):
                k = rng.integers(len(shapes)) if cfg.size_exponent == 0 else rng.choice(len(shapes), p=weights)
                shape = shapes[int(k)]
                if shift_range.any():
                    shape = shifted(shape, rng.integers(-shift_range, shift_range + 1))
                if cfg.min_fit_fraction > 0 and (shape & host.soft).sum() < cfg.min_fit_fraction * max(shape.sum(), 1):
                    continue  # e.g. a canal tumour that would lie in the host's bone: the host's canal runs elsewhere
                drawn = draw_tumour(image, labels, shape, rng, cfg, host)
                if drawn is not None:
                    out.append((drawn[0].astype(np.float16), drawn[1].astype(np.uint8)))
                    break
    return out


def shifted(mask: np.ndarray, offset_zyx) -> np.ndarray:
    """``mask`` moved by whole voxels ``offset_zyx`` (z, y, x), filled with False (no wrap-around)."""
    out = np.zeros_like(mask)
    src = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset_zyx, mask.shape))
    dst = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(offset_zyx, mask.shape))
    out[dst] = mask[src]
    return out
