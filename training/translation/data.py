"""Training batches for translation: min-max normalised volumes, cut into random axial slices (2D) or
patches (3D), one domain per sampler.

Method a min-max normalises every volume to [0, 1] before translation; the volumes we receive are
already scaled by the engine's percentile normalisation ([0, 1.5]), so min-max only fixes the range the
sigmoid generator can produce. Arrays are (z, y, x); batches are tensors (B, 1, *image_size), or
(B, slab, y, x) images with the centre slice's (B, 1, y, x) labels for 2.5D (slab) translation.
"""

from __future__ import annotations

import numpy as np
import torch

from VSCochleaSegLib.inference import neighbour_slices


def minmax(volume: np.ndarray) -> np.ndarray:
    """``(v − min) / (max − min)`` as float32; a constant volume becomes zeros."""
    v = np.asarray(volume, dtype=np.float32)
    lo, hi = float(v.min()), float(v.max())
    return (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)


def crop(array: np.ndarray, lo, size, fill=0) -> np.ndarray:
    """``array[lo : lo + size]`` on every axis, padded with ``fill`` where the box leaves the array."""
    lo, size, shape = np.asarray(lo), np.asarray(size), np.asarray(array.shape)
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src_lo, src_hi = np.maximum(lo, 0), np.minimum(lo + size, shape)
    if np.any(src_hi <= src_lo):
        return out
    dst = tuple(slice(a - l, b - l) for a, b, l in zip(src_lo, src_hi, lo))
    out[dst] = array[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return out


class DomainSampler:
    """Random training patches from one domain's volumes (and labels, for the annotated source).

    ``image_size``: (y, x) → axial slices cut to that size; (z, y, x) → 3D patches. A share
    ``oversample_foreground`` of patches is centred (± a quarter patch) on a random labelled voxel, so
    segmentation heads see tumour and cochlea often enough; the rest are uniform. ``slab`` > 1 (2D only): each
    slice comes with its neighbours (:func:`~VSCochleaSegLib.inference.neighbour_slices`) as channels.
    """

    def __init__(self, volumes: list, image_size, rng: np.random.Generator, labels: list | None = None,
                 oversample_foreground: float = 0.0, slab: int = 1):
        if not volumes:
            raise ValueError("no volumes to sample from")
        self.volumes = [minmax(v) for v in volumes]
        self.labels = None if labels is None else [np.asarray(lab, dtype=np.uint8) for lab in labels]
        if self.labels is not None and [lab.shape for lab in self.labels] != [v.shape for v in self.volumes]:
            raise ValueError("every label map must have its image's shape")
        self.size = tuple(int(s) for s in image_size)
        self.slab = int(slab)
        if self.slab > 1 and len(self.size) != 2:
            raise ValueError("slab sampling needs a 2D image_size (y, x)")
        self.rng = rng
        self.oversample = oversample_foreground if self.labels is not None else 0.0
        self.foreground = None if self.labels is None else [np.argwhere(lab > 0) for lab in self.labels]

    def _one(self):
        k = int(self.rng.integers(len(self.volumes)))
        vol = self.volumes[k]
        lab = None if self.labels is None else self.labels[k]
        size = np.array(self.size)
        centre = None
        if self.oversample and self.rng.random() < self.oversample and len(self.foreground[k]):
            centre = self.foreground[k][self.rng.integers(len(self.foreground[k]))]
        if len(size) == 2:  # an axial slice, then a window in it
            z = int(centre[0]) if centre is not None else int(self.rng.integers(vol.shape[0]))
            vol, lab = vol[neighbour_slices(z, self.slab, vol.shape[0])], None if lab is None else lab[z]
            centre = None if centre is None else centre[1:]
        shape = np.array(vol.shape[-len(size):])
        if centre is None:
            lo = np.array([self.rng.integers(min(0, s - p), max(s - p, 0) + 1) for s, p in zip(shape, size)])
        else:
            lo = np.asarray(centre) - size // 2 + self.rng.integers(-(size // 4), size // 4 + 1)
        lead = vol.ndim - len(size)  # the slab axis of a 2.5D sample is kept whole
        image = crop(vol, np.concatenate([np.zeros(lead, int), lo]).astype(int), vol.shape[:lead] + tuple(size))
        return image, None if lab is None else crop(lab, lo, size)

    def batch(self, n: int):
        """(images (n, slab, *size) float32, labels (n, 1, *size) int64 or None); slab is 1 unless set."""
        pairs = [self._one() for _ in range(n)]
        images = torch.from_numpy(np.stack([p[0] for p in pairs]).reshape(n, -1, *self.size))
        if self.labels is None:
            return images, None
        return images, torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))[:, None]
