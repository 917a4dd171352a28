"""Properties that must hold for every geometry and label map, checked with hypothesis.

- Resampling: labels sent onto a finer grid and back (the engine's way, class maps + arg-max) are unchanged.
- Storage order: the same physical voxels stored with permuted/flipped axes (and the matching direction
  matrix) resample, post-process and segment to the same physical labels.
- Post-processing: labels stay in {0, 1, 2}, voxels are only removed, at most one VS and one cochlea
  component per side remain, and a second pass changes nothing.

Examples are few and derandomised so the default suite is fast and stable; set
VSCOCHLEASEG_PROPERTY_EXAMPLES to search longer.
"""

from __future__ import annotations

import os

import cc3d
import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from VSCochleaSegLib.geometry import GridSpec, array_to_image, resample_channels_to_reference, resample_to_grid
from VSCochleaSegLib.labels import COCHLEA, VS
from VSCochleaSegLib.localise import EarLocations
from VSCochleaSegLib.measure import index_to_lps, lateral_offset_mm
from VSCochleaSegLib.model_folder import PostprocessSpec
from VSCochleaSegLib.postprocess import postprocess_labels

EXAMPLES = int(os.environ.get("VSCOCHLEASEG_PROPERTY_EXAMPLES", "25"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# ------------------------------------------------------------------------------------- strategies

def rotation(angles) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


# Rounded to 1e-6 rad like the cosines real headers store: ITK cannot invert direction matrices with
# entries near 1e-297 (vnl SVD underflows; found by this file), which no scanner writes.
angles = st.tuples(*[st.floats(-0.6, 0.6).map(lambda a: round(a, 6))] * 3)
spacings = st.tuples(*[st.sampled_from([0.4, 0.5, 0.75, 1.0, 1.5, 2.0])] * 3)
origins = st.tuples(*[st.floats(-100, 100)] * 3)
label_arrays = arrays(np.uint8, st.tuples(*[st.integers(3, 7)] * 3), elements=st.integers(0, 2))
storage = st.tuples(st.permutations([0, 1, 2]), st.tuples(*[st.booleans()] * 3))


def labels_image(labels_zyx: np.ndarray, origin, spacing, direction: np.ndarray) -> sitk.Image:
    return array_to_image(labels_zyx, GridSpec(tuple(origin), tuple(spacing), labels_zyx.shape[::-1],
                                               tuple(direction.ravel())))


def restore(image: sitk.Image, perm, flips) -> sitk.Image:
    """The same physical voxels stored differently: new index axis a is old axis ``perm[a]`` (i, j, k
    order), reversed where ``flips[a]``; spacing, direction and origin follow, so every voxel keeps its
    LPS position."""
    size = np.asarray(image.GetSize())
    spacing = np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    xyz = sitk.GetArrayFromImage(image).transpose(2, 1, 0).transpose(perm)
    for a, flip in enumerate(flips):
        if flip:
            xyz = np.flip(xyz, a)
    first_voxel = [int(size[perm[a]] - 1) if flips[a] else 0 for a in range(3)]
    old_index = [0, 0, 0]
    for a in range(3):
        old_index[perm[a]] = first_voxel[a]
    out = sitk.GetImageFromArray(np.ascontiguousarray(xyz.transpose(2, 1, 0)))
    out.SetSpacing([float(spacing[p]) for p in perm])
    new_direction = np.stack([direction[:, perm[a]] * (-1.0 if flips[a] else 1.0) for a in range(3)], axis=1)
    out.SetDirection(new_direction.ravel().tolist())
    out.SetOrigin(image.TransformIndexToPhysicalPoint(old_index))
    return out


def test_restore_keeps_every_voxel_at_its_physical_position():
    img = labels_image(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), (1, 2, 3), (0.5, 1.0, 2.0),
                       rotation((0.1, 0.2, 0.3)))
    out = restore(img, (2, 0, 1), (True, False, True))
    for idx in np.ndindex(*out.GetSize()):
        old = img.TransformPhysicalPointToIndex(out.TransformIndexToPhysicalPoint(idx))
        assert img[old] == out[idx]


# -------------------------------------------------------------------------------------- resampling

@PROPERTY
@given(labels=label_arrays, spacing=spacings, origin=origins, angle=angles, factor=st.sampled_from([2, 3]))
def test_labels_sent_onto_a_finer_grid_and_back_are_unchanged(labels, spacing, origin, angle, factor):
    """The engine's path back from a network grid: per-class maps, linear resampling, arg-max."""
    direction = rotation(angle)
    coarse = labels_image(labels, origin, spacing, direction)
    fine = GridSpec(tuple(origin), tuple(s / factor for s in spacing),
                    tuple((n - 1) * factor + 1 for n in labels.shape[::-1]), tuple(direction.ravel()))
    onehot = np.stack([(labels == c).astype(np.float32) for c in range(3)])
    on_fine = np.stack([resample_to_grid(array_to_image(ch, GridSpec.of_image(coarse)), fine) for ch in onehot])
    sl, maps, coverage = resample_channels_to_reference(on_fine, fine, coarse)
    assert np.all(coverage > 0.999)
    assert np.array_equal(maps.argmax(0), labels[sl])


@PROPERTY
@given(labels=label_arrays, spacing=spacings, origin=origins, angle=angles, order=storage)
def test_resampling_onto_a_restored_copy_of_the_grid_reproduces_it(labels, spacing, origin, angle, order):
    image = labels_image(labels, origin, spacing, rotation(angle))
    restored = restore(image, *order)
    resampled = resample_to_grid(image, GridSpec.of_image(restored), interpolator=sitk.sitkNearestNeighbor)
    assert np.array_equal(resampled.astype(np.uint8), sitk.GetArrayViewFromImage(restored))


# --------------------------------------------------------------------------------- post-processing

@st.composite
def blob_labels(draw, size=14):
    """Label maps made of a few boxes of VS and cochlea (realistic components, unlike voxel noise)."""
    labels = np.zeros((size,) * 3, np.uint8)
    for _ in range(draw(st.integers(1, 6))):
        lo = [draw(st.integers(0, size - 2)) for _ in range(3)]
        hi = [min(size, a + draw(st.integers(1, 5))) for a in lo]
        labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = draw(st.sampled_from([VS, COCHLEA]))
    return labels


@st.composite
def scenes(draw):
    """(labels, reference image, ears, post-processing spec) on a random oblique grid."""
    labels = draw(blob_labels())
    image = labels_image(labels, draw(origins), draw(spacings), rotation(draw(angles)))
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([6.5, 6.5, 6.5]))
    half_width = draw(st.floats(3.0, 8.0))
    left_axis = np.array([1.0, 0.0, 0.0])
    cochlea = {"left": centre + left_axis * half_width + [0, 0, draw(st.floats(-4, 4))],
               "right": centre - left_axis * half_width + [0, 0, draw(st.floats(-4, 4))]}
    ears = EarLocations(cochlea, (cochlea["left"] + cochlea["right"]) / 2, left_axis)
    spec = PostprocessSpec(keep_largest_vs_per_side=True, keep_largest_cochlea_per_side=True,
                           vs_max_z_distance_from_cochlea_mm=draw(st.sampled_from([3.0, 10.0, 100.0])),
                           min_vs_volume_mm3=draw(st.sampled_from([0.0, 2.0, 20.0])))
    return labels, image, ears, spec


def components_per_side(labels: np.ndarray, image: sitk.Image, ears, label: int) -> dict:
    comps = cc3d.connected_components(labels == label, connectivity=26)
    stats = cc3d.statistics(comps)
    counts = {"left": 0, "right": 0}
    if len(stats["voxel_counts"]) > 1:
        centres = index_to_lps(image, stats["centroids"][1:])
        for offset in lateral_offset_mm(centres, ears.midline_point_lps, ears.left_axis_lps):
            counts["left" if offset > 0 else "right"] += 1
    return counts


@PROPERTY
@given(scene=scenes())
def test_post_processing_keeps_labels_valid_only_removes_and_leaves_one_component_per_side(scene):
    labels, image, ears, spec = scene
    out = postprocess_labels(labels, image, ears, spec)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, VS, COCHLEA}
    assert np.all((out == 0) | (out == labels))
    for label in (VS, COCHLEA):
        assert max(components_per_side(out, image, ears, label).values()) <= 1
    assert np.array_equal(postprocess_labels(out, image, ears, spec), out)


@PROPERTY
@given(scene=scenes(), order=storage)
def test_post_processing_does_not_depend_on_how_the_voxels_are_stored(scene, order):
    labels, image, ears, spec = scene
    for label in (VS, COCHLEA):  # equal-sized rivals on one side are a tie any order may break
        counts = cc3d.statistics(cc3d.connected_components(labels == label, connectivity=26))["voxel_counts"][1:]
        assume(len(set(counts.tolist())) == len(counts))
    restored = restore(image, *order)
    expected = restore(labels_image(postprocess_labels(labels, image, ears, spec), image.GetOrigin(),
                                    image.GetSpacing(), np.asarray(image.GetDirection()).reshape(3, 3)), *order)
    actual = postprocess_labels(sitk.GetArrayFromImage(restored), restored, ears, spec)
    assert np.array_equal(actual, sitk.GetArrayViewFromImage(expected))


# ------------------------------------------------------------------------------ the whole engine

@pytest.fixture(scope="module")
def engine(tiny_model):
    from VSCochleaSegLib.pipeline import Segmenter

    return Segmenter(tiny_model, device="cpu", threads=1)


@pytest.fixture(scope="module")
def ear_scan():
    from reliability_fixtures import small_scan

    return small_scan(seed=11)


@settings(max_examples=max(3, EXAMPLES // 8), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=storage)
def test_the_engine_segments_the_same_physical_voxels_whatever_the_storage_order(engine, ear_scan, order):
    """Random-weight networks make near-ties between classes common, so rounding in the last bit of a
    resampling weight may flip an odd voxel (6 of 40 000 for some orders of one phantom, none for
    another); the segmentation must agree on all but 0.1 % of voxels."""
    reference = engine.segment_image(ear_scan).labels
    restored = sitk.GetArrayFromImage(engine.segment_image(restore(ear_scan, *order)).labels)
    expected = sitk.GetArrayFromImage(restore(reference, *order))
    assert float(np.mean(restored == expected)) >= 0.999
