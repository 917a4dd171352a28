"""The real engine through the MRML glue: a random-weight tiny model (always), and the bundled phantom-uda
model (``Resources/Models/<DEFAULT_MODEL>``; a missing folder fails, never skips). The other MRML tests use a fake engine.
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
from VSCochleaSegLib.model_folder import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "Resources" / "Samples" / "phantom_sample_hrT2.nii.gz"

pytestmark = pytest.mark.slow


def test_a_background_job_with_the_real_pipeline_puts_its_labels_in_the_scene(scene, tiny_model, hrt2_phantom):
    """Random weights give meaningless labels; what is checked is the plumbing: worker thread, progress,
    result on the input grid, segments equal to the engine's labels (both cochlea segments as 2)."""
    from VSCochleaSegLib.pipeline import Segmenter

    image = hrt2_phantom.images["hrT2"]
    volume = add_volume(scene, image)
    segmenter = Segmenter(model=str(tiny_model.path), device="cpu", quality="full")
    engine_labels = {}
    original = segmenter.segment_image

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        engine_labels["labels"] = result.labels
        return result

    segmenter.segment_image = spy
    job = vmrml.SegmentationJob(volume, segmenter=segmenter)
    job.start()
    titles = set()
    while job.running():
        titles.add(job.progress()[0])
        job.wait(0.05)
    segmentation, measurements = job.finish()

    assert "Segmenting" in titles or "Locating the inner ears" in titles
    labels = vmrml.segmentation_to_labels(segmentation, volume)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), sitk.GetArrayFromImage(engine_labels["labels"]))
    assert vmrml.same_grid(labels, vmrml.volume_node_to_sitk(volume))
    voxel_mm3 = float(np.prod(image.GetSpacing()))
    assert measurements.vs_volume_mm3 == pytest.approx(float((sitk.GetArrayViewFromImage(labels) == 1).sum()) * voxel_mm3)


@pytest.fixture(scope="module")
def hrt2(hrt2_phantom) -> sitk.Image:
    """The bundled sample scan when it exists, else the shared hrT2 phantom."""
    if SAMPLE.is_file():
        from VSCochleaSegLib.io import read_image

        return read_image(SAMPLE)
    return hrt2_phantom.images["hrT2"]


@pytest.fixture(scope="module")
def segmenter():
    from VSCochleaSegLib.pipeline import Segmenter

    return Segmenter(model=DEFAULT_MODEL, device="cpu", quality="fast")


def test_the_bundled_model_fills_a_segmentation_on_the_input_grid(scene, hrt2, segmenter):
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


def test_cancelling_the_bundled_model_leaves_the_scene_unchanged(scene, hrt2, segmenter):
    volume = add_volume(scene, hrt2)
    before = node_ids(scene)
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 2

    with pytest.raises(Cancelled):
        vmrml.segment_volume_node(volume, segmenter=segmenter, cancel=cancel)
    assert node_ids(scene) == before
