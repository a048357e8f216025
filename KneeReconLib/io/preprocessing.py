"""Exposure-independent intensity normalisation of radiographs."""
from __future__ import annotations

import numpy as np


def normalize_intensity(pixels: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.5) -> np.ndarray:
    """Map the image's robust range [p_low, p_high] to [0, 1] (clipped to [-0.25, 1.25]).

    Percentiles, not min/max, so that a few hot pixels, side markers or collimator edges do not
    set the scale; the result no longer depends on exposure, detector gain or bit depth."""
    a = np.asarray(pixels, np.float32)
    lo, hi = np.percentile(a, [low_pct, high_pct])
    if hi - lo < 1e-6 * max(1.0, abs(float(hi))):
        hi = lo + 1.0
    return np.clip((a - lo) / (hi - lo), -0.25, 1.25).astype(np.float32)


def collimated_border(pixels: np.ndarray, flat_sd: float = 0.03, bright: float = 0.8,
                      margin_px: int = 3, max_fraction: float = 0.4) -> tuple[int, int, int, int]:
    """Widths in pixels (top, bottom, left, right) of the collimator's shadow: full rows or
    columns at the image's edges that are flat and bright (no primary beam reached them, so a
    bone-bright image shows them white). `margin_px` more are taken for the blurred edge.
    Dark flat edges (air) are not collimation and are left alone."""
    a = np.asarray(pixels, np.float32)
    lo, hi = np.percentile(a, [0.5, 99.9])
    a = (a - lo) / max(float(hi - lo), 1e-6)

    def run(lines: np.ndarray) -> int:
        n = 0
        limit = int(max_fraction * len(lines))
        while n < limit and lines[n].std() < flat_sd and lines[n].mean() > bright:
            n += 1
        return n + margin_px if n else 0

    return run(a), run(a[::-1]), run(a.T), run(a.T[::-1])


def fill_collimation(pixels: np.ndarray, border: tuple[int, int, int, int]) -> np.ndarray:
    """The exposed field's edge rows/columns repeated over the collimated border, so the image
    looks as if it simply went on (which is how the back-projection treats image edges too)."""
    top, bottom, left, right = border
    h, w = pixels.shape
    if top + bottom >= h - 2 or left + right >= w - 2:
        return pixels
    rows = np.clip(np.arange(h), top, h - 1 - bottom)
    cols = np.clip(np.arange(w), left, w - 1 - right)
    return pixels[rows][:, cols]
