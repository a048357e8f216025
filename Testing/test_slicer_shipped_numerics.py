"""The reconstruction path uses only libraries 3D Slicer ships (VTK, SimpleITK, numpy): the
pieces that replaced scikit-image give the same results as scikit-image did (scikit-image is in the
test environment through the [train] extra, so the comparison is made here)."""
import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SAMPLE
from KneeReconLib.core.geometry import ReconGrid
from KneeReconLib.core.labels import BONES
from KneeReconLib.geometry.alignment import knee_height, otsu3_upper
from KneeReconLib.core.ndfilters import bounding_box
from KneeReconLib.io.preprocessing import normalize_intensity
from KneeReconLib.io.xray_io import read_xray
from KneeReconLib.reconstruction.overlay import inner_boundary
from KneeReconLib.reconstruction.surfaces import _blurred_box, bone_surface, polydata_points, smooth_surface

skimage = pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def truth():
    img = sitk.ReadImage(os.path.join(SAMPLE, "truth.nii.gz"))
    lab = sitk.GetArrayFromImage(img)
    return lab, ReconGrid(lab.shape, img.GetSpacing(), img.GetOrigin())


def _marching_cubes_poly(mask, grid):
    """The surface as it was built before: scikit-image's marching cubes on the same blurred box."""
    import vtk
    from skimage.measure import marching_cubes
    from vtkmodules.util import numpy_support

    box = bounding_box(mask)
    img, _ = _blurred_box(mask, grid, box)
    m = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(img.GetDimensions()[::-1])
    sx, sy, sz = grid.spacing
    verts, faces, _, _ = marching_cubes(m, 0.5, spacing=(sz, sy, sx))
    o = img.GetOrigin()
    pts = np.c_[verts[:, 2] + o[0], verts[:, 1] + o[1], verts[:, 0] + o[2]]
    poly = vtk.vtkPolyData()
    p = vtk.vtkPoints()
    p.SetData(numpy_support.numpy_to_vtk(pts, deep=True))
    poly.SetPoints(p)
    cells = vtk.vtkCellArray()
    cells.SetData(numpy_support.numpy_to_vtkIdTypeArray(np.arange(0, 3 * len(faces) + 1, 3, dtype=np.int64), deep=True),
                  numpy_support.numpy_to_vtkIdTypeArray(faces.astype(np.int64).ravel(), deep=True))
    poly.SetPolys(cells)
    return poly


def _point_to_surface(points, poly):
    import vtk

    loc = vtk.vtkCellLocator()
    loc.SetDataSet(poly)
    loc.BuildLocator()
    cp, cid, sid, d2 = [0.0] * 3, vtk.reference(0), vtk.reference(0), vtk.reference(0.0)
    out = np.empty(len(points))
    for n, q in enumerate(points):
        loc.FindClosestPoint(q.tolist(), cp, cid, sid, d2)
        out[n] = float(d2) ** 0.5
    return out


def test_flying_edges_is_the_marching_cubes_surface(truth):
    """The same iso-surface (vertices to 1e-4 mm, the same triangle count), and after decimation and
    smoothing the same bone within a small fraction of a voxel."""
    from scipy.spatial import cKDTree

    lab, grid = truth
    for b in BONES:
        mask = lab == b.value
        raw_new = bone_surface(mask, grid, smoothing_iterations=0, target_reduction=0)
        raw_old = _marching_cubes_poly(mask, grid)
        pn, po = polydata_points(raw_new), polydata_points(raw_old)
        assert len(pn) == len(po) and raw_new.GetNumberOfCells() == raw_old.GetNumberOfCells(), b.name
        assert cKDTree(po).query(pn)[0].max() < 1e-4, b.name
        new, old = bone_surface(mask, grid), smooth_surface(raw_old)
        assert new.GetNumberOfCells() == old.GetNumberOfCells(), b.name
        d = np.r_[_point_to_surface(polydata_points(new), old), _point_to_surface(polydata_points(old), new)]
        voxel = min(grid.spacing)
        assert d.mean() < 0.02 * voxel and np.percentile(d, 99) < 0.25 * voxel and d.max() < voxel, \
            (b.name, d.mean(), np.percentile(d, 99), d.max())


def test_otsu_and_boundaries_match_scikit_image():
    from skimage.filters import threshold_multiotsu
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(3)
    images = [np.clip(normalize_intensity(read_xray(os.path.join(SAMPLE, f), "ap").pixels), 0, 1)
              for f in ("ap.nrrd", "lateral.nrrd")]
    images += [rng.normal(size=(30, 40)) * rng.uniform(0.1, 3) + (rng.random((30, 40)) > 0.5) * rng.uniform(0, 4)
               for _ in range(60)]
    for img in images:
        assert otsu3_upper(img) == pytest.approx(threshold_multiotsu(img, classes=3)[-1], abs=1e-9)
    for k in range(30):
        m = rng.random((37, 51)) > rng.uniform(0.2, 0.8)
        assert (inner_boundary(m) == find_boundaries(m, mode="inner")).all(), k
    # the knee joint's height on a long-leg view, as scikit-image's threshold gave it
    xa = read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap")
    a = np.clip(normalize_intensity(xa.pixels), 0, 1)
    assert otsu3_upper(a) == pytest.approx(threshold_multiotsu(a, classes=3)[-1])
    assert abs(knee_height(xa)) < 0.5 * xa.geometry.iso_extent[1]
