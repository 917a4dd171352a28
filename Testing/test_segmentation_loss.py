"""Dice + cross-entropy with ignored voxels (uncertain pseudo-labels carry no training signal)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds training/

from training.segmentation import IGNORE, DiceCEWithIgnore  # noqa: E402


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 4, 6, 5, generator=g)
    target = torch.randint(0, 3, (2, 1, 4, 6, 5), generator=g)
    return logits, target


@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 2.0, 5.0])])
def test_without_ignored_voxels_it_is_monais_dice_ce(weights):
    logits, target = batch()
    expected = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, weight=weights)(logits, target)
    assert DiceCEWithIgnore(weights)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 2.0, 5.0])])
def test_ignored_voxels_count_in_neither_term(weights):
    logits, target = batch(1)
    target[:, :, :2] = IGNORE  # half the depth is uncertain
    kept_logits = logits[:, :, 2:].reshape(2, 3, -1)[..., None]  # the valid voxels only, as a (2, 3, N, 1) batch
    kept_target = target[:, :, 2:].reshape(2, 1, -1)[..., None]
    expected = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, weight=weights)(kept_logits, kept_target)
    assert DiceCEWithIgnore(weights)(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_predictions_on_ignored_voxels_get_no_gradient():
    logits, target = batch(2)
    target[0, 0, 0] = IGNORE
    logits.requires_grad_(True)
    DiceCEWithIgnore()(logits, target).backward()
    assert logits.grad[0, :, 0].abs().max().item() == 0.0
    assert logits.grad[0, :, 1].abs().max().item() > 0.0


def test_an_all_ignored_batch_gives_zero_loss_not_nan():
    logits, target = batch(3)
    target[:] = IGNORE
    loss = DiceCEWithIgnore()(logits, target)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-4)
