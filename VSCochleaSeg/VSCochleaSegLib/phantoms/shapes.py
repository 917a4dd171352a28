"""Signed-distance functions (mm, negative inside) for the analytic shapes the phantom is built from.

All functions take coordinates ``p`` as an array of shape (3, ...) in the anatomical frame (mm, LPS-like:
x → patient left, y → posterior, z → superior) and return an array of shape (...) of float32.
The distances are exact for spheres, capsules and tori and first-order approximations for ellipsoids,
which is all the soft partial-volume edges need.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def _as_vec(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float32).reshape(3, *([1] * 0))


def _bcast(v: np.ndarray, ndim: int) -> np.ndarray:
    return np.asarray(v, dtype=np.float32).reshape((3,) + (1,) * ndim)


def ellipsoid(p: np.ndarray, centre, semi_axes, rotation: np.ndarray | None = None) -> np.ndarray:
    """Approximate SDF of an ellipsoid; ``rotation`` (3×3) maps ellipsoid axes to the frame."""
    q = p - _bcast(centre, p.ndim - 1)
    if rotation is not None:
        q = np.einsum("ji,j...->i...", np.asarray(rotation, np.float32), q)
    a = _bcast(semi_axes, p.ndim - 1)
    k0 = np.sqrt(np.sum((q / a) ** 2, axis=0))
    k1 = np.sqrt(np.sum((q / a**2) ** 2, axis=0))
    return (k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)).astype(np.float32)


def capsule(p: np.ndarray, a, b, radius: float) -> np.ndarray:
    """SDF of a capsule (segment a→b thickened by ``radius``)."""
    a_ = _bcast(a, p.ndim - 1)
    ab = np.asarray(b, np.float32) - np.asarray(a, np.float32)
    ap = p - a_
    t = np.clip(np.einsum("i,i...->...", ab, ap) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    closest = a_ + _bcast(ab, p.ndim - 1) * t[None]
    return (np.sqrt(np.sum((p - closest) ** 2, axis=0)) - radius).astype(np.float32)


def torus(p: np.ndarray, centre, normal, major_radius: float, minor_radius: float) -> np.ndarray:
    """SDF of a torus (ring of radius ``major_radius`` in the plane ⟂ ``normal``)."""
    n = np.asarray(normal, np.float32)
    n = n / np.linalg.norm(n)
    q = p - _bcast(centre, p.ndim - 1)
    h = np.einsum("i,i...->...", n, q)
    rho = np.sqrt(np.maximum(np.sum(q**2, axis=0) - h**2, 0.0))
    return (np.sqrt((rho - major_radius) ** 2 + h**2) - minor_radius).astype(np.float32)


def tube(p: np.ndarray, centreline: np.ndarray, radii: np.ndarray, k: int = 6) -> np.ndarray:
    """SDF of a tube of varying radius along a densely sampled centreline.

    centreline: (N, 3) points in mm, spaced well below the radius; radii: (N,) mm.
    Uses the ``k`` nearest centreline samples, which is exact enough when samples are dense.
    """
    shape = p.shape[1:]
    pts = p.reshape(3, -1).T
    tree = cKDTree(centreline)
    k = min(k, len(centreline))
    # Points farther than the thickest radius + 3 mm only need "outside": pruning them is the speed-up.
    bound = float(np.max(radii)) + 3.0
    dist, idx = tree.query(pts, k=k, distance_upper_bound=bound)
    if k == 1:
        dist, idx = dist[:, None], idx[:, None]
    valid = idx < len(centreline)
    r = np.where(valid, radii[np.minimum(idx, len(centreline) - 1)], 0.0)
    sdf = np.min(np.where(valid, dist - r, bound), axis=1)
    return sdf.reshape(shape).astype(np.float32)


def fraction_inside(sdf: np.ndarray, edge_mm: float) -> np.ndarray:
    """Partial-volume fraction in [0, 1] from an SDF: a linear ramp ``edge_mm`` wide across the surface."""
    return np.clip(0.5 - sdf / edge_mm, 0.0, 1.0).astype(np.float32)


def rotation_matrix(angles_rad) -> np.ndarray:
    """Rotation (3×3) from Euler angles (about x, then y, then z)."""
    ax, ay, az = angles_rad
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def frame_from_axis(axis) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Orthonormal (u, v, w) with u along ``axis``."""
    u = np.asarray(axis, float)
    u = u / np.linalg.norm(u)
    helper = np.array([0.0, 0.0, 1.0]) if abs(u[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    v = np.cross(u, helper)
    v /= np.linalg.norm(v)
    w = np.cross(u, v)
    return u, v, w
