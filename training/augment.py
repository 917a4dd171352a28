"""nnU-Net-like augmentation on batches (B, C, *spatial) in [0, ~1.5], in torch (C > 1: 2.5D slices).

``augment_intensity`` varies contrast, brightness, gamma, blur and noise, which is what scanner-to-scanner
differences in hrT2 look like. ``augment_spatial`` is nnU-Net's rotation and scaling, in-plane only (the crops'
y and x axes share one spacing; z is the coarse slice axis) and without mirroring (right ears are mirrored
onto left ones by the crop, so left-right is anatomy, not noise). ``random_contrast`` (NumPy, on volumes or
patches) is domain randomisation: the anatomy under a random intensity curve.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from VSCochleaSegLib.labels import VS


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, C, *spatial) (each channel alone) with replicate padding."""
    x = x.transpose(0, 1)  # channels as batch: (C, 1, *spatial)
    radius = max(int(round(2 * sigma)), 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    dims = x.dim() - 2
    conv = F.conv3d if dims == 3 else F.conv2d
    for axis in range(dims):
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = len(k)
        pad = [0, 0] * dims  # F.pad lists the last axis first
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = radius
        x = conv(F.pad(x, pad, mode="replicate"), k.view(shape))
    return x.transpose(0, 1)


def augment_spatial(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, p: float = 0.2,
                    rotation_degrees: float = 15.0, scale_range=(0.85, 1.25)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample in-plane rotation (uniform in ±``rotation_degrees``) and isotropic in-plane zoom (image size
    over content size: a factor in ``scale_range``, > 1 shrinks the anatomy), each with probability ``p``, about
    the patch centre. ``x`` (B, C, [Z,] Y, X) float, linear interpolation; ``y`` (B, 1, [Z,] Y, X) int64 labels,
    nearest neighbour (the ignore value survives). Outside the patch: image 0, label background. Rotation is
    in pixel units, so a non-square patch is rotated without shear. Returns new tensors; untouched samples are
    copied exactly."""
    if p <= 0:
        return x, y
    r = lambda: float(torch.rand(1, generator=g))  # noqa: E731
    b = x.shape[0]
    h, w = x.shape[-2], x.shape[-1]
    thetas, moved = [], []
    for _ in range(b):
        angle = np.deg2rad((2 * r() - 1) * rotation_degrees) if r() < p else 0.0
        zoom = scale_range[0] + (scale_range[1] - scale_range[0]) * r() if r() < p else 1.0
        moved.append(angle != 0.0 or zoom != 1.0)
        c, s = np.cos(angle), np.sin(angle)
        # Output -> input, in normalised coordinates (x, y): D^-1 R D * zoom with D = diag(w/2, h/2).
        a = np.array([[c, -s * h / w], [s * w / h, c]]) * zoom
        thetas.append(a)
    if not any(moved):
        return x, y
    theta2 = torch.tensor(np.stack(thetas), dtype=torch.float32)
    if x.dim() == 4:
        theta = torch.cat([theta2, torch.zeros(b, 2, 1)], 2)
    else:  # 3D: (x, y, z) order; z untouched
        theta = torch.zeros(b, 3, 4)
        theta[:, :2, :2] = theta2
        theta[:, 2, 2] = 1.0
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    xs = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ys = F.grid_sample(y.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False).round().to(y.dtype)
    keep = torch.tensor([not m for m in moved])
    xs[keep], ys[keep] = x[keep].float(), y[keep]
    return xs.to(x.dtype), ys


def augment_intensity(x: torch.Tensor, g: torch.Generator, p: float = 0.15) -> torch.Tensor:
    """Random per-sample augmentations, each applied with probability ``p`` (nnU-Net's default)."""
    out = []
    for xi in x:
        xi = xi[None]
        r = lambda: float(torch.rand(1, generator=g))  # noqa: E731
        if r() < p:
            xi = xi + torch.randn(xi.shape, generator=g) * (0.1 * r())
        if r() < p * 1.5:
            xi = _blur(xi, 0.5 + r())
        if r() < p:
            xi = xi * (0.75 + 0.5 * r())
        if r() < p:
            mean = xi.mean()
            xi = (xi - mean) * (0.75 + 0.5 * r()) + mean
        if r() < p:
            xi = xi.clamp(min=0) ** (0.7 + 0.8 * r())
        out.append(xi[0])
    return torch.stack(out)


def head_mask(volume_zyx: np.ndarray, threshold: float = 0.05) -> np.ndarray:
    """The head (z, y, x) of an engine-normalised volume: voxels above ``threshold``, holes filled per slice,
    grown by one voxel."""
    from scipy.ndimage import binary_dilation, binary_fill_holes

    mask = np.asarray(volume_zyx, np.float32) > threshold
    mask = np.stack([binary_fill_holes(s) for s in mask]) if mask.ndim == 3 else binary_fill_holes(mask)
    return binary_dilation(mask, iterations=1)


def random_contrast(volume_zyx: np.ndarray, rng: np.random.Generator, knots: int = 7) -> np.ndarray:
    """``volume`` (engine-normalised, (z, y, x) or (y, x)) through a random piecewise-linear intensity curve,
    as float16: domain randomisation, so a network keys on anatomy's shape rather than on one contrast (in
    the spirit of SynthSeg, Billot et al. 2023). Air stays 0; head voxels get random, possibly non-monotonic
    contrast. The curve's knots sit at random *quantiles* of the head's intensities (values uniform in
    [0, 1]), so each tissue gets its own chance of any brightness: with evenly spaced knots, tissues that are
    close in intensity (ceT1 CSF 0.12 and bone 0.06 on one linear segment from air's 0) keep their order and
    ratio, and CSF could never become the bright tissue it is on hrT2."""
    v = np.asarray(volume_zyx, np.float32)
    head = head_mask(v)
    values = v[head & (v > 0)]
    if values.size < knots:
        return np.where(head, v, 0.0).astype(np.float16)
    inner = np.quantile(values, np.sort(rng.uniform(0.0, 1.0, knots - 2)))
    xs = np.concatenate([[0.0], inner, [max(float(values.max()), 1.5)]])
    xs = np.maximum.accumulate(xs + np.arange(knots) * 1e-6)  # strictly increasing for np.interp
    ys = np.concatenate([[0.0], rng.uniform(0.0, 1.0, knots - 1)])
    return np.where(head, np.interp(v, xs, ys), 0.0).astype(np.float16)


def log_normal_texture(shape, rng: np.random.Generator, heterogeneity: float, sigma_voxels) -> np.ndarray:
    """``exp(heterogeneity · n)`` (float32, ``shape``), ``n`` a Gaussian random field smoothed by ``sigma_voxels``
    (scalar or per axis) and scaled to unit standard deviation: the patchy texture of a heterogeneous or partly
    cystic schwannoma, as a multiplicative field (median ≈ 1)."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_voxels)
    return np.exp(heterogeneity * field / max(float(field.std()), 1e-6))


def randomise_label_intensity(image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, label: int = VS,
                              value_range=(0.05, 1.0), heterogeneity: float = 0.3,
                              texture_sigma_voxels: float = 2.0) -> np.ndarray:
    """``image`` (spatial like ``labels``, or with one leading channel axis) with the ``label`` region given its
    own random intensity: its median becomes a value uniform in ``value_range`` (the range of
    :func:`random_contrast`'s knots), times :func:`log_normal_texture`. After a random
    intensity curve the tumour otherwise shares the fate of every tissue of its source intensity (ceT1: vessels
    and dura enhance like the VS); with this the network cannot key on the tumour's brightness relative to
    them, only on shape and context (SynthSeg's label-wise randomisation). Returns float32."""
    img = np.asarray(image, np.float32)
    mask = np.asarray(labels) == label
    if not mask.any():
        return img.copy()
    m = np.broadcast_to(mask, img.shape)
    median = float(np.median(img[m]))
    factor = np.float32(rng.uniform(*value_range) / max(median, 0.02))
    if heterogeneity > 0:
        factor = factor * log_normal_texture(mask.shape, rng, heterogeneity, texture_sigma_voxels)
    return np.where(m, img * factor, img).astype(np.float32)
