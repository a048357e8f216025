"""How far the written bone surfaces lie from the truth, for several surface settings: each cached
test case is reconstructed once (one network pass), each bone's surface is built from the label
map with each setting, and the symmetric mean distance between the surface and the truth's
boundary is reported (surface vertices -> the truth's distance map, and every third truth boundary
voxel -> the surface), with the time spent building the surfaces.

    python scripts/surface_accuracy.py --data cache/xs_parallel cache/xs_cone --reductions 0.5 0

`--reductions`: quadric decimation's target reduction (surfaces.bone_surface; 0 = no decimation)."""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import SimpleITK as sitk
from vtkmodules.util import numpy_support
from vtkmodules.vtkFiltersCore import vtkImplicitPolyDataDistance

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from KneeReconLib.core.labels import BONES  # noqa: E402
from KneeReconLib.data.dataset import load_case, make_sample  # noqa: E402
from KneeReconLib.reconstruction.inference import Reconstructor  # noqa: E402
from KneeReconLib.reconstruction.surfaces import bone_surface, clean_labels  # noqa: E402


def distance_map(mask: np.ndarray, spacing) -> np.ndarray:
    """Signed distance (mm) to the mask's boundary, negative inside, [z, y, x]."""
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing))
    d = sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    return sitk.GetArrayFromImage(d)


def trilinear(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`arr` [z, y, x] at continuous voxel indices idx [N, (x, y, z)]."""
    i0 = np.clip(np.floor(idx).astype(int), 0, np.array(arr.shape[::-1]) - 2)
    f = idx - i0
    out = np.zeros(len(idx))
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                w = ((f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1])
                     * (f[:, 2] if dz else 1 - f[:, 2]))
                out += w * arr[i0[:, 2] + dz, i0[:, 1] + dy, i0[:, 0] + dx]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="folders of cached cases (.npz)")
    ap.add_argument("--reductions", nargs="+", type=float, default=[0.5, 0.0])
    ap.add_argument("--model", help="model file (default: the bundled model)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    paths = sorted(p for f in a.data for p in glob.glob(os.path.join(f, "*.npz")))
    if not paths:
        sys.stderr.write("surface_accuracy: no cached cases (.npz) in the folders given\n")
        return 2
    rec = Reconstructor(a.model, tta=False)
    dist = {r: {b.name: [] for b in BONES} for r in a.reductions}
    triangles = {r: 0 for r in a.reductions}
    seconds = {r: 0.0 for r in a.reductions}
    for p in paths:
        case = load_case(p)
        x, truth = make_sample(case)
        grid = case.grid()
        pred = clean_labels(rec.predict(x))
        origin, spacing = np.array(grid.origin), np.array(grid.spacing)
        for b in BONES:
            if not (pred == b.value).any():
                continue
            dt = distance_map(truth == b.value, spacing)
            k, j, i = np.nonzero((truth == b.value) & (dt > -spacing.min()))  # the truth's boundary voxels
            truth_pts = (origin + np.stack([i, j, k], 1) * spacing)[::3]
            for r in a.reductions:
                t0 = time.perf_counter()
                mesh = bone_surface(pred == b.value, grid, target_reduction=r)
                seconds[r] += time.perf_counter() - t0
                triangles[r] += mesh.GetNumberOfPolys()
                pts = numpy_support.vtk_to_numpy(mesh.GetPoints().GetData())
                to_truth = np.abs(trilinear(dt, (pts - origin) / spacing)).mean()
                f = vtkImplicitPolyDataDistance()
                f.SetInput(mesh)
                to_mesh = np.mean([abs(f.EvaluateFunction(*q)) for q in truth_pts])
                dist[r][b.name].append(0.5 * (to_truth + to_mesh))
    out = {}
    for r in a.reductions:
        out[str(r)] = {"mean_distance_mm": {k: round(float(np.mean(v)), 4) for k, v in dist[r].items()},
                       "triangles_per_case": round(triangles[r] / len(paths)), "surface_seconds": round(seconds[r], 2)}
        print(f"target_reduction {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[str(r)]["mean_distance_mm"].items())
              + f" mm; {out[str(r)]['triangles_per_case']} triangles per knee; surfaces {seconds[r]:.2f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cases": len(paths), "data": a.data, "results": out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
