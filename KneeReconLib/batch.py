"""`kneerecon reconstruct-batch MANIFEST.csv --output DIR`: many X-ray pairs, resumable.

Manifest columns: `id, ap, lateral` (required) and `side, pixel_spacing, sid, sod` (optional);
relative paths are taken from the manifest's folder. Each case goes to DIR/<id>/ like
`reconstruct`; a case whose folder already holds a report.json is skipped, so an interrupted
run continues where it stopped. DIR/summary.csv lists every case: status, per-bone volumes,
time, the quality verdict (overall and per bone, `ok` or `review`, quality.py) with its reasons,
and the error message of failed cases."""
from __future__ import annotations

import csv
import os
import time
from concurrent.futures import ProcessPoolExecutor

from .errors import KneeReconError
from .labels import BONE_NAMES


def read_manifest(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise KneeReconError(f"manifest {path!r} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise KneeReconError(f"manifest {path!r} has no rows")
    missing = {"id", "ap", "lateral"} - set(rows[0])
    if missing:
        raise KneeReconError(f"manifest {path!r} lacks the column(s) {', '.join(sorted(missing))}")
    ids = [r["id"] for r in rows]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise KneeReconError(f"manifest ids must be unique; repeated: {', '.join(sorted(dup))}")
    for r in rows:
        if not r["id"] or os.sep in r["id"] or r["id"].startswith("."):
            raise KneeReconError(f"manifest id {r['id']!r} is not a usable folder name")
        for k in ("ap", "lateral"):
            r[k] = r[k] if os.path.isabs(r[k]) else os.path.join(base, r[k])
    return rows


def _num(v):
    return float(v) if v not in (None, "") else None


def _one(args) -> dict:
    row, out_root, model, device, threads = args
    import torch

    from .inference import reconstruct
    from .outputs import write_outputs

    if threads:
        torch.set_num_threads(threads)
    out = os.path.join(out_root, row["id"])
    t0 = time.perf_counter()
    res = {"id": row["id"], "status": "ok", "error": "", **{f"{b}_ml": "" for b in BONE_NAMES},
           "quality": "", **{f"{b}_quality": "" for b in BONE_NAMES}, "quality_reasons": ""}
    try:
        rec = reconstruct(row["ap"], row["lateral"], side=row.get("side") or None,
                          pixel_spacing=_num(row.get("pixel_spacing")), sid=_num(row.get("sid")), sod=_num(row.get("sod")),
                          model=model, device=device)
        rep = write_outputs(rec, out, force=True)
        res.update({f"{b}_ml": f"{rep['volumes_ml'][b]:.2f}" for b in BONE_NAMES})
        q = rep.get("quality") or {}
        res.update(quality=q.get("verdict", ""), quality_reasons="; ".join(q.get("reasons", [])),
                   **{f"{b}_quality": q.get("bones", {}).get(b, {}).get("verdict", "") for b in BONE_NAMES})
    except KneeReconError as e:
        res.update(status="error", error=str(e))
    res["time_s"] = f"{time.perf_counter() - t0:.2f}"
    return res


def run_batch(manifest: str, out_root: str, model: str | None = None, device: str = "cpu", workers: int = 1,
              log=print) -> str:
    rows = read_manifest(manifest)
    os.makedirs(out_root, exist_ok=True)
    summary_path = os.path.join(out_root, "summary.csv")
    done = {}
    if os.path.exists(summary_path):
        with open(summary_path, newline="") as f:
            done = {r["id"]: r for r in csv.DictReader(f)}
    todo = [r for r in rows if not (os.path.exists(os.path.join(out_root, r["id"], "report.json"))
                                    and done.get(r["id"], {}).get("status") == "ok")]
    log(f"{len(rows)} cases, {len(rows) - len(todo)} already done, {len(todo)} to run with {workers} worker(s)")
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    jobs = [(r, out_root, model, device, threads) for r in todo]
    fields = (["id", "status", "time_s"] + [f"{b}_ml" for b in BONE_NAMES] + ["quality"]
              + [f"{b}_quality" for b in BONE_NAMES] + ["quality_reasons", "error"])

    def record(res):
        done[res["id"]] = res
        tmp = summary_path + ".tmp"
        with open(tmp, "w", newline="") as f:  # rewritten after every case: an interruption loses nothing
            w = csv.DictWriter(f, fields)
            w.writeheader()
            for r in rows:
                if r["id"] in done:
                    w.writerow({k: done[r["id"]].get(k, "") for k in fields})
        os.replace(tmp, summary_path)
        log(f"{res['id']}: {res['status']} ({res['time_s']} s){' - ' + res['error'] if res['error'] else ''}")

    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as ex:
            for res in ex.map(_one, jobs):
                record(res)
    else:
        for j in jobs:
            record(_one(j))
    return summary_path
