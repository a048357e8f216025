"""Where the cross-subject error comes from: placement or shape. For each cached case and bone,
the reconstruction's centroid offset from the truth (mm, LPS x/y/z), its volume against the
truth's, its Dice, and its Dice after the best whole-voxel translation (within +-`--reach`
voxels): a bone whose Dice rises a lot when moved is misplaced, one that does not is misshapen.

  python scripts/error_analysis.py --data cache/xs_parallel cache/xs_cone --out docs/error_analysis.json

Reads cases through DESIGN.md's grid like `kneerecon evaluate --data` (same network, same
clean-up); the translation search is an analysis, never part of a reconstruction.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from KneeReconLib.core.labels import BONES  # noqa: E402
from KneeReconLib.data.dataset import load_case, make_sample  # noqa: E402
from KneeReconLib.reconstruction.inference import Reconstructor  # noqa: E402
from KneeReconLib.reconstruction.surfaces import clean_labels  # noqa: E402


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / s if s else 1.0


def shifted(mask: np.ndarray, shift: tuple[int, int, int]) -> np.ndarray:
    """The mask moved by whole voxels (z, y, x), zero-filled (np.roll would wrap)."""
    out = np.zeros_like(mask)
    src, dst = [], []
    for s, n in zip(shift, mask.shape):
        src.append(slice(max(0, -s), n - max(0, s)))
        dst.append(slice(max(0, s), n - max(0, -s)))
    out[tuple(dst)] = mask[tuple(src)]
    return out


def best_shift_dice(pred: np.ndarray, truth: np.ndarray, reach: int) -> tuple[float, tuple[int, int, int]]:
    """Dice of the prediction moved by up to `reach` voxels per axis, maximised by coordinate
    descent from zero (up to three sweeps over the axes)."""
    box = np.nonzero(pred | truth)
    if not len(box[0]):
        return 1.0, (0, 0, 0)
    lo = [max(0, int(b.min()) - reach) for b in box]
    hi = [int(b.max()) + reach + 1 for b in box]
    p = pred[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    t = truth[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    best, arg = dice(p, t), (0, 0, 0)
    for _ in range(3):  # coordinate descent, axis by axis: it can stop at a local best, so the
        # reported gain is a lower bound on what the best translation would give
        moved = False
        for ax in range(3):
            for s in range(-reach, reach + 1):
                cand = list(arg)
                cand[ax] = s
                d = dice(shifted(p, tuple(cand)), t)
                if d > best + 1e-9:
                    best, arg, moved = d, tuple(cand), True
        if not moved:
            break
    return best, arg


def analyse_case(rec: Reconstructor, path: str, reach: int) -> dict:
    case = load_case(path)
    x, truth = make_sample(case)
    pred = clean_labels(rec.predict(x))
    grid = case.grid()
    sp = np.array(grid.spacing[::-1])  # z, y, x mm
    row = {"case": os.path.basename(path), "side": case.meta.get("side"), "flexion_deg": case.meta.get("flexion_deg")}
    for b in BONES:
        p, t = pred == b.value, truth == b.value
        d0 = dice(p, t)
        d1, s = best_shift_dice(p, t, reach)
        cp = np.array(np.nonzero(p)).mean(1) if p.any() else np.full(3, np.nan)
        ct = np.array(np.nonzero(t)).mean(1)
        off = (cp - ct) * sp  # z, y, x mm
        row[b.name] = {"dice": round(d0, 4), "dice_best_shift": round(d1, 4), "best_shift_vox_zyx": list(s),
                       "centroid_offset_mm_xyz": [round(float(v), 2) for v in off[::-1]],
                       "volume_ratio": round(float(p.sum()) / max(1, int(t.sum())), 3)}
    return row


def summarise(rows: list[dict]) -> dict:
    out = {}
    for b in BONES:
        r = [row[b.name] for row in rows]
        off = np.array([x["centroid_offset_mm_xyz"] for x in r], float)
        out[b.name] = {
            "dice": round(float(np.mean([x["dice"] for x in r])), 4),
            "dice_best_shift": round(float(np.mean([x["dice_best_shift"] for x in r])), 4),
            "centroid_offset_mean_mm_xyz": [round(float(v), 2) for v in np.nanmean(off, 0)],
            "centroid_offset_rms_mm_xyz": [round(float(v), 2) for v in np.sqrt(np.nanmean(off ** 2, 0))],
            "volume_ratio_mean": round(float(np.mean([x["volume_ratio"] for x in r])), 3),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="folders of cached cases (.npz)")
    p.add_argument("--model", default=None, help="model file (default: the bundled model)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino"))
    p.add_argument("--no-amp", action="store_true", help="f32 network (no bf16 or int8)")
    p.add_argument("--reach", type=int, default=3, help="largest translation searched, voxels per axis")
    p.add_argument("--out", default=None, help="JSON file for the per-case rows and the summary")
    a = p.parse_args(argv)
    rec = Reconstructor(a.model, amp=not a.no_amp, backend=a.backend)
    result = {"model": rec.card.get("version"), "precision": rec.precision, "reach_voxels": a.reach, "sets": {}}
    for folder in a.data:
        rows = []
        for path in sorted(glob.glob(os.path.join(folder, "*.npz"))):
            rows.append(analyse_case(rec, path, a.reach))
            r = rows[-1]
            print(r["case"], " ".join(f"{b.name[:3]} {r[b.name]['dice']:.3f}->{r[b.name]['dice_best_shift']:.3f}"
                                      for b in BONES), flush=True)
        s = summarise(rows)
        result["sets"][os.path.basename(os.path.normpath(folder))] = {"summary": s, "cases": rows}
        print(f"\n{folder} ({len(rows)} cases)")
        for b in BONES:
            x = s[b.name]
            print(f"  {b.name:8s} Dice {x['dice']:.3f}  moved {x['dice_best_shift']:.3f}  centroid offset mean "
                  f"{x['centroid_offset_mean_mm_xyz']} rms {x['centroid_offset_rms_mm_xyz']} mm  volume x{x['volume_ratio_mean']}")
    if a.out:
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
