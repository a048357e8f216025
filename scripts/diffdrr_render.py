#!/usr/bin/env python
"""Render AP and lateral DRRs of a knee CT with DiffDRR (an independent projector), in the
geometry of KneeRecon's coordinate contract (/work/shared/DESIGN.md), and write them as
`kneerecon drr` / `xray_io.write_xray` write theirs.

Standalone test-time tool: it imports only numpy, SimpleITK, torch and diffdrr (DiffDRR pulls in
torchio itself), never KneeReconLib. Run it with the interpreter of the environment that has
DiffDRR (tested with diffdrr 0.6.1, torch 2.13 CPU), e.g.

    /tmp/ddrvenv/bin/python scripts/diffdrr_render.py --ct ct_knee.nii.gz --output out \
        --side right --pixel-spacing 0.6 [--sid 1100 --sod 950] [--ap-size W H --lateral-size W H]
    /tmp/ddrvenv/bin/python scripts/diffdrr_render.py --self-test --output out   # cube + projection checks

Input: a CT in HU whose physical (LPS) coordinates are the contract's world frame with the
isocentre at the origin: a knee-frame CT as `frame.to_knee_frame` makes it (what `kneerecon drr`
renders). Any NIfTI/NRRD/MHA SimpleITK and torchio read works; its direction may be oblique.

Geometry (DESIGN.md): AP beam along +y (source at y = -SOD), columns toward +x, rows toward -z;
lateral beam along x from the knee's lateral side (source at x = -SOD for a right knee, +SOD for a
left knee), columns toward +y (posterior), rows toward -z. Detector spacing is the file's spacing;
at the isocentre it is spacing * SOD / SID. Pixel (c, r) of a W x H image is centred at detector
offset ((c - (W-1)/2) * s, -(r - (H-1)/2) * s).

Parallel beam: DiffDRR has no parallel-beam mode. It is approximated with a cone beam whose
source is very far (default SOD = 1e6 mm, detector 1000 mm beyond the isocentre; the detector
spacing is set so that the spacing at the isocentre equals the requested spacing). At 1e6 mm
the rays across a 220 mm field diverge by 1.1e-4 rad and the magnification varies by 1e-4 over
+-100 mm of depth: < 0.02 mm anywhere in the image. Rendering is in float64 by default, because
in float32 Siddon's ray parameters (ray length ~1e6 mm, voxel steps ~1e-6 of it) lose precision.

How DiffDRR's frames are used (worked out from diffdrr 0.6.1's source; see docs/diffdrr.md):
- `diffdrr.data.read` (torchio) gives the volume's affine in RAS (nibabel convention): world_RAS =
  diag(-1, -1, 1) * world_LPS. `orientation=None` (reorient = identity) and
  `center_volume=False` keep the CT's own coordinates, so the contract's isocentre stays at the
  origin. The density is replaced by KneeRecon's attenuation (`hu_to_mu` below), in 1/mm, so the
  renders are line integrals of mu (unitless) like KneeRecon's.
- The camera frame: source at the origin, detector plane at z = SID, detector row index
  increasing toward -y_cam, column index increasing toward +x_cam, or toward -x_cam with
  `reverse_x_axis=True`. The pose (parameterization "matrix") is the camera-to-world rigid
  transform: its rotation's columns are the camera axes in world RAS and its translation is the
  source position in RAS.
- Because the contract's lateral image has columns toward posterior whichever side the source is
  on, the right-knee lateral view is a mirror image in DiffDRR's camera: it needs
  `reverse_x_axis=False`; AP and left-knee lateral need `reverse_x_axis=True`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import SimpleITK as sitk
import torch

import diffdrr
from diffdrr.data import read
from diffdrr.drr import DRR

MU_WATER_PER_MM = 0.02  # as KneeReconLib.data.drr
BONE_SLOPE = 1.2
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
PARALLEL_SOD_MM = 1.0e6
PARALLEL_DETECTOR_BEYOND_MM = 1000.0


def hu_to_mu(hu, bone_slope: float = BONE_SLOPE):
    """KneeRecon's bilinear HU -> attenuation (1/mm): mu_w (1 + HU/1000) for HU <= 0,
    mu_w (1 + bone_slope HU/1000) above; clamped at 0. Same as KneeReconLib.data.drr.hu_to_mu."""
    hu = hu.to(torch.float64)
    rel = torch.where(hu > 0, 1.0 + bone_slope * hu / 1000.0, 1.0 + hu / 1000.0)
    return MU_WATER_PER_MM * rel.clamp_min(0.0)


def camera_pose(view: str, side: str, sod: float) -> tuple[np.ndarray, bool]:
    """(4x4 camera-to-world matrix in RAS, reverse_x_axis) for DiffDRR with orientation=None.

    Columns of the rotation: the camera x axis (image columns, or minus them with
    reverse_x_axis), y axis (image up, i.e. minus rows) and z axis (beam) in world RAS."""
    up = [0.0, 0.0, 1.0]  # rows toward -z (inferior) in both views
    if view == "ap":
        # beam +y_LPS = -y_RAS; columns toward +x_LPS = -x_RAS = -x_cam -> reverse_x_axis
        x_cam, z_cam, src_lps, rev = [1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, -sod, 0.0], True
    elif side == "right":
        # source at x_LPS = -SOD, beam +x_LPS = -x_RAS; columns toward +y_LPS = -y_RAS = +x_cam
        x_cam, z_cam, src_lps, rev = [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [-sod, 0.0, 0.0], False
    else:
        # source at x_LPS = +SOD, beam -x_LPS = +x_RAS; columns toward -y_RAS = -x_cam -> reverse_x_axis
        x_cam, z_cam, src_lps, rev = [0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [sod, 0.0, 0.0], True
    R = np.stack([x_cam, up, z_cam], axis=1)
    assert np.allclose(np.cross(R[:, 0], R[:, 1]), R[:, 2]) and np.isclose(np.linalg.det(R), 1.0)
    M = np.eye(4)
    M[:3, :3] = R
    M[:3, 3] = LPS_TO_RAS @ np.asarray(src_lps)
    return M, rev


def contract_project(view: str, side: str, width: int, height: int, spacing: float, sid, sod, pts_lps):
    """DESIGN.md's projection of LPS points to pixel (col, row) (as KneeReconLib.core.geometry.ViewGeometry.project)."""
    x, y, z = np.asarray(pts_lps, float).T
    u = x if view == "ap" else y
    if sid is None:
        m = 1.0
    else:
        depth = y + sod if view == "ap" else (x + sod if side == "right" else sod - x)
        m = sid / depth
    return np.stack([u * m / spacing + (width - 1) / 2.0, -z * m / spacing + (height - 1) / 2.0], -1)


class Renderer:
    """DiffDRR renders of one subject in the contract's views."""

    def __init__(self, subject, renderer: str = "siddon", dtype=torch.float64, patch_size: int = 64,
                 n_points: int | None = None):
        self.subject, self.renderer, self.dtype = subject, renderer, dtype
        self.patch_size, self.n_points = patch_size, n_points

    def render(self, view: str, side: str, width: int, height: int, det_spacing: float, sid: float, sod: float):
        pose_m, rev = camera_pose(view, side, sod)
        drr = DRR(self.subject, sdd=sid, height=height, width=width, delx=det_spacing, dely=det_spacing,
                  reverse_x_axis=rev, renderer=self.renderer, patch_size=None).to(self.dtype)
        pose = torch.as_tensor(pose_m[None], dtype=self.dtype)
        kw = {"n_points": self.n_points} if (self.renderer == "trilinear" and self.n_points) else {}
        # render in chunks of rays ourselves (DRR's patch_size needs H*W divisible by patch_size**2)
        from diffdrr.pose import RigidTransform
        source, target = drr.detector(RigidTransform(pose), None)
        chunk = max(1, self.patch_size ** 2)
        parts = []
        with torch.no_grad():
            for i in range(0, target.shape[1], chunk):
                parts.append(drr.render(drr.density, source, target[:, i:i + chunk], **kw))
        img = torch.cat(parts, dim=-1).reshape(height, width)
        return img.cpu().numpy(), drr, RigidTransform(pose)


def subject_from_ct(path: str, bone_slope: float):
    """DiffDRR subject of the CT at `path` (torchio/RAS), its density replaced by mu (1/mm)."""
    subject = read(path, orientation=None, center_volume=False)
    # sanity: torchio's RAS affine is SimpleITK's LPS geometry with x, y negated
    im = sitk.ReadImage(path)
    D = np.array(im.GetDirection()).reshape(3, 3) * np.array(im.GetSpacing())[None, :]
    aff = np.eye(4)
    aff[:3, :3] = LPS_TO_RAS @ D
    aff[:3, 3] = LPS_TO_RAS @ np.array(im.GetOrigin())
    if not np.allclose(np.asarray(subject.volume.affine), aff, atol=1e-3):
        raise SystemExit(f"torchio's affine\n{subject.volume.affine}\nis not SimpleITK's geometry in RAS\n{aff}")
    subject.density.set_data(hu_to_mu(subject.volume.data, bone_slope).to(torch.float32))
    return subject


def write_like_kneerecon(pixels: np.ndarray, view: str, spacing: float, sid, sod, path: str, meta: dict,
                         as_float: bool = False, max_value: float = 30000.0) -> float:
    """As KneeReconLib.io.xray_io.write_xray: 2D uint16 (max `max_value`), bone bright, spacing set,
    origin -(n-1)/2 * spacing, KneeRecon_view and, for cone beam, KneeRecon_SID_mm/SOD_mm.
    Also records the line integral per count (DiffDRR_mu_integral_per_count) so the absolute
    values can be recovered. Returns that factor."""
    a = np.asarray(pixels, np.float64)
    offset = min(0.0, float(a.min()))
    a = a - offset
    top = float(a.max()) or 1.0
    per_count = 1.0 if as_float else top / max_value
    if as_float:
        img = sitk.GetImageFromArray(a.astype(np.float32))
    else:
        img = sitk.GetImageFromArray(np.clip(np.rint(a / per_count), 0, 65535).astype(np.uint16))
    h, w = a.shape
    img.SetSpacing((spacing, spacing))
    img.SetOrigin((-(w - 1) / 2 * spacing, -(h - 1) / 2 * spacing))
    img.SetMetaData("KneeRecon_view", view)
    if sid is not None:
        img.SetMetaData("KneeRecon_SID_mm", f"{float(sid)}")
        img.SetMetaData("KneeRecon_SOD_mm", f"{float(sod)}")
    img.SetMetaData("DiffDRR_mu_integral_per_count", repr(per_count))
    img.SetMetaData("DiffDRR_mu_integral_offset", repr(offset))
    for k, v in meta.items():
        img.SetMetaData(k, str(v))
    tmp = path + ".tmp.nrrd"
    sitk.WriteImage(img, tmp, useCompression=True)
    os.replace(tmp, path)
    return per_count


def default_size(ct: sitk.Image, view: str, iso_px: float) -> tuple[int, int]:
    """As KneeReconLib.data.drr.render_drr without a size: cover the CT's extent."""
    n, sp = np.array(ct.GetSize()), np.array(ct.GetSpacing())
    wa = 0 if view == "ap" else 1
    return int(round(n[wa] * sp[wa] / iso_px)), int(round(n[2] * sp[2] / iso_px))


def geometry_args(a):
    """(sid, sod used for rendering, sid/sod written to the file or None)."""
    if (a.sid is None) != (a.sod is None):
        raise SystemExit("give both --sid and --sod for a cone beam, or neither for the parallel approximation")
    if a.sid is not None:
        if not 0 < a.sod < a.sid:
            raise SystemExit("need 0 < SOD < SID")
        return a.sid, a.sod, (a.sid, a.sod)
    sod = a.parallel_sod
    return sod + PARALLEL_DETECTOR_BEYOND_MM, sod, (None, None)


def cmd_render(a) -> int:
    t0 = time.perf_counter()
    sid, sod, (file_sid, file_sod) = geometry_args(a)
    mag = sid / sod
    ct = sitk.ReadImage(a.ct)
    # --pixel-spacing is the detector spacing (as `kneerecon drr --pixel-spacing`); for the
    # parallel approximation the detector and isocentre spacings are both the file's spacing
    # --pixel-spacing is the file's (detector) spacing, as for `kneerecon drr`; for the parallel
    # approximation that is the spacing at the isocentre, and the far detector is scaled to match
    file_px = a.pixel_spacing or float(min(ct.GetSpacing())) * (mag if file_sid else 1.0)
    iso_px = file_px / mag if file_sid else file_px
    render_det_px = iso_px * mag
    subject = subject_from_ct(a.ct, a.bone_slope)
    rnd = Renderer(subject, a.renderer, torch.float64 if a.dtype == "float64" else torch.float32, a.chunk, a.n_points)
    os.makedirs(a.output, exist_ok=True)
    info = {"ct": os.path.abspath(a.ct), "diffdrr_version": diffdrr.__version__, "torch": torch.__version__,
            "renderer": a.renderer, "dtype": a.dtype, "side": a.side, "views": {}}
    for view, size in (("ap", a.ap_size), ("lateral", a.lateral_size)):
        w, h = size or default_size(ct, view, iso_px)
        t1 = time.perf_counter()
        img, drr, pose = rnd.render(view, a.side, w, h, render_det_px, sid, sod)
        meta = {"DiffDRR_version": diffdrr.__version__, "DiffDRR_renderer": a.renderer}
        if file_sid is None:
            meta["DiffDRR_parallel_approximation"] = f"cone beam with SOD {sod} mm, SID {sid} mm"
        path = os.path.join(a.output, f"{view}.nrrd")
        per_count = write_like_kneerecon(img, view, file_px, file_sid, file_sod, path, meta, a.float)
        pose_m, rev = camera_pose(view, a.side, sod)
        info["views"][view] = {"file": path, "width": w, "height": h, "file_spacing_mm": file_px,
                               "iso_spacing_mm": iso_px, "render_sid_mm": sid, "render_sod_mm": sod,
                               "render_detector_spacing_mm": render_det_px, "reverse_x_axis": rev,
                               "pose_camera_to_world_RAS": pose_m.tolist(), "mu_integral_per_count": per_count,
                               "max_line_integral": float(img.max()), "seconds": round(time.perf_counter() - t1, 2)}
        print(f"{view}: {w}x{h} px, {file_px:.4f} mm, max line integral {img.max():.3f}, "
              f"{time.perf_counter() - t1:.1f} s -> {path}", flush=True)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    with open(os.path.join(a.output, "diffdrr_render.json"), "w") as f:
        json.dump(info, f, indent=1)
    return 0


def box_path_length(src: np.ndarray, dst: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Analytic length of segments src->dst[N] inside the axis-aligned box [lo, hi] (slab method)."""
    d = dst - src
    with np.errstate(divide="ignore", invalid="ignore"):
        t0 = (lo - src) / d
        t1 = (hi - src) / d
    tmin = np.where(np.isfinite(t0), np.minimum(t0, t1), -np.inf)
    tmax = np.where(np.isfinite(t1), np.maximum(t0, t1), np.inf)
    inside = (d == 0) & (src >= lo) & (src <= hi)
    tmin = np.where(d == 0, np.where(inside, -np.inf, np.inf), tmin)
    tmax = np.where(d == 0, np.where(inside, np.inf, -np.inf), tmax)
    a = np.clip(tmin.max(-1), 0, 1)
    b = np.clip(tmax.min(-1), 0, 1)
    return np.maximum(b - a, 0) * np.linalg.norm(d, axis=-1)


def cmd_self_test(a) -> int:
    """(1) Uniform cube: DiffDRR's line integrals against the analytic path lengths of each ray
    through the cube (cone SID/SOD and the parallel approximation; siddon and trilinear, float32
    and float64). (2) DiffDRR's own perspective_projection of points against the contract's
    projection formula, for each view and side."""
    os.makedirs(a.output, exist_ok=True)
    # a 40 x 50 x 60 voxel box of mu = 1/mm, 1 mm voxels, off-centre so asymmetries show
    nx, ny, nz = 40, 50, 60
    shift_lps = np.array([7.0, -5.0, 9.0])
    arr = np.ones((nz, ny, nx), np.float32) * 1000.0  # HU, mu = 0.02 * (1 + 1.2) = 0.044
    pad = 10
    big = np.full((nz + 2 * pad, ny + 2 * pad, nx + 2 * pad), -1000.0, np.float32)
    big[pad:-pad, pad:-pad, pad:-pad] = arr
    big[0, 0, 0] = -500.0  # diffdrr.data.read's own HU conversion fails without any soft tissue; zeroed below
    im = sitk.GetImageFromArray(big)
    im.SetSpacing((1.0, 1.0, 1.0))
    size = np.array(big.shape[::-1])
    im.SetOrigin(tuple(-(size - 1) / 2.0 + shift_lps))
    path = os.path.join(a.output, "cube_ct.nii.gz")
    sitk.WriteImage(im, path)
    mu_box = MU_WATER_PER_MM * (1 + BONE_SLOPE * 1.0)
    lo = shift_lps - np.array([nx, ny, nz]) / 2.0  # voxel faces (centres +-0.5)
    hi = shift_lps + np.array([nx, ny, nz]) / 2.0
    subject = subject_from_ct(path, BONE_SLOPE)
    subject.density.data[0, 0, 0, 0] = 0.0
    assert abs(float(subject.density.data.double().sum()) / (mu_box * nx * ny * nz) - 1) < 1e-6
    W, H, iso = 90, 100, 1.0
    results = []
    for geom, (sid, sod) in (("cone SID 1100 SOD 950", (1100.0, 950.0)),
                             ("parallel approx SOD 1e6", (PARALLEL_SOD_MM + PARALLEL_DETECTOR_BEYOND_MM, PARALLEL_SOD_MM))):
        for renderer in ("siddon", "trilinear"):
            for dtype in ("float64", "float32"):
                rnd = Renderer(subject, renderer, torch.float64 if dtype == "float64" else torch.float32, 64,
                               a.n_points)
                for view, side in (("ap", "right"), ("lateral", "right"), ("lateral", "left")):
                    img, _, _ = rnd.render(view, side, W, H, iso * sid / sod, sid, sod)
                    pose_m, _ = camera_pose(view, side, sod)
                    src = LPS_TO_RAS @ pose_m[:3, 3]  # back to LPS (LPS_TO_RAS is its own inverse)
                    s = iso * sid / sod
                    c, r = np.meshgrid(np.arange(W), np.arange(H))
                    u, v = (c - (W - 1) / 2) * s, -(r - (H - 1) / 2) * s
                    depth = sid - sod
                    if view == "ap":
                        det = np.stack([u, np.full_like(u, depth), v], -1)
                    else:
                        sg = 1.0 if side == "right" else -1.0
                        det = np.stack([np.full_like(u, sg * depth), u, v], -1)
                    ref = mu_box * box_path_length(src, det.reshape(-1, 3), lo, hi).reshape(H, W)
                    err = img - ref
                    # exclude rays within 2 px of the box's silhouette (partial-volume edge pixels)
                    inside = ref > 0
                    near_edge = np.zeros_like(inside)
                    for dc in range(-2, 3):
                        for dr in range(-2, 3):
                            near_edge |= inside != np.roll(np.roll(inside, dc, 1), dr, 0)
                    m = inside & ~near_edge
                    res = {"geometry": geom, "renderer": renderer, "dtype": dtype, "view": view, "side": side,
                           "centre_ray_mm": float(img[H // 2, W // 2] / mu_box),
                           "centre_ray_analytic_mm": float(ref[H // 2, W // 2] / mu_box),
                           "interior_max_abs_rel_error": float(np.abs(err[m]).max() / ref[m].max()),
                           "interior_mean_rel_error": float(err[m].mean() / ref[m].mean()),
                           "all_pixels_max_abs_error_mm": float(np.abs(err).max() / mu_box),
                           "total_integral_ratio": float(img.sum() / ref.sum())}
                    results.append(res)
                    print(f"cube {geom:26s} {renderer:9s} {dtype:7s} {view:7s} {side:5s}: centre ray "
                          f"{res['centre_ray_mm']:.3f} mm (analytic {res['centre_ray_analytic_mm']:.3f}), interior "
                          f"max |rel err| {res['interior_max_abs_rel_error']:.2e}, mean {res['interior_mean_rel_error']:+.2e}, "
                          f"worst pixel {res['all_pixels_max_abs_error_mm']:.2f} mm, sum ratio {res['total_integral_ratio']:.5f}",
                          flush=True)
    # (2) DiffDRR's perspective_projection vs the contract's formula
    pts = np.array([[0, 0, 0], [30, 0, 0], [0, 30, 0], [0, 0, 40], [20, -25, -35], [-40, 15, 50]], float)
    proj = []
    for view, side in (("ap", "right"), ("ap", "left"), ("lateral", "right"), ("lateral", "left")):
        W2, H2, s = 200, 260, 0.7
        pose_m, rev = camera_pose(view, side, 950.0)
        drr = DRR(subject, sdd=1100.0, height=H2, width=W2, delx=s, dely=s, reverse_x_axis=rev).to(torch.float64)
        from diffdrr.pose import RigidTransform
        pix = drr.perspective_projection(RigidTransform(torch.as_tensor(pose_m[None])),
                                         torch.as_tensor((LPS_TO_RAS @ pts.T).T[None])).numpy()[0]
        ref = contract_project(view, side, W2, H2, s, 1100.0, 950.0, pts)
        # DiffDRR's pixel coordinates put the first pixel's centre at 0.5 (corner convention)
        d = pix - 0.5 - ref
        proj.append({"view": view, "side": side, "max_abs_difference_px": float(np.abs(d).max())})
        print(f"perspective_projection {view:7s} {side:5s}: max |DiffDRR - 0.5 - contract| = {np.abs(d).max():.2e} px")
    with open(os.path.join(a.output, "self_test.json"), "w") as f:
        json.dump({"cube": results, "projection": proj, "cube_mu_per_mm": mu_box,
                   "cube_faces_lps_mm": [lo.tolist(), hi.tolist()]}, f, indent=1)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ct", help="knee-frame CT (HU)")
    p.add_argument("--output", required=True, help="folder for ap.nrrd, lateral.nrrd, diffdrr_render.json")
    p.add_argument("--side", choices=["left", "right"], default="right")
    p.add_argument("--pixel-spacing", type=float, help="detector (file) spacing in mm; default the CT voxel (x magnification)")
    p.add_argument("--sid", type=float, help="cone beam: source-to-image distance (mm)")
    p.add_argument("--sod", type=float, help="cone beam: source-to-isocentre distance (mm)")
    p.add_argument("--parallel-sod", type=float, default=PARALLEL_SOD_MM,
                   help="parallel-beam approximation: source distance (mm; the detector is 1000 mm beyond the isocentre)")
    p.add_argument("--ap-size", type=int, nargs=2, metavar=("W", "H"), help="AP image size (default: cover the CT)")
    p.add_argument("--lateral-size", type=int, nargs=2, metavar=("W", "H"))
    p.add_argument("--bone-slope", type=float, default=BONE_SLOPE)
    p.add_argument("--renderer", choices=["siddon", "trilinear"], default="siddon")
    p.add_argument("--n-points", type=int, help="trilinear: samples per ray (DiffDRR's default 500)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--chunk", type=int, default=64, help="render chunk**2 rays at a time (memory)")
    p.add_argument("--float", action="store_true", help="write float32 line integrals instead of uint16 like write_xray")
    p.add_argument("--self-test", action="store_true", help="cube line-integral and projection checks, then exit")
    a = p.parse_args(argv)
    if a.self_test:
        return cmd_self_test(a)
    if not a.ct:
        p.error("--ct is required")
    return cmd_render(a)


if __name__ == "__main__":
    sys.exit(main())
