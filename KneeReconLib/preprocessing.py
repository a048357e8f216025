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
