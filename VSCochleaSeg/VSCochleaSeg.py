"""3D Slicer module: segment the vestibular schwannoma and both cochleae on an hrT2 MRI with one click.

Module / Widget / Logic / Test shells only. Everything that computes lives in ``VSCochleaSegLib``
(``mrml`` for the MRML glue, ``slicer_deps`` for installing dependencies, the engine for inference),
so it can be used from the Python console and tested without the GUI.
"""

import logging
import os
import traceback
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from VSCochleaSegLib import mrml, slicer_deps
from VSCochleaSegLib.errors import Cancelled, VSCochleaSegError

MODULE_DIR = Path(__file__).resolve().parent
# Repository layout (and the extension's install layout, see CMakeLists.txt): <root>/VSCochleaSeg/VSCochleaSeg.py
# next to <root>/Resources/{Models,Samples}.
SAMPLE_PATH = MODULE_DIR.parent / "Resources" / "Samples" / "phantom_sample_hrT2.nii.gz"
SAMPLE_NODE_NAME = "phantom_sample_hrT2"

DEVICES = (("Auto (GPU if available)", "auto"), ("CPU", "cpu"), ("GPU (CUDA)", "cuda"))
QUALITIES = (("Full ensemble (best)", "full"), ("Fast (single model)", "fast"))
DEFAULT_MODEL_TEXT = "Default model"
# How often the GUI looks at a running segmentation, and how long it waits after an edit before re-measuring.
POLL_MS = 100
REMEASURE_DELAY_MS = 400


#
# VSCochleaSeg
#


class VSCochleaSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "VS Cochlea Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["VSCochleaSeg contributors"]
        self.parent.helpText = """
Segments the <b>vestibular schwannoma</b> (VS) and <b>both cochleae</b> on a high-resolution T2 MRI
(CISS/FIESTA, hrT2) and measures the tumour.
<ol>
<li>Select the hrT2 volume (try <i>Sample Data → VSCochleaSeg phantom</i>).</li>
<li>Click <b>Apply</b> (it becomes <b>Cancel</b> while running). The first run asks to install PyTorch and MONAI.</li>
<li>Read the tumour side, volume (mm³ and mL), maximal diameter and cochlea volumes. Correct the result with
<b>Edit in Segment Editor</b>; the measurements follow your edits.</li>
<li><b>Export</b> writes a CrossMoDA label map (.nii.gz: 1 = VS, 2 = cochlea), the .seg.nrrd and a CSV.</li>
</ol>
Whole folders: <code>from VSCochleaSegLib import mrml; mrml.process_folder(in_dir, out_dir)</code> in the Python console.
<p><b>Limits:</b> research software, not a medical device. Trained for hrT2 only (not ceT1, not T2 FLAIR);
expects the whole inner-ear region in the field of view. Check every result. Volumes are counted on the
scan's grid and depend on its resolution. The bundled demo model is trained on phantoms; use a model
trained on real scans for real patients.</p>
See <a href="https://github.com/vscochleaseg/VSCochleaSeg/blob/main/docs/slicer.md">docs/slicer.md</a>.
"""
        self.parent.acknowledgementText = """
VSCochleaSeg reproduces two approaches of the MICCAI 2021 cross-modality domain adaptation challenge
(crossMoDA): (a) ceT1→hrT2 image translation with segmentation-aware CycleGANs, nnU-Net-style 2D/3D
segmentation and self-training on pseudo-labels; (b) contrastive (CUT) translation, Mean Teacher
training and label fusion by noisy-label correction. Please cite the challenge:
R. Dorent et al., "CrossMoDA 2021 challenge: Benchmark of cross-modality domain adaptation techniques for
vestibular schwannoma and cochlea segmentation", Medical Image Analysis 83 (2023) 102628,
and the two methods' papers listed in the project's README. Data: crossMoDA (CC-BY-SA 4.0, TCIA).
"""
        slicer.app.connect("startupCompleted()", registerSampleData)


_sampleRegistered = False


def registerSampleData():
    """Add the bundled phantom hrT2 to the Sample Data module (if it is installed with the extension)."""
    global _sampleRegistered
    if _sampleRegistered or not SAMPLE_PATH.exists():
        return
    import SampleData

    _sampleRegistered = True

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="VSCochleaSeg",
        sampleName="VSCochleaSeg phantom",
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "VSCochleaSegSample.png"),
        uris=qt.QUrl.fromLocalFile(str(SAMPLE_PATH)).toString(),
        fileNames=SAMPLE_PATH.name,
        nodeNames=SAMPLE_NODE_NAME,
        loadFileType="VolumeFile",
    )


#
# VSCochleaSegParameterNode
#


@parameterNodeWrapper
class VSCochleaSegParameterNode:
    """The module's state, saved with the scene.

    inputVolume: the hrT2 scan. outputSegmentation: None creates a new segmentation on Apply.
    model: "" for the default bundled model, a model name or a model folder path.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    model: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    quality: Annotated[str, Choice(["full", "fast"])] = "full"
    show3D: bool = False


#
# VSCochleaSegWidget
#


class VSCochleaSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._observedSegmentation = None
        self._pollTimer = None
        self._remeasureTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VSCochleaSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VSCochleaSegLogic()

        for text, value in DEVICES:
            self.ui.deviceComboBox.addItem(text, value)
        for text, value in QUALITIES:
            self.ui.qualityComboBox.addItem(text, value)
        self._fillModels()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadModelFolderButton.connect("clicked(bool)", self.onLoadModelFolder)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onChoiceChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onChoiceChanged)
        self.ui.qualityComboBox.connect("currentIndexChanged(int)", self.onChoiceChanged)
        self.ui.editButton.connect("clicked(bool)", self.onEditButton)
        self.ui.show3DButton.connect("clicked(bool)", self.onShow3DButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)
        self._remeasureTimer = qt.QTimer()
        self._remeasureTimer.setSingleShot(True)
        self._remeasureTimer.setInterval(REMEASURE_DELAY_MS)
        self._remeasureTimer.connect("timeout()", self.onRemeasure)

        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None and self._job.running():
            self._job.cancel()
        self._pollTimer.stop()
        self._remeasureTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None and self._job.running():
            self._job.cancel()
        self._observeSegmentation(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode: Optional[VSCochleaSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
            self._updateGUI()

    # ------------------------------------------------------------------------------------ state → GUI

    def _fillModels(self) -> None:
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(DEFAULT_MODEL_TEXT, "")
        for text, value in self.logic.modelChoices():
            combo.addItem(text, value)
        combo.blockSignals(wasBlocked)

    def _selectData(self, combo, value) -> None:
        index = combo.findData(value)
        if index < 0 and combo is self.ui.modelComboBox and value:
            combo.addItem(os.path.basename(value.rstrip("/\\")) or value, value)
            index = combo.count - 1
        wasBlocked = combo.blockSignals(True)
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(wasBlocked)

    def _updateGUI(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None:
            return
        self._selectData(self.ui.modelComboBox, node.model)
        self._selectData(self.ui.deviceComboBox, node.device)
        self._selectData(self.ui.qualityComboBox, node.quality)
        running = self._job is not None and self._job.running()
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.applyButton.toolTip = "Stop the segmentation; the scene stays as it was." if running else \
            "Segment the VS and both cochleae of the input volume."
        self.ui.applyButton.enabled = running or bool(node.inputVolume)
        for widget in (self.ui.inputsCollapsibleButton, self.ui.modelComboBox, self.ui.loadModelFolderButton):
            widget.enabled = not running
        segmentation = node.outputSegmentation
        hasResult = bool(segmentation) and segmentation.GetSegmentation().GetNumberOfSegments() > 0
        for button in (self.ui.editButton, self.ui.show3DButton, self.ui.exportButton):
            button.enabled = hasResult and not running
        self._observeSegmentation(segmentation if hasResult else None)
        self._showMeasurements(mrml.stored_measurements(segmentation) if hasResult else None)

    def _showMeasurements(self, values) -> None:
        text = mrml.format_measurements(values)
        self.ui.vsSideValueLabel.text = text["vs_side"]
        self.ui.vsVolumeValueLabel.text = text["vs_volume"]
        self.ui.vsDiameterValueLabel.text = text["vs_diameter"]
        self.ui.cochleaLeftValueLabel.text = text["cochlea_left"]
        self.ui.cochleaRightValueLabel.text = text["cochlea_right"]
        self.ui.confidenceValueLabel.text = text["confidence"]

    def _setStatus(self, message: str) -> None:
        self.ui.statusLabel.text = message
        slicer.util.showStatusMessage(message, 3000)

    # ------------------------------------------------------------------------------------ GUI → state

    def onChoiceChanged(self, _index=None) -> None:
        if self._parameterNode is None:
            return
        self._parameterNode.model = self.ui.modelComboBox.currentData or ""
        self._parameterNode.device = self.ui.deviceComboBox.currentData
        self._parameterNode.quality = self.ui.qualityComboBox.currentData

    def onLoadModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Select a model folder (holding model.json)")
        if not folder:
            return
        if not os.path.isfile(os.path.join(folder, "model.json")):
            slicer.util.errorDisplay(f"{folder} holds no model.json; select a VSCochleaSeg model folder.")
            return
        self._parameterNode.model = folder

    def onOutputChanged(self, _node=None) -> None:
        self._updateGUI()

    # ------------------------------------------------------------------------------------------- run

    def onApplyButton(self) -> None:
        if self._job is not None and self._job.running():
            self._job.cancel()
            self._setStatus("Cancelling...")
            self.ui.applyButton.enabled = False
            return
        if not self._ensureDependencies():
            return
        node = self._parameterNode
        output = node.outputSegmentation
        overwrite = False
        if output is not None and output.GetSegmentation().GetNumberOfSegments() > 0:
            if not slicer.util.confirmYesNoDisplay(
                    f"Segmentation '{output.GetName()}' already has segments. Replace them with the new result?"):
                return
            overwrite = True
        try:
            self._job = self.logic.startSegmentation(node.inputVolume, output, model=node.model or None,
                                                     device=node.device, quality=node.quality,
                                                     overwrite=overwrite, show3D=node.show3D)
        except VSCochleaSegError as error:
            slicer.util.errorDisplay(str(error))
            return
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(True)
        self._setStatus("Starting...")
        self._pollTimer.start()
        self._updateGUI()

    def onPoll(self) -> None:
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        title, fraction = job.progress()
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        self.ui.progressBar.setFormat(f"{title} %p%")
        if job.running():
            return
        self._pollTimer.stop()
        try:
            segmentation, _ = self.logic.finishSegmentation(job)
            self._parameterNode.outputSegmentation = segmentation
            messages = "; ".join(job.messages)
            self._setStatus("Done." + (f" {messages}" if messages else ""))
        except Cancelled:
            self._setStatus("Cancelled; nothing was changed.")
        except VSCochleaSegError as error:
            self._setStatus("Failed.")
            slicer.util.errorDisplay(str(error))
        except Exception as error:  # noqa: BLE001 - show the user, keep the module usable
            self._setStatus("Failed.")
            slicer.util.errorDisplay(f"Segmentation failed: {error}", detailedText=traceback.format_exc())
        finally:
            self._job = None
            self.ui.progressBar.setVisible(False)
            self._updateGUI()

    def _ensureDependencies(self) -> bool:
        plan = slicer_deps.install_plan()
        if plan.empty:
            return True
        if not slicer.util.confirmOkCancelDisplay(slicer_deps.describe_plan(plan), "VSCochleaSeg: install packages"):
            return False
        try:
            with slicer.util.WaitCursor():
                needsRestart = slicer_deps.install(plan, log=self._setStatus)
        except Exception as error:  # noqa: BLE001 - pip/network failures are shown, not raised
            slicer.util.errorDisplay(f"Installing the packages failed: {error}", detailedText=traceback.format_exc())
            return False
        if needsRestart:
            if slicer.util.confirmYesNoDisplay("The packages were installed. Slicer must restart before they can be "
                                               "used. Restart now?"):
                slicer.util.restart()
            return False
        self._fillModels()
        self._updateGUI()
        return True

    # -------------------------------------------------------------------------------- after the run

    def _observeSegmentation(self, segmentationNode) -> None:
        if segmentationNode is self._observedSegmentation:
            return
        if self._observedSegmentation is not None:
            self.removeObservers(self.onSegmentationEdited)
        self._observedSegmentation = segmentationNode
        if segmentationNode is not None:
            segmentation = segmentationNode.GetSegmentation()
            for event in self.logic.segmentationEditEvents():
                self.addObserver(segmentation, event, self.onSegmentationEdited)

    def onSegmentationEdited(self, caller=None, event=None) -> None:
        if self._job is None:
            self._remeasureTimer.start()  # restarts: measure once the user pauses

    def onRemeasure(self) -> None:
        segmentation = self._observedSegmentation
        if segmentation is None or segmentation.GetScene() is None:
            return
        try:
            measurements = self.logic.measure(segmentation, self._parameterNode.inputVolume)
            self._showMeasurements(measurements.to_dict())
        except Exception as error:  # noqa: BLE001 - a failed re-measure must not break editing
            logging.warning("VSCochleaSeg: could not re-measure: %s", error)

    def onEditButton(self) -> None:
        segmentation = self._parameterNode.outputSegmentation
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        volume = self._parameterNode.inputVolume
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(volume)
        else:  # Slicer < 5.4
            editor.setMasterVolumeNode(volume)

    def onShow3DButton(self) -> None:
        segmentation = self._parameterNode.outputSegmentation
        mrml.show_segmentation(segmentation, show_3d=True)
        layoutManager = slicer.app.layoutManager()
        if layoutManager and layoutManager.threeDWidget(0):
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    def onExportButton(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Export VS/cochlea segmentation to folder")
        if not folder:
            return
        try:
            paths = self.logic.export(self._parameterNode.outputSegmentation, folder, self._parameterNode.inputVolume)
        except VSCochleaSegError as error:
            slicer.util.errorDisplay(str(error))
            return
        self._setStatus("Exported " + ", ".join(os.path.basename(str(p)) for p in paths.values()))


#
# VSCochleaSegLogic
#


class VSCochleaSegLogic(ScriptedLoadableModuleLogic):
    """Delegates to :mod:`VSCochleaSegLib.mrml` and keeps the loaded model between runs.

    Usage in the Python console::

        logic = slicer.util.getModuleLogic("VSCochleaSeg")
        segmentation, measurements = logic.segment(slicer.util.getNode("phantom_sample_hrT2"), quality="fast")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._segmenter = None
        self._segmenterKey = None

    def getParameterNode(self):
        return VSCochleaSegParameterNode(super().getParameterNode())

    def _cachedSegmenter(self, key):
        return self._segmenter if key == self._segmenterKey else None

    def _keep(self, key, segmenter) -> None:
        self._segmenter, self._segmenterKey = segmenter, key

    def segment(self, volumeNode, segmentationNode=None, model=None, device="auto", quality="full",
                overwrite=False, progress=None, cancel=None, show3D=False):
        """Synchronous segmentation (console, tests): returns (segmentation node, measurements)."""
        mrml.check_segmentation_writable(segmentationNode, overwrite)  # before spending time on loading a model
        key = (model, device, quality)
        segmenter = self._cachedSegmenter(key) or mrml.default_segmenter_factory(model, device, quality)
        self._keep(key, segmenter)
        return mrml.segment_volume_node(volumeNode, segmentationNode, model=model, device=device, quality=quality,
                                        progress=progress, cancel=cancel, overwrite=overwrite, segmenter=segmenter,
                                        show_3d=show3D)

    def startSegmentation(self, volumeNode, segmentationNode=None, model=None, device="auto", quality="full",
                          overwrite=False, show3D=False) -> "mrml.SegmentationJob":
        """Start a background segmentation; poll the returned job, then call :meth:`finishSegmentation`."""
        job = mrml.SegmentationJob(volumeNode, segmentationNode, model=model, device=device, quality=quality,
                                   overwrite=overwrite, show_3d=show3D,
                                   segmenter=self._cachedSegmenter((model, device, quality)))
        job.key = (model, device, quality)
        job.start()
        return job

    def finishSegmentation(self, job):
        """Main thread: put the job's result in the scene and keep its model loaded for the next run."""
        if job.segmenter is not None:
            self._keep(job.key, job.segmenter)
        return job.finish()

    @staticmethod
    def segmentationEditEvents():
        """vtkSegmentation events that mean the user changed the segmentation."""
        Segmentation = slicer.vtkSegmentation
        sourceModified = getattr(Segmentation, "SourceRepresentationModified",
                                 getattr(Segmentation, "MasterRepresentationModified", None))
        events = [Segmentation.SegmentAdded, Segmentation.SegmentRemoved, Segmentation.SegmentModified]
        return events + ([sourceModified] if sourceModified is not None else [])

    def measure(self, segmentationNode, referenceVolumeNode=None):
        return mrml.measure_segmentation(segmentationNode, referenceVolumeNode)

    def export(self, segmentationNode, folder, referenceVolumeNode=None):
        return mrml.export_segmentation(segmentationNode, folder, reference_volume_node=referenceVolumeNode)

    def processFolder(self, inputFolder, outputFolder, **kwargs):
        """Batch: see :func:`VSCochleaSegLib.mrml.process_folder`."""
        return mrml.process_folder(inputFolder, outputFolder, **kwargs)

    @staticmethod
    def modelChoices():
        """[(text, value)] of the models found on this computer; empty before the dependencies are installed."""
        try:
            from VSCochleaSegLib.model_folder import list_models

            rows = list_models()
        except Exception as error:  # noqa: BLE001 - torch missing, unreadable registry...
            logging.info("VSCochleaSeg: model list unavailable (%s)", error)
            return []
        return [(f"{row['name']} {row.get('version', '')}".strip(), row["name"]) for row in rows
                if row.get("source") in ("bundled", "extra", "cache")]


#
# VSCochleaSegTest
#


class VSCochleaSegTest(ScriptedLoadableModuleTest):
    """Runs in Slicer: ``Slicer --no-main-window --python-code "...; slicer.util.selfTest('VSCochleaSeg')"``,
    see docs/slicer.md. Needs the bundled sample and model, and the Python dependencies installed."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LogicOnSample()
        self.setUp()
        self.test_WidgetApplyAndCancel()

    def _loadSample(self):
        self.assertTrue(SAMPLE_PATH.exists(), f"sample missing: {SAMPLE_PATH}")
        registerSampleData()
        import SampleData

        return SampleData.downloadSample("VSCochleaSeg phantom")

    def test_LogicOnSample(self):
        self.delayDisplay("Segmenting the sample with the logic")
        self.assertTrue(slicer_deps.install_plan().empty, "install the Python dependencies first")
        volume = self._loadSample()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        logic = VSCochleaSegLogic()
        with self.assertRaises(Cancelled):
            logic.segment(volume, quality="fast", device="cpu", cancel=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)

        stages = []
        segmentation, measurements = logic.segment(volume, quality="fast", device="cpu",
                                                   progress=lambda stage, fraction: stages.append(stage))
        names = [segmentation.GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(segmentation.GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, ["Vestibular schwannoma", "Cochlea left", "Cochlea right"])
        self.assertIn("predict", stages)
        self.assertTrue(measurements.vs_present)
        self.assertGreater(measurements.cochlea_left_volume_mm3, 0)
        self.assertGreater(measurements.cochlea_right_volume_mm3, 0)
        again = logic.measure(segmentation, volume)
        self.assertAlmostEqual(again.vs_volume_mm3, measurements.vs_volume_mm3, places=3)
        with self.assertRaises(VSCochleaSegError):
            logic.segment(volume, segmentation, quality="fast", device="cpu")
        self.delayDisplay("Logic test passed")

    def test_WidgetApplyAndCancel(self):
        self.delayDisplay("Apply and Cancel through the module's GUI")
        volume = self._loadSample()
        widget = slicer.util.getModuleWidget("VSCochleaSeg")  # works without a main window too
        widget.initializeParameterNode()
        widget._parameterNode.inputVolume = volume
        widget._parameterNode.outputSegmentation = None
        widget._parameterNode.quality = "fast"
        widget._parameterNode.device = "cpu"
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()

        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        widget.ui.applyButton.click()
        self._waitForJob(widget)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.assertEqual(widget.ui.applyButton.text, "Apply")

        widget.ui.applyButton.click()
        self._waitForJob(widget)
        segmentation = widget._parameterNode.outputSegmentation
        self.assertIsNotNone(segmentation)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 3)
        self.assertNotEqual(widget.ui.vsVolumeValueLabel.text, "–")
        self.assertTrue(widget.ui.exportButton.enabled)
        self.delayDisplay("Widget test passed")

    def _waitForJob(self, widget, timeoutS=600):
        import time

        start = time.time()
        while widget._job is not None and time.time() - start < timeoutS:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertIsNone(widget._job, "segmentation did not finish in time")
