"""2D evaluation (the paper's real-radiograph protocol): silhouettes vs 2D masks."""
import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import shift as ndshift

from conftest import SAMPLE
from KneeReconLib.cli import main
from KneeReconLib.core.geometry import ReconGrid
from KneeReconLib.core.labels import BONES
from KneeReconLib.evaluation.evaluate2d import evaluate_2d, metrics_2d
from KneeReconLib.io.xray_io import read_xray
from KneeReconLib.reconstruction.overlay import project_mask


def test_metrics_2d_on_discs():
    yy, xx = np.mgrid[0:200, 0:200]
    a = (yy - 100) ** 2 + (xx - 100) ** 2 < 40 ** 2
    b = (yy - 100) ** 2 + (xx - 104) ** 2 < 40 ** 2  # moved 4 px = 2 mm at 0.5 mm pixels
    m = metrics_2d(a, a, (0.5, 0.5))
    assert m["dice"] == 1.0 and m["chamfer"] == 0.0
    m = metrics_2d(a, b, (0.5, 0.5))
    assert 0.9 < m["dice"] < 0.97
    # mean outline distance of two circles offset by d: about 2d/pi = 1.27 mm
    assert m["chamfer"] == pytest.approx(2 * 2.0 / np.pi, abs=0.25)


def _truth_masks(folder):
    """The sample's 3D truth projected on both views: what an expert's 2D masks would be."""
    truth = sitk.ReadImage(os.path.join(SAMPLE, "truth.nii.gz"))
    lab = sitk.GetArrayFromImage(truth)
    size = truth.GetSize()
    grid = ReconGrid(shape=lab.shape, spacing=truth.GetSpacing(), origin=truth.GetOrigin())
    assert grid.shape == (size[2], size[1], size[0])
    for view in ("ap", "lateral"):
        geom = read_xray(os.path.join(SAMPLE, f"{view}.nrrd"), view).geometry
        for b in BONES:
            m = project_mask(lab == b.value, grid, geom).astype(np.uint8)
            sitk.WriteImage(sitk.GetImageFromArray(m), os.path.join(folder, f"{view}_mask_{b.name}.nrrd"))


def test_evaluate_2d_against_projected_truth(tmp_path):
    case = tmp_path / "sample"
    case.mkdir()
    for f in ("ap.nrrd", "lateral.nrrd"):
        shutil.copy(os.path.join(SAMPLE, f), case / f)
    (case / "meta.json").write_text(json.dumps({"side": "left"}))
    _truth_masks(str(case))
    res = evaluate_2d(str(tmp_path), log=lambda m: None)
    s = res["summary"]
    assert res["n_cases"] == 1
    for v in ("ap", "lateral"):
        assert s[f"dice2d_{v}_femur"] > 0.95 and s[f"dice2d_{v}_tibia"] > 0.95
        assert s[f"dice2d_{v}_patella"] > 0.85 and s[f"dice2d_{v}_fibula"] > 0.75
        assert s[f"chamfer2d_{v}_femur"] < 1.5
    # masks moved by 5 mm on the lateral view: the 2D metrics must see it
    for b in BONES:
        p = str(case / f"lateral_mask_{b.name}.nrrd")
        m = sitk.GetArrayFromImage(sitk.ReadImage(p))
        sitk.WriteImage(sitk.GetImageFromArray(ndshift(m, (0, 10), order=0)), p)
    moved = evaluate_2d(str(case), log=lambda m: None, height_offset="none")["summary"]
    assert moved["dice2d_lateral_femur"] < s["dice2d_lateral_femur"] - 0.03
    assert moved["chamfer2d_lateral_femur"] > s["chamfer2d_lateral_femur"] + 1.5
    assert moved["dice2d_ap_femur"] == pytest.approx(s["dice2d_ap_femur"], abs=0.01)


def test_evaluate_2d_cli_errors(tmp_path, capsys):
    assert main(["evaluate-2d", "--masks", str(tmp_path)]) == 2
    assert "no case" in capsys.readouterr().err
    for f in ("ap.nrrd", "lateral.nrrd"):
        shutil.copy(os.path.join(SAMPLE, f), tmp_path / f)
    assert main(["evaluate-2d", "--masks", str(tmp_path)]) == 2
    assert "no 2D masks" in capsys.readouterr().err
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 10), np.uint8)), str(tmp_path / "ap_mask_femur.nrrd"))
    assert main(["evaluate-2d", "--masks", str(tmp_path)]) == 2
    assert "drawn on the X-ray" in capsys.readouterr().err


@pytest.mark.parametrize("det,pix", [(64, 1.0), (64, 0.5), (200, 0.75)])
def test_silhouette_area_of_a_cube(det, pix):
    """A 32 mm cube projects to 32 x 32 mm whatever the pixel size (no rounding holes)."""
    grid = ReconGrid.centered((64, 64, 64), (64, 64, 64))
    m = np.zeros(grid.shape, bool)
    m[16:48, 16:48, 16:48] = True
    from KneeReconLib.core.geometry import ViewGeometry
    for view in ("ap", "lateral"):
        s = project_mask(m, grid, ViewGeometry(view, det, det, (pix, pix)))
        assert s.sum() * pix * pix == pytest.approx(1024, rel=0.06)
        assert not ndimage_holes(s)


def ndimage_holes(mask):
    from scipy import ndimage
    return bool((ndimage.binary_fill_holes(mask) & ~mask).any())


def test_silhouette_follows_the_height_offset():
    from KneeReconLib.core.geometry import ViewGeometry
    grid = ReconGrid.centered((64, 64, 64), (64, 64, 64))
    m = np.zeros(grid.shape, bool)
    m[20:40, 16:48, 16:48] = True
    for cone in (None, (1000.0, 800.0)):
        v = ViewGeometry("lateral", 128, 128, (0.5, 0.5), *(cone or (None, None)), side="left")
        r0 = np.argwhere(project_mask(m, grid, v))[:, 0].mean()
        r1 = np.argwhere(project_mask(m, grid, v, height_offset_mm=5.0))[:, 0].mean()
        assert (r0 - r1) * v.iso_spacing[1] == pytest.approx(5.0, abs=0.6)  # up = fewer rows
