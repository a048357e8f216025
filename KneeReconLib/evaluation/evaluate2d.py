"""2D evaluation as in Kasten et al.'s real-radiograph protocol: project each reconstructed bone
onto each view and compare its silhouette with a 2D bone mask drawn on that X-ray (2D Dice, and
2D Chamfer distance between the outlines in mm at the isocentre).

A case folder holds `ap.*` and `lateral.*` (any format `read_xray` accepts) and the masks, either
one binary image per bone and view (`ap_mask_femur.nrrd`, ..., `lateral_mask_fibula.nrrd`; bones
may overlap) or one label image per view (`ap_mask.nrrd`, values as DESIGN.md's labels; no
overlap possible). Masks have the X-ray's size. An optional `meta.json` with "side" gives the
side; `pixel_spacing_mm` there is used for formats without spacing.
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..core.errors import KneeReconError
from ..core.labels import BONE_NAMES, BONES
from ..reconstruction.overlay import project_mask

VIEWS = ("ap", "lateral")


def _find(folder: str, stem: str) -> str | None:
    hits = sorted(p for p in glob.glob(os.path.join(folder, stem + ".*")) if not p.endswith(".json"))
    return hits[0] if hits else None


def read_masks(folder: str, view: str, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """{bone: bool mask [rows, cols]} for one view; bones without a mask are left out."""
    def load(path):
        a = sitk.GetArrayFromImage(sitk.ReadImage(path))
        a = a.reshape(a.shape[-2:]) if a.ndim == 3 and 1 in a.shape[:1] else a
        if a.ndim == 3 and a.shape[-1] in (3, 4):  # RGB(A) drawing: any non-black pixel
            a = a[..., :3].max(-1)
        if a.shape != tuple(shape):
            raise KneeReconError(f"mask {path!r} is {a.shape[1]}x{a.shape[0]} pixels but the {view} X-ray is "
                                 f"{shape[1]}x{shape[0]}: masks must be drawn on the X-ray itself")
        return a
    out = {}
    for b in BONES:
        p = _find(folder, f"{view}_mask_{b.name}")
        if p:
            out[b.name] = load(p) > 0
    label_file = _find(folder, f"{view}_mask")
    if label_file and not out:
        lab = load(label_file)
        out = {b.name: lab == b.value for b in BONES if (lab == b.value).any()}
    return out


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def metrics_2d(pred: np.ndarray, truth: np.ndarray, spacing_cr: tuple[float, float]) -> dict:
    """2D Dice and symmetric mean outline distance (Chamfer, mm) of two silhouettes; NaN Chamfer
    when either is empty."""
    inter = float((pred & truth).sum())
    tot = float(pred.sum() + truth.sum())
    dice = 2 * inter / tot if tot else 1.0
    if not pred.any() or not truth.any():
        return {"dice": dice, "chamfer": float("nan")}
    samp = (spacing_cr[1], spacing_cr[0])  # (row, col) mm
    op, ot = _outline(pred), _outline(truth)
    d_to_t = ndimage.distance_transform_edt(~ot, sampling=samp)
    d_to_p = ndimage.distance_transform_edt(~op, sampling=samp)
    chamfer = 0.5 * (float(d_to_t[op].mean()) + float(d_to_p[ot].mean()))
    return {"dice": dice, "chamfer": chamfer}


def evaluate_case_2d(rec, masks: dict[str, dict[str, np.ndarray]]) -> dict:
    """Per view and bone: 2D Dice and Chamfer of the reconstruction's projection vs the masks."""
    labels = rec.labels_array()
    row = {}
    for view, xray, off in (("ap", rec.ap, 0.0), ("lateral", rec.lateral, rec.lateral_offset_mm)):
        for bone, truth in masks.get(view, {}).items():
            value = BONE_NAMES.index(bone) + 1
            sil = project_mask(labels == value, rec.grid, xray.geometry, off)
            m = metrics_2d(sil, truth, xray.geometry.iso_spacing)
            row[f"dice2d_{view}_{bone}"] = m["dice"]
            row[f"chamfer2d_{view}_{bone}"] = m["chamfer"]
    return row


def case_folders(root: str) -> list[str]:
    """`root` itself when it is a case (has ap.* and lateral.*), else its sub-folders that are."""
    def is_case(f):
        return _find(f, "ap") is not None and _find(f, "lateral") is not None
    if is_case(root):
        return [root]
    cases = [f for f in sorted(glob.glob(os.path.join(root, "*"))) if os.path.isdir(f) and is_case(f)]
    if not cases:
        raise KneeReconError(f"{root!r} has no case: a case folder holds ap.*, lateral.* and the 2D masks "
                             f"(ap_mask_<bone>.* / lateral_mask_<bone>.*, or ap_mask.* / lateral_mask.* label images)")
    return cases


def evaluate_2d(root: str, model: str | None = None, device: str = "cpu", height_offset="auto", log=print,
                style: str | None = None) -> dict:
    """Reconstruct every case under `root` and compare its projections with the 2D masks."""
    from ..io.xray_io import read_xray
    from ..reconstruction.inference import Reconstructor

    rec_ = Reconstructor(model, device, style=style)
    rows = []
    for folder in case_folders(root):
        meta = {}
        if os.path.exists(os.path.join(folder, "meta.json")):
            with open(os.path.join(folder, "meta.json")) as f:
                meta = json.load(f)
        side = meta.get("side")
        spacing = meta.get("pixel_spacing_mm")
        ap = read_xray(_find(folder, "ap"), "ap", spacing, side=side or "right")
        lat = read_xray(_find(folder, "lateral"), "lateral", spacing, side=side or "right")
        masks = {v: read_masks(folder, v, x.pixels.shape) for v, x in (("ap", ap), ("lateral", lat))}
        if not any(masks.values()):
            raise KneeReconError(f"{folder!r}: no 2D masks found (ap_mask_<bone>.*, lateral_mask_<bone>.*, or ap_mask.*)")
        rec = rec_.run(ap, lat, side or "right", surfaces=False, height_offset=height_offset)
        row = {"case": os.path.basename(os.path.normpath(folder)), **evaluate_case_2d(rec, masks)}
        rows.append(row)
        log(f"{row['case']}: " + " ".join(f"{b[:3]} {np.nanmean([row.get(f'dice2d_{v}_{b}', np.nan) for v in VIEWS]):.3f}"
                                           for b in BONE_NAMES))
    keys = sorted({k for r in rows for k in r if k != "case"})
    summary = {k: float(np.nanmean([r.get(k, np.nan) for r in rows])) for k in keys}
    return {"n_cases": len(rows), "cases": rows, "summary": summary}


def format_table_2d(res: dict) -> str:
    s = res["summary"]
    lines = [f"2D evaluation on {res['n_cases']} cases (projection of the reconstruction vs 2D masks; mean over cases)",
             f"{'':22s}" + "".join(f"{b:>11s}" for b in BONE_NAMES)]
    for metric, name in (("dice2d", "2D Dice"), ("chamfer2d", "2D Chamfer mm")):
        for v in VIEWS:
            vals = [s.get(f"{metric}_{v}_{b}") for b in BONE_NAMES]
            lines.append(f"{name + ' ' + v:22s}" + "".join(f"{x:11.3f}" if x is not None else f"{'-':>11s}" for x in vals))
    return "\n".join(lines)
