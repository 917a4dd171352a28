"""Fuse the ensemble members' class probabilities and measure how much the members agree.

``mean``: weighted softmax averaging (nnU-Net's ensembling). The agreement score per structure is the
mean pairwise Dice between members' arg-max masks (1 = identical); with a single member it falls back
to the mean probability of the predicted class inside the predicted structure.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from .labels import COCHLEA, VS


def fuse_mean(member_probs: list, weights: list) -> np.ndarray:
    """Weighted mean of (C, z, y, x) probability maps → (C, z, y, x)."""
    w = np.asarray(weights, np.float32) / np.float32(np.sum(weights))
    out = member_probs[0] * w[0]
    for p, wi in zip(member_probs[1:], w[1:]):
        out = out + p * wi
    return out


def agreement(member_probs: list, fused: np.ndarray) -> dict:
    """Per-structure agreement and the voxel count it was computed on: {"vs": (score, n), ...}."""
    result = {}
    fused_labels = fused.argmax(0)
    member_labels = [p.argmax(0) for p in member_probs]
    for name, label in (("vs", VS), ("cochlea", COCHLEA)):
        n = int((fused_labels == label).sum())
        if n == 0:
            result[name] = (None, 0)
        elif len(member_probs) == 1:
            result[name] = (float(fused[label][fused_labels == label].mean()), n)
        else:
            dices = []
            for a, b in combinations(member_labels, 2):
                ma, mb = a == label, b == label
                denom = ma.sum() + mb.sum()
                dices.append(1.0 if denom == 0 else 2.0 * float((ma & mb).sum()) / float(denom))
            result[name] = (float(np.mean(dices)), n)
    return result


def combine_agreement(per_crop: list) -> dict:
    """Voxel-weighted mean of per-crop agreement dicts → {"vs": score | None, "cochlea": ...}."""
    out = {}
    for name in ("vs", "cochlea"):
        pairs = [c[name] for c in per_crop if c[name][0] is not None]
        n = sum(p[1] for p in pairs)
        out[name] = None if n == 0 else sum(s * k for s, k in pairs) / n
    return out
