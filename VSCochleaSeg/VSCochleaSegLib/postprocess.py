"""Clean the fused label map on the input grid, per side of the head.

Following both CrossMoDA methods: for each side keep only the largest cochlea component and the largest
VS component, and drop VS components whose centre lies farther than a set distance (mm, along the
superior-inferior axis) from that side's cochlea — the seed rule was 15 slices. Optionally (anatomy: a VS
fills part of the internal auditory canal, which ends at the cochlea) VS components none of whose voxels comes
within a set 3D distance of that side's cochlea centre are dropped *before* the largest is chosen, so a large
false "VS" in the cerebellum cannot displace a smaller true one; a component of at least a set volume may lie
farther (a large tumour found without its canal part). Optionally, first of all, the VS mask is opened
with a ball (mm) so that a leak through a thin neck into the abutting cerebellum is cut off. Optionally, once the
components are chosen, each kept cochlea's edge is moved to the half-way grey between its fluid and the bone
around it (T2: bright fluid in dark bone), and each kept VS gives up the voxels on its edge that are brighter than
the half-way grey between the tumour and the CSF around it (T2: a VS is darker than CSF). Optionally, last of all,
each kept VS is grown by at most a set distance (mm) into connected voxels of its own intensity (members trained on
translated images draw the tumour's border too far inside it). Thresholds come from the model folder's ``postprocess`` section.
"""

from __future__ import annotations

import cc3d
import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .labels import COCHLEA, VS
from .measure import index_to_lps, lateral_offset_mm
from .model_folder import PostprocessSpec


def labels_from_probabilities(probs: np.ndarray, vs_min_probability: float = 0.0) -> np.ndarray:
    """Label map (z, y, x) uint8 from fused class probabilities ``probs`` (C, z, y, x) float, C = 3 (background,
    VS, cochlea): the arg-max (ties to the lower class), then, if ``vs_min_probability`` > 0, every background voxel
    whose VS probability reaches it becomes VS. Memory-lean for input-grid arrays: no transposed copy, no int64
    result; overwrites ``probs[0]`` with the running maximum (``probs[VS]`` is left as it was)."""
    labels = np.zeros(probs.shape[1:], np.uint8)
    best = probs[0]
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        labels[better] = c
        np.maximum(best, probs[c], out=best)
    if vs_min_probability > 0:
        labels[(labels == 0) & (probs[VS] >= vs_min_probability)] = VS
    return labels


def postprocess_labels(labels_zyx: np.ndarray, reference: sitk.Image, ears, spec: PostprocessSpec) -> np.ndarray:
    """Cleaned copy of ``labels_zyx`` (z, y, x) uint8; ``reference`` gives the geometry, ``ears`` the
    cochlea centres and midline (``localise.EarLocations``)."""
    out = labels_zyx.copy()
    if spec.vs_open_mm > 0:
        vs = out == VS
        out[vs & ~ndimage.binary_opening(vs, structure=ball(spec.vs_open_mm, reference.GetSpacing()[::-1]))] = 0
    voxel_mm3 = float(np.prod(reference.GetSpacing()))
    for label, keep_largest in ((VS, spec.keep_largest_vs_per_side), (COCHLEA, spec.keep_largest_cochlea_per_side)):
        mask = out == label  # each pass removes only voxels of its own label
        if not mask.any():
            continue
        comps = cc3d.connected_components(mask, connectivity=26)
        stats = cc3d.statistics(comps)
        ids = np.arange(1, len(stats["voxel_counts"]))
        counts = stats["voxel_counts"][1:]
        if len(ids) == 0:
            continue
        centroids_lps = index_to_lps(reference, stats["centroids"][1:])
        lateral = lateral_offset_mm(centroids_lps, ears.midline_point_lps, ears.left_axis_lps)
        sides = np.where(lateral > 0, "left", "right")
        keep = np.ones(len(ids), bool)
        if label == VS:
            volumes_mm3 = counts * voxel_mm3
            keep &= volumes_mm3 >= spec.min_vs_volume_mm3
            for k, side in enumerate(sides):
                dz = abs(centroids_lps[k][2] - ears.cochlea_lps[side][2])
                keep[k] &= dz <= spec.vs_max_z_distance_from_cochlea_mm
            if spec.vs_max_distance_from_cochlea_mm > 0:
                limit = np.full(len(ids), spec.vs_max_distance_from_cochlea_mm)
                if spec.vs_large_volume_mm3 > 0:
                    limit[volumes_mm3 >= spec.vs_large_volume_mm3] = spec.vs_large_max_distance_mm
                keep &= nearest_distance_mm(comps, ids, sides, reference, ears) <= limit
        if keep_largest:
            for side in ("left", "right"):
                candidates = np.nonzero(keep & (sides == side))[0]
                if len(candidates) > 1:
                    winner = candidates[np.argmax(counts[candidates])]
                    keep[candidates] = False
                    keep[winner] = True
        drop = ids[~keep]
        if len(drop):
            out[np.isin(comps, drop) & mask] = 0
    image, spacing_zyx = sitk.GetArrayViewFromImage(reference), reference.GetSpacing()[::-1]
    if spec.cochlea_refine_mm > 0:
        out = refine_cochlea_edges(out, image, spacing_zyx, spec.cochlea_refine_mm, spec.cochlea_fluid_quantile)
    if spec.vs_trim_mm > 0:
        out = trim_vs_edges(out, image, spacing_zyx, spec.vs_trim_mm, spec.vs_csf_quantile)
    if spec.vs_grow_mm > 0:  # an empty VS grows nothing
        out[grow_into_own_intensity(out == VS, image, spec.vs_grow_mm, spec.vs_grow_quantiles, spacing_zyx,
                                    allowed=out == 0)] = VS
    return out


def grow_into_own_intensity(mask: np.ndarray, image: np.ndarray, max_mm: float, quantiles, spacing_zyx_mm,
                            allowed: np.ndarray) -> np.ndarray:
    """Voxels (bool (z, y, x)) to add to ``mask`` (bool, same grid as ``image``): within ``max_mm`` (mm, Euclidean)
    of it, with an ``image`` intensity inside the ``quantiles`` (lo, hi) of the mask's own intensities, ``allowed``,
    and reachable from the mask through such voxels (6-connectivity). Empty when ``mask`` is."""
    added = np.zeros(mask.shape, bool)
    if not mask.any():
        return added
    lo, hi = np.quantile(image[mask], quantiles)
    # Work in the mask's bounding box widened by the distance (the rest cannot be reached): on a whole
    # 512 × 512 × 100 scan the distance transform alone would take seconds.
    pad = np.ceil(max_mm / np.asarray(spacing_zyx_mm, float)).astype(int) + 1
    idx = np.nonzero(mask)
    box = tuple(slice(max(int(i.min()) - p, 0), int(i.max()) + p + 1) for i, p in zip(idx, pad))
    m, img = mask[box], image[box]
    near = ndimage.distance_transform_edt(~m, sampling=spacing_zyx_mm) <= max_mm
    candidate = (img >= lo) & (img <= hi) & allowed[box] & near
    grown = ndimage.binary_propagation(m, structure=ndimage.generate_binary_structure(3, 1), mask=candidate | m)
    added[box] = grown & ~m
    return added


def _components_in_boxes(mask: np.ndarray, margin_mm: float, spacing_zyx_mm):
    """Yield (component mask, box) for each 26-connected component of ``mask`` (bool (z, y, x)): ``box`` (a tuple
    of slices) is its bounding box widened by ``margin_mm`` (mm) and one voxel, clipped to the array; the mask is
    the component alone, on the box."""
    comps = cc3d.connected_components(mask, connectivity=26)
    pad = np.ceil(margin_mm / np.asarray(spacing_zyx_mm, float)).astype(int) + 1
    for k, box in enumerate(ndimage.find_objects(comps), start=1):
        if box is not None:
            box = tuple(slice(max(b.start - p, 0), b.stop + p) for b, p in zip(box, pad))
            yield comps[box] == k, box


def refine_cochlea_edges(labels: np.ndarray, image: np.ndarray, spacing_zyx_mm, max_mm: float,
                         fluid_quantile: float = 0.9, bone_shell_mm: float = 1.0) -> np.ndarray:
    """Copy of ``labels`` (z, y, x) uint8 whose cochleae end where the image says the fluid ends.

    On T2 the cochlea is fluid, bright inside dark bone, and its edge is the half-way grey between the two. For
    each cochlea component (26-connected): fluid grey = the ``fluid_quantile`` of its own intensities (its voxels
    on the edge are partial-volume darker, the inner ones give the plateau), bone grey = the median of the shell
    from ``max_mm`` to ``max_mm + bone_shell_mm`` (mm) outside it (VS voxels left out); the new cochlea is the set
    of voxels within ``max_mm`` of the old one, background or cochlea, brighter than the half-way grey and connected
    (6-connectivity) to an old cochlea voxel that is. So it both grows into fluid and gives up bone. A component
    whose fluid is not brighter than its bone (not a T2 contrast) is left as it is. ``spacing_zyx_mm``: mm."""
    out = labels.copy()
    sp = np.asarray(spacing_zyx_mm, float)
    for old, box in _components_in_boxes(labels == COCHLEA, max_mm + bone_shell_mm, sp):
        img, lab = image[box], labels[box]
        d = ndimage.distance_transform_edt(~old, sampling=sp)
        shell = (d > max_mm) & (d <= max_mm + bone_shell_mm) & (lab != VS)
        if not shell.any():
            continue
        fluid, bone = float(np.quantile(img[old], fluid_quantile)), float(np.median(img[shell]))
        if fluid <= bone:
            continue
        candidate = (d <= max_mm) & (img > (fluid + bone) / 2) & ((lab == 0) | old)
        new = ndimage.binary_propagation(old & candidate, structure=ndimage.generate_binary_structure(3, 1),
                                         mask=candidate)
        view = out[box]
        view[old & ~new] = 0
        view[new] = COCHLEA
    return out


def vs_edge_in_csf(vs: np.ndarray, image: np.ndarray, spacing_zyx_mm, max_mm: float, csf_quantile: float = 0.9,
                   shell_mm: float = 1.0, shell_excluded: np.ndarray | None = None):
    """(half-way grey, edge) for one VS (bool mask (z, y, x) on ``image``'s grid): the half-way grey between the
    tumour and the CSF around it, and the VS voxels within ``max_mm`` (mm) of its edge brighter than that grey
    (bool, same shape); ``(None, nothing)`` when the surroundings are not brighter than the tumour (not a T2
    contrast, or no CSF there). Tumour grey = the median of the VS voxels deeper than ``max_mm`` from its edge
    (all of them when none is); CSF grey = the ``csf_quantile`` of the shell up to ``shell_mm`` (mm) outside it,
    ``shell_excluded`` voxels (e.g. the cochlea) left out."""
    sp = np.asarray(spacing_zyx_mm, float)
    nothing = np.zeros(vs.shape, bool)
    outside = ndimage.distance_transform_edt(~vs, sampling=sp)
    shell = (outside > 0) & (outside <= shell_mm)
    if shell_excluded is not None:
        shell &= ~shell_excluded
    if not shell.any() or not vs.any():
        return None, nothing
    inside = ndimage.distance_transform_edt(vs, sampling=sp)  # a VS voxel's distance to the nearest non-VS one
    core = vs & (inside > max_mm)
    tumour = float(np.median(image[core if core.any() else vs]))
    csf = float(np.quantile(image[shell], csf_quantile))
    if csf <= tumour:
        return None, nothing
    half_way = (tumour + csf) / 2
    return half_way, vs & (inside <= max_mm) & (image > half_way)


def trim_vs_edges(labels: np.ndarray, image: np.ndarray, spacing_zyx_mm, max_mm: float, csf_quantile: float = 0.9,
                  shell_mm: float = 1.0) -> np.ndarray:
    """Copy of ``labels`` (z, y, x) uint8 whose VS components end where the CSF around them begins.

    On T2 a VS is grey and the CSF of the cerebellopontine angle and the internal auditory canal bright; a VS
    border drawn into the CSF carries voxels brighter than the half-way grey between the two
    (:func:`vs_edge_in_csf`, cochlea voxels out of the CSF shell). For each VS component (26-connected), its
    voxels within ``max_mm`` (mm) of its edge that are brighter than that grey become background. A component
    whose surroundings are not brighter than it is left as it is. Nothing is added."""
    out = labels.copy()
    sp = np.asarray(spacing_zyx_mm, float)
    for vs, box in _components_in_boxes(labels == VS, max_mm + shell_mm, sp):
        _, edge = vs_edge_in_csf(vs, image[box], sp, max_mm, csf_quantile, shell_mm, labels[box] == COCHLEA)
        out[box][edge] = 0
    return out


def ball(radius_mm: float, spacing_zyx_mm) -> np.ndarray:
    """Structuring element (bool (z, y, x)): the voxel offsets within ``radius_mm`` (mm) of the centre on a grid
    of this spacing (mm, z y x order); a single voxel when the radius is below every spacing."""
    sp = np.asarray(spacing_zyx_mm, float)
    n = np.floor(radius_mm / sp).astype(int)
    grid = np.mgrid[tuple(slice(-k, k + 1) for k in n)] * sp[:, None, None, None]
    return (grid**2).sum(0) <= radius_mm**2 + 1e-9


def nearest_distance_mm(comps: np.ndarray, ids: np.ndarray, sides: np.ndarray, reference: sitk.Image, ears) -> np.ndarray:
    """For each component ``ids[k]`` of ``comps`` (z, y, x), the distance (mm, LPS) from its nearest voxel centre
    to the cochlea centre of its side ``sides[k]``."""
    voxels = np.argwhere(comps > 0)
    k = np.zeros(int(comps.max()) + 1, int)
    k[ids] = np.arange(len(ids))
    k = k[comps[tuple(voxels.T)]]  # each voxel's position in ``ids``
    cochleae = np.array([ears.cochlea_lps[side] for side in sides], float)
    d = np.linalg.norm(index_to_lps(reference, voxels) - cochleae[k], axis=1)
    out = np.full(len(ids), np.inf)
    np.minimum.at(out, k, d)
    return out
