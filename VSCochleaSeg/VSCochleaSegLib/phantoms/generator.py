"""Synthetic posterior-fossa phantoms in the CrossMoDA file layout.

``make_case`` draws one subject (seeded by ``(seed, index, stream)`` so every case is reproducible and
independent) and renders it as ceT1 and/or hrT2 on its own random acquisition grid.
``write_phantoms`` writes a folder: ``<name>_ceT1.nii.gz`` / ``<name>_hrT2.nii.gz`` + ``<name>_Label.nii.gz``.
With ``unpaired=True`` (domain-adaptation data) the ceT1 and hrT2 sets come from different subjects,
as in CrossMoDA, where source and target scans were of different patients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .anatomy import Anatomy, sample_anatomy
from .render import Grid, build_layers, cochlea_centres_lps, composite, make_grid

MODALITIES = ("ceT1", "hrT2")
_STREAMS = {"paired": 0, "ceT1": 1, "hrT2": 2}


@dataclass
class PhantomCase:
    """One rendered subject. ``images`` maps modality → sitk float32 image; ``labels`` is uint8 on the
    same grid (0 background, 1 VS, 2 cochlea); ``info`` holds the ground-truth facts (side, size class,
    cochlea centres in LPS mm) that tests and training use."""

    name: str
    images: dict
    labels: sitk.Image
    info: dict = field(default_factory=dict)


def _to_image(arr: np.ndarray, grid: Grid, dtype=None) -> sitk.Image:
    img = sitk.GetImageFromArray(arr if dtype is None else arr.astype(dtype))
    img.SetSpacing(tuple(float(s) for s in grid.spacing))
    img.SetOrigin(tuple(float(o) for o in grid.origin))
    img.SetDirection(tuple(float(d) for d in grid.direction.ravel()))
    return img


def make_case(
    seed: int,
    index: int,
    modalities=("hrT2",),
    stream: str = "paired",
    name: str | None = None,
    tumour_side: str | None = None,
    size_class: str | None = None,
    acquisition: dict | None = None,
) -> PhantomCase:
    """Render subject ``index`` of ``seed`` in ``modalities`` (all on one grid, sharing one label map).

    The grid follows the first modality's acquisition protocol (spacing, matrix, slab);
    ``acquisition`` pins parts of it (see ``render.make_grid``).
    """
    rng = np.random.default_rng([int(seed), int(index), _STREAMS[stream]])
    anat: Anatomy = sample_anatomy(rng, tumour_side=tumour_side, size_class=size_class)
    grid = make_grid(anat, rng, modalities[0], acquisition)
    layers, labels = build_layers(anat, grid)
    images = {}
    for m in modalities:
        arr = composite(layers, grid, m, rng)
        # Half the scanners deliver integers; the rest floats.
        images[m] = _to_image(np.clip(np.round(arr), 0, 32767), grid, np.int16) if rng.random() < 0.5 else _to_image(arr, grid)
    info = {
        "seed": int(seed),
        "index": int(index),
        "stream": stream,
        "vs_sides": [t.side for t in anat.tumours],
        "size_classes": [t.size_class for t in anat.tumours],
        "cystic": any(bool(t.cysts) for t in anat.tumours),
        "cochlea_centres_lps": {k: [float(x) for x in v] for k, v in cochlea_centres_lps(anat, grid).items()},
        "spacing_xyz_mm": [float(s) for s in grid.spacing],
        "size_xyz": [int(s) for s in grid.size],
    }
    return PhantomCase(name or f"phantom_{seed}_{index:03d}", images, _to_image(labels, grid), info)


def write_case(case: PhantomCase, out_dir: Path, overwrite: bool = False) -> list[Path]:
    """Write a case in CrossMoDA layout; refuses to overwrite existing files unless asked."""
    from ..io import write_image_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for m, img in case.images.items():
        p = out_dir / f"{case.name}_{m}.nii.gz"
        write_image_atomic(img, p, overwrite=overwrite)
        paths.append(p)
    p = out_dir / f"{case.name}_Label.nii.gz"
    write_image_atomic(case.labels, p, overwrite=overwrite)
    paths.append(p)
    return paths


def case_plan(n: int, seed: int, modality: str, unpaired: bool) -> list[dict]:
    """What ``write_phantoms`` will render: a list of make_case keyword dicts."""
    if modality in MODALITIES:
        return [dict(seed=seed, index=i, modalities=(modality,), stream=modality, name=f"phantom_{modality}_{seed}_{i:03d}") for i in range(n)]
    if modality != "both":
        raise ValueError(f"modality must be ceT1, hrT2 or both, not {modality!r}")
    if unpaired:
        return [p for m in MODALITIES for p in case_plan(n, seed, m, False)]
    return [dict(seed=seed, index=i, modalities=("hrT2", "ceT1"), stream="paired", name=f"phantom_{seed}_{i:03d}") for i in range(n)]


def write_phantoms(out_dir, n: int, seed: int, modality: str = "hrT2", unpaired: bool = True,
                   overwrite: bool = False, progress: bool = True) -> list[PhantomCase]:
    """Render and write ``n`` cases per modality; returns the cases' ``info`` in a list of PhantomCase
    (images dropped to save memory)."""
    from tqdm import tqdm

    plan = case_plan(n, seed, modality, unpaired)
    done = []
    for kwargs in tqdm(plan, desc="phantoms", unit="case", disable=not progress):
        case = make_case(**kwargs)
        write_case(case, Path(out_dir), overwrite=overwrite)
        done.append(PhantomCase(case.name, {}, None, case.info))
    return done
