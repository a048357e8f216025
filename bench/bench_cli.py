"""Whole-command wall time of `kneerecon reconstruct` on the bundled sample, as a user sees it:
each run a fresh process (interpreter start, imports, model loading, all outputs written), the
default path (OpenVINO, no PyTorch imported) beside the PyTorch path (`--backend torch`), runs
interleaved so that background load falls on both alike. Prints every run, the median wall
time, the median CPU time (user + system, all threads: on a machine shared with other work it
shows what the command itself costs) and the peak resident memory (the child's own high-water
mark, from wait4).

    python bench/bench_cli.py [--repeats 7] [--no-torch] [--python-path DIR] [--baseline DIR]

`--python-path DIR` puts DIR first on PYTHONPATH (e.g. another checkout, to compare versions);
by default the command runs `python -m KneeReconLib` with this interpreter and this checkout.
`--baseline DIR` adds the default path of another checkout (e.g. `git archive` of an earlier
commit unpacked there), interleaved with the others, so that before and after see the same load.
The benchmark itself imports nothing heavy, so its own memory does not inflate the children's."""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SAMPLE = os.path.join(ROOT, "Resources", "Sample")


def run_once(cmd: list[str], env: dict, cwd: str) -> tuple[float, float, float, int, str]:
    """(wall s, CPU s (user + system), peak RSS GB, exit code, stderr tail) of one fresh process.
    `cwd`: a neutral folder (`python -m` puts the working folder first on sys.path, before PYTHONPATH)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1e6, proc.returncode, err.decode(errors="replace")[-400:]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="runs per path (default 7)")
    p.add_argument("--no-torch", action="store_true", help="only the default path")
    p.add_argument("--python-path", help="put this folder first on PYTHONPATH (another checkout)")
    p.add_argument("--baseline", metavar="DIR", help="also the default path of the checkout in DIR, interleaved")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--variant", action="append", default=[], metavar="ARGS",
                   help="also the default path with these extra arguments (e.g. --variant=--no-tta), interleaved")
    p.add_argument("--cold", action="store_true", help="no warm-up run, and an empty cache of compiled networks "
                   "for the first run (what a fresh installation's first reconstruction costs)")
    a = p.parse_args()
    side = json.load(open(os.path.join(SAMPLE, "meta.json")))["side"]

    def env_for(path):
        env = dict(os.environ)
        env["PYTHONPATH"] = path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # an installed package has its modules compiled (pip does it); without this a checkout whose
        # environment sets PYTHONDONTWRITEBYTECODE recompiles ~30 modules on every run (~0.07 s)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        return env

    env = env_for(a.python_path or ROOT)
    out = tempfile.mkdtemp(prefix="bench-cli-")
    base = [sys.executable, "-m", "KneeReconLib", "reconstruct", "--ap", os.path.join(SAMPLE, "ap.nrrd"),
            "--lateral", os.path.join(SAMPLE, "lateral.nrrd"), "--side", side, "--force"]
    paths = {"default (OpenVINO, no torch)": ([], env)}  # label -> (extra arguments, environment)
    if not a.no_torch:
        paths["--backend torch"] = (["--backend", "torch"], env)
    for v in a.variant:
        paths[f"default {v}"] = (v.split(), env)
    if a.baseline:
        paths[f"baseline default ({os.path.basename(os.path.normpath(a.baseline))})"] = ([], env_for(os.path.abspath(a.baseline)))
    results = {k: [] for k in paths}
    try:
        if a.cold:
            for _, e in paths.values():
                e["KNEERECON_CACHE"] = os.path.join(out, "cache")
        else:  # one warm-up run each (file cache, OpenVINO's compiled-network cache), not counted
            for k, (extra, e) in paths.items():
                run_once(base + extra + ["--output", os.path.join(out, "warm")], e, out)
        for i in range(a.repeats):
            for k, (extra, e) in paths.items():
                wall, cpu, peak, rc, err = run_once(base + extra + ["--output", os.path.join(out, f"r{i}")], e, out)
                if rc != 0:
                    sys.exit(f"{k}: exit {rc}\n{err}")
                results[k].append((wall, cpu, peak))
                print(f"run {i + 1:2d}  {k:34s} {wall:6.2f} s wall, {cpu:5.2f} s CPU, peak {peak:.2f} GB", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n`kneerecon reconstruct` on the bundled sample, fresh process each run, {a.repeats} runs, "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load average "
          f"{os.getloadavg()[0]:.1f} (at the end), nice {os.nice(0)}:")
    summary = {}
    for k, rows in results.items():
        walls = [w for w, _, _ in rows]
        summary[k] = {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
                      "cpu_median_s": statistics.median(c for _, c, _ in rows),
                      "peak_gb": max(m for _, _, m in rows), "runs_s": walls}
        print(f"  {k:34s} median {summary[k]['median_s']:.2f} s wall (min {min(walls):.2f}, max {max(walls):.2f}), "
              f"median {summary[k]['cpu_median_s']:.2f} s CPU, peak memory {summary[k]['peak_gb']:.2f} GB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
