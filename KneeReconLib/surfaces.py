"""Label-map clean-up and smooth closed bone surfaces (scikit-image marching cubes, VTK
smoothing and decimation), in LPS millimetres."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from vtkmodules.util import numpy_support

from .fileio import atomic_path
from .geometry import ReconGrid
from .labels import BONES


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the bounding box of a binary mask (None when empty)."""
    from scipy.ndimage import find_objects

    box = find_objects(mask.astype(np.uint8, copy=False))
    return box[0] if box and box[0] is not None else None


def clean_labels(labels: np.ndarray) -> np.ndarray:
    """Keep each bone's largest connected component and fill its internal holes. Each bone is
    processed inside its own bounding box (the same result as on the whole grid, faster)."""
    from scipy.ndimage import find_objects

    out = np.zeros_like(labels, dtype=np.uint8)
    boxes = find_objects(labels.astype(np.uint8, copy=False), max_label=max(b.value for b in BONES))
    for b in BONES:
        box = boxes[b.value - 1]
        if box is None:
            continue
        m = labels[box] == b.value
        cc = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(m.astype(np.uint8))))
        filled = sitk.BinaryFillhole(cc == 1)
        sub = out[box]
        sub[sitk.GetArrayViewFromImage(filled).astype(bool) & (sub == 0)] = b.value
    return out


def bone_surface(mask: np.ndarray, grid: ReconGrid, smoothing_iterations: int = 20,
                 target_reduction: float = 0.5) -> vtk.vtkPolyData:
    """Closed, smooth triangle surface of a binary mask on `grid`, points in LPS mm."""
    from scipy.ndimage import gaussian_filter
    from skimage.measure import marching_cubes

    box = _bbox(mask)
    if box is None:
        return vtk.vtkPolyData()
    # only the bone's bounding box; a light blur before marching cubes removes the voxel
    # staircase; 2 voxels of padding close the surface
    m = gaussian_filter(np.pad(mask[box].astype(np.float32), 2), 0.6)
    sz, sy, sx = grid.spacing[2], grid.spacing[1], grid.spacing[0]
    if m.max() <= 0.5:  # a sliver thinner than the blur: no surface at the half level
        return vtk.vtkPolyData()
    verts, faces, _, _ = marching_cubes(m, 0.5, spacing=(sz, sy, sx))
    k0, j0, i0 = (s.start - 2 for s in box)
    pts = np.empty_like(verts)
    pts[:, 0] = verts[:, 2] + i0 * sx + grid.origin[0]
    pts[:, 1] = verts[:, 1] + j0 * sy + grid.origin[1]
    pts[:, 2] = verts[:, 0] + k0 * sz + grid.origin[2]
    poly = vtk.vtkPolyData()
    vp = vtk.vtkPoints()
    vp.SetData(numpy_support.numpy_to_vtk(pts.astype(np.float64), deep=True))
    poly.SetPoints(vp)
    ca = vtk.vtkCellArray()
    ca.SetData(numpy_support.numpy_to_vtkIdTypeArray(np.arange(0, 3 * len(faces) + 1, 3, dtype=np.int64), deep=True),
               numpy_support.numpy_to_vtkIdTypeArray(faces.astype(np.int64).ravel(), deep=True))
    poly.SetPolys(ca)
    out = poly
    if target_reduction > 0:
        dec = vtk.vtkQuadricDecimation()
        dec.SetInputData(out)
        dec.SetTargetReduction(target_reduction)
        dec.Update()
        out = dec.GetOutput()
    if smoothing_iterations > 0:
        sm = vtk.vtkWindowedSincPolyDataFilter()
        sm.SetInputData(out)
        sm.SetNumberOfIterations(smoothing_iterations)
        sm.SetPassBand(0.05)
        sm.NormalizeCoordinatesOn()
        sm.BoundarySmoothingOff()
        sm.FeatureEdgeSmoothingOff()
        sm.NonManifoldSmoothingOn()
        sm.Update()
        out = sm.GetOutput()
    normals = vtk.vtkPolyDataNormals()
    normals.SetInputData(out)
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()
    normals.SplittingOff()
    normals.Update()
    res = vtk.vtkPolyData()
    res.DeepCopy(normals.GetOutput())
    return res


def write_stl(poly: vtk.vtkPolyData, path: str) -> None:
    """Binary STL; a bone that was not found gives a valid STL with no triangles (the report says so)."""
    with atomic_path(path) as tmp:
        if poly.GetNumberOfCells() == 0:
            with open(tmp, "wb") as f:
                f.write(b"KneeRecon: empty surface (bone not found)".ljust(80, b" ") + (0).to_bytes(4, "little"))
            return
        w = vtk.vtkSTLWriter()
        w.SetFileName(tmp)
        w.SetInputData(poly)
        w.SetFileTypeToBinary()
        if not w.Write():
            raise OSError(f"could not write {path}")


def write_obj(poly: vtk.vtkPolyData, path: str) -> None:
    with atomic_path(path) as tmp:
        w = vtk.vtkOBJWriter()
        w.SetFileName(tmp)
        w.SetInputData(poly)
        if not w.Write():
            raise OSError(f"could not write {path}")


def polydata_points(poly: vtk.vtkPolyData) -> np.ndarray:
    if poly.GetNumberOfPoints() == 0:
        return np.zeros((0, 3))
    return numpy_support.vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float64)
