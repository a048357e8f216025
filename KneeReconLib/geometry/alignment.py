"""Height offset between the AP and the lateral view (patient or detector moved between the two
exposures), estimated from the images themselves.

Why it works: for a parallel beam, summing an AP image's line integrals along a row gives the
total attenuation of the axial slab at that height, and so does summing the lateral image's
row: both rows integrate the same slab. The two row profiles are therefore the same function
of height, and a vertical offset between the views shows up as a shift between them. Real
images are not line integrals (display curves, scatter, different collimation), so the
estimate matches the profiles' vertical derivatives (edges: the joint line, the condyles, the
fibular head) by normalised cross-correlation rather than the profiles themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..io.preprocessing import normalize_intensity
from ..io.xray_io import XRay
from ..core.ndfilters import gaussian_filter1d


@dataclass
class HeightOffset:
    """Estimated vertical displacement of the lateral image's content relative to the AP's, in mm
    (positive: the lateral view shows the knee higher, toward superior)."""

    offset_mm: float
    correlation: float  # peak normalised cross-correlation of the two profiles' derivatives
    reliable: bool  # peak strong and not at the search limit


def _row_profile(xray: XRay, step_mm: float, z: np.ndarray) -> np.ndarray:
    """Mean normalised intensity per row, resampled at heights `z` (mm, +z superior) and
    differentiated (the edges carry the alignment)."""
    g = xray.geometry
    img = np.clip(normalize_intensity(xray.pixels), 0.0, 1.5)
    # central 80 % of the columns: collimation borders and side markers sit at the edges
    w = img.shape[1]
    prof = img[:, int(0.1 * w): max(int(0.9 * w), int(0.1 * w) + 1)].mean(axis=1)
    rows = np.arange(img.shape[0])
    z_rows = -(rows - (g.height - 1) / 2.0) * g.iso_spacing[1]  # DESIGN.md: row toward inferior
    p = np.interp(z, z_rows[::-1], prof[::-1], left=np.nan, right=np.nan)
    p = gaussian_filter1d(np.nan_to_num(p, nan=np.nanmean(p)), 1.0 / step_mm)  # ~1 mm smoothing
    return np.gradient(p)


def estimate_height_offset(ap: XRay, lateral: XRay, max_offset_mm: float = 20.0, step_mm: float = 0.25) -> HeightOffset:
    """Vertical offset of the lateral view against the AP from their row profiles (see module
    docstring). Sub-step precision from a parabola through the correlation peak."""
    half = 0.5 * min(ap.geometry.iso_extent[1], lateral.geometry.iso_extent[1])
    z = np.arange(-half, half + step_mm / 2, step_mm)
    pa, pl = _row_profile(ap, step_mm, z), _row_profile(lateral, step_mm, z)
    n = int(round(max_offset_mm / step_mm))
    valid = slice(n, len(z) - n)
    a = pa[valid] - pa[valid].mean()
    na = np.sqrt((a * a).sum())
    cc = np.full(2 * n + 1, -1.0)
    for k in range(-n, n + 1):
        # lateral content moved up by d mm: lateral(z) = ap(z - d), so compare ap(z) with lateral(z + d)
        b = pl[n + k: len(z) - n + k]
        b = b - b.mean()
        nb = np.sqrt((b * b).sum())
        if na > 0 and nb > 0:
            cc[k + n] = float((a * b).sum() / (na * nb))
    i = int(np.argmax(cc))
    frac = 0.0
    if 0 < i < len(cc) - 1:
        y0, y1, y2 = cc[i - 1], cc[i], cc[i + 1]
        den = y0 - 2 * y1 + y2
        frac = 0.5 * (y0 - y2) / den if den < 0 else 0.0
    offset = (i - n + frac) * step_mm
    reliable = bool(cc[i] > 0.5 and 0 < i < len(cc) - 1)
    return HeightOffset(float(offset), float(cc[i]), reliable)


def otsu3_upper(image: np.ndarray, nbins: int = 256) -> float:
    """The upper of the two three-class Otsu thresholds (Liao et al. 2001: the pair of histogram
    bins that maximises the between-class variance), at a bin centre. It reproduces scikit-image's
    threshold_multiotsu(image, classes=3)[-1] exactly (float32 moments, its first-bin weighting and
    tie order), which it replaces so that the Slicer module needs no scikit-image."""
    hist, edges = np.histogram(image.ravel(), bins=nbins, range=(float(image.min()), float(image.max())))
    centres = 0.5 * (edges[:-1] + edges[1:])
    p = (hist / max(1, hist.sum())).astype(np.float32)
    if np.count_nonzero(p) <= 3:  # no more values than classes: the thresholds are the values themselves
        nz = np.flatnonzero(p)
        return float(centres[nz[-2]]) if len(nz) > 1 else float(centres[0])
    w = np.cumsum(p, dtype=np.float32)  # zeroth moments of bins 0..j
    first = p * np.arange(nbins, dtype=np.float32)
    first[0] = p[0]  # (sic: scikit-image's first moment of bin 0)
    s = np.cumsum(first, dtype=np.float32)

    def between(s_, w_):  # a class's share of the between-class variance
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(w_ > 0, (s_ * s_ / w_).astype(np.float32), np.float32(0))

    head = between(s, w)
    head[0] = 0.0
    lo = np.arange(nbins)[:, None]
    hi = np.arange(nbins)[None, :]
    before = np.maximum(lo - 1, 0)  # class lo..hi, lo >= 1
    mid = between((s[hi] - s[before]).astype(np.float32), (w[hi] - w[before]).astype(np.float32))
    t0, t1 = lo, hi  # classes [0, t0], [t0 + 1, t1], [t1 + 1, end]
    sigma = (head[t0] + mid[np.minimum(t1 + 1, nbins - 1), nbins - 1]).astype(np.float32) + \
        mid[np.minimum(t0 + 1, nbins - 1), t1]
    sigma = np.where((t0 <= nbins - 3) & (t1 > t0) & (t1 <= nbins - 2), sigma, -np.inf)
    return float(centres[int(np.argmax(sigma)) % nbins])  # the first maximum, as its search order


def knee_height(ap: XRay, smooth_mm: float = 10.0) -> float:
    """Height (mm, +z superior, 0 = image centre) of the knee joint on an AP view: the level
    where the bones are widest (condyles and tibial plateau, about 2.5x the shafts' width).
    Bone is told from soft tissue and air by a three-class Otsu threshold."""
    a = np.clip(normalize_intensity(ap.pixels), 0.0, 1.0)
    t = otsu3_upper(a)
    s_col, s_row = ap.geometry.iso_spacing
    width = (a > t).sum(axis=1) * s_col  # bone width per row, mm
    width = gaussian_filter1d(width.astype(np.float64), smooth_mm / s_row)
    r = int(np.argmax(width))
    return float(-(r - (ap.geometry.height - 1) / 2.0) * s_row)


def crop_rows(xray: XRay, z_centre: float, height_mm: float) -> tuple[XRay, float]:
    """The rows of a parallel-beam view within height_mm around z_centre (kept inside the
    image), and the height of the crop's centre: the cropped image is a view centred there, so
    the caller shifts the reconstruction back up by that height."""
    from ..core.geometry import ViewGeometry

    g = xray.geometry
    s = g.iso_spacing[1]
    c = (g.height - 1) / 2.0 - z_centre / s  # row of z_centre
    n = int(round(height_mm / s))
    r0 = int(round(c - (n - 1) / 2.0))
    r0 = max(0, min(g.height - n, r0))
    geom = ViewGeometry(g.view, g.width, n, g.spacing, g.sid, g.sod, g.side)
    centre = float(-(r0 + (n - 1) / 2.0 - (g.height - 1) / 2.0) * s)
    return XRay(xray.pixels[r0:r0 + n], geom, {**xray.info, "cropped_rows": [r0, r0 + n]}), centre
