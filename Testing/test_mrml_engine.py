"""One end-to-end run of the real engine through the MRML glue (bundled phantom-demo model, CPU, fast quality).

Skipped until the bundled model folder exists; the fast MRML tests use a fake engine instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from mrml_fixtures import *  # noqa: F401,F403 - fixtures
from mrml_fixtures import add_volume, node_ids

from VSCochleaSegLib import mrml as vmrml
from VSCochleaSegLib.errors import Cancelled

ROOT = Path(__file__).resolve().parents[1]
MODEL_JSON = ROOT / "Resources" / "Models" / "phantom-demo" / "model.json"
SAMPLE = ROOT / "Resources" / "Samples" / "phantom_sample_hrT2.nii.gz"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL_JSON.is_file(), reason=f"bundled model not built yet ({MODEL_JSON})"),
]


@pytest.fixture(scope="module")
def hrt2() -> sitk.Image:
    if SAMPLE.is_file():
        from VSCochleaSegLib.io import read_image

        return read_image(SAMPLE)
    from VSCochleaSegLib.phantoms.generator import make_case

    return make_case(seed=20240, index=0, tumour_side="left").images["hrT2"]


@pytest.fixture(scope="module")
def segmenter():
    from VSCochleaSegLib.pipeline import Segmenter

    return Segmenter(model="phantom-demo", device="cpu", quality="fast")


def test_the_real_engine_fills_a_segmentation_on_the_input_grid(scene, hrt2, segmenter):
    volume = add_volume(scene, hrt2)
    stages = []

    segmentation, measurements = vmrml.segment_volume_node(
        volume, segmenter=segmenter, progress=lambda stage, fraction: stages.append(stage))

    assert {"localise", "predict"} <= set(stages)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 3
    labels = vmrml.segmentation_to_labels(segmentation, volume)
    assert vmrml.same_grid(labels, vmrml.volume_node_to_sitk(volume))
    values = set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist())
    assert values <= {0, 1, 2}
    again = vmrml.measure_segmentation(segmentation, volume)
    assert again.vs_volume_mm3 == pytest.approx(measurements.vs_volume_mm3)
    assert again.cochlea_left_volume_mm3 == pytest.approx(measurements.cochlea_left_volume_mm3)


def test_cancelling_the_real_engine_leaves_the_scene_unchanged(scene, hrt2, segmenter):
    volume = add_volume(scene, hrt2)
    before = node_ids(scene)
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 2

    with pytest.raises(Cancelled):
        vmrml.segment_volume_node(volume, segmenter=segmenter, cancel=cancel)
    assert node_ids(scene) == before
