"""The domain-adaptation training pipeline (issue 4, part B): cleanlab fusion, pseudo-labels, Mean Teacher,
DDP, the staged pipeline end to end on tiny phantoms (with a fake translator), resume, and the benchmark.

The translator is replaced by a fake that inverts intensities (``1.2 - volume``): what these tests check is
the orchestration — every stage runs, resumes, refuses mixed configs and exports a model folder the engine
loads — not the translation (``test_translation*.py``) or the accuracy (``training.benchmark``).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from VSCochleaSegLib.fusion import find_label_issues_confident_learning, fuse_cleanlab
from VSCochleaSegLib.localise import EarLocations

TINY_NET3 = {"dims": 3, "in_channels": 1, "out_channels": 3, "filters": [4, 8, 8],
             "kernel_size": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]}
TINY_NET2 = {"dims": 2, "in_channels": 1, "out_channels": 3, "filters": [4, 8, 8],
             "kernel_size": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]]}
SMALL_ACQUISITION = {"size_xy": 128, "spacing_xy_mm": 1.4, "spacing_z_mm": 2.0, "n_slices": 30}


def tiny_config() -> dict:
    """phantom-cpu shrunk to a few iterations of tiny networks on 1×1×2 mm crops."""
    from training.pipeline import load_config

    cfg = load_config("phantom-cpu")
    tiny_train = {"iterations": 2, "batch_size": 2, "checkpoint_every": 1, "optimizer": "adamw", "learning_rate": 0.001}
    cfg.update({
        "workers": 1, "threads": 1,
        "crop": {"size_xyz_mm": [24.0, 24.0, 16.0], "medial_offset_mm": 4.0, "mirror_right": True},
        "segmentation_spacing_xyz_mm": [1.0, 1.0, 2.0],
        "data": {"jitters": 1, "jitter_mm": 1.0, "folds": 2, "select_folds": 1},
        "localiser": {"spacing_xyz_mm": [4.0, 4.0, 4.0],
                      "train": {"network": TINY_NET3, "patch_size_zyx": [16, 32, 32], **tiny_train, "seed": 1}},
        "members": [
            {"name": "seg3d", "train": {"network": TINY_NET3, "patch_size_zyx": [8, 24, 24], **tiny_train, "seed": 2}},
            {"name": "seg2d", "train": {"network": TINY_NET2, "patch_size_zyx": [24, 24], **tiny_train, "seed": 3}},
        ],
        "pseudo_labels": {"min_voxel_confidence": 0.0, "min_case_confidence": 0.0, "keep_fraction": 1.0},
    })
    cfg["self_training"]["train"] = {"iterations": 2}
    # The 2 mm translator path (crossmoda.json; phantom-cpu skips it) stays exercised; the backend is a fake anyway.
    cfg["translation"]["localiser"] = dict(cfg["translation"]["crops"], image_size=[32, 32])
    cfg["translation"]["tumour_augmentation"].update({"csf_rim_probability": 1.0, "relative_to_tissue": True})
    cfg["variants"]["method_b"]["members"] = cfg["members"]
    cfg["variants"]["method_b"]["self_training"]["train"] = {"iterations": 2}
    cfg["variants"]["method_b"]["self_training"]["mean_teacher"]["rampup_iterations"] = 1
    return cfg


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run fastest on one thread (and a busy machine makes two threads 100× slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class InvertingTranslator:
    snapshots = [1, 2]

    def translate_volume(self, volume_zyx, snapshot=None, vs_mask=None):
        gain = 1.0 if snapshot in (None, 2) else 0.9
        return np.clip(gain * (1.2 - np.asarray(volume_zyx, np.float32)), 0, 1.5)


class FakeBackend:
    """Counts trainings; ``fail`` makes any training an error (for "finished stages are not redone")."""

    def __init__(self, fail: bool = False):
        self.trained, self.fail = [], fail

    def train(self, source_images, source_labels, target_images, cfg, out_dir, progress=True):
        assert self.fail is False, "a finished translation stage was trained again"
        assert len(source_images) == len(source_labels) and target_images
        self.trained.append(cfg["model"])
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        return InvertingTranslator()


def _ears_at_fixed_offsets(image, net, spec, scale, device, *args, **kwargs):
    """Stand-in for the localiser (a 2-iteration network finds nothing): ears 30 mm either side of the
    image centre. The stage's use of the ears is what is tested, not the localiser's accuracy."""
    size = np.array(image.GetSize())
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(((size - 1) / 2).tolist()))
    left, right = centre + [30.0, 0, 0], centre - [30.0, 0, 0]
    return EarLocations({"left": left, "right": right}, centre, np.array([1.0, 0, 0]))


@pytest.fixture(scope="module")
def uda_data(tmp_path_factory):
    """2 labelled ceT1 + 2 unlabelled hrT2 tiny phantoms in CrossMoDA layout (different subjects)."""
    from VSCochleaSegLib.phantoms import make_case, write_case

    d = tmp_path_factory.mktemp("uda_data")
    for i in range(2):
        write_case(make_case(77001, i, ("ceT1",), "ceT1", f"src_{i}", acquisition=SMALL_ACQUISITION), d)
        case = make_case(77002, i, ("hrT2",), "hrT2", f"tgt_{i}", acquisition=SMALL_ACQUISITION)
        write_case(case, d)
        (d / f"tgt_{i}_Label.nii.gz").unlink()
    return d


@pytest.fixture(scope="module")
def method_a_run(uda_data, tmp_path_factory):
    from training import pipeline

    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "localise_ears", _ears_at_fixed_offsets)
    out = tmp_path_factory.mktemp("run_a")
    backend = FakeBackend()
    model = pipeline.run_pipeline(uda_data, out, tiny_config(), backend=backend, progress=False)
    yield out, model, backend
    mp.undo()


# ------------------------------------------------------------------------------------------ fusion

def test_confident_learning_flags_voxels_another_model_confidently_assigns_elsewhere():
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.3, 0.7], [0.1, 0.9]])
    # thresholds: class 0 = mean(0.9, 0.8, 0.2) = 0.633; class 1 = mean(0.7, 0.9) = 0.8
    assert find_label_issues_confident_learning(labels, probs).tolist() == [False, False, True, False, False]


def test_confident_learning_never_moves_voxels_into_a_class_nobody_labelled():
    labels = np.array([0, 0, 0])
    probs = np.array([[0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.9, 0.1, 0.0]])
    assert not find_label_issues_confident_learning(labels, probs).any()


def test_cleanlab_fusion_flips_flagged_voxels_to_the_next_members_argmax():
    first = np.zeros((2, 1, 1, 5), np.float32)
    first[0] = 1.0  # member 0 says background everywhere but the last voxel
    first[:, 0, 0, 4] = [0.0, 1.0]
    # member 1's thresholds: background mean(0.9, 0.8, 0.2, 0.3) = 0.55, VS 0.7 (the one voxel member 0 calls VS)
    second = np.array([[0.9, 0.8, 0.2, 0.3, 0.3], [0.1, 0.2, 0.8, 0.7, 0.7]], np.float32).reshape(2, 1, 1, 5)
    fused = fuse_cleanlab([first, second], use_cleanlab=False)
    assert fused.shape == first.shape
    assert fused.argmax(0).ravel().tolist() == [0, 0, 1, 1, 1]
    assert set(np.unique(fused)) == {0.0, 1.0}


def test_cleanlab_fusion_of_agreeing_members_is_their_common_argmax():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], size=(4, 5, 6)).transpose(3, 0, 1, 2).astype(np.float32)
    assert np.array_equal(fuse_cleanlab([p, p, p]).argmax(0), p.argmax(0))


def test_cleanlab_fusion_uses_cleanlab_when_installed_with_the_same_result():
    pytest.importorskip("cleanlab")
    rng = np.random.default_rng(1)
    a = rng.dirichlet([1, 1, 1], size=(3, 8, 8)).transpose(3, 0, 1, 2).astype(np.float32)
    b = rng.dirichlet([1, 1, 1], size=(3, 8, 8)).transpose(3, 0, 1, 2).astype(np.float32)
    assert np.array_equal(fuse_cleanlab([a, b]), fuse_cleanlab([a, b], use_cleanlab=False))


def test_segmenter_fuses_with_cleanlab_when_the_model_folder_says_so(tmp_path, hrt2_phantom, monkeypatch):
    from conftest import tiny_model_spec_dict, write_tiny_model  # noqa: F401
    from VSCochleaSegLib import fusion, pipeline
    from VSCochleaSegLib.model_folder import ModelSpec, load_model_folder, write_model_folder

    folder = write_tiny_model(tmp_path / "mean")
    spec = folder.spec.to_dict()
    spec["segmentation"]["fusion"] = "cleanlab"
    states = {k: folder.load_weights(k) for k in folder.spec.weight_entries()}
    write_model_folder(tmp_path / "cleanlab", ModelSpec.from_dict(spec), states)
    calls = []
    monkeypatch.setitem(fusion.FUSERS, "cleanlab", lambda p, w: calls.append(len(p)) or fusion.fuse_cleanlab(p, w))
    img = hrt2_phantom.images["hrT2"]
    size = np.array(img.GetSize())
    lo = (size * np.array([0.15, 0.15, 0.0])).astype(int)
    small = sitk.RegionOfInterest(img, [int(v) for v in size - 2 * lo], [int(v) for v in lo])
    result = pipeline.Segmenter(load_model_folder(tmp_path / "cleanlab"), device="cpu").segment_image(small)
    assert calls == [2, 2]  # both ears, two members each
    assert set(np.unique(sitk.GetArrayViewFromImage(result.labels))) <= {0, 1, 2}


# ------------------------------------------------------------------------------------------ pseudo-labels

def test_pseudo_label_drops_unconfident_voxels_and_stray_components():
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label

    probs = np.zeros((3, 4, 10, 10), np.float32)
    probs[0] = 1.0
    probs[:, 1:3, 2:6, 2:6] = np.array([0.05, 0.95, 0.0])[:, None, None, None]  # VS block, 32 voxels
    probs[:, 1, 8, 8] = [0.1, 0.9, 0.0]  # a stray VS voxel
    probs[:, 0, 0, 0] = [0.45, 0.0, 0.55]  # an unconfident cochlea voxel
    labels, conf = pseudo_label(probs, PseudoLabelConfig(min_voxel_confidence=0.6, min_vs_voxels=10))
    assert (labels == 1).sum() == 32 and labels[1, 8, 8] == 0 and labels[0, 0, 0] == 0
    assert conf == pytest.approx(0.95)


def test_pseudo_label_without_a_cochlea_is_a_failed_prediction():
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label

    probs = np.zeros((3, 4, 10, 10), np.float32)
    probs[0] = 1.0
    probs[:, 1:3, 2:6, 2:6] = np.array([0.05, 0.95, 0.0])[:, None, None, None]  # a confident VS, no cochlea
    assert pseudo_label(probs, PseudoLabelConfig(min_cochlea_voxels=0))[1] == pytest.approx(0.95)
    assert pseudo_label(probs, PseudoLabelConfig(min_cochlea_voxels=5))[1] == 0.0
    probs[:, 0, 7:9, 7:9] = np.array([0.1, 0.0, 0.9])[:, None, None]  # 4 cochlea voxels
    assert pseudo_label(probs, PseudoLabelConfig(min_cochlea_voxels=5))[1] == 0.0
    assert pseudo_label(probs, PseudoLabelConfig(min_cochlea_voxels=4))[1] > 0.9


def test_pseudo_label_drops_vs_components_far_from_the_cochlea():
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label

    probs = np.zeros((3, 4, 24, 24), np.float32)
    probs[0] = 1.0
    probs[:, 1:3, 10:13, 20:23] = np.array([0.1, 0.0, 0.9])[:, None, None, None]  # cochlea, lateral (x 20-22)
    probs[:, :, 2:12, 0:6] = np.array([0.1, 0.9, 0.0])[:, None, None, None]  # large "VS", far medial (x 0-5)
    probs[:, 1:3, 10:13, 14:17] = np.array([0.1, 0.9, 0.0])[:, None, None, None]  # small VS, 3 voxels from it
    plain, _ = pseudo_label(probs, PseudoLabelConfig(min_vs_voxels=1))
    assert plain[:, :, 0].any() and not plain[1, 11, 15]  # the largest component wins
    # 0.5 mm voxels in-plane: the small VS is 2 mm from the cochlea, the large one 7.5 mm.
    cfg = PseudoLabelConfig(min_vs_voxels=1, vs_max_distance_to_cochlea_mm=4.0, spacing_zyx_mm=(1.0, 0.5, 0.5))
    checked, _ = pseudo_label(probs, cfg)
    assert (checked == 1).sum() == 2 * 3 * 3 and checked[1, 11, 15] == 1 and (checked == 2).sum() == 2 * 3 * 3
    far, _ = pseudo_label(probs, PseudoLabelConfig(min_vs_voxels=1, vs_max_distance_to_cochlea_mm=8.0,
                                                   spacing_zyx_mm=(1.0, 0.5, 0.5)))
    assert far[:, :, 0].any()  # both pass at 8 mm: the largest is kept again
    probs[2] = 0.0
    probs[0] = 1.0 - probs[1]
    no_cochlea, _ = pseudo_label(probs, cfg)
    assert not (no_cochlea == 1).any()  # no cochlea, no anchor: no VS either


def test_pseudo_label_can_ignore_unsure_voxels_and_removed_components_instead_of_calling_them_background():
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label
    from training.segmentation import IGNORE

    probs = np.zeros((3, 4, 10, 10), np.float32)
    probs[0] = 1.0
    probs[:, 1:3, 2:6, 2:6] = np.array([0.05, 0.95, 0.0])[:, None, None, None]  # VS block, 32 voxels
    probs[:, 1, 8, 8] = [0.1, 0.9, 0.0]  # a stray VS voxel (removed: not the largest)
    probs[:, 0, 0, 0] = [0.45, 0.0, 0.55]  # an unsure cochlea voxel
    probs[:, 3, 9, 9] = [0.5, 0.3, 0.2]  # unsure background
    labels, conf = pseudo_label(probs, PseudoLabelConfig(min_voxel_confidence=0.6, min_vs_voxels=10,
                                                         ignore_uncertain=True))
    assert (labels == 1).sum() == 32 and conf == pytest.approx(0.95)
    assert labels[1, 8, 8] == IGNORE and labels[0, 0, 0] == IGNORE and labels[3, 9, 9] == IGNORE
    assert (labels == IGNORE).sum() == 3 and (labels == 0).sum() == 4 * 10 * 10 - 32 - 3


def test_pseudo_label_teaches_confident_vs_far_from_the_cochlea_as_background_hard_negatives():
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label
    from training.segmentation import IGNORE

    probs = np.zeros((3, 4, 24, 24), np.float32)
    probs[0] = 1.0
    probs[:, 1:3, 10:13, 20:23] = np.array([0.1, 0.0, 0.9])[:, None, None, None]  # cochlea, lateral (x 20-22)
    probs[:, :, 2:12, 0:6] = np.array([0.1, 0.9, 0.0])[:, None, None, None]  # large "VS", 7.5 mm medial
    probs[:, 1:3, 10:13, 14:17] = np.array([0.1, 0.9, 0.0])[:, None, None, None]  # small VS, 2 mm from it
    base = dict(min_vs_voxels=1, vs_max_distance_to_cochlea_mm=4.0, spacing_zyx_mm=(1.0, 0.5, 0.5),
                ignore_uncertain=True, no_vs_label_beyond_cochlea_mm=3.0)
    far_vs = np.zeros(probs.shape[1:], bool)
    far_vs[:, 2:12, 0:6] = True
    plain, _ = pseudo_label(probs, PseudoLabelConfig(**base))
    assert (plain[far_vs] == IGNORE).all()  # removed component: no loss
    hard, conf = pseudo_label(probs, PseudoLabelConfig(**base, hard_negative_beyond_cochlea_mm=6.0))
    assert (hard[far_vs] == 0).all() and (hard == 1).sum() == 2 * 3 * 3 and hard[1, 11, 15] == 1
    assert conf == pytest.approx(0.9)
    # Beyond 8 mm the large component is not far enough to be a hard negative: it stays IGNORE.
    assert (pseudo_label(probs, PseudoLabelConfig(**base, hard_negative_beyond_cochlea_mm=8.0))[0][far_vs]
            == IGNORE).all()
    # No VS near the cochlea: far voxels are IGNORE (a missed tumour may lie there), the false "VS" background.
    probs[:, 1:3, 10:13, 14:17] = np.array([1.0, 0.0, 0.0])[:, None, None, None]
    alone, _ = pseudo_label(probs, PseudoLabelConfig(**base, hard_negative_beyond_cochlea_mm=6.0))
    assert not (alone == 1).any() and (alone[far_vs] == 0).all() and (alone[~far_vs] == IGNORE).sum() > 100
    # Without a cochlea there is no anchor, so nothing is called a hard negative.
    probs[2] = 0.0
    probs[0] = 1.0 - probs[1]
    assert not (pseudo_label(probs, PseudoLabelConfig(**base, hard_negative_beyond_cochlea_mm=6.0))[0][far_vs]
                == 0).any()


def test_pseudo_label_can_leave_the_corridor_between_a_far_vs_and_the_cochlea_unlabelled():
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label
    from training.segmentation import IGNORE

    probs = np.zeros((3, 4, 24, 40), np.float32)
    probs[0] = 1.0
    probs[:, 1:3, 10:13, 36:39] = np.array([0.1, 0.0, 0.9])[:, None, None, None]  # cochlea, lateral (x 36-38)
    probs[:, :, 6:16, 2:12] = np.array([0.1, 0.9, 0.0])[:, None, None, None]  # cisternal VS, x 2-11: 12.5 mm away
    base = dict(min_vs_voxels=1, vs_max_distance_to_cochlea_mm=15.0, spacing_zyx_mm=(1.0, 0.5, 0.5))
    plain, _ = pseudo_label(probs, PseudoLabelConfig(**base))
    assert (plain == 1).sum() == 4 * 10 * 10 and not (plain == IGNORE).any()
    labels, conf = pseudo_label(probs, PseudoLabelConfig(**base, vs_gap_ignore_beyond_mm=7.0, vs_gap_ignore_width_mm=2.0))
    assert (labels == 1).sum() == 4 * 10 * 10 and (labels == 2).sum() == 2 * 3 * 3 and conf == pytest.approx(0.9)
    corridor = labels == IGNORE
    assert corridor[1, 11, 12:36].all()  # the straight line from the VS to the cochlea: the missed canal part
    assert not corridor[:, 0].any() and not corridor[:, 23].any()  # 5 mm and more beside the line
    assert not corridor[:, :, :2].any()  # nothing on the far (medial) side of the VS
    wider, _ = pseudo_label(probs, PseudoLabelConfig(**base, vs_gap_ignore_beyond_mm=7.0, vs_gap_ignore_width_mm=6.0))
    assert (wider == IGNORE).sum() > corridor.sum()
    # A VS that reaches the canal fundus (nearest voxel within the threshold) leaves everything labelled.
    assert not (pseudo_label(probs, PseudoLabelConfig(**base, vs_gap_ignore_beyond_mm=13.0))[0] == IGNORE).any()


def test_pseudo_label_can_leave_a_margin_around_the_vs_unlabelled():
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label
    from training.segmentation import IGNORE

    probs = np.zeros((3, 3, 20, 20), np.float32)
    probs[0] = 1.0
    probs[:, :, 8:12, 8:12] = np.array([0.05, 0.95, 0.0])[:, None, None, None]  # VS block
    probs[:, 1, 1:3, 1:3] = np.array([0.05, 0.0, 0.95])[:, None, None]  # cochlea, 6 voxels from it
    cfg = dict(min_vs_voxels=1, spacing_zyx_mm=(1.0, 0.5, 0.5))
    plain, _ = pseudo_label(probs, PseudoLabelConfig(**cfg))
    assert not (plain == IGNORE).any()
    labels, _ = pseudo_label(probs, PseudoLabelConfig(**cfg, vs_ignore_margin_mm=1.0))
    assert (labels == 1).sum() == (plain == 1).sum() and (labels == 2).sum() == (plain == 2).sum()
    assert (labels[1, 8:12, 6:8] == IGNORE).all() and (labels[1, 8:12, 12:14] == IGNORE).all()  # 0.5 and 1 mm
    assert labels[1, 8, 5] == 0 and labels[1, 8, 14] == 0  # 1.5 mm: still background
    assert labels[0, 0, 0] == 0


def test_pseudo_label_opening_cuts_a_leak_through_a_thin_neck_to_ignore_and_spares_a_thin_vs():
    """A found tumour (a 4 mm ball) joined by a one-voxel neck to a slab of "VS" leaked into the cerebellum."""
    from training.pseudo_labels import PseudoLabelConfig, ball, pseudo_label
    from training.segmentation import IGNORE

    spacing = (1.0, 0.5, 0.5)
    shape = (12, 40, 60)
    zz, yy, xx = np.indices(shape) * np.array(spacing)[:, None, None, None]
    tumour = (zz - 6) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2 <= 4.0**2
    neck = (np.abs(zz - 6) < 0.5) & (np.abs(yy - 10) < 0.3) & (xx > 10) & (xx < 17) & ~tumour
    leak = (zz >= 3) & (zz <= 9) & (yy >= 6) & (yy <= 14) & (xx >= 17) & (xx <= 19)  # 2 mm thick in x
    probs = np.zeros((3,) + shape, np.float32)
    probs[0] = 1.0
    vs = tumour | neck | leak
    probs[:, vs] = np.array([0.05, 0.95, 0.0])[:, None]
    probs[:, 6, 30:32, 2:4] = np.array([0.05, 0.0, 0.95])[:, None, None]  # cochlea
    cfg = dict(min_vs_voxels=1, spacing_zyx_mm=spacing)
    plain, _ = pseudo_label(probs, PseudoLabelConfig(**cfg))
    opened, _ = pseudo_label(probs, PseudoLabelConfig(**cfg, vs_open_mm=1.5))
    assert (plain[vs] == 1).all()
    assert (opened[neck | leak] == IGNORE).all()  # cut off: neither VS nor background
    assert (opened == 1).sum() > 0.8 * tumour.sum() and ((opened == 1) & ~tumour).sum() == 0  # the ball survives
    assert (opened == 2).sum() == (plain == 2).sum() and (opened[~vs & (plain == 0)] == 0).all()
    # A pseudo-VS thinner than the ball everywhere (here the neck alone) is not erased.
    probs_thin = np.zeros_like(probs)
    probs_thin[0] = 1.0
    probs_thin[:, neck] = np.array([0.05, 0.95, 0.0])[:, None]
    probs_thin[:, 6, 30:32, 2:4] = np.array([0.05, 0.0, 0.95])[:, None, None]
    thin, _ = pseudo_label(probs_thin, PseudoLabelConfig(**cfg, vs_open_mm=1.5))
    assert (thin[neck] == 1).all()
    # 1 mm ball on 1 × 0.5 × 0.5 mm voxels: 13 in-plane offsets (|d| ≤ 1 mm) and one above and one below.
    b = ball(1.0, spacing)
    assert b.shape == (3, 5, 5) and b[1].sum() == 13 and b[0].sum() == b[2].sum() == 1


def test_pseudo_label_can_grow_an_under_segmented_vs_along_tissue_of_its_own_intensity():
    """The members find the tumour's cisternal part but not the grey rod it sends into the bright canal."""
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label
    from training.segmentation import IGNORE

    image = np.full((3, 20, 40), 1.0, np.float32)  # bright CSF
    image[:, 8:12, 4:30] = 0.45  # the tumour, a grey rod from x 4 to 29 (0.5 mm voxels: 13 mm)
    image[:, 8:12, 4:8] += 0.05 * np.arange(4)[None, None, :]  # some texture in the found part
    image[:, 16:20, 4:30] = 0.47  # grey tissue beyond bright CSF: not connected to the tumour
    probs = np.zeros((3,) + image.shape, np.float32)
    probs[0] = 1.0
    probs[:, :, 8:12, 4:12] = np.array([0.05, 0.95, 0.0])[:, None, None, None]  # found: x 4-11 only
    probs[:, 1, 1:3, 36:38] = np.array([0.05, 0.0, 0.95])[:, None, None]  # cochlea
    image[1, 1:3, 36:38] = 0.5
    cfg = dict(min_vs_voxels=1, spacing_zyx_mm=(1.0, 0.5, 0.5), vs_grow_quantiles=(0.0, 1.0))
    plain, _ = pseudo_label(probs, PseudoLabelConfig(**cfg), image=image)
    assert (plain == 1).sum() == 3 * 4 * 8
    grown, conf = pseudo_label(probs, PseudoLabelConfig(**cfg, vs_grow_mm=4.0), image=image)
    assert conf == pseudo_label(probs, PseudoLabelConfig(**cfg), image=image)[1]  # confidence from the members
    assert (grown[:, 8:12, 4:20] == 1).all()  # up to 4 mm (8 voxels) past the found part: x 12-19
    assert (grown[:, 8:12, 20:] == 0).all()  # farther: left as it was
    assert (grown[:, 16:20] == 0).all() and (grown[:, 12:16] == 0).all()  # bright CSF stops it
    assert (grown == 2).sum() == (plain == 2).sum()  # never the cochlea
    # The grown VS gets the IGNORE margin; intensities outside the found VS's own range do not grow.
    with_margin, _ = pseudo_label(probs, PseudoLabelConfig(**cfg, vs_grow_mm=4.0, vs_ignore_margin_mm=0.5), image=image)
    assert (with_margin[:, 8:12, 20] == IGNORE).all()
    narrow, _ = pseudo_label(probs, PseudoLabelConfig(**{**cfg, "vs_grow_quantiles": (0.7, 1.0)}, vs_grow_mm=4.0),
                             image=image)
    assert (narrow[:, 8:12, 12:] == 0).all()  # 0.45 is below the found part's 70th centile
    with pytest.raises(ValueError, match="needs the crop image"):
        pseudo_label(probs, PseudoLabelConfig(**cfg, vs_grow_mm=4.0))


def test_pseudo_label_can_move_the_cochlea_edge_to_the_fluid_even_where_the_members_were_unsure():
    """The members find the cochlea's fluid core confidently and its partial-volume rim unsurely."""
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label
    from training.segmentation import IGNORE

    z, y, x = np.indices((9, 24, 24))
    r = np.sqrt(((z - 4) * 1.0) ** 2 + ((y - 12) * 0.5) ** 2 + ((x - 12) * 0.5) ** 2)  # mm, 1 x 0.5 x 0.5 voxels
    true = r <= 3.0
    image = (0.1 + 0.8 * np.clip(3.5 - r, 0, 1)).astype(np.float32)  # bright fluid in dark bone, 1 mm ramp
    probs = np.zeros((3,) + image.shape, np.float32)
    probs[0] = 1.0
    probs[:, r <= 2.0] = np.array([0.05, 0.0, 0.95])[:, None]  # confident core
    probs[:, (r > 2.0) & (r <= 3.0)] = np.array([0.45, 0.0, 0.55])[:, None]  # unsure rim
    cfg = dict(spacing_zyx_mm=(1.0, 0.5, 0.5), min_cochlea_voxels=1, min_voxel_confidence=0.7, ignore_uncertain=True)
    plain, conf = pseudo_label(probs, PseudoLabelConfig(**cfg), image=image)
    assert (plain[true & (r > 2.0)] == IGNORE).all()  # the rim carries no loss
    refined, conf2 = pseudo_label(probs, PseudoLabelConfig(**cfg, cochlea_refine_mm=1.5), image=image)
    assert conf2 == conf  # confidence still from the members
    assert (refined[r <= 2.85] == 2).all() and (refined[r > 3.15] == 0).all()  # the edge at the half-way grey
    with pytest.raises(ValueError, match="needs the crop image"):
        pseudo_label(probs, PseudoLabelConfig(**cfg, cochlea_refine_mm=1.0))


def test_pseudo_label_can_give_the_csf_around_the_vs_back_to_the_background():
    """A grey VS in bright CSF (T2) with a cochlea nearby: the members draw the VS 1 mm too wide and leave a 2 mm
    IGNORE margin around it. With ``vs_trim_mm`` the CSF in the VS and in its margin is background; grey voxels
    of the margin (partial volume, tissue) stay IGNORE; the cochlea is untouched."""
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label
    from training.segmentation import IGNORE

    z, y, x = np.indices((16, 40, 40))
    r = np.sqrt(((z - 8) * 1.0) ** 2 + ((y - 20) * 0.5) ** 2 + ((x - 20) * 0.5) ** 2)  # mm
    true = r <= 4.0
    image = (0.9 - 0.6 * np.clip(4.5 - r, 0, 1)).astype(np.float32)  # tumour 0.3, CSF 0.9, 1 mm ramp
    cochlea = (np.abs(z - 8) <= 1) & (np.abs(y - 20) <= 2) & (x >= 36)
    image[cochlea] = 1.0
    tissue = (r > 5.1) & (r <= 5.8) & (y < 14)  # grey brain abutting the tumour, inside the margin
    image[tissue] = 0.3
    probs = np.zeros((3,) + image.shape, np.float32)
    probs[0] = 1.0
    probs[:, r <= 5.0] = np.array([0.0, 1.0, 0.0])[:, None]  # 1 mm too wide
    probs[:, cochlea] = np.array([0.0, 0.0, 1.0])[:, None]
    cfg = dict(spacing_zyx_mm=(1.0, 0.5, 0.5), min_cochlea_voxels=1, vs_ignore_margin_mm=2.0)
    plain, _ = pseudo_label(probs, PseudoLabelConfig(**cfg), image=image)
    assert ((plain == 1) == (r <= 5.0)).all() and (plain[(r > 5.1) & (r <= 6.5) & ~cochlea] == IGNORE).all()
    out, _ = pseudo_label(probs, PseudoLabelConfig(**cfg, vs_trim_mm=1.0), image=image)
    assert (out[r <= 3.9] == 1).all() and (out[r > 4.6] != 1).all()  # the edge at the half-way grey
    csf = (r > 4.6) & (r <= 6.5) & ~cochlea & ~tissue
    assert (out[csf] == 0).all()  # CSF taught as background, in the former VS rim and in the margin
    assert (out[tissue] == IGNORE).all()
    assert (out[cochlea] == 2).all()
    with pytest.raises(ValueError, match="needs the crop image"):
        pseudo_label(probs, PseudoLabelConfig(**cfg, vs_trim_mm=1.0))


def test_pseudo_label_of_a_tumour_free_ear_can_leave_its_far_part_unlabelled():
    """The crop of the tumour-free ear reaches into the other cerebellopontine angle, where the scan's tumour is."""
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label
    from training.segmentation import IGNORE

    probs = np.zeros((3, 3, 20, 40), np.float32)
    probs[0] = 1.0
    probs[:, 1, 9:11, 36:38] = np.array([0.05, 0.0, 0.95])[:, None, None]  # cochlea, lateral (x 36-37)
    probs[:, 1, 9:11, 30:32] = np.array([0.1, 0.9, 0.0])[:, None, None]  # a "VS" in a tumour-free ear
    cfg = dict(min_vs_voxels=1, spacing_zyx_mm=(1.0, 0.5, 0.5))
    full, _ = pseudo_label(probs, PseudoLabelConfig(**cfg), vs_free=True)
    assert (full[:, :, :30] == 0).all()  # labelled in full: background up to the crop edge
    assert (full[1, 9:11, 30:32] == IGNORE).all()
    near, _ = pseudo_label(probs, PseudoLabelConfig(**cfg, vs_free_ear_ignore_beyond_cochlea_mm=5.0), vs_free=True)
    assert (near == 2).sum() == (full == 2).sum() == 4
    assert (near[:, :, :20] == IGNORE).all()  # > 8 mm from the cochlea: no loss
    assert near[1, 9, 28] == 0 and near[1, 9, 25] == IGNORE  # 4 mm from the cochlea background, 5.5 mm IGNORE
    # The option leaves crops with a found tumour alone.
    assert (pseudo_label(probs, PseudoLabelConfig(**cfg, vs_free_ear_ignore_beyond_cochlea_mm=5.0))[0] == IGNORE).sum() == 0


def test_pseudo_label_without_a_found_vs_only_teaches_the_cochlea_surroundings():
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label
    from training.segmentation import IGNORE

    probs = np.zeros((3, 4, 24, 24), np.float32)
    probs[0] = 1.0
    probs[:, 1:3, 10:13, 20:23] = np.array([0.1, 0.0, 0.9])[:, None, None, None]  # cochlea only
    cfg = PseudoLabelConfig(min_vs_voxels=1, no_vs_label_beyond_cochlea_mm=2.0, spacing_zyx_mm=(1.0, 0.5, 0.5))
    labels, _ = pseudo_label(probs, cfg)
    assert (labels == 2).sum() == 2 * 3 * 3
    assert labels[1, 11, 18] == 0  # 1 mm from the cochlea: background, still taught
    assert labels[1, 11, 10] == IGNORE and labels[1, 0, 0] == IGNORE  # far away: no signal
    probs[:, 1:3, 10:13, 14:17] = np.array([0.1, 0.9, 0.0])[:, None, None, None]  # now a VS is found
    labels, _ = pseudo_label(probs, cfg)
    assert not (labels == IGNORE).any() and (labels == 1).sum() == 2 * 3 * 3


def test_one_vs_per_scan_drops_scans_with_a_missed_tumour_and_labels_the_other_ear_in_full(monkeypatch):
    from training import pseudo_labels
    from training.pseudo_labels import PseudoLabelConfig, pseudo_label_crops
    from training.segmentation import IGNORE

    def crop_probs(vs_voxels_x: int):
        p = np.zeros((3, 4, 24, 24), np.float32)
        p[0] = 1.0
        p[:, 1:3, 10:13, 20:23] = np.array([0.1, 0.0, 0.9])[:, None, None, None]  # cochlea
        if vs_voxels_x:
            p[:, 1:3, 10:13, 14:14 + vs_voxels_x] = np.array([0.1, 0.9, 0.0])[:, None, None, None]
        return p

    # scan a: tumour in crop 0 and a smaller false "VS" in crop 1; scan b: no tumour found at all
    probs = [crop_probs(4), crop_probs(2), crop_probs(0), crop_probs(0)]
    monkeypatch.setattr(pseudo_labels, "ensemble_probabilities", lambda members, crop, fusion: probs[int(crop)])
    crops = [np.full((4, 24, 24), k, np.float32) for k in range(4)]  # each crop's value is its index
    base = dict(min_voxel_confidence=0.5, min_case_confidence=0.5, min_vs_voxels=1, spacing_zyx_mm=(1.0, 0.5, 0.5),
                no_vs_label_beyond_cochlea_mm=2.0)
    plain, records = pseudo_label_crops([], [c[0, 0, 0] for c in crops], PseudoLabelConfig(**base), progress=False)
    assert [r["used"] for r in records] == [True] * 4 and [r["vs_voxels"] for r in records] == [24, 12, 0, 0]
    assert (plain[2][1] == IGNORE).any()  # no VS found: labelled near its cochlea only
    prior = PseudoLabelConfig(**base, one_vs_per_scan=True)
    with pytest.raises(ValueError, match="scan id"):
        pseudo_label_crops([], [c[0, 0, 0] for c in crops], prior, progress=False)
    kept, records = pseudo_label_crops([], [c[0, 0, 0] for c in crops], prior, progress=False,
                                       scan_ids=["a", "a", "b", "b"])
    assert [r["used"] for r in records] == [True, True, False, False]  # scan b's tumour was missed
    assert [r["vs_voxels"] for r in records] == [24, 0, 0, 0]
    tumour, other = kept[0][1], kept[1][1]
    assert (tumour == 1).sum() == 24 and not (tumour == IGNORE).any()
    assert (other == IGNORE).sum() == 12 and not (other == 1).any()  # the smaller "VS": not trusted either way
    assert (other == 0).sum() == 4 * 24 * 24 - 12 - 18  # everything else taught: this ear is tumour-free


def test_pseudo_label_crops_are_selected_by_case_confidence():
    from training.pseudo_labels import PseudoLabelConfig, select_confident

    cfg = PseudoLabelConfig(min_case_confidence=0.5, keep_fraction=0.5)
    assert select_confident([0.9, 0.4, 0.8, 0.95], cfg) == [0, 3]


def test_pseudo_label_selection_can_reserve_places_for_crops_with_a_found_vs():
    from training.pseudo_labels import PseudoLabelConfig, select_confident

    conf = [0.99, 0.98, 0.97, 0.96, 0.7, 0.6, 0.3, 0.95]
    has_vs = [False, False, False, False, True, True, True, False]
    plain = PseudoLabelConfig(min_case_confidence=0.5, keep_fraction=0.5)
    assert select_confident(conf, plain, has_vs) == [0, 1, 2, 3]  # one ranking: no tumour at all
    quota = PseudoLabelConfig(min_case_confidence=0.5, keep_fraction=0.5, vs_crop_share=0.5)
    assert select_confident(conf, quota, has_vs) == [0, 1, 4, 5]  # 2 of 4 places to the VS crops
    assert 6 not in select_confident(conf, PseudoLabelConfig(min_case_confidence=0.5, keep_fraction=0.5,
                                                             vs_crop_share=1.0), has_vs)  # 0.3: never


# ------------------------------------------------------------------------------------------ Mean Teacher

def test_ema_update_moves_the_teacher_towards_the_student():
    from training.mean_teacher import ema_update

    teacher, student = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
    ema_update(teacher, student, 0.75)
    assert float(teacher.weight.detach()) == pytest.approx(1.5)


def test_consistency_weight_ramps_up_to_its_full_value():
    from training.mean_teacher import MeanTeacherConfig, consistency_weight

    mt = MeanTeacherConfig(consistency_weight=2.0, rampup_iterations=100)
    assert consistency_weight(0, mt) == pytest.approx(2.0 * np.exp(-5))
    assert consistency_weight(50, mt) < consistency_weight(90, mt) < consistency_weight(100, mt) == 2.0


def _tiny_arrays(n=2, shape=(8, 24, 24), seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lab = np.zeros(shape, np.uint8)
        lab[2:6, 8:14, 8:14] = 1
        lab[3:5, 16:19, 16:19] = 2
        out.append(((rng.random(shape) * 0.2 + 0.3 * lab).astype(np.float16), lab))
    return out


def test_mean_teacher_trains_resumes_from_its_checkpoint_and_exports_the_teacher(tmp_path):
    from training.mean_teacher import MeanTeacherConfig, train_mean_teacher
    from training.segmentation import TrainConfig
    from VSCochleaSegLib.networks import build_network, load_inference_state_dict
    from VSCochleaSegLib.model_folder import NetworkSpec

    arrays = _tiny_arrays()
    unlabelled = [a for a, _ in _tiny_arrays(seed=1)]
    mt = MeanTeacherConfig(rampup_iterations=2)
    cfg = TrainConfig(network=TINY_NET3, patch_size_zyx=[8, 24, 24], iterations=2, checkpoint_every=1, optimizer="adamw",
                      threads=1)
    train_mean_teacher(arrays, unlabelled, cfg, mt, tmp_path, "mt", progress=False)
    assert torch.load(tmp_path / "mt_checkpoint.pt", weights_only=True)["iteration"] == 2
    cfg.iterations = 4
    sd = train_mean_teacher(arrays, unlabelled, cfg, mt, tmp_path, "mt", progress=False)
    assert torch.load(tmp_path / "mt_checkpoint.pt", weights_only=True)["iteration"] == 4
    log = (tmp_path / "mt_log.csv").read_text(encoding="utf-8").splitlines()
    assert log[0].startswith("iteration,supervised_loss,consistency_loss") and log[-1].startswith("4,")
    load_inference_state_dict(build_network(NetworkSpec.from_dict(TINY_NET3)), sd)


# ------------------------------------------------------------------------------------------ DDP

def test_training_runs_under_distributed_data_parallel_single_process_gloo(tmp_path):
    import torch.distributed as dist

    from training import distributed
    from training.segmentation import TrainConfig, train_network

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert isinstance(distributed.wrap(torch.nn.Linear(1, 1)), torch.nn.parallel.DistributedDataParallel)
        cfg = TrainConfig(network=TINY_NET2, patch_size_zyx=[24, 24], iterations=2, optimizer="adamw", threads=1)
        sd = train_network(_tiny_arrays(), cfg, tmp_path, "ddp", progress=False)
    finally:
        dist.destroy_process_group()
    assert not any(k.startswith("module.") for k in sd)
    assert (tmp_path / "ddp_checkpoint.pt").exists()


def test_class_weights_raise_the_loss_of_rare_classes_the_network_misses(tmp_path):
    """The localiser's fix for its rare target (docs/localisation.md): weighting the cochlea class 20×
    makes the same first iterations cost more than unweighted, because the untrained net misses it."""
    import csv

    from training.segmentation import TrainConfig, train_network

    losses = {}
    for name, weights in (("plain", None), ("weighted", [1, 1, 20])):
        cfg = TrainConfig(network=TINY_NET2, patch_size_zyx=[24, 24], iterations=20, optimizer="adamw", threads=1,
                          seed=5, class_weights=weights)
        train_network(_tiny_arrays(), cfg, tmp_path / name, name, progress=False)
        with open(tmp_path / name / f"{name}_log.csv") as f:
            losses[name] = float(list(csv.DictReader(f))[0]["loss"])
    assert losses["weighted"] > losses["plain"] > 0


def test_weight_averaging_exports_the_mean_of_the_weights_sampled_after_its_start_also_across_a_resume(
        tmp_path, monkeypatch):
    """``swa_start_fraction`` 0.5 of 6 iterations, every iteration: the exported weights are the mean of the
    weights after iterations 4, 5 and 6, not the last ones, also when training was stopped after 5 and resumed."""
    from torch.optim.swa_utils import AveragedModel

    from training.segmentation import TrainConfig, train_network

    seen, stop_at = [], [3]
    original = AveragedModel.update_parameters

    def recording(self, model):
        if len(seen) + 1 == stop_at[0]:
            raise KeyboardInterrupt  # the run dies during iteration 6
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return original(self, model)

    monkeypatch.setattr(AveragedModel, "update_parameters", recording)
    cfg = TrainConfig(network=TINY_NET2, patch_size_zyx=[24, 24], iterations=6, optimizer="adamw", threads=1,
                      checkpoint_every=1, swa_start_fraction=0.5, swa_every=1, learning_rate=0.01)
    with pytest.raises(KeyboardInterrupt):
        train_network(_tiny_arrays(), cfg, tmp_path, "swa", progress=False)
    ckpt = torch.load(tmp_path / "swa_checkpoint.pt", weights_only=True)
    assert ckpt["iteration"] == 5 and int(ckpt["swa"]["n_averaged"]) == 2
    stop_at[0] = 0
    sd = train_network(_tiny_arrays(), cfg, tmp_path, "swa", progress=False)
    assert len(seen) == 3
    last = torch.load(tmp_path / "swa_checkpoint.pt", weights_only=True)["net"]
    key = next(k for k in sd if k.endswith("weight") and sd[k].dim() > 1)
    torch.testing.assert_close(sd[key], torch.stack([s[key] for s in seen]).mean(0))
    assert not torch.allclose(sd[key], last[key])


def test_without_torchrun_networks_are_not_wrapped():
    from training import distributed

    net = torch.nn.Linear(1, 1)
    assert distributed.wrap(net) is net and distributed.is_main()


# ------------------------------------------------------------------------------------------ pipeline

def test_pipeline_runs_every_stage_and_exports_an_engine_model_without_hrt2_labels(method_a_run):
    from VSCochleaSegLib.model_folder import load_model_folder

    out, model, backend = method_a_run
    assert backend.trained == ["cyclegan_seg", "cyclegan_seg"]  # localiser scale, then ear crops
    stages = [line.split(",")[0] for line in (out / "stages.csv").read_text(encoding="utf-8").splitlines()[1:]]
    assert stages == ["prepare", "translate_localiser", "localiser", "target_crops", "translate_crops", "segment",
                      "pseudo_labels", "self_train"]
    folder = load_model_folder(model)
    assert folder.spec.provenance["hrT2_labels_used"] is False
    assert folder.spec.provenance["config"]["name"] == "phantom-uda"
    assert folder.spec.segmentation.fusion == "mean"
    names = [m.name for m in folder.spec.segmentation.members]  # the better of two folds per member
    assert len(names) == 2 and names[0][:-1] == "seg3d_f" and names[1][:-1] == "seg2d_f"
    assert load_model_folder(out / "model_translation_only").spec.provenance["stage"] == "segment"


def test_the_final_model_can_also_hold_the_stage3_members_the_self_trained_ones_started_from(method_a_run, uda_data,
                                                                                              tmp_path):
    from safetensors.torch import load_file

    from training import pipeline

    out, _, _ = method_a_run
    cfg = {**tiny_config(), "export": {"with_segment_members": True}}
    run = pipeline.Run(uda_data, tmp_path / "run", cfg, progress=False)
    run.out = out  # export from the finished run without touching it
    folder = pipeline.export_model(run, "self_train", tmp_path / "model")
    names = [m.name for m in folder.spec.segmentation.members]
    assert len(names) == 4 and len(set(names)) == 4
    assert names[2:] == [f"{n}_stage3" for n in names[:2]]
    segment = load_file(str(out / "segment" / f"{names[0]}.safetensors"))
    stage3 = load_file(str(tmp_path / "model" / f"{names[2]}.safetensors"))
    self_trained = load_file(str(tmp_path / "model" / f"{names[0]}.safetensors"))
    assert all(torch.equal(stage3[k], segment[k]) for k in segment)
    assert not all(torch.equal(self_trained[k], segment[k]) for k in segment)


def test_self_training_records_how_many_real_tumours_the_fakes_were_matched_to(method_a_run):
    out, _, _ = method_a_run
    info = json.loads((out / "self_train" / "done.json").read_text(encoding="utf-8"))["info"]
    with np.load(out / "pseudo_labels" / "pseudo_labels.npz") as z:
        labels = z["labels"] if z["labels"].ndim == 4 else []
    min_voxels = tiny_config()["self_training"]["fake_vs_match"].get("min_vs_voxels", 100)
    assert info["fake_vs_match_references"] == sum(int((lab == 1).sum() >= min_voxels) for lab in labels)


def test_pipeline_fakes_every_snapshot_and_adds_tumour_augmented_copies(method_a_run):
    out, _, _ = method_a_run
    info = json.loads((out / "translate_crops" / "done.json").read_text(encoding="utf-8"))["info"]
    assert info["snapshots"] == [1, 2]
    with np.load(sorted((out / "translate_crops" / "fake").glob("*.npz"))[0]) as z:
        assert len(z["images"]) >= 2 * 2  # 2 ears × 1 jitter × 2 snapshots (+ augmented copies)
    assert info["csf_rim_copies"] == info["tumour_augmented_copies"] > 0  # csf_rim_probability 1 in the tiny config
    n_copies = tiny_config()["translation"].get("random_contrast_copies", 0)
    assert info["random_contrast_copies"] == 2 * n_copies * len(list((out / "translate_crops" / "fake").glob("*.npz")))


def test_a_list_of_tumour_augmentations_makes_one_copy_per_entry(method_a_run, uda_data, tmp_path):
    """Two settings (a factor on the translated tumour, one relative to the tissue) give twice the copies of one."""
    from training import pipeline

    out, _, _ = method_a_run
    one = json.loads((out / "translate_crops" / "done.json").read_text(encoding="utf-8"))["info"]
    cfg = tiny_config()
    single = dict(cfg["translation"]["tumour_augmentation"], probability=1.0, csf_rim_probability=0.0)
    cfg["translation"]["tumour_augmentation"] = [single, dict(single, relative_to_tissue=True, factor_range=[0.9, 2.0])]
    for stage in ("prepare", "target_crops"):  # the finished inputs of the stage under test
        (tmp_path / stage).symlink_to(out / stage, target_is_directory=True)
    run = pipeline.Run(uda_data, tmp_path, cfg, backend=FakeBackend(), progress=False)
    two = pipeline.stage_translate_crops(run, tmp_path / "translate_crops_two")
    # the tiny config's single setting has probability 1: one copy per fake with a tumour
    assert one["tumour_augmented_copies"] > 0 and two["tumour_augmented_copies"] == 2 * one["tumour_augmented_copies"]
    assert two["csf_rim_copies"] == 0


def test_tumour_augmentation_settings_need_a_factor_range():
    from training.pipeline import _tumour_augmentations

    assert _tumour_augmentations({"probability": 0.0}) == [{"probability": 0.0}]
    assert len(_tumour_augmentations([{"probability": 1.0, "factor_range": [1, 2]}] * 2)) == 2
    with pytest.raises(ValueError, match="factor_range"):
        _tumour_augmentations([{"probability": 1.0}])


def test_self_training_can_give_fake_tumours_the_grey_levels_of_pseudo_labelled_real_ones():
    from training.pipeline import _match_fake_tumours, _real_tumour_references

    real = np.full((4, 16, 16), 0.9, np.float32)  # bright CSF around a grey real tumour
    real_lab = np.zeros(real.shape, np.uint8)
    real_lab[1:3, 4:12, 4:12] = 1
    real[real_lab == 1] = 0.45
    small = np.zeros(real.shape, np.uint8)
    small[2, 2, 2] = 1  # a pseudo-tumour under min_vs_voxels is no reference
    refs = _real_tumour_references([(real, real_lab), (real, small)], {"min_vs_voxels": 50})
    assert len(refs) == 1 and np.allclose(refs[0][0], 0.45) and refs[0][1] is None
    fake = np.full(real.shape, 0.5, np.float16)
    fake[real_lab == 1] = 0.1  # the translator's dark tumour
    no_vs = np.zeros(real.shape, np.uint8)
    out = _match_fake_tumours([("case", [(fake, real_lab), (fake, no_vs)])], refs, {"probability": 1.0}, seed=0)[0][1]
    assert np.allclose(out[0][0][real_lab == 1], 0.45, atol=2e-3) and out[0][0].dtype == np.float16
    assert np.array_equal(out[1][0], fake) and out[0][1] is real_lab  # no tumour: unchanged; labels kept
    assert np.all(fake[real_lab == 1] == np.float16(0.1))  # the caller's crops are not modified
    untouched = _match_fake_tumours([("case", [(fake, real_lab)])], refs, {"probability": 0.0}, seed=0)[0][1]
    assert np.array_equal(untouched[0][0], fake)
    # with ring_voxels, the fake tumour's grey surroundings take the real tumour's bright CSF surroundings too
    ringed = _real_tumour_references([(real, real_lab)], {"ring_voxels": 2})
    assert np.allclose(ringed[0][1], 0.9)
    out = _match_fake_tumours([("case", [(fake, real_lab)])], ringed, {"ring_voxels": 2}, seed=0)[0][1]
    assert out[0][0][1, 8, 13] > 0.85 and out[0][0][1, 8, 15] < 0.55  # the ring bright, beyond it the fake grey
    # with context, the rest of every fake crop (tumour-free ones too) takes the same real crop's grey levels
    ctx = _real_tumour_references([(real, real_lab)], {"context": True})
    assert np.allclose(ctx[0][2], 0.9) and ctx[0][2].size == int((real_lab != 1).sum())
    out = _match_fake_tumours([("case", [(fake, real_lab), (fake, no_vs)])], ctx, {"context": True}, seed=0)[0][1]
    assert np.allclose(out[0][0][:, :, 14:], 0.9, atol=2e-3)  # beyond the tumour's partial-volume edge
    assert np.allclose(out[1][0], 0.9, atol=2e-3)
    assert np.allclose(out[0][0][real_lab == 1], 0.45, atol=2e-3)
    # with cochlea, the fake cochlea (tumour-free crops too) takes the grey levels of the same real crop's cochlea
    real_lab[2, 13:15, 13:15] = 2
    real[real_lab == 2] = 0.95
    coch = _real_tumour_references([(real, real_lab)], {"cochlea": True, "min_cochlea_voxels": 4})
    assert np.allclose(coch[0][3], 0.95) and coch[0][2] is None
    assert _real_tumour_references([(real, real_lab)], {"cochlea": True})[0][3] is None  # under 20 voxels: no reference
    fake_lab = np.where(real_lab == 1, 0, real_lab)
    out = _match_fake_tumours([("case", [(fake, fake_lab)])], coch, {"cochlea": True}, seed=0)[0][1]
    assert np.allclose(out[0][0][fake_lab == 2], 0.95, atol=2e-3) and np.allclose(out[0][0][:, :3, :3], 0.5)


def test_pseudo_labels_cover_every_located_real_hrt2_ear(method_a_run):
    out, _, _ = method_a_run
    rows = (out / "pseudo_labels" / "pseudo_labels.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].startswith("case,crop,confidence") and len(rows) == 1 + 2 * 2


def test_pipeline_rerun_skips_finished_stages(method_a_run, uda_data, monkeypatch):
    from training import pipeline

    out, model, _ = method_a_run
    monkeypatch.setattr(pipeline, "train_network", lambda *a, **k: pytest.fail("a finished network was retrained"))
    assert pipeline.run_pipeline(uda_data, out, tiny_config(), backend=FakeBackend(fail=True), progress=False) == model


class _BrightIsCochlea(torch.nn.Module):
    """A stand-in segmentation network: voxels brighter than 0.5 are cochlea, the rest background."""

    def forward(self, x):
        cochlea = (x > 0.5).float() * 20.0
        return torch.cat([10.0 - cochlea, torch.zeros_like(x), cochlea - 10.0], 1)


def test_target_cochlea_rate_counts_crops_where_a_member_finds_a_cochlea():
    from training.pipeline import target_cochlea_rate

    with_ear = np.zeros((8, 16, 16), np.float16)
    with_ear[2:5, 4:8, 4:8] = 1.0  # 48 voxels
    crops = [with_ear, np.zeros((8, 16, 16), np.float16), with_ear]
    assert target_cochlea_rate(_BrightIsCochlea().eval(), (8, 16, 16), crops, 40) == pytest.approx(2 / 3)
    assert target_cochlea_rate(_BrightIsCochlea().eval(), (16, 16), crops, 49) == 0.0


def test_members_that_find_no_cochlea_on_real_hrt2_are_left_out_of_the_ensemble(method_a_run, uda_data, monkeypatch):
    from training import pipeline

    out, _, _ = method_a_run
    cfg = tiny_config()
    cfg["data"]["min_target_cochlea_rate"] = 0.5
    run = pipeline.Run(uda_data, out, cfg, FakeBackend(fail=True), progress=False)
    monkeypatch.setattr(pipeline, "target_cochlea_rate", lambda net, patch, crops, n: 0.0 if len(patch) == 3 else 1.0)
    record = pipeline._train_members(run, out / "segment", lambda labelled: labelled)["members"]
    assert {r["member"] for r in record if r["selected"]} == {"seg2d"}  # the 3D member found no cochlea
    assert all("target_cochlea_rate" in r for r in record)
    monkeypatch.setattr(pipeline, "target_cochlea_rate", lambda net, patch, crops, n: 0.0)
    record = pipeline._train_members(run, out / "segment", lambda labelled: labelled)["members"]
    assert sum(r["selected"] for r in record) == 1  # all fail: the best is kept, never an empty ensemble


def test_pipeline_refuses_to_mix_a_finished_stage_with_a_changed_config(method_a_run, uda_data):
    from training import pipeline

    out, _, _ = method_a_run
    cfg = tiny_config()
    cfg["members"][0]["train"]["iterations"] = 3
    with pytest.raises(RuntimeError, match="different config"):
        pipeline.run_pipeline(uda_data, out, cfg, backend=FakeBackend(fail=True), progress=False)


def test_a_killed_network_resumes_from_its_checkpoint(method_a_run, uda_data, tmp_path, monkeypatch):
    from training import pipeline

    out, _, _ = method_a_run
    run_b = tmp_path / "resume"
    run_b.mkdir()
    for stage in ("prepare", "translate_localiser", "localiser", "target_crops", "translate_crops"):
        os.symlink(out / stage, run_b / stage)
    cfg = tiny_config()
    cfg["data"]["folds"] = 1
    seen = []
    real = pipeline.train_network

    def interrupted(arrays, tcfg, d, name, **kw):
        if not seen:  # first network: stop after one of two iterations, as a kill would
            seen.append(name)
            real(arrays, type(tcfg)(**{**tcfg.__dict__, "iterations": 1}), d, name, **kw)
            raise KeyboardInterrupt
        seen.append(name)
        return real(arrays, tcfg, d, name, **kw)

    monkeypatch.setattr(pipeline, "train_network", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(uda_data, run_b, cfg, backend=FakeBackend(fail=True), progress=False, until="segment")
    assert torch.load(run_b / "segment" / "seg3d_checkpoint.pt", weights_only=True)["iteration"] == 1
    pipeline.run_pipeline(uda_data, run_b, cfg, backend=FakeBackend(fail=True), progress=False, until="segment")
    log = (run_b / "segment" / "seg3d_log.csv").read_text(encoding="utf-8").splitlines()
    assert torch.load(run_b / "segment" / "seg3d_checkpoint.pt", weights_only=True)["iteration"] == 2
    assert log[0].startswith("iteration")


def test_method_b_variant_trains_mean_teachers_and_fuses_with_cleanlab(method_a_run, uda_data, tmp_path):
    from training import pipeline
    from VSCochleaSegLib.model_folder import load_model_folder

    out, _, _ = method_a_run
    run_b = tmp_path / "method_b"
    run_b.mkdir()
    for stage in ("prepare", "translate_localiser", "localiser", "target_crops"):
        os.symlink(out / stage, run_b / stage)
    cfg = pipeline.deep_update(tiny_config(), tiny_config()["variants"]["method_b"])
    cfg["data"]["folds"] = 1
    cfg["translation"]["crops"]["model"] = "cut"  # method b's own translation, as in crossmoda.json
    backend = FakeBackend()
    model = pipeline.run_pipeline(uda_data, run_b, cfg, backend=backend, progress=False)
    assert backend.trained == ["cut"]  # the shared localiser-scale translation was not redone
    folder = load_model_folder(model)
    assert folder.spec.segmentation.fusion == "cleanlab"
    assert (run_b / "self_train" / "seg3d_log.csv").read_text(encoding="utf-8").startswith("iteration,supervised_loss,consistency")
    assert not (run_b / "segment").exists()


def test_rerun_stages_changes_only_the_listed_stages_and_scores_the_result(method_a_run, uda_data, tmp_path):
    """The experiment tool behind docs/training.md's one-change-at-a-time tables."""
    from safetensors.torch import load_file
    from training.experiments import rerun_stages
    from VSCochleaSegLib.phantoms import make_case, write_case

    out, _, _ = method_a_run
    test_dir = tmp_path / "test"
    write_case(make_case(77003, 0, ("hrT2",), "hrT2", "test_0", acquisition=SMALL_ACQUISITION), test_dir)
    new = tmp_path / "rerun"
    scores = rerun_stages.main([str(out), str(new), '{"members.1.train.seed": 5, "self_training.train.iterations": 1}',
                                "--stages", "segment", "pseudo_labels", "self_train", "--data", str(uda_data),
                                "--test", str(test_dir),
                                "--reuse-weights", f"seg2d_f0={out / 'segment' / 'seg2d_f0.safetensors'}"])
    for stage in ("prepare", "translate_localiser", "localiser", "target_crops", "translate_crops"):
        assert (new / stage).is_symlink() and (new / stage).resolve() == (out / stage).resolve()
    for stage in ("segment", "pseudo_labels", "self_train"):
        assert not (new / stage).is_symlink() and (new / stage / "done.json").exists()
    cfg = json.loads((new / "config.json").read_text(encoding="utf-8"))
    assert cfg["members"][1]["train"]["seed"] == 5 and cfg["members"][0]["train"]["seed"] == 2
    assert cfg["self_training"]["train"] == {"iterations": 1}
    before = load_file(str(out / "segment" / "seg2d_f1.safetensors"))
    after = load_file(str(new / "segment" / "seg2d_f1.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # another seed, another network
    kept = load_file(str(new / "segment" / "seg2d_f0.safetensors"))  # --reuse-weights: kept, not retrained
    assert all(torch.equal(v, kept[k]) for k, v in load_file(str(out / "segment" / "seg2d_f0.safetensors")).items())
    done = json.loads((new / "segment" / "done.json").read_text(encoding="utf-8"))
    assert "seg2d_f0" in [r["name"] for r in done["info"]["members"]]
    written = json.loads((new / "scores.json").read_text(encoding="utf-8"))
    assert set(written["scores"]) == set(scores) == {"translation_only", "self_trained"}
    assert set(written["scores"]["self_trained"]["per_case_dice"]) == {"test_0"}
    assert 0.0 <= written["scores"]["translation_only"]["mean"]["Cochlea_Dice"] <= 1.0


def test_rerun_stages_overrides_follow_dotted_paths_into_lists():
    from training.experiments.rerun_stages import apply_overrides

    cfg = {"members": [{"train": {"seed": 1}}, {"train": {"seed": 2}}], "translation": {}}
    apply_overrides(cfg, {"members.1.train.seed": 13, "translation.crops.iterations": 1200})
    assert cfg == {"members": [{"train": {"seed": 1}}, {"train": {"seed": 13}}],
                   "translation": {"crops": {"iterations": 1200}}}
    apply_overrides(cfg, {"members.2": {"train": {"seed": 23}}})  # one past the end appends
    assert [m["train"]["seed"] for m in cfg["members"]] == [1, 13, 23]
    with pytest.raises(IndexError):
        apply_overrides(cfg, {"members.4.train.seed": 3})


def test_warm_started_self_training_fine_tunes_the_stage3_members_with_its_own_settings(method_a_run, uda_data,
                                                                                          tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from training import pipeline, segmentation

    out, _, _ = method_a_run
    for stage in ("prepare", "translate_localiser", "localiser", "target_crops", "translate_crops", "segment",
                  "pseudo_labels"):
        os.symlink(out / stage, tmp_path / stage)
    cfg = tiny_config()
    cfg["self_training"] = {"mode": "pseudo_labels", "warm_start": True, "train": {"iterations": 1, "learning_rate": 0.0}}
    starts, settings = {}, {}
    real_load = segmentation.load_initial_weights

    def spy(net, path):
        real_load(net, path)
        starts[path.name] = {k: v.clone() for k, v in net.state_dict().items()}

    real_train = pipeline.train_network

    def record(arrays, tcfg, d, name, **kw):
        settings[name] = (tcfg.iterations, tcfg.learning_rate)
        return real_train(arrays, tcfg, d, name, **kw)

    monkeypatch.setattr(segmentation, "load_initial_weights", spy)
    monkeypatch.setattr(pipeline, "train_network", record)
    run = pipeline.Run(uda_data, tmp_path, cfg, FakeBackend(fail=True), progress=False)
    run.stage("self_train", lambda d: pipeline.stage_self_train(run, d))
    names = [f"{m}_f{f}" for m in ("seg3d", "seg2d") for f in (0, 1)]  # tiny_config: two folds
    assert settings == {name: (1, 0.0) for name in names}
    for name in names:
        exported = load_file(str(out / "segment" / f"{name}.safetensors"))
        start = starts[f"{name}.safetensors"]
        assert all(torch.equal(start[k], v) for k, v in exported.items())  # every stage-3 weight, heads fresh
        assert any(k.startswith("deep_supervision_heads") for k in start)


def test_a_second_self_training_round_relabels_with_the_first_rounds_members_and_starts_from_them(
        method_a_run, uda_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from training import pipeline, segmentation

    out, _, _ = method_a_run
    for stage in ("prepare", "translate_localiser", "localiser", "target_crops", "translate_crops", "segment",
                  "pseudo_labels"):
        os.symlink(out / stage, tmp_path / stage)
    cfg = tiny_config()
    cfg["self_training"] = {"mode": "pseudo_labels", "warm_start": True, "rounds": 2,
                            "train": {"iterations": 1, "learning_rate": 0.01}, "relabel": {"vs_grow_mm": 0.0}}
    starts, labellers, relabel = [], [], []
    real_load = segmentation.load_initial_weights
    monkeypatch.setattr(segmentation, "load_initial_weights",
                        lambda net, path: (starts.append(path.relative_to(tmp_path).as_posix()), real_load(net, path)))
    real_make = pipeline.make_pseudo_labels

    def spy(run, selected, d, overrides=None):
        labellers.append(sorted(m["path"].relative_to(tmp_path).as_posix() for m in selected))
        relabel.append(overrides)
        return real_make(run, selected, d, overrides)

    monkeypatch.setattr(pipeline, "make_pseudo_labels", spy)
    run = pipeline.Run(uda_data, tmp_path, cfg, FakeBackend(fail=True), progress=False)
    info = run.stage("self_train", lambda d: pipeline.stage_self_train(run, d))["info"]
    names = [f"{m}_f{f}" for m in ("seg3d", "seg2d") for f in (0, 1)]  # tiny_config: two folds
    round1 = [f"self_train/round1/{n}.safetensors" for n in names]
    assert starts == [f"segment/{n}.safetensors" for n in names] + round1
    selected = sorted(f"self_train/round1/{r['name']}.safetensors" for r in info["round1_members"] if r["selected"])
    assert labellers == [selected] and selected and relabel == [{"vs_grow_mm": 0.0}]
    assert (tmp_path / "self_train" / "round2_pseudo_labels" / "pseudo_labels.npz").is_file()
    assert [r["name"] for r in info["members"]] == names and info["round2_pseudo_labels"]["n_crops"] == 4
    for n in names:  # the exported (last-round) weights moved on from round 1's
        first, last = (load_file(str(tmp_path / "self_train" / sub / f"{n}.safetensors")) for sub in ("round1", "."))
        assert any(not torch.equal(first[k], last[k]) for k in last)
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        cfg["self_training"]["rounds"] = 0
        pipeline.stage_self_train(run, tmp_path / "other")


def test_fake_images_are_air_outside_the_source_head():
    from training.pipeline import translate_in_head

    source = np.zeros((2, 20, 20), np.float32)
    source[:, 5:15, 5:15] = 0.5
    source[:, 9:11, 9:11] = 0.0  # dark bone inside the head stays part of the head
    fake = translate_in_head(InvertingTranslator(), source, None)
    assert fake[0, 0, 0] == 0.0 and fake[0, 10, 10] == pytest.approx(1.2)


def test_a_vs_conditioned_translator_gets_the_source_vs_mask():
    from training.pipeline import translate_in_head

    class Conditioned(InvertingTranslator):
        conditioned = True

        def translate_volume(self, volume_zyx, snapshot=None, vs_mask=None):
            return np.where(vs_mask, 0.4, super().translate_volume(volume_zyx, snapshot))

    source = np.full((2, 20, 20), 0.5, np.float32)
    labels = np.zeros(source.shape, np.uint8)
    labels[:, 3:6, 3:6], labels[:, 12:14, 12:14] = 1, 2  # VS, cochlea
    fake = translate_in_head(Conditioned(), source, None, labels)
    assert np.allclose(fake[labels == 1], 0.4) and np.allclose(fake[labels != 1], 0.7)
    with pytest.raises(ValueError, match="labels"):
        translate_in_head(Conditioned(), source, None)


def test_random_contrast_keeps_air_dark_and_changes_the_head():
    from training.pipeline import random_contrast

    vol = np.zeros((2, 20, 20), np.float32)
    vol[:, 5:15, 5:15] = np.linspace(0.1, 1.4, 100).reshape(10, 10)
    out = random_contrast(vol, np.random.default_rng(0)).astype(np.float32)
    assert out[0, 0, 0] == 0.0 and not np.allclose(out[:, 5:15, 5:15], vol[:, 5:15, 5:15], atol=0.05)


def test_random_contrast_gives_close_dark_tissues_independent_brightness():
    """ceT1 bone (0.06) and CSF (0.12) must not stay tied in order and ratio: on hrT2 CSF is the brightest tissue
    next to black bone."""
    from training.augment import random_contrast

    vol = np.zeros((4, 30, 30), np.float32)
    vol[:, 2:28, 2:28] = 0.45  # brain
    vol[:, 5:12, 5:25] = 0.06  # bone
    vol[:, 15:22, 5:25] = 0.12  # CSF
    vol[:, 24:27, 10:20] = 0.85  # enhancing tumour
    rng = np.random.default_rng(1)
    draws = [random_contrast(vol, rng).astype(np.float32)[0] for _ in range(40)]
    csf, bone, brain, vs = (np.array([d[y, x] for d in draws]) for y, x in ((18, 10), (8, 10), (3, 3), (25, 15)))
    assert (bone > csf).any() and (csf > bone).any()  # the order flips between draws
    assert ((csf > brain) & (csf > vs) & (csf > bone)).any()  # CSF can be the brightest, as on hrT2


def test_randomise_label_intensity_decouples_the_tumour_from_tissues_of_its_source_intensity():
    """After a random curve the ceT1 VS (0.85) and a vessel (0.85) share one value; label-wise randomisation
    gives the VS its own median in the value range, leaves every other voxel alone, and keeps 2.5D channels."""
    from training.augment import random_contrast, randomise_label_intensity

    vol = np.zeros((2, 30, 30), np.float32)
    vol[:, 2:28, 2:28] = 0.45
    vol[:, 5:10, 5:10] = 0.85  # vessel
    vol[:, 15:25, 15:25] = 0.85  # tumour
    lab = np.zeros(vol.shape, np.uint8)
    lab[:, 15:25, 15:25] = 1
    rng = np.random.default_rng(3)
    gaps = []
    for _ in range(20):
        curved = random_contrast(vol, rng).astype(np.float32)
        out = randomise_label_intensity(curved, lab, rng, heterogeneity=0.0, value_range=(0.05, 1.0))
        assert np.array_equal(out[lab == 0], curved[lab == 0])
        assert 0.05 - 1e-4 <= np.median(out[lab == 1]) <= 1.0 + 1e-4
        gaps.append(abs(float(np.median(out[lab == 1])) - float(out[0, 7, 7])))
    assert max(gaps) > 0.2  # no longer tied to the vessel
    stacked = randomise_label_intensity(np.stack([vol[0]] * 3), lab[0], rng)  # (C, y, x) slab, 2D labels
    assert stacked.shape == (3, 30, 30) and not np.allclose(stacked[:, 20, 20], 0.85)
    assert np.array_equal(randomise_label_intensity(vol, np.zeros_like(lab), rng), vol)


def test_patch_sampler_randomises_contrast_of_the_configured_share_of_patches():
    from training.segmentation import PatchSampler, TrainConfig

    img = np.zeros((4, 16, 16), np.float32)
    img[:, 4:12, 4:12] = np.linspace(0.1, 1.4, 64).reshape(8, 8)
    lab = np.zeros(img.shape, np.uint8)
    lab[1:3, 6:9, 6:9] = 1

    def changed(p):
        cfg = TrainConfig(network={}, patch_size_zyx=[4, 16, 16], batch_size=40, random_contrast_probability=p,
                          oversample_vs=0.0, oversample_cochlea=0.0)
        x, y = PatchSampler([(img, lab)], cfg, np.random.default_rng(0)).batch()
        assert (y[:, 0] == 1).sum() == 40 * 2 * 3 * 3  # labels are never touched
        return sum(not np.allclose(xi[0].numpy(), img, atol=1e-2) for xi in x)

    assert changed(0.0) == 0 and changed(1.0) == 40 and 5 < changed(0.5) < 35



def test_patch_sampler_per_array_contrast_probability_overrides_the_config():
    """Self-training's ``real_random_contrast_probability``: the real crops (here the second array, marked by a
    constant image) keep their grey levels while the fakes are randomised as configured."""
    from training.segmentation import PatchSampler, TrainConfig

    fake = np.zeros((4, 16, 16), np.float32)
    fake[:, 4:12, 4:12] = np.linspace(0.1, 1.4, 64).reshape(8, 8)
    real = fake.copy()
    real[0, 0, 0] = 0.5  # tells the arrays apart in the batch
    lab = np.zeros(fake.shape, np.uint8)
    cfg = TrainConfig(network={}, patch_size_zyx=[4, 16, 16], batch_size=60, random_contrast_probability=0.2,
                      oversample_vs=0.0, oversample_cochlea=0.0)
    x, _ = PatchSampler([(fake, lab), (real, lab)], cfg, np.random.default_rng(1), [1.0, 0.0]).batch()
    x = x[:, 0].numpy()
    is_real = np.array([np.allclose(xi, real, atol=1e-2) for xi in x])  # a real crop, never randomised
    assert 15 < is_real.sum() < 45  # about half the draws: real crops were never randomised
    assert not any(np.allclose(xi, fake, atol=1e-2) for xi in x[~is_real])  # the fakes always were
    with pytest.raises(ValueError, match="2 contrast probabilities for 1 arrays"):
        PatchSampler([(fake, lab)], cfg, np.random.default_rng(0), [1.0, 0.0])

def test_patch_sampler_lists_the_foreground_of_a_repeated_array_once():
    """Self-training repeats the pseudo-labelled crops hundreds of times (``pseudo_fraction`` near 1): the sampler
    shares one foreground list per distinct array instead of one per repetition (memory grew past 20 GB)."""
    from training.segmentation import PatchSampler, TrainConfig

    img = np.zeros((4, 16, 16), np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[1:3, 6:9, 6:9] = 1
    other = lab.copy()
    arrays = [(img, other)] + [(img, lab)] * 500
    sampler = PatchSampler(arrays, TrainConfig(network={}, patch_size_zyx=[4, 16, 16]), np.random.default_rng(0))
    assert len(sampler.fg) == 501 and len({id(f) for f in sampler.fg}) == 2
    assert len(sampler.fg[1][1]) == 2 * 3 * 3 and len(sampler.fg[0][2]) == 0


def test_spatial_augmentation_rotates_image_and_labels_together_without_shear():
    """A bright bar along x (non-square 2D patch, and a 3D slab) rotated by ±90° lies along y, with its label
    on the same voxels; a zoom > 1 shrinks it; the ignore value survives; p = 0 changes nothing."""
    from training.augment import augment_spatial

    h, w = 40, 60
    img = torch.zeros(4, 1, h, w)
    img[:, :, 18:22, 10:50] = 1.0
    lab = torch.zeros(4, 1, h, w, dtype=torch.int64)
    lab[:, :, 18:22, 10:50] = 1
    lab[:, :, 0:2, 0:2] = 255
    g = torch.Generator().manual_seed(0)
    x, y = augment_spatial(img, lab, g, p=0.0)
    assert x is img and y is lab
    x, y = augment_spatial(img, lab, g, p=1.0, rotation_degrees=90.0, scale_range=(1.0, 1.0))
    assert set(torch.unique(y).tolist()) <= {0, 1, 255}
    assert torch.equal((x > 0.5), (y == 1))  # the labels moved with the image
    # Every sample turned by some angle in ±90°; the bar keeps its length in pixels (no shear from h != w).
    for xi in x[:, 0]:
        assert 30 < int((xi > 0.5).sum()) < 200
    g = torch.Generator().manual_seed(1)
    turned = None
    for _ in range(50):  # find a near-90° draw: the bar then runs along y
        x, y = augment_spatial(img[:1], lab[:1], g, p=1.0, rotation_degrees=90.0, scale_range=(1.0, 1.0))
        rows, cols = torch.nonzero(y[0, 0] == 1, as_tuple=True)
        if len(rows) and (rows.max() - rows.min()) > 35 and (cols.max() - cols.min()) < 8:
            turned = y
            break
    assert turned is not None
    g = torch.Generator().manual_seed(2)
    x, y = augment_spatial(img, lab, g, p=1.0, rotation_degrees=0.0, scale_range=(1.6, 1.6))
    assert int((y == 1).sum()) < 0.5 * int((lab == 1).sum())
    vol = img[:, :, None].repeat(1, 1, 3, 1, 1)  # (B, C, Z, Y, X)
    vlab = lab[:, :, None].repeat(1, 1, 3, 1, 1)
    x, y = augment_spatial(vol, vlab, torch.Generator().manual_seed(0), p=1.0, rotation_degrees=45.0)
    assert x.shape == vol.shape and torch.equal(y[:, :, 0], y[:, :, 2])  # z untouched: every slice the same


def test_training_applies_spatial_augmentation_only_when_configured(tmp_path, monkeypatch):
    """Off by default (batches reach the network as drawn); with ``spatial_probability`` 1 every batch of a
    short CPU run is rotated/zoomed before the network sees it, and training finishes."""
    from training import segmentation
    from training.segmentation import TrainConfig, train_network

    calls = []
    original = segmentation.augment_spatial

    def spy(x, y, g, p, *args):
        out = original(x, y, g, p, *args)
        calls.append((p, not torch.equal(out[0], x)))
        return out

    monkeypatch.setattr(segmentation, "augment_spatial", spy)
    for p in (None, 1.0):
        kw = {} if p is None else {"spatial_probability": p}
        cfg = TrainConfig(network=TINY_NET2, patch_size_zyx=[24, 24], iterations=3, optimizer="adamw", threads=1, **kw)
        sd = train_network(_tiny_arrays(), cfg, tmp_path / str(p), "net", progress=False)
        assert sd
    assert [c for c in calls if c[0] == 0.0] == [(0.0, False)] * 3
    assert [c for c in calls if c[0] == 1.0] == [(1.0, True)] * 3


def _ears_8mm_from_grid_centre(prob, volume, grid):
    """Stand-in for ears_from_probabilities: both ears found, 8 mm either side of the grid centre."""
    centre = grid.index_to_lps(((np.array(grid.shape_zyx[::-1]) - 1) / 2)[None])[0]
    return EarLocations({"left": centre + [8.0, 0, 0], "right": centre - [8.0, 0, 0]}, centre, np.array([1.0, 0, 0]))


def test_localiser_pseudo_labels_keep_only_scans_with_both_ears_found(method_a_run, uda_data, monkeypatch):
    """Self-training of the localiser: a real hrT2 scan is pseudo-labelled only when the localiser found both
    ears itself; the target puts the inner-ear balls where it found them."""
    from VSCochleaSegLib.errors import InputError
    from training import pipeline

    out, _, _ = method_a_run
    run = pipeline.Run(uda_data, out, tiny_config(), FakeBackend(fail=True), progress=False)
    net = pipeline._load_net(run.cfg["localiser"]["train"]["network"], out / "localiser" / "localiser.safetensors")
    outcomes = iter(["both", "mirrored"])

    def found(prob, volume, grid):
        ears = _ears_8mm_from_grid_centre(prob, volume, grid)
        if next(outcomes) == "mirrored":
            ears.mirrored["right"] = True
        return ears

    monkeypatch.setattr(pipeline, "ears_from_probabilities", found)
    pseudo, info = pipeline.localiser_pseudo_targets(run, net)
    assert info == {"pseudo_labelled_scans": 1, "no_ear_found": 0, "one_ear_only": 1}
    volume, target = pseudo[0]
    assert target.shape == volume.shape
    ball = np.argwhere(target == 2)
    assert len(ball) > 0
    middle = (np.array(target.shape) - 1) / 2
    assert np.all(np.abs(ball - middle).max(0) <= [2, 4, 4])  # 4 mm voxels: balls 8 mm either side of the centre

    def nothing(prob, volume, grid):
        raise InputError("no ear")

    monkeypatch.setattr(pipeline, "ears_from_probabilities", nothing)
    assert pipeline.localiser_pseudo_targets(run, net) == ([], {"pseudo_labelled_scans": 0, "no_ear_found": 2,
                                                                "one_ear_only": 0})


def test_localiser_stage_fine_tunes_on_pseudo_labelled_real_hrt2(method_a_run, uda_data, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    from training import pipeline

    out, _, _ = method_a_run
    for stage in ("prepare", "translate_localiser"):
        os.symlink(out / stage, tmp_path / stage)
    cfg = tiny_config()
    cfg["localiser"]["self_training"] = {"iterations": 3}

    monkeypatch.setattr(pipeline, "ears_from_probabilities", _ears_8mm_from_grid_centre)
    run = pipeline.Run(uda_data, tmp_path, cfg, FakeBackend(fail=True), progress=False)
    done = run.stage("localiser", lambda d: pipeline.stage_localiser(run, d))
    assert done["info"]["pseudo_labelled_scans"] == 2
    assert "localiser.self_training" in done["config"]
    d = tmp_path / "localiser"
    assert (d / "localiser_self_trained_log.csv").exists()
    first = torch.load(d / "localiser_checkpoint.pt", weights_only=True)["net"]
    shipped = load_file(str(d / "localiser.safetensors"))
    assert any(not torch.equal(first[k], v) for k, v in shipped.items() if k in first)


def test_without_a_localiser_translator_the_localiser_learns_from_random_contrast_copies(method_a_run, uda_data,
                                                                                         tmp_path):
    from training import pipeline

    out, _, _ = method_a_run
    os.symlink(out / "prepare", tmp_path / "prepare")
    cfg = tiny_config()
    cfg["translation"]["localiser"] = None
    cfg["localiser"]["random_contrast_copies"] = 0
    run = pipeline.Run(uda_data, tmp_path, cfg, FakeBackend(fail=True), progress=False)  # no translator trains
    done = run.stage("translate_localiser", lambda d: pipeline.stage_translate_localiser(run, d))
    assert done["info"]["skipped"] and not list((tmp_path / "translate_localiser" / "fake").iterdir())
    with pytest.raises(ValueError, match="random_contrast_copies"):
        pipeline.stage_localiser(run, tmp_path / "localiser")
    cfg["localiser"]["random_contrast_copies"] = 2
    run = pipeline.Run(uda_data, tmp_path, cfg, FakeBackend(fail=True), progress=False)
    done = run.stage("localiser", lambda d: pipeline.stage_localiser(run, d))
    assert (tmp_path / "localiser" / "localiser.safetensors").exists()
    cfg["translation"]["crops_init_from_localiser"] = True
    with pytest.raises(ValueError, match="translation.localiser is null"):
        pipeline.stage_translate_crops(run, tmp_path / "translate_crops")


def test_a_stage_run_before_an_optional_setting_existed_is_still_accepted():
    from training.pipeline import stage_fingerprint

    cfg = tiny_config()
    assert "localiser.random_contrast_copies" not in stage_fingerprint(cfg, "localiser")
    cfg["localiser"]["random_contrast_copies"] = 2
    assert stage_fingerprint(cfg, "localiser")["localiser.random_contrast_copies"] == 2


def test_configs_name_every_stage_setting_and_parse(tmp_path):
    from training.pipeline import load_config, model_spec
    from training.translation import TranslationConfig

    for name in ("phantom-cpu", "crossmoda"):
        for variant in (None, "method_b"):
            cfg = load_config(name, variant)
            for scale in ("localiser", "crops"):
                if cfg["translation"][scale] is not None:  # phantom-cpu has no 2 mm translator
                    TranslationConfig.from_dict(cfg["translation"][scale])
            members = [{"name": m["name"], "train": m["train"], "weight": 1.0} for m in cfg["members"]]
            assert model_spec(cfg, members, cfg["fusion"], {"hrT2_labels_used": False}).segmentation.fusion == cfg["fusion"]
    with pytest.raises(KeyError):
        load_config("phantom-cpu", "no_such_variant")


# ------------------------------------------------------------------------------------------ benchmark

def test_no_adaptation_trains_only_the_first_members_it_is_asked_for(method_a_run, uda_data, tmp_path):
    from training import benchmark, pipeline

    out, _, _ = method_a_run
    cfg = tiny_config()
    run_a = pipeline.Run(uda_data, out, cfg, FakeBackend(fail=True), progress=False)
    cfg["benchmark"]["no_adaptation_members"] = 1
    model, _ = benchmark.train_no_adaptation(run_a, tmp_path / "one", cfg, progress=False)
    spec = json.loads((model / "model.json").read_text(encoding="utf-8"))
    assert [m["name"] for m in spec["segmentation"]["members"]] == [cfg["members"][0]["name"]]
    assert not (tmp_path / "one" / f"{cfg['members'][1]['name']}.safetensors").exists()
    cfg["benchmark"]["no_adaptation_members"] = None  # unset: every member
    model, _ = benchmark.train_no_adaptation(run_a, tmp_path / "all", cfg, progress=False)
    spec = json.loads((model / "model.json").read_text(encoding="utf-8"))
    assert [m["name"] for m in spec["segmentation"]["members"]] == [m["name"] for m in cfg["members"]]
    cfg["benchmark"]["no_adaptation_members"] = 0
    with pytest.raises(ValueError, match="no_adaptation_members"):
        benchmark.train_no_adaptation(run_a, tmp_path / "none", cfg, progress=False)


def test_benchmark_scores_every_variant_and_writes_json_table_and_plot(tmp_path, monkeypatch):
    from training import benchmark, pipeline

    monkeypatch.setattr(pipeline, "localise_ears", _ears_at_fixed_offsets)
    cfg = tiny_config()
    cfg["data"]["folds"] = 1
    cfg["benchmark"].update({"n_source": 2, "n_target": 2, "n_test": 1, "acquisition": SMALL_ACQUISITION})
    result = benchmark.run_benchmark(tmp_path / "docs", tmp_path / "work", cfg, backend=FakeBackend(), progress=False)
    written = json.loads((tmp_path / "docs" / "phantom_uda.json").read_text(encoding="utf-8"))
    assert set(written["variants"]) == set(benchmark.VARIANTS) == set(result["variants"])
    for scores in written["variants"].values():
        assert {"VS_Dice", "VS_ASSD", "Cochlea_Dice", "Cochlea_ASSD", "n_test", "train_minutes"} <= set(scores)
        assert scores["n_test"] == 1
    assert "| full_pipeline |" in (tmp_path / "docs" / "phantom_uda.md").read_text(encoding="utf-8")
    assert (tmp_path / "docs" / "phantom_uda.png").read_bytes()[:4] == b"\x89PNG"
    model = json.loads((tmp_path / "work" / "model" / "model.json").read_text(encoding="utf-8"))
    assert model["provenance"]["hrT2_labels_used"] is False and "full_pipeline" in model["provenance"]["benchmark"]
    runs = tmp_path / "work" / "runs"  # phantom-cpu: the oracle finds ears with method a's localiser
    assert cfg["benchmark"]["oracle_shares_localiser"] is True
    assert (runs / "oracle" / "localiser.safetensors").read_bytes() == \
        (runs / "method_a" / "localiser" / "localiser.safetensors").read_bytes()
    # phantom-cpu: method b trains on method a's fake hrT2 (same folder), and its minutes count them once
    assert (runs / "method_b" / "translate_crops").resolve() == (runs / "method_a" / "translate_crops").resolve()
    stage_minutes = {s: json.loads((runs / "method_a" / s / "done.json").read_text(encoding="utf-8"))["minutes"]
                     for s in cfg["benchmark"]["shared_with_method_b"]}
    own_b = json.loads((runs / "method_b" / "self_train" / "done.json").read_text(encoding="utf-8"))["minutes"]
    assert written["variants"]["method_b"]["train_minutes"] == round(sum(stage_minutes.values()) + own_b, 1)
    assert "Session-by-session analysis" in (tmp_path / "docs" / "phantom_uda.md").read_text(encoding="utf-8")
    test_ids = {p.name for p in (tmp_path / "work" / "data" / "test").iterdir()}
    train_ids = {p.name for p in (tmp_path / "work" / "data" / "uda").iterdir()}
    assert not test_ids & train_ids


def test_fake_vs_appearance_measures_the_tumour_and_the_csf_share_of_its_ring():
    """A 0.4 tumour whose 3-voxel ring is CSF-bright (1.0) on one side and tissue (0.3) elsewhere."""
    from training.experiments.fake_vs_appearance import ring_stats

    image = np.full((3, 40, 40), 0.3, np.float32)
    vs = np.zeros(image.shape, bool)
    vs[:, 15:25, 15:25] = True
    image[vs] = 0.4
    image[:, :, :15] = 1.0  # bright CSF left of the tumour
    s = ring_stats(image, vs)
    ring = 16 * 16 - 10 * 10  # per slice: the 16 × 16 dilated square minus the tumour
    bright = 3 * 16  # the 3 columns left of the tumour, 16 rows each
    assert s["vs_median"] == pytest.approx(0.4) and s["ring_median"] == pytest.approx(0.3)
    assert s["ring_bright_share"] == pytest.approx(bright / ring)
    assert s["vs_over_ring"] == pytest.approx(0.4 / 0.3) and s["vs_voxels"] == 300


def test_pseudo_label_quality_counts_tumour_taught_as_background_and_kinds_of_crops():
    from training.experiments.pseudo_label_quality import crop_quality, summarise
    from training.segmentation import IGNORE

    true_vs = np.zeros((2, 10, 10), bool)
    true_vs[:, 2:6, 2:6] = True  # 32 voxels
    pseudo = np.zeros((2, 10, 10), np.uint8)
    pseudo[:, 3:5, 3:5] = 1  # 8 voxels inside the tumour
    pseudo[:, 2, 2:6] = IGNORE  # 8 tumour voxels without loss
    pseudo[:, 8, 8] = 1  # 2 false voxels
    row = crop_quality(pseudo, true_vs)
    assert row == {"true_vs": 32, "pseudo_vs": 10, "vs_dice": round(16 / 42, 3), "true_vs_as_background": 16,
                   "true_vs_ignored": 8, "false_vs": 2, "kind": "found"}
    missed = crop_quality(np.zeros_like(pseudo), true_vs)
    free = crop_quality(np.zeros_like(pseudo), np.zeros_like(true_vs))
    summary = summarise([row, missed, free])
    assert summary["kinds"] == {"found": 1, "missed": 1, "false": 0, "free": 1}
    assert summary["true_vs_share_background"] == round(48 / 64, 3) and summary["true_vs_share_ignored"] == 0.125
    assert free["vs_dice"] is None and missed["kind"] == "missed"


def test_self_training_can_draw_source_tumours_into_the_tumour_free_real_ears(method_a_run, uda_data, tmp_path,
                                                                                monkeypatch):
    from training import pipeline, synthetic_tumours
    from VSCochleaSegLib.labels import VS

    out, _, _ = method_a_run
    for stage in ("prepare", "translate_localiser", "localiser", "target_crops", "translate_crops", "segment",
                  "pseudo_labels"):
        os.symlink(out / stage, tmp_path / stage)
    cfg = tiny_config()
    cfg["self_training"] = {"mode": "pseudo_labels", "warm_start": True, "train": {"iterations": 1},
                            "synthetic_tumours": {"copies_per_free_crop": 2, "min_vs_voxels": 1,
                                                  "max_distance_to_cochlea_mm": 100.0}}
    run = pipeline.Run(uda_data, tmp_path, cfg, FakeBackend(fail=True), progress=False)
    host = pipeline._target_crops(run)[0][1]
    free = (host, np.zeros(host.shape, np.uint8))  # a real hrT2 ear the pseudo-labels call tumour-free
    monkeypatch.setattr(pipeline, "_pseudo_arrays", lambda folder: [free])
    drawn, trained = [], []
    real_draw = synthetic_tumours.synthetic_tumour_crops
    monkeypatch.setattr(pipeline, "synthetic_tumour_crops",
                        lambda *a, **k: drawn.extend(real_draw(*a, **k)) or list(drawn))
    real_train = pipeline.train_network
    monkeypatch.setattr(pipeline, "train_network",
                        lambda arrays, *a, **k: trained.append(arrays) or real_train(arrays, *a, **k))
    run.stage("self_train", lambda d: pipeline.stage_self_train(run, d))
    assert len(drawn) == 2 and all((lab == VS).any() for _, lab in drawn)
    for arrays in trained:  # every member sees the host and both drawn copies
        ids = {id(img) for img, _ in arrays}
        assert id(free[0]) in ids and all(id(img) in ids for img, _ in drawn)


def test_self_training_can_spare_the_real_crops_the_random_contrast(method_a_run, uda_data, tmp_path, monkeypatch):
    """``self_training.real_random_contrast_probability``: the pseudo-labelled real crops get their own
    probability (here none), the fake hrT2 crops keep the members' ``random_contrast_probability``."""
    from training import pipeline

    out, _, _ = method_a_run
    for stage in ("prepare", "translate_localiser", "localiser", "target_crops", "translate_crops", "segment",
                  "pseudo_labels"):
        os.symlink(out / stage, tmp_path / stage)
    cfg = tiny_config()
    cfg["self_training"] = {"mode": "pseudo_labels", "pseudo_fraction": 0.5, "real_random_contrast_probability": 0.0,
                            "train": {"iterations": 1, "random_contrast_probability": 0.4}}
    run = pipeline.Run(uda_data, tmp_path, cfg, FakeBackend(fail=True), progress=False)
    host = pipeline._target_crops(run)[0][1]
    real = (host, np.zeros(host.shape, np.uint8))
    monkeypatch.setattr(pipeline, "_pseudo_arrays", lambda folder: [real])
    seen = []
    real_train = pipeline.train_network
    monkeypatch.setattr(pipeline, "train_network", lambda arrays, *a, **k: seen.append(
        (arrays, k["contrast_probability"])) or real_train(arrays, *a, **k))
    run.stage("self_train", lambda d: pipeline.stage_self_train(run, d))
    assert seen
    for arrays, contrast in seen:
        assert len(contrast) == len(arrays)
        is_real = [lab is real[1] for _, lab in arrays]
        assert 0 < sum(is_real) < len(arrays)
        assert all(p == (0.0 if r else 0.4) for p, r in zip(contrast, is_real))


def test_translation_target_scans_limit_the_translators_and_checks_not_the_pseudo_labels(method_a_run, uda_data,
                                                                                          tmp_path):
    from training import pipeline

    out, _, _ = method_a_run
    for stage in ("prepare", "translate_localiser", "localiser", "target_crops"):
        os.symlink(out / stage, tmp_path / stage)
    cfg = tiny_config()
    cfg["data"]["translation_target_scans"] = 1
    backend = FakeBackend()
    seen = []
    train = backend.train
    backend.train = lambda s, lab, t, *a, **k: seen.append(len(t)) or train(s, lab, t, *a, **k)
    run = pipeline.Run(uda_data, tmp_path, cfg, backend, progress=False)
    assert [c for c, *_ in pipeline._target_localiser_volumes(run)] == ["tgt_0", "tgt_1"]
    assert [c for c, *_ in pipeline._target_localiser_volumes(run, translation=True)] == ["tgt_0"]
    every, first = pipeline._target_crops(run), pipeline._target_crops(run, translation=True)
    assert {c for c, _ in first} == {"tgt_0"} and len(first) == 2 and len(every) == 4
    # The crop translator learns from the first scan's two crops only.
    (tmp_path / "translate_crops").mkdir()
    pipeline.stage_translate_crops(run, tmp_path / "translate_crops")
    assert seen == [2]
    # Part of every stage's fingerprint from the 2 mm translation on; unset, old runs keep theirs.
    assert pipeline.stage_fingerprint(cfg, "translate_localiser")["data.translation_target_scans"] == 1
    assert "data.translation_target_scans" not in pipeline.stage_fingerprint(tiny_config(), "self_train")
    cfg["data"]["translation_target_scans"] = -1
    with pytest.raises(ValueError, match="translation_target_scans"):
        pipeline._target_crops(pipeline.Run(uda_data, tmp_path / "neg", cfg, backend, progress=False), translation=True)
