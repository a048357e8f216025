"""Calibrate the quality report's thresholds (KneeReconLib/quality.py, QualityConfig) and measure
how well its verdict finds bad bones.

Each case is reconstructed by the bundled model the way `kneerecon reconstruct` does (both X-rays,
their geometry, the side), the quality measurements are taken, and every bone is scored against the
truth (Dice, by physical coordinates). A bone is bad below Dice 0.8 and good above 0.92.

  # 1. measure: calibration cases from LLP26 TRAINING subjects and procedural phantoms
  kneerecon cache --source llp26 --subjects train --geometry mixed --seed 6000000 --count 20 --output cache/cal_llp26
  kneerecon cache --seed 2000000 --count 16 --geometry mixed --output cache/cal_proc
  python scripts/calibrate_quality.py measure --data cache/cal_llp26 cache/cal_proc --out cache/quality_cal.json
  # 2. held-out cases: LLP26 subjects 5, 10, 15, 20 (scripts/cross_subject.py build) and the contract-check knees
  python scripts/calibrate_quality.py measure --data cache/xs_parallel cache/xs_cone \\
      --case-dirs ../shared/contract-check/knee_a ../shared/contract-check/knee_b --out cache/quality_heldout.json
  # 3. thresholds from the calibration cases only, then the rates on both sets
  python scripts/calibrate_quality.py fit --cal cache/quality_cal.json --heldout cache/quality_heldout.json

`fit` prints the thresholds (to be written into QualityConfig's defaults) and the detection rate
(bad bones flagged) and false-alarm rate (good bones flagged) with those thresholds.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from KneeReconLib.labels import BONE_NAMES  # noqa: E402
from KneeReconLib.quality import QualityConfig, judge  # noqa: E402

BAD, GOOD = 0.80, 0.92


def _dice(pred, truth, value: int) -> float:
    p, t = pred == value, truth == value
    s = p.sum() + t.sum()
    return float(2 * (p & t).sum() / s) if s else float("nan")


def _score(rec, truth_img) -> dict:
    import SimpleITK as sitk

    pred = sitk.GetArrayFromImage(sitk.Resample(rec.labels, truth_img, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8))
    truth = sitk.GetArrayFromImage(truth_img)
    return {b: _dice(pred, truth, i + 1) for i, b in enumerate(BONE_NAMES)}


def measure(data: list[str], case_dirs: list[str], out: str) -> None:
    from KneeReconLib.dataset import load_case
    from KneeReconLib.inference import Reconstructor, reconstruct
    from KneeReconLib.xray_io import XRay

    rec = Reconstructor()
    rows = []
    for folder in data:
        for p in sorted(glob.glob(os.path.join(folder, "*.npz"))):
            case = load_case(p)
            side = case.meta.get("side") or "right"
            r = rec.run(XRay(case.ap, case.ap_geom), XRay(case.lateral, case.lat_geom), side, surfaces=False)
            rows.append({"case": p, "dice": _score(r, case.grid().to_image(case.labels)), "quality": r.quality})
            print(os.path.basename(p), {b: round(d, 3) for b, d in rows[-1]["dice"].items()}, r.quality["verdict"],
                  flush=True)
    for d in case_dirs:
        import SimpleITK as sitk

        meta = json.load(open(os.path.join(d, "meta.json"))) if os.path.exists(os.path.join(d, "meta.json")) else {}
        find = lambda stem: sorted(glob.glob(os.path.join(d, stem + ".*")))[0]  # noqa: E731
        r = reconstruct(find("ap"), find("lateral"), side=meta.get("side"), surfaces=False)
        rows.append({"case": d, "dice": _score(r, sitk.ReadImage(os.path.join(d, "truth.nii.gz"))), "quality": r.quality})
        print(d, {b: round(x, 3) for b, x in rows[-1]["dice"].items()}, r.quality["verdict"], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=0)
    print(f"{len(rows)} cases -> {out}")


def _bones(rows: list[dict]):
    """(bone, dice, measured numbers) for every bone of every case."""
    for r in rows:
        for b in BONE_NAMES:
            if not np.isnan(r["dice"][b]):
                yield b, r["dice"][b], r["quality"]["bones"][b]


def fit(rows: list[dict], false_alarm: float) -> QualityConfig:
    """Thresholds from calibration rows: each bound at the `false_alarm` quantile of the good
    bones' values (so each test alone flags about that share of good bones); the size ranges are
    the good bones' range widened by 30% (a wrong size is rare, so these are loose)."""
    good = [(b, m) for b, d, m in _bones(rows) if d > GOOD]

    def values(bone, get):
        return [v for b, m in good if b == bone for v in [get(m)] if v is not None]

    def q(vals, p, default):
        return round(float(np.quantile(vals, p)), 3) if vals else default

    def outline(view, key):
        def get(m):
            o = m["outline"].get(view)
            if o is None:
                return None
            return o["agreement"] if key == "agreement" else o["best_agreement"] - o["agreement"]
        return get

    cfg = QualityConfig()
    min_outline = {b: tuple(q(values(b, outline(v, "agreement")), false_alarm, -1.0) for v in ("ap", "lateral"))
                   for b in BONE_NAMES}
    gain = {b: tuple(q(values(b, outline(v, "gain")), 1 - false_alarm, 1.0) for v in ("ap", "lateral"))
            for b in BONE_NAMES}
    margin = {b: q(values(b, lambda m: m.get("confidence_margin")), false_alarm, 0.0) for b in BONE_NAMES}
    frag = max(q(values(b, lambda m: m.get("fragment_fraction")), 1 - false_alarm, 0.0) for b in BONE_NAMES)

    def widened(key):
        out = {}
        for b in BONE_NAMES:
            v = values(b, lambda m: m.get(key))
            out[b] = (round(min(v) * 0.7, 1), round(max(v) * 1.3, 1)) if v else getattr(cfg, key if key != "volume_ml" else "volume_ml")[b]
        return out

    return replace(cfg, min_outline=min_outline, min_offset_gain=gain, min_margin=margin,
                   max_fragment_fraction=max(frag, 0.05), volume_ml=widened("volume_ml"),
                   cross_section_cm2=widened("cross_section_cm2"))


def rates(rows: list[dict], cfg: QualityConfig) -> dict:
    """Detection rate (bad bones flagged) and false-alarm rate (good bones flagged), per bone and all."""
    out = {}
    flagged = []
    for r in rows:
        q = judge({b: {k: v for k, v in r["quality"]["bones"][b].items() if k not in ("verdict", "reasons")}
                   for b in BONE_NAMES}, cfg)
        for b in BONE_NAMES:
            if not np.isnan(r["dice"][b]):
                flagged.append((b, r["dice"][b], q["bones"][b]["verdict"] == "review", r["case"]))
    for name in list(BONE_NAMES) + ["all"]:
        sel = [f for f in flagged if name in ("all", f[0])]
        bad = [f for f in sel if f[1] < BAD]
        good = [f for f in sel if f[1] > GOOD]
        out[name] = {"bad": len(bad), "detected": sum(f[2] for f in bad), "good": len(good),
                     "false_alarms": sum(f[2] for f in good),
                     "middle": len(sel) - len(bad) - len(good), "middle_flagged": sum(f[2] for f in sel if BAD <= f[1] <= GOOD)}
    return out


def _print_rates(title: str, res: dict) -> None:
    print(title)
    for name, r in res.items():
        det = f"{r['detected']}/{r['bad']} = {r['detected'] / r['bad']:.0%}" if r["bad"] else "-"
        fa = f"{r['false_alarms']}/{r['good']} = {r['false_alarms'] / r['good']:.0%}" if r["good"] else "-"
        print(f"  {name:8s} detection (Dice < {BAD}) {det:>14s}   false alarms (Dice > {GOOD}) {fa:>14s}   "
              f"flagged in between {r['middle_flagged']}/{r['middle']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--data", nargs="*", default=[])
    m.add_argument("--case-dirs", nargs="*", default=[])
    m.add_argument("--out", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--cal", required=True)
    f.add_argument("--heldout")
    f.add_argument("--false-alarm", type=float, default=0.02, help="quantile of the good bones per lower bound")
    f.add_argument("--defaults", action="store_true", help="report the rates of QualityConfig's defaults instead of fitting")
    a = p.parse_args(argv)
    if a.cmd == "measure":
        measure(a.data, a.case_dirs, a.out)
        return 0
    cal = json.load(open(a.cal))
    cfg = QualityConfig() if a.defaults else fit(cal, a.false_alarm)
    print("thresholds:", json.dumps({k: v for k, v in cfg.to_dict().items()}))
    _print_rates(f"calibration cases ({len(cal)}):", rates(cal, cfg))
    if a.heldout:
        held = json.load(open(a.heldout))
        _print_rates(f"held-out cases ({len(held)}):", rates(held, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
