"""The bundled model end to end, and the coordinate contract by physical coordinates."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from conftest import SAMPLE, SHARED, centroid
from KneeReconLib.cli import main
from KneeReconLib.core.labels import BONES, BY_NAME
from KneeReconLib.evaluation.metrics import dice_per_class
from KneeReconLib.reconstruction.outputs import OUTPUT_FILES


def _on_truth(pred_path_or_img, truth):
    img = sitk.ReadImage(pred_path_or_img) if isinstance(pred_path_or_img, str) else pred_path_or_img
    pred = sitk.Resample(img, truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(truth)


@pytest.fixture(scope="module")
def sample_output(tmp_path_factory, bundled_model):
    out = str(tmp_path_factory.mktemp("rec") / "sample")
    assert main(["reconstruct", "--ap", os.path.join(SAMPLE, "ap.nrrd"), "--lateral", os.path.join(SAMPLE, "lateral.nrrd"),
                 "--side", "left", "--output", out]) == 0
    return out


def test_sample_reconstruction_matches_truth(sample_output):
    truth = sitk.ReadImage(os.path.join(SAMPLE, "truth.nii.gz"))
    p, t = _on_truth(os.path.join(sample_output, "labels.nii.gz"), truth)
    d = dice_per_class(p, t)
    assert d[BY_NAME["femur"].value] > 0.85 and d[BY_NAME["tibia"].value] > 0.85, d
    assert d[BY_NAME["patella"].value] > 0.6 and d[BY_NAME["fibula"].value] > 0.5, d


def test_output_files_are_complete(sample_output):
    assert sorted(os.listdir(sample_output)) == sorted(OUTPUT_FILES)
    rep = json.load(open(os.path.join(sample_output, "report.json")))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(SAMPLE, "truth.nii.gz")))
    vox = np.prod(sitk.ReadImage(os.path.join(SAMPLE, "truth.nii.gz")).GetSpacing()) / 1000
    for b in ("femur", "tibia"):
        true_ml = (truth == BY_NAME[b].value).sum() * vox
        assert abs(rep["volumes_ml"][b] - true_ml) < 0.15 * true_ml, (b, rep["volumes_ml"][b], true_ml)
    assert {"network", "backprojection", "surfaces"} <= set(rep["timings_s"])
    assert rep["side"] == "left" and rep["model"]["name"]
    for b in BONES:  # closed, non-trivial surfaces in LPS mm around the bone
        r = vtk.vtkSTLReader()
        r.SetFileName(os.path.join(sample_output, f"{b.name}.stl"))
        r.Update()
        poly = r.GetOutput()
        assert poly.GetNumberOfCells() > 200, b.name
        clean = vtk.vtkCleanPolyData()
        clean.SetInputData(poly)
        fe = vtk.vtkFeatureEdges()
        fe.SetInputConnection(clean.GetOutputPort())
        fe.BoundaryEdgesOn()
        fe.FeatureEdgesOff()
        fe.ManifoldEdgesOff()
        fe.NonManifoldEdgesOff()
        fe.Update()
        assert fe.GetOutput().GetNumberOfCells() == 0, f"{b.name} surface is not closed"
    lab = sitk.ReadImage(os.path.join(sample_output, "labels.nii.gz"))
    r = vtk.vtkSTLReader()
    r.SetFileName(os.path.join(sample_output, "femur.stl"))
    r.Update()
    c_surf = np.array(r.GetOutput().GetCenter())
    arr = sitk.GetArrayFromImage(lab)
    c_lab = centroid(arr == 1, lab.GetSpacing(), lab.GetOrigin())
    assert np.abs(c_surf[:2] - c_lab[:2]).max() < 9  # same place in x and y (LPS), not mirrored
    from PIL import Image
    ov = np.asarray(Image.open(os.path.join(sample_output, "overlay.png")).convert("RGB"))
    for b in BONES:
        col = (np.array(b.color) * 255).astype(int)
        assert (np.abs(ov.astype(int) - col).sum(-1) < 40).sum() > 20, f"{b.name} outline missing in overlay.png"
    # the command draws it during the reconstruction (beside the surfaces): the same picture as one
    # drawn afterwards from the written label map (up to a few pixels: the file's float32 geometry
    # and the report's rounded height offset)
    from KneeReconLib.core.geometry import ReconGrid
    from KneeReconLib.io.xray_io import read_xray
    from KneeReconLib.reconstruction.overlay import overlay_picture
    views = [read_xray(os.path.join(SAMPLE, f"{v}.nrrd"), v, side="left") for v in ("ap", "lateral")]
    grid = ReconGrid(arr.shape, lab.GetSpacing(), lab.GetOrigin())
    again = overlay_picture(views[0].pixels, views[1].pixels, arr, grid, views[0].geometry, views[1].geometry,
                            lateral_offset_mm=rep["height_offset"]["applied_mm"])
    assert np.asarray(again).shape == ov.shape and (np.asarray(again) == ov).all(-1).mean() > 0.999


@pytest.mark.parametrize("side,seed", [("left", 1_000_101), ("right", 1_000_102)])
def test_contract_left_and_right_knee_land_in_place(tmp_path, bundled_model, side, seed):
    """A phantom written to files and rendered per the contract reconstructs onto its truth by
    physical coordinates; a mirrored frame would put the fibula on the wrong side."""
    ph_dir, drr_dir = str(tmp_path / "ph"), str(tmp_path / "drr")
    assert main(["phantom", "--count", "1", "--seed", str(seed), "--side", side, "--output", ph_dir]) == 0
    assert main(["drr", "--ct", f"{ph_dir}/knee_{seed:07d}_ct.nii.gz", "--labels", f"{ph_dir}/knee_{seed:07d}_labels.nii.gz",
                 "--pixel-spacing", "0.8", "--output", drr_dir]) == 0
    out = str(tmp_path / "rec")
    side_args = ["--side", side] if side == "left" else []  # the right knee's side is left to detection
    assert main(["reconstruct", "--ap", f"{drr_dir}/ap.nrrd", "--lateral", f"{drr_dir}/lateral.nrrd", *side_args,
                 "--output", out]) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["side"] == side and rep["side_detected_from_fibula"] == side
    truth = sitk.ReadImage(f"{drr_dir}/truth_fullres.nii.gz")
    p, t = _on_truth(os.path.join(out, "labels.nii.gz"), truth)
    d = dice_per_class(p, t)
    assert d[1] > 0.85 and d[3] > 0.85, d
    sp, org = truth.GetSpacing(), truth.GetOrigin()
    fib_x = centroid(p == 4, sp, org)[0] - centroid(p == 3, sp, org)[0]
    assert (fib_x > 0) == (side == "left")  # the fibula is lateral: patient's left (+x) for a left knee
    assert centroid(p == 2, sp, org)[1] < centroid(p == 1, sp, org)[1]  # patella anterior (-y)


CONTRACT = os.path.join(SHARED, "contract-check")


@pytest.mark.skipif(not os.path.isdir(CONTRACT), reason="../shared/contract-check not present")
@pytest.mark.parametrize("knee", ["knee_a", "knee_b"])
def test_contract_check_knees_from_other_software(bundled_model, knee):
    d = os.path.join(CONTRACT, knee)
    side = json.load(open(os.path.join(d, "meta.json")))["side"]
    from KneeReconLib.reconstruction.inference import reconstruct
    rec = reconstruct(os.path.join(d, "ap.nrrd"), os.path.join(d, "lateral.nrrd"), side=side, surfaces=False)
    truth = sitk.ReadImage(os.path.join(d, "truth.nii.gz"))
    p, t = _on_truth(rec.labels, truth)
    dice = dice_per_class(p, t)
    assert dice[1] > 0.8 and dice[3] > 0.8, dice  # femur, tibia: frame and scale are right
    assert dice[2] > 0.4 and dice[4] > 0.4, dice  # patella, fibula: not mirrored or transposed


def test_a_one_voxel_bone_gives_an_empty_surface_not_an_error():
    from KneeReconLib.core.geometry import ReconGrid
    from KneeReconLib.reconstruction.surfaces import bone_surface

    grid = ReconGrid.centered((32, 32, 32), (32, 32, 32))
    m = np.zeros(grid.shape, bool)
    m[10, 10, 10] = True
    assert bone_surface(m, grid).GetNumberOfPoints() == 0
    m[8:14, 8:14, 8:14] = True
    assert bone_surface(m, grid).GetNumberOfPoints() > 20


def test_mirror_tta_is_a_real_second_opinion():
    """Mirror TTA (the default) averages the knee and its mirror image: close to the one-pass
    result (--no-tta), not identical."""
    import SimpleITK as sitk

    from KneeReconLib.evaluation.metrics import dice_per_class
    from KneeReconLib.reconstruction.inference import reconstruct

    ap, lat = os.path.join(SAMPLE, "ap.nrrd"), os.path.join(SAMPLE, "lateral.nrrd")
    plain = sitk.GetArrayFromImage(reconstruct(ap, lat, side="left", surfaces=False, tta=False).labels)
    rec = reconstruct(ap, lat, side="left", surfaces=False)
    tta = sitk.GetArrayFromImage(rec.labels)
    agree = (plain == tta).mean()
    assert 0.98 < agree < 1.0
    truth = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(os.path.join(SAMPLE, "truth.nii.gz")), rec.labels,
                                                 sitk.Transform(), sitk.sitkNearestNeighbor))
    d = dice_per_class(tta, truth)
    assert d[1] > 0.85 and d[3] > 0.85
