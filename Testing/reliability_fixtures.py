"""Small scans, damaged models and CLI helpers shared by the reliability tests (issue 5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from VSCochleaSegLib.cli import main

# A coarse, small acquisition (154 × 154 × 48 mm at 1.2 × 1.2 × 2 mm): renders in ~0.2 s.
SMALL_ACQUISITION = dict(size_xy=128, spacing_xy_mm=1.2, n_slices=24, spacing_z_mm=2.0)


def crop_around_cochleae(image: sitk.Image, cochlea_centres_lps: dict, margin_mm: float = 12.0) -> sitk.Image:
    """The index box holding both cochlea centres plus ``margin_mm`` on every side (geometry kept)."""
    ijk = np.array([image.TransformPhysicalPointToContinuousIndex(c) for c in cochlea_centres_lps.values()])
    margin = margin_mm / np.array(image.GetSpacing())
    lo = np.maximum(np.floor(ijk.min(0) - margin), 0).astype(int)
    hi = np.minimum(np.ceil(ijk.max(0) + margin) + 1, image.GetSize()).astype(int)
    return sitk.RegionOfInterest(image, (hi - lo).tolist(), lo.tolist())


def small_scan(seed: int, modality: str = "hrT2", crop: bool = True) -> sitk.Image:
    """A phantom scan of ``modality`` (its own subject stream), on the small acquisition; by default
    cropped to both ears (~75 × 20 × 20 voxels), which keeps a tiny-model segmentation well under a second."""
    from VSCochleaSegLib.phantoms import make_case

    case = make_case(seed, 0, modalities=(modality,), stream=modality, acquisition=SMALL_ACQUISITION)
    image = case.images[modality]
    return crop_around_cochleae(image, case.info["cochlea_centres_lps"]) if crop else image


def segment(inputs, out_dir, model, *options) -> int:
    """``vscochleaseg segment`` in-process with ``model`` (a ModelFolder or its path), on the CPU, quiet."""
    return main(["segment", *map(str, inputs), "-o", str(out_dir), "--model", str(getattr(model, "path", model)),
                 "--device", "cpu", "--threads", "1", "-q", *options])


def read_json(path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def files_in(folder: Path) -> set:
    """Every file name in ``folder`` (hidden ones too); empty if the folder does not exist."""
    return {p.name for p in Path(folder).iterdir()} if Path(folder).exists() else set()


def write_blind_model(path: Path):
    """A tiny model whose localiser says "background" everywhere: no inner ear is ever found."""
    import torch
    from safetensors.torch import load_file, save_file

    from conftest import write_tiny_model
    from VSCochleaSegLib.model_folder import sha256_file

    folder = write_tiny_model(path, localiser_bias_cochlea=False)
    weights_path = folder.path / "localiser.safetensors"
    weights = load_file(str(weights_path))
    weights["output_block.conv.conv.bias"] = torch.tensor([10.0, -10.0, -10.0])
    save_file(weights, str(weights_path))
    spec = json.loads((folder.path / "model.json").read_text(encoding="utf-8"))
    spec["localiser"]["sha256"] = sha256_file(weights_path)
    (folder.path / "model.json").write_text(json.dumps(spec))
    return folder
