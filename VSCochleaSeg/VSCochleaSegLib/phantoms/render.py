"""Render an :class:`Anatomy` on an image grid as tissue layers, then as a ceT1 or hrT2 image + labels.

Rendering happens in two steps so that one subject can be shown in both contrasts on the same grid:
``build_layers`` evaluates every structure's partial-volume fraction once (only inside each structure's
bounding box, in index space), and ``composite`` paints the layers with a contrast's tissue values, then
adds point-spread blur, a multiplicative bias field, Rician noise and a scanner intensity scale.
Labels (0 background, 1 VS, 2 cochlea) are the voxel centres inside the VS and cochlea surfaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import SIDES, Anatomy
from .shapes import capsule, ellipsoid, fraction_inside, torus, tube

# Mean tissue values (relative to CSF = 1 on hrT2) and the per-subject relative jitter applied to them.
# hrT2 (CISS/FIESTA): fluid bright, brain intermediate-dark, VS intermediate, bone/air/flow voids dark.
# ceT1 (MPRAGE + gadolinium): VS and vessels enhance, fluid dark, fat bright.
CONTRASTS = {
    "hrT2": dict(air=0.0, scalp=0.55, bone=0.03, csf=1.0, gm=0.36, wm=0.26, brainstem=0.27, fluid=0.95,
                 nerve=0.14, vessel=0.07, vs=0.42, cyst=0.85, mastoid=0.02, dura=0.2, skullbase=0.16),
    "ceT1": dict(air=0.0, scalp=0.95, bone=0.06, csf=0.12, gm=0.45, wm=0.62, brainstem=0.55, fluid=0.16,
                 nerve=0.5, vessel=0.85, vs=0.85, cyst=0.18, mastoid=0.04, dura=0.7, skullbase=0.45),
}
JITTER = dict(scalp=0.2, gm=0.12, wm=0.12, brainstem=0.12, fluid=0.05, nerve=0.3, vessel=0.4, vs=0.25, cyst=0.1, csf=0.0)
TEXTURE = {"hrT2": dict(gm=0.12, wm=0.06, brainstem=0.06, vs=0.18, scalp=0.2, skullbase=0.5),
           "ceT1": dict(gm=0.06, wm=0.05, brainstem=0.05, vs=0.15, scalp=0.2, skullbase=0.4)}


@dataclass
class Grid:
    """An image grid: size (nx, ny, nz), spacing (x, y, z) mm, origin and direction in LPS,
    plus the head pose mapping physical LPS to the anatomical frame: A = pose_rot.T @ (P - pose_shift)."""

    size: tuple
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray
    pose_rot: np.ndarray
    pose_shift: np.ndarray

    def __post_init__(self):
        # anatomical = M @ ijk + b, ijk in (i=x, j=y, k=z) index order
        self.M = (self.pose_rot.T @ self.direction @ np.diag(self.spacing)).astype(np.float64)
        self.b = self.pose_rot.T @ (self.origin - self.pose_shift)
        self.Minv = np.linalg.inv(self.M)

    @property
    def shape_zyx(self) -> tuple:
        return (self.size[2], self.size[1], self.size[0])

    def region(self, centre, radius: float):
        """Array slices (z, y, x) of the index box holding a sphere (anatomical mm) and its coordinates
        (3, dz, dy, dx) in the anatomical frame; None when the sphere is outside the grid."""
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * radius + centre
        ijk = (self.Minv @ (corners - self.b).T).T
        lo = np.maximum(np.floor(ijk.min(0)).astype(int) - 1, 0)
        hi = np.minimum(np.ceil(ijk.max(0)).astype(int) + 2, np.array(self.size))
        if np.any(hi <= lo):
            return None
        i = np.arange(lo[0], hi[0], dtype=np.float32)[None, None, :]
        j = np.arange(lo[1], hi[1], dtype=np.float32)[None, :, None]
        k = np.arange(lo[2], hi[2], dtype=np.float32)[:, None, None]
        M, b = self.M.astype(np.float32), self.b.astype(np.float32)
        coords = np.stack([M[c, 0] * i + M[c, 1] * j + M[c, 2] * k + b[c] for c in range(3)])
        coords = np.broadcast_to(coords, (3, len(k[:, 0, 0]), len(j[0, :, 0]), len(i[0, 0, :])))
        sl = (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))
        return sl, np.ascontiguousarray(coords)


@dataclass
class Layer:
    tissue: str
    sl: tuple
    fraction: np.ndarray  # (dz, dy, dx) in [0, 1]
    texture: np.ndarray | None = None  # (dz, dy, dx), zero-mean field in about [-1, 1]


def _fourier_field(coords: np.ndarray, rng: np.random.Generator, n: int, wavelength_mm: tuple) -> np.ndarray:
    """Smooth random field (zero mean, ~unit amplitude) as a sum of ``n`` random plane waves."""
    out = np.zeros(coords.shape[1:], np.float32)
    for _ in range(n):
        k = rng.normal(size=3)
        k *= 2 * np.pi / (np.linalg.norm(k) * rng.uniform(*wavelength_mm))
        out += np.cos(np.einsum("i,i...->...", k.astype(np.float32), coords) + rng.uniform(0, 2 * np.pi))
    return out * np.float32(np.sqrt(2.0 / n))


def _tumour_sdf(t, coords: np.ndarray) -> np.ndarray:
    sdf = capsule(coords, t.meatal_start, t.meatal_end, t.meatal_radius)
    if t.cpa_centre is not None:
        cpa = ellipsoid(coords, t.cpa_centre, t.cpa_axes, t.cpa_rotation)
        q = coords - t.cpa_centre.reshape(3, 1, 1, 1).astype(np.float32)
        norm = np.sqrt(np.sum(q**2, axis=0)) + 1e-6
        ripple = np.zeros_like(cpa)
        for d, amp, freq, phase in t.ripples:
            ripple += amp * np.cos(freq * np.einsum("i,i...->...", d.astype(np.float32), q) / norm * np.pi + phase)
        cpa = cpa - ripple * float(np.mean(t.cpa_axes))
        sdf = np.minimum(sdf, cpa)
    return sdf


def build_layers(anat: Anatomy, grid: Grid) -> tuple[list[Layer], np.ndarray]:
    """All tissue layers (painted in order, later on top) and the label map (z, y, x) uint8."""
    rng = np.random.default_rng(anat.texture_seed)
    edge = float(np.mean(grid.spacing)) * 0.9
    layers: list[Layer] = []
    labels = np.zeros(grid.shape_zyx, np.uint8)

    def add(tissue, centre, radius, sdf_fn, texture=None, store_sdf=None):
        reg = grid.region(np.asarray(centre, float), radius)
        if reg is None:
            return
        sl, coords = reg
        sdf = sdf_fn(coords)
        frac = fraction_inside(sdf, edge)
        if not frac.any():
            return
        tex = _fourier_field(coords, rng, 8, texture) if texture else None
        layers.append(Layer(tissue, sl, frac, tex))
        if store_sdf is not None:
            store_sdf(sl, sdf)

    sc, sa = anat.skull_centre, anat.skull_inner_axes
    outer = sa + anat.skull_thickness + anat.scalp_thickness
    add("scalp", sc, outer.max() + 2, lambda c: ellipsoid(c, sc, outer), texture=(8, 30))
    add("bone", sc, outer.max(), lambda c: ellipsoid(c, sc, sa + anat.skull_thickness))
    add("dura", sc, sa.max() + 2, lambda c: ellipsoid(c, sc, sa + 0.8))
    add("csf", sc, sa.max() + 1, lambda c: ellipsoid(c, sc, sa))
    for centre, axes in anat.cerebrum:
        add("gm", centre, axes.max() + 2, lambda c, ce=centre, ax=axes: ellipsoid(c, ce, ax), texture=(6, 20))
        add("wm", centre, axes.max(), lambda c, ce=centre, ax=axes: ellipsoid(c, ce, ax * 0.7), texture=(8, 25))
    for centre, axes in anat.cerebellum:
        add("gm", centre, axes.max() + 2, lambda c, ce=centre, ax=axes: ellipsoid(c, ce, ax), texture=(2.5, 5))
        add("wm", centre, axes.max(), lambda c, ce=centre, ax=axes: ellipsoid(c, ce, ax * 0.55), texture=(5, 12))
    # Skull base (clivus, sphenoid, temporal bone) closes the posterior fossa in front, below the
    # middle cranial fossa: a wedge whose sides follow the petrous ridges.
    def skull_base(c):
        slope = 0.75
        front = (c[1] - (-17.0 * anat.scale[1] + slope * np.abs(c[0]))) / np.sqrt(1 + slope**2)
        inside_skull = ellipsoid(c, sc, sa + anat.skull_thickness * 0.5)
        return np.maximum(np.maximum(front, c[2] - 7.0 * anat.scale[2]), inside_skull)

    add("skullbase", sc, outer.max(), skull_base, texture=(4, 12))
    add("csf", anat.fourth_ventricle[0], anat.fourth_ventricle[1].max() + 2,
        lambda c: ellipsoid(c, anat.fourth_ventricle[0], anat.fourth_ventricle[1]))
    rxp, ryp, rxm, rym = anat.brainstem_radius
    bx = anat.brainstem_shift_x

    def brainstem(c):
        bump = np.exp(-((c[2] / 15.0) ** 2))
        rx, ry = rxm + (rxp - rxm) * bump, rym + (ryp - rym) * bump
        k = np.sqrt(((c[0] - bx) / rx) ** 2 + (c[1] / ry) ** 2)
        return (k - 1.0) * np.minimum(rx, ry)

    add("brainstem", [bx, 0, 0], 90, brainstem, texture=(5, 15))
    for side, ear in anat.ears.items():
        add("bone", ear.petrous_centre, ear.petrous_axes.max() + 2,
            lambda c, e=ear: ellipsoid(c, e.petrous_centre, e.petrous_axes, e.petrous_rotation))
        add("mastoid", ear.mastoid_centre, ear.mastoid_radius + 2,
            lambda c, e=ear: ellipsoid(c, e.mastoid_centre, np.array([1.0, 0.8, 1.0]) * e.mastoid_radius))
        add("csf", (ear.porus + ear.fundus) / 2, 10, lambda c, e=ear: capsule(c, e.porus - (e.fundus - e.porus) * 0.15, e.fundus, e.iac_radius))
        for start, end, r in ear.nerves:
            add("nerve", (start + end) / 2, np.linalg.norm(end - start) / 2 + 3, lambda c, a=start, b_=end, r_=r: capsule(c, a, b_, r_))
        add("fluid", ear.vestibule_centre, 4, lambda c, e=ear: ellipsoid(c, e.vestibule_centre, e.vestibule_axes))
        for centre, normal, R, r in ear.canals:
            add("fluid", centre, R + 2, lambda c, ce=centre, n=normal, R_=R, r_=r: torus(c, ce, n, R_, r_))

        def cochlea_sdf(sl, sdf):
            labels[sl][sdf < 0] = 2

        cc = ear.cochlea_centreline.mean(0)
        add("fluid", cc, 7.5, lambda c, e=ear: tube(c, e.cochlea_centreline, e.cochlea_radii), store_sdf=cochlea_sdf)
    for whole, r in anat.vessels:
        # 10 mm pieces keep each bounding box tight around a long vessel.
        for start in range(0, len(whole) - 1, 40):
            line = whole[start:start + 41]
            centre = line.mean(0)
            rad = float(np.max(np.linalg.norm(line - centre, axis=1))) + r + 2
            add("vessel", centre, rad, lambda c, ln=line, r_=r: tube(c, ln, np.full(len(ln), r_, np.float32), k=1))
    for t in anat.tumours:
        ear = anat.ears[t.side]
        centre = t.cpa_centre if t.cpa_centre is not None else (t.meatal_start + t.meatal_end) / 2
        radius = (t.cpa_axes.max() * 1.3 if t.cpa_axes is not None else 0) + np.linalg.norm(t.meatal_end - centre) + 4

        def vs_sdf(c, t=t, e=ear):
            sdf = _tumour_sdf(t, c)
            # The CPA lobe cannot enter the petrous bone; only the canal lets the tumour in.
            bone = ellipsoid(c, e.petrous_centre, e.petrous_axes, e.petrous_rotation)
            canal = capsule(c, e.porus - (e.fundus - e.porus) * 0.15, e.fundus, e.iac_radius)
            return np.maximum(sdf, np.minimum(-bone, canal))

        def vs_label(sl, sdf):
            labels[sl][sdf < 0] = 1

        add("vs", centre, radius, vs_sdf, texture=(3, 10), store_sdf=vs_label)
        for cc, axes in t.cysts:
            add("cyst", cc, axes.max() + 2, lambda c, ce=cc, ax=axes, t=t, e=ear: np.maximum(ellipsoid(c, ce, ax), vs_sdf(c) + 1.2))
    return layers, labels


def composite(layers: list[Layer], grid: Grid, contrast: str, rng: np.random.Generator) -> np.ndarray:
    """Paint layers with ``contrast`` tissue values + acquisition effects; returns (z, y, x) float32."""
    values = {k: v * (1.0 + rng.uniform(-1, 1) * JITTER.get(k, 0.05)) for k, v in CONTRASTS[contrast].items()}
    texture = TEXTURE[contrast]
    img = np.zeros(grid.shape_zyx, np.float32)
    for layer in layers:
        v = np.float32(values[layer.tissue])
        if layer.texture is not None:
            v = v * (1.0 + texture.get(layer.tissue, 0.05) * layer.texture)
        view = img[layer.sl]
        view += (v - view) * layer.fraction
    # Point-spread function: slightly blurrier through-plane.
    sigma_vox = [rng.uniform(0.35, 0.6), rng.uniform(0.3, 0.5), rng.uniform(0.3, 0.5)]
    img = ndimage.gaussian_filter(img, sigma_vox, mode="nearest")
    # Smooth multiplicative bias field of ±(5–25) %.
    lowres = _bias_field(grid, rng)
    img *= lowres
    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
    sigma = rng.uniform(0.012, 0.045) * (1.0 if contrast == "hrT2" else 0.9)
    re = img + rng.normal(0, sigma, img.shape).astype(np.float32)
    im = rng.normal(0, sigma, img.shape).astype(np.float32)
    img = np.sqrt(re * re + im * im)
    return img * np.float32(rng.uniform(200.0, 3000.0))  # scanner scale


def _bias_field(grid: Grid, rng: np.random.Generator) -> np.ndarray:
    nz, ny, nx = grid.shape_zyx
    coarse = (max(nz // 8, 2), max(ny // 16, 2), max(nx // 16, 2))
    k = np.arange(coarse[0], dtype=np.float32)[:, None, None]
    j = np.arange(coarse[1], dtype=np.float32)[None, :, None]
    i = np.arange(coarse[2], dtype=np.float32)[None, None, :]
    idx = np.broadcast_arrays(i * (nx - 1) / (coarse[2] - 1), j * (ny - 1) / (coarse[1] - 1), k * (nz - 1) / (coarse[0] - 1))
    phys = np.stack([(grid.direction @ np.diag(grid.spacing))[c, 0] * idx[0] + (grid.direction @ np.diag(grid.spacing))[c, 1] * idx[1]
                     + (grid.direction @ np.diag(grid.spacing))[c, 2] * idx[2] for c in range(3)]).astype(np.float32)
    field = _fourier_field(phys, rng, 4, (150, 400))
    amp = rng.uniform(0.05, 0.25)
    field = np.exp(amp * field / max(float(np.abs(field).max()), 1e-6)).astype(np.float32)
    zoom = [s / c for s, c in zip(grid.shape_zyx, coarse)]
    return ndimage.zoom(field, zoom, order=1, mode="nearest")[:nz, :ny, :nx]


def make_grid(anat: Anatomy, rng: np.random.Generator, modality: str, fixed: dict | None = None) -> Grid:
    """A random acquisition: spacing, matrix, slab position, obliquity, storage flips and head pose.

    ``fixed`` pins parts of the protocol (benchmarks use it): ``size_xy``, ``n_slices``,
    ``spacing_xy_mm``, ``spacing_z_mm``.
    """
    fixed = fixed or {}
    if modality == "ceT1":
        sxy = rng.uniform(0.4, 0.5)
        fov = rng.uniform(160, 230)
    else:
        sxy = rng.uniform(0.4, 0.6)
        fov = rng.uniform(150, 230)
    sz = rng.uniform(1.0, 1.5)
    nxy = int(np.clip(round(fov / sxy / 16) * 16, 256, 512))
    slab_mm = rng.uniform(55, 100)
    nz = int(np.clip(round(slab_mm / sz), 40, 90))
    sxy, sz = fixed.get("spacing_xy_mm", sxy), fixed.get("spacing_z_mm", sz)
    nxy, nz = int(fixed.get("size_xy", nxy)), int(fixed.get("n_slices", nz))
    spacing = np.array([sxy, sxy, sz])
    # Head pose (tilt + position in the scanner), then a small slice-plane obliquity.
    pose_rot = _rot(rng.normal(0, [0.10, 0.06, 0.07]))
    pose_shift = rng.normal(0, [6.0, 8.0, 5.0])
    direction = _rot(rng.normal(0, [0.06, 0.04, 0.05]))
    if rng.random() < 0.5:  # many scanners/converters store x and y flipped (RAS-like storage)
        direction = direction @ np.diag([-1.0, -1.0, 1.0])
    if rng.random() < 0.2:
        direction = direction @ np.diag([1.0, 1.0, -1.0])
    # Centre the slab near the inner ears, with a random offset.
    centre_anat = np.array([0.0, rng.normal(8, 10), rng.normal(0, 6)])
    centre_phys = pose_rot @ centre_anat + pose_shift
    half = direction @ (spacing * (np.array([nxy, nxy, nz]) - 1) / 2)
    origin = centre_phys - half
    return Grid((nxy, nxy, nz), spacing, origin, direction, pose_rot, pose_shift)


def _rot(angles) -> np.ndarray:
    from .shapes import rotation_matrix

    return rotation_matrix(angles)


def cochlea_centres_lps(anat: Anatomy, grid: Grid) -> dict:
    """Physical LPS centre (mm) of each cochlea, for tests and crop-based training."""
    return {side: grid.pose_rot @ ear.cochlea_centreline.mean(0) + grid.pose_shift for side, ear in anat.ears.items()}


__all__ = ["Grid", "build_layers", "composite", "make_grid", "cochlea_centres_lps", "SIDES"]
