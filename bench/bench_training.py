"""Training throughput (issue 8): samples per second of `kneerecon train` at 80^3 crops and at
the full 128^3 grid, the data pipeline alone (is it ever the bottleneck?), and DDP scaling over
torchrun processes. Every figure comes from real `kneerecon train` runs on cached cases. Run:
    python bench/bench_training.py --data cache/val2 [--device cuda] [--steps 30]
(make a small cache first: `kneerecon cache --output cache/val2 --seed 900000 --count 8`)."""
import argparse
import csv
import glob
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def run_train(data: str, steps: int, crop: int, device: str, nproc: int = 1, threads: int = 0, workers: int = 1) -> float:
    """Median samples/s over the logged intervals after the first (warm-up) one."""
    with tempfile.TemporaryDirectory() as out:
        args = ["-m", "KneeReconLib", "train", "--data", data, "--output", out, "--steps", str(steps), "--crop", str(crop),
                "--device", device, "--workers", str(workers), "--log-every", str(max(1, steps // 6)), "--ckpt-every", str(steps),
                "--batch-size", "1", "--threads", str(threads), "--val-every", str(10 * steps)]
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29533"] + args
        else:
            cmd = [sys.executable] + args
        env = {**os.environ, "PYTHONPATH": ROOT}
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        rows = list(csv.DictReader(open(os.path.join(out, "log.csv"))))
        return float(np.median([float(r["samples_per_s"]) for r in rows[1:]] or [float(rows[-1]["samples_per_s"])]))


def pipeline_rate(data: str, n: int, crop: int) -> float:
    """Samples/s that one data-loading process produces (load, augment, back-project, crop, weights)."""
    from KneeReconLib.training.train import TrainConfig, TrainSamples

    ds = TrainSamples(TrainConfig(data=[data], crop=(crop,) * 3 if crop else None), sorted(glob.glob(os.path.join(data, "*.npz"))))
    ds[0]
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        ds[i]
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=30)
    a = p.parse_args()
    cores = os.cpu_count()
    print(f"{cores} cores, device {a.device}, batch 1, bf16 autocast, channels-last")
    for crop in (80, 0):
        print(f"data pipeline alone, one process, {'full 128^3' if crop == 0 else f'{crop}^3 crops'}: "
              f"{pipeline_rate(a.data, 10, crop):.2f} samples/s")
    for crop, steps in ((80, a.steps), (0, max(6, a.steps // 3))):
        s = run_train(a.data, steps, crop, a.device)
        print(f"kneerecon train, {'full 128^3' if crop == 0 else f'{crop}^3 crops'}, 1 process, 1 loader worker: {s:.2f} samples/s")
    if a.device == "cpu" and cores >= 2:
        one = run_train(a.data, a.steps, 80, "cpu", nproc=1, threads=cores, workers=0)
        two = run_train(a.data, a.steps, 80, "cpu", nproc=2, threads=max(1, cores // 2), workers=0)
        print(f"DDP scaling, 80^3 crops, in-process loading: 1 process x {cores} threads {one:.2f} samples/s; "
              f"2 processes x {max(1, cores // 2)} threads (torchrun, gloo) {two:.2f} samples/s (x{two / one:.2f})")


if __name__ == "__main__":
    main()
