"""Batches survive faults: SIGKILL in the middle of a case and a restart, two writers of one
output folder, and shards that together cover a manifest exactly once."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import ROOT, SAMPLE
from KneeReconLib.cli import main
from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.reconstruction.batch import merge_shards, read_manifest, shard_of
from KneeReconLib.reconstruction.outputs import OUTPUT_FILES


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _cli(*argv):
    return [sys.executable, "-m", "KneeReconLib.cli", *argv]


def _manifest(folder, ids):
    shutil.copy(os.path.join(SAMPLE, "ap.nrrd"), folder / "ap.nrrd")
    shutil.copy(os.path.join(SAMPLE, "lateral.nrrd"), folder / "lat.nrrd")
    m = folder / "manifest.csv"
    m.write_text("id,ap,lateral,side\n" + "".join(f"{i},ap.nrrd,lat.nrrd,left\n" for i in ids))
    return m


def _complete(case_dir):
    return sorted(os.listdir(case_dir)) == sorted(OUTPUT_FILES) and json.load(open(case_dir / "report.json"))


def _summary(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sigkill_mid_case_then_resume(tmp_path):
    ids = ["k1", "k2", "k3"]
    m = _manifest(tmp_path, ids)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("reconstruct-batch", str(m), "--output", str(out)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mid_write = False
    t_first = time.time()
    try:
        t_end = time.time() + 600
        while time.time() < t_end and proc.poll() is None:
            rows = _summary(out / "summary.csv") if (out / "summary.csv").exists() else []
            if rows:  # the first case is done: kill during the next one, ideally while its files are written
                temps = [f for f in os.listdir(out) if f.startswith(".kneerecon-")]
                if temps or time.time() > t_first + 60:
                    mid_write = bool(temps)
                    break
            else:
                t_first = time.time()
            time.sleep(0.005)
        assert proc.poll() is None, "the batch ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # after the kill: every case folder present is complete, the summary lists only finished cases
    finished = [i for i in ids if (out / i).is_dir()]
    for i in finished:
        assert _complete(out / i), i
    rows = _summary(out / "summary.csv")
    assert [r["id"] for r in rows] == finished[: len(rows)] and all(r["status"] == "ok" for r in rows)
    assert len(finished) < len(ids)
    interrupted = ids[len(finished)]
    stamps = {i: os.path.getmtime(out / i / "report.json") for i in finished}
    # restart: finished cases skipped, the interrupted one (and the rest) done, nothing left over
    r = subprocess.run(_cli("reconstruct-batch", str(m), "--output", str(out)), env=_env(), capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert f"{len(finished)} already done" in r.stdout
    if mid_write:
        assert "removed 1 unfinished temporary folder" in r.stdout
    rows = _summary(out / "summary.csv")
    assert [x["id"] for x in rows] == ids and all(x["status"] == "ok" for x in rows)
    for i in ids:
        assert _complete(out / i)
    assert all(os.path.getmtime(out / i / "report.json") == stamps[i] for i in finished)
    assert (out / interrupted / "report.json").exists()
    assert sorted(os.listdir(out)) == sorted(ids + ["summary.csv"])


def test_two_writers_of_one_folder(tmp_path):
    out = tmp_path / "o"
    argv = _cli("reconstruct", "--ap", os.path.join(SAMPLE, "ap.nrrd"), "--lateral", os.path.join(SAMPLE, "lateral.nrrd"),
                "--side", "left", "--output", str(out))
    procs = [subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    res = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    codes = sorted(r[2] for r in res)
    assert codes == [0, 2], res
    loser = next(r for r in res if r[2] == 2)
    assert "another kneerecon process is writing" in loser[1] or "already exists" in loser[1]
    assert "Traceback" not in loser[1]
    assert _complete(out)
    assert sorted(os.listdir(tmp_path)) == ["o"]  # no temporary folder, no lock file


@settings(max_examples=30, deadline=None, database=None)
@given(ids=st.lists(st.text(alphabet="abcdefghijk0123456789_-", min_size=1, max_size=12), min_size=1, max_size=200,
                    unique=True), n=st.integers(1, 12))
def test_shards_partition_any_manifest(ids, n):
    shards = [[i for i in ids if shard_of(i, n) == k] for k in range(1, n + 1)]
    assert sorted(sum(shards, [])) == sorted(ids)  # every case in exactly one shard
    assert all(shard_of(i, n) == shard_of(i, n) for i in ids)  # deterministic


def test_three_shards_cover_the_manifest_once(tmp_path, capsys):
    """Three shard runs (cases whose files are missing fail fast: no network needed) and a merge."""
    ids = [f"case{i:03d}" for i in range(30)]
    m = tmp_path / "m.csv"
    m.write_text("id,ap,lateral\n" + "".join(f"{i},missing_ap.nrrd,missing_lat.nrrd\n" for i in ids))
    out = tmp_path / "out"
    for k in (1, 2, 3):
        assert main(["reconstruct-batch", str(m), "--output", str(out), "--shard", f"{k}/3"]) == 0
    parts = [_summary(out / f"summary-{k}-of-3.csv") for k in (1, 2, 3)]
    assert all(parts) and sum(len(p) for p in parts) == 30
    seen = [r["id"] for p in parts for r in p]
    assert sorted(seen) == ids and len(set(seen)) == 30
    # the same shard twice gives the same share
    assert main(["reconstruct-batch", str(m), "--output", str(tmp_path / "again"), "--shard", "2/3"]) == 0
    assert [r["id"] for r in _summary(tmp_path / "again" / "summary-2-of-3.csv")] == [r["id"] for r in parts[1]]
    capsys.readouterr()
    assert main(["merge-batch", "--output", str(out), "--manifest", str(m)]) == 0
    assert "merged 3 shard summaries" in capsys.readouterr().out
    merged = _summary(out / "summary.csv")
    assert [r["id"] for r in merged] == ids and all(r["status"] == "error" for r in merged)
    # a missing shard and a case in two shards are refused
    os.remove(out / "summary-3-of-3.csv")
    with pytest.raises(KneeReconError, match="missing for shard"):
        merge_shards(str(out), str(m))
    shutil.copy(out / "summary-1-of-3.csv", out / "summary-3-of-3.csv")
    with pytest.raises(KneeReconError, match="belongs to shard|in the summaries of shards"):
        merge_shards(str(out), str(m))


def test_second_batch_on_same_shard_exits(tmp_path):
    from KneeReconLib.reconstruction.outputs import output_lock

    m = tmp_path / "m.csv"
    m.write_text("id,ap,lateral\na,x.nrrd,y.nrrd\n")
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(str(out / "summary.csv")):  # as a running batch holds it
        r = subprocess.run(_cli("reconstruct-batch", str(m), "--output", str(out)), env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert r.returncode == 2 and "another kneerecon process" in r.stderr
    assert read_manifest(str(m))[0]["id"] == "a"
