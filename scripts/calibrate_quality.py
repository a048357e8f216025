"""Calibrate the quality report's thresholds (KneeReconLib/reconstruction/quality.py, QualityConfig) and measure
how well its verdict finds bad bones.

Each case is reconstructed by the bundled model the way `kneerecon reconstruct` does (both X-rays,
their geometry, the side), the quality measurements are taken, and every bone is scored against the
truth (Dice, by physical coordinates). A bone is bad below Dice 0.8 and good above 0.92.

  # 1. measure: calibration cases from LLP26 TRAINING subjects and procedural phantoms
  kneerecon cache --source llp26 --subjects train --geometry mixed --seed 6000000 --count 20 --output cache/cal_llp26
  kneerecon cache --seed 2000000 --count 16 --geometry mixed --output cache/cal_proc
  python scripts/calibrate_quality.py measure --data cache/llp_train --limit 35 --out cache/quality_cal_a1.json
  python scripts/calibrate_quality.py measure --data cache/proc_train --limit 36 --out cache/quality_cal_a2.json
  python scripts/calibrate_quality.py measure --broken --data cache/cal_llp26 cache/cal_proc --out cache/quality_cal_b.json
  # 2. held-out cases: LLP26 subjects 5, 10, 15, 20 (scripts/cross_subject.py build) and the contract-check knees
  python scripts/calibrate_quality.py measure --broken --data cache/xs_parallel cache/xs_cone \\
      --case-dirs ../shared/contract-check/knee_a ../shared/contract-check/knee_b --out cache/quality_heldout.json
  # 3. thresholds from the calibration cases only, then the rates on both sets
  python scripts/calibrate_quality.py fit --cal cache/quality_cal_a1.json cache/quality_cal_a2.json \\
      cache/quality_cal_b.json --heldout cache/quality_heldout.json

`fit` prints the thresholds (to be written into QualityConfig's defaults; `--defaults` scores the
current defaults instead) and the detection rate (bad bones flagged) and false-alarm rate (good
bones flagged) with those thresholds, for the reconstructions as they came and for the
deliberately broken ones (`--broken`: one bone moved by BROKEN's millimetres) apart.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import replace

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from KneeReconLib.core.labels import BONE_NAMES  # noqa: E402
from KneeReconLib.reconstruction.quality import QualityConfig, judge  # noqa: E402

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


# deliberately broken reconstructions: one bone moved (mm along x, y, z of LPS) in the label map, the
# failures seen on knees from other sources ("a fibula displaced by several mm"); scored like the rest
BROKEN = {"fibula": (5.0, 0.0, 0.0), "patella": (0.0, -5.0, 0.0), "tibia": (4.0, 0.0, 0.0)}


def _moved(labels: np.ndarray, grid, bone: str, mm) -> np.ndarray:
    from scipy.ndimage import shift

    v = BONE_NAMES.index(bone) + 1
    out = labels.copy()
    out[out == v] = 0
    m = shift((labels == v).astype(np.uint8), [mm[2] / grid.spacing[2], mm[1] / grid.spacing[1], mm[0] / grid.spacing[0]],
              order=0) > 0
    out[m & (out == 0)] = v
    return out


def _broken_rows(name: str, r, truth_img) -> list[dict]:
    """One row per broken variant; only the moved bone is scored (the others are the real rows')."""
    from KneeReconLib.reconstruction.quality import assess

    rows = []
    lab = r.labels_array()
    for bone, mm in BROKEN.items():
        moved = _moved(lab, r.grid, bone, mm)
        q = assess(moved, r.grid, r.ap, r.lateral, r.lateral_offset_mm)
        fake = type("R", (), {"labels": r.grid.to_image(moved)})
        dice = {b: (_score(fake, truth_img)[b] if b == bone else float("nan")) for b in BONE_NAMES}
        rows.append({"case": f"{name} [{bone} moved {max(abs(x) for x in mm):g} mm]", "dice": dice, "quality": q,
                     "broken": bone})
    return rows


def measure(data: list[str], case_dirs: list[str], out: str, broken: bool = False, limit: int | None = None) -> None:
    from KneeReconLib.data.dataset import load_case
    from KneeReconLib.io.xray_io import XRay
    from KneeReconLib.reconstruction.inference import Reconstructor, reconstruct

    rec = Reconstructor()
    rows = []
    for folder in data:
        for p in sorted(glob.glob(os.path.join(folder, "*.npz")))[:limit]:
            case = load_case(p)
            side = case.meta.get("side") or "right"
            r = rec.run(XRay(case.ap, case.ap_geom), XRay(case.lateral, case.lat_geom), side, surfaces=False)
            truth = case.grid().to_image(case.labels)
            rows.append({"case": p, "dice": _score(r, truth), "quality": r.quality})
            print(os.path.basename(p), {b: round(d, 3) for b, d in rows[-1]["dice"].items()}, r.quality["verdict"],
                  flush=True)
            if broken:
                rows += _broken_rows(p, r, truth)
    for d in case_dirs:
        import SimpleITK as sitk

        meta = json.load(open(os.path.join(d, "meta.json"))) if os.path.exists(os.path.join(d, "meta.json")) else {}
        find = lambda stem: sorted(glob.glob(os.path.join(d, stem + ".*")))[0]  # noqa: E731
        r = reconstruct(find("ap"), find("lateral"), side=meta.get("side"), surfaces=False)
        truth = sitk.ReadImage(os.path.join(d, "truth.nii.gz"))
        rows.append({"case": d, "dice": _score(r, truth), "quality": r.quality})
        print(d, {b: round(x, 3) for b, x in rows[-1]["dice"].items()}, r.quality["verdict"], flush=True)
        if broken:
            rows += _broken_rows(d, r, truth)
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


def _features(m: dict) -> dict:
    """The numbers a threshold acts on, from one bone's measurements."""
    f = {}
    for i, v in enumerate(("ap", "lateral")):
        o = m["outline"].get(v)
        f[f"agreement_{v}"] = o["agreement"] if o else None
        shifted = o is not None and np.hypot(*o["best_shift_mm"]) > QualityConfig().max_offset_mm
        f[f"gain_{v}"] = (o["best_agreement"] - o["agreement"]) if shifted else (0.0 if o else None)
    f["margin"] = m.get("confidence_margin")
    f["fragments"] = m.get("fragment_fraction")
    f["cs_low"] = f["cs_high"] = m.get("cross_section_cm2")
    f["vol_low"] = f["vol_high"] = m.get("volume_ml") or None
    return f


# feature -> True where a LOW value is bad (a lower bound), False where a HIGH value is bad
DIRECTION = {"agreement_ap": True, "agreement_lateral": True, "gain_ap": False, "gain_lateral": False, "margin": True,
             "fragments": False, "cs_low": True, "cs_high": False, "vol_low": True, "vol_high": False}


def _flags(vals, t, low_is_bad):
    return np.array([v is not None and (v < t if low_is_bad else v > t) for v in vals])


def fit(rows: list[dict], z: float = 2.6, min_reference: int = 15, min_rho: float = 0.25) -> QualityConfig:
    """Thresholds from calibration rows, per bone. The reference bones are the good ones (Dice >
    0.92), or, where fewer than `min_reference` of them (the bundled model rarely gets the patella
    and the fibula there), the bone's top quarter by Dice; bad bones have Dice < 0.8. A test is a
    feature that follows Dice in this bone's cases (rank correlation of the right sign, at least
    `min_rho`) with its bound `z` standard deviations into the reference bones' tail; tests are
    taken greedily, the one flagging most bad bones not yet flagged first, while any flags more.
    The size ranges are the non-bad bones' range, 0.6 x its smallest to 1.5 x its largest: a
    sanity check (sizes depend on the field of view too), not tuned further; outline agreements
    and margins without a test get the same kind of floor (0.6 x the non-bad bones' smallest)."""
    cfg = QualityConfig()
    per_bone = {}
    for bone in BONE_NAMES:
        rs = [(d, _features(m)) for b, d, m in _bones(rows) if b == bone]
        d = np.array([x[0] for x in rs])
        ref = d > GOOD
        if ref.sum() < min_reference:
            ref = d >= np.quantile(d, 0.75)
        bad = d < BAD
        ref &= ~bad
        vals = {k: [f[k] for _, f in rs] for k in DIRECTION}
        # a test only from a feature that follows Dice in this bone's cases (rank correlation of
        # the right sign, |rho| >= min_rho): a threshold in the tail of an unrelated number would
        # pick out bad bones of these cases by chance
        usable = []
        for k, low in DIRECTION.items():
            if k.startswith(("cs_", "vol_")):
                continue  # sizes depend on the field of view too: adult ranges only, not tuned to these cases
            ok = [i for i, v in enumerate(vals[k]) if v is not None]
            if len(ok) > 5 and len({vals[k][i] for i in ok}) > 2:
                rho = spearmanr([vals[k][i] for i in ok], d[ok]).statistic
                if np.isfinite(rho) and (rho if low else -rho) >= min_rho:
                    usable.append(k)
        ok_vals = lambda k: [v for v, b in zip(vals[k], bad) if v is not None and not b]  # noqa: E731
        chosen = {"cs_low": min(ok_vals("cs_low")) * 0.6, "cs_high": max(ok_vals("cs_high")) * 1.5,
                  "vol_low": min(ok_vals("vol_low")) * 0.6, "vol_high": max(ok_vals("vol_high")) * 1.5}
        # each test's bound in the reference bones' tail: mean -/+ z standard deviations (z = 2.6: 0.5% of
        # a normal distribution on each test), estimated, not placed between two calibration values
        # (with 10-40 reference bones that would fit these very cases); a test is kept only if it
        # flags a bad bone that the others miss
        flagged = np.zeros(len(d), bool)
        for k, t in chosen.items():
            flagged |= _flags(vals[k], t, DIRECTION[k])
        tests = {}
        for k in usable:
            r = np.array([v for v, ok in zip(vals[k], ref) if ok and v is not None], float)
            if len(r) >= 5:
                tests[k] = float(r.mean() - z * r.std(ddof=1)) if DIRECTION[k] else float(r.mean() + z * r.std(ddof=1))
        for _ in range(len(tests)):
            gains = {k: int((_flags(vals[k], t, DIRECTION[k]) & bad & ~flagged).sum()) for k, t in tests.items()
                     if k not in chosen}
            if not gains or max(gains.values()) == 0:
                break
            k = max(gains, key=gains.get)
            chosen[k] = tests[k]
            flagged |= _flags(vals[k], tests[k], DIRECTION[k])
        # where no test was calibrated, a sanity floor as for the sizes: 0.6 x the smallest value of
        # the bone's non-bad reconstructions (an outline on no edge at all, a network unsure everywhere)
        for k in ("agreement_ap", "agreement_lateral", "margin"):
            v = ok_vals(k)
            if k not in chosen and v and min(v) > 0:
                chosen[k] = 0.6 * min(v)
        per_bone[bone] = chosen
        print(f"{bone}: usable {', '.join(usable)}")
        print(f"{bone}: reference {int(ref.sum())} bones (Dice >= {d[ref].min():.3f}), bad {int(bad.sum())}; tests "
              + ", ".join(f"{k} {'<' if DIRECTION[k] else '>'} {t:.3f}" for k, t in chosen.items()))

    def get(bone, k, default):
        return round(float(per_bone[bone][k]), 3) if k in per_bone[bone] else default
    return replace(
        cfg,
        min_outline={b: (get(b, "agreement_ap", -1.0), get(b, "agreement_lateral", -1.0)) for b in BONE_NAMES},
        min_offset_gain={b: (get(b, "gain_ap", 2.0), get(b, "gain_lateral", 2.0)) for b in BONE_NAMES},
        min_margin={b: get(b, "margin", 0.0) for b in BONE_NAMES},
        max_fragment_fraction={b: get(b, "fragments", 0.5) for b in BONE_NAMES},  # 0.5: a sanity bound
        cross_section_cm2={b: (round(per_bone[b]["cs_low"], 2), round(per_bone[b]["cs_high"], 2)) for b in BONE_NAMES},
        volume_ml={b: (round(per_bone[b]["vol_low"], 1), round(per_bone[b]["vol_high"], 1)) for b in BONE_NAMES})


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
    m.add_argument("--limit", type=int, help="the first N cases of each folder (name order)")
    m.add_argument("--broken", action="store_true", help="also score deliberately broken reconstructions (BROKEN)")
    f = sub.add_parser("fit")
    f.add_argument("--cal", nargs="+", required=True, help="measure's outputs of the calibration cases")
    f.add_argument("--heldout", nargs="*", default=[], help="measure's outputs of the held-out cases")
    f.add_argument("--z", type=float, default=2.6, help="each bound this many standard deviations into the reference "
                                                        "bones' tail (2.6: 0.5%% of a normal distribution per test)")
    f.add_argument("--defaults", action="store_true", help="report the rates of QualityConfig's defaults instead of fitting")
    a = p.parse_args(argv)
    if a.cmd == "measure":
        measure(a.data, a.case_dirs, a.out, a.broken, a.limit)
        return 0
    cal = [r for path in a.cal for r in json.load(open(path))]
    cfg = QualityConfig() if a.defaults else fit(cal, a.z)
    print("thresholds:", json.dumps({k: v for k, v in cfg.to_dict().items()}))
    sets = [("calibration", cal)]
    if a.heldout:
        sets.append(("held-out", [r for path in a.heldout for r in json.load(open(path))]))
    for name, rows in sets:
        real = [r for r in rows if "broken" not in r]
        broken = [r for r in rows if "broken" in r]
        _print_rates(f"{name}: {len(real)} reconstructions as they came", rates(real, cfg))
        verdicts = [judge({b: r["quality"]["bones"][b] for b in BONE_NAMES}, cfg)["verdict"] for r in real]
        print(f"  verdict 'review' on {verdicts.count('review')} of {len(real)} knees")
        if broken:
            _print_rates(f"{name}: {len(broken)} deliberately broken (one bone moved, BROKEN)", rates(broken, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
