"""Translation losses against values computed by hand: LSGAN, k-space cycle consistency, PatchNCE."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds training/

from training.translation.losses import (  # noqa: E402
    cycle_loss, image_l1, kspace_l1, lsgan_loss, patch_nce_loss, segmentation_loss,
)

MODES = ("complex", "magnitude")


# ----------------------------------------------------------------------------------------- LSGAN


@pytest.mark.parametrize("score, as_real, expected", [(0.5, True, 0.25), (0.5, False, 0.25), (1.0, True, 0.0),
                                                      (1.0, False, 1.0), (0.0, True, 1.0), (0.0, False, 0.0),
                                                      (-1.0, True, 4.0)])
def test_lsgan_on_constant_scores_is_the_squared_distance_to_the_label(score, as_real, expected):
    assert float(lsgan_loss(torch.full((2, 1, 6, 6), score), as_real)) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------- k-space cycle


@pytest.mark.parametrize("mode", MODES)
def test_kspace_loss_is_zero_for_identical_images(mode):
    x = torch.rand(2, 1, 8, 12)
    assert float(kspace_l1(x, x.clone(), mode)) == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_kspace_loss_is_positive_for_different_images(mode):
    x = torch.rand(2, 1, 8, 12)
    assert float(kspace_l1(x, x * 0.9, mode)) > 0.0


@pytest.mark.parametrize("mode", MODES)
def test_kspace_loss_of_an_impulse_is_its_height_over_root_n(mode):
    # The orthonormal FFT of an impulse of height a on N pixels is a/√N at every frequency.
    empty = torch.zeros(1, 1, 4, 4)
    impulse = empty.clone()
    impulse[0, 0, 1, 2] = 3.0
    assert float(kspace_l1(impulse, empty, mode)) == pytest.approx(3.0 / 4.0)


def test_kspace_loss_of_a_uniform_offset_is_the_offset_over_root_n():
    # A constant c has only a DC coefficient c·√N: the mean over N coefficients is c/√N (image L1: c).
    a, b = torch.zeros(1, 1, 4, 4), torch.full((1, 1, 4, 4), 0.5)
    assert float(kspace_l1(a, b)) == pytest.approx(0.5 / 4.0)
    assert float(image_l1(a, b)) == pytest.approx(0.5)


def test_kspace_loss_in_3d_uses_all_three_spatial_axes():
    empty = torch.zeros(1, 1, 2, 4, 8)
    impulse = empty.clone()
    impulse[0, 0, 1, 1, 1] = 1.0
    assert float(kspace_l1(impulse, empty)) == pytest.approx(1.0 / 8.0)


def test_magnitude_kspace_is_blind_to_a_circular_shift_but_complex_kspace_is_not():
    x = torch.rand(1, 1, 8, 8)
    shifted = torch.roll(x, shifts=(2, 3), dims=(2, 3))
    assert float(kspace_l1(shifted, x, "magnitude")) == pytest.approx(0.0, abs=1e-5)
    assert float(kspace_l1(shifted, x, "complex")) > 0.1


def test_cycle_loss_is_image_l1_plus_kspace_l1():
    a, b = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    assert float(cycle_loss(a, b)) == pytest.approx(float(image_l1(a, b) + kspace_l1(a, b)))
    assert float(cycle_loss(a, b, kspace="none")) == pytest.approx(float(image_l1(a, b)))


def test_kspace_loss_runs_in_float32_under_bf16_autocast():
    a, b = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kspace_l1(a.bfloat16(), b.bfloat16())
    assert loss.dtype == torch.float32


# ----------------------------------------------------------------------------------------- PatchNCE


def one_hot_features(n: int, channels: int) -> torch.Tensor:
    """N orthonormal unit features (B=1, N, C): feature i is the i-th basis vector."""
    return torch.eye(n, channels)[None]


@pytest.mark.parametrize("temperature", [0.07, 1.0])
def test_patch_nce_of_identical_orthonormal_features_is_log_one_plus_negatives(temperature):
    # Row i of the similarity matrix: 1/τ for the positive, 0 for the N−1 negatives, so
    # −log(e^{1/τ} / (e^{1/τ} + N−1)) = log(1 + (N−1)·e^{−1/τ}).
    n = 16
    feats = one_hot_features(n, 32)
    expected = math.log(1 + (n - 1) * math.exp(-1 / temperature))
    # float32 log-sum-exp around 1/τ ≈ 14 leaves ~1e-6 absolute error on a ~1e-5 loss
    assert float(patch_nce_loss(feats, feats, temperature)) == pytest.approx(expected, rel=1e-4, abs=2e-6)


def test_patch_nce_of_shuffled_orthonormal_features_is_one_over_tau_plus_log_normaliser():
    # Keys permuted with no fixed point: the positive now scores 0 and one negative scores 1/τ, so
    # −log(e^0 / (e^{1/τ} + N−1)) = log(e^{1/τ} + N − 1).
    n, tau = 16, 0.07
    feats = one_hot_features(n, 32)
    shuffled = torch.roll(feats, 1, dims=1)
    expected = math.log(math.exp(1 / tau) + n - 1)
    assert float(patch_nce_loss(feats, shuffled, tau)) == pytest.approx(expected, rel=1e-4)


def test_patch_nce_is_lower_for_matching_than_for_shuffled_random_features():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(2, 64, 16), dim=-1)
    k = F.normalize(q + 0.3 * torch.randn_like(q), dim=-1)  # noisy copies: positives most similar
    perm = torch.randperm(64)
    assert float(patch_nce_loss(q, k)) < float(patch_nce_loss(q, k[:, perm]))


def test_patch_nce_negatives_come_from_the_same_image_only():
    # Image 1's features equal image 0's: with negatives drawn across the batch, each query would meet a
    # second perfect match; per image it does not, so the loss equals the single-image value.
    feats = one_hot_features(8, 8)
    both = torch.cat([feats, feats])
    assert float(patch_nce_loss(both, both, 1.0)) == pytest.approx(float(patch_nce_loss(feats, feats, 1.0)))


def test_patch_nce_sends_no_gradient_to_the_keys():
    q = F.normalize(torch.randn(1, 8, 4), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(1, 8, 4), dim=-1).requires_grad_()
    patch_nce_loss(q, k).backward()
    assert q.grad is not None and k.grad is None


# ----------------------------------------------------------------------------------------- segmentation


def test_segmentation_loss_is_near_zero_for_confident_correct_logits_and_high_for_wrong_ones():
    labels = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    labels[0, 0, 2:5, 2:5] = 1
    labels[0, 0, 6, 6] = 2
    right = F.one_hot(labels[:, 0], 3).permute(0, 3, 1, 2).float() * 50
    wrong = F.one_hot((labels[:, 0] + 1) % 3, 3).permute(0, 3, 1, 2).float() * 50
    assert float(segmentation_loss(right, labels)) < 0.01
    assert float(segmentation_loss(wrong, labels)) > 1.0


def test_a_cycle_weight_of_zero_ignores_that_region_in_image_and_kspace():
    a = torch.rand(2, 1, 8, 8)
    b = a.clone()
    b[:, :, 2:4, 3:6] += 0.7  # the two images differ only in this block
    weight = torch.ones(2, 1, 8, 8)
    assert float(cycle_loss(a, b, weight=weight)) == pytest.approx(float(cycle_loss(a, b)))
    weight[:, :, 2:4, 3:6] = 0.0
    assert float(cycle_loss(a, b, weight=weight)) == pytest.approx(0.0, abs=1e-6)
    weight[:, :, 2:4, 3:6] = 0.5  # half the weight, half of both terms (both are linear in the difference)
    assert float(cycle_loss(a, b, weight=weight)) == pytest.approx(0.5 * float(cycle_loss(a, b)), rel=1e-5)
