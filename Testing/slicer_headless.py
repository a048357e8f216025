"""A headless Slicer environment from `slicer-core`: a real MRML scene with the module logics
KneeRecon uses registered, so that `slicer.mrmlScene`, `slicer.modules.<x>.logic()` and the
`slicer.util` array helpers work without the Qt application."""
import types

import slicer
import vtk


def install():
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.SetSliceLogics(vtk.vtkCollection())
    app.SetViewLogics(vtk.vtkCollection())
    modules = {}
    for key, name, logic in (("colors", "Colors", slicer.vtkMRMLColorLogic()),
                             ("segmentations", "Segmentations", slicer.vtkSlicerSegmentationsModuleLogic()),
                             ("volumes", "Volumes", slicer.vtkSlicerVolumesLogic()),
                             ("models", "Models", slicer.vtkSlicerModelsLogic()),
                             ("subjecthierarchy", "SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic())):
        logic.SetMRMLApplicationLogic(app)  # application logic first, then the scene
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        modules[key] = types.SimpleNamespace(logic=(lambda lg: (lambda: lg))(logic))
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**modules)
    shn = scene.GetSubjectHierarchyNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def add_item(caller, event, node):  # the desktop app's Qt plugins do this; slicer-core has none
        if isinstance(node, slicer.vtkMRMLDisplayableNode) and not node.GetHideFromEditors() \
                and shn.GetItemByDataNode(node) == 0:
            shn.CreateItem(shn.GetSceneItemID(), node)

    scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, add_item)
    return scene, app, add_item


def load_volume(scene, path, name):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    st = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(st)
    st.SetFileName(path)
    st.SetSingleFile(True)
    if not st.ReadData(node):
        raise RuntimeError(f"could not read {path}")
    node.SetAndObserveStorageNodeID(st.GetID())
    return node
