"""The module's MRML logic on a real MRML scene from slicer-core (headless, no Qt)."""
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT, SAMPLE

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by requirements-test.txt")
sys.path.insert(0, os.path.join(ROOT, "KneeRecon"))
import slicer_headless  # noqa: E402
from KneeReconLib.core.labels import BONES  # noqa: E402


@pytest.fixture(scope="module")
def recon(bundled_model):
    from KneeReconMRMLLogic import KneeReconMRMLLogic

    scene, app, _obs = slicer_headless.install()
    ap = slicer_headless.load_volume(scene, os.path.join(SAMPLE, "ap.nrrd"), "sample AP")
    lat = slicer_headless.load_volume(scene, os.path.join(SAMPLE, "lateral.nrrd"), "sample lateral")
    logic = KneeReconMRMLLogic(scene)
    seg = logic.reconstruct(ap, lat, side="left", modelPath=bundled_model)
    return scene, logic, seg, ap, lat


def _read_seg(path):
    """Read a .seg.nrrd into a segmentation node of a fresh scene, as Slicer's storage node does."""
    scene = slicer.vtkMRMLScene()
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    seg_logic.SetMRMLScene(scene)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    st = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(st)
    node.SetAndObserveStorageNodeID(st.GetID())
    st.SetFileName(path)
    assert st.ReadData(node)
    node._keep_scene = scene  # the scene must outlive the node's use
    return node


def _tag(segment, name):
    import vtk
    ref = vtk.reference("")
    assert segment.GetTag(name, ref)
    return str(ref)


def _ras_to_lps_centroid(seg, segment_id, ref_node):
    arr = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segment_id, ref_node)
    k, j, i = np.nonzero(arr)
    import vtk
    mat = vtk.vtkMatrix4x4()
    ref_node.GetIJKToRASMatrix(mat)
    M = np.array([[mat.GetElement(r, c) for c in range(4)] for r in range(4)])
    ras = M @ np.vstack([i.mean(), j.mean(), k.mean(), 1.0])
    return np.array([-ras[0, 0], -ras[1, 0], ras[2, 0]]), arr


def test_segments_names_colours_terminology(recon):
    _, _, seg, _, _ = recon
    s = seg.GetSegmentation()
    assert s.GetNumberOfSegments() == 4
    for b in BONES:
        segment = s.GetSegment(b.name)
        assert segment is not None and segment.GetName() == b.name
        assert np.allclose(segment.GetColor(), b.color)
        tag = _tag(segment, "TerminologyEntry")
        assert f"SCT^{b.snomed}^" in tag and "SCT^7771000^Left" in tag
    pd = __import__("vtk").vtkPolyData()
    seg.GetClosedSurfaceRepresentation("femur", pd)
    assert pd.GetNumberOfPoints() > 500


def test_segments_share_one_layer_and_show_the_library_surfaces(recon):
    """The four bones in one labelmap layer holding the reconstruction's labels, and as their 3D
    representation the library's surfaces in RAS (the model nodes' and the STL files'), not a
    second conversion by Slicer."""
    import vtk
    from vtkmodules.util import numpy_support

    scene, logic, seg, _, _ = recon
    rec = logic.lastReconstruction
    s = seg.GetSegmentation()
    assert s.GetNumberOfLayers() == 1 and s.GetSourceRepresentationName() == "Binary labelmap"
    labels = rec.labels_array()
    for b in BONES:
        layer = slicer.util.arrayFromSegmentInternalBinaryLabelmap(seg, b.name)
        value = s.GetSegment(b.name).GetLabelValue()
        assert value == b.value and np.array_equal(layer == value, labels == b.value), b.name
        pd = vtk.vtkPolyData()
        seg.GetClosedSurfaceRepresentation(b.name, pd)
        lps = numpy_support.vtk_to_numpy(rec.surfaces[b.name].GetPoints().GetData())
        ras = numpy_support.vtk_to_numpy(pd.GetPoints().GetData())
        assert len(ras) == len(lps) > 500 and np.allclose(ras, lps * [-1, -1, 1], atol=1e-4), b.name
        assert pd.GetNumberOfCells() == rec.surfaces[b.name].GetNumberOfCells()


def test_geometry_in_ras_matches_truth(recon):
    scene, logic, seg, _, _ = recon
    truth = sitk.ReadImage(os.path.join(SAMPLE, "truth.nii.gz"))
    t = sitk.GetArrayFromImage(truth)
    # a reference volume on the truth's grid, in RAS
    ref = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "truth grid")
    sp, org = np.array(truth.GetSpacing()), np.array(truth.GetOrigin())
    m = np.eye(4)
    m[:3, :3] = np.diag(sp)
    m[:3, 3] = org
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ m
    slicer.util.updateVolumeFromArray(ref, np.zeros(t.shape, np.uint8))
    import vtk
    vm = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vm.SetElement(r, c, ras[r, c])
    ref.SetIJKToRASMatrix(vm)
    for b in BONES:
        c_pred, arr = _ras_to_lps_centroid(seg, b.name, ref)
        k, j, i = np.nonzero(t == b.value)
        c_true = org + sp * np.array([i.mean(), j.mean(), k.mean()])
        assert np.linalg.norm(c_pred - c_true) < max(sp) * 1.5 + (3.0 if b.name in ("patella", "fibula") else 0), b.name
        if b.name in ("femur", "tibia"):
            inter = np.logical_and(arr > 0, t == b.value).sum()
            assert 2 * inter / ((arr > 0).sum() + (t == b.value).sum()) > 0.85, b.name


def test_seg_nrrd_export_reloads_identically(recon, tmp_path):
    scene, logic, seg, _, _ = recon
    files = logic.exportResults(seg, str(tmp_path), formats=("seg.nrrd", "stl"))
    segfile = [f for f in files if f.endswith(".seg.nrrd")][0]
    assert sum(f.endswith(".stl") for f in files) == 4
    back = _read_seg(segfile)
    for b in BONES:
        a1 = slicer.util.arrayFromSegmentInternalBinaryLabelmap(seg, b.name)
        a2 = slicer.util.arrayFromSegmentInternalBinaryLabelmap(back, b.name)
        v1 = seg.GetSegmentation().GetSegment(b.name).GetLabelValue()
        v2 = back.GetSegmentation().GetSegment(b.name).GetLabelValue()
        assert (a1 == v1).sum() > 0 and np.array_equal(a1 == v1, a2 == v2), b.name
        assert back.GetSegmentation().GetSegment(b.name).GetName() == b.name


def test_library_seg_nrrd_loads_in_slicer(recon, tmp_path):
    """The command line's segmentation.seg.nrrd (written without Slicer) reads as four named segments."""
    from KneeReconLib.io.segfile import write_seg_nrrd

    _, logic, _, _, _ = recon
    rec = logic.lastReconstruction
    p = str(tmp_path / "segmentation.seg.nrrd")
    write_seg_nrrd(rec.labels, p, "left")
    node = _read_seg(p)
    s = node.GetSegmentation()
    names = sorted(s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments()))
    assert names == sorted(b.name for b in BONES)
    fem = s.GetSegment("femur")
    assert np.allclose(fem.GetColor(), BONES[0].color)
    assert "SCT^71341001^" in _tag(fem, "TerminologyEntry")


def test_models_and_outlines(recon):
    scene, logic, seg, ap, lat = recon
    models = [scene.GetNthNodeByClass(i, "vtkMRMLModelNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLModelNode"))]
    names = {m.GetName() for m in models}
    assert {b.name for b in BONES} <= names
    fem = [m for m in models if m.GetName() == "femur"][0]
    # RAS: the model's x and y are the LPS surface's negated
    rec = logic.lastReconstruction
    from KneeReconLib.reconstruction.surfaces import polydata_points
    lps = polydata_points(rec.surfaces["femur"]).mean(0)
    ras = polydata_points(fem.GetPolyData()).mean(0)
    assert np.allclose(ras, lps * np.array([-1, -1, 1]), atol=1e-3)
    outlines = logic.outlineVolumes(rec, ap, lat)
    for o, src in zip(outlines, (ap, lat)):
        arr = slicer.util.arrayFromVolume(o)
        assert arr.shape == slicer.util.arrayFromVolume(src).shape
        assert set(np.unique(arr)) >= {0, 1, 3}


def test_offscreen_render_shows_four_bone_colours(recon, tmp_path):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    import vtk
    scene, logic, seg, _, _ = recon
    ren = vtk.vtkRenderer()
    ren.SetBackground(1, 1, 1)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLModelNode")):
        m = scene.GetNthNodeByClass(i, "vtkMRMLModelNode")
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(m.GetPolyData())
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(m.GetDisplayNode().GetColor())
        actor.GetProperty().SetAmbient(0.6)
        actor.GetProperty().SetDiffuse(0.4)
        ren.AddActor(actor)
    win = vtk.vtkRenderWindow()
    win.SetOffScreenRendering(1)
    win.AddRenderer(ren)
    win.SetSize(400, 500)
    cam = ren.GetActiveCamera()
    cam.SetPosition(0, 400, 0)  # RAS: look from anterior (+A) toward the knee, superior up
    cam.SetFocalPoint(0, 0, 0)
    cam.SetViewUp(0, 0, 1)
    ren.ResetCamera()
    # patella is in front: turn the camera a little to see all four bones
    cam.Azimuth(35)
    ren.ResetCamera()
    win.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(win)
    grab.Update()
    png = str(tmp_path / "render.png")
    w = vtk.vtkPNGWriter()
    w.SetFileName(png)
    w.SetInputConnection(grab.GetOutputPort())
    w.Write()
    from PIL import Image
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(float) / 255
    for b in BONES:
        col = np.array(b.color)
        # shaded pixels keep the hue: compare chromaticity
        chrom = rgb / np.maximum(rgb.sum(-1, keepdims=True), 1e-6)
        target = col / col.sum()
        hits = (np.abs(chrom - target).sum(-1) < 0.04) & (rgb.sum(-1) < 2.9)
        assert hits.sum() > 30, b.name
    win.Finalize()
    if os.environ.get("KNEERECON_SAVE_RENDER"):
        import shutil
        shutil.copy(png, os.environ["KNEERECON_SAVE_RENDER"])


def test_ensemble_option_reaches_the_library(recon):
    scene, logic, seg, ap, lat = recon
    ens = logic.reconstruct(ap, lat, side="left", ensemble=True, createModels=False)
    assert ens is not seg and logic.lastReconstruction.ensemble[0]["name"].startswith("KneeRecon ChenNet")
    labels = logic.lastReconstruction.labels_array()
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
    assert ens.GetSegmentation().GetNumberOfSegments() == 4


def test_model_loaded_once_per_session(recon):
    """A second reconstruction (even through a new logic object) reuses the loaded model; a changed
    model file is loaded again."""
    from KneeReconMRMLLogic import KneeReconMRMLLogic

    scene, logic, seg, ap, lat = recon
    first = logic.getReconstructor()
    again = KneeReconMRMLLogic(scene)
    again.reconstruct(ap, lat, side="left", createModels=False)
    assert again.getReconstructor() is first and logic.lastReconstruction is not again.lastReconstruction
    assert KneeReconMRMLLogic.getReconstructor(backend="torch") is not first  # other settings, another model


def test_session_through_the_logic_imports_no_torch(tmp_path):
    """bench/bench_slicer_logic.py in a fresh process: two reconstructions through the MRML logic,
    the model reused, none of torch, scikit-image and scipy imported."""
    import json
    import subprocess

    out = tmp_path / "res.json"
    env = dict(os.environ, KNEERECON_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_slicer_logic.py"), "--repeats", "2",
                        "--json", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["same_model_object"] and res["segments"] == 4 and res["precision"].startswith("OpenVINO"), res
    assert not res["torch_imported"] and not res["skimage_imported"] and not res["scipy_imported"], res


def test_quality_verdict_on_the_segmentation(recon, bundled_model):
    """The quality report's verdict travels with the bones in the scene (and Slicer's status line)."""
    scene, logic, _seg, ap, lat = recon
    seg = logic.reconstruct(ap, lat, side="left", modelPath=bundled_model, createModels=False)
    rec = logic.lastReconstruction
    assert rec.quality["verdict"] == "ok", rec.quality["reasons"]
    assert seg.GetAttribute("KneeRecon.Quality") == "ok"
    assert seg.GetAttribute("KneeRecon.QualitySummary") == logic.qualitySummary(rec)
    assert logic.qualitySummary(rec).startswith("quality: ok")


def test_view_checks_through_the_logic(recon):
    """The module applies the CLI's input checks: the sample passes without warnings, swapped
    volumes are refused before any network work, a contradicted side becomes a warning."""
    from KneeReconLib.core.errors import KneeReconError

    scene, logic, _, ap, lat = recon
    rec = logic.lastReconstruction
    assert rec.warnings == [] and rec.view_check["looks_swapped"] is False and rec.view_check["side_seen"] == "left"
    with pytest.raises(KneeReconError, match="look swapped"):
        logic.reconstruct(lat, ap, side="left", createModels=False)
    with pytest.raises(KneeReconError, match="identical pixels"):
        logic.reconstruct(ap, ap, side="left", createModels=False, viewsAsGiven=True)
    seg = logic.reconstruct(ap, lat, side="right", createModels=False)
    assert len(logic.lastReconstruction.warnings) == 1 and "looks like a left knee" in logic.lastReconstruction.warnings[0]
    scene.RemoveNode(seg)


def test_swapped_volumes_refused_unless_views_as_given(recon):
    """Swapped volumes: refused through the logic with a message that names the module's checkbox
    (not the command line's option), nothing added to the scene; with viewsAsGiven (the 'Views as
    given' checkbox) the pair is reconstructed as given, and its quality report flags the bones."""
    from KneeReconLib.io.view_check import SwappedViewsError

    scene, logic, _, ap, lat = recon
    last = logic.lastReconstruction
    n_seg = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    with pytest.raises(SwappedViewsError) as e:
        logic.reconstruct(lat, ap, side="left", createModels=False)
    assert "look swapped" in str(e.value) and "tick 'Views as given'" in str(e.value)
    assert "--views-as-given" not in str(e.value)
    assert logic.lastReconstruction is last and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == n_seg
    seg = logic.reconstruct(lat, ap, side="left", createModels=False, viewsAsGiven=True)
    rec = logic.lastReconstruction
    assert rec is not last and rec.view_check == {"skipped": "views taken as given"}
    assert seg.GetSegmentation().GetNumberOfSegments() == 4
    assert rec.quality["verdict"] == "review"  # taken as given, a swapped pair gives bones that do not fit
    scene.RemoveNode(seg)


def test_straight_knee_swapped_refused_on_the_second_opinion(recon, straight_pair):
    """A nearly straight knee given swapped scores in the view classifier's ambiguous band: the
    logic, too, asks the network (the pair reconstructed the other way round) and refuses it,
    naming the checkbox; the right way round it is reconstructed with the opinion recorded."""
    from KneeReconLib.io.view_check import SwappedViewsError

    scene = recon[0]
    logic = recon[1]
    ap = slicer_headless.load_volume(scene, straight_pair[0], "straight AP")
    lat = slicer_headless.load_volume(scene, straight_pair[1], "straight lateral")
    with pytest.raises(SwappedViewsError) as e:
        logic.reconstruct(lat, ap, side="right", createModels=False)
    assert "reconstructed the other way round" in str(e.value) and "tick 'Views as given'" in str(e.value)
    seg = logic.reconstruct(ap, lat, side="right", createModels=False)
    so = logic.lastReconstruction.view_check["second_opinion"]
    assert so["looks_swapped"] is False and so["swap_gain"] < -so["min_gain"]
    scene.RemoveNode(seg)
