"""The bundled model folder: integrity, model card, and accuracy on the bundled sample (never trained on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk

from VSCochleaSegLib.io import read_image
from VSCochleaSegLib.metrics import score_case
from VSCochleaSegLib.model_folder import DEFAULT_MODEL, resolve_model
from VSCochleaSegLib.pipeline import Segmenter

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "Resources" / "Samples" / "phantom_sample_hrT2.nii.gz"
MAX_BUNDLED_MB = 50


def test_bundled_model_loads_with_verified_checksums():
    folder = resolve_model(None)
    assert folder.spec.name == DEFAULT_MODEL


def test_bundled_weights_are_safetensors_within_the_size_budget():
    folder = resolve_model(None)
    files = list(folder.path.iterdir())
    assert not [f for f in files if f.suffix in (".pt", ".pth", ".ckpt", ".pkl")]
    total_mb = sum(f.stat().st_size for f in files if f.suffix == ".safetensors") / 2**20
    assert 0 < total_mb <= MAX_BUNDLED_MB


def test_model_card_says_not_for_clinical_use():
    spec = resolve_model(None).spec
    assert "NOT FOR CLINICAL USE" in spec.intended_use.upper()
    assert "phantom" in spec.limitations.lower()
    # The sample's seed (4242) and the evaluation seed (9001) were not used for training.
    seeds = spec.data_seeds()
    assert 4242 not in seeds and 9001 not in seeds


def test_bundled_model_was_adapted_without_hrt2_labels_and_says_how():
    """The bundled model is the domain-adaptation benchmark's full pipeline: ceT1 labels only, with its config,
    data seeds and the benchmark figures it earned in its provenance."""
    prov = resolve_model(None).spec.provenance
    assert prov["hrT2_labels_used"] is False and prov["method"] == "method_a"
    assert {"source_ceT1", "target_hrT2", "test_hrT2"} <= set(prov["data_seeds"])
    assert prov["config"]["name"] == resolve_model(None).spec.name
    figures = prov["benchmark"]
    assert {"full_pipeline", "oracle", "no_adaptation", "translation_only", "method_b"} <= set(figures)
    assert figures["full_pipeline"]["VS_Dice"] >= 0.9 * figures["oracle"]["VS_Dice"]


@pytest.fixture(scope="module")
def sample_result():
    return Segmenter(None, device="cpu", threads=2).segment_image(read_image(SAMPLE))


def test_bundled_model_segments_the_sample_accurately(sample_result):
    truth = sitk.ReadImage(str(SAMPLE).replace("_hrT2.nii.gz", "_Label.nii.gz"))
    scores = score_case(sample_result.labels, truth)
    assert scores["VS_Dice"] >= 0.8, scores
    assert scores["Cochlea_Dice"] >= 0.7, scores


def test_bundled_model_finds_the_tumour_on_the_right_side(sample_result):
    info = json.loads((REPO / "Resources" / "Samples" / "phantom_sample_info.json").read_text(encoding="utf-8"))
    assert sample_result.measurements.vs_side == info["vs_sides"][0]
    assert sample_result.measurements.cochlea_left_volume_mm3 > 0
    assert sample_result.measurements.cochlea_right_volume_mm3 > 0
