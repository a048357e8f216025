"""Writing a reconstruction's output folder (DESIGN.md): all files land in a temporary folder
beside the target, which is renamed into place only when every file is complete."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import SimpleITK as sitk

from ..core.errors import KneeReconError
from ..io.segfile import write_seg_nrrd
from .inference import Reconstruction
from .overlay import overlay_png, save_png
from .surfaces import write_stl

OUTPUT_FILES = ("labels.nii.gz", "segmentation.seg.nrrd", "femur.stl", "patella.stl", "tibia.stl", "fibula.stl",
                "report.json", "overlay.png")


def check_output_folder(folder: str, force: bool) -> None:
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise KneeReconError(f"output {folder!r} exists and is not a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not force:
        raise KneeReconError(f"output folder {folder!r} already exists and is not empty; use --force to replace it")


TEMP_PREFIX = ".kneerecon-"


def lock_path(folder: str) -> str:
    """The lock file of an output folder: beside it (the folder itself appears only when complete)."""
    folder = os.path.abspath(folder)
    return os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.kneerecon.lock")


@contextmanager
def output_lock(folder: str):
    """Hold an exclusive lock on writing `folder` for the duration; a second process that wants
    the same folder gets KneeReconError at once (exit 2) instead of racing the first one. The
    lock is an flock(2) on a file beside the folder: the kernel drops it when its holder dies,
    even by SIGKILL, so a crash never leaves a folder locked."""
    path = lock_path(folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise KneeReconError(f"another kneerecon process is writing {folder!r} right now; wait for it to "
                                     "finish or choose another --output")
            raise
        # the previous holder may have removed the file between our open and our lock: then our
        # lock is on an orphaned inode, and a newcomer could lock a fresh file; start again
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        try:
            os.remove(path)  # while still holding the lock, so nobody else holds this inode
        except FileNotFoundError:
            pass
        os.close(fd)


def remove_stale_temp(parent: str) -> list[str]:
    """Remove temporary output folders in `parent` left by processes that died (the pid in the
    name is no longer running): a SIGKILL in the middle of `write_outputs` leaves one."""
    removed = []
    if not os.path.isdir(parent):
        return removed
    for name in os.listdir(parent):
        if not name.startswith(TEMP_PREFIX):
            continue
        pid = name[len(TEMP_PREFIX):].split("-")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        path = os.path.join(parent, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def report_dict(rec: Reconstruction, extra_timings: dict | None = None) -> dict:
    card = rec.card
    geo = {}
    for x in (rec.ap, rec.lateral):
        g = x.geometry
        geo[g.view] = {"file": x.info.get("file"), "size_wh": [g.width, g.height], "pixel_spacing_mm": list(g.spacing),
                       "spacing_source": x.info.get("spacing_source"),
                       "beam": "cone" if g.cone else "parallel", "sid_mm": g.sid, "sod_mm": g.sod,
                       "inverted": x.info.get("inverted")}
    return {
        "kneerecon_report_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": card.get("name"), "version": card.get("version"), "file": card.get("file"),
                  "trained_on": card.get("training_data", {}).get("summary") if isinstance(card.get("training_data"), dict) else None},
        "side": rec.side,
        "side_detected_from_fibula": rec.detected_side,
        "input_geometry": geo,
        "grid": rec.grid.to_dict(),
        "volumes_ml": {k: round(v, 3) for k, v in rec.volumes_ml.items()},
        "timings_s": {k: round(v, 4) for k, v in {**rec.timings_s, **(extra_timings or {})}.items()},
        "device": rec.device,
        "precision": getattr(rec, "precision", None),
        # mirror: the bones average the pair and its left-right mirror image (the quality report judges the first)
        "test_time_augmentation": "mirror" if getattr(rec, "tta", False) else None,
        "ensemble": getattr(rec, "ensemble", []),
        "height_offset": getattr(rec, "height_offset", None),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "warnings": list(getattr(rec, "warnings", []) or []),
        "view_check": getattr(rec, "view_check", None) or {},
        "notes": rec.notes,
        "quality": getattr(rec, "quality", None) or {},
        "disclaimer": "Research tool, not a medical device; not validated on clinical radiographs.",
    }


def write_outputs(rec: Reconstruction, folder: str, force: bool = False) -> dict:
    """Write DESIGN.md's files into `folder`; returns the report dict."""
    check_output_folder(folder, force)
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    # the pid in the name lets a later run tell a dead writer's leftovers from a live one's
    tmp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        t = {}
        t0 = time.perf_counter()

        def overlay():  # numpy and Pillow, beside the volume and surface writers
            t1 = time.perf_counter()
            path = os.path.join(tmp, "overlay.png")
            if rec.overlay is not None:  # drawn during the reconstruction (run(overlay=True))
                save_png(rec.overlay, path)
            else:
                overlay_png(rec.ap.pixels, rec.lateral.pixels, rec.labels_array(), rec.grid, rec.ap.geometry,
                            rec.lateral.geometry, path, lateral_offset_mm=rec.lateral_offset_mm)
            return time.perf_counter() - t1
        with ThreadPoolExecutor(max_workers=1) as pool:
            drawn = pool.submit(overlay)
            sitk.WriteImage(rec.labels, os.path.join(tmp, "labels.nii.gz"), True)
            write_seg_nrrd(rec.labels, os.path.join(tmp, "segmentation.seg.nrrd"), rec.side)
            for name, poly in rec.surfaces.items():
                write_stl(poly, os.path.join(tmp, f"{name}.stl"))
            t["write_volumes_surfaces"] = time.perf_counter() - t0
            # an error in the drawing surfaces here, before anything is renamed
            t["write_overlay" if rec.overlay is not None else "overlay"] = drawn.result()
        report = report_dict(rec, t)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
            f.flush()
            os.fsync(f.fileno())  # report.json marks a finished case: it must not be empty after a crash
        if os.path.isdir(folder):
            old = os.path.join(parent, f"{TEMP_PREFIX}{os.getpid()}-old-{os.path.basename(folder)}")
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
        return report
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
