"""Random posterior-fossa anatomy of one phantom subject (mm, anatomical frame, no image grid yet).

The anatomical frame is LPS-like with its origin midway between the two porus acusticus:
x → patient left, y → posterior, z → superior. Each subject draws its own head size, asymmetry,
petrous-bone and inner-ear geometry, vessels and a vestibular schwannoma (size class from small
intrameatal to large cerebellopontine-angle tumour, sometimes cystic, either side, rarely both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .shapes import frame_from_axis

SIDES = {"left": 1.0, "right": -1.0}  # sign of x for each side in the anatomical frame


@dataclass
class InnerEar:
    """One side's petrous bone, internal auditory canal (IAC) and labyrinth, all in mm."""

    side: str
    petrous_centre: np.ndarray
    petrous_axes: np.ndarray  # semi-axes (long, short, height)
    petrous_rotation: np.ndarray  # 3×3, columns = ellipsoid axes in the frame
    porus: np.ndarray  # IAC opening into the cerebellopontine angle
    fundus: np.ndarray  # lateral end of the IAC
    iac_radius: float
    cochlea_centreline: np.ndarray  # (N, 3) spiral
    cochlea_radii: np.ndarray  # (N,)
    vestibule_centre: np.ndarray
    vestibule_axes: np.ndarray
    canals: list  # [(centre, normal, major_radius, minor_radius)]
    nerves: list  # [(start, end, radius)]
    mastoid_centre: np.ndarray
    mastoid_radius: float


@dataclass
class Tumour:
    """A vestibular schwannoma: intrameatal capsule + optional cerebellopontine-angle (CPA) lobe."""

    side: str
    size_class: str  # intrameatal | small | medium | large
    meatal_start: np.ndarray
    meatal_end: np.ndarray
    meatal_radius: float
    cpa_centre: np.ndarray | None
    cpa_axes: np.ndarray | None
    cpa_rotation: np.ndarray | None
    ripples: list  # [(direction (3,), amplitude, frequency, phase)] radial shape perturbation
    cysts: list  # [(centre, axes)]


@dataclass
class Anatomy:
    scale: np.ndarray  # global size factors (x, y, z)
    skull_centre: np.ndarray
    skull_inner_axes: np.ndarray
    skull_thickness: float
    scalp_thickness: float
    brainstem_shift_x: float
    brainstem_radius: tuple  # (rx_pons, ry_pons, rx_medulla, ry_medulla)
    cerebellum: list  # [(centre, axes)]
    cerebrum: list  # [(centre, axes)]
    fourth_ventricle: tuple
    ears: dict  # side -> InnerEar
    tumours: list  # [Tumour]
    vessels: list  # [(centreline (N,3), radius)]
    texture_seed: int
    extra: dict = field(default_factory=dict)


def _spiral(centre, axis, r0, turns, height, tube_r0, start_angle, rng) -> tuple[np.ndarray, np.ndarray]:
    """Cochlear spiral: basal turn of radius ``r0`` narrowing to the apex over ``turns`` turns."""
    u, v, w = frame_from_axis(axis)
    t = np.linspace(0.0, 1.0, 400)
    theta = start_angle + 2 * np.pi * turns * t
    rho = r0 * (1.0 - 0.72 * t)
    h = height * (t - 0.4)
    pts = centre + (rho * np.cos(theta))[:, None] * v + (rho * np.sin(theta))[:, None] * w + h[:, None] * u
    radii = tube_r0 * (1.0 - 0.45 * t)
    return pts.astype(np.float32), radii.astype(np.float32)


def _inner_ear(side: str, scale: np.ndarray, rng: np.random.Generator) -> InnerEar:
    s = SIDES[side]
    j = lambda sd: rng.normal(0.0, sd)  # noqa: E731 - small anatomical jitter
    porus = np.array([s * (22.5 + j(1.5)), 3.5 + j(1.5), j(1.5)]) * scale
    # IAC runs laterally with a slight anterior tilt; length 8-12 mm.
    iac_dir = np.array([s * 1.0, -0.15 + j(0.08), 0.05 + j(0.06)])
    iac_dir /= np.linalg.norm(iac_dir)
    iac_len = rng.uniform(8.0, 12.0)
    fundus = porus + iac_dir * iac_len
    # Petrous bone: long axis from the apex (anteromedial) to the mastoid (posterolateral).
    ang = np.deg2rad(45 + j(6))
    d_long = np.array([s * np.sin(ang), np.cos(ang), 0.05 * j(1)])
    d_long /= np.linalg.norm(d_long)
    d_short = np.array([-s * np.cos(ang), np.sin(ang), 0.0])  # points posteromedially
    d_short -= d_long * (d_short @ d_long)
    d_short /= np.linalg.norm(d_short)
    d_up = np.cross(d_long, d_short)
    if d_up[2] < 0:
        d_up = -d_up
    short = rng.uniform(8.5, 10.5)
    petrous_centre = porus - d_short * short * 0.95 + d_long * rng.uniform(2.0, 6.0) + np.array([0, 0, -1.5])
    petrous_axes = np.array([rng.uniform(26, 32), short, rng.uniform(9, 12)])
    rot = np.stack([d_long, d_short, d_up], axis=1)
    # Cochlea anterolateral to the fundus, modiolus roughly along the IAC axis.
    cochlea_centre = fundus + np.array([s * rng.uniform(1.0, 3.0), -rng.uniform(3.5, 5.5), -rng.uniform(0.0, 2.0)])
    axis = iac_dir + np.array([0.0, -0.4 + j(0.15), -0.3 + j(0.15)])
    pts, radii = _spiral(
        cochlea_centre,
        axis,
        r0=rng.uniform(3.0, 4.0),
        turns=rng.uniform(2.2, 2.8),
        height=rng.uniform(3.0, 4.2),
        tube_r0=rng.uniform(1.0, 1.3),
        start_angle=rng.uniform(0, 2 * np.pi),
        rng=rng,
    )
    vestibule_centre = fundus + np.array([s * rng.uniform(3.0, 4.5), rng.uniform(2.0, 3.5), rng.uniform(-0.5, 1.0)])
    vestibule_axes = np.array([rng.uniform(2.0, 2.8), rng.uniform(1.6, 2.2), rng.uniform(1.8, 2.5)])
    canal_r = rng.uniform(0.35, 0.55)
    canals = [
        # superior (vertical, ⟂ petrous long axis), posterior (vertical, ∥ long axis), lateral (horizontal)
        (vestibule_centre + np.array([0.0, 0.5, 4.0]), d_long, rng.uniform(2.8, 3.5), canal_r),
        (vestibule_centre + np.array([s * 0.5, 4.0, 0.5]), d_short, rng.uniform(2.8, 3.5), canal_r),
        (vestibule_centre + np.array([s * 3.5, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]), rng.uniform(2.5, 3.2), canal_r),
    ]
    iac_radius = rng.uniform(1.9, 2.7)
    # Facial, cochlear and two vestibular nerves run along the canal; the VII/VIII bundle crosses the CPA.
    u, v, w = frame_from_axis(iac_dir)
    nerves = []
    for k in range(4):
        off = (v * np.cos(k * np.pi / 2 + 0.4) + w * np.sin(k * np.pi / 2 + 0.4)) * iac_radius * 0.45
        nerves.append((porus + off - iac_dir * 0.5, fundus + off, rng.uniform(0.35, 0.5)))
    brainstem_entry = np.array([s * 13.0, 4.0 + j(1), j(1.0)]) * scale
    nerves.append((brainstem_entry, porus, rng.uniform(0.9, 1.2)))
    mastoid_centre = petrous_centre + d_long * petrous_axes[0] * 0.75 + np.array([0, 6.0, -6.0])
    return InnerEar(
        side, petrous_centre, petrous_axes, rot, porus, fundus, iac_radius, pts, radii,
        vestibule_centre, vestibule_axes, canals, nerves, mastoid_centre, rng.uniform(8.0, 12.0),
    )


def _tumour(ear: InnerEar, rng: np.random.Generator, size_class: str | None = None) -> Tumour:
    size_class = size_class or rng.choice(["intrameatal", "small", "medium", "large"], p=[0.2, 0.3, 0.3, 0.2])
    axis = ear.fundus - ear.porus
    length = float(np.linalg.norm(axis))
    axis = axis / length
    meatal_radius = ear.iac_radius * rng.uniform(0.8, 0.97)
    if size_class == "intrameatal":
        t0 = rng.uniform(0.0, 0.35) * length
        t1 = rng.uniform(t0 + 3.0, length - 0.8)
        start, end = ear.porus + axis * t0, ear.porus + axis * t1
        cpa_centre = cpa_axes = cpa_rot = None
    else:
        start = ear.porus - axis * 1.0
        end = ear.porus + axis * rng.uniform(0.4, 0.92) * length
        r = {"small": (3.0, 7.0), "medium": (7.0, 12.0), "large": (12.0, 17.5)}[size_class]
        radius = rng.uniform(*r)
        cpa_axes = np.array([radius, radius * rng.uniform(0.8, 1.15), radius * rng.uniform(0.8, 1.1)])
        shift = np.array([0.0, rng.normal(0, 0.2), rng.normal(0, 0.2)]) * radius
        cpa_centre = ear.porus - axis * radius * rng.uniform(0.6, 0.85) + shift
        a = rng.uniform(-0.4, 0.4)
        cpa_rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    ripples = []
    for _ in range(rng.integers(2, 5)):
        d = rng.normal(size=3)
        ripples.append((d / np.linalg.norm(d), rng.uniform(0.03, 0.1), rng.uniform(1.0, 3.0), rng.uniform(0, 2 * np.pi)))
    cysts = []
    if cpa_centre is not None and size_class in ("medium", "large") and rng.random() < 0.3:
        for _ in range(rng.integers(1, 4)):
            c = cpa_centre + rng.normal(0, 0.3, 3) * cpa_axes
            cysts.append((c, cpa_axes * rng.uniform(0.2, 0.45, 3)))
    return Tumour(ear.side, str(size_class), start, end, meatal_radius, cpa_centre, cpa_axes, cpa_rot, ripples, cysts)


def _vessel(start, direction, length, radius, rng, wiggle=0.5) -> tuple[np.ndarray, float]:
    n = max(int(length / 0.25), 4)
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    steps = np.repeat(d[None], n, axis=0) * (length / n)
    drift = np.cumsum(rng.normal(0, wiggle, size=(n, 3)) * (length / n) * 0.3, axis=0)
    pts = np.asarray(start) + np.cumsum(steps, axis=0) + drift
    return pts.astype(np.float32), float(radius)


def sample_anatomy(rng: np.random.Generator, tumour_side: str | None = None, size_class: str | None = None) -> Anatomy:
    """Draw one subject. ``tumour_side``/``size_class`` force those choices (tests use this)."""
    scale = rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, 3)
    ears = {side: _inner_ear(side, scale, rng) for side in SIDES}
    if tumour_side is None:
        tumour_side = "bilateral" if rng.random() < 0.04 else str(rng.choice(["left", "right"]))
    sides = ["left", "right"] if tumour_side == "bilateral" else [tumour_side]
    tumours = [_tumour(ears[s], rng, size_class) for s in sides]
    # A large CPA tumour pushes the brainstem to the other side.
    shift = 0.0
    for t in tumours:
        if t.cpa_centre is not None:
            medial_edge = abs(t.cpa_centre[0]) - t.cpa_axes[0]
            shift -= SIDES[t.side] * max(0.0, 16.0 - medial_edge) * 0.6
    vessels = [
        _vessel([rng.normal(0, 1.5), -15.5 * scale[1], -45.0], [rng.normal(0, 0.1), 0.05, 1.0], 80.0, rng.uniform(1.4, 2.0), rng, 0.2)
    ]
    for side, s in SIDES.items():
        # AICA loop into the cerebellopontine angle, sometimes reaching the porus.
        start = np.array([s * 3.0, -14.0, rng.uniform(-14, -6)])
        target = ears[side].porus + np.array([0.0, rng.uniform(-2, 4), rng.uniform(-5, -1)])
        vessels.append(_vessel(start, target - start, float(np.linalg.norm(target - start)) * 1.1, rng.uniform(0.5, 0.8), rng, 0.8))
        # Vertebral artery and a cerebellar vein.
        vessels.append(_vessel([s * 6.0, -10.0, -75.0], [-s * 0.12, -0.08, 1.0], 32.0, rng.uniform(1.2, 1.7), rng, 0.2))
        vessels.append(_vessel([s * 18.0, 22.0, rng.uniform(-15, 5)], [s * 0.8, 0.4, rng.normal(0, 0.3)], 20.0, rng.uniform(0.6, 1.0), rng, 0.6))
    cerebellum = [
        (np.array([s * 23.0, 37.0, -13.0]) * scale + rng.normal(0, 1.5, 3), np.array([25.0, 25.0, 23.0]) * rng.uniform(0.92, 1.08, 3))
        for s in SIDES.values()
    ] + [(np.array([0.0, 40.0, -12.0]) * scale, np.array([9.0, 22.0, 20.0]))]
    cerebrum = [
        (np.array([s * 40.0, -16.0, 23.0]) * scale, np.array([20.0, 28.0, 14.0]) * rng.uniform(0.9, 1.1, 3))
        for s in SIDES.values()
    ] + [(np.array([s * 25.0, 38.0, 40.0]) * scale, np.array([28.0, 34.0, 26.0])) for s in SIDES.values()] + [
        (np.array([0.0, 0.0, 52.0]) * scale, np.array([58.0, 72.0, 45.0]) * rng.uniform(0.95, 1.05, 3))
    ]
    return Anatomy(
        scale=scale,
        skull_centre=np.array([0.0, 8.0, 12.0]) * scale,
        skull_inner_axes=np.array([64.0, 80.0, 70.0]) * scale,
        skull_thickness=rng.uniform(4.0, 8.0),
        scalp_thickness=rng.uniform(4.0, 9.0),
        brainstem_shift_x=shift,
        brainstem_radius=(rng.uniform(13.5, 16.0), rng.uniform(11.5, 13.5), rng.uniform(8.0, 10.0), rng.uniform(7.0, 9.0)),
        cerebellum=cerebellum,
        cerebrum=cerebrum,
        fourth_ventricle=(np.array([0.0, 16.5, -8.0]) * scale, np.array([rng.uniform(3, 6), 3.0, rng.uniform(6, 10)])),
        ears=ears,
        tumours=tumours,
        vessels=vessels,
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )
