"""Find both inner ears on the whole scan with the model's coarse localiser network.

The scan is resampled onto an LPS-aligned grid at the localiser's spacing (2 mm in the bundled model),
the localiser labels VS and cochlea coarsely, and the strongest anatomically plausible pair of cochlea
components (50-100 mm apart, within 20° of left-right) gives both ears' centres (LPS mm; LPS x → patient
left). Without such a pair the strongest detection is kept and the other ear is a weak peak near its mirror
image across the head's midline, or the mirror image itself (flagged); if nothing is found the field of view
does not hold the inner ears and the scan is refused.
Measured choice (docs/localisation.md): a learned 2 mm localiser instead of atlas registration, because it
needs no registration (≈1 s on CPU) and copes with any head pose the training data covers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cc3d
import numpy as np
import SimpleITK as sitk
import torch

from .errors import InputError
from .geometry import GridSpec, lps_aligned_grid, resample_to_grid
from .inference import InferenceSettings, predict_softmax
from .labels import COCHLEA
from .model_folder import LocaliserSpec
from .measure import index_to_lps
from .normalisation import IntensityScale

SIDE_SIGN = {"left": 1.0, "right": -1.0}
_MIN_COCHLEA_PROBABILITY_MASS = 2.0  # voxels × probability at 2 mm: below this it is noise
_INTERCOCHLEAR_MM = (50.0, 100.0)  # centre-to-centre distance of the two cochleae, adults
_MAX_PAIR_TILT_DEG = 20.0  # angle between the cochlea-to-cochlea line and the LPS x axis
_MIRROR_SEARCH_RADIUS_MM = 15.0
_WEAK_PROBABILITY = 0.2


@dataclass
class EarLocations:
    """Cochlea centres (LPS mm) per side, the midline and which sides were only estimated."""

    cochlea_lps: dict
    midline_point_lps: np.ndarray
    left_axis_lps: np.ndarray
    mirrored: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    @classmethod
    def from_cochleae(cls, cochlea_lps: dict, mirrored: dict | None = None,
                      warnings: list | None = None) -> EarLocations:
        """Ears from the two cochlea centres (LPS mm, keys "left"/"right"): the midline point half-way between
        them and the left axis along them — or the LPS x axis when they do not lie left and right of each other."""
        left_axis = cochlea_lps["left"] - cochlea_lps["right"]
        left_axis = left_axis / max(np.linalg.norm(left_axis), 1e-6)
        if left_axis[0] < 0.5:
            left_axis = np.array([1.0, 0.0, 0.0])
        midline = (cochlea_lps["left"] + cochlea_lps["right"]) / 2
        return cls(cochlea_lps, midline, left_axis, mirrored or {}, warnings or [])

    def medial_direction(self, side: str) -> np.ndarray:
        """Unit vector (LPS) from this ear towards the midline."""
        return -SIDE_SIGN[side] * self.left_axis_lps


def localiser_grid(image: sitk.Image, spec: LocaliserSpec) -> GridSpec:
    stride_xyz = tuple(reversed(spec.network.total_stride_zyx))
    return lps_aligned_grid(image, spec.spacing_xyz_mm, multiple_of=stride_xyz)


def localise_ears(
    image: sitk.Image,
    net: torch.nn.Module,
    spec: LocaliserSpec,
    scale: IntensityScale,
    device: torch.device,
    settings: InferenceSettings = InferenceSettings(),
    cancel=None,
    progress=None,
) -> EarLocations:
    grid = localiser_grid(image, spec)
    volume = scale.apply(resample_to_grid(image, grid))
    probs = predict_softmax(net, volume, spec.patch_size_zyx, device, settings, cancel, progress)
    return ears_from_probabilities(probs[COCHLEA], volume, grid)


def ears_from_probabilities(cochlea_prob_zyx: np.ndarray, volume_zyx: np.ndarray, grid: GridSpec) -> EarLocations:
    """Both cochlea centres (LPS mm) from the localiser's cochlea probability on ``grid`` ((z, y, x) arrays).

    Candidates are the components of probability > 0.5. The answer is the strongest anatomically plausible
    pair (:func:`plausible_cochlea_pair`): a false detection (a bright spot in the CPA cistern, a vessel, a
    structure behind the petrous bone) rarely has a partner at the other ear's place. Without such a pair
    the strongest candidate is kept, the other ear is looked for as a weak probability peak (> 0.2) within
    15 mm of its mirror image across the head's midline, and failing that it is the mirror image (flagged).
    """
    head = volume_zyx > 0.05
    if not head.any():
        raise InputError("The scan looks empty after normalisation; check it is an hrT2 head scan.")
    x_index = np.nonzero(head)[2].mean()
    midline_x = float(grid.index_to_lps(np.array([[x_index, 0.0, 0.0]]))[0, 0])
    candidates = _probability_components(cochlea_prob_zyx, 0.5, grid, _MIN_COCHLEA_PROBABILITY_MASS)
    if not candidates:
        raise InputError(
            "No inner ear was found in this scan. The field of view must contain both internal auditory "
            "canals and cochleae (a posterior-fossa hrT2 such as CISS or FIESTA); check the scan and the series."
        )
    pairs = [(a[1] + b[1], a[0], b[0]) for a in candidates for b in candidates
             if a[0][0] > b[0][0] and plausible_cochlea_pair(a[0], b[0])]
    mirrored, warnings = {}, []
    if pairs:
        _, left, right = max(pairs, key=lambda p: p[0])
        cochlea = {"left": left, "right": right}
    else:
        found = max(candidates, key=lambda c: c[1])[0]
        side, other = ("left", "right") if found[0] > midline_x else ("right", "left")
        mirror = found.copy()
        mirror[0] = 2 * midline_x - found[0]
        weak = _weak_peak_near(cochlea_prob_zyx, grid, mirror, found)
        cochlea = {side: found, other: weak if weak is not None else mirror}
        if weak is None:
            mirrored[other] = True
            warnings.append(f"The {other} inner ear was not found; its position was mirrored from the {side} ear.")
        else:
            warnings.append(f"The {other} inner ear was only weakly detected; check its segmentation.")
    return EarLocations.from_cochleae(cochlea, mirrored, warnings)


def plausible_cochlea_pair(left_lps: np.ndarray, right_lps: np.ndarray) -> bool:
    """Could these two points (LPS mm) be the left and right cochlea of one adult head?

    The cochleae lie 50-100 mm apart (about 60-75 mm in adults) on a line within 20° of the left-right axis
    (head roll and yaw in a head coil stay well below that)."""
    d = np.asarray(left_lps, float) - np.asarray(right_lps, float)
    dist = float(np.linalg.norm(d))
    if not _INTERCOCHLEAR_MM[0] <= dist <= _INTERCOCHLEAR_MM[1]:
        return False
    return bool(d[0] > 0 and np.degrees(np.arccos(min(1.0, d[0] / dist))) <= _MAX_PAIR_TILT_DEG)


def _probability_components(prob_zyx: np.ndarray, threshold: float, grid: GridSpec, min_mass: float,
                            within: np.ndarray | None = None) -> list[tuple[np.ndarray, float]]:
    """[(probability-weighted centre LPS mm, mass = Σ probability)] of the components of ``prob > threshold``
    (inside the boolean mask ``within`` if given) with at least ``min_mass``."""
    mask = prob_zyx > threshold
    if within is not None:
        mask &= within
    comps = cc3d.connected_components(mask, connectivity=26)
    out = []
    for cid in range(1, int(comps.max()) + 1):
        sel = comps == cid
        w = prob_zyx[sel]
        if float(w.sum()) < min_mass:
            continue
        centre_zyx = (np.argwhere(sel) * w[:, None]).sum(0) / w.sum()
        out.append((grid.index_to_lps(centre_zyx[::-1][None])[0], float(w.sum())))
    return out


def _weak_peak_near(prob_zyx: np.ndarray, grid: GridSpec, centre_lps: np.ndarray, partner_lps: np.ndarray):
    """The strongest component of probability > 0.2 within 15 mm of ``centre_lps`` that pairs plausibly with
    ``partner_lps``, as its LPS centre, or None."""
    z, y, x = np.indices(prob_zyx.shape)
    pts = grid.index_to_lps(np.stack([x.ravel(), y.ravel(), z.ravel()], 1).astype(float))
    near = (np.linalg.norm(pts - centre_lps, axis=1) <= _MIRROR_SEARCH_RADIUS_MM).reshape(prob_zyx.shape)
    found = [c for c in _probability_components(prob_zyx, _WEAK_PROBABILITY, grid, _MIN_COCHLEA_PROBABILITY_MASS / 4,
                                                within=near)
             if plausible_cochlea_pair(*sorted([c[0], partner_lps], key=lambda p: -p[0]))]
    return max(found, key=lambda c: c[1])[0] if found else None


def cochlea_centres_from_labels(labels: sitk.Image) -> dict:
    """{"left": LPS mm, "right": LPS mm} from the two largest cochlea components (left = larger LPS x)."""
    arr = sitk.GetArrayViewFromImage(labels)
    comps = cc3d.connected_components(np.asarray(arr) == COCHLEA, connectivity=26)
    stats = cc3d.statistics(comps)
    order = np.argsort(stats["voxel_counts"][1:])[::-1][:2] + 1
    if len(order) < 2:
        raise ValueError("fewer than two cochlea components in the label map")
    pts = index_to_lps(labels, stats["centroids"][order])
    left, right = (pts[0], pts[1]) if pts[0][0] > pts[1][0] else (pts[1], pts[0])
    return {"left": left, "right": right}
