"""Build the MONAI DynUNet (nnU-Net-style U-Net, Isensee et al. 2021) a model folder describes.

One function so inference and training build identical networks from the same ``NetworkSpec``.
Deep-supervision heads exist only during training; ``inference_state_dict`` strips them for export.
"""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet

from .model_folder import NetworkSpec


def build_network(spec: NetworkSpec, deep_supervision: bool = False, deep_supr_num: int = 2) -> DynUNet:
    """DynUNet with instance norm and leaky ReLU, as in nnU-Net.

    Input (B, in_channels, *spatial) → logits (B, out_channels, *spatial); with ``deep_supervision`` in
    training mode the output stacks the full-resolution and ``deep_supr_num`` upsampled lower-level
    logits along dim 1: (B, 1 + deep_supr_num, out_channels, *spatial).
    """
    strides = [list(s) for s in spec.strides]
    return DynUNet(
        spatial_dims=spec.dims,
        in_channels=spec.in_channels,
        out_channels=spec.out_channels,
        kernel_size=[list(k) for k in spec.kernel_size],
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(spec.filters),
        norm_name=("instance", {"affine": True}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=deep_supervision,
        deep_supr_num=min(deep_supr_num, len(strides) - 2),
        res_block=spec.res_block,
    )


# DynUNet registers each block twice: once under its own name and once inside the recursive
# ``skip_layers`` chain. Both names share one tensor, so only the first is stored.
_ALIAS_PREFIX = "skip_layers."


def inference_state_dict(net: torch.nn.Module) -> dict:
    """Weights without deep-supervision heads or aliases, contiguous, on CPU, float32."""
    return {
        k: v.detach().to("cpu", torch.float32).contiguous().clone()
        for k, v in net.state_dict().items()
        if not k.startswith("deep_supervision_heads") and not k.startswith(_ALIAS_PREFIX)
    }


def load_inference_state_dict(net: torch.nn.Module, state_dict: dict) -> None:
    """Load weights saved by :func:`inference_state_dict`; any other difference raises RuntimeError."""
    missing, unexpected = net.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith(_ALIAS_PREFIX)]
    if missing or unexpected:
        raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {list(unexpected)[:5]}")


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
