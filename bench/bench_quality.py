"""Cost of the quality report (KneeReconLib/reconstruction/quality.py) on the bundled sample: `quality.assess`
alone on one reconstruction (outline agreement on both views, pieces and margin of the raw
output; the network's class scores are an output it computes anyway), and without the raw
output (outlines and sizes only). Wall time and CPU time (process, all threads), median of the
repeats.

    python bench/bench_quality.py [--repeats 15]
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, ROOT)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median wall s, median CPU s) of `fn()`."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    from KneeReconLib.core.geometry import ReconGrid
    from KneeReconLib.geometry.backprojection import backproject
    from KneeReconLib.io.preprocessing import normalize_intensity
    from KneeReconLib.io.xray_io import XRay, read_xray
    from KneeReconLib.reconstruction import quality
    from KneeReconLib.reconstruction.inference import Reconstructor

    sample = os.path.join(ROOT, "Resources", "Sample")
    ap = read_xray(os.path.join(sample, "ap.nrrd"), "ap", side="left")
    lat = read_xray(os.path.join(sample, "lateral.nrrd"), "lateral", side="left")
    rec = Reconstructor(tta=False)  # the report judges one pass (with mirror TTA, the unmirrored one)
    r = rec.run(ap, lat, "left", surfaces=False)
    grid = ReconGrid.for_network(ap.geometry, lat.geometry, r.grid.shape[0])
    vol = backproject(XRay(normalize_intensity(ap.pixels), ap.geometry), XRay(normalize_intensity(lat.pixels), lat.geometry),
                      grid, lateral_offset_mm=-r.lateral_offset_mm)
    raw, scores = rec.predict_scores(vol)
    labels = r.labels_array()
    print(f"sample: verdict {r.quality['verdict']}; network {rec.precision}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    w, c = timed(lambda: quality.assess(labels, r.grid, r.ap, r.lateral, r.lateral_offset_mm, raw, grid, scores), a.repeats)
    print(f"quality.assess: {w * 1000:.0f} ms wall, {c * 1000:.0f} ms CPU")
    w, c = timed(lambda: quality.assess(labels, r.grid, r.ap, r.lateral, r.lateral_offset_mm), a.repeats)
    print(f"quality.assess without the network's raw labels and scores (outlines and sizes only): "
          f"{w * 1000:.0f} ms wall, {c * 1000:.0f} ms CPU")


if __name__ == "__main__":
    main()
