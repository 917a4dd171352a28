"""Fuse the ensemble members' class probabilities and measure how much the members agree.

``mean``: weighted softmax averaging (nnU-Net's ensembling). ``cleanlab``: method b's sequential
noisy-label correction (see :func:`fuse_cleanlab`); the model folder's ``segmentation.fusion`` picks one
from ``FUSERS``. The agreement score per structure is the
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


# --------------------------------------------------------------------------------------------------
# "cleanlab" fusion (CrossMoDA 2021 method b): noisy-label correction by confident learning
# (Northcutt et al., JAIR 2021). The first member's arg-max labels are taken as noisy labels; each next
# member's softmax flags the voxels whose label is confidently wrong, and those voxels take that member's
# arg-max. Member order therefore matters; weights do not.
# --------------------------------------------------------------------------------------------------

def find_label_issues_confident_learning(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Boolean mask of label issues, as ``cleanlab.filter.find_label_issues(filter_by="confident_learning")``.

    labels: (N,) int given labels; probs: (N, C) another model's probabilities. Per-class threshold
    t_j = mean of probs[:, j] over the voxels labelled j (classes nobody labelled get t_j = inf, so no
    voxel is moved into a class the labels never use). A voxel is confidently of class j when
    probs[:, j] >= t_j; with several such classes the overall arg-max wins (cleanlab's tie rule).
    Issues are the voxels confidently of a class other than their label (off-diagonal of the
    confident joint).
    """
    labels = np.asarray(labels).reshape(-1)
    probs = np.asarray(probs, np.float32)
    n_classes = probs.shape[1]
    counts = np.bincount(labels, minlength=n_classes)[:n_classes]
    sums = np.zeros(n_classes, np.float64)
    for j in range(n_classes):  # per class: avoids an (N, C) fancy-index copy
        if counts[j]:
            sums[j] = probs[labels == j, j].sum(dtype=np.float64)
    thresholds = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    confident = probs >= (thresholds - 1e-6).astype(np.float32)
    n_confident = confident.sum(1)
    guess = np.where(n_confident > 1, probs.argmax(1), confident.argmax(1))
    return (n_confident > 0) & (guess != labels)


def _cleanlab_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """cleanlab's own implementation when installed (and every class is present, which it requires)."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return find_label_issues_confident_learning(labels, probs)
    if np.bincount(labels, minlength=probs.shape[1]).min() == 0:
        return find_label_issues_confident_learning(labels, probs)
    return np.asarray(find_label_issues(labels, probs, filter_by="confident_learning"), bool)


def fuse_cleanlab(member_probs: list, weights: list | None = None, use_cleanlab: bool = True) -> np.ndarray:
    """Fuse (C, z, y, x) probability maps by sequential noisy-label correction → (C, z, y, x) one-hot float32.

    Labels start as member 0's arg-max; for member k = 1, 2, ... the voxels flagged as label issues
    against member k's softmax are flipped to member k's arg-max. ``weights`` is accepted for a common
    signature with :func:`fuse_mean` and ignored. ``use_cleanlab=False`` forces the NumPy rule.
    """
    n_classes = member_probs[0].shape[0]
    labels = member_probs[0].argmax(0).reshape(-1)
    for probs in member_probs[1:]:
        flat = probs.reshape(n_classes, -1).T
        issues = (_cleanlab_issues if use_cleanlab else find_label_issues_confident_learning)(labels, flat)
        labels = np.where(issues, flat.argmax(1), labels)
    onehot = np.zeros((n_classes, labels.size), np.float32)
    onehot[labels, np.arange(labels.size)] = 1.0
    return onehot.reshape(member_probs[0].shape)


FUSERS = {"mean": fuse_mean, "cleanlab": fuse_cleanlab}
