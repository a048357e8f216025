"""2D/3D registration of the statistical shape models to the two X-rays (Klima et al. 2015 style).

Each bone's pose (translation, rotation about its anchor, isotropic scale) and its shape
coefficients are optimised so that the parallel projections of the four bones match the input
X-rays, scored by normalized gradient cross-correlation (NGCC, the same measure as the training
loss). The bones are rendered as soft occupancies sigmoid(-SDF / tau) on a coarse copy of the
reconstruction grid; tau shrinks from coarse to fine during the optimisation, which widens the
capture range at the start and sharpens the fit at the end. A Mahalanobis prior keeps the shape
coefficients plausible, and they are limited to ±3 standard deviations.

Initialisations: `init_from_labels` places each bone's mean shape at the anchor measured on a
label map (from the 3D truth: the paper's "manual initialisation"; from a CNN reconstruction:
test-time refinement, with the CNN's shape projected onto the model); `perturb` adds random pose
errors (the paper's perturbed initialisations).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from ..core.errors import KneeReconError
from ..core.geometry import ReconGrid
from ..core.labels import BONES, BY_NAME
from ..training.losses import ngcc
from .shape_model import BoneShapeModel, ShapeModel, bone_anchor, canonical_sdf


@dataclass
class FitConfig:
    iterations: int = 150
    work_grid: int = 64  # voxels per axis of the grid the bones are rendered on while fitting
    tau_start_mm: float = 4.0
    tau_end_mm: float = 1.0
    lr_translation_mm: float = 1.0
    lr_rotation_rad: float = 0.01
    lr_log_scale: float = 0.005
    lr_shape_sd: float = 0.05  # shape coefficients in units of their standard deviation
    prior_weight: float = 0.002  # per coefficient, on (b / sd)^2, and on (log scale / scale_sd)^2
    scale_sd: float = 0.05  # size is mostly in the shape modes; the explicit scale only fine-tunes it
    max_sd: float = 3.0
    fit_shape: bool = True
    threads: int = 0


@dataclass
class BonePose:
    anchor: np.ndarray  # (x, y, z) LPS mm: where the canonical box's origin sits before the translation
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))
    rotation: np.ndarray = field(default_factory=lambda: np.zeros(3, np.float32))  # rotation vector (rad)
    log_scale: float = 0.0
    coeffs_sd: np.ndarray | None = None  # shape coefficients in units of sd (None = mean shape)


@dataclass
class FitResult:
    labels: np.ndarray  # uint8 [z, y, x] on the reconstruction grid
    poses: dict[str, BonePose]
    ngcc: float  # final mean NGCC of the two views, in [-1, 1]
    seconds: float


def init_from_labels(model: ShapeModel, labels: np.ndarray, grid: ReconGrid, side: str,
                     fit_coefficients: bool = False) -> dict[str, BonePose]:
    """Each bone's mean shape at the anchor measured on `labels` (bones absent there are left out);
    with `fit_coefficients`, the shape closest to the label map's (CNN initialisation)."""
    poses = {}
    for name, bm in model.bones.items():
        a = bone_anchor(labels == BY_NAME[name].value, grid, name)
        if a is None:
            continue
        pose = BonePose(anchor=a.astype(np.float32))
        if fit_coefficients:
            sdf = canonical_sdf(labels, grid, side, bm.box_mm, bm.spacing_mm, name, model.truncation_mm, anchor=a)
            pose.coeffs_sd = (bm.project(sdf) / bm.sd).astype(np.float32)
        poses[name] = pose
    return poses


def perturb(poses: dict[str, BonePose], rng: np.random.Generator, translation_mm: float = 10.0,
            rotation_deg: float = 10.0, scale: float = 0.1) -> dict[str, BonePose]:
    """Copies with uniform random errors: ±translation_mm per axis, ±rotation_deg about each
    axis, scale in [1 - scale, 1 + scale]."""
    out = {}
    for name, p in poses.items():
        out[name] = replace(p, translation=(p.translation + rng.uniform(-translation_mm, translation_mm, 3)).astype(np.float32),
                            rotation=(p.rotation + np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3))).astype(np.float32),
                            log_scale=float(p.log_scale + math.log(rng.uniform(1 - scale, 1 + scale))))
    return out


def _rotation_matrix(v: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula for a rotation vector (differentiable, also at 0)."""
    theta = torch.sqrt((v * v).sum() + 1e-12)
    k = v / theta
    K = torch.zeros(3, 3, dtype=v.dtype)
    K[0, 1], K[0, 2], K[1, 0], K[1, 2], K[2, 0], K[2, 1] = -k[2], k[1], k[2], -k[0], -k[1], k[0]
    return torch.eye(3, dtype=v.dtype) + torch.sin(theta) * K + (1 - torch.cos(theta)) * (K @ K)


class _BoneRenderer:
    """Canonical SDF of one bone (mean + modes . b), sampled at world points through its pose."""

    def __init__(self, bm: BoneShapeModel, side: str):
        self.bm = bm
        self.mirror = -1.0 if side == "left" else 1.0
        self.mean = torch.from_numpy(bm.mean)[None, None]
        self.modes = torch.from_numpy(bm.modes.reshape(len(bm.sd), -1))
        self.sd = torch.from_numpy(bm.sd)
        (x0, x1), (y0, y1), (z0, z1) = bm.box_mm
        nz, ny, nx = bm.shape
        # box edges in mm of the voxel centres, for grid_sample's align_corners=True normalisation
        self.lo = torch.tensor([x0, y0, z0], dtype=torch.float32)
        self.size = torch.tensor([(nx - 1) * bm.spacing_mm, (ny - 1) * bm.spacing_mm, (nz - 1) * bm.spacing_mm],
                                 dtype=torch.float32)

    def sdf(self, points: torch.Tensor, anchor, t, rotvec, log_scale, coeffs_sd) -> torch.Tensor:
        """World SDF (mm) at points [N, 3] (x, y, z LPS mm)."""
        R = _rotation_matrix(rotvec)
        s = torch.exp(log_scale)
        q = ((points - anchor - t) @ R) / s  # R^T (p - a - t) / s, row-vector form
        q = q * torch.tensor([self.mirror, 1.0, 1.0])
        g = 2.0 * (q - self.lo) / self.size - 1.0
        vol = self.mean
        if coeffs_sd is not None:
            vol = vol + ((coeffs_sd * self.sd) @ self.modes).view_as(self.mean)
        # border padding: beyond the box the shafts go on, and far from the bone the SDF stays positive
        val = F.grid_sample(vol, g.view(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border", align_corners=True)
        return val.view(-1) * s


def _grid_points(grid: ReconGrid, n: tuple[int, int, int]) -> torch.Tensor:
    """Voxel centres (x, y, z LPS mm) [nz * ny * nx, 3] of a grid with n = (nz, ny, nx) voxels
    covering the same box as `grid`."""
    axes = []
    for a, k in enumerate((n[2], n[1], n[0])):
        m = grid.shape[2 - a]
        centre = grid.origin[a] + (m - 1) / 2 * grid.spacing[a]
        step = grid.spacing[a] * m / k
        axes.append(torch.tensor(centre + (np.arange(k) - (k - 1) / 2) * step, dtype=torch.float32))
    z, y, x = torch.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return torch.stack([x, y, z], -1).view(-1, 3)


def view_images(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The AP image on the grid's (z, x) plane and the lateral on its (z, y) plane, read back from
    the network input (parallel beam: each channel is its image replicated along the beam)."""
    return np.asarray(volume[0, :, 0, :], np.float32), np.asarray(volume[1, :, :, 0], np.float32)


def fit(model: ShapeModel, volume: np.ndarray, grid: ReconGrid, side: str, init: dict[str, BonePose],
        cfg: FitConfig | None = None, log=None) -> FitResult:
    """Register the shape models to the X-rays held in `volume` (the network input [2, z, y, x],
    parallel beam) starting from `init`; returns labels on `grid`."""
    cfg = cfg or FitConfig()
    if side not in ("left", "right"):
        raise KneeReconError("shape-model registration needs the knee's side ('left' or 'right')")
    if not init:
        raise KneeReconError("shape-model registration needs an initial pose for at least one bone")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    ap, lat = (torch.from_numpy(a)[None, None] for a in view_images(volume))
    n = tuple(min(cfg.work_grid, k) for k in grid.shape)  # (z, y, x)
    ap_t = F.adaptive_avg_pool2d(ap, (n[0], n[2]))[0]  # [1, z, x]
    lat_t = F.adaptive_avg_pool2d(lat, (n[0], n[1]))[0]  # [1, z, y]
    pts = _grid_points(grid, n)

    names = [b.name for b in BONES if b.name in init and b.name in model.bones]
    rend = {k: _BoneRenderer(model.bones[k], side) for k in names}
    params = {}
    for k in names:
        p = init[k]
        K = len(model.bones[k].sd)
        c0 = p.coeffs_sd if p.coeffs_sd is not None else np.zeros(K, np.float32)
        params[k] = {
            "anchor": torch.tensor(p.anchor, dtype=torch.float32),
            "t": torch.tensor(p.translation, dtype=torch.float32, requires_grad=True),
            "r": torch.tensor(p.rotation, dtype=torch.float32, requires_grad=True),
            "s": torch.tensor(float(p.log_scale), dtype=torch.float32, requires_grad=True),
            "b": torch.tensor(c0, dtype=torch.float32, requires_grad=cfg.fit_shape),
        }
    groups = [{"params": [params[k]["t"] for k in names], "lr": cfg.lr_translation_mm},
              {"params": [params[k]["r"] for k in names], "lr": cfg.lr_rotation_rad},
              {"params": [params[k]["s"] for k in names], "lr": cfg.lr_log_scale}]
    if cfg.fit_shape:
        groups.append({"params": [params[k]["b"] for k in names], "lr": cfg.lr_shape_sd})
    opt = torch.optim.Adam(groups)
    base_lr = [g["lr"] for g in groups]

    def render(tau: float) -> torch.Tensor:
        occ = 0.0
        for k in names:
            q = params[k]
            d = rend[k].sdf(pts, q["anchor"], q["t"], q["r"], q["s"], q["b"])
            occ = occ + torch.sigmoid(-d / tau)
        return occ.view(n)

    for it in range(cfg.iterations):
        frac = it / max(1, cfg.iterations - 1)
        tau = cfg.tau_start_mm * (cfg.tau_end_mm / cfg.tau_start_mm) ** frac
        for g, lr in zip(opt.param_groups, base_lr):
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        occ = render(tau)
        score = 0.5 * (ngcc(ap_t, occ.sum(1)[None]) + ngcc(lat_t, occ.sum(2)[None])).mean()
        prior = sum((params[k]["s"] / cfg.scale_sd) ** 2 for k in names)
        if cfg.fit_shape:
            prior = prior + sum((params[k]["b"] ** 2).mean() for k in names)
        loss = -score + cfg.prior_weight * prior
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for k in names:
                params[k]["b"].clamp_(-cfg.max_sd, cfg.max_sd)
        if log and (it % 25 == 0 or it == cfg.iterations - 1):
            log(f"  iteration {it}: NGCC {float(score):.4f}, tau {tau:.2f} mm")

    # final shapes on the full reconstruction grid: each voxel goes to the bone it lies deepest in
    with torch.no_grad():
        occ = render(cfg.tau_end_mm)  # the score of the final (or, with 0 iterations, the initial) pose
        score = 0.5 * (ngcc(ap_t, occ.sum(1)[None]) + ngcc(lat_t, occ.sum(2)[None])).mean()
        full_pts = _grid_points(grid, grid.shape)
        best = torch.zeros(full_pts.shape[0])
        labels = torch.zeros(full_pts.shape[0], dtype=torch.uint8)
        for k in names:
            q = params[k]
            d = rend[k].sdf(full_pts, q["anchor"], q["t"], q["r"], q["s"], q["b"])
            inside = -d
            take = (inside > 0) & (inside > best)
            labels[take] = BY_NAME[k].value
            best = torch.where(take, inside, best)
    poses = {k: BonePose(anchor=params[k]["anchor"].numpy(), translation=params[k]["t"].detach().numpy(),
                         rotation=params[k]["r"].detach().numpy(), log_scale=float(params[k]["s"].detach()),
                         coeffs_sd=params[k]["b"].detach().numpy()) for k in names}
    return FitResult(labels.view(grid.shape).numpy(), poses, float(score.detach()), time.perf_counter() - t0)
