"""Procedural, labelled knee CT phantoms in Hounsfield units.

Each bone is an implicit shape (approximate signed distances of ellipsoids, elliptic
frustums and cylinders joined by smooth unions and carved by smooth subtractions), warped
by a smooth random displacement field so that no two knees share a shape. The knee is
built as a right knee in a knee frame (LPS axes, joint line near z=0, lateral = -x) and
mirrored for a left knee; tibia and fibula rotate about the femoral condyles' axis with
flexion, the patella follows by a fraction of it. Soft tissue (muscle, fat, skin) and air
surround the bones. All distributions are listed in `PhantomConfig` and docs/phantoms.md.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from ..core.labels import BY_NAME


@dataclass
class PhantomConfig:
    """Population the generator samples from (uniform ranges unless noted)."""

    voxel_mm: float = 1.0
    fov_xy_mm: tuple[float, float] = (130.0, 175.0)  # square in x and y, sampled per knee
    fov_z_mm: tuple[float, float] = (180.0, 250.0)
    side: str = "random"  # left | right | random
    flexion_deg: tuple[float, float] = (0.0, 30.0)
    patella_follow: tuple[float, float] = (0.55, 0.8)  # patellar rotation / knee flexion
    scale_sd: float = 0.10  # overall size: normal(1, sd), clipped to +-2.5 sd
    shape_sd: float = 0.10  # per-dimension shape factors: normal(1, sd)
    patella_sd: float | None = None  # the patella's size, thickness and height factors (None: shape_sd)
    warp_mm: tuple[float, float] = (1.0, 3.5)  # amplitude of the smooth random warp per bone
    rotation_deg: tuple[float, float, float] = (4.0, 4.0, 8.0)  # +- about x, y, z
    translation_mm: tuple[float, float, float] = (8.0, 8.0, 15.0)  # +- offsets of the knee
    girth: tuple[float, float] = (0.85, 1.2)  # soft-tissue radius factor
    fat_mm: tuple[float, float] = (3.0, 16.0)
    cortical_hu: tuple[float, float] = (1100.0, 1800.0)
    cancellous_hu: tuple[float, float] = (180.0, 420.0)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Phantom:
    ct: sitk.Image  # int16 HU, LPS, identity direction, centred on the isocentre
    labels: sitk.Image  # uint8, DESIGN.md labels, same grid
    params: dict  # the sampled parameters (side, flexion, scale, ...)


# ----------------------------------------------------------------------------- primitives
def _ellipsoid(x, y, z, c, r):
    """Approximate signed distance (mm) to an axis-aligned ellipsoid."""
    px, py, pz = (x - c[0]) / r[0], (y - c[1]) / r[1], (z - c[2]) / r[2]
    k0 = np.sqrt(px * px + py * py + pz * pz)
    k1 = np.sqrt(px * px / r[0] ** 2 + py * py / r[1] ** 2 + pz * pz / r[2] ** 2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _ellipse2d(dx, dy, rx, ry):
    px, py = dx / rx, dy / ry
    k0 = np.sqrt(px * px + py * py)
    k1 = np.sqrt(px * px / rx**2 + py * py / ry**2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _frustum(x, y, z, z0, z1, c0, c1, r0, r1):
    """Elliptic frustum between heights z0 < z1: centre and radii interpolated smoothly."""
    t = np.clip((z - z0) / (z1 - z0), 0.0, 1.0)
    t = t * t * (3 - 2 * t)
    cx = c0[0] + (c1[0] - c0[0]) * t
    cy = c0[1] + (c1[1] - c0[1]) * t
    rx = r0[0] + (r1[0] - r0[0]) * t
    ry = r0[1] + (r1[1] - r0[1]) * t
    side = _ellipse2d(x - cx, y - cy, rx, ry)
    return np.maximum(side, np.maximum(z0 - z, z - z1))


def _smooth_union(a, b, k):
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _smooth_subtract(a, b, k):
    """a minus b."""
    h = np.clip(0.5 - 0.5 * (a + b) / k, 0.0, 1.0)
    return a + (-b - a) * h + k * h * (1.0 - h)


def _rot(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


class _Warp:
    """Smooth random displacement: a few sinusoids of 50-140 mm wavelength."""

    def __init__(self, rng: np.random.Generator, amplitude: float, n: int = 4):
        self.terms = []
        for _ in range(n):
            k = rng.normal(size=3)
            k /= np.linalg.norm(k)
            k *= 2 * np.pi / rng.uniform(50, 140)
            d = rng.normal(size=3)
            d *= amplitude / np.sqrt(n) / np.linalg.norm(d)
            self.terms.append((k.astype(np.float32), d.astype(np.float32), rng.uniform(0, 2 * np.pi)))

    def __call__(self, x, y, z):
        xo, yo, zo = x.copy(), y.copy(), z.copy()
        for k, d, ph in self.terms:
            s = np.sin(k[0] * x + k[1] * y + k[2] * z + ph)
            xo += d[0] * s
            yo += d[1] * s
            zo += d[2] * s
        return xo, yo, zo


# ----------------------------------------------------------------------------- sampling
def sample_parameters(seed: int, config: PhantomConfig) -> dict:
    """Draw one knee's parameters; deterministic per seed."""
    rng = np.random.default_rng(seed)
    side = config.side if config.side in ("left", "right") else ("left" if rng.random() < 0.5 else "right")
    scale = float(np.clip(rng.normal(1.0, config.scale_sd), 1 - 2.5 * config.scale_sd, 1 + 2.5 * config.scale_sd))
    def f(sd: float = config.shape_sd) -> float:
        return float(np.clip(rng.normal(1.0, sd), 1 - 2.5 * sd, 1 + 2.5 * sd))

    pat_sd = config.shape_sd if config.patella_sd is None else config.patella_sd
    flex = float(rng.uniform(*config.flexion_deg))
    p = {
        "seed": int(seed),
        "side": side,
        "scale": scale,
        "flexion_deg": flex,
        "patella_rotation_deg": flex * float(rng.uniform(*config.patella_follow)),
        "fov_xy_mm": float(rng.uniform(*config.fov_xy_mm)),
        "fov_z_mm": float(rng.uniform(*config.fov_z_mm)),
        "rotation_deg": [float(rng.uniform(-r, r)) for r in config.rotation_deg],
        "translation_mm": [float(rng.uniform(-t, t)) for t in config.translation_mm],
        "girth": float(rng.uniform(*config.girth)),
        "fat_mm": float(rng.uniform(*config.fat_mm)),
        "cortical_hu": float(rng.uniform(*config.cortical_hu)),
        "cancellous_hu": float(rng.uniform(*config.cancellous_hu)),
        "joint_gap_mm": float(rng.uniform(3.0, 6.0)),
        "valgus_deg": float(rng.uniform(3.0, 8.0)),
        "shape": {k: f(pat_sd if k.startswith("pat_") else config.shape_sd) for k in (
            "shaft_r", "cond_w", "cond_r", "cond_sep", "epi_w", "epi_d", "notch_w", "plateau_w", "plateau_d",
            "tib_shaft_r", "tuber", "fib_r", "fib_head", "fib_pos", "fib_height", "pat_w", "pat_h", "pat_t", "pat_height",
            "metaphysis")},
        "warp_mm": [float(rng.uniform(*config.warp_mm)) for _ in range(4)],
        "warp_seed": int(rng.integers(2**31)),
        "texture_seed": int(rng.integers(2**31)),
    }
    return p


# ----------------------------------------------------------------------------- bones
def _femur(x, y, z, p, s):
    sh = p["shape"]
    g = p["joint_gap_mm"]
    rc = 22.0 * s * sh["cond_r"]  # posterior condyle radius (also the flexion radius)
    ycc = 8.0 * s
    zc = g + rc
    sep = 21.0 * s * sh["cond_sep"]
    cw = 14.0 * s * sh["cond_w"]
    tv = np.tan(np.radians(p["valgus_deg"]))
    rs = 14.5 * s * sh["shaft_r"]
    shaft_top = 400.0
    z_meta0, z_meta1 = zc + 2.0, zc + 62.0 * s * sh["metaphysis"]
    shaft_c = lambda zz: (-tv * (zz - zc), 2.0 * s)  # noqa: E731  shaft leans laterally (-x) upward
    d = _frustum(x, y, z, z_meta1, shaft_top, shaft_c(z_meta1), shaft_c(shaft_top), (rs, rs * 0.95), (rs * 0.92, rs * 0.9))
    meta = _frustum(x, y, z, z_meta0, z_meta1 + 5, (0.0, ycc - 8 * s), shaft_c(z_meta1 + 5),
                    (37 * s * sh["epi_w"], 26 * s * sh["epi_d"]), (rs, rs * 0.95))
    d = _smooth_union(d, meta, 10.0)
    epi = _ellipsoid(x, y, z, (0.0, ycc - 13 * s, zc + 4 * s), (39 * s * sh["epi_w"], 24 * s * sh["epi_d"], 23 * s))
    d = _smooth_union(d, epi, 6.0)
    med = _ellipsoid(x, y, z, (sep, ycc, zc), (cw, rc * 1.05, rc))
    lat = _ellipsoid(x, y, z, (-sep, ycc + 1.0, zc + 1.5), (cw * 0.95, rc * 1.05, rc))
    d = _smooth_union(d, _smooth_union(med, lat, 3.0), 5.0)
    notch = _ellipsoid(x, y, z, (0.0, ycc + 12 * s, g + 5 * s), (7.5 * s * sh["notch_w"], 22 * s, 15 * s))
    d = _smooth_subtract(d, notch, 3.0)
    groove = _ellipsoid(x, y, z, (0.0, ycc - 38 * s, zc + 10 * s), (8 * s, 6 * s, 22 * s))
    return _smooth_subtract(d, groove, 3.0), (ycc, zc, rc)


def _tibia(x, y, z, p, s):
    sh = p["shape"]
    ytp = 5.0 * s
    pw, pd = 40 * s * sh["plateau_w"], 27 * s * sh["plateau_d"]
    rs = 15.0 * s * sh["tib_shaft_r"]
    plateau = np.maximum(_ellipse2d(x, y - ytp, pw, pd), np.maximum(-16 * s - z, z))
    meta = _frustum(x, y, z, -95 * s * sh["metaphysis"], -12 * s, (0.0, 0.0), (0.0, ytp), (rs, rs * 0.95), (pw * 0.9, pd * 0.9))
    d = _smooth_union(plateau, meta, 6.0)
    shaft = _frustum(x, y, z, -400.0, -90 * s * sh["metaphysis"], (0.0, 0.0), (0.0, 0.0), (rs * 0.85, rs * 0.8), (rs, rs * 0.95))
    d = _smooth_union(d, shaft, 8.0)
    tub = _ellipsoid(x, y, z, (-4 * s, ytp - pd - 1.5 * s, -32 * s), (10 * s, 7 * s * sh["tuber"], 15 * s))
    d = _smooth_union(d, tub, 6.0)
    for sx in (1.0, -1.0):  # shallow medial and lateral compartments
        d = _smooth_subtract(d, _ellipsoid(x, y, z, (sx * 18 * s, ytp, 9.5 * s), (14 * s, 17 * s, 10 * s)), 2.0)
    spine = _ellipsoid(x, y, z, (0.0, ytp, -1.0), (5 * s, 10 * s, 4.5 * s))
    return _smooth_union(d, spine, 2.0), (ytp, pw, pd)


def _fibula(x, y, z, p, s, ytp, pw, pd):
    sh = p["shape"]
    hx, hy, hz = -(pw * 0.86) * sh["fib_pos"], ytp + pd * 0.62, -22 * s * sh["fib_height"]
    r = 7.5 * s * sh["fib_r"]
    head = _ellipsoid(x, y, z, (hx, hy, hz), (10.5 * s * sh["fib_head"], 10.5 * s * sh["fib_head"], 13 * s))
    shaft = _frustum(x, y, z, -400.0, hz - 5, (hx + 0.02 * 375, hy - 6 * s), (hx, hy), (r * 0.9, r * 0.85), (r, r))
    apex = _ellipsoid(x, y, z, (hx - 2 * s, hy + 3 * s, hz + 12 * s), (4.5 * s, 4.5 * s, 6 * s))
    return _smooth_union(_smooth_union(head, shaft, 5.0), apex, 3.0)


def _patella(x, y, z, p, s, ycc, zc):
    sh = p["shape"]
    t = 10.5 * s * sh["pat_t"]
    cy = ycc - 13 * s - 24 * s - 4.0 - t  # clear of the trochlea, so carving does not eat it
    cz = zc + 22 * s * sh["pat_height"]
    # adult patellae are about 10-25 ml (the radii before 0.4 gave 23-47 ml)
    d = _ellipsoid(x, y, z, (-3 * s, cy, cz), (21.0 * s * sh["pat_w"], t, 20.5 * s * sh["pat_h"]))
    ridge = _ellipsoid(x, y, z, (-3 * s, cy + t * 0.55, cz), (8 * s, 6 * s, 14 * s * sh["pat_h"]))
    return _smooth_union(d, ridge, 3.0)


LEG_MARGIN_MM = 8.0  # air kept between the skin and the CT's side faces


def generate_phantom(seed: int, config: PhantomConfig | None = None) -> Phantom:
    """One labelled knee CT phantom; identical output for identical (seed, config). The radiograph
    field is the drawn `fov_xy_mm` (`imaging_field_mm`); the CT is that field or wider where the
    leg needs it (`ct_fov_xy_mm`): a radiograph's rays always cross the whole leg, and a leg cut
    flat at the CT's edge would be an artifact no real image shows."""
    config = config or PhantomConfig()
    p = sample_parameters(seed, config)
    s = p["scale"]
    vox = float(config.voxel_mm)
    nxy = ct_side_voxels(p["fov_xy_mm"], _field_covering_leg(p), vox)
    p["ct_fov_xy_mm"] = nxy * vox
    nz = int(round(p["fov_z_mm"] / vox))
    ax_xy = ((np.arange(nxy) - (nxy - 1) / 2) * vox).astype(np.float32)
    ax_z = ((np.arange(nz) - (nz - 1) / 2) * vox).astype(np.float32)
    zw, yw, xw = np.meshgrid(ax_z, ax_xy, ax_xy, indexing="ij")  # world LPS, (k, j, i) order
    kx, ky, kz = _to_knee_frame(xw, yw, zw, p)
    del xw, yw, zw

    wrng = np.random.default_rng(p["warp_seed"])
    warps = [_Warp(wrng, a) for a in p["warp_mm"]]

    fx, fy, fz = warps[0](kx, ky, kz)
    d_fem, (ycc, zc, rc) = _femur(fx, fy, fz, p, s)
    del fx, fy, fz

    tx, ty, tz = _flexed(kx, ky, kz, ycc, zc, p["flexion_deg"])
    wx, wy, wz = warps[1](tx, ty, tz)
    d_tib, (ytp, pw, pd) = _tibia(wx, wy, wz, p, s)
    wx, wy, wz = warps[2](tx, ty, tz)
    d_fib = _fibula(wx, wy, wz, p, s, ytp, pw, pd)
    px_, py_, pz_ = _flexed(kx, ky, kz, ycc, zc, p["patella_rotation_deg"])
    wx, wy, wz = warps[3](px_, py_, pz_)
    d_pat = _patella(wx, wy, wz, p, s, ycc, zc)
    del wx, wy, wz, px_, py_, pz_

    # labels; carve thin joint spaces so that bones never touch
    labels = np.zeros(d_fem.shape, np.uint8)
    fem = d_fem < 0
    tib = (d_tib < 0) & (d_fem > 1.5)
    fib = (d_fib < 0) & (d_tib > 1.5) & ~fem
    pat = (d_pat < 0) & (d_fem > 2.0)
    labels[fem] = BY_NAME["femur"].value
    labels[tib] = BY_NAME["tibia"].value
    labels[fib] = BY_NAME["fibula"].value
    labels[pat] = BY_NAME["patella"].value
    labels = _largest_components(labels)

    d_leg = _leg(kx, ky, kz, tx, ty, tz, p, ycc, zc)
    del kx, ky, kz, tx, ty, tz

    ct = fill_ct(labels, d_leg, ax_z[:, None, None] - p["translation_mm"][2], s, p, vox)
    origin = (float(ax_xy[0]), float(ax_xy[0]), float(ax_z[0]))
    return to_phantom(ct, labels, origin, vox, p)


def _to_knee_frame(xw, yw, zw, p: dict):
    """World LPS coordinates -> the right-knee-canonical knee frame (pose, then side mirroring)."""
    R = _rot(*np.radians(p["rotation_deg"])).astype(np.float32)
    t = np.asarray(p["translation_mm"], np.float32)
    px, py, pz = xw - t[0], yw - t[1], zw - t[2]
    kx = R[0, 0] * px + R[1, 0] * py + R[2, 0] * pz
    ky = R[0, 1] * px + R[1, 1] * py + R[2, 1] * pz
    kz = R[0, 2] * px + R[1, 2] * py + R[2, 2] * pz
    return (-kx if p["side"] == "left" else kx), ky, kz


def _flexed(kx, ky, kz, ycc, zc, angle_deg):
    """Knee frame -> the frame rotated back by `angle_deg` about the condylar axis (y=ycc, z=zc)."""
    a = np.radians(angle_deg)
    c, sn = np.float32(np.cos(a)), np.float32(np.sin(a))
    yy, zz = ky - ycc, kz - zc
    return kx, c * yy + sn * zz + ycc, -sn * yy + c * zz + zc


def _leg(kx, ky, kz, tx, ty, tz, p: dict, ycc, zc):
    """Soft tissue's signed distance (mm, < 0 inside): thigh in the femur frame, calf in the tibia
    frame (t*), blended at the joint."""
    g, s = p["girth"], p["scale"]
    pat_front = float(ycc - 37 * s - 4.0 - 21.0 * s * p["shape"]["pat_t"])
    ant = pat_front - 8.0 * g

    def leg(xx, yy, rx, ry_post):
        cy = (ant + ry_post) / 2
        return _ellipse2d(xx, yy - cy, rx, (ry_post - ant) / 2)
    thigh = np.maximum(leg(kx, ky, 60 * g, 62 * g), zc - 40.0 - kz)  # overlap: no seam
    calf_post = 66 * g + 10 * g * np.exp(-(((tz + 90) / 60.0) ** 2))
    calf = np.maximum(leg(tx, ty, 55 * g, calf_post), tz - zc - 10.0)
    return _smooth_union(thigh, calf, 15.0)


def _field_covering_leg(p: dict, step_mm: float = 2.0, half_max_mm: float = 200.0) -> float:
    """The smallest square field (mm, centred on the isocentre) that holds the whole leg of the
    knee `p` over its CT height with LEG_MARGIN_MM of air on each side, from the leg evaluated on
    a coarse grid (the femur's condylar constants from a one-point evaluation)."""
    _, (ycc, zc, _) = _femur(*(np.zeros(1, np.float32),) * 3, p, p["scale"])
    az = np.arange(-p["fov_z_mm"] / 2, p["fov_z_mm"] / 2 + step_mm / 2, step_mm, dtype=np.float32)
    while True:  # widen the coarse grid until the leg no longer reaches its border
        ax = np.arange(-half_max_mm, half_max_mm + step_mm / 2, step_mm, dtype=np.float32)
        zw, yw, xw = np.meshgrid(az, ax, ax, indexing="ij")
        kx, ky, kz = _to_knee_frame(xw, yw, zw, p)
        tx, ty, tz = _flexed(kx, ky, kz, ycc, zc, p["flexion_deg"])
        inside = (_leg(kx, ky, kz, tx, ty, tz, p, ycc, zc) < 0).any(axis=0)  # [y, x]
        if not (inside[0].any() or inside[-1].any() or inside[:, 0].any() or inside[:, -1].any()):
            break
        half_max_mm *= 1.5
    ys, xs = np.nonzero(inside)
    reach = max(np.abs(ax[ys]).max(), np.abs(ax[xs]).max()) + step_mm
    return float(2 * (reach + LEG_MARGIN_MM))


def ct_side_voxels(field_mm: float, leg_mm: float, vox: float) -> int:
    """Voxels along the CT's square side: the radiograph field, widened to hold the leg by the
    same number of voxels on each side, so the field's pixels stay on voxel centres."""
    n = int(round(field_mm / vox))
    extra = max(0, int(np.ceil((leg_mm / vox - n) / 2)))
    return n + 2 * extra


def imaging_field_mm(phantom: Phantom) -> tuple[float, float, float]:
    """(x, y, z) extent in mm of the radiograph field the phantom was drawn with, centred on the
    isocentre; the CT may be wider (it holds the whole leg). Older phantoms: the CT's extent."""
    p, sp = phantom.params, phantom.ct.GetSpacing()
    n = phantom.ct.GetSize()
    ext = [n[a] * sp[a] for a in range(3)]
    if "fov_xy_mm" in p and "fov_z_mm" in p:
        nxy, nz = int(round(p["fov_xy_mm"] / sp[0])), int(round(p["fov_z_mm"] / sp[2]))
        ext = [min(ext[0], nxy * sp[0]), min(ext[1], nxy * sp[1]), min(ext[2], nz * sp[2])]
    return tuple(float(e) for e in ext)


def to_phantom(ct: np.ndarray, labels: np.ndarray, origin, vox: float, params: dict) -> Phantom:
    """Arrays (k, j, i) on an axis-aligned grid -> a Phantom with int16 HU and uint8 labels."""
    ct_img = sitk.GetImageFromArray(np.clip(np.rint(ct), -1024, 3071).astype(np.int16))
    lab_img = sitk.GetImageFromArray(labels)
    for im in (ct_img, lab_img):
        im.SetSpacing((vox, vox, vox))
        im.SetOrigin(tuple(float(o) for o in origin))
    return Phantom(ct=ct_img, labels=lab_img, params=params)


def fill_ct(labels: np.ndarray, d_leg: np.ndarray, z_from_joint: np.ndarray, scale: float, p: dict,
            vox: float) -> np.ndarray:
    """HU volume for a knee: air outside the leg (`d_leg` >= 0, mm), skin, fat and textured muscle
    inside; bone (labels > 0) as a cortical shell from a real distance map, thick along the shafts
    and thin at the ends (`z_from_joint`, mm, broadcastable to the grid), over cancellous bone with
    texture that fades toward the marrow of the shafts. Uses p's girth-independent tissue draws
    (fat_mm, cortical_hu, cancellous_hu, texture_seed)."""
    trng = np.random.default_rng(p["texture_seed"])
    ct = np.full(labels.shape, -1000.0, np.float32)
    inside = d_leg < 0
    ct[inside] = 45.0 + 12.0 * _smooth_noise(trng, labels.shape, 6)[inside]
    ct[(d_leg < 0) & (d_leg > -(1.5 + p["fat_mm"]))] = -95.0
    ct[(d_leg < 0) & (d_leg > -1.5)] = 25.0

    bone = labels > 0
    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        sitk.GetImageFromArray(bone.astype(np.uint8)), insideIsPositive=True, squaredDistance=False,
        useImageSpacing=False)) * vox
    shaft_w = np.clip((np.abs(z_from_joint) - 45.0 * scale) / 50.0, 0.0, 1.0)  # 0 near the joint, 1 in the diaphysis
    cortex_mm = 1.5 + 3.5 * shaft_w
    interior = p["cancellous_hu"] * (1.0 - 0.85 * shaft_w) + 60.0 * _smooth_noise(trng, labels.shape, 3)
    cortical = p["cortical_hu"] * (0.85 + 0.15 * shaft_w)
    bone_hu = np.where(dist <= cortex_mm, cortical, interior)
    ct[bone] = np.broadcast_to(bone_hu, ct.shape)[bone]
    return ct


def _smooth_noise(rng: np.random.Generator, shape, cell: int) -> np.ndarray:
    """Unit-variance-ish noise, smooth over about `cell` voxels (coarse grid, linear zoom)."""
    from scipy.ndimage import zoom

    coarse = rng.normal(size=tuple(max(2, n // cell + 2) for n in shape)).astype(np.float32)
    fine = zoom(coarse, [(n + cell) / (c - 1) for n, c in zip(shape, coarse.shape)], order=1)
    return fine[: shape[0], : shape[1], : shape[2]]


def _largest_components(labels: np.ndarray) -> np.ndarray:
    """Keep each bone's largest connected component (carving can leave specks)."""
    out = np.zeros_like(labels)
    for v in np.unique(labels):
        if v == 0:
            continue
        cc = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray((labels == v).astype(np.uint8))))
        out[sitk.GetArrayViewFromImage(cc) == 1] = v
    return out


def write_phantom(phantom: Phantom, folder, stem: str) -> tuple[str, str]:
    """Write `<stem>_ct.nii.gz` and `<stem>_labels.nii.gz`; returns their paths."""
    import os

    from ..io.fileio import atomic_write_image

    os.makedirs(folder, exist_ok=True)
    ct_path = os.path.join(folder, f"{stem}_ct.nii.gz")
    lab_path = os.path.join(folder, f"{stem}_labels.nii.gz")
    atomic_write_image(phantom.ct, ct_path)
    atomic_write_image(phantom.labels, lab_path)
    return ct_path, lab_path
