# No "from __future__ import annotations" here: @parameterNodeWrapper reads the class annotations
# at runtime, so they must be real types (and only Python 3.9 syntax, for Slicer 5.8).
import logging
import os

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SimpleSliceNetLib import mrml_adapter
from SimpleSliceNetLib.job_runner import JobError
from SimpleSliceNetLib.lesions import MIN_LESION_ML
from SimpleSliceNetLib.slicer_logic import (
    UNCERTAINTY_COLUMN,
    AnomalyDetectionLogic,
    elapsed_text,
    lesion_rows,
    metric_text,
    missing_requirements,
    model_info_text,
)

SETTINGS_MODEL = "SimpleSliceNet/Model"
SETTINGS_DEVICE = "SimpleSliceNet/Device"
SETTINGS_EXPORT_DIR = "SimpleSliceNet/ExportDirectory"


class SimpleSliceNet(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SimpleSliceNet"
        self.parent.categories = ["Neuroimaging"]
        self.parent.dependencies = []
        self.parent.contributors = ["SimpleSliceNet contributors"]
        self.parent.helpText = (
            "Unsupervised anomaly detection in 3D brain MRI. Select an MRI volume and click "
            "<b>Detect anomalies</b>: a heatmap (brighter = more unusual), a label map of candidate "
            "lesions and a lesion table appear. Drag the threshold to update them instantly. "
            "U2AD models also give uncertainty maps (shown under <b>Overlay</b>) and a per-lesion uncertainty. "
            "Train your own model on healthy scans in the Training section. "
            "Research tool: not for clinical use."
        )
        self.parent.acknowledgementText = (
            "Implements SimpleSliceNet (Zhang and Mohsenzadeh, arXiv 2408.15958) and U2AD "
            "(Zhang et al., arXiv 2503.13400)."
        )


@parameterNodeWrapper
class SimpleSliceNetParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    heatmapVolume: vtkMRMLScalarVolumeNode
    labelVolume: vtkMRMLLabelMapVolumeNode
    model: str = ""
    device: str = "auto"
    threshold: float = 0.5
    minLesionVolumeMl: float = MIN_LESION_ML
    overlayOpacity: float = 0.5
    trainingModelName: str = "my-model"
    trainingEpochs: int = 30
    trainingTimeBudgetMin: int = 0


class SimpleSliceNetWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI wiring only: every action is a call into the logic."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.detectJob = None
        self.trainJob = None
        self.modelsJob = None
        self.importJob = None
        self.models = []
        self.lesions = []
        self._modelToSelect = ""

    def _resource(self, relativePath):
        path = self.resourcePath(relativePath)
        if not os.path.exists(path):
            # Running from the source tree, where Resources/ sits beside the module folder.
            path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", relativePath)
        return path

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self._resource("UI/SimpleSliceNet.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SimpleSliceNetLogic()
        self.settings = qt.QSettings()

        self.ui.trainingPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Files
        self.ui.validationPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Files
        self.ui.lesionTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.ResizeToContents)
        self.ui.lesionTable.setColumnHidden(UNCERTAINTY_COLUMN, True)

        # One timer polls the child processes; another debounces the threshold slider.
        self.jobTimer = qt.QTimer()
        self.jobTimer.setInterval(100)
        self.jobTimer.timeout.connect(self.onJobTimer)
        self.thresholdTimer = qt.QTimer()
        self.thresholdTimer.setSingleShot(True)
        self.thresholdTimer.setInterval(150)
        self.thresholdTimer.timeout.connect(self.updateThreshold)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.thresholdSliderWidget.connect("valueChanged(double)", lambda value: self.thresholdTimer.start())
        self.ui.minLesionVolumeSpinBox.connect("valueChanged(double)", lambda value: self.thresholdTimer.start())
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.overlayComboBox.connect("currentIndexChanged(int)", self.onOverlayChanged)
        self.ui.lesionTable.connect("cellClicked(int,int)", self.onLesionClicked)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.trainFromNodesRadioButton.connect("toggled(bool)", self.updateTrainingSource)
        self.ui.heatmapSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onHeatmapChanged)

        self.initializeParameterNode()
        self.updateTrainingSource()
        self.refreshModels()

    def cleanup(self):
        for job in (self.detectJob, self.trainJob, self.modelsJob, self.importJob):
            if job is not None:
                job.cancel()
        self.jobTimer.stop()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIState)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volumes = [
                n
                for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                if not n.GetAttribute(mrml_adapter.ROLE_ATTRIBUTE)
            ]
            volumes = [n for n in volumes if not n.IsA("vtkMRMLLabelMapVolumeNode")]
            if volumes:
                self._parameterNode.inputVolume = volumes[0]
        rememberedDevice = str(self.settings.value(SETTINGS_DEVICE, "auto"))
        if self._parameterNode.device == "auto" and rememberedDevice != "auto":
            self._parameterNode.device = rememberedDevice

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIState)
        self.updateGUIState()

    def updateGUIState(self, caller=None, event=None):
        p = self._parameterNode
        running = self.detectJob is not None
        if running:
            self.ui.detectButton.text = "Cancel"
            self.ui.detectButton.enabled = True
        else:
            self.ui.detectButton.text = "Detect anomalies"
            self.ui.detectButton.enabled = bool(p and p.inputVolume)
        hasResults = bool(p and p.heatmapVolume and p.labelVolume)
        for widget in (self.ui.thresholdSliderWidget, self.ui.minLesionVolumeSpinBox, self.ui.exportButton):
            widget.enabled = hasResults and not running
        self.ui.trainButton.text = "Stop training" if self.trainJob is not None else "Start training"

    # -- models ---------------------------------------------------------------------------------

    def refreshModels(self, select=""):
        if missing_requirements():
            self.ui.modelInfoLabel.text = "Models are listed once the Python packages are installed (first Detect)."
            return
        self._modelToSelect = select or self._parameterNode.model or str(self.settings.value(SETTINGS_MODEL, ""))
        self.modelsJob = self.logic.listModels(waitForCompletion=False)
        self.jobTimer.start()

    def onModelsListed(self):
        job, self.modelsJob = self.modelsJob, None
        try:
            self.models = job.result()
        except JobError as error:
            self.ui.modelInfoLabel.text = f"Cannot list models: {error}"
            return
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for model in self.models:
            combo.addItem(f"{model.get('name') or model['id']} ({model.get('source', '')})", model["id"])
        index = max(0, combo.findData(self._modelToSelect))
        combo.setCurrentIndex(index)
        combo.blockSignals(wasBlocked)
        self.onModelChanged(index)

    def onModelChanged(self, index):
        if not (0 <= index < len(self.models)):
            self.ui.modelInfoLabel.text = "No model found: import one or train one below."
            return
        model = self.models[index]
        self.ui.modelInfoLabel.text = model_info_text(model)
        self.ui.modelInfoLabel.toolTip = model.get("description", "") or model.get("path", "")
        if self._parameterNode:
            self._parameterNode.model = model["id"]
        self.settings.setValue(SETTINGS_MODEL, model["id"])

    def onDeviceChanged(self, index):
        self.settings.setValue(SETTINGS_DEVICE, self.ui.deviceComboBox.currentText)

    def onImportModel(self):
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "Import model file", "", "SimpleSliceNet model (*.json)"
        )
        if not path or not self.ensureDependencies():
            return
        self.ui.statusLabel.text = "Checking the model file..."
        self.importJob = self.logic.importModelFile(path, waitForCompletion=False)
        self.jobTimer.start()

    def onModelImported(self):
        job, self.importJob = self.importJob, None
        try:
            path = job.result()
        except JobError as error:
            self.ui.statusLabel.text = "Import failed."
            slicer.util.errorDisplay(f"The model could not be imported:\n{error}")
            return
        self.ui.statusLabel.text = f"Imported {os.path.basename(str(path))}."
        self.refreshModels(select=os.path.splitext(os.path.basename(str(path)))[0])

    # -- dependencies ---------------------------------------------------------------------------

    def ensureDependencies(self):
        missing = missing_requirements()
        if not missing:
            return True
        names = ", ".join(r.pip for r in missing)
        if not slicer.util.confirmOkCancelDisplay(
            "SimpleSliceNet needs Python packages that are not installed yet:\n\n"
            f"{names}\n\nInstall them now? This downloads PyTorch (several GB) and can take minutes.",
            windowTitle="SimpleSliceNet: install dependencies",
        ):
            return False
        with slicer.util.tryWithErrorDisplay("Installing the Python packages failed.", waitCursor=True):
            self.ui.statusLabel.text = "Installing Python packages..."
            slicer.app.processEvents()
            self.logic.installDependencies(missing)
        ok = not missing_requirements()
        self.ui.statusLabel.text = "Packages installed." if ok else "Some packages are still missing."
        if ok:
            self.refreshModels()
        return ok

    # -- detection ------------------------------------------------------------------------------

    def onDetectButton(self):
        if self.detectJob is not None:
            self.detectJob.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            return
        if not self.ensureDependencies():
            return
        p = self._parameterNode
        try:
            self.detectJob = self.logic.detect(
                p.inputVolume,
                model=p.model or None,
                device=p.device,
                heatmapNode=p.heatmapVolume,
                labelNode=p.labelVolume,
                waitForCompletion=False,
                progressCallback=self.onDetectProgress,
                minLesionVolumeMl=p.minLesionVolumeMl,
                messageCallback=self.onEngineMessage,
            )
        except Exception as error:
            slicer.util.errorDisplay(f"Detection could not start:\n{error}")
            return
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = "Starting the engine..."
        self.jobTimer.start()
        self.updateGUIState()

    def onDetectProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(100 * fraction))
        if message:
            self.ui.statusLabel.text = message

    def onEngineMessage(self, message):
        # Device fallbacks and similar notes from the engine.
        self.ui.statusLabel.text = message
        logging.info(f"SimpleSliceNet: {message}")

    def onDetectFinished(self):
        job, self.detectJob = self.detectJob, None
        self.updateGUIState()
        try:
            result = job.result()
        except JobError as error:
            cancelled = job.runner.result is not None and job.runner.result.cancelled
            self.ui.statusLabel.text = "Cancelled." if cancelled else f"Failed: {error}"
            self.ui.progressBar.value = 0
            if not cancelled:
                slicer.util.errorDisplay(f"Detection failed:\n{error}")
            return
        except Exception as error:
            self.ui.statusLabel.text = f"Failed: {error}"
            slicer.util.errorDisplay(f"Detection failed:\n{error}")
            return
        p = self._parameterNode
        maximum = max(1.0, 2.0 * result.threshold, float(result.heatmapNode.GetImageData().GetScalarRange()[1]))
        p.heatmapVolume = result.heatmapNode
        p.labelVolume = result.labelNode
        self.ui.thresholdSliderWidget.maximum = maximum
        p.threshold = result.threshold
        self.thresholdTimer.stop()  # the nodes already match this threshold
        mrml_adapter.set_foreground_opacity(slicer.mrmlScene, p.overlayOpacity)
        self.showLesions(result.lesions, result.lesionUncertainty)
        self.showOverlayChoices(result.heatmapNode)
        score = "-" if result.volumeScore is None else f"{result.volumeScore:.3f}"
        self.ui.scoreLabel.text = score
        notes = f" ({'; '.join(result.messages)})" if result.messages else ""
        self.ui.statusLabel.text = (
            f"Done on {result.device or 'the engine'}: {len(result.lesions)} candidate lesion(s){notes}."
        )
        self.ui.progressBar.value = 100
        self.updateGUIState()

    def onHeatmapChanged(self, node):
        if self.detectJob is not None:
            return
        self.showOverlayChoices(node)
        if node is None:
            return
        try:
            self.showLesions(self.logic.lesions(node), self.logic.lesionUncertainty(node))
        except ValueError:
            self.showLesions([])

    # -- results --------------------------------------------------------------------------------

    def updateThreshold(self):
        p = self._parameterNode
        if not p or not p.heatmapVolume or not p.labelVolume or self.detectJob is not None:
            return
        try:
            lesions = self.logic.applyThreshold(p.heatmapVolume, p.labelVolume, p.threshold, p.minLesionVolumeMl)
        except Exception as error:
            self.ui.statusLabel.text = f"Threshold failed: {error}"
            return
        self.showLesions(lesions, self.logic.lesionUncertainty(p.heatmapVolume))
        self.ui.statusLabel.text = f"Threshold {p.threshold:.3f}: {len(lesions)} candidate lesion(s)."

    def showLesions(self, lesions, uncertainty=None):
        self.lesions = list(lesions)
        table = self.ui.lesionTable
        rows = lesion_rows(self.lesions, uncertainty)
        table.setColumnHidden(UNCERTAINTY_COLUMN, uncertainty is None)
        table.setRowCount(len(rows))
        for row, cells in enumerate(rows):
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setTextAlignment(qt.Qt.AlignRight | qt.Qt.AlignVCenter)
                table.setItem(row, column, item)

    def onLesionClicked(self, row, column):
        if 0 <= row < len(self.lesions):
            self.logic.jumpToLesion(slicer.mrmlScene, self.lesions[row])

    def onOpacityChanged(self, value):
        mrml_adapter.set_foreground_opacity(slicer.mrmlScene, value)

    def showOverlayChoices(self, heatmapNode):
        """List the heatmap and its uncertainty maps; the choice is shown only when there is one to make."""
        nodes = self.logic.overlayNodes(heatmapNode) if heatmapNode is not None else []
        combo = self.ui.overlayComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for node in nodes:
            combo.addItem(node.GetName(), node.GetID())
        combo.blockSignals(wasBlocked)
        self.ui.overlayLabel.visible = self.ui.overlayComboBox.visible = len(nodes) > 1

    def onOverlayChanged(self, index):
        node = slicer.mrmlScene.GetNodeByID(self.ui.overlayComboBox.itemData(index)) if index >= 0 else None
        if node is not None:
            mrml_adapter.show_in_slice_views(None, node, None, self._parameterNode.overlayOpacity)

    def onExport(self):
        p = self._parameterNode
        start = str(self.settings.value(SETTINGS_EXPORT_DIR, qt.QDir.homePath()))
        directory = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Export results to", start)
        if not directory:
            return
        self.settings.setValue(SETTINGS_EXPORT_DIR, directory)
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            paths = self.logic.exportResults(
                p.heatmapVolume, p.labelVolume, directory, fileFormat=self.ui.exportFormatComboBox.currentText
            )
            self.ui.statusLabel.text = f"Exported {len(paths)} files to {directory}."

    # -- training -------------------------------------------------------------------------------

    def updateTrainingSource(self, checked=None):
        fromNodes = self.ui.trainFromNodesRadioButton.checked
        self.ui.trainingNodesSelector.visible = fromNodes
        self.ui.trainingPathLineEdit.visible = not fromNodes

    def onTrainButton(self):
        if self.trainJob is not None:
            self.trainJob.cancel()
            self.ui.trainingStatusLabel.text = "Stopping..."
            return
        if not self.ensureDependencies():
            return
        p = self._parameterNode
        if self.ui.trainFromNodesRadioButton.checked:
            volumes = list(self.ui.trainingNodesSelector.checkedNodes())
        else:
            volumes = self.ui.trainingPathLineEdit.currentPath
        try:
            self.trainJob = self.logic.train(
                volumes,
                p.trainingModelName.strip(),
                validation=self.ui.validationPathLineEdit.currentPath or None,
                epochs=p.trainingEpochs,
                timeBudgetMin=p.trainingTimeBudgetMin or None,
                device=p.device,
                waitForCompletion=False,
                progressCallback=self.onTrainingProgress,
                metricCallback=self.onTrainingMetric,
                messageCallback=self.onTrainingMessage,
            )
        except Exception as error:
            slicer.util.errorDisplay(f"Training could not start:\n{error}")
            return
        self.ui.trainingProgressBar.value = 0
        self.ui.trainingStatusLabel.text = "Training..."
        self.jobTimer.start()
        self.updateGUIState()

    def onTrainingProgress(self, fraction, message):
        self.ui.trainingProgressBar.value = int(round(100 * fraction))
        if message:
            self.ui.trainingStatusLabel.text = message

    def onTrainingMetric(self, event):
        self.ui.trainingMetricsLabel.text = metric_text(event)

    def onTrainingMessage(self, message):
        self.ui.trainingStatusLabel.text = message

    def onTrainFinished(self):
        job, self.trainJob = self.trainJob, None
        self.updateGUIState()
        try:
            path = job.result()
        except JobError as error:
            self.ui.trainingStatusLabel.text = f"Training ended: {error}"
            return
        self.ui.trainingProgressBar.value = 100
        self.ui.trainingStatusLabel.text = f"Model saved: {path}"
        self.refreshModels(select=os.path.splitext(os.path.basename(str(path)))[0])

    # -- polling ----------------------------------------------------------------------------------

    def onJobTimer(self):
        if self.detectJob is not None:
            self.ui.elapsedLabel.text = elapsed_text(self.detectJob.elapsed)
            if self.detectJob.poll():
                self.onDetectFinished()
        if self.trainJob is not None and self.trainJob.poll():
            self.onTrainFinished()
        if self.modelsJob is not None and self.modelsJob.poll():
            self.onModelsListed()
        if self.importJob is not None and self.importJob.poll():
            self.onModelImported()
        if not any((self.detectJob, self.trainJob, self.modelsJob, self.importJob)):
            self.jobTimer.stop()


class SimpleSliceNetLogic(ScriptedLoadableModuleLogic, AnomalyDetectionLogic):
    """The module's logic: :class:`AnomalyDetectionLogic` plus Slicer's parameter node and installer.

    Usable from Slicer's Python console and batch scripts, e.g.
    ``SimpleSliceNetLogic().detect(getNode("MRHead")).lesions``.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        AnomalyDetectionLogic.__init__(self)

    def getParameterNode(self):
        return SimpleSliceNetParameterNode(super().getParameterNode())

    def installDependencies(self, requirements=None):
        """Install missing packages: torch through the PyTorch extension when present, the rest with pip."""
        requirements = list(requirements if requirements is not None else missing_requirements())
        pipRequirements = [r.pip for r in requirements]
        torchFromExtension = False
        if any(r.module == "torch" for r in requirements):
            try:
                import PyTorchUtils
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=">=2.4") is None:
                    raise RuntimeError("PyTorch could not be installed by the PyTorch extension.")
                torchFromExtension = True
                pipRequirements = [r.pip for r in requirements if r.module not in ("torch", "torchvision")]
        if not pipRequirements:
            return
        ensure = _pipEnsure()
        if ensure is not None:
            from packaging.requirements import Requirement

            skip = ["torch", "torchvision"] if torchFromExtension else []
            ensure([Requirement(r) for r in pipRequirements], skip_packages=skip, requester="SimpleSliceNet")
        else:
            slicer.util.pip_install(pipRequirements)


def _pipEnsure():
    """``pip_ensure`` of Slicer 5.11+ (``slicer.pydeps``, later ``slicer.packaging``), else None."""
    import importlib

    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            return importlib.import_module(name).pip_ensure
        except (ImportError, AttributeError):
            continue
    return None


class SimpleSliceNetTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Developer mode: Reload and Test): a planted lesion is found and thresholded."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DetectAndThreshold()

    def test_DetectAndThreshold(self):
        import numpy as np

        from SimpleSliceNetLib.resources import sample_volume
        from SimpleSliceNetLib.slicer_logic import plant_lesion
        from SimpleSliceNetLib.volume_io import load_volume

        missing = missing_requirements()
        if missing:
            self.delayDisplay(f"Skipped: packages missing ({', '.join(r.pip for r in missing)})")
            return
        self.delayDisplay("Building a volume with a planted lesion")
        sample = load_volume(sample_volume())
        array, lesionCentre = plant_lesion(sample.array, sample.affine)
        affine = sample.affine
        inputNode = slicer.vtkMRMLScalarVolumeNode()
        inputNode.SetName("PlantedLesion")
        slicer.mrmlScene.AddNode(inputNode)
        mrml_adapter.update_node_from_array(inputNode, array, affine)
        inputNode.CreateDefaultDisplayNodes()
        before = mrml_adapter.array_from_node(inputNode)

        self.delayDisplay("Detecting")
        logic = SimpleSliceNetLogic()
        result = logic.detect(inputNode, device="cpu")
        heatmap = mrml_adapter.array_from_node(result.heatmapNode)
        self.assertTrue(np.array_equal(mrml_adapter.array_from_node(inputNode), before))
        self.assertTrue(np.allclose(mrml_adapter.ijk_to_ras(result.heatmapNode), affine))
        self.assertTrue(np.allclose(mrml_adapter.ijk_to_ras(result.labelNode), affine))
        self.assertEqual(heatmap.shape, array.shape)
        self.assertGreater(len(result.lesions), 0)
        # The sample has a lesion of its own: the planted one must be among the findings.
        distances = [np.linalg.norm(np.subtract(lesion.centroid_ras, lesionCentre)) for lesion in result.lesions]
        self.assertLess(min(distances), 20.0)

        self.delayDisplay("Thresholding")
        lesions = logic.applyThreshold(result.heatmapNode, result.labelNode, float(heatmap.max()) + 1.0)
        self.assertEqual(lesions, [])
        self.assertEqual(int(mrml_adapter.array_from_node(result.labelNode).max()), 0)
        lesions = logic.applyThreshold(result.heatmapNode, result.labelNode, result.threshold)
        self.assertEqual(len(lesions), len(result.lesions))
        self.assertEqual(int(mrml_adapter.array_from_node(result.labelNode).max()), len(lesions))
        self.delayDisplay("Test passed")
