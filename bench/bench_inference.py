"""Reconstruction speed and memory on this machine (issue 8). Prints figures; run:
    python bench/bench_inference.py [--threads N] [--repeats R]
Network forward at the full 128^3 grid in several modes side by side (fp32 eager, channels-last,
bf16 autocast + channels-last), their voxel agreement with the fp32 reference, then the whole
`kneerecon reconstruct` path from files to written outputs, and peak resident memory."""
import argparse
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from KneeReconLib.backprojection import backproject  # noqa: E402
from KneeReconLib.checkpoint import load_model  # noqa: E402
from KneeReconLib.geometry import ReconGrid  # noqa: E402
from KneeReconLib.inference import DEFAULT_MODEL, reconstruct  # noqa: E402
from KneeReconLib.outputs import write_outputs  # noqa: E402
from KneeReconLib.preprocessing import normalize_intensity  # noqa: E402
from KneeReconLib.xray_io import XRay, read_xray  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Resources", "Sample")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, bf16 CPU support: {torch.backends.mkldnn.is_available()}")
    xa = read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap")
    xl = read_xray(os.path.join(SAMPLE, "lateral.nrrd"), "lateral")
    grid = ReconGrid.from_views(xa.geometry, xl.geometry, 128)
    vol = backproject(XRay(normalize_intensity(xa.pixels), xa.geometry), XRay(normalize_intensity(xl.pixels), xl.geometry), grid)
    net, _ = load_model(DEFAULT_MODEL)
    x = torch.from_numpy(vol)[None]
    modes = {}

    def timeit(fn):
        fn()
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)), out

    with torch.inference_mode():
        modes["fp32 eager"] = timeit(lambda: net(x).argmax(1)[0].numpy())
        net_cl = net.to(memory_format=torch.channels_last_3d)
        x_cl = x.contiguous(memory_format=torch.channels_last_3d)
        modes["fp32 channels-last"] = timeit(lambda: net_cl(x_cl).argmax(1)[0].numpy())

        def bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return net_cl(x_cl).argmax(1)[0].numpy()
        modes["bf16 autocast + channels-last (default)"] = timeit(bf16)
    ref = modes["fp32 eager"][1]
    print(f"{'network forward, 128^3':45s} {'median s':>9s} {'agree w/ fp32':>14s}")
    for k, (t, out) in modes.items():
        print(f"{k:45s} {t:9.3f} {100 * (out == ref).mean():13.3f}%")

    with tempfile.TemporaryDirectory() as d:
        ts = []
        for i in range(3):
            t0 = time.perf_counter()
            rec = reconstruct(os.path.join(SAMPLE, "ap.nrrd"), os.path.join(SAMPLE, "lateral.nrrd"), side="left")
            write_outputs(rec, os.path.join(d, f"o{i}"))
            ts.append(time.perf_counter() - t0)
        print(f"end to end (read, load model, back-project, network, clean-up, surfaces, write 8 files): "
              f"median {np.median(ts):.2f} s; stages of the last run: "
              + ", ".join(f"{k} {v:.3f}" for k, v in rec.timings_s.items()))
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
