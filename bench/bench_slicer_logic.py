"""Reconstruction through the Slicer module's MRML logic (KneeReconMRMLLogic, on a real MRML scene
from slicer-core, headless), several times in one process, as a Slicer session does: the first
includes loading the model (OpenVINO import, converted network, compile), the later ones reuse it.
Each time covers the X-ray nodes -> KneeReconLib -> segmentation node with closed surfaces and four
model nodes. Also reports whether torch, scikit-image or scipy was imported (none must be).

    python bench/bench_slicer_logic.py [--repeats 4] [--json FILE] [--baseline OLD_LOGIC.py]

`--baseline` also times another version of the MRML logic (e.g. `git show 9454f87:KneeRecon/KneeReconMRMLLogic.py
> /tmp/old.py`) against this one, later reconstructions interleaved in the same session, so that a
changing load falls on both alike; the library (KneeReconLib) is this checkout's for both.

Needs slicer-core (requirements-test.txt)."""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path[:0] = [ROOT, os.path.join(ROOT, "KneeRecon"), os.path.join(ROOT, "Testing")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=4, help="reconstructions in the session (default 4)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--baseline", metavar="FILE", help="another KneeReconMRMLLogic.py to time against this one, interleaved")
    a = p.parse_args()
    t0 = time.perf_counter()
    import slicer_headless
    from KneeReconMRMLLogic import KneeReconMRMLLogic

    scene, _app, _obs = slicer_headless.install()
    sample = os.path.join(ROOT, "Resources", "Sample")
    ap = slicer_headless.load_volume(scene, os.path.join(sample, "ap.nrrd"), "sample AP")
    lat = slicer_headless.load_volume(scene, os.path.join(sample, "lateral.nrrd"), "sample lateral")
    side = json.load(open(os.path.join(sample, "meta.json")))["side"]
    t_setup = time.perf_counter() - t0
    times, cpus, recs = [], [], []
    for i in range(a.repeats):
        logic = KneeReconMRMLLogic(scene)  # a new logic object each time, as the GUI may make
        t0, c0 = time.perf_counter(), time.process_time()
        seg = logic.reconstruct(ap, lat, side=side, backend=a.backend)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)  # all threads: what it costs, whatever else the machine runs
        recs.append(logic.getReconstructor(backend=a.backend))
        stages = ", ".join(f"{k} {v:.2f}" for k, v in logic.lastReconstruction.timings_s.items())
        print(f"reconstruction {i + 1}: {times[-1]:.2f} s wall, {cpus[-1]:.2f} s CPU  (library: {stages}; "
              f"{seg.GetSegmentation().GetNumberOfSegments()} segments)", flush=True)
    res = {"setup_s": t_setup, "first_s": times[0], "later_s": times[1:],
           "later_median_s": statistics.median(times[1:]) if len(times) > 1 else None,
           "first_cpu_s": cpus[0], "later_cpu_median_s": statistics.median(cpus[1:]) if len(cpus) > 1 else None,
           "same_model_object": all(r is recs[0] for r in recs),
           "segments": seg.GetSegmentation().GetNumberOfSegments(),
           "precision": logic.lastReconstruction.precision,
           "torch_imported": "torch" in sys.modules, "skimage_imported": "skimage" in sys.modules,
           "scipy_imported": "scipy" in sys.modules,
           "load_average": os.getloadavg()[0], "cpus": os.cpu_count()}
    print(f"first (model loaded) {times[0]:.2f} s ({cpus[0]:.2f} s CPU); later: median {res['later_median_s'] or float('nan'):.2f} s "
          f"({res['later_cpu_median_s'] or float('nan'):.2f} s CPU) "
          f"over {len(times) - 1}; model reused: {res['same_model_object']}; torch imported: {res['torch_imported']}; "
          f"scikit-image imported: {res['skimage_imported']}; scipy imported: {res['scipy_imported']}; load average {res['load_average']:.1f} on {res['cpus']} CPUs")
    if a.baseline:
        import importlib.util
        spec = importlib.util.spec_from_file_location("BaselineMRMLLogic", a.baseline)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.KneeReconMRMLLogic(scene).reconstruct(ap, lat, side=side, backend=a.backend)  # its first run: not timed
        paired = {"baseline": [], "this": []}
        for _ in range(max(1, a.repeats - 1)):
            for name, cls in (("baseline", mod.KneeReconMRMLLogic), ("this", KneeReconMRMLLogic)):
                t0 = time.perf_counter()
                cls(scene).reconstruct(ap, lat, side=side, backend=a.backend)
                paired[name].append(time.perf_counter() - t0)
        res["paired_later_median_s"] = {k: statistics.median(v) for k, v in paired.items()}
        print(f"interleaved later reconstructions, {len(paired['this'])} each: baseline ({a.baseline}) median "
              f"{res['paired_later_median_s']['baseline']:.2f} s, this checkout {res['paired_later_median_s']['this']:.2f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
