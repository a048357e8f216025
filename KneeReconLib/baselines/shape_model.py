"""Statistical shape models of the four knee bones (the paper's registration baseline, Klima et al. 2015).

Representation: each bone is a truncated signed distance function (SDF, mm, positive outside)
sampled on a fixed canonical box around an anatomical anchor, and the model is the PCA of those
SDFs over the training shapes (a level-set shape model, Leventon et al. 2000). The common
anchored box gives the voxel-to-voxel correspondence PCA needs without meshing: voxel i of every
training SDF is the same place relative to the bone's anchor. Left knees are mirrored in x, so
one model serves both sides.

Anchors are chosen to be stable when the field of view cuts a shaft: the distal end of the femur,
the proximal ends of tibia and fibula (x/y from the centroid of the bone's last few cm there),
and the patella's centroid. Shafts cut by the image edge are continued straight beyond it (the
mask's edge slice is repeated), so no artificial end cap enters the model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt, map_coordinates

from ..core.errors import KneeReconError
from ..core.geometry import ReconGrid
from ..core.labels import BONES, BY_NAME
from ..io.fileio import atomic_path

# Canonical box per bone, relative to its anchor, in mm: ((x_min, x_max), (y_min, y_max), (z_min, z_max)).
# Wide enough for the largest phantom knees (scale 1.2) with a margin for the SDF's truncation.
BOX_MM = {
    "femur": ((-62.0, 62.0), (-50.0, 50.0), (-8.0, 112.0)),
    "patella": ((-36.0, 36.0), (-30.0, 30.0), (-38.0, 38.0)),
    "tibia": ((-56.0, 56.0), (-50.0, 50.0), (-112.0, 8.0)),
    "fibula": ((-22.0, 22.0), (-22.0, 22.0), (-108.0, 8.0)),
}
# (which end of the bone anchors z, how many mm of that end give the x/y centroid)
ANCHOR = {"femur": ("min", 30.0), "patella": ("centroid", 0.0), "tibia": ("max", 30.0), "fibula": ("max", 20.0)}


@dataclass
class BoneShapeModel:
    """PCA of truncated SDFs on one bone's canonical box (arrays indexed z, y, x)."""

    bone: str
    spacing_mm: float
    box_mm: tuple  # ((x0, x1), (y0, y1), (z0, z1)) relative to the anchor
    mean: np.ndarray  # [nz, ny, nx] float32, mm
    modes: np.ndarray  # [K, nz, ny, nx] float32, orthonormal (flattened)
    sd: np.ndarray  # [K] standard deviation of each mode's coefficient, mm
    n_shapes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.mean.shape

    def instance(self, coeffs: np.ndarray) -> np.ndarray:
        """SDF for coefficients in mm (not in units of sd)."""
        k = len(coeffs)
        return self.mean + np.tensordot(np.asarray(coeffs, np.float32), self.modes[:k], axes=1)

    def project(self, sdf: np.ndarray, max_sd: float = 3.0) -> np.ndarray:
        """Coefficients (mm) of the closest model shape to a canonical SDF, limited to ±max_sd."""
        b = self.modes.reshape(len(self.sd), -1) @ (sdf - self.mean).ravel()
        return np.clip(b, -max_sd * self.sd, max_sd * self.sd).astype(np.float32)


@dataclass
class ShapeModel:
    """One BoneShapeModel per bone, with the settings it was built with."""

    bones: dict[str, BoneShapeModel]
    truncation_mm: float
    info: dict

    def save(self, path: str) -> None:
        arrays = {}
        meta = {"format": "kneerecon.ssm", "version": 1, "truncation_mm": self.truncation_mm, "info": self.info, "bones": {}}
        for name, m in self.bones.items():
            arrays[f"{name}_mean"] = m.mean.astype(np.float16)
            arrays[f"{name}_modes"] = m.modes.astype(np.float16)
            arrays[f"{name}_sd"] = m.sd.astype(np.float32)
            meta["bones"][name] = {"spacing_mm": m.spacing_mm, "box_mm": m.box_mm, "n_shapes": m.n_shapes}
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, meta=json.dumps(meta), **arrays)

    @classmethod
    def load(cls, path: str) -> "ShapeModel":
        if not os.path.isfile(path):
            raise KneeReconError(f"shape model {path!r} does not exist (build one with `kneerecon build-ssm`)")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != "kneerecon.ssm":
                    raise ValueError("no 'kneerecon.ssm' format marker")
                bones = {}
                for name, bm in meta["bones"].items():
                    bones[name] = BoneShapeModel(name, float(bm["spacing_mm"]), tuple(map(tuple, bm["box_mm"])),
                                                 z[f"{name}_mean"].astype(np.float32), z[f"{name}_modes"].astype(np.float32),
                                                 z[f"{name}_sd"].astype(np.float32), int(bm["n_shapes"]))
        except (OSError, KeyError, ValueError) as e:
            raise KneeReconError(f"{path!r} is not a KneeRecon shape model: {e}")
        return cls(bones, float(meta["truncation_mm"]), meta.get("info", {}))


def bone_anchor(mask: np.ndarray, grid: ReconGrid, bone: str) -> np.ndarray | None:
    """The bone's anchor (x, y, z in LPS mm) from its mask on `grid`, or None if it is absent."""
    idx = np.argwhere(mask)
    if len(idx) < 20:
        return None
    sx, sy, sz = grid.spacing
    ox, oy, oz = grid.origin
    pts = np.stack([ox + idx[:, 2] * sx, oy + idx[:, 1] * sy, oz + idx[:, 0] * sz], 1)
    end, depth = ANCHOR[bone]
    if end == "centroid":
        return pts.mean(0)
    z_end = pts[:, 2].min() if end == "min" else pts[:, 2].max()
    near = pts[np.abs(pts[:, 2] - z_end) <= depth]
    return np.array([near[:, 0].mean(), near[:, 1].mean(), z_end])


def canonical_points(box_mm, spacing_mm: float) -> np.ndarray:
    """Canonical coordinates (x, y, z mm relative to the anchor) of a box's voxels, [nz, ny, nx, 3]."""
    axes = [np.arange(lo, hi + 1e-6, spacing_mm, dtype=np.float32) for lo, hi in box_mm]
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    return np.stack([x, y, z], -1)


def box_shape(box_mm, spacing_mm: float) -> tuple[int, int, int]:
    n = [len(np.arange(lo, hi + 1e-6, spacing_mm)) for lo, hi in box_mm]
    return (n[2], n[1], n[0])


def grid_sdf(mask: np.ndarray, grid: ReconGrid, truncation_mm: float) -> np.ndarray:
    """Truncated SDF (mm, positive outside) of a mask on `grid`, computed with the z ends padded by
    repeating the edge slices (a shaft cut by the field of view goes on; no end cap within the
    truncation distance)."""
    sx, sy, sz = grid.spacing
    pad = int(np.ceil(truncation_mm / sz)) + 2
    m = np.pad(mask.astype(bool), ((pad, pad), (0, 0), (0, 0)), mode="edge")
    samp = (sz, sy, sx)
    d_out = distance_transform_edt(~m, sampling=samp)
    d_in = distance_transform_edt(m, sampling=samp)
    sdf = np.clip(d_out - d_in, -truncation_mm, truncation_mm).astype(np.float32)
    return sdf[pad:-pad]


def canonical_sdf(labels: np.ndarray, grid: ReconGrid, side: str, bm_box, spacing_mm: float, bone: str,
                  truncation_mm: float, anchor: np.ndarray | None = None) -> np.ndarray | None:
    """The bone's truncated SDF resampled onto its canonical box (left knees mirrored in x), or None."""
    mask = labels == BY_NAME[bone].value
    a = bone_anchor(mask, grid, bone) if anchor is None else anchor
    if a is None:
        return None
    sdf = grid_sdf(mask, grid, truncation_mm)
    pts = canonical_points(bm_box, spacing_mm)
    q = pts.reshape(-1, 3)
    if side == "left":
        q = q * np.array([-1.0, 1.0, 1.0], np.float32)
    p = q + a
    sx, sy, sz = grid.spacing
    ox, oy, oz = grid.origin
    coords = np.stack([(p[:, 2] - oz) / sz, (p[:, 1] - oy) / sy, (p[:, 0] - ox) / sx])
    # beyond the grid: the nearest value (the shaft continues, background stays background)
    vals = map_coordinates(sdf, coords, order=1, mode="nearest")
    return vals.reshape(pts.shape[:3]).astype(np.float32)


def build_shape_model(cases, spacing_mm: float = 2.0, n_modes: int = 12, truncation_mm: float = 12.0,
                      log=print) -> ShapeModel:
    """PCA shape models from an iterable of (labels[z, y, x], ReconGrid, side) training shapes."""
    samples: dict[str, list[np.ndarray]] = {b.name: [] for b in BONES}
    n = 0
    for labels, grid, side in cases:
        for b in BONES:
            s = canonical_sdf(labels, grid, side, BOX_MM[b.name], spacing_mm, b.name, truncation_mm)
            if s is not None:
                samples[b.name].append(s.ravel())
        n += 1
        if n % 20 == 0:
            log(f"  {n} shapes read")
    bones = {}
    for name, rows in samples.items():
        if len(rows) < 3:
            raise KneeReconError(f"too few training shapes with a {name} ({len(rows)}) for a shape model")
        X = np.stack(rows).astype(np.float32)
        mean = X.mean(0)
        Xc = X - mean
        # eigen-decomposition of the small N x N Gram matrix instead of the D x D covariance
        gram = (Xc @ Xc.T).astype(np.float64)
        w, v = np.linalg.eigh(gram)
        order = np.argsort(w)[::-1][: min(n_modes, len(rows) - 1)]
        w, v = np.clip(w[order], 1e-9, None), v[:, order]
        modes = (Xc.T @ v).T / np.sqrt(w)[:, None]  # unit-norm principal directions
        sd = np.sqrt(w / (len(rows) - 1))
        shp = box_shape(BOX_MM[name], spacing_mm)
        bones[name] = BoneShapeModel(name, spacing_mm, BOX_MM[name], mean.reshape(shp).astype(np.float32),
                                     modes.reshape((-1,) + shp).astype(np.float32), sd.astype(np.float32), len(rows))
        explained = float(w.sum() / max(np.trace(gram), 1e-9))
        log(f"{name}: {len(rows)} shapes, {len(order)} modes explain {explained:.1%} of the variance")
    return ShapeModel(bones, truncation_mm, {"n_cases": n, "spacing_mm": spacing_mm, "n_modes": n_modes})
