"""Radiograph realism: turn DRR line integrals into images that look like (and fail like) real
knee radiographs, and build positioned AP/lateral pairs with their 3D truth from a labelled CT.

The DRRs of `drr.render_drr` are line integrals L of the linear attenuation at the reference
energy of `drr.hu_to_mu` (about 60 keV): clean, monochromatic, linear in path length. A real
radiograph differs in ways a reconstruction must survive, simulated here in the order the
physics happens (see docs/realism.md):

1. beam shaping: the collimator removes the primary beam outside a rectangle, a lead side
   marker ("L"/"R" on a plastic block) blocks it in a corner;
2. polychromatic transmission with beam hardening: a filtered Kramers spectrum in energy bins,
   attenuation scaled per bin as mu(E) = mu_ref * (E_ref / E) ** p, so the log signal grows
   sub-linearly with path length (low energies are used up first);
3. scatter: a wide low-pass of the scatter source P * L (scatter needs matter to scatter in and
   primary photons to do it), scaled to a drawn scatter-to-primary ratio behind the knee;
4. heel effect: incident intensity varies linearly along the anode-cathode axis (vertical);
5. quantum noise: Poisson photon counts;
6. detector blur (Gaussian PSF) and electronic noise (Gaussian, in photon units);
7. display: log, unsharp masking (as DX systems process images), a percentile window inside
   the collimated field, a gamma or film-like sigmoid curve, quantisation to uint16 with bone
   bright (collimated areas and the marker come out white, as on real radiographs).

All randomness comes from the caller's `numpy.random.Generator`; every drawn value is returned
so a case can be reproduced and described (meta.json). There is no global state.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..core.errors import KneeReconError
from ..core.geometry import SIDES, ViewGeometry
from ..core.labels import BONES
from ..io.fileio import atomic_path
from .drr import DRRConfig, render_drr

E_REF_KEV = 60.0  # energy at which drr.hu_to_mu's attenuation (and so the DRR) holds

# aluminium mass attenuation (cm^2/g, NIST XCOM, coherent scattering included): tube filtration
_AL_MU_RHO = np.array([[10.0, 26.23], [15.0, 7.955], [20.0, 3.441], [30.0, 1.128], [40.0, 0.5685], [50.0, 0.3681],
                       [60.0, 0.2778], [80.0, 0.2018], [100.0, 0.1704], [150.0, 0.1378]])
_AL_DENSITY = 2.699  # g/cm^3


@dataclass
class RealismConfig:
    """What `simulate_radiograph` and `simulate_pair` draw from. (lo, hi) tuples are uniform
    ranges (make lo == hi to fix a value); *_p are probabilities. Defaults aim at a typical
    digital knee radiograph without an anti-scatter grid."""

    kvp: tuple[float, float] = (55.0, 75.0)  # tube voltage, kV (knee: 55-75); allowed 30-150
    filtration_mm_al: tuple[float, float] = (2.5, 4.0)  # total filtration, mm Al
    beam_hardening: tuple[float, float] = (0.4, 1.0)  # exponent p in mu(E) = mu_ref (60 keV/E)^p; 0 = no hardening
    spr: tuple[float, float] = (0.2, 0.8)  # scatter-to-primary ratio behind the knee (median); 0 = no scatter
    scatter_sigma_mm: tuple[float, float] = (15.0, 40.0)  # width (sd) of the scatter kernel
    photons_per_pixel: tuple[float, float] = (3000.0, 30000.0)  # unattenuated beam per pixel: quantum noise
    electronic_noise: tuple[float, float] = (0.0, 4.0)  # sd of the additive detector noise, photons
    blur_sd_mm: tuple[float, float] = (0.1, 0.35)  # detector PSF sd
    heel: float = 0.15  # up to +-15 % intensity change from the image centre to the top/bottom edge
    collimation_p: float = 0.6  # probability that the field is collimated inside the image
    collimation_margin_mm: tuple[float, float] = (3.0, 25.0)  # per edge, when collimated
    marker_p: float = 0.7  # probability of a lead "L"/"R" side marker in a corner
    marker_height_mm: tuple[float, float] = (10.0, 16.0)
    unsharp_amount: tuple[float, float] = (0.0, 0.8)  # DX edge enhancement: l + a (l - blur(l))
    unsharp_sigma_mm: tuple[float, float] = (3.0, 10.0)
    window_low_pct: tuple[float, float] = (0.0, 2.0)  # display window: percentiles of the log signal in the field
    window_high_pct: tuple[float, float] = (98.5, 100.0)
    sigmoid_p: float = 0.5  # film-like sigmoid curve, else a gamma curve
    gamma: tuple[float, float] = (0.8, 2.5)  # > 1 darkens soft tissue against bone
    sigmoid_gain: tuple[float, float] = (4.0, 8.0)
    sigmoid_centre: tuple[float, float] = (0.5, 0.8)
    bits_stored: tuple[int, ...] = (12, 14, 16)  # drawn uniformly: the output range is 0 .. 2^bits - 1
    monochrome1_p: float = 0.3  # probability that a DICOM file stores the image as MONOCHROME1
    rotation_deg: tuple[float, float, float] = (3.0, 3.0, 5.0)  # +- knee rotation about x, y, z before projection
    height_offset_mm: float = 8.0  # +- vertical offset of the lateral view against the AP

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Raise KneeReconError naming the first unusable field."""
        def rng_(name, lo_min=None, hi_max=None, strict=False):
            v = getattr(self, name)
            try:
                lo, hi = (float(a) for a in v)
            except (TypeError, ValueError):
                raise KneeReconError(f"RealismConfig.{name} must be a (low, high) pair, got {v!r}")
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
                raise KneeReconError(f"RealismConfig.{name} must be a finite range with low <= high, got {v!r}")
            if lo_min is not None and (lo <= lo_min if strict else lo < lo_min):
                raise KneeReconError(f"RealismConfig.{name} must be {'>' if strict else '>='} {lo_min}, got {v!r}")
            if hi_max is not None and hi > hi_max:
                raise KneeReconError(f"RealismConfig.{name} must be <= {hi_max}, got {v!r}")

        rng_("kvp", 30.0, 150.0)
        rng_("filtration_mm_al", 0.0, 20.0)
        rng_("beam_hardening", 0.0, 3.0)
        rng_("spr", 0.0, 10.0)
        rng_("scatter_sigma_mm", 0.0, strict=True)
        rng_("photons_per_pixel", 0.0, strict=True)
        rng_("electronic_noise", 0.0)
        rng_("blur_sd_mm", 0.0, 10.0)
        rng_("collimation_margin_mm", 0.0)
        rng_("marker_height_mm", 0.0, strict=True)
        rng_("unsharp_amount", 0.0, 5.0)
        rng_("unsharp_sigma_mm", 0.0, strict=True)
        rng_("window_low_pct", 0.0, 100.0)
        rng_("window_high_pct", 0.0, 100.0)
        rng_("gamma", 0.0, strict=True)
        rng_("sigmoid_gain", 0.0, strict=True)
        rng_("sigmoid_centre", 0.0, 1.0)
        if self.window_low_pct[1] >= self.window_high_pct[0]:
            raise KneeReconError(f"RealismConfig: window_low_pct {self.window_low_pct} must lie below window_high_pct "
                                 f"{self.window_high_pct}")
        for name in ("collimation_p", "marker_p", "sigmoid_p", "monochrome1_p"):
            v = getattr(self, name)
            if not 0.0 <= float(v) <= 1.0:
                raise KneeReconError(f"RealismConfig.{name} is a probability: it must lie in [0, 1], got {v!r}")
        if not 0.0 <= float(self.heel) < 1.0:
            raise KneeReconError(f"RealismConfig.heel must lie in [0, 1), got {self.heel!r}")
        if not self.bits_stored or any(int(b) != b or not 8 <= b <= 16 for b in self.bits_stored):
            raise KneeReconError(f"RealismConfig.bits_stored must list integers in 8..16, got {self.bits_stored!r}")
        rot = tuple(self.rotation_deg)
        if len(rot) != 3 or any(not (0.0 <= float(r) <= 45.0) for r in rot):
            raise KneeReconError(f"RealismConfig.rotation_deg must be three angles in [0, 45] degrees, got {rot!r}")
        if not 0.0 <= float(self.height_offset_mm) <= 50.0:
            raise KneeReconError(f"RealismConfig.height_offset_mm must lie in [0, 50] mm, got {self.height_offset_mm!r}")


# ----------------------------------------------------------------------------- physics
def xray_spectrum(kvp: float, filtration_mm_al: float, n_bins: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Energy bins (keV) and their weights (sum 1) in the detected signal: Kramers' photon
    spectrum (kVp - E)/E from 15 keV to kVp, filtered by aluminium, weighted by E because the
    detector integrates energy."""
    edges = np.linspace(15.0, float(kvp), n_bins + 1)
    e = 0.5 * (edges[1:] + edges[:-1])
    mu_al = np.exp(np.interp(np.log(e), np.log(_AL_MU_RHO[:, 0]), np.log(_AL_MU_RHO[:, 1]))) * _AL_DENSITY / 10.0
    w = (kvp - e) / e * np.exp(-mu_al * filtration_mm_al) * e
    return e, w / w.sum()


def polychromatic_transmission(line_integrals: np.ndarray, energies: np.ndarray, weights: np.ndarray,
                               hardening: float) -> np.ndarray:
    """Detected fraction of the open beam behind line integrals L (at E_REF_KEV):
    sum_k w_k exp(-L (E_REF/E_k)^p). p = 0 gives exp(-L) exactly (monochromatic)."""
    L = np.asarray(line_integrals, np.float32)
    t = np.zeros_like(L)
    for e, w in zip(energies, weights):
        t += np.float32(w) * np.exp(-L * np.float32((E_REF_KEV / e) ** hardening))
    return t


# 5 x 7 glyphs of the lead side markers
_GLYPHS = {
    "L": ["X....", "X....", "X....", "X....", "X....", "X....", "XXXXX"],
    "R": ["XXXX.", "X...X", "X...X", "XXXX.", "X.X..", "X..X.", "X...X"],
}


def _glyph(letter: str, height_px: int, width_px: int) -> np.ndarray:
    g = np.array([[c == "X" for c in row] for row in _GLYPHS[letter]], np.float32)
    return ndimage.zoom(g, (height_px / g.shape[0], width_px / g.shape[1]), order=0) > 0.5


def _u(rng: np.random.Generator, r) -> float:
    return float(rng.uniform(float(r[0]), float(r[1])))


def _draw(rng: np.random.Generator, config: RealismConfig, side: str | None) -> dict:
    """All parameters of one radiograph, drawn in a fixed order (the stream never depends on
    which options end up used, so one changed probability does not reshuffle everything)."""
    p = {
        "kvp": _u(rng, config.kvp),
        "filtration_mm_al": _u(rng, config.filtration_mm_al),
        "beam_hardening": _u(rng, config.beam_hardening),
        "spr": _u(rng, config.spr),
        "scatter_sigma_mm": _u(rng, config.scatter_sigma_mm),
        "photons_per_pixel": _u(rng, config.photons_per_pixel),
        "electronic_noise": _u(rng, config.electronic_noise),
        "blur_sd_mm": _u(rng, config.blur_sd_mm),
        "heel": float(rng.uniform(-config.heel, config.heel)),  # sign: which end the anode is
    }
    collimated = bool(rng.random() < config.collimation_p)
    margins = [_u(rng, config.collimation_margin_mm) for _ in range(4)]
    p["collimation"] = {"applied": collimated, "margins_mm_top_bottom_left_right": margins if collimated else [0.0] * 4}
    has_marker = bool(rng.random() < config.marker_p)
    coin = bool(rng.random() < 0.5)  # drawn even when the side is known: same stream either way
    letter = {"left": "L", "right": "R"}.get(side or "", "L" if coin else "R")
    corner = ("top-left", "top-right", "bottom-left", "bottom-right")[int(rng.integers(4))]
    p["marker"] = {"applied": has_marker, "letter": letter, "corner": corner,
                   "height_mm": _u(rng, config.marker_height_mm), "inset_mm": float(rng.uniform(3.0, 10.0))}
    p["unsharp_amount"] = _u(rng, config.unsharp_amount)
    p["unsharp_sigma_mm"] = _u(rng, config.unsharp_sigma_mm)
    p["window_pct"] = [_u(rng, config.window_low_pct), _u(rng, config.window_high_pct)]
    sigmoid = bool(rng.random() < config.sigmoid_p)
    gamma, gain, centre = _u(rng, config.gamma), _u(rng, config.sigmoid_gain), _u(rng, config.sigmoid_centre)
    p["curve"] = {"kind": "sigmoid", "gain": gain, "centre": centre} if sigmoid else {"kind": "gamma", "gamma": gamma}
    p["bits_stored"] = int(config.bits_stored[int(rng.integers(len(config.bits_stored)))])
    p["monochrome1"] = bool(rng.random() < config.monochrome1_p)
    return p


def _field_and_marker(shape, spacing, p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Collimated field (bool), lead letter (bool) and plastic block (bool) on the pixel grid."""
    h, w = shape
    sc, sr = spacing
    field = np.zeros(shape, bool)
    top, bottom, left, right = p["collimation"]["margins_mm_top_bottom_left_right"]
    r0, r1 = int(round(top / sr)), h - int(round(bottom / sr))
    c0, c1 = int(round(left / sc)), w - int(round(right / sc))
    if r1 - r0 < h // 2 or c1 - c0 < w // 2:  # never collimate away most of the knee
        r0, r1, c0, c1 = 0, h, 0, w
        p["collimation"] = {"applied": False, "margins_mm_top_bottom_left_right": [0.0] * 4}
    field[r0:r1, c0:c1] = True
    letter = np.zeros(shape, bool)
    block = np.zeros(shape, bool)
    m = p["marker"]
    if m["applied"]:
        gh = max(7, int(round(m["height_mm"] / sr)))
        gw = max(5, int(round(m["height_mm"] * 5 / 7 / sc)))
        pad_r, pad_c = max(1, int(round(2.0 / sr))), max(1, int(round(2.0 / sc)))  # 2 mm of plastic around the letter
        bh, bw = gh + 2 * pad_r, gw + 2 * pad_c
        ir, ic = int(round(m["inset_mm"] / sr)), int(round(m["inset_mm"] / sc))
        br = r0 + ir if m["corner"].startswith("top") else r1 - ir - bh
        bc = c0 + ic if m["corner"].endswith("left") else c1 - ic - bw
        if br >= 0 and bc >= 0 and br + bh <= h and bc + bw <= w:
            block[br:br + bh, bc:bc + bw] = True
            letter[br + pad_r:br + pad_r + gh, bc + pad_c:bc + pad_c + gw] = _glyph(m["letter"], gh, gw)
        else:
            m["applied"] = False  # image too small for the marker
    return field, letter, block


def detector_signal(line_integrals: np.ndarray, pixel_spacing_mm: tuple[float, float], rng: np.random.Generator,
                    params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-6 of the module docstring with the drawn `params`: the detected signal as a
    fraction of the open beam at the image centre (float32), and the collimated field (bool)."""
    L = np.asarray(line_integrals, np.float32)
    sc, sr = (float(s) for s in pixel_spacing_mm)
    field, letter, block = _field_and_marker(L.shape, (sc, sr), params)
    L = L + np.float32(0.3) * block  # ~13 mm of acrylic holding the letter
    energies, weights = xray_spectrum(params["kvp"], params["filtration_mm_al"])
    primary = polychromatic_transmission(L, energies, weights, params["beam_hardening"])
    primary *= field
    primary[letter] *= np.float32(0.002)  # ~1 mm of lead
    # scatter: generated where primary photons meet matter, spread over tens of mm
    scatter = np.zeros_like(primary)
    if params["spr"] > 0:
        sig = (params["scatter_sigma_mm"] / sr, params["scatter_sigma_mm"] / sc)
        src = ndimage.gaussian_filter(primary * L, sig, mode="nearest")
        behind = field & (L > 1.0) & ~letter
        if not behind.any():
            behind = field & ~letter
        ratio = src[behind] / np.maximum(primary[behind], 1e-6)
        level = float(np.median(ratio)) if ratio.size else 0.0
        if level > 0:
            scatter = src * np.float32(params["spr"] / level)
    h = L.shape[0]
    heel = 1.0 + params["heel"] * (2.0 * np.arange(h, dtype=np.float32) / max(h - 1, 1) - 1.0)
    n0 = params["photons_per_pixel"]
    expected = (primary + scatter) * heel[:, None].astype(np.float32) * np.float32(n0)
    counts = rng.poisson(expected).astype(np.float32)
    if params["blur_sd_mm"] > 0:
        counts = ndimage.gaussian_filter(counts, (params["blur_sd_mm"] / sr, params["blur_sd_mm"] / sc), mode="nearest")
    if params["electronic_noise"] > 0:
        counts += rng.normal(0.0, params["electronic_noise"], counts.shape).astype(np.float32)
    return counts / np.float32(n0), field & ~letter & ~block


def display_image(signal: np.ndarray, field: np.ndarray, pixel_spacing_mm: tuple[float, float],
                  params: dict) -> np.ndarray:
    """Step 7: log, unsharp masking, window (percentiles inside `field`), curve, uint16; bone bright."""
    sc, sr = (float(s) for s in pixel_spacing_mm)
    floor = 0.5 / params["photons_per_pixel"]  # half a photon: keeps the log finite where nothing arrives
    logs = -np.log(np.maximum(signal, np.float32(floor)))
    a = params["unsharp_amount"]
    if a > 0:
        s = params["unsharp_sigma_mm"]
        logs = logs + np.float32(a) * (logs - ndimage.gaussian_filter(logs, (s / sr, s / sc), mode="nearest"))
    vals = logs[field] if field.any() else logs.ravel()
    lo, hi = (float(v) for v in np.percentile(vals, params["window_pct"]))
    if hi - lo < 1e-6:
        hi = lo + 1.0
    params["window_log"] = [lo, hi]
    x = np.clip((logs - lo) / (hi - lo), 0.0, 1.0)
    c = params["curve"]
    if c["kind"] == "gamma":
        x = x ** c["gamma"]
    else:
        f = lambda t: 1.0 / (1.0 + np.exp(-c["gain"] * (t - c["centre"])))  # noqa: E731
        x = (f(x) - f(0.0)) / (f(1.0) - f(0.0))
    top = 2 ** params["bits_stored"] - 1
    return np.clip(np.rint(x * top), 0, top).astype(np.uint16)


def simulate_radiograph(line_integrals: np.ndarray, pixel_spacing_mm: tuple[float, float], rng: np.random.Generator,
                        config: RealismConfig | None = None, side: str | None = None) -> tuple[np.ndarray, dict]:
    """A radiograph-like uint16 image (bone bright) from DRR line integrals [row, col] with
    (column, row) spacing in mm, and the parameters drawn (JSON-serialisable). `side` picks the
    marker letter ("left" -> "L"); None draws one."""
    config = config or RealismConfig()
    config.validate()
    L = np.asarray(line_integrals)
    if L.ndim != 2 or min(L.shape) < 2:
        raise KneeReconError(f"line integrals must be a 2D image, got shape {L.shape}")
    if not np.isfinite(L).all() or float(L.min()) < -1e-3:
        raise KneeReconError("line integrals must be finite and non-negative")
    sp = tuple(float(s) for s in np.broadcast_to(np.asarray(pixel_spacing_mm, float), (2,)))
    if min(sp) <= 0:
        raise KneeReconError(f"pixel spacing must be positive, got {pixel_spacing_mm!r}")
    params = _draw(rng, config, side)
    signal, field = detector_signal(np.maximum(L, 0.0), sp, rng, params)
    img = display_image(signal, field, sp, params)
    return img, params


# ----------------------------------------------------------------------------- positioned pairs
def rotation_matrix(rotation_deg) -> np.ndarray:
    """R = Rz @ Ry @ Rx for angles (about x, about y, about z) in degrees, right-handed in LPS."""
    ax, ay, az = np.radians(np.asarray(rotation_deg, float))
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def rotate_about_isocentre(image: sitk.Image, rotation_deg, label: bool = False) -> sitk.Image:
    """The image's content rotated by `rotation_matrix(rotation_deg)` about the world origin, on
    the same grid. Outside the input the nearest value continues (the leg goes on above and
    below the CT; air stays air), so rotation leaves no empty wedges at the top and bottom."""
    tx = sitk.AffineTransform(3)
    tx.SetCenter((0.0, 0.0, 0.0))
    # Resample maps output points to input points: the inverse (transpose) of the content's rotation
    tx.SetMatrix(rotation_matrix(rotation_deg).T.ravel().tolist())
    if label:
        return sitk.Resample(image, image, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8, True)
    return sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), image, tx, sitk.sitkLinear, -1000.0, sitk.sitkFloat32, True)


def shift_content_up(image: np.ndarray, offset_mm: float, row_spacing_mm: float) -> np.ndarray:
    """The image's content moved toward superior (up, lower row index) by `offset_mm`; rows that
    come in from the edge continue the edge row (the leg goes on)."""
    return ndimage.shift(np.asarray(image, np.float32), (-offset_mm / row_spacing_mm, 0.0), order=1, mode="nearest")


def bone_masks(labels: sitk.Image, view: ViewGeometry, height_offset_mm: float = 0.0) -> dict[str, np.ndarray]:
    """Projected silhouette (bool [H, W]) of each bone on a parallel-beam `view`'s pixels, with
    the DRR's own mapping (`drr._parallel_on_detector`: the projection on the label grid,
    sampled bilinearly at the pixel centres, >= 0.5). With `height_offset_mm` the silhouettes
    move up by that much, as `simulate_pair` moves the lateral image. Bones may overlap."""
    if view.cone:
        raise KneeReconError("bone_masks handles the parallel beam only")
    if not np.allclose(np.array(labels.GetDirection()).reshape(3, 3), np.eye(3), atol=1e-6):
        raise KneeReconError("bone_masks needs an axis-aligned LPS label map")
    arr = sitk.GetArrayFromImage(labels)  # (z, y, x)
    sp, o = labels.GetSpacing(), labels.GetOrigin()
    a = 0 if view.view == "ap" else 1
    u, v = view.pixel_to_detector(np.arange(view.width), np.arange(view.height))
    # pixel (c, r) shows the content at height v - offset: the image was moved up by the offset
    kk, ii = np.meshgrid((v - height_offset_mm - o[2]) / sp[2], (u - o[a]) / sp[a], indexing="ij")
    out = {}
    for b in BONES:
        proj = (arr == b.value).any(axis=1 if a == 0 else 2).astype(np.float32)  # AP: along y; lateral: along x
        out[b.name] = ndimage.map_coordinates(proj, [kk, ii], order=1, mode="constant", cval=0.0) >= 0.5
    return out


def simulate_pair(ct: sitk.Image, labels: sitk.Image, side: str, rng: np.random.Generator,
                  config: RealismConfig | None = None, pixel_spacing_mm: float = 0.5, *,
                  rotation_deg: tuple[float, float, float] | None = None, height_offset_mm: float | None = None,
                  masks: bool = True, field_mm: tuple[float, float, float] | None = None) -> dict:
    """A positioned, simulated AP/lateral pair of a labelled knee-frame CT (HU, identity
    direction, isocentre at the origin), parallel beam per DESIGN.md; the images cover `field_mm`
    (x, y, z about the isocentre; x and y equal, a phantom's `imaging_field_mm`) or the CT.

    The knee (CT and labels) is rotated about the isocentre by `rotation_deg` (drawn from
    config.rotation_deg unless given) before projection; the lateral image's content is then
    moved up (toward superior) by `height_offset_mm` (drawn within +-config.height_offset_mm
    unless given). The AP is not moved, so the returned "labels" (rotated, not shifted) are the
    3D truth in the AP's frame: what a reconstruction that corrects the offset must find.

    Returns {"ap", "lateral": uint16 [H, W] bone bright; "ap_geometry", "lateral_geometry":
    ViewGeometry; "labels": sitk.Image; "rotation_deg": [x, y, z]; "height_offset_mm";
    "params": {"ap": {...}, "lateral": {...}} drawn; "masks": {"ap"/"lateral": {bone: bool
    [H, W]}} when `masks`}."""
    config = config or RealismConfig()
    config.validate()
    if side not in SIDES:
        raise KneeReconError(f"side must be 'left' or 'right', got {side!r}")
    if not pixel_spacing_mm or pixel_spacing_mm <= 0:
        raise KneeReconError(f"pixel spacing must be positive, got {pixel_spacing_mm!r}")
    if ct.GetDimension() != 3 or labels.GetDimension() != 3 or ct.GetSize() != labels.GetSize() \
            or not np.allclose(ct.GetSpacing(), labels.GetSpacing()) or not np.allclose(ct.GetOrigin(), labels.GetOrigin()):
        raise KneeReconError("the CT and its label map must be 3D images on one grid")
    if not np.allclose(np.array(ct.GetDirection()).reshape(3, 3), np.eye(3), atol=1e-6):
        raise KneeReconError("simulate_pair needs an axis-aligned LPS CT: call frame.to_knee_frame first")
    rot = [float(rng.uniform(-r, r)) for r in config.rotation_deg]
    dz = float(rng.uniform(-config.height_offset_mm, config.height_offset_mm))
    rot = [float(r) for r in rotation_deg] if rotation_deg is not None else rot
    dz = float(height_offset_mm) if height_offset_mm is not None else dz
    if any(rot):
        ct_r, lab_r = rotate_about_isocentre(ct, rot), rotate_about_isocentre(labels, rot, label=True)
    else:
        ct_r, lab_r = ct, sitk.Cast(labels, sitk.sitkUInt8)
    size = None if field_mm is None else (int(round(field_mm[0] / pixel_spacing_mm)),
                                          int(round(field_mm[2] / pixel_spacing_mm)))
    views = render_drr(ct_r, DRRConfig(pixel_spacing=float(pixel_spacing_mm), size=size, side=side))
    (l_ap, g_ap), (l_lat, g_lat) = views["ap"], views["lateral"]
    if dz:
        l_lat = shift_content_up(l_lat, dz, g_lat.iso_spacing[1])
    ap, p_ap = simulate_radiograph(l_ap, g_ap.spacing, rng, config, side)
    lat, p_lat = simulate_radiograph(l_lat, g_lat.spacing, rng, config, side)
    out = {"ap": ap, "lateral": lat, "ap_geometry": g_ap, "lateral_geometry": g_lat, "labels": lab_r,
           "rotation_deg": rot, "height_offset_mm": dz, "params": {"ap": p_ap, "lateral": p_lat}}
    if masks:
        out["masks"] = {"ap": bone_masks(lab_r, g_ap), "lateral": bone_masks(lab_r, g_lat, dz)}
    return out


# ----------------------------------------------------------------------------- files
def write_dicom_xray(pixels_uint16: np.ndarray, geometry: ViewGeometry, path: str, monochrome1: bool = False) -> None:
    """A 2D DX DICOM file (atomically): Imager Pixel Spacing from `geometry` (row\\column),
    SID/SOD for a cone beam, MONOCHROME2, or MONOCHROME1 with inverted stored values (so that a
    reader that honours the tag, like `xray_io.read_xray`, sees bone bright). Patient fields
    name a phantom; nothing identifies a person."""
    px = np.asarray(pixels_uint16)
    if px.ndim != 2 or px.dtype != np.uint16:
        raise KneeReconError(f"write_dicom_xray needs a 2D uint16 image, got {px.dtype} {px.shape}")
    if px.shape != (geometry.height, geometry.width):
        raise KneeReconError(f"image shape {px.shape} does not match the geometry ({geometry.height}, {geometry.width})")
    stored = (int(px.max()) + int(px.min()) - px.astype(np.int64)).astype(np.uint16) if monochrome1 else px
    img = sitk.GetImageFromArray(stored)
    sc, sr = geometry.spacing
    img.SetSpacing((float(sc), float(sr)))
    tags = {
        "0008|0060": "DX",  # Modality
        "0008|0070": "KneeRecon realism simulator",  # Manufacturer
        "0008|103e": f"simulated knee {geometry.view}",  # Series Description
        "0010|0010": "PHANTOM",  # Patient's Name: a phantom, no person
        "0010|0020": "PHANTOM",  # Patient ID
        "0018|0015": "KNEE",  # Body Part Examined
        "0018|1164": f"{sr:.6g}\\{sc:.6g}",  # Imager Pixel Spacing: row, column
        "0020|0060": "L" if geometry.side == "left" else "R",  # Laterality
    }
    if geometry.view == "ap":
        tags["0018|5101"] = "AP"  # View Position
    if geometry.cone:
        tags["0018|1110"] = f"{geometry.sid:.6g}"
        tags["0018|1111"] = f"{geometry.sod:.6g}"
    for k, v in tags.items():
        img.SetMetaData(k, v)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, tmp)
        if monochrome1:  # GDCM always writes MONOCHROME2: flip the tag (same length, so offsets hold)
            with open(tmp, "rb") as f:
                raw = f.read()
            if raw.count(b"MONOCHROME2 ") != 1:
                raise RuntimeError("unexpected DICOM header from GDCM: cannot set MONOCHROME1")
            with open(tmp, "wb") as f:
                f.write(raw.replace(b"MONOCHROME2 ", b"MONOCHROME1 "))
                f.flush()
                os.fsync(f.fileno())


def write_nrrd_xray(pixels_uint16: np.ndarray, geometry: ViewGeometry, path: str) -> None:
    """The uint16 image as it is (no rescaling, unlike `xray_io.write_xray`), spacing set, image
    centre on the isocentre; atomically."""
    from ..io.fileio import atomic_write_image

    img = sitk.GetImageFromArray(np.asarray(pixels_uint16))
    sc, sr = geometry.spacing
    img.SetSpacing((float(sc), float(sr)))
    img.SetOrigin((-(geometry.width - 1) / 2 * sc, -(geometry.height - 1) / 2 * sr))
    atomic_write_image(img, path, compress=True)
