"""Tumour intensity augmentation of translated (fake hrT2) volumes.

A translator learns the VS's hrT2 appearance from few examples, and real VS intensity on hrT2 varies
(solid, cystic, heterogeneous). CrossMoDA 2021 teams found that re-scaling the tumour's intensity in the
translated images (darkening it by 50 %) raised VS Dice by about 0.1 (0.72 → 0.84 in 5-fold CV). Here the
VS region is multiplied by a random factor, darker or brighter, through a Gaussian-smoothed mask so the
edit has no hard edge a network could learn to spot: weight ≈ 1 deep inside the tumour, ≈ 0.5 on its
boundary, 0 a few σ outside.

On hrT2 a VS is outlined by bright CSF: in the cerebellopontine cistern and, for the intracanalicular part,
inside the CSF-filled internal auditory canal (a grey rod in a bright tube). A translator trained for a few
hundred iterations renders the thin CSF of the canal as dark as the surrounding bone, so members trained on
its fakes never see that outline. ``add_csf_rim`` paints a random, partial bright rim around the tumour.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter

from VSCochleaSegLib.labels import VS

from ..augment import log_normal_texture


def augment_tumour_intensity(image_zyx: np.ndarray, labels_zyx: np.ndarray, rng: np.random.Generator,
                             factor_range=(0.5, 1.5), sigma_voxels=1.0, probability: float = 1.0,
                             label: int = VS, heterogeneity: float = 0.0, texture_sigma_voxels=2.0,
                             relative_to_tissue: bool = False, tissue_threshold: float = 0.05) -> np.ndarray:
    """Scale the intensity of the ``label`` region of ``image_zyx`` by a random factor.

    Args:
        image_zyx: a (translated) volume, any float scaling; returned as a new float32 array.
        labels_zyx: its label map, same shape.
        factor_range: the factor is uniform in this range (< 1 darkens, > 1 brightens).
        sigma_voxels: Gaussian smoothing of the mask edge, a scalar or one value per axis (z, y, x)
            (e.g. (0.5, 1, 1) for slices twice as thick as the in-plane spacing).
        probability: chance of applying the augmentation at all.
        heterogeneity: 0 scales the tumour uniformly; h > 0 multiplies the factor by exp(h · n), n a smooth
            Gaussian random field of unit standard deviation (``texture_sigma_voxels``, scalar or per axis),
            so the tumour gets the patchy texture of heterogeneous or partly cystic schwannomas on T2.
        relative_to_tissue: the drawn value is the tumour's new median *relative to the median of the other
            tissue* (voxels above ``tissue_threshold``, engine-normalised scale) instead of a factor on its
            translated intensity: the result no longer depends on how bright the translator made the tumour
            (a CycleGAN may render it too dark, CUT may keep ceT1's enhancement).

    Returns the augmented image (an unchanged copy when there is no tumour or the ``probability`` draw
    fails).
    """
    image = np.asarray(image_zyx, dtype=np.float32)
    labels = np.asarray(labels_zyx)
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape} differ in shape")
    mask = labels == label
    if not mask.any() or rng.random() >= probability:
        return image.copy()
    factor = np.float32(rng.uniform(*factor_range))
    if relative_to_tissue:
        tissue = image[~mask & (image > tissue_threshold)]
        reference = float(np.median(tissue)) if tissue.size else 1.0
        factor = np.float32(factor * reference / max(float(np.median(image[mask])), 0.05 * reference))
    if heterogeneity > 0:
        factor = factor * log_normal_texture(image.shape, rng, heterogeneity, texture_sigma_voxels)
    weight = gaussian_filter(mask.astype(np.float32), sigma_voxels)
    return image * (1.0 + (factor - 1.0) * weight)


def add_csf_rim(image_zyx: np.ndarray, labels_zyx: np.ndarray, rng: np.random.Generator,
                width_voxels=(1, 3), brightness_percentile: float = 99.0, brightness_range=(0.8, 1.1),
                coverage_range=(0.4, 1.0), sigma_voxels=(0.5, 0.7, 0.7), texture_sigma_voxels=(1.0, 3.0, 3.0),
                label: int = VS) -> np.ndarray:
    """Brighten a partial rim around the ``label`` region to CSF brightness (hrT2 cisterns and canal).

    Args:
        image_zyx: a (translated) volume (z, y, x), any float scaling; returned as a new float32 array.
        labels_zyx: its label map, same shape.
        width_voxels: the rim is the tumour dilated in-plane by w voxels (w uniform integer in this range,
            both ends included; one voxel along z), minus the tumour.
        brightness_percentile, brightness_range: the rim's target intensity is the image's percentile
            (CSF is the brightest tissue on hrT2) times a uniform factor in this range.
        coverage_range: a smooth random field keeps a share of the rim uniform in this range, so the rim is
            patchy (tumour against brainstem or nerve has no CSF) rather than a tell-tale full ring.
        sigma_voxels: Gaussian softening of the rim's edges (z, y, x).

    Only brightens (a rim voxel never gets darker); the tumour itself and voxels beyond the rim keep their
    values. An unchanged copy when there is no tumour.
    """
    image = np.asarray(image_zyx, dtype=np.float32)
    labels = np.asarray(labels_zyx)
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape} differ in shape")
    mask = labels == label
    if not mask.any():
        return image.copy()
    width = int(rng.integers(width_voxels[0], width_voxels[1] + 1))
    in_plane, along_z = np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool)
    in_plane[1] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    along_z[:, 1, 1] = True
    rim = binary_dilation(binary_dilation(mask, in_plane, iterations=width), along_z) & ~mask
    if not rim.any():  # the tumour fills the volume
        return image.copy()
    field = gaussian_filter(rng.standard_normal(image.shape).astype(np.float32), texture_sigma_voxels)
    rim &= field >= np.quantile(field[rim], 1.0 - rng.uniform(*coverage_range))
    weight = gaussian_filter(rim.astype(np.float32), sigma_voxels) * ~mask
    bright = np.float32(np.percentile(image, brightness_percentile) * rng.uniform(*brightness_range))
    return image + weight * np.maximum(bright - image, 0.0)


def _box_around(mask: np.ndarray, sigma_voxels, extra_voxels=0) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by ``extra_voxels`` plus the reach of a Gaussian blur of ``sigma_voxels``
    (scipy truncates at 4 σ): an edit blended through the blurred mask changes nothing outside it, so the blur can
    run on the box alone (crops are ~700k voxels, a tumour's box a few thousand)."""
    sigma = np.broadcast_to(np.asarray(sigma_voxels, np.float32), (mask.ndim,))
    margin = np.ceil(4 * sigma).astype(int) + 1 + np.asarray(extra_voxels, int)
    idx = np.argwhere(mask)
    lo, hi = np.maximum(idx.min(0) - margin, 0), np.minimum(idx.max(0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _quantiles(sorted_values: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """``np.quantile(sorted_values, probabilities)`` (linear) by interpolation on already sorted values: with one
    probability per voxel, ``np.quantile`` is ~100× slower."""
    return np.interp(probabilities * (sorted_values.size - 1), np.arange(sorted_values.size), sorted_values)


def _image_mask_reference(image_zyx, labels_zyx, reference_values, label: int, what: str):
    """The shared checks of the matching functions: (float32 image, boolean ``label`` mask, sorted float32 reference;
    an already sorted ``reference_values`` is not sorted again)."""
    image = np.asarray(image_zyx, dtype=np.float32)
    labels = np.asarray(labels_zyx)
    if labels.shape != image.shape:
        raise ValueError(f"labels {labels.shape} and image {image.shape} differ in shape")
    reference = np.asarray(reference_values, dtype=np.float32).ravel()
    if np.any(reference[1:] < reference[:-1]):  # callers that reuse a reference sort it once (a crop: ~700k values)
        reference = np.sort(reference)
    if reference.size == 0:
        raise ValueError(f"no reference {what} voxels to match the fake {what} to")
    return image, labels == label, reference


def match_tumour_intensity(image_zyx: np.ndarray, labels_zyx: np.ndarray, reference_values: np.ndarray,
                           rng: np.random.Generator, scale_range=(1.0, 1.0), sigma_voxels=(0.5, 1.0, 1.0),
                           label: int = VS) -> np.ndarray:
    """Give the ``label`` region of a fake crop the intensity distribution of a real tumour.

    Self-training knows, from the pseudo-labels, how tumours look on the *real* hrT2 (``reference_values``: the
    engine-normalised voxel values of one pseudo-labelled tumour), which a translator trained for a few hundred
    iterations does not render (it draws the enhancing ceT1 tumour as dark as a flow void). Each tumour voxel's
    rank within its own region is mapped to that quantile of ``reference_values`` (so the fake's texture pattern
    stays and the grey levels become the real tumour's), times one random factor uniform in ``scale_range``. The
    region is replaced in full; just outside it the image is blended towards the new tumour median through the
    Gaussian-smoothed mask (``sigma_voxels``, scalar or (z, y, x); weight ≤ ½ there): a partial-volume edge
    rather than a hard step a network could key on. Arrays (z, y, x); returns a new float32 image (an unchanged
    copy when there is no tumour).
    """
    image, mask, reference = _image_mask_reference(image_zyx, labels_zyx, reference_values, label, "tumour")
    if not mask.any():
        return image.copy()
    values = image[mask]
    ranks = (np.argsort(np.argsort(values, kind="stable"), kind="stable") + 0.5) / values.size
    new_values = _quantiles(reference, ranks).astype(np.float32) * np.float32(rng.uniform(*scale_range))
    box = _box_around(mask, sigma_voxels)
    weight = gaussian_filter(mask[box].astype(np.float32), sigma_voxels)
    out = image.copy()
    out[box] += weight * (np.float32(np.median(new_values)) - image[box])
    out[mask] = new_values
    return out


def tumour_ring(mask_zyx: np.ndarray, width_voxels: int) -> np.ndarray:
    """The in-plane ring around a boolean tumour mask (z, y, x): the mask dilated by a (2w+1)² square in each
    slice, minus the mask — what surrounds the tumour on the axial slice (CSF, canal wall, brain)."""
    structure = np.zeros((1, 2 * width_voxels + 1, 2 * width_voxels + 1), bool)
    structure[0] = True
    return binary_dilation(mask_zyx, structure) & ~mask_zyx


def match_ring_intensity(image_zyx: np.ndarray, labels_zyx: np.ndarray, ring_reference: np.ndarray,
                         width_voxels: int = 4, sigma_voxels=(0.5, 1.0, 1.0), label: int = VS) -> np.ndarray:
    """Give the surroundings of the ``label`` region of a fake crop the intensity distribution of a real tumour's
    surroundings (``ring_reference``: the values of :func:`tumour_ring` around a pseudo-labelled real tumour).

    On real hrT2 a tumour sits in bright CSF; a translator renders much of that CSF grey. One monotone curve maps
    the fake ring's values to the real ring's (the fake ring's k-th quantile → the real ring's k-th), so the order
    of the tissues stays (canal wall darkest, fluid brightest) and their grey levels become the real ones; the curve
    is applied through the Gaussian-smoothed ring (weight 1 on it, fading out over ``sigma_voxels`` beyond), and not
    inside the tumour itself. Arrays (z, y, x); returns a new float32 image (a copy when there is no tumour).
    """
    image, mask, reference = _image_mask_reference(image_zyx, labels_zyx, ring_reference, label, "ring")
    if not mask.any():
        return image.copy()
    box = _box_around(mask, sigma_voxels, (0, width_voxels, width_voxels))
    inside, sub = mask[box], image[box]
    ring = tumour_ring(inside, width_voxels)
    fake, real = _rank_curve(sub[ring], reference)
    weight = np.maximum(gaussian_filter(ring.astype(np.float32), sigma_voxels), ring) * ~inside
    out = image.copy()
    out[box] += weight * (np.interp(sub, fake, real).astype(np.float32) - sub)
    return out


def match_context_intensity(image_zyx: np.ndarray, labels_zyx: np.ndarray, context_reference: np.ndarray,
                            label: int = VS) -> np.ndarray:
    """Give everything of a fake crop but its ``label`` region the intensity distribution of a real crop's
    (``context_reference``: the values of a real hrT2 crop outside its pseudo-labelled tumour).

    A translator trained for a few hundred iterations gets the grey levels of the whole crop wrong, not only the
    tumour's: on the phantom benchmark the fakes' median is 0.49 against 0.26 on real hrT2 crops (brain rendered
    brighter than a real tumour, CSF at 0.73 instead of 0.88 at the 90th percentile). One monotone curve maps the
    fake's k-th quantile outside the tumour to the real crop's k-th (histogram matching), so the order of the
    tissues and every edge stay and their grey levels become the real ones; the tumour keeps its values (match it
    with :func:`match_tumour_intensity` afterwards, to the same real crop's tumour, so the two contrasts agree).
    Arrays (z, y, x); returns a new float32 image.
    """
    image, mask, reference = _image_mask_reference(image_zyx, labels_zyx, context_reference, label, "context")
    outside = ~mask
    out = image.copy()
    if outside.any():
        values = image[outside]
        fake, real = _rank_curve(values, reference)
        out[outside] = np.interp(values, fake, real)
    return out


def _rank_curve(values: np.ndarray, sorted_reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The monotone curve that maps the distribution of ``values`` onto that of ``sorted_reference``:
    (the distinct values, ascending; the reference quantile at each one's mid-rank). Tied values — translated
    crops are float16, with thousands of voxels per value — map to one value, so the curve adds no noise."""
    fake, counts = np.unique(np.asarray(values, np.float32), return_counts=True)
    mid_ranks = (np.cumsum(counts) - 0.5 * counts) / counts.sum()
    return fake, _quantiles(sorted_reference, mid_ranks).astype(np.float32)
