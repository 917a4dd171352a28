"""Shared pytest fixtures: a tiny random-weight model folder and phantom scans made on the fly."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def tiny_model_spec_dict(name: str = "tiny-test") -> dict:
    """A complete model.json dict with very small networks (fast on CPU, meaningless outputs)."""
    net3 = {"dims": 3, "in_channels": 1, "out_channels": 3, "filters": [4, 8, 8],
            "kernel_size": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]}
    net2 = {"dims": 2, "in_channels": 1, "out_channels": 3, "filters": [4, 8, 8],
            "kernel_size": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]]}
    zero = "0" * 64
    return {
        "format_version": 1, "name": name, "version": "0.0.1", "description": "random weights for tests",
        "labels": {"background": 0, "vs": 1, "cochlea": 2},
        "intended_use": "tests only", "limitations": "random weights", "provenance": {"hrT2_labels_used": False},
        "normalisation": {"method": "percentile", "lower_percentile": 0.5, "upper_percentile": 99.5,
                          "foreground_threshold_fraction": 0.05},
        "localiser": {"spacing_xyz_mm": [4.0, 4.0, 4.0], "network": net3, "patch_size_zyx": [16, 32, 32],
                      "weights": "localiser.safetensors", "sha256": zero},
        "crop": {"size_xyz_mm": [32.0, 32.0, 24.0], "medial_offset_mm": 8.0, "mirror_right": True},
        "segmentation": {"spacing_xyz_mm": [1.0, 1.0, 2.0], "fusion": "mean", "members": [
            {"name": "m3d", "network": net3, "patch_size_zyx": [12, 32, 32], "weights": "m3d.safetensors", "sha256": zero},
            {"name": "m2d", "network": net2, "patch_size_zyx": [32, 32], "weights": "m2d.safetensors", "sha256": zero},
        ]},
        "postprocess": {"keep_largest_vs_per_side": True, "keep_largest_cochlea_per_side": True,
                        "vs_max_z_distance_from_cochlea_mm": 22.5, "min_vs_volume_mm3": 0.0},
    }


def write_tiny_model(path, seed: int = 0, localiser_bias_cochlea: bool = True):
    """Write a random-weight model folder. The localiser's output bias is pushed towards "cochlea" so
    it finds ears everywhere (random weights would otherwise find none and the scan would be refused)."""
    import torch

    from VSCochleaSegLib.model_folder import ModelSpec, write_model_folder
    from VSCochleaSegLib.networks import build_network, inference_state_dict

    torch.manual_seed(seed)
    spec = ModelSpec.from_dict(tiny_model_spec_dict())
    states = {}
    for key, entry in spec.weight_entries().items():
        net = build_network(entry.network)
        if key == "localiser" and localiser_bias_cochlea:
            with torch.no_grad():
                net.output_block.conv.conv.bias[:] = torch.tensor([0.0, -10.0, 10.0])
        states[key] = inference_state_dict(net)
    return write_model_folder(path, spec, states)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-test")


@pytest.fixture(scope="session")
def hrt2_phantom():
    """One hrT2 phantom case (seed 31337, never used for training or evaluation)."""
    from VSCochleaSegLib.phantoms import make_case

    return make_case(31337, 0, modalities=("hrT2",))
