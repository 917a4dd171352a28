"""Training the translators end to end on tiny volumes: every model runs, its translator behaves, runs resume.

The data are made here: 16×32×32 "ceT1" volumes with a bright tumour block and a small cochlea, and
"hrT2" volumes with different contrast. A few iterations with a few filters; nothing is expected to be
learnt, only the mechanics.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds training/

from training.translation import TranslationConfig, Translator, train_translation  # noqa: E402
from training.translation.data import DomainSampler  # noqa: E402
from training.translation.train import CHECKPOINT  # noqa: E402

SHAPE = (16, 32, 32)


def make_volumes(seed: int, n: int = 2):
    rng = np.random.default_rng(seed)
    cet1, labels, hrt2 = [], [], []
    for _ in range(n):
        lab = np.zeros(SHAPE, np.uint8)
        z, y, x = rng.integers(3, 6), rng.integers(6, 12), rng.integers(6, 12)
        lab[z:z + 6, y:y + 8, x:x + 8] = 1
        lab[7:9, 22:25, 20:23] = 2
        img = 0.3 + 0.05 * rng.standard_normal(SHAPE)
        img[lab == 1], img[lab == 2] = 1.2, 0.1  # tumour enhances, cochlea dark on ceT1
        cet1.append(np.clip(img, 0, 1.5).astype(np.float32))
        labels.append(lab)
        t2 = 0.2 + 0.05 * rng.standard_normal(SHAPE)
        t2[lab == 2] = 1.4  # fluid-filled cochlea bright on hrT2
        hrt2.append(np.clip(t2, 0, 1.5).astype(np.float32))
    return cet1, labels, hrt2


@pytest.fixture(scope="module")
def data():
    return make_volumes(0)


def tiny_config(model: str, dims: int = 2, **overrides) -> TranslationConfig:
    base = dict(model=model, dims=dims, image_size=(32, 32) if dims == 2 else SHAPE, iterations=3, batch_size=2,
                base_filters=4, disc_filters=4, disc_layers=2, seg_warmup_iterations=1, pretrain_iterations=1,
                nce_patches=16, nce_dim=16, log_every=1, threads=2, save_at=[1])
    base.update(overrides)
    return TranslationConfig(**base)


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """One finished tiny run per model (module-scoped: each is trained once)."""
    # The 3D run is pinned to fp32: once in ~50 fresh-clone runs its 4-filter bf16 3D convolutions on a 16×32×32
    # volume gave a NaN discriminator loss at iteration 2 (session 15); the 2D runs keep the bf16 (auto) path.
    cet1, labels, hrt2 = data
    runs = {}
    for key, model, dims, extra in [("cyclegan_seg", "cyclegan_seg", 2, {}), ("cut", "cut", 2, {}),
                                    ("cutseg", "cutseg", 2, {}),
                                    ("cyclegan_seg_3d", "cyclegan_seg", 3, {"precision": "fp32"}),
                                    ("cyclegan_seg_slab", "cyclegan_seg", 2, {"slab_slices": 3})]:
        out = tmp_path_factory.mktemp(key)
        runs[key] = (out, train_translation(cet1, labels, hrt2, tiny_config(model, dims, **extra), out, progress=False))
    return runs


RUNS = ["cyclegan_seg", "cut", "cutseg", "cyclegan_seg_3d", "cyclegan_seg_slab"]


@pytest.mark.parametrize("run", RUNS)
def test_every_model_trains_with_finite_losses_logged_each_iteration(trained, run):
    rows = read_log(trained[run][0])
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(v)) for r in rows for k, v in r.items())


@pytest.mark.parametrize("run", RUNS)
def test_translation_keeps_the_shape_and_lands_in_the_target_range(trained, data, run):
    translator = trained[run][1]
    cet1, _, hrt2 = data
    fake = translator.translate_volume(cet1[0])
    lo, hi = translator.meta["target_range"]
    assert fake.shape == SHAPE and fake.dtype == np.float32
    assert lo - 1e-6 <= fake.min() and fake.max() <= hi + 1e-6
    assert lo == pytest.approx(np.median([v.min() for v in hrt2])) and hi == pytest.approx(np.median([v.max() for v in hrt2]))


@pytest.mark.parametrize("run", RUNS)
def test_snapshots_are_the_save_at_iterations_and_the_last(trained, run):
    assert trained[run][1].snapshots == [1, 3]


def test_snapshots_translate_differently(trained, data):
    translator = trained["cyclegan_seg"][1]
    first, last = (translator.translate_volume(data[0][0], s) for s in translator.snapshots)
    assert not np.allclose(first, last)


def test_unknown_snapshot_is_refused(trained, data):
    with pytest.raises(KeyError):
        trained["cut"][1].translate_volume(data[0][0], snapshot=2)


@pytest.mark.parametrize("run", ["cyclegan_seg", "cutseg", "cyclegan_seg_3d", "cyclegan_seg_slab"])
def test_built_in_segmenter_labels_a_real_target_volume(trained, data, run):
    labels = trained[run][1].segment_volume(data[2][0])
    assert labels.shape == SHAPE and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}


def test_plain_cut_has_no_segmenter(trained, data):
    assert trained["cut"][1].segment_volume(data[2][0]) is None


def test_segmenter_handles_slices_that_are_not_multiples_of_its_stride(trained, data):
    odd = data[2][0][:, :30, :27]
    assert trained["cutseg"][1].segment_volume(odd).shape == odd.shape
    assert trained["cutseg"][1].translate_volume(odd).shape == odd.shape


def test_fake_target_segmentation_loss_starts_after_the_warm_up(trained):
    rows = read_log(trained["cyclegan_seg"][0])  # seg_warmup_iterations = 1: iteration 1 is warm-up
    assert float(rows[0]["seg_fake_B"]) == 0.0 and float(rows[1]["seg_fake_B"]) > 0.0
    assert all(float(r["seg_real_A"]) > 0.0 for r in rows)


def test_cutseg_segmentation_joins_after_cut_pretraining(trained):
    rows = read_log(trained["cutseg"][0])  # pretrain_iterations = 1
    assert float(rows[0]["seg"]) == 0.0 and float(rows[1]["seg"]) > 0.0


@pytest.mark.parametrize("run", ["cyclegan_seg", "cutseg", "cyclegan_seg_slab"])
def test_saved_translator_reloads_and_translates_identically(trained, data, run, tmp_path):
    out_dir, translator = trained[run]
    again = Translator.load(out_dir)
    assert again.snapshots == translator.snapshots
    assert np.array_equal(again.translate_volume(data[0][1]), translator.translate_volume(data[0][1]))
    assert np.array_equal(again.segment_volume(data[2][1]), translator.segment_volume(data[2][1]))
    copy = Translator.load(translator.save(tmp_path / "copy"))
    assert np.array_equal(copy.translate_volume(data[0][1], 1), translator.translate_volume(data[0][1], 1))


def test_finished_run_is_loaded_not_retrained(trained, data):
    out_dir, translator = trained["cut"]
    stamp = (out_dir / CHECKPOINT).stat().st_mtime_ns
    again = train_translation(*data, tiny_config("cut"), out_dir, progress=False)
    assert (out_dir / CHECKPOINT).stat().st_mtime_ns == stamp
    assert again.snapshots == translator.snapshots


def test_resumed_run_continues_from_its_checkpoint_and_matches_an_uninterrupted_one(data, tmp_path):
    cfg = tiny_config("cyclegan_seg", iterations=4, save_at=[2], precision="fp32")
    straight = train_translation(*data, cfg, tmp_path / "straight", progress=False)

    resumed_dir = tmp_path / "resumed"
    first_half = tiny_config("cyclegan_seg", iterations=2, save_at=[2], precision="fp32")
    train_translation(*data, first_half, resumed_dir, progress=False)
    assert torch.load(resumed_dir / CHECKPOINT, weights_only=True)["iteration"] == 2
    resumed = train_translation(*data, cfg, resumed_dir, progress=False)

    assert [int(r["iteration"]) for r in read_log(resumed_dir)] == [1, 2, 3, 4]
    assert torch.load(resumed_dir / CHECKPOINT, weights_only=True)["iteration"] == 4
    assert resumed.snapshots == straight.snapshots == [2, 4]
    for it in (2, 4):
        assert np.allclose(resumed.translate_volume(data[0][0], it), straight.translate_volume(data[0][0], it), atol=1e-5)


def test_init_weights_starts_from_another_runs_networks(data, trained, tmp_path):
    source_dir, source = trained["cyclegan_seg"]
    # lr 0: Adam makes no step, so a fine-tuned run's generator must equal the run it started from.
    tuned = train_translation(*data, tiny_config("cyclegan_seg", lr=0.0, init_weights=str(source_dir)),
                              tmp_path / "tuned", progress=False)
    fresh = train_translation(*data, tiny_config("cyclegan_seg", lr=0.0, seed=5), tmp_path / "fresh", progress=False)
    x = data[0][0]
    assert np.allclose(tuned.translate_volume(x), source.translate_volume(x), atol=1e-5)
    assert not np.allclose(fresh.translate_volume(x), source.translate_volume(x), atol=1e-3)


def test_init_weights_of_a_missing_run_or_another_architecture_is_refused(data, trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="no translation checkpoint"):
        train_translation(*data, tiny_config("cyclegan_seg", init_weights=str(tmp_path / "nothing")),
                          tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="another architecture"):
        train_translation(*data, tiny_config("cyclegan_seg", base_filters=8, init_weights=str(trained["cyclegan_seg"][0])),
                          tmp_path / "b", progress=False)


def test_checkpoint_past_the_configured_iterations_is_refused(data, trained):
    with pytest.raises(ValueError, match="past"):
        train_translation(*data, tiny_config("cut", iterations=2), trained["cut"][0], progress=False)


def test_config_round_trips_through_json_and_rejects_unknown_keys(tmp_path):
    cfg = tiny_config("cutseg", dims=3)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert TranslationConfig.from_json(path) == cfg
    with pytest.raises(ValueError, match="unknown"):
        TranslationConfig.from_dict({"modle": "cut"})
    with pytest.raises(ValueError):
        TranslationConfig(model="cut", dims=3, image_size=(32, 32))


def test_slab_sampler_gives_each_slice_with_its_neighbours_and_the_centre_label():
    z = np.arange(SHAPE[0], dtype=np.float32)[:, None, None]
    volume = np.broadcast_to(z, SHAPE).copy()  # slice z holds the value z (min-max: z / 15)
    labels = (np.broadcast_to(z, SHAPE) % 3).astype(np.uint8)  # slice z labelled z mod 3
    sampler = DomainSampler([volume], (32, 32), np.random.default_rng(0), [labels], slab=3)
    images, labs = sampler.batch(6)
    assert images.shape == (6, 3, 32, 32) and labs.shape == (6, 1, 32, 32)
    centre = np.rint(images[:, 1, 0, 0].numpy() * 15).astype(int)
    for j in range(3):  # channel j is slice centre + j - 1, clipped to the volume
        expected = np.clip(centre + j - 1, 0, SHAPE[0] - 1) / 15
        assert np.allclose(images[:, j].numpy(), expected[:, None, None])
    assert np.array_equal(labs[:, 0, 0, 0].numpy(), centre % 3)


def test_slab_translator_reads_the_neighbouring_slices_and_a_plain_one_does_not(trained, data):
    volume = data[0][0]
    changed = volume.copy()
    changed[9] = np.flip(changed[9], 1)  # only slice 9 differs
    for run, neighbours_move in [("cyclegan_seg_slab", True), ("cyclegan_seg", False)]:
        translator = trained[run][1]
        before, after = translator.translate_volume(volume), translator.translate_volume(changed)
        moved = [not np.allclose(before[z], after[z], atol=1e-6) for z in range(SHAPE[0])]
        assert moved[9] and moved[8] == moved[10] == neighbours_move
        assert not any(moved[:8]) and not any(moved[11:])
    assert trained["cyclegan_seg_slab"][1].slab == 3 and trained["cyclegan_seg"][1].slab == 1


@pytest.mark.parametrize("bad", [dict(slab_slices=2), dict(slab_slices=0),
                                 dict(slab_slices=3, dims=3, image_size=SHAPE), dict(slab_slices=3, model="cutseg")])
def test_slab_settings_that_cannot_work_are_refused(bad):
    with pytest.raises(ValueError, match="slab_slices"):
        TranslationConfig(**{"model": "cyclegan_seg", "image_size": (32, 32), **bad})


def test_default_config_has_method_a_loss_weights():
    cfg = TranslationConfig()
    assert (cfg.weight_adv, cfg.weight_cycle, cfg.weight_identity, cfg.weight_seg) == (1.0, 10.0, 5.0, 100.0)
    assert cfg.lr == 1e-4 and cfg.betas == (0.5, 0.999) and cfg.levels == 3 and cfg.nce_temperature == 0.07


def test_seg_grad_scale_scales_the_fake_segmentation_gradient_into_the_ceT1_to_hrT2_generator():
    """Same weights, same batch: the fake-hrT2 segmentation loss sends ``seg_grad_scale`` times the published
    coupling's gradient into G_A, and none when detached (``seg_grad_to_generator`` false)."""
    from training.translation.losses import segmentation_loss
    from training.translation.models import build_model

    g = torch.Generator().manual_seed(0)
    real_a, real_b = torch.rand(2, 1, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g)
    labels = (torch.rand(2, 1, 32, 32, generator=g) > 0.7).long()

    def grads_into_g_a(**overrides):
        torch.manual_seed(1)
        model = build_model(tiny_config("cyclegan_seg", precision="fp32", **overrides), torch.device("cpu"),
                            torch.Generator().manual_seed(2))
        model.set_input(real_a, labels, real_b)
        model.forward(iteration=5)
        segmentation_loss(model.seg_fake_B, model.labels_A).backward()
        return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                          for p in model.G_A.parameters()])

    full = grads_into_g_a(seg_grad_to_generator=True)
    quarter = grads_into_g_a(seg_grad_to_generator=True, seg_grad_scale=0.25)
    detached = grads_into_g_a(seg_grad_to_generator=False)
    assert full.abs().sum() > 0
    assert torch.allclose(quarter, 0.25 * full, rtol=1e-4, atol=1e-7)
    assert detached.abs().sum() == 0


def test_vs_conditioned_translator_reads_the_mask_and_insists_on_it(data, tmp_path):
    """``condition_on_vs``: G_A reads (image, VS mask); the exported translator needs the mask, changes its output
    only where (and near where) the mask changes, and a plain translator refuses one."""
    cet1, labels, hrt2 = data
    translator = train_translation(cet1, labels, hrt2, tiny_config("cyclegan_seg", condition_on_vs=True), tmp_path / "c")
    assert translator.conditioned and translator.slab == 1
    reloaded = Translator.load(tmp_path / "c", device="cpu")
    assert reloaded.conditioned
    with pytest.raises(ValueError, match="vs_mask"):
        translator.translate_volume(cet1[0])
    with_vs = translator.translate_volume(cet1[0], vs_mask=labels[0] == 1)
    without_vs = translator.translate_volume(cet1[0], vs_mask=np.zeros(SHAPE, bool))
    assert with_vs.shape == SHAPE and np.isfinite(with_vs).all()
    differs = ~np.isclose(with_vs, without_vs, atol=1e-6)
    tumour_slices = np.unique(np.nonzero(labels[0] == 1)[0])
    assert differs[tumour_slices].any() and not differs[np.setdiff1d(np.arange(SHAPE[0]), tumour_slices)].any()
    assert np.allclose(reloaded.translate_volume(cet1[0], vs_mask=labels[0] == 1), with_vs, atol=1e-5)
    assert translator.segment_volume(hrt2[0]).shape == SHAPE  # G_B's head reads hrT2 alone
    plain = Translator.load(tmp_path / "c", device="cpu")
    plain.meta["generator"] = {**plain.meta["generator"], "in_channels": 1}
    with pytest.raises(ValueError, match="does not read a VS mask"):
        plain.translate_volume(cet1[0], vs_mask=labels[0] == 1)


@pytest.mark.parametrize("bad", [dict(model="cut"), dict(slab_slices=3)])
def test_vs_conditioning_that_cannot_work_is_refused(bad):
    with pytest.raises(ValueError, match="condition_on_vs"):
        TranslationConfig(**{"model": "cyclegan_seg", "image_size": (32, 32), "condition_on_vs": True, **bad})


def test_discriminators_can_learn_slower_than_generators():
    from training.translation.models import build_model

    for model_name in ("cyclegan_seg", "cut"):
        model = build_model(tiny_config(model_name, lr=2e-4, disc_lr=5e-5), torch.device("cpu"), torch.Generator().manual_seed(0))
        assert model.optimizers["G"].param_groups[0]["lr"] == 2e-4 and model.optimizers["D"].param_groups[0]["lr"] == 5e-5
        model.set_learning_rate(0.5)  # the decay scales both from their own base
        assert model.optimizers["D"].param_groups[0]["lr"] == 2.5e-5
    default = build_model(tiny_config("cyclegan_seg", lr=2e-4), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert default.optimizers["D"].param_groups[0]["lr"] == 2e-4
    with pytest.raises(ValueError, match="disc_lr"):
        TranslationConfig(disc_lr=0.0)


def test_the_tumour_can_be_left_out_of_the_source_cycle(data, tmp_path):
    """``cycle_vs_weight``: the ceT1 → hrT2 → ceT1 cycle weighs the source VS (grown by ``cycle_vs_margin``
    voxels in-plane) by that weight, the rest by 1; a run with it trains and logs; a weight outside [0, 1] or
    on CUT is refused."""
    from training.translation.models import build_model

    cet1, labels, hrt2 = data
    model = build_model(tiny_config("cyclegan_seg", cycle_vs_weight=0.0, cycle_vs_margin=1), torch.device("cpu"),
                        torch.Generator().manual_seed(0))
    lab = np.zeros((1, 1, 32, 32), np.int64)
    lab[0, 0, 10:14, 10:12] = 1  # VS
    lab[0, 0, 20, 20] = 2  # cochlea: weight 1
    model.labels_A = torch.from_numpy(lab)
    w = model._cycle_weight_A()[0, 0].numpy()
    grown = np.zeros((32, 32), bool)
    grown[9:15, 9:13] = True
    assert (w[grown] == 0).all() and (w[~grown] == 1).all()
    plain = build_model(tiny_config("cyclegan_seg"), torch.device("cpu"), torch.Generator().manual_seed(0))
    plain.labels_A = model.labels_A
    assert plain._cycle_weight_A() is None
    train_translation(cet1, labels, hrt2, tiny_config("cyclegan_seg", cycle_vs_weight=0.2), tmp_path / "w")
    assert len(read_log(tmp_path / "w")) == 3
    for bad in (dict(cycle_vs_weight=1.5), dict(cycle_vs_margin=-1), dict(model="cut", cycle_vs_weight=0.5)):
        with pytest.raises(ValueError, match="cycle_vs_weight"):
            TranslationConfig(**{"model": "cyclegan_seg", "image_size": (32, 32), **bad})
