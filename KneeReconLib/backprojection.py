"""The network's input: each X-ray replicated along its own projection direction into the
reconstruction grid (channel 0 = AP, channel 1 = lateral). Parallel beam replicates rows of
the resampled image; cone beam samples each detector where each voxel projects."""
from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

from .geometry import ReconGrid, ViewGeometry
from .xray_io import XRay


def _antialias(pixels: np.ndarray, geom: ViewGeometry, grid_step_col: float, grid_step_row: float) -> np.ndarray:
    """Blur before downsampling so that the grid samples the image without aliasing."""
    iso = geom.iso_spacing
    sig = [0.5 * np.sqrt(max(0.0, (g / s) ** 2 - 1.0)) for g, s in ((grid_step_row, iso[1]), (grid_step_col, iso[0]))]
    return gaussian_filter(pixels, sig, mode="nearest") if max(sig) > 0.1 else pixels


def _sample(pixels: np.ndarray, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
    # outside the detector the value is the edge value: the image simply goes on
    return map_coordinates(pixels, [rows, cols], order=1, mode="nearest").astype(np.float32)


def backproject_view(xray: XRay, grid: ReconGrid, offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """One channel [nz, ny, nx]: the image value seen by each voxel. `offset_mm` moves the
    image content by that world offset (used by augmentation)."""
    g = xray.geometry
    a = 0 if g.view == "ap" else 1
    px = _antialias(xray.pixels, g, grid.spacing[a], grid.spacing[2])
    x, y, z = (grid.axis(i) - offset_mm[i] for i in range(3))
    if not g.cone:
        if g.view == "ap":
            zz, xx = np.meshgrid(z, x, indexing="ij")
            cols, rows = g.project(xx, 0.0, zz)
            plane = _sample(px, cols, rows)  # [nz, nx]
            return np.ascontiguousarray(np.broadcast_to(plane[:, None, :], grid.shape))
        zz, yy = np.meshgrid(z, y, indexing="ij")
        cols, rows = g.project(0.0, yy, zz)
        plane = _sample(px, cols, rows)  # [nz, ny]
        return np.ascontiguousarray(np.broadcast_to(plane[:, :, None], grid.shape))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    cols, rows = g.project(xx, yy, zz)
    return _sample(px, cols, rows).reshape(grid.shape)


def backproject(ap: XRay, lateral: XRay, grid: ReconGrid, lateral_offset_mm: float = 0.0,
                shift_mm: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """The 2-channel input volume [2, nz, ny, nx] (float32)."""
    dx, dy = shift_mm
    out = np.empty((2,) + tuple(grid.shape), np.float32)
    out[0] = backproject_view(ap, grid, (dx, dy, 0.0))
    out[1] = backproject_view(lateral, grid, (dx, dy, lateral_offset_mm))
    return out
