"""`kneerecon evaluate`: the paper's metrics on a test set, printed beside the paper's numbers.

Dice per class (background included) on the reconstruction grid after the same clean-up as
`reconstruct`; Chamfer (symmetric mean nearest-point distance), ASSD and HD95 in mm between
marching-cubes surfaces of prediction and truth; time per case (back-projection + network +
clean-up)."""
from __future__ import annotations

import csv
import glob
import json
import os
import time

import numpy as np

from ..core.errors import KneeReconError
from ..core.labels import BONE_NAMES, BONES
from ..data.dataset import TEST_SEED0, load_case, make_sample, phantom_case
from ..reconstruction.inference import Reconstructor
from ..reconstruction.surfaces import clean_labels
from .metrics import dice_per_class, surface_distances

# Kasten et al. 2020, DRR test set (20 CTs); SSR-KD 2025 (best published knee result).
PAPER = {
    "kasten2020_drr": {"dice": {"background": 0.986, "femur": 0.943, "patella": 0.894, "tibia": 0.945, "fibula": 0.848},
                       "chamfer": {"femur": 1.075, "patella": 1.709, "tibia": 1.175, "fibula": 1.218}},
    "ssr_kd2025": {"dice": {"femur": 0.961, "patella": 0.875, "tibia": 0.960, "fibula": 0.841},
                   "assd": {"femur": 0.80, "patella": 1.12, "tibia": 0.77, "fibula": 1.05}},
}


def _cases(data: list[str], phantoms: int, seed0: int):
    for folder in data:
        paths = sorted(glob.glob(os.path.join(folder, "*.npz")))
        if not paths:
            raise KneeReconError(f"no cached cases (*.npz) in {folder!r}")
        for p in paths:
            yield os.path.basename(p), load_case(p)
    for s in range(seed0, seed0 + phantoms):
        yield f"phantom_{s}", phantom_case(s)


def score_labels(pred: np.ndarray, truth: np.ndarray, spacing_zyx) -> dict:
    """Dice per class and Chamfer/ASSD/HD95 per bone of a label map against the truth (same grid)."""
    d = dice_per_class(pred, truth)
    row = {"dice_background": float(d[0])}
    for b in BONES:
        row[f"dice_{b.name}"] = float(d[b.value])
        for k, v in surface_distances(pred == b.value, truth == b.value, spacing_zyx).items():
            row[f"{k}_{b.name}"] = v
    return row


def evaluate_case(rec: Reconstructor, case) -> dict:
    x, truth = make_sample(case)
    t0 = time.perf_counter()
    pred = clean_labels(rec.predict(x))
    dt = time.perf_counter() - t0
    row = {"time_s": dt, **score_labels(pred, truth, case.grid().spacing[::-1])}
    row["side"] = case.meta.get("side")
    row["flexion_deg"] = case.meta.get("flexion_deg")
    return row


def summarize(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k not in ("case", "side", "flexion_deg")]
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows], float)
        out[k] = {"mean": float(np.nanmean(v)), "sd": float(np.nanstd(v)), "min": float(np.nanmin(v)), "max": float(np.nanmax(v))}
    for m in ("dice", "chamfer", "assd", "hd95"):
        out[f"{m}_bones_avg"] = {"mean": float(np.mean([out[f"{m}_{b}"]["mean"] for b in BONE_NAMES]))}
    return out


def evaluate_model(model: str | None, data: list[str], device: str = "cpu", out_dir: str | None = None,
                   phantoms: int = 0, seed0: int = TEST_SEED0, log=print, amp: bool = True, tta: bool = True,
                   backend: str = "auto", ensemble: list[str] | None = None) -> dict:
    """Per-case and mean Dice/Chamfer/ASSD/HD95 of a model on cached cases and/or fresh test
    phantoms; `amp=False` runs the network in fp32 (the reference the fast path is checked against)."""
    if not data and not phantoms:
        raise KneeReconError("nothing to evaluate: give --data FOLDER and/or --phantoms N")
    rec = Reconstructor(model, device, amp=amp, tta=tta, backend=backend, ensemble=ensemble)
    rows = []
    for name, case in _cases(data, phantoms, seed0):
        row = {"case": name, **evaluate_case(rec, case)}
        rows.append(row)
        log(f"{name}: " + " ".join(f"{b[:3]} {row[f'dice_{b}']:.3f}/{row[f'chamfer_{b}']:.2f}mm" for b in BONE_NAMES))
    res = {"model": rec.model_path, "model_card_name": rec.card.get("name"), "n_cases": len(rows),
           "summary": summarize(rows), "cases": rows, "paper": PAPER}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "evaluation.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(out_dir, "evaluation.json"), "w") as f:
            json.dump(res, f, indent=1)
    return res


def format_table(res: dict) -> str:
    s = res["summary"]
    names = ["background"] + list(BONE_NAMES)
    head = f"{'':22s}" + "".join(f"{n:>11s}" for n in names) + f"{'bones avg':>11s}"
    lines = [f"KneeRecon evaluation on {res['n_cases']} cases (mean over cases)", head]

    def row(label, vals):
        return f"{label:22s}" + "".join(f"{v:>11s}" for v in vals)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines.append(row("Dice (ours)", [fmt(s[f"dice_{n}"]["mean"]) for n in names] + [fmt(s["dice_bones_avg"]["mean"])]))
    lines.append(row("Dice (Kasten 2020)", [fmt(PAPER["kasten2020_drr"]["dice"].get(n)) for n in names] + ["0.907"]))
    lines.append(row("Dice (SSR-KD 2025)", [fmt(PAPER["ssr_kd2025"]["dice"].get(n)) for n in names] + ["-"]))
    for m, label in (("chamfer", "Chamfer mm"), ("assd", "ASSD mm"), ("hd95", "HD95 mm")):
        lines.append(row(f"{label} (ours)", ["-"] + [fmt(s[f"{m}_{n}"]["mean"]) for n in BONE_NAMES] + [fmt(s[f"{m}_bones_avg"]["mean"])]))
        if m == "chamfer":
            lines.append(row("Chamfer mm (Kasten)", ["-"] + [fmt(PAPER["kasten2020_drr"]["chamfer"][n]) for n in BONE_NAMES] + ["1.294"]))
        if m == "assd":
            lines.append(row("ASSD mm (SSR-KD)", ["-"] + [fmt(PAPER["ssr_kd2025"]["assd"][n]) for n in BONE_NAMES] + ["-"]))
    lines.append(f"time per case: {s['time_s']['mean']:.2f} s (network + clean-up)")
    return "\n".join(lines)


def print_table(res: dict) -> None:
    print(format_table(res))


def evaluate_files(model: str | None, case_dirs: list[str], device: str = "cpu", log=print, style: str | None = None,
                   ensemble: list[str] | None = None, backend: str = "auto", refine: int = 1,
                   tta: bool = True) -> list[dict]:
    """Reconstruct X-ray files and compare with a 3D truth by physical coordinates.

    Each folder holds ap.<ext>, lateral.<ext>, truth.nii.gz and optionally meta.json (side).
    The prediction is resampled onto the truth's grid with an identity transform (nearest
    neighbour): a mirrored or shifted frame cannot score well."""
    import SimpleITK as sitk

    from ..reconstruction.inference import reconstruct

    rows = []
    for d in case_dirs:
        def find(stem):
            hits = sorted(glob.glob(os.path.join(d, stem + ".*")))
            if not hits:
                raise KneeReconError(f"{d!r} has no {stem}.* file")
            return hits[0]
        side = None
        if os.path.exists(os.path.join(d, "meta.json")):
            side = json.load(open(os.path.join(d, "meta.json"))).get("side")
        t0 = time.perf_counter()
        rec = reconstruct(find("ap"), find("lateral"), side=side, model=model, device=device, surfaces=False, style=style,
                          ensemble=ensemble, backend=backend, refine=refine, tta=tta)
        dt = time.perf_counter() - t0
        truth = sitk.ReadImage(os.path.join(d, "truth.nii.gz"))
        pred = sitk.Resample(rec.labels, truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        p, t = sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(truth)
        dice = dice_per_class(p, t)
        row = {"case": os.path.basename(os.path.normpath(d)), "side": side, "time_s": dt}
        for b in BONES:
            row[f"dice_{b.name}"] = float(dice[b.value])
            sd = surface_distances(p == b.value, t == b.value, truth.GetSpacing()[::-1])
            row[f"chamfer_{b.name}"] = sd["chamfer"]
            row[f"assd_{b.name}"] = sd["assd"]
        rows.append(row)
        log(f"{row['case']} ({side}): " + " ".join(f"{b[:3]} {row[f'dice_{b}']:.3f}/{row[f'chamfer_{b}']:.2f}mm" for b in BONE_NAMES))
    if len(rows) > 1:
        log(f"mean over {len(rows)} cases: " + " ".join(
            f"{b[:3]} {np.nanmean([r[f'dice_{b}'] for r in rows]):.3f}/{np.nanmean([r[f'chamfer_{b}'] for r in rows]):.2f}mm"
            for b in BONE_NAMES))
    return rows
