"""Fit the quality report's settings (KneeReconLib/reconstruction/quality.py) for one model file and
measure how well its verdict finds bad bones; writes them beside the model (`<model stem>.quality.json`,
which the pipeline loads with that model).

One command does it all, resumable (every reconstruction and every case's measurements are cached
per model checksum under --cache, so a rerun redoes only what changed):

  kneerecon cache --source llp26 --subjects train --geometry mixed --seed 6000000 --count 40 --output cache/q_cal_llp26
  kneerecon cache --geometry mixed --seed 2000000 --count 30 --output cache/q_cal_proc
  python scripts/calibrate_quality.py all --model Resources/Models/kneerecon_unet.pt \\
      --cal cache/q_cal_llp26 cache/q_cal_proc --heldout cache/xs_parallel cache/xs_cone \\
      --heldout-case-dirs ../shared/contract-check/knee_a ../shared/contract-check/knee_b --cache cache/q_recon

Stages (`all` runs them in turn; each can be run alone with the same options):
- reconstruct: every case by the model as `kneerecon reconstruct` does it (both X-rays, their
  geometry, the side), plus the thorough report's perturbed second pass; cached: the label maps,
  the network's raw labels and class-probability margins, the images, the Dice per bone against
  the truth (by physical coordinates);
- measure: the quality measurements of each cached reconstruction, and of deliberately broken
  copies (`BROKEN`: one bone moved 4-5 mm, the failure seen on knees from other software);
- fit (calibration cases only): the rules' bounds (as before: each a few standard deviations into
  the good bones' tail) and per bone a logistic score of the measurements (quality.score_features)
  for "Dice < 0.8", its review cut-off chosen on the calibration cases' cross-validated scores;
  then the detection rate (bad bones flagged) and false-alarm rate (good bones flagged) on the
  calibration and the held-out cases, as they came and broken, written into the file and printed.

A bone is bad below Dice 0.8 and good above 0.92. The held-out cases are never used for fitting.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from KneeReconLib.core.labels import BONE_NAMES  # noqa: E402
from KneeReconLib.reconstruction import quality  # noqa: E402
from KneeReconLib.reconstruction.quality import QualityConfig, judge  # noqa: E402

BAD, GOOD = 0.80, 0.92
HERE = os.path.dirname(os.path.abspath(__file__))


def _dice(pred, truth, value: int) -> float:
    p, t = pred == value, truth == value
    s = p.sum() + t.sum()
    return float(2 * (p & t).sum() / s) if s else float("nan")


def _score_labels(labels: np.ndarray, grid, truth_img) -> dict:
    import SimpleITK as sitk

    pred = sitk.GetArrayFromImage(sitk.Resample(grid.to_image(labels), truth_img, sitk.Transform(),
                                                sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
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


# ----------------------------------------------------------------------------- the cases
def _cases(data: list[str], case_dirs: list[str]) -> list[tuple[str, str]]:
    """(key, source) of every case: cached .npz cases of `data` folders, then case folders (ap.*,
    lateral.*, truth.nii.gz, meta.json with the side)."""
    out = []
    for folder in data:
        for p in sorted(glob.glob(os.path.join(folder, "*.npz"))):
            out.append((f"{os.path.basename(os.path.normpath(folder))}__{os.path.splitext(os.path.basename(p))[0]}", p))
    for d in case_dirs:
        out.append((f"dir__{os.path.basename(os.path.normpath(d))}", d))
    return out


def _load(source: str):
    """(AP XRay, lateral XRay, side, truth image) of one case."""
    import SimpleITK as sitk

    from KneeReconLib.data.dataset import load_case
    from KneeReconLib.io.xray_io import XRay, read_xray

    if source.endswith(".npz"):
        case = load_case(source)
        side = case.meta.get("side") or "right"
        return XRay(case.ap, case.ap_geom), XRay(case.lateral, case.lat_geom), side, case.grid().to_image(case.labels)
    meta_path = os.path.join(source, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    side = meta.get("side") or "right"
    find = lambda stem: sorted(glob.glob(os.path.join(source, stem + ".*")))[0]  # noqa: E731
    return (read_xray(find("ap"), "ap", side=side), read_xray(find("lateral"), "lateral", side=side), side,
            sitk.ReadImage(os.path.join(source, "truth.nii.gz")))


def model_info(model: str) -> dict:
    from KneeReconLib.models.model_card import reconstruction_card
    from KneeReconLib.models.openvino_backend import file_sha256

    card = reconstruction_card(model)
    return {"name": card.get("name"), "version": card.get("version"), "sha256": file_sha256(model),
            "file": os.path.basename(model)}


def _cache_dir(cache: str, info: dict) -> str:
    d = os.path.join(cache, info["sha256"][:12])
    os.makedirs(d, exist_ok=True)
    return d


def _geom_json(g) -> str:
    return json.dumps({"view": g.view, "width": g.width, "height": g.height, "spacing": list(g.spacing), "sid": g.sid,
                       "sod": g.sod, "side": g.side})


def reconstruct_cases(model: str, cases: list[tuple[str, str]], cache: str) -> None:
    """Reconstruct every case not yet in the cache (see the module docstring)."""
    from KneeReconLib.reconstruction.inference import Reconstructor

    d = _cache_dir(cache, model_info(model))
    todo = [(k, s) for k, s in cases if not os.path.exists(os.path.join(d, k + ".npz"))]
    print(f"reconstruct: {len(cases) - len(todo)} of {len(cases)} cases cached in {d}", flush=True)
    if not todo:
        return
    rec = Reconstructor(model)
    rec.keep_quality_inputs = True
    for key, source in todo:
        ap, lat, side, truth = _load(source)
        r = rec.run(ap, lat, side, surfaces=False, quality_mode="thorough")
        qi = r.quality_inputs
        lab = r.labels_array()
        dice = _score_labels(lab, r.grid, truth)
        g, rg = r.grid, qi["raw_grid"]
        tmp = os.path.join(d, key + ".tmp.npz")
        # labels: the output (its Dice says good or bad); judged: what the report measures (with
        # mirror TTA the unmirrored pass, Reconstructor.run)
        np.savez_compressed(tmp, labels=lab, judged=qi["labels"], raw=qi["raw"], raw2=qi["raw2"], margin=qi["margin"],
                            ap=r.ap.pixels.astype(np.float32), lateral=r.lateral.pixels.astype(np.float32),
                            info=json.dumps({"source": source, "side": side, "dice": dice,
                                             "grid": [list(g.shape), list(g.spacing), list(g.origin)],
                                             "raw_grid": [list(rg.shape), list(rg.spacing), list(rg.origin)],
                                             "lateral_offset_mm": r.lateral_offset_mm,
                                             "ap_geom": _geom_json(r.ap.geometry),
                                             "lat_geom": _geom_json(r.lateral.geometry)}))
        os.replace(tmp, os.path.join(d, key + ".npz"))  # a killed run leaves no half case
        print(key, {b: round(x, 3) for b, x in dice.items()}, flush=True)


# ----------------------------------------------------------------------------- measurements
def _quality_version() -> str:
    """Changes whenever quality.py changes: cached measurements of older code are redone."""
    return hashlib.sha256(open(quality.__file__, "rb").read()).hexdigest()[:12]


def _measure_one(path: str, broken: bool) -> list[dict]:
    from KneeReconLib.core.geometry import ReconGrid, ViewGeometry
    from KneeReconLib.io.xray_io import XRay

    with np.load(path) as z:
        info = json.loads(str(z["info"]))
        arr = {k: z[k] for k in ("labels", "raw", "raw2", "margin", "ap", "lateral")}
        judged = z["judged"] if "judged" in z.files else arr["labels"]  # caches before TTA: the same
    grid = ReconGrid(*(tuple(v) for v in info["grid"]))
    raw_grid = ReconGrid(*(tuple(v) for v in info["raw_grid"]))
    geo = {k: ViewGeometry(**{**json.loads(info[k]), "spacing": tuple(json.loads(info[k])["spacing"])})
           for k in ("ap_geom", "lat_geom")}
    ap, lat = XRay(arr["ap"], geo["ap_geom"]), XRay(arr["lateral"], geo["lat_geom"])
    cfg = QualityConfig()
    cons = quality.consistency(arr["raw"], arr["raw2"], cfg.perturb_shift_voxels)
    q = quality.assess(judged, grid, ap, lat, info["lateral_offset_mm"], arr["raw"], raw_grid, None, cfg,
                       margin=arr["margin"], consistency_dice=cons)
    rows = [{"case": info["source"], "dice": info["dice"], "quality": q}]
    if broken:
        truth = _load(info["source"])[3]
        for bone, mm in BROKEN.items():
            moved = _moved(judged, grid, bone, mm)
            qb = quality.assess(moved, grid, ap, lat, info["lateral_offset_mm"])  # no network numbers: it did not make them
            dice = {b: (_score_labels(moved, grid, truth)[b] if b == bone else float("nan")) for b in BONE_NAMES}
            rows.append({"case": f"{info['source']} [{bone} moved {max(abs(x) for x in mm):g} mm]", "dice": dice,
                         "quality": qb, "broken": bone})
    return rows


def measure_cases(model: str, cases: list[tuple[str, str]], cache: str, broken: bool = True) -> list[dict]:
    """Measurement rows of the cases (cached per case and quality.py version)."""
    d = _cache_dir(cache, model_info(model))
    ver = _quality_version()
    rows = []
    for key, _ in cases:
        out = os.path.join(d, f"{key}.rows-{ver}{'-b' if broken else ''}.json")
        if not os.path.exists(out):
            part = _measure_one(os.path.join(d, key + ".npz"), broken)
            with open(out + ".tmp", "w") as f:
                json.dump(part, f)
            os.replace(out + ".tmp", out)
        rows += json.load(open(out))
    return rows


# ----------------------------------------------------------------------------- fitting
def _bones(rows: list[dict]):
    """(bone, dice, measured numbers) for every bone of every case."""
    for r in rows:
        for b in BONE_NAMES:
            if not np.isnan(r["dice"][b]):
                yield b, r["dice"][b], r["quality"]["bones"][b]


def _rule_features(m: dict) -> dict:
    """The numbers a rule acts on, from one bone's measurements."""
    f = {}
    for v in ("ap", "lateral"):
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


def fit_rules(rows: list[dict], z: float = 2.6, min_reference: int = 15, min_rho: float = 0.25) -> QualityConfig:
    """The rules' bounds from calibration rows, per bone (unchanged method). The reference bones
    are the good ones (Dice > 0.92), or, where fewer than `min_reference`, the bone's top quarter
    by Dice; bad bones have Dice < 0.8. A test is a feature that follows Dice in this bone's cases
    (rank correlation of the right sign, at least `min_rho`) with its bound `z` standard
    deviations into the reference bones' tail; tests are taken greedily, the one flagging most
    bad bones not yet flagged first, while any flags more. The size ranges are the non-bad
    bones' range, 0.6 x its smallest to 1.5 x its largest: a sanity check (sizes depend on the
    field of view too); outline agreements and margins without a test get the same kind of floor."""
    from scipy.stats import spearmanr

    cfg = QualityConfig()
    per_bone = {}
    for bone in BONE_NAMES:
        rs = [(d, _rule_features(m)) for b, d, m in _bones(rows) if b == bone]
        d = np.array([x[0] for x in rs])
        ref = d > GOOD
        if ref.sum() < min_reference:
            ref = d >= np.quantile(d, 0.75)
        bad = d < BAD
        ref &= ~bad
        vals = {k: [f[k] for _, f in rs] for k in DIRECTION}
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
        for k in ("agreement_ap", "agreement_lateral", "margin"):
            v = ok_vals(k)
            if k not in chosen and v and min(v) > 0:
                chosen[k] = 0.6 * min(v)
        per_bone[bone] = chosen
        print(f"{bone}: rules " + ", ".join(f"{k} {'<' if DIRECTION[k] else '>'} {t:.3f}" for k, t in chosen.items()))

    def get(bone, k, default):
        return round(float(per_bone[bone][k]), 3) if k in per_bone[bone] else default
    return replace(
        cfg,
        min_outline={b: (get(b, "agreement_ap", -1.0), get(b, "agreement_lateral", -1.0)) for b in BONE_NAMES},
        min_offset_gain={b: (get(b, "gain_ap", 2.0), get(b, "gain_lateral", 2.0)) for b in BONE_NAMES},
        min_margin={b: get(b, "margin", 0.0) for b in BONE_NAMES},
        max_fragment_fraction={b: get(b, "fragments", 0.5) for b in BONE_NAMES},
        cross_section_cm2={b: (round(per_bone[b]["cs_low"], 2), round(per_bone[b]["cs_high"], 2)) for b in BONE_NAMES},
        volume_ml={b: (round(per_bone[b]["vol_low"], 1), round(per_bone[b]["vol_high"], 1)) for b in BONE_NAMES})


# the combined score's candidate inputs (quality.score_features), per bone the set whose cross-validated
# scores find more bad bones (fit_scores); "consistency" only in the thorough model
OUTLINE_MARGIN = ["agreement_ap", "agreement_lateral", "margin", "interior_margin"]
SCORE_FEATURES = OUTLINE_MARGIN + ["ends_ap", "ends_lateral", "grow_ap", "grow_lateral", "shrink_ap", "shrink_lateral",
                                   "log_cross_section"]
CANDIDATES = {"outline+margin": OUTLINE_MARGIN, "all": SCORE_FEATURES}


def _matrix(ms: list[dict], names: list[str]):
    """Feature matrix (NaN where not measured)."""
    return np.array([[np.nan if (v := quality.score_features(m).get(n)) is None else v for n in names] for m in ms], float)


def _logistic(X: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression (Newton's method) on standardised X; the intercept is not
    penalised."""
    n, p = X.shape
    A = np.hstack([np.ones((n, 1)), X])
    w = np.zeros(p + 1)
    pen = np.full(p + 1, lam)
    pen[0] = 0.0
    for _ in range(50):
        mu = 1.0 / (1.0 + np.exp(-np.clip(A @ w, -30, 30)))
        g = A.T @ (mu - y) + pen * w
        H = (A * (mu * (1 - mu))[:, None]).T @ A + np.diag(pen + 1e-9)
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[1:], float(w[0])


def _standardise(X: np.ndarray):
    mean = np.nanmean(X, axis=0)
    sd = np.nanstd(X, axis=0)
    sd = np.where(sd > 1e-9, sd, 1.0)
    Z = (X - mean) / sd
    return np.nan_to_num(Z, nan=0.0), mean, sd


def _fit_score(X: np.ndarray, y: np.ndarray, names: list[str], lam: float) -> dict:
    Z, mean, sd = _standardise(X)
    coef, b0 = _logistic(Z, y, lam)
    return {"features": names, "mean": [round(float(v), 5) for v in mean], "scale": [round(float(v), 5) for v in sd],
            "coef": [round(float(v), 4) for v in coef], "intercept": round(b0, 4)}


def _cv_scores(X, y, names, lam, groups, folds: int = 5) -> np.ndarray:
    """Out-of-fold scores: the knees split into `folds` groups (a knee's bones stay together)."""
    out = np.zeros(len(y))
    ug = sorted(set(groups))
    for f in range(folds):
        test = np.array([ug.index(g) % folds == f for g in groups])
        if y[~test].sum() == 0 or y[~test].sum() == (~test).sum():
            out[test] = y[~test].mean()
            continue
        model = _fit_score(X[~test], y[~test], names, lam)
        out[test] = [_apply(model, X[i]) for i in np.nonzero(test)[0]]
    return out


def _apply(model: dict, x: np.ndarray) -> float:
    z = model["intercept"] + sum(0.0 if np.isnan(v) else c * (v - mu) / sd
                                 for v, mu, sd, c in zip(x, model["mean"], model["scale"], model["coef"]))
    return float(1.0 / (1.0 + np.exp(-np.clip(z, -50, 50))))


def _cut_off(cv: np.ndarray, ref: np.ndarray, max_false_alarms: float) -> float:
    """The lowest cut-off at which at most `max_false_alarms` of the reference bones score at or
    above it (never below 0.2: no review on a low probability)."""
    for c in np.sort(np.unique(np.round(cv, 3))):
        if (cv[ref] >= c).mean() <= max_false_alarms:
            return max(float(c), 0.2)
    return 1.0


def fit_scores(rows: list[dict], thorough: bool, lam: float = 3.0, max_false_alarms: float = 0.05) -> dict:
    """Per bone, the logistic score of "Dice < 0.8" on the calibration cases as they came (not the
    broken ones: the rules find those) and its review cut-off: the lowest at which at most
    `max_false_alarms` of the reference bones (Dice > 0.92; where fewer than 10, the not-bad
    bones' top quarter by Dice) would have been flagged by the cross-validated scores (5 folds of
    whole knees), so that the cut-off is not tuned to the very scores it was fitted on. The
    inputs: per bone the candidate set (CANDIDATES, + consistency when `thorough`) whose
    cross-validated scores flag more bad bones at their cut-off (the smaller set on a tie)."""
    out = {}
    real = [r for r in rows if "broken" not in r]
    for bone in BONE_NAMES:
        sel = [(r["case"], r["dice"][bone], r["quality"]["bones"][bone]) for r in real
               if not np.isnan(r["dice"][bone]) and r["quality"]["bones"][bone]["volume_ml"]]
        d = np.array([s[1] for s in sel])
        y = (d < BAD).astype(float)
        if y.sum() < 3 or (1 - y).sum() < 3:
            print(f"{bone}: {int(y.sum())} bad of {len(y)}: no score fitted")
            continue
        ref = d > GOOD
        if ref.sum() < 10:
            ok = d[d >= BAD]
            ref = d >= np.quantile(ok, 0.75) if len(ok) else ref
        best = None
        for cname, names in CANDIDATES.items():
            names = names + (["consistency"] if thorough else [])
            X = _matrix([s[2] for s in sel], names)
            cv = _cv_scores(X, y, names, lam, [s[0] for s in sel])
            cut = _cut_off(cv, ref, max_false_alarms)
            det = int((cv[y == 1] >= cut).sum())
            print(f"{bone}: {cname}{' + consistency' if thorough else ''}: cross-validated {det}/{int(y.sum())} bad "
                  f"flagged, {int((cv[ref] >= cut).sum())}/{int(ref.sum())} reference flagged at cut-off {cut:.3f}")
            if best is None or det > best[0]:
                best = (det, names, X, cut)
        det, names, X, cut = best
        model = _fit_score(X, y, names, lam)
        model["cutoff"] = round(cut, 3)
        out[bone] = model
        print(f"{bone}: score on {len(y)} bones ({int(y.sum())} bad, {int(ref.sum())} reference), cut-off {cut:.3f}; "
              "coefficients " + ", ".join(f"{n} {c:+.2f}" for n, c in zip(names, model["coef"])))
    return out


def fit(rows: list[dict], z: float = 2.6, lam: float = 3.0) -> QualityConfig:
    cfg = fit_rules(rows, z)
    return replace(cfg, score=fit_scores(rows, False, lam), score_thorough=fit_scores(rows, True, lam))


# ----------------------------------------------------------------------------- rates
def _rejudge(r: dict, cfg: QualityConfig, thorough: bool) -> dict:
    bones = {}
    for b in BONE_NAMES:
        m = {k: v for k, v in r["quality"]["bones"][b].items() if k not in ("verdict", "reasons", "score")}
        if not thorough:
            m.pop("consistency_dice", None)
        bones[b] = m
    return judge(bones, cfg)


def rates(rows: list[dict], cfg: QualityConfig, thorough: bool = False) -> dict:
    """Detection rate (bad bones flagged) and false-alarm rate (good bones flagged), per bone and
    all, and the knees with a 'review' verdict."""
    out = {}
    flagged = []
    knees = 0
    for r in rows:
        q = _rejudge(r, cfg, thorough)
        knees += q["verdict"] == "review"
        for b in BONE_NAMES:
            if not np.isnan(r["dice"][b]):
                flagged.append((b, r["dice"][b], q["bones"][b]["verdict"] == "review"))
    for name in list(BONE_NAMES) + ["all"]:
        sel = [f for f in flagged if name in ("all", f[0])]
        bad = [f for f in sel if f[1] < BAD]
        good = [f for f in sel if f[1] > GOOD]
        out[name] = {"bad": len(bad), "detected": sum(f[2] for f in bad), "good": len(good),
                     "false_alarms": sum(f[2] for f in good), "middle": len(sel) - len(bad) - len(good),
                     "middle_flagged": sum(f[2] for f in sel if BAD <= f[1] <= GOOD),
                     "bad_0.6_0.8": sum(1 for f in bad if f[1] >= 0.6),
                     "detected_0.6_0.8": sum(f[2] for f in bad if f[1] >= 0.6)}
    out["knees"] = {"n": len(rows), "review": knees}
    return out


def _print_rates(title: str, res: dict) -> None:
    print(title)
    for name, r in res.items():
        if name == "knees":
            print(f"  verdict 'review' on {r['review']} of {r['n']} knees")
            continue
        det = f"{r['detected']}/{r['bad']} = {r['detected'] / r['bad']:.0%}" if r["bad"] else "-"
        fa = f"{r['false_alarms']}/{r['good']} = {r['false_alarms'] / r['good']:.0%}" if r["good"] else "-"
        mid = f"{r['detected_0.6_0.8']}/{r['bad_0.6_0.8']}"
        print(f"  {name:8s} detection (Dice < {BAD}) {det:>14s} (0.6-0.8: {mid:>7s})   false alarms (Dice > {GOOD}) "
              f"{fa:>14s}   flagged in between {r['middle_flagged']}/{r['middle']}")


def report(cfg: QualityConfig, sets: dict[str, list[dict]]) -> dict:
    """Print and return the rates of `cfg` on each set, standard and thorough, as they came and broken."""
    out = {}
    for name, rows in sets.items():
        real = [r for r in rows if "broken" not in r]
        broken = [r for r in rows if "broken" in r]
        for mode in ("standard", "thorough"):
            res = rates(real, cfg, mode == "thorough")
            _print_rates(f"{name}, {mode}: {len(real)} reconstructions as they came", res)
            out[f"{name}/{mode}/as_reconstructed"] = res
        if broken:
            res = rates(broken, cfg)
            _print_rates(f"{name}: {len(broken)} deliberately broken (one bone moved, BROKEN)", res)
            out[f"{name}/broken"] = res
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["all", "reconstruct", "measure", "fit"])
    p.add_argument("--model", default=os.path.join(HERE, "..", "Resources", "Models", "kneerecon_unet.pt"))
    p.add_argument("--cal", nargs="*", default=[], help="calibration case folders (.npz; training subjects, phantoms)")
    p.add_argument("--cal-case-dirs", nargs="*", default=[])
    p.add_argument("--heldout", nargs="*", default=[], help="held-out case folders (.npz): measured, never fitted on")
    p.add_argument("--heldout-case-dirs", nargs="*", default=[], help="held-out case folders (ap.*, lateral.*, truth)")
    p.add_argument("--cache", default=os.path.join(HERE, "..", "cache", "q_recon"))
    p.add_argument("--out", help="the settings file (default: beside the model, <model stem>.quality.json)")
    p.add_argument("--z", type=float, default=2.6, help="the rules' bounds this many standard deviations into the "
                                                        "reference bones' tail")
    p.add_argument("--lam", type=float, default=3.0, help="L2 penalty of the logistic scores (standardised features)")
    p.add_argument("--current", action="store_true", help="fit: report the rates of the settings the pipeline now "
                                                          "loads for this model instead of fitting")
    a = p.parse_args(argv)
    model = os.path.abspath(a.model)
    if not os.path.isfile(model):
        print(f"calibrate_quality: no model file {model}", file=sys.stderr)
        return 2
    cal, held = _cases(a.cal, a.cal_case_dirs), _cases(a.heldout, a.heldout_case_dirs)
    if a.cmd in ("all", "reconstruct"):
        reconstruct_cases(model, cal + held, a.cache)
    if a.cmd == "reconstruct":
        return 0
    sets = {"calibration": measure_cases(model, cal, a.cache)}
    if held:
        sets["held-out"] = measure_cases(model, held, a.cache)
    print(f"measured: {', '.join(f'{k} {len(v)} rows' for k, v in sets.items())}")
    if a.cmd == "measure":
        return 0
    if a.current:
        cfg = quality.load_config(model)[0]
        report(cfg, sets)
        return 0
    cfg = fit(sets["calibration"], a.z, a.lam)
    info = model_info(model)
    res = report(replace(cfg, fitted_for=info), sets)
    cfg = replace(cfg, fitted_for=info)
    out = a.out or quality.thresholds_path(model)
    quality.write_thresholds(out, cfg, info, {
        "command": "python scripts/calibrate_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cases": {"calibration": [s for _, s in cal], "held-out": [s for _, s in held]}, "rates": res})
    print(f"wrote {out} (fitted for {info['name']} {info['version']}, sha256 {info['sha256'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
