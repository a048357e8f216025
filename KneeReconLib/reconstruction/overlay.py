"""Review picture: the reconstructed bones projected back onto both input X-rays as outlines."""
from __future__ import annotations

import numpy as np

from ..core.geometry import ReconGrid, ViewGeometry
from ..core.labels import BONES
from ..core import ndfilters
from ..io.preprocessing import normalize_intensity


def project_mask(mask: np.ndarray, grid: ReconGrid, view: ViewGeometry, height_offset_mm: float = 0.0) -> np.ndarray:
    """Silhouette of a 3D mask on `view`'s detector pixels. Parallel beam: the mask's projection
    along the beam, sampled at each pixel centre. Cone beam: the mask's boundary voxels are
    projected by the contract's geometry (a splat of each voxel's footprint), then gaps closed.
    `height_offset_mm`: the image shows the knee that much higher (the lateral view's offset
    that the reconstruction corrected), so the silhouette moves up with it."""
    if not view.cone:  # parallel beam: the silhouette on the grid's plane, sampled at the pixel centres
        a = 0 if view.view == "ap" else 1
        plane = mask.any(axis=1 if a == 0 else 2).astype(np.float32)  # [nz, nx] (AP) or [nz, ny]
        u, v = view.pixel_to_detector(np.arange(view.width), np.arange(view.height))
        rows, cols = (v - height_offset_mm - grid.origin[2]) / grid.spacing[2], (u - grid.origin[a]) / grid.spacing[a]
        return ndfilters.sample_bilinear(plane, rows, cols, mode="constant", cval=0.0) >= 0.5
    # cone beam: every ray through the solid crosses its boundary, so splatting the boundary voxels and
    # filling holes gives the same silhouette as splatting all of them, at a fraction of the cost
    return splat_silhouette(boundary_points(mask, grid), grid, view, height_offset_mm)


def boundary_points(mask: np.ndarray, grid: ReconGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS mm (x, y, z) of the mask's boundary voxels (those with a 6-neighbour outside)."""
    box = ndfilters.bounding_box(mask)
    if box is None:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    sub = np.pad(mask[box], 1)
    k, j, i = np.nonzero(sub & ~ndfilters.binary_erosion(sub))
    k, j, i = (a + s.start - 1 for a, s in zip((k, j, i), box))
    return (grid.origin[0] + i * grid.spacing[0], grid.origin[1] + j * grid.spacing[1],
            grid.origin[2] + k * grid.spacing[2])


def splat_silhouette(points, grid: ReconGrid, view: ViewGeometry, height_offset_mm: float = 0.0) -> np.ndarray:
    """Silhouette on `view`'s pixels of a solid given by its boundary voxels' centres `points`
    (x, y, z in LPS mm, voxels of `grid`'s size): each voxel's footprint splatted by the
    contract's geometry, gaps closed, holes filled."""
    out = np.zeros((view.height, view.width), bool)
    x, y, z = points
    if not len(x):
        return out
    z = z + height_offset_mm
    # splat the voxel's footprint: corners of a half-voxel cross, enough for pixel-level silhouettes
    iso = view.iso_spacing
    a = 0 if view.view == "ap" else 1
    reach = max(grid.spacing[a] / iso[0], grid.spacing[2] / iso[1])
    offs = np.linspace(-0.5, 0.5, max(2, int(np.ceil(reach)) + 1))
    for du in offs:
        for dz in offs:
            dx = du * grid.spacing[0] if a == 0 else 0.0
            dy = du * grid.spacing[1] if a == 1 else 0.0
            c, r = view.project(x + dx, y + dy, z + dz * grid.spacing[2])
            # floor(x + 0.5), not rint: round-half-to-even leaves every other pixel empty when voxel
            # edges fall on half pixels (even widths, half-voxel pixels)
            c, r = np.floor(c + 0.5).astype(int), np.floor(r + 0.5).astype(int)
            ok = (c >= 0) & (c < view.width) & (r >= 0) & (r < view.height)
            out[r[ok], c[ok]] = True
    return ndfilters.binary_fill_holes(ndfilters.binary_closing(out))


def inner_boundary(mask: np.ndarray) -> np.ndarray:
    """The mask's pixels with a 4-connected neighbour outside it; pixels on the image border count
    as inside beyond it (scikit-image's find_boundaries(mode="inner"), which this replaces so that
    the Slicer module needs no scikit-image)."""
    mask = np.asarray(mask, bool)
    return mask & ~ndfilters.binary_erosion(mask, border_value=True)


def overlay_rgb(pixels: np.ndarray, labels: np.ndarray, grid: ReconGrid, view: ViewGeometry, thickness: int = 1,
                height_offset_mm: float = 0.0) -> np.ndarray:
    """RGB uint8 image of the X-ray with each bone's projected outline in its colour."""
    gray = (np.clip(normalize_intensity(pixels), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    for b in BONES:
        sil = project_mask(labels == b.value, grid, view, height_offset_mm)
        edge = inner_boundary(sil)
        if thickness > 1:
            edge = ndfilters.binary_dilation(edge, iterations=thickness - 1)
        rgb[edge] = (np.array(b.color) * 255).astype(np.uint8)
    return rgb


def overlay_picture(ap_pixels, lat_pixels, labels, grid, ap_view, lat_view, height: int = 512,
                    lateral_offset_mm: float = 0.0):
    """Both views side by side with outlines, scaled to `height` pixels, as a PIL image;
    `lateral_offset_mm`: the lateral view's corrected height offset (outlines follow the image)."""
    from PIL import Image

    panels = []
    for px, v, off in ((ap_pixels, ap_view, 0.0), (lat_pixels, lat_view, lateral_offset_mm)):
        rgb = overlay_rgb(px, labels, grid, v, thickness=max(1, int(round(max(v.height, v.width) / 400))), height_offset_mm=off)
        aspect = (v.width * v.iso_spacing[0]) / (v.height * v.iso_spacing[1])
        panels.append(Image.fromarray(rgb).resize((max(1, int(round(height * aspect))), height), Image.BILINEAR))
    w = sum(p.width for p in panels) + 8
    canvas = Image.new("RGB", (w, height), (0, 0, 0))
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + 8
    return canvas


def save_png(picture, path: str) -> None:
    """Write a PIL image as PNG through a temporary path."""
    from ..io.fileio import atomic_path

    with atomic_path(path) as tmp:
        # zlib level 1: a quarter of the default level's time for a file about 30 % larger
        picture.save(tmp, format="PNG", compress_level=1)


def overlay_png(ap_pixels, lat_pixels, labels, grid, ap_view, lat_view, path: str, height: int = 512,
                lateral_offset_mm: float = 0.0) -> None:
    """overlay_picture written to `path` as PNG."""
    save_png(overlay_picture(ap_pixels, lat_pixels, labels, grid, ap_view, lat_view, height, lateral_offset_mm), path)
