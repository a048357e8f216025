"""Reconstruction speed and memory on this machine (issue 8). Prints figures; run:
    python bench/bench_inference.py [--threads N] [--repeats R] [--compile] [--test-dice DIR]
Network forward at the full 128^3 grid in several modes side by side against the fp32 eager
reference (voxel agreement of the label maps with it), then the whole `kneerecon reconstruct`
path from files to written outputs, and peak resident memory. --compile adds torch.compile
(Inductor, slow to build); --test-dice DIR evaluates the test set with the default path and
in fp32 to check that the fast path leaves Dice unchanged."""
import argparse
import copy
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from KneeReconLib.core.geometry import ReconGrid  # noqa: E402
from KneeReconLib.core.labels import BONE_NAMES  # noqa: E402
from KneeReconLib.geometry.backprojection import backproject  # noqa: E402
from KneeReconLib.io.preprocessing import normalize_intensity  # noqa: E402
from KneeReconLib.io.xray_io import XRay, read_xray  # noqa: E402
from KneeReconLib.models import openvino_backend  # noqa: E402
from KneeReconLib.models.checkpoint import load_model  # noqa: E402
from KneeReconLib.models.fused_unet import fuse_for_inference  # noqa: E402
from KneeReconLib.models.network import fold_batchnorm, to_channels_last  # noqa: E402
from KneeReconLib.reconstruction.inference import (DEFAULT_ENSEMBLE, DEFAULT_MODEL, Reconstructor, cpu_has_fast_bf16,  # noqa: E402
                                                   reconstruct)
from KneeReconLib.reconstruction.outputs import write_outputs  # noqa: E402

SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Resources", "Sample")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (Inductor)")
    ap.add_argument("--test-dice", metavar="DIR", help="cached test cases: Dice of the default path vs fp32")
    ap.add_argument("--end-to-end", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.end_to_end:
        return end_to_end()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, native bf16: {cpu_has_fast_bf16()}")
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

    def autocast_bf16(m, inp):
        def f():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(inp).argmax(1)[0].numpy()
        return f

    with torch.inference_mode():
        modes["fp32 eager (reference)"] = timeit(lambda: net(x).argmax(1)[0].numpy())
        net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last_3d)
        x_cl = x.contiguous(memory_format=torch.channels_last_3d)
        modes["fp32 channels-last"] = timeit(lambda: net_cl(x_cl).argmax(1)[0].numpy())
        modes["bf16 autocast + channels-last"] = timeit(autocast_bf16(net_cl, x_cl))
        folded = fold_batchnorm(net).to(memory_format=torch.channels_last_3d)
        modes["BN folded, fp32 channels-last"] = timeit(lambda: folded(x_cl).argmax(1)[0].numpy())
        modes["BN folded, bf16 autocast + channels-last"] = timeit(autocast_bf16(folded, x_cl))
        fused = fuse_for_inference(fold_batchnorm(net))
        fused_cl = to_channels_last(fused)
        modes["BN folded + upsampling fused, fp32 channels-last"] = timeit(lambda: fused_cl(x_cl).argmax(1)[0].numpy())
        if cpu_has_fast_bf16():
            fused_bf = copy.deepcopy(fused_cl).to(torch.bfloat16)
            x_bf = x_cl.to(torch.bfloat16)
            modes["BN folded + upsampling fused, bf16 weights, channels-last (torch default)"] = timeit(
                lambda: fused_bf(x_bf).argmax(1)[0].numpy())
        if openvino_backend.available():
            import openvino as ov
            core = ov.Core()
            for label, model_net in (("BN folded", folded), ("BN folded + upsampling fused", fused)):
                ovm = openvino_backend.convert(copy.deepcopy(model_net), tuple(x.shape), "bench")
                for hint in (["bf16"] if cpu_has_fast_bf16() else []) + ["f32"]:
                    req = core.compile_model(ovm, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
                                             ).create_infer_request()
                    xn = x.numpy()
                    modes[f"OpenVINO {hint}, {label}"] = timeit(lambda: req.infer({0: xn})[0][0])
        else:
            print("openvino is not installed: its rows are left out")
        rec = Reconstructor(tta=False)  # the network pass `kneerecon reconstruct` runs
        modes[f"default path, one pass (--no-tta): {rec.precision}"] = timeit(lambda: rec.predict(vol))
        both = Reconstructor()  # the default: mirror TTA, two passes (labels differ from one pass by design)
        modes[f"default path, mirror TTA (two passes): {both.precision}"] = timeit(lambda: both.predict(vol))
        if all(os.path.exists(p) for p in DEFAULT_ENSEMBLE):
            ens = Reconstructor(ensemble=DEFAULT_ENSEMBLE)
            modes[f"--ensemble (U-Net + ChenNet, probabilities averaged): {ens.precision}"] = timeit(lambda: ens.predict(vol))
        if a.compile:
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True
            t0 = time.perf_counter()
            comp = torch.compile(copy.deepcopy(rec.net))
            xb = x_cl.to(rec.dtype)
            comp(xb)
            print(f"torch.compile build: {time.perf_counter() - t0:.1f} s")
            modes["default path under torch.compile (Inductor, freezing)"] = timeit(lambda: comp(xb).argmax(1)[0].numpy())
    ref = modes["fp32 eager (reference)"][1]
    print(f"{'network forward, 128^3':75s} {'median s':>9s} {'agree w/ fp32':>14s}")
    for k, (t, out) in modes.items():
        print(f"{k:75s} {t:9.3f} {100 * (out == ref).mean():13.3f}%")

    # end to end in a fresh process (so its peak memory is that of a reconstruction alone)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--end-to-end"] + (["--threads", str(a.threads)] if a.threads else []),
                       capture_output=True, text=True, check=True)
    print(r.stdout.strip())
    if a.test_dice:
        test_set_dice(a.test_dice, net)


def test_set_dice(folder: str, net: torch.nn.Module) -> None:
    """Dice of the default path and of the fp32 eager reference over a folder of cached cases,
    and their voxel agreement."""
    import glob

    from KneeReconLib.data.dataset import load_case, make_sample
    from KneeReconLib.evaluation.evaluate import score_labels
    from KneeReconLib.reconstruction.surfaces import clean_labels

    rec = Reconstructor(tta=False)  # one pass: compared with the fp32 eager network voxel by voxel
    fast, ref, agree = [], [], []
    for path in sorted(glob.glob(os.path.join(folder, "*.npz"))):
        case = load_case(path)
        x, truth = make_sample(case)
        with torch.inference_mode():
            raw_ref = net(torch.from_numpy(x)[None]).argmax(1)[0].numpy().astype(np.uint8)
        raw_fast = rec.predict(x)
        agree.append((raw_fast == raw_ref).mean())
        sp = case.grid().spacing[::-1]
        fast.append(score_labels(clean_labels(raw_fast), truth, sp))
        ref.append(score_labels(clean_labels(raw_ref), truth, sp))
    print(f"test set ({len(agree)} cases in {folder}): voxels agreeing with fp32 eager: mean {100 * np.mean(agree):.3f}%, "
          f"min {100 * np.min(agree):.3f}%")
    print(f"test-set Dice, default path ({rec.precision}) vs fp32 eager: " + ", ".join(
        f"{b} {np.mean([r[f'dice_{b}'] for r in fast]):.4f} vs {np.mean([r[f'dice_{b}'] for r in ref]):.4f}"
        for b in BONE_NAMES))


def end_to_end(repeats: int = 3) -> None:
    """Files in to the 8 output files written, model loading included; interpreter start-up and
    imports excluded."""
    with tempfile.TemporaryDirectory() as d:
        ts = []
        for i in range(repeats):
            t0 = time.perf_counter()
            rec = reconstruct(os.path.join(SAMPLE, "ap.nrrd"), os.path.join(SAMPLE, "lateral.nrrd"), side="left")
            report = write_outputs(rec, os.path.join(d, f"o{i}"))
            ts.append(time.perf_counter() - t0)
    print(f"end to end (read, load model, back-project, network, clean-up, surfaces, write 8 files): "
          f"median {np.median(ts):.3f} s over {repeats}; stages of the last run: "
          + ", ".join(f"{k} {v:.3f}" for k, v in report["timings_s"].items()))
    # VmHWM, the high-water mark of this process's own memory map (ru_maxrss would carry over the
    # parent's peak across fork and exec, overstating the figure)
    with open("/proc/self/status") as f:
        hwm = next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), None)
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of that process: {hwm:.0f} MB")


if __name__ == "__main__":
    main()
