"""Run one network over a volume: device choice, MONAI sliding windows, mirroring TTA, bf16 autocast.

``predict_softmax`` turns a normalised (z, y, x) volume into class probabilities (C, z, y, x) with
MONAI's sliding-window inferer and Gaussian blending (3D members) or MONAI's ``SliceInferer`` over axial
slices (2D members). The caller's ``cancel()`` is polled before every window batch, so a Cancel stops
within one window. Always under ``torch.inference_mode`` (without it, memory grows past 16 GB on
whole volumes).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from monai.inferers import SliceInferer, sliding_window_inference

from .errors import Cancelled

log = logging.getLogger(__name__)

CancelFn = Optional[Callable[[], bool]]
ProgressFn = Optional[Callable[[float], None]]


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX-bf16 or AVX512-bf16, where bf16 autocast is ~2.5× faster than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" → CUDA if available, else CPU. Asking for CUDA without a GPU is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from .errors import VSCochleaSegError

        raise VSCochleaSegError("--device cuda was requested but PyTorch sees no CUDA GPU; use --device cpu or auto.")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


@dataclass(frozen=True)
class InferenceSettings:
    """How to run networks. ``overlap``: sliding-window overlap fraction; ``mirror_axes``: network axes
    (0=z, 1=y, 2=x of the volume) to mirror for test-time augmentation; ``precision``: "auto" uses bf16
    on CPUs with fast bf16 and fp16 on CUDA, "fp32" never autocasts. ``sw_batch_size``: 3D windows per
    batch; ``slice_batch_size``: axial slices per batch for 2D networks."""

    overlap: float = 0.5
    mirror_axes: tuple = ()
    precision: str = "auto"
    sw_batch_size: int = 1
    slice_batch_size: int = 8

    def autocast(self, device: torch.device):
        if self.precision == "fp32":
            return torch.autocast(device.type, enabled=False)
        if device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_fast_bf16())
        return torch.autocast("cuda", dtype=torch.float16)


class _Guarded(torch.nn.Module):
    """Wraps a network so each window batch first checks ``cancel`` and reports progress."""

    def __init__(self, net: torch.nn.Module, cancel: CancelFn, tick: Callable[[], None]):
        super().__init__()
        self.net, self.cancel, self.tick = net, cancel, tick

    def forward(self, x):
        if self.cancel is not None and self.cancel():
            raise Cancelled("Cancelled by the user; nothing was written.")
        out = self.net(x)
        self.tick()
        return out.float()


def _window_count(shape: tuple, roi: tuple, overlap: float) -> int:
    n = 1
    for s, r in zip(shape, roi):
        if s <= r:
            continue
        step = max(int(r * (1 - overlap)), 1)
        n *= int(np.ceil((s - r) / step)) + 1
    return n


def neighbour_slices(z, channels: int, n_slices: int) -> np.ndarray:
    """Indices of the axial slices a 2.5D network with ``channels`` = 2k + 1 inputs reads for slice(s) ``z`` (int
    or array): z − k … z + k along a new last axis, lowest first, clipped to [0, n_slices − 1] so the first and
    last slices repeat beyond the volume. The one rule for inference (:func:`slice_context`) and training."""
    k = channels // 2
    return np.clip(np.asarray(z)[..., None] + np.arange(-k, k + 1), 0, n_slices - 1)


def slice_context(x: torch.Tensor, channels: int) -> torch.Tensor:
    """2.5D input: (B, 1, z, y, x) → (B, channels, z, y, x), channel j holding the j-th of
    :func:`neighbour_slices` of every slice. ``channels`` 1 returns ``x`` itself."""
    if channels == 1:
        return x
    idx = torch.from_numpy(neighbour_slices(np.arange(x.shape[2]), channels, x.shape[2])).to(x.device)
    return x[:, 0, idx].movedim(2, 1).contiguous()  # (B, z, channels, y, x) → (B, channels, z, y, x)


def predict_softmax(
    net: torch.nn.Module,
    volume_zyx: np.ndarray,
    patch_size_zyx: tuple,
    device: torch.device,
    settings: InferenceSettings = InferenceSettings(),
    cancel: CancelFn = None,
    progress: ProgressFn = None,
) -> np.ndarray:
    """Class probabilities (C, z, y, x) float32 for a normalised volume (z, y, x).

    ``patch_size_zyx`` has 3 entries for a 3D network or 2 (y, x) for a 2D network run slice by slice; a 2D
    network with ``in_channels`` 2k + 1 (MONAI DynUNet's attribute) sees each slice with its k neighbours on
    either side (:func:`slice_context`).
    """
    dims = len(patch_size_zyx)
    channels = int(getattr(net, "in_channels", 1))
    flips = [()] + [(a,) for a in settings.mirror_axes]
    if dims == 3:
        total = _window_count(volume_zyx.shape, patch_size_zyx, settings.overlap) * len(flips)
    else:
        total = volume_zyx.shape[0] * _window_count(volume_zyx.shape[1:], patch_size_zyx, settings.overlap) * len(flips)
    done = [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(min(done[0] / max(total, 1), 1.0))

    guarded = _Guarded(net, cancel, tick)
    x = torch.from_numpy(np.ascontiguousarray(volume_zyx, dtype=np.float32))[None, None].to(device)
    acc = None
    with torch.inference_mode(), settings.autocast(device):
        for flip in flips:
            xi = torch.flip(x, [a + 2 for a in flip]) if flip else x
            if dims == 3:
                logits = sliding_window_inference(
                    xi, tuple(patch_size_zyx), settings.sw_batch_size, guarded,
                    overlap=settings.overlap, mode="gaussian", padding_mode="constant", cval=0.0,
                )
            else:
                inferer = SliceInferer(
                    roi_size=tuple(patch_size_zyx), sw_batch_size=settings.slice_batch_size, spatial_dim=0,
                    overlap=settings.overlap, mode="gaussian", padding_mode="constant", cval=0.0, progress=False,
                )
                logits = inferer(slice_context(xi, channels), guarded)
            prob = torch.softmax(logits.float(), dim=1)
            if flip:
                prob = torch.flip(prob, [a + 2 for a in flip])
            acc = prob if acc is None else acc + prob
    out = (acc / len(flips))[0].cpu().numpy().astype(np.float32)
    return out


def release_device_memory(device: torch.device) -> None:
    """Return cached GPU memory to the driver after a run (the Slicer module calls this)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
