"""DRR projector speed (issue 8): parallel-beam AP + lateral pair of a 256^3 CT, and a cone-beam
pair on a 256x256 detector (Joseph's plane method, and ray marching at 128 and 256 samples). Prints median times. Run:
    python bench/bench_drr.py [--device cpu|cuda]"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from KneeReconLib.core.geometry import ReconGrid, ViewGeometry  # noqa: E402
from KneeReconLib.data.drr import project_cone, project_cone_planes, project_parallel  # noqa: E402


def med(fn, n=5):
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    grid = ReconGrid.centered((200, 200, 200), (256, 256, 256))
    vol = torch.rand(256, 256, 256, device=a.device) * 0.03
    t = med(lambda: project_parallel(vol, grid.spacing))
    print(f"parallel AP + lateral pair, 256^3 CT, {a.device}: {t * 1000:.1f} ms")
    views = [ViewGeometry("ap", 256, 256, (1.2, 1.2), 1100.0, 900.0),
             ViewGeometry("lateral", 256, 256, (1.2, 1.2), 1100.0, 900.0)]
    t = med(lambda: [project_cone_planes(vol[None], grid, v) for v in views], n=3)
    print(f"cone-beam AP + lateral pair, 256^3 CT, 256x256 detector, Joseph's method (default, one sample per plane), "
          f"{a.device}: {t * 1000:.0f} ms")
    for n in (128, 256):
        views = [ViewGeometry("ap", 256, 256, (1.2, 1.2), 1100.0, 900.0),
                 ViewGeometry("lateral", 256, 256, (1.2, 1.2), 1100.0, 900.0)]
        t = med(lambda: [project_cone(vol[None], grid, v, n) for v in views], n=3)
        print(f"cone-beam AP + lateral pair, 256^3 CT, 256x256 detector, ray marching {n} samples/ray, {a.device}: {t * 1000:.0f} ms")


if __name__ == "__main__":
    main()
