"""Accuracy measures in the paper's terms: Dice per class, and surface distances in mm between
marching-cubes surfaces of prediction and truth (Chamfer = symmetric mean of nearest-point
distances, as in Kasten et al.; ASSD; HD95)."""
from __future__ import annotations

import numpy as np

from ..core.labels import NUM_CLASSES


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Dice for classes 0..num_classes-1 (NaN where a class is absent from both)."""
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        p, t = pred == c, truth == c
        s = p.sum() + t.sum()
        if s:
            out[c] = 2.0 * np.logical_and(p, t).sum() / s
    return out


def surface_points(mask: np.ndarray, spacing_zyx, origin_zyx=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Vertices (N, 3; z, y, x in mm) of the marching-cubes surface of a binary mask."""
    from skimage.measure import marching_cubes

    if mask.sum() == 0:
        return np.zeros((0, 3))
    m = np.pad(mask.astype(np.float32), 1)
    verts, _, _, _ = marching_cubes(m, 0.5, spacing=tuple(spacing_zyx))
    return verts - np.asarray(spacing_zyx) + np.asarray(origin_zyx)


def surface_distances(pred_mask: np.ndarray, truth_mask: np.ndarray, spacing_zyx) -> dict:
    """{'chamfer', 'assd', 'hd95'} in mm; NaN when either surface is empty."""
    from scipy.spatial import cKDTree

    a, b = surface_points(pred_mask, spacing_zyx), surface_points(truth_mask, spacing_zyx)
    if len(a) == 0 or len(b) == 0:
        return {"chamfer": float("nan"), "assd": float("nan"), "hd95": float("nan")}
    dab = cKDTree(b).query(a)[0]
    dba = cKDTree(a).query(b)[0]
    return {
        "chamfer": float(0.5 * (dab.mean() + dba.mean())),
        "assd": float((dab.sum() + dba.sum()) / (len(dab) + len(dba))),
        "hd95": float(max(np.percentile(dab, 95), np.percentile(dba, 95))),
    }
