"""Losses of the translation stage, each a plain function of tensors.

- :func:`lsgan_loss`: least-squares GAN (Mao et al. 2017), as in CycleGAN: mean (D(x) - 1)² for "real"
  and mean D(x)² for "fake".
- :func:`cycle_loss` = :func:`image_l1` + :func:`kspace_l1`: CycleGAN's cycle consistency (Zhu et al.
  2017) in image space, plus method a's "cycle-consistency in k-space". The paper does not say whether
  magnitude or complex k-space is compared; we compare the complex spectra (``mode="complex"``, the
  default): the mean modulus of the difference of orthonormal FFTs, ``mean |F(x̂) − F(x)|``. That is
  the literal k-space of an MR image (phase included). Relative to the image-space L1 it weighs errors
  confined to a few voxels (an eroded cochlear turn, a shifted tumour edge) up and smooth global errors
  down: on an N-voxel image a single-voxel error e scores |e|/√N (image L1: |e|/N) while a uniform
  offset c scores |c|/√N (image L1: |c|); white noise scores about the same in both.
  ``mode="magnitude"`` compares ``||F(x̂)| − |F(x)||`` instead, which is blind to shifts (a translated
  copy scores 0).
- :func:`segmentation_loss`: Dice + cross-entropy (MONAI ``DiceCELoss``, batch Dice as nnU-Net).
- :func:`patch_nce_loss`: PatchNCE (Park et al. 2020, "Contrastive Learning for Unpaired Image-to-Image
  Translation"): for each query patch feature q_i of the output, the positive is the key k_i at the
  same position of the input, the negatives are the keys k_j (j ≠ i) at other positions of the same
  image; InfoNCE ``−log exp(q_i·k_i/τ) / Σ_j exp(q_i·k_j/τ)`` with τ = 0.07, keys detached.

All losses return float32 scalars whatever the autocast dtype of their inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss


def lsgan_loss(prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Mean squared distance of the discriminator's patch scores to 1 (real) or 0 (fake)."""
    prediction = prediction.float()
    target = torch.ones_like(prediction) if target_is_real else torch.zeros_like(prediction)
    return F.mse_loss(prediction, target)


def image_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(a.float(), b.float())


def kspace_l1(reconstruction: torch.Tensor, original: torch.Tensor, mode: str = "complex") -> torch.Tensor:
    """L1 distance in k-space over the spatial axes of (B, C, *spatial) images, orthonormal FFT.

    ``complex``: mean |F(r) − F(o)| (modulus of the complex difference); ``magnitude``: mean ||F(r)| − |F(o)||.
    """
    dims = tuple(range(2, reconstruction.dim()))
    with torch.autocast(reconstruction.device.type, enabled=False):  # no half-precision FFT on CPU
        fr = torch.fft.fftn(reconstruction.float(), dim=dims, norm="ortho")
        fo = torch.fft.fftn(original.float(), dim=dims, norm="ortho")
        if mode == "complex":
            return (fr - fo).abs().mean()
        if mode == "magnitude":
            return (fr.abs() - fo.abs()).abs().mean()
    raise ValueError(f"mode must be complex or magnitude, not {mode!r}")


def cycle_loss(reconstruction: torch.Tensor, original: torch.Tensor, kspace: str = "complex",
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Image-space L1 plus (unless ``kspace="none"``) k-space L1 between a cycle's reconstruction and its input.

    ``weight`` (broadcastable to the images, values in [0, 1]) multiplies both images before either term, so a
    region of weight 0 (e.g. the tumour, ``TranslationConfig.cycle_vs_weight``) does not count at all.
    """
    if weight is not None:
        reconstruction, original = reconstruction.float() * weight, original.float() * weight
    loss = image_l1(reconstruction, original)
    if kspace != "none":
        loss = loss + kspace_l1(reconstruction, original, kspace)
    return loss


_dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Dice + CE of logits (B, classes, *spatial) against integer labels (B, 1, *spatial)."""
    return _dice_ce(logits.float(), labels)


def patch_nce_loss(feat_q: torch.Tensor, feat_k: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """PatchNCE of L2-normalised features (B, N, C): positives share an index, negatives come from the
    other N − 1 positions of the same image. Returns the mean over the B·N queries.

    With orthonormal features and q = k the loss is ``log(1 + (N − 1)·exp(−1/τ))``: the positive's
    similarity is 1, each negative's 0.
    """
    b, n, _ = feat_q.shape
    logits = torch.bmm(feat_q.float(), feat_k.detach().float().transpose(1, 2)) / temperature  # (B, N, N)
    target = torch.arange(n, device=feat_q.device).expand(b, n)
    return F.cross_entropy(logits.reshape(b * n, n), target.reshape(-1))
