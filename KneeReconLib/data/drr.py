"""Digitally reconstructed radiographs in DESIGN.md's frame, in torch: differentiable,
batched, CPU or CUDA.

Attenuation model (`hu_to_mu`): mu = mu_water * (1 + HU/1000) for HU <= 0 (air to water:
density scaling), and mu = mu_water * (1 + BONE_SLOPE * HU/1000) above, because calcium's
photo-electric absorption makes bone attenuate relatively more at the ~60 keV effective energy
of a knee radiograph than at the ~70 keV of the CT that defined its HU (bilinear model as in
Schneider et al. / common DRR practice). mu_water = 0.02 /mm (about 60 keV).
The images hold line integrals of mu (unitless): bone bright, as the contract wants.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..core.geometry import ReconGrid, ViewGeometry

MU_WATER_PER_MM = 0.02
BONE_SLOPE = 1.2


def hu_to_mu(hu, bone_slope: float = BONE_SLOPE):
    """Linear attenuation (1/mm) from Hounsfield units; numpy or torch in, same out.
    `bone_slope`: relative attenuation per 1000 HU above water (tube voltage, filtration)."""
    if isinstance(hu, torch.Tensor):
        rel = torch.where(hu > 0, 1.0 + bone_slope * hu / 1000.0, 1.0 + hu / 1000.0)
        return MU_WATER_PER_MM * rel.clamp_min(0.0)
    hu = np.asarray(hu, dtype=np.float32)
    rel = np.where(hu > 0, 1.0 + bone_slope * hu / 1000.0, 1.0 + hu / 1000.0)
    return (MU_WATER_PER_MM * np.maximum(rel, 0.0)).astype(np.float32)


def project_parallel(volume: torch.Tensor, spacing: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Parallel-beam AP and lateral line integrals of volume[..., z, y, x] on an axis-aligned
    grid centred on the isocentre. Returns (ap[..., row, col], lateral[..., row, col]) in the
    contract's image orientation: AP columns +x, lateral columns +y, rows toward inferior."""
    ap = volume.sum(dim=-2) * spacing[1]
    lat = volume.sum(dim=-1) * spacing[0]
    return ap.flip(-2), lat.flip(-2)


def project_cone(volume: torch.Tensor, grid: ReconGrid, view: ViewGeometry, n_samples: int = 256,
                 rows_per_chunk: int | None = None) -> torch.Tensor:
    """Cone-beam line integrals of volume[B, z, y, x] (on `grid`) onto `view`'s detector by ray
    marching with trilinear sampling (n_samples per ray over the grid's bounding sphere).
    `project_cone_planes` computes the same integrals faster; this one is its reference.
    Returns [B, height, width]."""
    if not view.cone:
        raise ValueError("project_cone needs a view with SID and SOD")
    dev, dt = volume.device, volume.dtype
    B = volume.shape[0]
    H, W = view.height, view.width
    src = torch.tensor(view.source_position(), dtype=dt, device=dev)
    u, v = view.pixel_to_detector(np.arange(W)[None, :], np.arange(H)[:, None])
    u = torch.tensor(np.broadcast_to(u, (H, W)).copy(), dtype=dt, device=dev)
    v = torch.tensor(np.broadcast_to(v, (H, W)).copy(), dtype=dt, device=dev)
    det_depth = view.sid - view.sod  # detector plane beyond the isocentre
    if view.view == "ap":
        det = torch.stack([u, torch.full_like(u, det_depth), v], -1)
    else:
        sgn = 1.0 if view.side == "right" else -1.0
        det = torch.stack([torch.full_like(u, sgn * det_depth), u, v], -1)
    # march over the depth range (along the central beam axis) that the grid occupies
    half = 0.5 * float(np.linalg.norm([n * s for n, s in zip(grid.shape[::-1], grid.spacing)]))
    d0, d1 = view.sod - half, view.sod + half
    depths = d0 + (torch.arange(n_samples, dtype=dt, device=dev) + 0.5) * (d1 - d0) / n_samples
    ray = det - src  # [H, W, 3], reaches depth sid along the beam
    ray_len = ray.norm(dim=-1)  # mm per sid of depth
    step = (d1 - d0) / n_samples * ray_len / view.sid  # mm per sample, per pixel
    lo = torch.tensor(grid.origin, dtype=dt, device=dev)
    ext = torch.tensor([(n - 1) * s for n, s in zip(grid.shape[::-1], grid.spacing)], dtype=dt, device=dev)
    vol5 = volume.unsqueeze(1)
    out = []
    chunk = rows_per_chunk or max(1, int(4_000_000 // max(1, W * n_samples)))
    for r0 in range(0, H, chunk):
        r = ray[r0:r0 + chunk]
        pts = src + r[:, :, None, :] * (depths[None, None, :, None] / view.sid)  # [h, W, n, 3]
        norm = 2.0 * (pts - lo) / ext - 1.0
        g = norm.unsqueeze(0).expand(B, -1, -1, -1, -1)
        samples = F.grid_sample(vol5, g, mode="bilinear", padding_mode="zeros", align_corners=True)
        out.append(samples[:, 0].sum(-1) * step[r0:r0 + chunk])
    return torch.cat(out, dim=1)


def project_cone_planes(volume: torch.Tensor, grid: ReconGrid, view: ViewGeometry, planes_per_chunk: int = 32) -> torch.Tensor:
    """Cone-beam line integrals of volume[B, z, y, x] onto `view`'s detector by Joseph's method:
    each ray is sampled where it crosses each volume plane perpendicular to the central beam
    (one sample per plane, bilinear within the plane). With the source on the central axis and
    the detector perpendicular to it, a ray's crossing of plane j is the detector position
    scaled by one factor t_j, so the row and column coordinates separate: each plane costs two
    1-D gathers and lerps instead of a 3-D trilinear lookup per sample. Differentiable with
    respect to the volume. Returns [B, height, width]."""
    if not view.cone:
        raise ValueError("project_cone_planes needs a view with SID and SOD")
    dev, dt = volume.device, volume.dtype
    B = volume.shape[0]
    H, W = view.height, view.width
    if view.view == "ap":  # planes y = const, image columns along x
        vol = volume.permute(0, 2, 1, 3)  # [B, ny, nz, nx]
        pa, ha, sign = 1, 0, 1.0
    else:  # planes x = const, columns along y; source on the lateral side of the given knee
        vol = volume.permute(0, 3, 1, 2)  # [B, nx, nz, ny]
        pa, ha, sign = 0, 1, (1.0 if view.side == "right" else -1.0)
    # two zero voxels of padding on each side: rays that leave the grid read zeros
    vol = F.pad(vol, (2, 2, 2, 2))
    n_p, nz, nh = vol.shape[1], vol.shape[2] - 4, vol.shape[3] - 4
    u, v = view.pixel_to_detector(np.arange(W), np.arange(H))
    u = torch.as_tensor(u, dtype=dt, device=dev)
    v = torch.as_tensor(v, dtype=dt, device=dev)
    coord = grid.origin[pa] + torch.arange(n_p, dtype=dt, device=dev) * grid.spacing[pa]
    t = (sign * coord + view.sod) / view.sid  # [P] scale from the detector to plane j

    def index(f, n):  # continuous voxel index -> (lower padded index, weight); outside -> zeros
        f = f.clamp(-1.5, n + 0.5)
        i0 = torch.floor(f)
        return i0.long() + 2, (f - i0)

    iz, wz = index((v[None, :] * t[:, None] - grid.origin[2]) / grid.spacing[2], nz)  # [P, H]
    ih, wh = index((u[None, :] * t[:, None] - grid.origin[ha]) / grid.spacing[ha], nh)  # [P, W]
    # path length between consecutive planes along each pixel's ray
    step = grid.spacing[pa] * torch.sqrt(u[None, :] ** 2 + v[:, None] ** 2 + view.sid**2) / view.sid  # [H, W]
    out = torch.zeros(B, H, W, dtype=dt, device=dev)
    for j0 in range(0, n_p, planes_per_chunk):
        j = slice(j0, min(n_p, j0 + planes_per_chunk))
        vc = vol[:, j]  # [B, p, nz+4, nh+4]
        p = vc.shape[1]
        jj = torch.arange(p, device=dev)[:, None]
        rows = vc[:, jj, iz[j]] * (1 - wz[j])[None, :, :, None] + vc[:, jj, iz[j] + 1] * wz[j][None, :, :, None]  # [B, p, H, nh+4]
        idx = ih[j][None, :, None, :].expand(B, p, H, W)
        out = out + (torch.gather(rows, 3, idx) * (1 - wh[j])[None, :, None, :]
                     + torch.gather(rows, 3, idx + 1) * wh[j][None, :, None, :]).sum(1)
    return out * step


@dataclass
class DRRConfig:
    """How `render_drr` images a CT that is already in the knee frame (`frame.to_knee_frame`)."""

    pixel_spacing: float | None = None  # detector mm; default: the CT's voxel size (x magnification)
    size: tuple[int, int] | None = None  # (width, height) per view; default: cover the CT
    sid: float | None = None
    sod: float | None = None
    side: str = "right"
    method: str = "planes"  # "planes": Joseph's method, one sample per CT plane; "raymarch": n_samples per ray
    n_samples: int = 384
    bone_slope: float = BONE_SLOPE  # see hu_to_mu
    views: tuple[str, ...] = ("ap", "lateral")  # which views to render


def render_drr(ct: sitk.Image, config: DRRConfig | None = None, device: str = "cpu") -> dict:
    """AP and lateral DRRs of a knee-frame CT (HU). Returns {"ap": (image[H, W] float32,
    ViewGeometry), "lateral": (...)}; image values are line integrals of mu, bone bright."""
    config = config or DRRConfig()
    sp = np.array(ct.GetSpacing(), float)
    n = np.array(ct.GetSize())
    if not np.allclose(np.array(ct.GetDirection()).reshape(3, 3), np.eye(3), atol=1e-6):
        raise ValueError("render_drr needs an axis-aligned LPS volume: call frame.to_knee_frame first")
    grid = ReconGrid(shape=(int(n[2]), int(n[1]), int(n[0])), spacing=tuple(sp), origin=tuple(ct.GetOrigin()))
    mu = torch.from_numpy(hu_to_mu(sitk.GetArrayFromImage(ct), config.bone_slope)).to(device)
    cone = config.sid is not None
    mag = config.sid / config.sod if cone else 1.0
    out = {}
    for view, (wa, ha) in (("ap", (0, 2)), ("lateral", (1, 2))):
        if view not in config.views:
            continue
        iso_px = config.pixel_spacing / mag if config.pixel_spacing else float(min(sp[wa], sp[ha]))
        det_px = iso_px * mag
        if config.size:
            W, H = config.size
        else:
            W = int(round(n[wa] * sp[wa] / iso_px))
            H = int(round(n[ha] * sp[ha] / iso_px))
        geom = ViewGeometry(view, W, H, (det_px, det_px), config.sid, config.sod, config.side)
        if cone:
            if config.method == "planes":
                img = project_cone_planes(mu[None], grid, geom)[0]
            elif config.method == "raymarch":
                img = project_cone(mu[None], grid, geom, config.n_samples)[0]
            else:
                raise ValueError(f"unknown cone-beam method {config.method!r}")
        else:
            img = _parallel_on_detector(mu, grid, geom)
        out[view] = (img.cpu().numpy().astype(np.float32), geom)
    return out


def _parallel_on_detector(mu: torch.Tensor, grid: ReconGrid, geom: ViewGeometry) -> torch.Tensor:
    """Parallel projection, then resampling of the projection onto the detector's pixels."""
    ap, lat = project_parallel(mu, grid.spacing)
    img = ap if geom.view == "ap" else lat
    a = 0 if geom.view == "ap" else 1
    # pixel centres of the projection image in mm (columns along axis a, rows toward -z)
    if np.isclose(geom.spacing[0], grid.spacing[a]) and img.shape[1] == geom.width and img.shape[0] == geom.height \
            and np.isclose(geom.spacing[1], grid.spacing[2]):
        return img
    cols, rows = np.meshgrid(np.arange(geom.width), np.arange(geom.height))
    u, v = geom.pixel_to_detector(cols, rows)
    gx = 2.0 * (u - grid.origin[a]) / ((img.shape[1] - 1) * grid.spacing[a]) - 1.0
    z_top = grid.origin[2] + (img.shape[0] - 1) * grid.spacing[2]
    gy = 2.0 * (z_top - v) / ((img.shape[0] - 1) * grid.spacing[2]) - 1.0
    g = torch.from_numpy(np.stack([gx, gy], -1)[None].astype(np.float32)).to(img.device)
    return F.grid_sample(img[None, None], g, mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0]
