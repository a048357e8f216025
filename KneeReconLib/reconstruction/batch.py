"""`kneerecon reconstruct-batch MANIFEST.csv --output DIR`: many X-ray pairs, resumable.

Manifest columns: `id, ap, lateral` (required) and `side, pixel_spacing, sid, sod` (optional);
relative paths are taken from the manifest's folder. Each case goes to DIR/<id>/ like
`reconstruct`; DIR/summary.csv lists every case: status, quality verdict and reasons, per-bone
volumes, time, and the error message of failed cases.

Faults: a case folder appears only when complete (written to a temporary folder, renamed into
place), and the summary is rewritten atomically after every case. So a batch killed at any
moment, even by SIGKILL, leaves finished case folders, at most one temporary folder (removed by
the next run, since its writer is dead) and a summary that lists finished cases only. The next
run skips every case whose folder holds a report.json (a case that finished after the last
summary write is taken into the summary from its report.json, not redone), redoes the
interrupted and the failed ones. One batch at a time per summary: a second run into the same
folder and shard exits at once (a lock held by the first).

Cohorts larger than a machine: `--shard K/N` runs the cases whose id hashes to shard K
(sha256 of the id, modulo N): the same case always lands in the same shard, whatever the
manifest's order and however it grows, and a cluster scheduler (SLURM array jobs, Kubernetes
indexed jobs) runs the N shards with no coordinator. Shard K writes DIR/summary-K-of-N.csv;
`kneerecon merge-batch --output DIR [--manifest M]` checks that the shards cover the manifest
exactly once and writes DIR/summary.csv.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from ..core.errors import KneeReconError
from ..core.labels import BONE_NAMES
from ..io.fileio import atomic_path
from ..io.validation import DISTANCE_MM, PIXEL_MM, optional_number

FIELDS = (["id", "status", "quality", "time_s"] + [f"{b}_ml" for b in BONE_NAMES] + [f"{b}_quality" for b in BONE_NAMES]
          + ["quality_reasons", "warnings", "error"])


@dataclass
class BatchConfig:
    """How `run_batch` reconstructs: the model and runtime, parallel workers, which shard."""

    model: str | None = None
    device: str = "cpu"
    workers: int = 1
    shard: tuple[int, int] | None = None  # (K, N), K = 1..N
    views_as_given: bool = False
    tta: bool = True  # mirror test-time augmentation (reconstruct --tta)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'K/N' -> (K, N) with 1 <= K <= N; None for no sharding."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise KneeReconError(f"--shard must look like K/N (e.g. 2/8), got {text!r}")
    k, n = int(m.group(1)), int(m.group(2))
    if not 1 <= n <= 100_000 or not 1 <= k <= n:
        raise KneeReconError(f"--shard K/N needs 1 <= K <= N <= 100000, got {text!r} (K counts from 1)")
    return k, n


def shard_of(case_id: str, n: int) -> int:
    """The shard (1..n) of a case: from its id alone, so it is stable under reordering and growth."""
    return int(hashlib.sha256(case_id.encode("utf-8")).hexdigest()[:16], 16) % n + 1


def summary_name(shard: tuple[int, int] | None) -> str:
    return "summary.csv" if shard is None else f"summary-{shard[0]}-of-{shard[1]}.csv"


def read_manifest(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise KneeReconError(f"manifest {path!r} does not exist")
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise KneeReconError(f"manifest {path!r} is not a readable CSV file ({e})")
    if not rows:
        raise KneeReconError(f"manifest {path!r} has no rows")
    missing = {"id", "ap", "lateral"} - set(rows[0])
    if missing:
        raise KneeReconError(f"manifest {path!r} lacks the column(s) {', '.join(sorted(missing))}")
    ids = [r["id"] for r in rows]
    seen, dup = set(), set()
    for i in ids:
        (dup if i in seen else seen).add(i)
    if dup:
        raise KneeReconError(f"manifest ids must be unique; repeated: {', '.join(sorted(dup))}")
    for r in rows:
        if not r["id"] or os.sep in r["id"] or r["id"].startswith(".") or r["id"].startswith("summary"):
            raise KneeReconError(f"manifest id {r['id']!r} is not a usable folder name")
        for k in ("ap", "lateral"):
            if not r.get(k):
                raise KneeReconError(f"manifest row {r['id']!r} has no {k} file")
            r[k] = r[k] if os.path.isabs(r[k]) else os.path.join(base, r[k])
    return rows


def _case_args(row: dict) -> dict:
    """The manifest row's optional cells, checked like the command line's options."""
    side = (row.get("side") or "").strip() or None
    if side not in (None, "left", "right"):
        raise KneeReconError(f"side must be left or right, got {side!r}")
    return {"side": side, "pixel_spacing": optional_number(row.get("pixel_spacing"), "pixel_spacing", PIXEL_MM),
            "sid": optional_number(row.get("sid"), "sid", DISTANCE_MM),
            "sod": optional_number(row.get("sod"), "sod", DISTANCE_MM)}


def _from_report(report: dict, case_id: str, time_s: str = "") -> dict:
    q = report.get("quality") or {}
    return {"id": case_id, "status": "ok", "quality": q.get("verdict", ""), "time_s": time_s,
            **{f"{b}_ml": f"{report['volumes_ml'][b]:.2f}" for b in BONE_NAMES},
            **{f"{b}_quality": q.get("bones", {}).get(b, {}).get("verdict", "") for b in BONE_NAMES},
            "quality_reasons": "; ".join(q.get("reasons", [])), "warnings": "; ".join(report.get("warnings", [])),
            "error": ""}


def _one(args) -> dict:
    row, out_root, cfg, threads = args
    from .inference import reconstruct
    from .outputs import output_lock, write_outputs

    if threads:  # the OpenVINO runtime takes its threads from openvino_backend.threads_from_env(); torch only where loaded
        import sys
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
    out = os.path.join(out_root, row["id"])
    t0 = time.perf_counter()
    res = {k: "" for k in FIELDS}
    res.update(id=row["id"], status="ok")
    try:
        with output_lock(out):
            rec = reconstruct(row["ap"], row["lateral"], model=cfg.model, device=cfg.device,
                              views_as_given=cfg.views_as_given, tta=cfg.tta, overlay=True, **_case_args(row))
            rep = write_outputs(rec, out, force=True)
        res.update(_from_report(rep, row["id"]))
    except KneeReconError as e:
        res.update(status="error", error=str(e))
    except Exception as e:  # noqa: BLE001 - one broken case must not end a batch of thousands
        res.update(status="error", error=f"internal error: {type(e).__name__}: {str(e)[:300]}")
    res["time_s"] = f"{time.perf_counter() - t0:.2f}"
    return res


def _read_summary(path: str) -> dict[str, dict]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, newline="") as f:
            return {r["id"]: r for r in csv.DictReader(f) if r.get("id")}
    except (csv.Error, UnicodeDecodeError, KeyError):
        return {}  # rebuilt below from the case folders' report.json files


def _write_summary(path: str, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in FIELDS})


def _finished(out_root: str, case_id: str) -> dict | None:
    """The report of a finished case folder, or None."""
    p = os.path.join(out_root, case_id, "report.json")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_batch(manifest: str, out_root: str, config: BatchConfig | None = None, log=print) -> tuple[str, list[dict]]:
    """Reconstruct the manifest's cases (this shard's share) into `out_root`; returns the summary
    path and its rows."""
    from .outputs import output_lock, remove_stale_temp

    cfg = config or BatchConfig()
    rows = read_manifest(manifest)
    if cfg.shard:
        k, n = cfg.shard
        rows = [r for r in rows if shard_of(r["id"], n) == k]
    os.makedirs(out_root, exist_ok=True)
    summary_path = os.path.join(out_root, summary_name(cfg.shard))
    with output_lock(summary_path):
        stale = remove_stale_temp(out_root)
        if stale:
            log(f"removed {len(stale)} unfinished temporary folder(s) of an interrupted run")
        old = _read_summary(summary_path)
        done = {}
        for r in rows:
            rep = _finished(out_root, r["id"])
            if rep is None:
                continue
            prev = old.get(r["id"], {})
            # a finished folder is kept; its summary row comes from its own report when the summary
            # was not written after it (killed in between)
            done[r["id"]] = prev if prev.get("status") == "ok" else _from_report(rep, r["id"])
        for cid, prev in old.items():  # failed cases stay listed until they are retried
            if cid not in done and prev.get("status") == "error" and any(r["id"] == cid for r in rows):
                done[cid] = prev
        todo = [r for r in rows if done.get(r["id"], {}).get("status") != "ok"]
        shard = f" (shard {cfg.shard[0]} of {cfg.shard[1]})" if cfg.shard else ""
        log(f"{len(rows)} cases{shard}, {len(rows) - len(todo)} already done, {len(todo)} to run with "
            f"{cfg.workers} worker(s)")
        order = [r["id"] for r in rows]

        def record(res):
            done[res["id"]] = res
            _write_summary(summary_path, [done[i] for i in order if i in done])  # after every case: a kill loses nothing
            extra = f" - {res['error']}" if res["error"] else (f" - review: {res['quality_reasons']}"
                                                               if res["quality"] == "review" else "")
            log(f"{res['id']}: {res['status']}{' / ' + res['quality'] if res['quality'] else ''} ({res['time_s']} s){extra}")

        _write_summary(summary_path, [done[i] for i in order if i in done])
        threads = max(1, (os.cpu_count() or 1) // max(1, cfg.workers))
        jobs = [(r, out_root, cfg, threads) for r in todo]
        if cfg.workers > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(cfg.workers) as ex:
                for res in ex.map(_one, jobs):
                    record(res)
        else:
            for j in jobs:
                record(_one(j))
        return summary_path, [done[i] for i in order if i in done]


def merge_shards(out_root: str, manifest: str | None = None) -> tuple[str, dict]:
    """Merge DIR/summary-K-of-N.csv (K = 1..N) into DIR/summary.csv; with `manifest`, check that
    every case is in exactly the shard its id says, and order the rows as the manifest does."""
    files = glob.glob(os.path.join(out_root, "summary-*-of-*.csv"))
    shards = {}
    for f in files:
        m = re.fullmatch(r"summary-(\d+)-of-(\d+)\.csv", os.path.basename(f))
        if m:
            shards[(int(m.group(1)), int(m.group(2)))] = f
    if not shards:
        raise KneeReconError(f"no shard summaries (summary-K-of-N.csv) in {out_root!r}")
    ns = {n for _, n in shards}
    if len(ns) > 1:
        raise KneeReconError(f"{out_root!r} holds summaries of different shard counts ({', '.join(map(str, sorted(ns)))}); "
                             "merge one sharding at a time")
    n = ns.pop()
    missing = [k for k in range(1, n + 1) if (k, n) not in shards]
    if missing:
        raise KneeReconError(f"shard summaries missing for shard(s) {', '.join(map(str, missing))} of {n}: run them first")
    merged: dict[str, dict] = {}
    where: dict[str, int] = {}
    for (k, _), f in sorted(shards.items()):
        with open(f, newline="") as fh:
            for r in csv.DictReader(fh):
                if r["id"] in merged:
                    raise KneeReconError(f"case {r['id']!r} is in the summaries of shards {where[r['id']]} and {k}")
                if shard_of(r["id"], n) != k:
                    raise KneeReconError(f"case {r['id']!r} is in shard {k}'s summary but belongs to shard "
                                         f"{shard_of(r['id'], n)} of {n}")
                merged[r["id"]], where[r["id"]] = r, k
    order = sorted(merged)
    if manifest:
        ids = [r["id"] for r in read_manifest(manifest)]
        extra = sorted(set(merged) - set(ids))
        if extra:
            raise KneeReconError(f"{len(extra)} case(s) in the shard summaries are not in the manifest, e.g. {extra[0]!r}")
        absent = [i for i in ids if i not in merged]
        if absent:
            raise KneeReconError(f"{len(absent)} case(s) of the manifest are in no shard summary, e.g. {absent[0]!r} "
                                 f"(shard {shard_of(absent[0], n)}): rerun that shard")
        order = ids
    path = os.path.join(out_root, "summary.csv")
    _write_summary(path, [merged[i] for i in order])
    status: dict[str, int] = {}
    for r in merged.values():
        key = r.get("status", "") if r.get("status") != "ok" else ("ok / " + (r.get("quality") or "?"))
        status[key] = status.get(key, 0) + 1
    return path, {"shards": n, "cases": len(merged), "status": dict(sorted(status.items()))}
