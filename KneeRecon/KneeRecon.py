"""KneeRecon Slicer module: GUI and self-test. The work is done by KneeReconMRMLLogic (MRML <->
library) and KneeReconLib (numerics). Reconstruction needs one package Slicer does not ship, the
OpenVINO runtime (installed on first use, after asking); PyTorch (the PyTorch extension) only for
the torch backend, a GPU, the ensemble or a model that has no converted network yet."""
import logging
import os
from typing import Annotated, Optional

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from KneeReconMRMLLogic import KneeReconMRMLLogic

TORCH_REQUIREMENT = ">=2.1"
OPENVINO_REQUIREMENT = "openvino>=2025.1"  # the network's CPU runtime (KneeReconLib/models/openvino_backend.py), ~60 MB


class KneeRecon(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("KneeRecon")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["KneeRecon team"]
        self.parent.helpText = _(
            "Reconstructs the femur, patella, tibia and fibula in 3D from one antero-posterior and one lateral "
            "X-ray of the same knee, with a bundled 3D CNN (after Kasten et al. 2020). Load both X-rays, choose "
            "the side, and press Reconstruct. Check the projected outlines on the X-rays before using the result. "
            "Research tool, not a medical device: the bundled model is trained on synthetic phantoms only.")
        self.parent.acknowledgementText = _(
            "Method: Kasten Y., Doktofsky D., Kovler I. End-to-end convolutional neural network for 3D "
            "reconstruction of knee bones from bi-planar X-ray images. MLMIR 2020.")
        slicer.app.connect("startupCompleted()", registerSampleData)


def _bundledFile(*parts) -> str:
    """A file of the bundled Resources (models, sample): <module>/Resources/... once installed (CMake puts
    them beside the module), <repository>/Resources/... in the source tree."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.path.join(here, "Resources"), os.path.join(here, "..", "Resources")):
        path = os.path.join(root, *parts)
        if os.path.exists(path):
            return os.path.normpath(path)
    return os.path.normpath(os.path.join(here, "Resources", *parts))


def registerSampleData():
    """The bundled AP + lateral pair in the Sample Data module."""
    import pathlib

    import SampleData

    sample = os.path.dirname(_bundledFile("Sample", "ap.nrrd"))
    icon = os.path.join(os.path.dirname(__file__), "Resources", "Icons", "KneeRecon.png")
    files = ["ap.nrrd", "lateral.nrrd"]
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="KneeRecon", sampleName="KneeReconSampleKnee", thumbnailFileName=icon,
        uris=[pathlib.Path(os.path.abspath(os.path.join(sample, f))).as_uri() for f in files],
        fileNames=["KneeReconSample_" + f for f in files], nodeNames=["KneeRecon sample AP", "KneeRecon sample lateral"],
        loadFiles=True)


@parameterNodeWrapper
class KneeReconParameterNode:
    apVolume: vtkMRMLScalarVolumeNode
    lateralVolume: vtkMRMLScalarVolumeNode
    side: Annotated[str, Choice(["right", "left"])] = "right"
    pixelSpacing: Annotated[float, WithinRange(0.0, 10.0)] = 0.0  # 0: use the images' own spacing
    coneBeam: bool = False
    correctHeightOffset: bool = True
    viewsAsGiven: bool = False  # skip the swapped-views check (kneerecon reconstruct --views-as-given)
    sid: Annotated[float, WithinRange(100.0, 5000.0)] = 1100.0
    sod: Annotated[float, WithinRange(50.0, 5000.0)] = 1000.0
    modelPath: str = ""  # empty: the bundled model
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    backend: Annotated[str, Choice(["auto", "openvino", "torch"])] = "auto"
    createModels: bool = True
    ensemble: bool = False
    mirror: bool = True  # mirror test-time augmentation (kneerecon reconstruct --tta, the default)
    outputSegmentation: vtkMRMLSegmentationNode
    exportFolder: str = ""
    exportStl: bool = True
    exportObj: bool = False
    exportSegNrrd: bool = True


class KneeReconWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._cancelRequested = False
        self._running = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/KneeRecon.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = KneeReconLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.apVolume:
            vol = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if vol:
                self._parameterNode.apVolume = vol

    def setParameterNode(self, inputParameterNode: Optional[KneeReconParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        ok = bool(p and p.apVolume and p.lateralVolume and p.apVolume != p.lateralVolume)
        self.ui.applyButton.enabled = ok and not self._running
        self.ui.applyButton.toolTip = _("Reconstruct the knee bones") if ok else _("Select two different X-ray volumes")
        self.ui.sidSpinBox.enabled = self.ui.sodSpinBox.enabled = bool(p and p.coneBeam)

    def _progress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.setValue(int(fraction * 100))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()  # lets Cancel clicks through between stages

    def onCancelButton(self) -> None:
        self._cancelRequested = True
        self.ui.statusLabel.text = _("Cancelling...")

    def onApplyButton(self) -> None:
        import time

        p = self._parameterNode
        self._cancelRequested = False
        self._running = True
        self.ui.cancelButton.enabled = True
        self.ui.progressBar.setVisible(True)
        self._checkCanApply()
        t0 = time.time()
        try:
            with slicer.util.tryWithErrorDisplay(_("KneeRecon could not reconstruct this pair."), waitCursor=True):
                self.logic.ensureDependencies(backend=p.backend, device=p.device, ensemble=p.ensemble,
                                              modelPath=p.modelPath or None)
                from KneeReconLib.io.view_check import SwappedViewsError
                from KneeReconLib.reconstruction.inference import Cancelled
                try:
                    seg = self.logic.reconstruct(
                        p.apVolume, p.lateralVolume, side=p.side, pixelSpacing=p.pixelSpacing or None,
                        sid=p.sid if p.coneBeam else None, sod=p.sod if p.coneBeam else None,
                        modelPath=p.modelPath or None, device=p.device, segmentationNode=p.outputSegmentation,
                        createModels=p.createModels, progress=self._progress, cancel=lambda: self._cancelRequested,
                        heightOffset="auto" if p.correctHeightOffset else "none", ensemble=p.ensemble,
                        backend=p.backend, viewsAsGiven=p.viewsAsGiven, mirror=p.mirror)
                except SwappedViewsError as e:  # in the status too: it names the checkbox that overrides it
                    self.ui.statusLabel.text = _("Refused: {why}.").format(why=e)
                    raise
                except Cancelled:
                    self.ui.statusLabel.text = _("Cancelled: nothing was added to the scene.")
                    return
                p.outputSegmentation = seg
                rec = self.logic.lastReconstruction
                self.logic.showForReview(rec, p.apVolume, p.lateralVolume, seg)
                vols = ", ".join(f"{k} {v:.0f} ml" for k, v in rec.volumes_ml.items())
                times = ", ".join(f"{k} {v:.2f} s" for k, v in rec.timings_s.items())
                # the quality verdict first: a 'review' must not hide behind the timings
                status = self.logic.qualitySummary(rec) + " "
                status += _("Done in {t:.1f} s ({times}). Volumes: {vols}.").format(t=time.time() - t0, times=times, vols=vols)
                offset = getattr(rec, "height_offset", {}) or {}
                if offset.get("applied_mm"):
                    status += " " + _("Height offset corrected: {mm:.1f} mm.").format(mm=offset["applied_mm"])
                if rec.notes:
                    status += " " + " ".join(rec.notes)
                warnings = getattr(rec, "warnings", [])
                if warnings:  # first, and in the log: not to be lost among the notes
                    status = " ".join(_("WARNING: {w}.").format(w=w) for w in warnings) + " " + status
                    for w in warnings:
                        logging.warning(f"KneeRecon: {w}")
                self.ui.statusLabel.text = status
        finally:
            self._running = False
            self.ui.cancelButton.enabled = False
            self.ui.progressBar.setVisible(False)
            self._checkCanApply()

    def onExportButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            if not p.outputSegmentation:
                raise ValueError(_("Reconstruct first: there is no segmentation to export."))
            if not p.exportFolder:
                raise ValueError(_("Choose an export folder."))
            formats = [f for f, on in (("stl", p.exportStl), ("obj", p.exportObj), ("seg.nrrd", p.exportSegNrrd)) if on]
            files = self.logic.exportResults(p.outputSegmentation, p.exportFolder, formats)
            self.ui.statusLabel.text = _("Exported {n} files to {folder}.").format(n=len(files), folder=p.exportFolder)


class KneeReconLogic(ScriptedLoadableModuleLogic, KneeReconMRMLLogic):
    """Module logic: the Qt-free KneeReconMRMLLogic plus parameter node, dependencies and views."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        KneeReconMRMLLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self):
        return KneeReconParameterNode(super().getParameterNode())

    def ensureDependencies(self, backend: str = "auto", device: str = "auto", ensemble: bool = False,
                           modelPath: Optional[str] = None) -> None:
        """What this reconstruction needs that Slicer does not ship (numpy, SimpleITK, VTK and Pillow
        come with Slicer and are never pip-installed):
        - the OpenVINO runtime, for the default CPU path: one pip install, after asking;
        - PyTorch, through the PyTorch extension (after asking), only for the torch backend, a CUDA
          device, the ensemble, or a model without a converted network."""
        if self.needsTorch(backend, device, ensemble, modelPath):
            self._ensureTorch()
            return
        from KneeReconLib.models import openvino_backend

        if not openvino_backend.available():  # (imports it, without OpenVINO's usage telemetry)
            if not slicer.util.confirmOkCancelDisplay(
                    _("KneeRecon runs its network with the OpenVINO runtime ({req}, about 60 MB), which is not "
                      "installed yet. Install it now?").format(req=OPENVINO_REQUIREMENT)):
                raise RuntimeError(_("The OpenVINO runtime is required (or choose the torch network runtime)."))
            slicer.util.pip_install(OPENVINO_REQUIREMENT)
            openvino_backend.import_openvino()

    @staticmethod
    def needsTorch(backend: str = "auto", device: str = "auto", ensemble: bool = False,
                   modelPath: Optional[str] = None) -> bool:
        """Whether these settings need PyTorch: the torch backend, a CUDA device, the ensemble (its
        probabilities are averaged in PyTorch), or a model that has no converted network beside it or
        in the cache (converting needs PyTorch). device "auto" uses a GPU only where PyTorch is there."""
        if backend == "torch" or device.startswith("cuda") or ensemble:
            return True
        from KneeReconLib.io import resources

        path = modelPath or resources.model_path()
        if not os.path.exists(path):
            return False  # the reconstruction says what is missing
        from KneeReconLib.models import openvino_backend

        try:
            ov = openvino_backend.import_openvino()
        except ImportError:
            # the runtime gets installed first; a bundled model ships with its converted network
            return bool(modelPath) and not os.path.exists(os.path.splitext(modelPath)[0] + ".openvino.xml")
        return openvino_backend.find_ir(ov.Core(), os.path.abspath(path))[0] is None

    def _ensureTorch(self) -> None:
        try:
            import torch  # noqa: F401
            return
        except ImportError:
            pass
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(_("These settings need PyTorch (the torch network runtime, a GPU, the ensemble, or a "
                                 "model without a converted network): install the 'PyTorch' extension from the "
                                 "Extensions Manager, restart Slicer, and try again; or use the default network "
                                 "runtime on the CPU, which needs no PyTorch."))
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if not slicer.util.confirmOkCancelDisplay(
                    _("These settings need PyTorch ({req}). Download and install it now? This can take a few "
                      "minutes.").format(req=TORCH_REQUIREMENT)):
                raise RuntimeError(_("PyTorch is required for these settings."))
            torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)

    def showForReview(self, rec, apNode, lateralNode, segmentationNode) -> None:
        """X-rays with projected outlines in the Red and Yellow views; 3D view centred on the bones."""
        outlines = self.outlineVolumes(rec, apNode, lateralNode)
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        for viewName, xray, outline in (("Red", apNode, outlines[0]), ("Yellow", lateralNode, outlines[1])):
            sliceLogic = slicer.app.layoutManager().sliceWidget(viewName).sliceLogic()
            comp = sliceLogic.GetSliceCompositeNode()
            comp.SetBackgroundVolumeID(xray.GetID())
            comp.SetLabelVolumeID(outline.GetID())
            comp.SetLabelOpacity(1.0)
            sliceLogic.GetSliceNode().RotateToVolumePlane(xray)  # a 2D image lies in its own plane
            sliceLogic.FitSliceToAll()
        threeD = slicer.app.layoutManager().threeDWidget(0).threeDView()
        threeD.resetFocalPoint()
        threeD.resetCamera()


class KneeReconTest(ScriptedLoadableModuleTest):
    """Self-test: sample pair -> module logic with the bundled model -> Dice against the bundled truth;
    then the widget: inputs, Apply, results present."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_logic_on_sample()
        self.setUp()
        self.test_widget_apply()

    def _loadSample(self):
        import SampleData

        registerSampleData()
        ap, lat = SampleData.downloadSample("KneeReconSampleKnee")
        return ap, lat

    def test_logic_on_sample(self):
        import numpy as np
        import SimpleITK as sitk

        self.delayDisplay("Loading the sample X-ray pair")
        ap, lat = self._loadSample()
        logic = KneeReconLogic()
        logic.ensureDependencies()
        seg = logic.reconstruct(ap, lat, side="left")
        rec = logic.lastReconstruction
        truth = sitk.ReadImage(_bundledFile("Sample", "truth.nii.gz"))
        pred = sitk.GetArrayFromImage(sitk.Resample(rec.labels, truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        t = sitk.GetArrayFromImage(truth)
        for value, name in ((1, "femur"), (3, "tibia")):
            dice = 2 * np.logical_and(pred == value, t == value).sum() / ((pred == value).sum() + (t == value).sum())
            self.delayDisplay(f"{name} Dice {dice:.3f}")
            self.assertGreater(dice, 0.85)
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), 4)
        # the model stays loaded for the session: a second reconstruction reuses it
        self.assertIs(logic.getReconstructor(), KneeReconLogic().getReconstructor())
        self.delayDisplay("Logic test passed")

    def test_widget_apply(self):
        ap, lat = self._loadSample()
        slicer.util.selectModule("KneeRecon")
        widget = slicer.modules.KneeReconWidget
        p = widget._parameterNode
        p.apVolume, p.lateralVolume, p.side = ap, lat, "left"
        self.assertTrue(widget.ui.applyButton.enabled)
        widget.onApplyButton()
        self.assertIsNotNone(p.outputSegmentation)
        self.assertEqual(p.outputSegmentation.GetSegmentation().GetNumberOfSegments(), 4)
        self.assertGreaterEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLModelNode"), 4)
        self.assertNotIn("WARNING", widget.ui.statusLabel.text)
        p.side = "right"  # the sample is a left knee: the status must say so first
        widget.onApplyButton()
        self.assertTrue(widget.ui.statusLabel.text.startswith("WARNING: side right was given"))
        self.delayDisplay("Widget test passed")
