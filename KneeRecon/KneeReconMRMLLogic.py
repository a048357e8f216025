"""MRML side of KneeRecon: MRML nodes <-> KneeReconLib objects. Imports `slicer` but never qt,
ctk or ScriptedLoadableModule, so it runs under Slicer and headless under `slicer-core`.
Slicer's world is RAS; KneeReconLib (and every file it writes) is LPS: x and y flip sign."""
from __future__ import annotations

import os
import sys

import numpy as np
import slicer
import vtk
from vtkmodules.util import numpy_support

_here = os.path.dirname(os.path.abspath(__file__))
for _p in (os.path.join(_here, ".."), _here):  # source tree: repo root; installed: beside the module
    if os.path.isdir(os.path.join(_p, "KneeReconLib")) and _p not in sys.path:
        sys.path.insert(0, _p)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# how the module's user skips the swapped-views check (the parameter node's viewsAsGiven, the .ui's checkbox)
SLICER_OVERRIDE = "tick 'Views as given' in the X-rays section"


def _matrix(m: np.ndarray) -> vtk.vtkMatrix4x4:
    v = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            v.SetElement(r, c, float(m[r, c]))
    return v


def grid_ijk_to_ras(grid) -> np.ndarray:
    """IJK->RAS of a KneeReconLib ReconGrid (axis-aligned LPS)."""
    m = np.eye(4)
    m[:3, :3] = np.diag(grid.spacing)
    m[:3, 3] = grid.origin
    return LPS_TO_RAS @ m


def ras_surface(poly) -> vtk.vtkPolyData:
    """A copy of a library surface (LPS mm) in Slicer's RAS: x and y flipped, two flips, so the
    triangles keep their orientation."""
    flip = vtk.vtkTransform()
    flip.Scale(-1, -1, 1)
    tf = vtk.vtkTransformPolyDataFilter()
    tf.SetTransform(flip)
    tf.SetInputData(poly)
    tf.Update()
    return tf.GetOutput()


class KneeReconMRMLLogic:
    """Reconstruct from two X-ray volume nodes into a segmentation node (no Qt)."""

    # loaded models, kept for the Slicer session (shared by all logic instances): the second
    # reconstruction with the same model starts at once (bench/bench_slicer_logic.py)
    _reconstructors: dict = {}

    def __init__(self, scene=None):
        self.scene = scene or slicer.mrmlScene

    @classmethod
    def getReconstructor(cls, modelPath: str | None = None, device: str = "cpu", backend: str = "auto",
                         ensemble: bool = False, mirror: bool = True):
        """The KneeReconLib Reconstructor for these settings (`mirror`: mirror test-time
        augmentation, as `kneerecon reconstruct --tta`), loaded on first use and then kept. A
        model file changed on disk since it was loaded (size or time) is loaded again."""
        from KneeReconLib.reconstruction.inference import DEFAULT_ENSEMBLE, DEFAULT_MODEL, Reconstructor, pick_device

        path = os.path.abspath(modelPath or DEFAULT_MODEL)
        stamp = (os.path.getmtime(path), os.path.getsize(path)) if os.path.exists(path) else None
        key = (path, pick_device(device), backend, bool(ensemble), bool(mirror))
        cached = cls._reconstructors.get(key)
        if cached is None or cached[0] != stamp:
            rec = Reconstructor(modelPath, key[1], backend=backend, ensemble=DEFAULT_ENSEMBLE if ensemble else None,
                                tta=bool(mirror))
            cls._reconstructors[key] = cached = (stamp, rec)
        return cached[1]

    @classmethod
    def releaseModels(cls) -> None:
        """Forget the loaded models (their memory is freed when no reconstruction uses them)."""
        cls._reconstructors.clear()

    # ------------------------------------------------------------------ inputs
    def xrayFromVolumeNode(self, node, view: str, pixelSpacing: float | None = None, side: str = "right",
                           sid: float | None = None, sod: float | None = None):
        """A KneeReconLib XRay from a 2D scalar volume node (pixels as stored: column i, row j)."""
        from KneeReconLib.core.errors import KneeReconError
        from KneeReconLib.core.geometry import ViewGeometry
        from KneeReconLib.io.xray_io import XRay

        if node is None or node.GetImageData() is None:
            raise KneeReconError(f"no {view} X-ray volume selected")
        arr = slicer.util.arrayFromVolume(node)
        if arr.ndim == 3:
            if arr.shape[0] != 1:
                raise KneeReconError(f"the {view} volume '{node.GetName()}' has {arr.shape[0]} slices; an X-ray is 2D")
            arr = arr[0]
        elif arr.ndim != 2:
            raise KneeReconError(f"the {view} volume '{node.GetName()}' is not a grayscale 2D image")
        sp = node.GetSpacing()
        spacing = (pixelSpacing, pixelSpacing) if pixelSpacing else (sp[0], sp[1])
        h, w = arr.shape
        info = {"file": node.GetName(), "spacing_source": "option" if pixelSpacing else "volume node"}
        if sid is None and sod is None:  # cone-beam geometry recorded in the file the node was loaded from
            sid, sod = self._fileConeGeometry(node)
            if sid is not None:
                info["geometry_source"] = "file header (KneeRecon_SID_mm, KneeRecon_SOD_mm)"
        geom = ViewGeometry(view, w, h, tuple(float(s) for s in spacing), sid, sod, side)
        return XRay(arr.astype(np.float32), geom, info)

    @staticmethod
    def _fileConeGeometry(node):
        """(SID, SOD) from the header of the node's file as `kneerecon drr` writes it, else (None, None)."""
        import SimpleITK as sitk

        storage = node.GetStorageNode()
        path = storage.GetFileName() if storage is not None else None
        if not path or not os.path.isfile(path):
            return None, None
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
            keys = ("KneeRecon_SID_mm", "KneeRecon_SOD_mm")
            if all(reader.HasMetaDataKey(k) for k in keys):
                sid, sod = (float(reader.GetMetaData(k)) for k in keys)
                return (sid, sod) if 0 < sod < sid else (None, None)
        except (RuntimeError, ValueError):
            pass
        return None, None

    # ------------------------------------------------------------------ main entry
    def reconstruct(self, apNode, lateralNode, side: str = "right", pixelSpacing: float | None = None,
                    sid: float | None = None, sod: float | None = None, modelPath: str | None = None,
                    device: str = "cpu", segmentationNode=None, createModels: bool = True,
                    progress=None, cancel=None, heightOffset="auto", ensemble: bool = False,
                    backend: str = "auto", viewsAsGiven: bool = False, mirror: bool = True):
        """Run KneeRecon and put the result into the scene (`ensemble`: average with the bundled
        ChenNet, see `kneerecon reconstruct --ensemble`; `backend`: auto, openvino or torch, as
        `kneerecon reconstruct --backend`; `mirror`: mirror test-time augmentation, as `--tta`). The model is loaded once per session
        (getReconstructor). Returns the segmentation node; the full `Reconstruction` is kept in
        `self.lastReconstruction`. The pair is checked first as `kneerecon reconstruct` checks it
        (KneeReconError for the same picture twice or swapped views unless `viewsAsGiven`, the
        message saying to tick 'Views as given'; a side the images contradict ends up in
        `rec.warnings`)."""
        from KneeReconLib.io.view_check import SwappedViewsError, check_views
        from KneeReconLib.reconstruction.inference import attach_view_check
        from KneeReconLib.reconstruction.view_opinion import confirm_views

        ap = self.xrayFromVolumeNode(apNode, "ap", pixelSpacing, side, sid, sod)
        lat = self.xrayFromVolumeNode(lateralNode, "lateral", pixelSpacing, side, sid, sod)
        try:
            viewCheck = check_views(ap, lat, ap, lat, viewsAsGiven)
            reconstructor = self.getReconstructor(modelPath, device, backend, ensemble, mirror)
            rec = reconstructor.run(ap, lat, side, surfaces=createModels, progress=progress, cancel=cancel,
                                    height_offset=heightOffset)
            # the classifier unsure (nearly straight knees): the pair is also reconstructed swapped
            confirm_views(reconstructor, viewCheck, rec)
        except SwappedViewsError as e:  # the module's own override, not the command line's
            raise SwappedViewsError(e.detail, override=SLICER_OVERRIDE) from None
        attach_view_check(rec, viewCheck, side)
        self.lastReconstruction = rec
        seg = self.segmentationFromReconstruction(rec, segmentationNode,
                                                  name=f"KneeRecon {side} knee")
        self.recordQuality(seg, rec)
        if createModels:
            self.modelsFromReconstruction(rec, folderName=f"KneeRecon {side} knee models")
        return seg

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def qualitySummary(rec) -> str:
        """The quality report's verdict and reasons in one line (KneeReconLib.reconstruction.quality)."""
        from KneeReconLib.reconstruction.quality import summary_line

        return summary_line(rec.quality)

    def recordQuality(self, segmentationNode, rec) -> None:
        """The quality verdict on the segmentation node (attributes KneeRecon.Quality, `ok` or
        `review`, and KneeRecon.QualitySummary), so it stays with the bones in the scene and a saved scene."""
        segmentationNode.SetAttribute("KneeRecon.Quality", str(rec.quality.get("verdict", "")))
        segmentationNode.SetAttribute("KneeRecon.QualitySummary", self.qualitySummary(rec))

    def segmentationFromReconstruction(self, rec, segmentationNode=None, name: str = "KneeRecon"):
        from KneeReconLib.core.labels import BONES
        from KneeReconLib.io.segfile import terminology_entry

        scene = self.scene
        labels = rec.labels_array()
        ijk_to_ras = _matrix(grid_ijk_to_ras(rec.grid))
        seg = segmentationNode or scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        if seg.GetDisplayNode() is None:
            seg.CreateDefaultDisplayNodes()
        geometry = slicer.vtkOrientedImageData()
        geometry.SetDimensions(labels.shape[::-1])
        geometry.SetImageToWorldMatrix(ijk_to_ras)
        seg.GetSegmentation().SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry))
        segmentation = seg.GetSegmentation()
        # one shared labelmap layer holding every bone's label value (what CollapseBinaryLabelmaps
        # would make of four layers, without building them): a small .seg.nrrd
        layer = slicer.vtkOrientedImageData()
        layer.SetDimensions(labels.shape[::-1])
        layer.SetImageToWorldMatrix(ijk_to_ras)
        layer.GetPointData().SetScalars(numpy_support.numpy_to_vtk(labels.astype(np.uint8).ravel(), deep=True))
        labelmapName = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
        surfaceName = slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
        for b in BONES:
            if segmentation.GetSegment(b.name):
                segmentation.RemoveSegment(b.name)
            segment = slicer.vtkSegment()
            segment.SetName(b.name)
            segment.SetColor(*b.color)
            segment.SetNameAutoGenerated(False)
            segment.SetColorAutoGenerated(False)
            segment.SetTag("TerminologyEntry", terminology_entry(b.snomed, b.name, rec.side))
            segment.SetLabelValue(b.value)
            segment.AddRepresentation(labelmapName, layer)
            segmentation.AddSegment(segment, b.name)
        if len(rec.surfaces) == len(BONES):
            # the library's surfaces (the model nodes' and the STL files') as the segments' 3D
            # representation, instead of Slicer converting the labelmap again (0.3-0.4 s). The
            # labelmap stays the source: an edit in Segment Editor rebuilds the surface from it.
            for b in BONES:
                segmentation.GetSegment(b.name).AddRepresentation(surfaceName, ras_surface(rec.surfaces[b.name]))
        else:  # reconstructed without surfaces: Slicer's own conversion
            seg.CreateClosedSurfaceRepresentation()
        dn = seg.GetDisplayNode()
        dn.SetVisibility3D(True)
        dn.SetPreferredDisplayRepresentationName3D("Closed surface")
        return seg

    def modelsFromReconstruction(self, rec, folderName: str = "KneeRecon models") -> list:
        """One model node per bone (the library's smoothed surfaces, LPS -> RAS) in a subject-hierarchy folder."""
        from KneeReconLib.core.labels import BY_NAME

        scene = self.scene
        shn = scene.GetSubjectHierarchyNode()
        folder = shn.CreateFolderItem(shn.GetSceneItemID(), folderName) if shn else 0
        models = []
        for name, poly in rec.surfaces.items():
            model = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
            model.SetAndObservePolyData(ras_surface(poly))
            model.CreateDefaultDisplayNodes()
            d = model.GetDisplayNode()
            d.SetColor(*BY_NAME[name].color)
            d.SetScalarVisibility(False)
            if shn:
                item = shn.GetItemByDataNode(model) or shn.CreateItem(shn.GetSceneItemID(), model)
                shn.SetItemParent(item, folder)
            models.append(model)
        return models

    def outlineVolumes(self, rec, apNode, lateralNode) -> list:
        """Label-map volumes of the bones' projected outlines on each X-ray, in the X-ray node's
        own geometry: show them as the label layer over the X-ray in a slice view."""
        from KneeReconLib.core.labels import BONES
        from KneeReconLib.reconstruction.overlay import inner_boundary, project_mask

        labels = rec.labels_array()
        out = []
        for node, view, off in ((apNode, rec.ap.geometry, 0.0), (lateralNode, rec.lateral.geometry, rec.lateral_offset_mm)):
            outline = np.zeros((view.height, view.width), np.uint8)
            for b in BONES:
                sil = project_mask(labels == b.value, rec.grid, view, off)
                outline[inner_boundary(sil)] = b.value
            lm = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", f"{node.GetName()} KneeRecon outline")
            lm.CopyOrientation(node)
            img = vtk.vtkImageData()
            img.SetDimensions(view.width, view.height, 1)
            img.GetPointData().SetScalars(numpy_support.numpy_to_vtk(outline.ravel(), deep=True))
            lm.SetAndObserveImageData(img)
            lm.CreateDefaultDisplayNodes()
            out.append(lm)
        return out

    def exportResults(self, segmentationNode, folder: str, formats=("stl", "seg.nrrd")) -> list[str]:
        """Write per-bone surfaces (STL/OBJ, LPS) and/or the segmentation (.seg.nrrd) to `folder`."""
        os.makedirs(folder, exist_ok=True)
        written = []
        segmentation = segmentationNode.GetSegmentation()
        ids = vtk.vtkStringArray()
        segmentation.GetSegmentIDs(ids)
        for fmt in formats:
            if fmt in ("stl", "obj"):
                ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsClosedSurfaceRepresentationToFiles(
                    folder, segmentationNode, ids, fmt.upper(), True, 1.0, False)
                if not ok:
                    raise OSError(f"exporting {fmt.upper()} surfaces to {folder} failed")
                written += [os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith("." + fmt)]
            elif fmt == "seg.nrrd":
                path = os.path.join(folder, segmentationNode.GetName().replace(" ", "_") + ".seg.nrrd")
                st = slicer.vtkMRMLSegmentationStorageNode()
                self.scene.AddNode(st)
                st.SetFileName(path)
                if not st.WriteData(segmentationNode):
                    raise OSError(f"writing {path} failed")
                self.scene.RemoveNode(st)
                written.append(path)
            else:
                raise ValueError(f"unknown export format {fmt!r}")
        return sorted(set(written))
