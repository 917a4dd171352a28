"""The MRML glue (VSCochleaSegLib.mrml) against real MRML from the slicer-core wheel, with a fake engine."""

from __future__ import annotations

import csv
import threading

import numpy as np
import pytest
import SimpleITK as sitk

from mrml_fixtures import *  # noqa: F401,F403 - fixtures and fakes
from mrml_fixtures import FLIPPED, OBLIQUE, FakeSegmenter, add_volume, make_image, node_ids, phantom_labels, segment_mask

from VSCochleaSegLib import mrml as vmrml
from VSCochleaSegLib.errors import Cancelled, InputError, OutputExistsError
from VSCochleaSegLib.labels import COCHLEA, COLOURS, VS

slicer = pytest.importorskip("slicer")

DIRECTIONS = {"axial": np.eye(3), "oblique": OBLIQUE, "flipped": FLIPPED}


def _segment(volume, **kwargs):
    kwargs.setdefault("segmenter", FakeSegmenter(kwargs.pop("vs_side", "left")))
    return vmrml.segment_volume_node(volume, **kwargs)


def _centroid_ras(mask_kji: np.ndarray, volume) -> np.ndarray:
    kji = np.argwhere(mask_kji).mean(axis=0)
    return (vmrml.volume_ijk_to_ras(volume) @ np.array([kji[2], kji[1], kji[0], 1.0]))[:3]


# ------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_volume_node_geometry_matches_what_slicer_writes_to_file(scene, tmp_path, direction):
    image = make_image(direction=direction)
    volume = add_volume(scene, image)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp_path / "slicer_wrote.nrrd"))
    assert storage.WriteData(volume)
    written_by_slicer = sitk.ReadImage(str(tmp_path / "slicer_wrote.nrrd"))

    converted = vmrml.volume_node_to_sitk(volume)

    assert converted.GetSize() == written_by_slicer.GetSize()
    np.testing.assert_allclose(converted.GetSpacing(), written_by_slicer.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(converted.GetOrigin(), written_by_slicer.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(converted.GetDirection(), written_by_slicer.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(written_by_slicer))


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_ijk_to_ras_matches_what_slicer_reads_from_file(mrml, scene, tmp_path, direction):
    image = make_image(direction=direction)
    path = tmp_path / "scan.nrrd"
    sitk.WriteImage(image, str(path))
    loaded = mrml.volumes_logic.AddArchetypeVolume(str(path), "scan")
    assert loaded is not None

    converted = vmrml.volume_node_to_sitk(loaded)
    if np.linalg.det(direction) > 0:
        np.testing.assert_allclose(vmrml.ijk_to_ras_from_sitk(image), vmrml.volume_ijk_to_ras(loaded), atol=1e-5)
    # Slicer reverses the slice order of left-handed grids when loading; every voxel must still be
    # where it was in patient space, with the same value.
    same_points = sitk.Resample(image, converted, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same_points), sitk.GetArrayFromImage(converted))


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_sitk_geometry_survives_the_round_trip_through_ijk_to_ras(direction):
    image = make_image(direction=direction)
    origin, spacing, flat_direction = vmrml.sitk_geometry_from_ijk_to_ras(vmrml.ijk_to_ras_from_sitk(image))
    np.testing.assert_allclose(origin, image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(spacing, image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(flat_direction, image.GetDirection(), atol=1e-9)


def test_sitk_to_volume_node_and_back_keeps_voxels_and_geometry(scene):
    image = make_image()
    back = vmrml.volume_node_to_sitk(vmrml.sitk_to_volume_node(image, scene, "x"))
    assert vmrml.same_grid(image, back, tolerance=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


def test_a_vector_volume_is_refused_with_a_message(scene):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(node, np.zeros((4, 5, 6, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="components per voxel"):
        vmrml.volume_node_to_sitk(node)


# --------------------------------------------------------------------------------------- segmentation


def test_output_has_named_coloured_segments_with_terminology(scene):
    volume = add_volume(scene, make_image())
    segmentation, _ = _segment(volume)

    segments = segmentation.GetSegmentation()
    names = [segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())]
    assert names == ["Vestibular schwannoma", "Cochlea left", "Cochlea right"]
    vs = segments.GetSegment(vmrml.SEGMENT_VS)
    np.testing.assert_allclose(vs.GetColor(), COLOURS[VS])
    np.testing.assert_allclose(segments.GetSegment(vmrml.SEGMENT_COCHLEA_RIGHT).GetColor(), COLOURS[COCHLEA])
    for spec in vmrml.SEGMENTS:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
            segments.GetSegment(spec.segment_id).GetTerminology(), entry)
    entry = slicer.vtkSlicerTerminologyEntry()
    slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(
        segments.GetSegment(vmrml.SEGMENT_COCHLEA_LEFT).GetTerminology(), entry)
    assert entry.GetTypeObject().GetCodeValue() == "80169004"
    assert entry.GetTypeModifierObject().GetCodeMeaning() == "Left"


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_segments_lie_on_the_input_grid_and_equal_the_engine_labels(scene, direction):
    image = make_image(direction=direction)
    volume = add_volume(scene, image)
    segmenter = FakeSegmenter("left")
    segmentation, _ = _segment(volume, segmenter=segmenter)
    expected = sitk.GetArrayFromImage(phantom_labels(vmrml.volume_node_to_sitk(volume), "left")[0])

    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is volume
    vs = segment_mask(segmentation, vmrml.SEGMENT_VS, volume)
    left = segment_mask(segmentation, vmrml.SEGMENT_COCHLEA_LEFT, volume)
    right = segment_mask(segmentation, vmrml.SEGMENT_COCHLEA_RIGHT, volume)
    np.testing.assert_array_equal(vs, expected == VS)
    np.testing.assert_array_equal(left | right, expected == COCHLEA)
    internal = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation, vmrml.SEGMENT_VS, internal, False)
    matrix = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    internal.GetImageToWorldMatrix(matrix)
    np.testing.assert_allclose(vmrml._numpy_matrix(matrix), vmrml.volume_ijk_to_ras(volume), atol=1e-9)


@pytest.mark.parametrize("vs_side", ["left", "right"])
@pytest.mark.parametrize("direction", [OBLIQUE, FLIPPED], ids=["oblique", "flipped"])
def test_sides_are_the_patients_left_and_right(scene, vs_side, direction):
    volume = add_volume(scene, make_image(direction=direction))
    segmentation, measurements = _segment(volume, vs_side=vs_side)

    assert measurements.vs_side == vs_side
    left = _centroid_ras(segment_mask(segmentation, vmrml.SEGMENT_COCHLEA_LEFT, volume), volume)
    right = _centroid_ras(segment_mask(segmentation, vmrml.SEGMENT_COCHLEA_RIGHT, volume), volume)
    vs = _centroid_ras(segment_mask(segmentation, vmrml.SEGMENT_VS, volume), volume)
    # RAS: +x is the patient's right.
    assert left[0] < right[0]
    assert (vs[0] < (left[0] + right[0]) / 2) == (vs_side == "left")


def test_bilateral_tumours_go_in_one_vs_segment(scene):
    volume = add_volume(scene, make_image())
    segmentation, measurements = _segment(volume, vs_side="both")
    assert measurements.vs_side == "bilateral"
    assert measurements.vs_left_volume_mm3 > 0 and measurements.vs_right_volume_mm3 > 0
    assert segment_mask(segmentation, vmrml.SEGMENT_VS, volume).sum() > 0


def test_no_tumour_leaves_an_empty_vs_segment_to_paint(scene):
    volume = add_volume(scene, make_image())
    segmentation, measurements = _segment(volume, vs_side=None)
    assert not measurements.vs_present
    assert segmentation.GetSegmentation().GetSegment(vmrml.SEGMENT_VS) is not None
    assert vmrml.segmentation_to_labels(segmentation).GetSize() == volume.GetImageData().GetDimensions()


def test_volumes_are_voxel_count_times_voxel_volume(scene):
    image = make_image(spacing=(0.45, 0.6, 1.3))
    volume = add_volume(scene, image)
    segmentation, measurements = _segment(volume)
    voxel_mm3 = 0.45 * 0.6 * 1.3

    vs_voxels = segment_mask(segmentation, vmrml.SEGMENT_VS, volume).sum()
    left_voxels = segment_mask(segmentation, vmrml.SEGMENT_COCHLEA_LEFT, volume).sum()
    right_voxels = segment_mask(segmentation, vmrml.SEGMENT_COCHLEA_RIGHT, volume).sum()
    assert vs_voxels > 0 and left_voxels > 0 and right_voxels > 0
    assert measurements.vs_volume_mm3 == pytest.approx(vs_voxels * voxel_mm3)
    assert measurements.vs_volume_ml == pytest.approx(vs_voxels * voxel_mm3 / 1000)
    assert measurements.cochlea_left_volume_mm3 == pytest.approx(left_voxels * voxel_mm3)
    assert measurements.cochlea_right_volume_mm3 == pytest.approx(right_voxels * voxel_mm3)


def test_segmentation_is_placed_next_to_the_input_in_the_subject_hierarchy(scene):
    volume = add_volume(scene, make_image())
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient")
    study = hierarchy.CreateStudyItem(patient, "MR study")
    hierarchy.CreateItem(study, volume)

    segmentation, _ = _segment(volume)

    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study


def test_segmentation_follows_the_volumes_parent_transform(scene):
    volume = add_volume(scene, make_image())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    segmentation, _ = _segment(volume)
    assert segmentation.GetTransformNodeID() == transform.GetID()


def test_segmentation_is_shown_in_slice_views_and_in_3d_only_when_asked(scene):
    volume = add_volume(scene, make_image())
    flat, _ = _segment(volume)
    assert flat.GetDisplayNode().GetVisibility2D() and not flat.GetDisplayNode().GetVisibility3D()
    solid, _ = _segment(volume, show_3d=True)
    assert solid.GetDisplayNode().GetVisibility3D()
    assert solid.GetSegmentation().ContainsRepresentation(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())


# ---------------------------------------------------------------------------- the user's work is safe


def _user_segmentation(scene, volume):
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my tumour")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("mine", "My tumour outline")
    mask = np.zeros(tuple(reversed(volume.GetImageData().GetDimensions())), dtype=np.uint8)
    mask[5:8, 10:14, 10:15] = 1
    oriented = vmrml._oriented_image(mask, vmrml.volume_ijk_to_ras(volume))
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(oriented, segmentation, segment_id)
    return segmentation, mask.astype(bool)


def test_an_existing_user_segmentation_is_never_overwritten_unless_asked(scene):
    volume = add_volume(scene, make_image())
    mine, mask = _user_segmentation(scene, volume)
    segmenter = FakeSegmenter()

    with pytest.raises(OutputExistsError, match="my tumour"):
        vmrml.segment_volume_node(volume, mine, segmenter=segmenter)

    assert segmenter.calls == 0, "refused before spending minutes on inference"
    assert mine.GetSegmentation().GetNumberOfSegments() == 1
    np.testing.assert_array_equal(segment_mask(mine, "mine", volume), mask)


def test_an_existing_segmentation_is_replaced_when_asked(scene):
    volume = add_volume(scene, make_image())
    mine, _ = _user_segmentation(scene, volume)
    segmentation, _ = vmrml.segment_volume_node(volume, mine, segmenter=FakeSegmenter(), overwrite=True)
    assert segmentation is mine
    ids = [mine.GetSegmentation().GetNthSegmentID(i) for i in range(mine.GetSegmentation().GetNumberOfSegments())]
    assert ids == [spec.segment_id for spec in vmrml.SEGMENTS]


def test_an_empty_segmentation_node_is_filled_without_asking(scene):
    volume = add_volume(scene, make_image())
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "new")
    segmentation, _ = _segment(volume, segmentation_node=empty)
    assert segmentation is empty and empty.GetSegmentation().GetNumberOfSegments() == 3


def test_cancel_leaves_the_scene_unchanged(scene):
    volume = add_volume(scene, make_image())
    before = node_ids(scene)
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 4  # during "predict"

    with pytest.raises(Cancelled):
        _segment(volume, cancel=cancel)
    assert node_ids(scene) == before


def test_cancelling_a_background_job_leaves_the_scene_unchanged_and_releases_memory(scene):
    volume = add_volume(scene, make_image())
    mine, mask = _user_segmentation(scene, volume)
    before = node_ids(scene)
    gate = threading.Event()
    segmenter = FakeSegmenter(gate=gate)
    job = vmrml.SegmentationJob(volume, mine, segmenter=segmenter, overwrite=True)

    job.start()
    assert job.running()
    job.cancel()
    gate.set()
    assert job.wait(10)
    with pytest.raises(Cancelled):
        job.finish()

    assert node_ids(scene) == before
    np.testing.assert_array_equal(segment_mask(mine, "mine", volume), mask)
    assert segmenter.released >= 1


def test_a_background_job_runs_the_engine_off_the_main_thread_with_rising_progress(scene):
    volume = add_volume(scene, make_image())
    segmenter = FakeSegmenter(delay_s=0.005)
    job = vmrml.SegmentationJob(volume, segmenter=segmenter)
    seen = []

    job.start()
    while job.running():
        seen.append(job.progress())
        job.wait(0.002)
    segmentation, measurements = job.finish()

    assert segmenter.threads and threading.get_ident() not in segmenter.threads
    fractions = [fraction for _, fraction in seen + [job.progress()]]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {title for title, _ in seen} <= set(vmrml.STAGE_TITLES.values())
    assert segmentation.GetScene() is scene and measurements.vs_present


def test_gpu_out_of_memory_falls_back_to_the_cpu_with_a_message(scene):
    volume = add_volume(scene, make_image())
    gpu = FakeSegmenter(device="cuda", out_of_memory=True)
    built = []

    def factory(model, device, quality):
        built.append(device)
        return FakeSegmenter(device=device)

    job = vmrml.SegmentationJob(volume, segmenter=gpu, segmenter_factory=factory)
    job.start()
    job.wait(10)
    segmentation, _ = job.finish()

    assert built == ["cpu"]
    assert gpu.released >= 1
    assert any("CPU" in message for message in job.messages)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 3


def test_the_engines_warnings_reach_the_user(scene):
    volume = add_volume(scene, make_image())
    segmenter = FakeSegmenter()
    segmenter.warnings = ["CUDA ran out of memory; this scan was segmented on the CPU."]
    job = vmrml.SegmentationJob(volume, segmenter=segmenter)
    job.start()
    job.wait(10)
    job.finish()
    assert job.messages == segmenter.warnings


def test_out_of_memory_on_the_cpu_is_not_retried(scene):
    image = make_image()
    with pytest.raises(RuntimeError, match="out of memory"):
        vmrml.run_segmenter(image, segmenter=FakeSegmenter(device="cpu", out_of_memory="always"), device="cpu",
                            segmenter_factory=lambda *a: pytest.fail("no retry expected"))


def test_the_segmenter_is_built_from_model_device_and_quality_when_not_given(scene):
    volume = add_volume(scene, make_image())
    built = []

    def factory(model, device, quality):
        built.append((model, device, quality))
        return FakeSegmenter()

    vmrml.segment_volume_node(volume, model="phantom-demo", device="cpu", quality="fast", segmenter_factory=factory)
    assert built == [("phantom-demo", "cpu", "fast")]


# -------------------------------------------------------------------------------------- after edits


def test_measurements_follow_the_users_edits(scene):
    image = make_image()
    volume = add_volume(scene, image)
    segmentation, first = _segment(volume)
    vs = segment_mask(segmentation, vmrml.SEGMENT_VS, volume)
    trimmed = vs.copy()
    slices = np.flatnonzero(vs.any(axis=(1, 2)))
    trimmed[: slices[len(slices) // 2]] = False  # the user erases the lower slices of the tumour
    assert 0 < trimmed.sum() < vs.sum()
    oriented = vmrml._oriented_image(trimmed.astype(np.uint8), vmrml.volume_ijk_to_ras(volume))
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        oriented, segmentation, vmrml.SEGMENT_VS)

    edited = vmrml.measure_segmentation(segmentation)

    voxel_mm3 = float(np.prod(image.GetSpacing()))
    assert edited.vs_volume_mm3 == pytest.approx(trimmed.sum() * voxel_mm3)
    assert edited.cochlea_left_volume_mm3 == pytest.approx(first.cochlea_left_volume_mm3)
    assert edited.vs_confidence == pytest.approx(0.9), "the model's confidence is kept"
    assert vmrml.stored_measurements(segmentation)["vs_volume_mm3"] == pytest.approx(edited.vs_volume_mm3)


def test_segments_drawn_by_hand_are_recognised_by_name():
    def segment(name):
        s = slicer.vtkSegment()
        s.SetName(name)
        return s

    assert vmrml.segment_label(segment("VS")) == VS
    assert vmrml.segment_label(segment("Tumour")) == VS
    assert vmrml.segment_label(segment("cochlea R")) == COCHLEA
    assert vmrml.segment_label(segment("Segment_1")) is None


def test_format_measurements_gives_units_and_dashes():
    text = vmrml.format_measurements({"vs_present": True, "vs_side": "left", "vs_volume_mm3": 1234.5,
                                      "vs_volume_ml": 1.2345, "vs_max_diameter_mm": 17.04,
                                      "cochlea_left_volume_mm3": 80.0, "cochlea_right_volume_mm3": None,
                                      "vs_confidence": 0.91, "cochlea_confidence": None})
    assert text["vs_volume"] == "1234.5 mm³ (1.234 mL)"
    assert text["vs_side"] == "left" and text["vs_diameter"] == "17.0 mm"
    assert text["cochlea_right"] == "–" and text["confidence"] == "VS 0.91"
    assert vmrml.format_measurements({"vs_present": False, "vs_side": None})["vs_side"] == "no tumour found"
    assert set(vmrml.format_measurements(None).values()) == {"–"}


# --------------------------------------------------------------------------------------------- export


def test_export_writes_crossmoda_labels_seg_nrrd_and_csv(scene, tmp_path):
    image = make_image(direction=OBLIQUE)
    volume = add_volume(scene, image, name="Patient 7: hrT2")
    segmentation, measurements = _segment(volume)

    paths = vmrml.export_segmentation(segmentation, tmp_path, reference_volume_node=volume)

    assert paths["labels"].name == "Patient_7_hrT2_VS-cochlea_seg.nii.gz"
    written = sitk.ReadImage(str(paths["labels"]))
    expected = phantom_labels(vmrml.volume_node_to_sitk(volume), "left")[0]
    assert written.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(expected))
    np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), image.GetDirection(), atol=1e-4)
    reread = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reread")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(paths["segmentation"]))
    assert storage.ReadData(reread)
    segments = reread.GetSegmentation()
    assert sorted(segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())) == [
        "Cochlea left", "Cochlea right", "Vestibular schwannoma"]
    with open(paths["csv"], newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 1 and rows[0]["vs_side"] == "left"
    assert float(rows[0]["vs_volume_mm3"]) == pytest.approx(measurements.vs_volume_mm3)
    assert rows[0]["model"] == "fake 0.0"


def test_export_never_overwrites(scene, tmp_path):
    volume = add_volume(scene, make_image())
    segmentation, _ = _segment(volume)
    paths = vmrml.export_segmentation(segmentation, tmp_path, "case")
    paths["csv"].write_text("the user's own notes")

    with pytest.raises(OutputExistsError):
        vmrml.export_segmentation(segmentation, tmp_path, "case")

    assert paths["csv"].read_text(encoding="utf-8") == "the user's own notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values()), "no temp files left"


def test_export_maps_hand_drawn_segments_to_crossmoda_labels(scene, tmp_path):
    volume = add_volume(scene, make_image())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "manual")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    shape = tuple(reversed(volume.GetImageData().GetDimensions()))
    drawn = {"Cochlea R": (COCHLEA, np.s_[2:4, 3:6, 3:6]), "VS": (VS, np.s_[6:9, 10:14, 10:14]),
             "Cochlea L": (COCHLEA, np.s_[2:4, 20:23, 30:33]), "Skull": (None, np.s_[0:2, 0:30, 0:30])}
    expected = np.zeros(shape, dtype=np.uint8)
    for name, (label, where) in drawn.items():
        mask = np.zeros(shape, dtype=np.uint8)
        mask[where] = 1
        segment_id = segmentation.GetSegmentation().AddEmptySegment("", name)
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            vmrml._oriented_image(mask, vmrml.volume_ijk_to_ras(volume)), segmentation, segment_id)
        if label:
            expected[where] = label

    labels = vmrml.segmentation_to_labels(segmentation, volume)

    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)


# ---------------------------------------------------------------------------------------------- batch


def _write_cases(folder, n=2):
    folder.mkdir()
    for i in range(n):
        sitk.WriteImage(make_image(direction=[OBLIQUE, np.eye(3)][i % 2], seed=i), str(folder / f"case{i}_hrT2.nii.gz"))


def test_process_folder_segments_every_scan_and_writes_a_summary(tmp_path):
    _write_cases(tmp_path / "in", 2)
    (tmp_path / "in" / "broken_hrT2.nii.gz").write_bytes(b"not an image")
    segmenter = FakeSegmenter()
    messages = []

    records = vmrml.process_folder(tmp_path / "in", tmp_path / "out", segmenter=segmenter,
                                   progress=lambda message, fraction: messages.append((message, fraction)))

    status = {r["case"]: r["status"] for r in records}
    assert status == {"broken_hrT2": "failed", "case0_hrT2": "done", "case1_hrT2": "done"}
    for case in ("case0_hrT2", "case1_hrT2"):
        labels = sitk.ReadImage(str(tmp_path / "out" / f"{case}_seg.nii.gz"))
        source = sitk.ReadImage(str(tmp_path / "in" / f"{case}.nii.gz"))
        assert vmrml.same_grid(labels, source)
        assert set(np.unique(sitk.GetArrayFromImage(labels))) == {0, VS, COCHLEA}
    summaries = list((tmp_path / "out").glob("summary_measurements_*.csv"))
    assert len(summaries) == 1
    with open(summaries[0], newline="", encoding="utf-8") as stream:
        assert [row["case"] for row in csv.DictReader(stream)] == ["case0_hrT2", "case1_hrT2"]
    assert [f for _, f in messages] == sorted(f for _, f in messages) and messages[-1][1] == 1.0


def test_process_folder_skips_cases_already_done(tmp_path):
    _write_cases(tmp_path / "in", 1)
    vmrml.process_folder(tmp_path / "in", tmp_path / "out", segmenter=FakeSegmenter())
    again = FakeSegmenter()
    records = vmrml.process_folder(tmp_path / "in", tmp_path / "out", segmenter=again)
    assert [r["status"] for r in records] == ["skipped"] and again.calls == 0


def test_process_folder_stops_on_cancel(tmp_path):
    _write_cases(tmp_path / "in", 2)
    with pytest.raises(Cancelled):
        vmrml.process_folder(tmp_path / "in", tmp_path / "out", segmenter=FakeSegmenter(), cancel=lambda: True)
    assert not list((tmp_path / "out").glob("*_seg.nii.gz"))


def test_process_folder_leaves_the_displayed_scene_alone(scene, tmp_path):
    _write_cases(tmp_path / "in", 1)
    before = node_ids(scene)
    vmrml.process_folder(tmp_path / "in", tmp_path / "out", segmenter=FakeSegmenter())
    assert node_ids(scene) == before
