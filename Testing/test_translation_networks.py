"""Translation networks: generator and its encoder segmentation head, PatchGAN, PatchNCE projections."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds training/

from training.translation.networks import (  # noqa: E402
    PatchDiscriminator, PatchSampleMLP, UNetGenerator, plan_strides,
)


def test_generator_keeps_the_shape_and_outputs_the_min_max_range():
    net = UNetGenerator(dims=2, base_filters=4, levels=3)
    with torch.no_grad():
        out = net(torch.rand(2, 1, 32, 40) * 5 - 2)
    assert out.shape == (2, 1, 32, 40)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_generator_accepts_slices_that_are_not_multiples_of_its_stride():
    assert UNetGenerator(dims=2, base_filters=4)(torch.rand(1, 1, 30, 37)).shape == (1, 1, 30, 37)


def test_generator_has_three_down_samplings_with_doubling_filters():
    net = UNetGenerator(dims=2, base_filters=8, levels=3)
    features = net.encoder(torch.rand(1, 1, 32, 32))
    assert [tuple(f.shape[1:]) for f in features] == [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4)]


def test_segmentation_head_gives_three_class_logits_at_input_resolution():
    net = UNetGenerator(dims=2, base_filters=4, seg_classes=3)
    assert net.segment(torch.rand(2, 1, 24, 32)).shape == (2, 3, 24, 32)


def test_segmentation_head_trains_the_encoder_but_not_the_image_decoder():
    net = UNetGenerator(dims=2, base_filters=4, seg_classes=3)
    net.segment(torch.rand(1, 1, 16, 16)).sum().backward()
    assert net.encoder.stages[0][0][0].weight.grad is not None
    assert all(p.grad is None for p in net.decoder.parameters())


def test_encode_returns_the_input_and_every_encoder_stage():
    net = UNetGenerator(dims=2, base_filters=4)
    feats = net.encode(torch.rand(1, 1, 16, 16), (0, 1, 2, 3, 4))
    assert [f.shape[1] for f in feats] == net.feature_channels == [1, 4, 8, 16, 32]


def test_3d_generator_and_discriminator_work_on_a_thin_patch():
    size = (8, 32, 32)
    gen = UNetGenerator(dims=3, base_filters=2, seg_classes=3, strides=plan_strides(size, 3))
    disc = PatchDiscriminator(dims=3, filters=2, n_layers=2, strides=plan_strides(size, 2))
    x = torch.rand(1, 1, *size)
    assert gen(x).shape == (1, 1, *size)
    assert gen.segment(x).shape == (1, 3, *size)
    assert disc(x).shape[:2] == (1, 1) and min(disc(x).shape[2:]) >= 1


def test_stride_plan_stops_halving_an_axis_that_would_fall_below_the_minimum():
    assert plan_strides((16, 64, 64), 3, min_size=4) == [(2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert plan_strides((112, 128), 3) == [(2, 2)] * 3


def test_patchgan_with_three_layers_sees_70_by_70_pixels():
    disc = PatchDiscriminator(dims=2, filters=2, n_layers=3)
    # Instance norm couples every output to the whole image through its statistics; the convolutions'
    # receptive field is what "70×70 PatchGAN" names, so measure it without the norms.
    for i, layer in enumerate(disc.model):
        if isinstance(layer, torch.nn.InstanceNorm2d):
            disc.model[i] = torch.nn.Identity()
    x = torch.rand(1, 1, 140, 140, requires_grad=True)
    out = disc(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    rows = torch.nonzero(x.grad[0, 0].abs().sum(1)).flatten()
    cols = torch.nonzero(x.grad[0, 0].abs().sum(0)).flatten()
    assert int(rows[-1] - rows[0]) + 1 == 70 and int(cols[-1] - cols[0]) + 1 == 70


def test_patch_sampler_reuses_positions_and_returns_unit_vectors():
    mlp = PatchSampleMLP([1, 4], dim=8)
    feats = [torch.rand(2, 1, 8, 8), torch.rand(2, 4, 4, 4)]
    g = torch.Generator().manual_seed(0)
    out, ids = mlp(feats, 10, generator=g)
    again, same_ids = mlp(feats, 10, ids)
    assert [o.shape for o in out] == [(2, 10, 8), (2, 10, 8)]  # the 4×4 layer has 16 ≥ 10 positions
    assert all(torch.equal(a, b) for a, b in zip(ids, same_ids))
    assert torch.allclose(out[0], again[0])
    assert torch.allclose(out[1].norm(dim=-1), torch.ones(2, 10))


def test_patch_sampler_takes_every_position_of_a_small_layer():
    out, ids = PatchSampleMLP([3], dim=4)([torch.rand(1, 3, 2, 3)], 256, generator=torch.Generator().manual_seed(0))
    assert out[0].shape == (1, 6, 4) and sorted(ids[0].tolist()) == list(range(6))


def test_scale_gradient_keeps_values_and_scales_only_the_gradient():
    from training.translation.models import scale_gradient

    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = scale_gradient(x, 0.05)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(x.grad, 0.05 * torch.tensor([1.0, 2.0, 3.0]))


def test_seg_grad_scale_outside_zero_one_is_refused():
    from training.translation.config import TranslationConfig

    with pytest.raises(ValueError, match="seg_grad_scale"):
        TranslationConfig(seg_grad_scale=1.5)
