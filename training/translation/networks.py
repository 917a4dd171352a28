"""Networks of the translation stage: U-Net generator (with an optional segmentation head on its encoder),
PatchGAN discriminator and the PatchNCE projection heads, each in 2D or 3D.

- :class:`UNetGenerator`: a U-Net with ``levels`` down-samplings (3 in method a), instance norm, ReLU and
  a sigmoid output, since images are min-max normalised to [0, 1]. A second, lighter decoder on the same
  encoder features gives segmentation logits (method a's "segmentation decoder attached to the
  generator's encoder"): the encoder must then keep the anatomy it is asked to segment.
- :class:`PatchDiscriminator`: the PatchGAN of pix2pix/CycleGAN (Isola et al. 2017; Zhu et al. 2017);
  ``n_layers=3`` is the 70×70 receptive-field version; fewer layers suit small patches.
- :class:`PatchSampleMLP`: CUT's (Park et al. 2020) per-layer two-layer MLPs that project features at
  sampled positions to unit vectors for PatchNCE.

Shapes are (B, C, y, x) for ``dims=2`` and (B, C, z, y, x) for ``dims=3``. Strides may differ per axis
(see :func:`plan_strides`), so thin 3D patches are not down-sampled along z below a useful size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def plan_strides(size, n: int, min_size: int = 4) -> list[tuple[int, ...]]:
    """Per-level strides for ``n`` down-samplings of a patch of ``size`` (one entry per axis).

    An axis is halved at a level only while the result stays ≥ ``min_size``, as nnU-Net plans
    anisotropic patches; instance norm and 4×4 discriminator kernels need a few voxels left.
    """
    current = [int(s) for s in size]
    strides = []
    for _ in range(n):
        row = tuple(2 if c >= 2 * min_size else 1 for c in current)
        current = [c // s for c, s in zip(current, row)]
        strides.append(row)
    return strides


def _conv(dims: int):
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _instance_norm(dims: int, channels: int) -> nn.Module:
    # CycleGAN's instance norm: no affine parameters, no running statistics.
    return (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(channels)


def _conv_norm_relu(dims: int, cin: int, cout: int, stride=1) -> nn.Sequential:
    return nn.Sequential(
        _conv(dims)(cin, cout, 3, stride=stride, padding=1, padding_mode="reflect"),
        _instance_norm(dims, cout),
        nn.ReLU(inplace=True),
    )


def init_weights(net: nn.Module, std: float = 0.02) -> nn.Module:
    """CycleGAN/CUT initialisation: conv and linear weights ~ N(0, 0.02), biases 0."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


class UNetEncoder(nn.Module):
    """``len(filters)`` stages; stage 0 keeps the resolution, stage l down-samples by ``strides[l-1]``."""

    def __init__(self, dims: int, in_channels: int, filters: list[int], strides: list[tuple]):
        super().__init__()
        stages = [nn.Sequential(_conv_norm_relu(dims, in_channels, filters[0]), _conv_norm_relu(dims, filters[0], filters[0]))]
        for level in range(1, len(filters)):
            stages.append(nn.Sequential(
                _conv_norm_relu(dims, filters[level - 1], filters[level], stride=strides[level - 1]),
                _conv_norm_relu(dims, filters[level], filters[level]),
            ))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of every stage, full resolution first, bottleneck last."""
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class UNetDecoder(nn.Module):
    """Nearest up-sampling + skip concatenation + convolutions, back to stage 0, then a 1×1 output conv.

    Nearest up-sampling followed by a convolution avoids the checkerboard artefacts of transposed
    convolutions (Odena et al. 2016), which a discriminator would otherwise latch onto.
    """

    def __init__(self, dims: int, filters: list[int], out_channels: int, convs_per_level: int = 2):
        super().__init__()
        blocks = []
        for level in range(len(filters) - 1, 0, -1):
            layers = [_conv_norm_relu(dims, filters[level] + filters[level - 1], filters[level - 1])]
            layers += [_conv_norm_relu(dims, filters[level - 1], filters[level - 1]) for _ in range(convs_per_level - 1)]
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.head = _conv(dims)(filters[0], out_channels, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


class UNetGenerator(nn.Module):
    """U-Net image-to-image generator with an optional segmentation decoder on its encoder.

    Args:
        dims: 2 or 3.
        base_filters: channels at full resolution; level l has ``base_filters · 2^l`` (capped at ``max_filters``).
        levels: number of down-samplings (method a: 3).
        strides: one stride tuple per level (default 2 on every axis), see :func:`plan_strides`.
        seg_classes: > 0 adds a segmentation decoder giving that many logits per voxel.

    ``forward(x)``: (B, in_channels, *spatial) in [0, 1] → translated image (B, out_channels, *spatial) in [0, 1]
    (sigmoid); both channel counts are 1, or the slab's slices for 2.5D translation.
    """

    def __init__(self, dims: int = 2, in_channels: int = 1, out_channels: int = 1, base_filters: int = 32,
                 levels: int = 3, strides=None, seg_classes: int = 0, max_filters: int = 512):
        super().__init__()
        self.dims = dims
        self.in_channels = in_channels
        self.filters = [min(base_filters * 2**level, max_filters) for level in range(levels + 1)]
        strides = [tuple(s) for s in (strides or [(2,) * dims] * levels)]
        if len(strides) != levels:
            raise ValueError(f"{levels} levels need {levels} stride rows, got {len(strides)}")
        self.strides = strides
        self.encoder = UNetEncoder(dims, in_channels, self.filters, strides)
        self.decoder = UNetDecoder(dims, self.filters, out_channels)
        self.seg_decoder = UNetDecoder(dims, self.filters, seg_classes, convs_per_level=1) if seg_classes else None
        init_weights(self)

    @property
    def feature_channels(self) -> list[int]:
        """Channels of :meth:`encode`'s layers: 0 = the input image, 1.. = the encoder stages."""
        return [self.in_channels] + self.filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_image(self.encoder(x))

    def decode_image(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.sigmoid(self.decoder(features))

    def decode_segmentation(self, features: list[torch.Tensor]) -> torch.Tensor:
        if self.seg_decoder is None:
            raise RuntimeError("this generator was built without a segmentation head (seg_classes=0)")
        return self.seg_decoder(features)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits (B, seg_classes, *spatial) from the encoder's features of ``x``."""
        return self.decode_segmentation(self.encoder(x))

    def encode(self, x: torch.Tensor, layers) -> list[torch.Tensor]:
        """Features for PatchNCE: ``layers`` index [input, stage 0, ..., bottleneck]."""
        features = [x] + self.encoder(x)
        return [features[i] for i in layers]


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: (B, in_channels, *spatial) → a map of real/fake scores (B, 1, *spatial').

    4×4 convolutions, the first without norm, LeakyReLU 0.2, ``n_layers`` strided layers and two
    stride-1 layers; filters double per layer up to 8× ``filters``. ``n_layers=3`` gives the 70×70
    receptive field of CycleGAN. ``strides``: one tuple per strided layer (default 2 everywhere).
    """

    def __init__(self, dims: int = 2, in_channels: int = 1, filters: int = 64, n_layers: int = 3, strides=None):
        super().__init__()
        conv = _conv(dims)
        strides = [tuple(s) for s in (strides or [(2,) * dims] * n_layers)]
        layers = [conv(in_channels, filters, 4, stride=strides[0], padding=1), nn.LeakyReLU(0.2, inplace=True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [conv(filters * prev, filters * mult, 4, stride=strides[n], padding=1),
                       _instance_norm(dims, filters * mult), nn.LeakyReLU(0.2, inplace=True)]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [conv(filters * prev, filters * mult, 4, stride=1, padding=1),
                   _instance_norm(dims, filters * mult), nn.LeakyReLU(0.2, inplace=True),
                   conv(filters * mult, 1, 4, stride=1, padding=1)]
        self.model = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchSampleMLP(nn.Module):
    """CUT's feature projection: per layer, pick spatial positions and map their features through a
    two-layer MLP (Linear-ReLU-Linear) to L2-normalised ``dim``-vectors.

    ``forward(features, num_patches, patch_ids=None, generator=None)`` takes a list of (B, C_l, *spatial_l)
    tensors and returns ``([(B, N_l, dim)], patch_ids)``; passing the ids returned for one image's
    features samples the same positions in another's (query and key of PatchNCE).
    """

    def __init__(self, channels: list[int], dim: int = 256):
        super().__init__()
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(c, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim)) for c in channels)
        init_weights(self)

    def forward(self, features, num_patches: int, patch_ids=None, generator: torch.Generator | None = None):
        out, ids_out = [], []
        for k, (feat, mlp) in enumerate(zip(features, self.mlps)):
            flat = feat.flatten(2).transpose(1, 2)  # (B, positions, C)
            if patch_ids is None:
                ids = torch.randperm(flat.shape[1], generator=generator)[: min(num_patches, flat.shape[1])]
                ids = ids.to(flat.device)
            else:
                ids = patch_ids[k]
            projected = mlp(flat[:, ids])
            out.append(F.normalize(projected.float(), dim=-1))
            ids_out.append(ids)
        return out, ids_out
