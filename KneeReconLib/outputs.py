"""Writing a reconstruction's output folder (DESIGN.md): all files land in a temporary folder
beside the target, which is renamed into place only when every file is complete."""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time

import SimpleITK as sitk

from .errors import KneeReconError
from .inference import Reconstruction
from .overlay import overlay_png
from .segfile import write_seg_nrrd
from .surfaces import write_stl

OUTPUT_FILES = ("labels.nii.gz", "segmentation.seg.nrrd", "femur.stl", "patella.stl", "tibia.stl", "fibula.stl",
                "report.json", "overlay.png")


def check_output_folder(folder: str, force: bool) -> None:
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise KneeReconError(f"output {folder!r} exists and is not a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not force:
        raise KneeReconError(f"output folder {folder!r} already exists and is not empty; use --force to replace it")


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
        "ensemble": getattr(rec, "ensemble", []),
        "height_offset": getattr(rec, "height_offset", None),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        "notes": rec.notes,
        "quality": rec.quality,
        "disclaimer": "Research tool, not a medical device; not validated on clinical radiographs.",
    }


def write_outputs(rec: Reconstruction, folder: str, force: bool = False) -> dict:
    """Write DESIGN.md's files into `folder`; returns the report dict."""
    check_output_folder(folder, force)
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".kneerecon-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        t = {}
        t0 = time.perf_counter()
        sitk.WriteImage(rec.labels, os.path.join(tmp, "labels.nii.gz"), True)
        write_seg_nrrd(rec.labels, os.path.join(tmp, "segmentation.seg.nrrd"), rec.side)
        for name, poly in rec.surfaces.items():
            write_stl(poly, os.path.join(tmp, f"{name}.stl"))
        t["write_volumes_surfaces"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        overlay_png(rec.ap.pixels, rec.lateral.pixels, rec.labels_array(), rec.grid, rec.ap.geometry,
                    rec.lateral.geometry, os.path.join(tmp, "overlay.png"), lateral_offset_mm=rec.lateral_offset_mm)
        t["overlay"] = time.perf_counter() - t0
        report = report_dict(rec, t)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        if os.path.isdir(folder):
            old = folder + ".old-" + str(os.getpid())
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
        return report
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
