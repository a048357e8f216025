"""Fit and measure the view check's classifiers (KneeReconLib/io/view_check.py) and its second
opinion (KneeReconLib/reconstruction/view_opinion.py).

  python scripts/fit_view_check.py pictures --data cache/llp_train cache/proc_train --out cache/views_train.npz
  python scripts/fit_view_check.py fit --train cache/views_train.npz --out Resources/Models/kneerecon_views.npz
  python scripts/fit_view_check.py pictures --data cache/llp_train2 cache/proc_train2 --every 4 --realistic 1 \\
      --opinion-window 6 --out cache/a16_views_train_op.npz
  python scripts/fit_view_check.py band --train cache/a16_views_train_op.npz
  python scripts/fit_view_check.py pictures --data cache/xs_parallel cache/xs_cone cache/test_proc --held-out \\
      --realistic 2 --seed 2 --opinion-window 6 --out cache/a16_views_test_op.npz
  python scripts/fit_view_check.py measure --test cache/a16_views_test_op.npz \\
      --files Resources/Sample ../shared/contract-check/knee_a ../shared/contract-check/knee_b cache/xsf/*

`pictures` turns cached cases (DRR line integrals) into canonical pictures: each view as a DRR and
as `--realistic` simulated radiographs (realism.py, as training's realism augmentation makes
them); with `--opinion-window W` it also reconstructs every pair whose swap score is within +-W
as given and swapped (two network passes) and keeps both reconstructions' outline agreements.
Fitting data must come from LLP26 training subjects and procedural phantoms only; the
script refuses cases of the held-out subjects (5, 10, 15, 20) and of subjects 21-26.
`band` shows how the opinion band and gain threshold follow from training pairs.
`measure` prints per-image view accuracy, swap detection and false-alarm rates on pairs (the
classifier's margin alone and the whole check with the second opinion), how often correct pairs
fall in the band, and side-check rates, per set."""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from KneeReconLib.io.view_check import (OPINION_BAND, SIDE_MARGIN, SWAP_MARGIN, ViewModel, canonical_picture,  # noqa: E402
                                        side_features, view_features)
from KneeReconLib.reconstruction.view_opinion import SwapOpinionConfig  # noqa: E402

MIN_GAIN = SwapOpinionConfig().min_gain

HELD_OUT = {5, 10, 15, 20}
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "Resources", "Models", "kneerecon_views.npz")


def _opinion_features(reconstructor, ap, lat) -> np.ndarray:
    """The second opinion's raw numbers for one pair: the 8 outline agreements reconstructed as
    given, then the 8 reconstructed swapped (view_opinion.SLOTS order; NaN: bone or outline missing)."""
    from KneeReconLib.reconstruction.view_opinion import outline_features, reconstruct_swapped_features

    given = outline_features(reconstructor.run(ap, lat, ap.geometry.side, surfaces=False).quality)
    return np.concatenate([given, reconstruct_swapped_features(reconstructor, ap, lat, ap.geometry.side)])


def pictures(folders: list[str], out: str, realistic: int, seed: int, allow_held_out: bool,
             opinion_window: float = 0.0, every: int = 1) -> None:
    """Canonical pictures of cached cases; with `opinion_window` > 0 also the second opinion's
    numbers (two network passes) for every pair whose swap score is within +-window (either way
    round the pair is given, the band applies to +-score), NaN for the others."""
    from KneeReconLib.data.dataset import _realistic, load_case
    from KneeReconLib.io.xray_io import XRay

    rng = np.random.default_rng(seed)
    pics, views, sides, kinds, names, opinions = [], [], [], [], [], []
    model = ViewModel.load(DEFAULT_MODEL) if opinion_window > 0 else None
    reconstructor = None
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "*.npz")))[::every]:
            case = load_case(path)
            subject = case.meta.get("subject")
            if subject is not None and not allow_held_out and (int(subject) in HELD_OUT or int(subject) > 20):
                raise SystemExit(f"{path}: LLP26 subject {subject} is held out; not for fitting")
            for k in range(1 + realistic):
                pair = []
                for view, img, geom in (("ap", case.ap, case.ap_geom), ("lateral", case.lateral, case.lat_geom)):
                    x = img if k == 0 else _realistic(img, geom, rng)
                    pair.append(XRay(np.asarray(x, np.float32), geom))
                    pics.append(canonical_picture(pair[-1]))
                    views.append(view)
                    sides.append(case.meta["side"])
                    kinds.append("drr" if k == 0 else "realistic")
                    names.append(f"{os.path.basename(os.path.normpath(folder))}/{os.path.basename(path)}")
                op = np.full(16, np.nan)
                if model is not None and abs(model.view_score(pics[-1]) - model.view_score(pics[-2])) <= opinion_window:
                    if reconstructor is None:
                        from KneeReconLib.reconstruction.inference import Reconstructor
                        reconstructor = Reconstructor()
                    op = _opinion_features(reconstructor, *pair)
                opinions += [op, op]
            print(f"{path}: {len(pics)} pictures, {int(np.isfinite(np.array(opinions)[:, 0]).sum() // 2)} opinions",
                  flush=True)
    np.savez_compressed(out, pics=np.array(pics), views=np.array(views), sides=np.array(sides), kinds=np.array(kinds),
                        names=np.array(names), opinions=np.array(opinions))


def _augment(pics: np.ndarray, rng: np.random.Generator, copies: int) -> np.ndarray:
    """Shifted (up to 3 px = 15 mm), gamma- and contrast-jittered copies: real images are not
    centred on the joint nor exposed like DRRs."""
    out = [pics]
    for _ in range(copies):
        a = []
        for p in pics:
            dr, dc = rng.integers(-3, 4, 2)
            q = np.roll(p, (dr, dc), (0, 1))
            if dr > 0:
                q[:dr] = 0
            elif dr < 0:
                q[dr:] = 0
            if dc > 0:
                q[:, :dc] = 0
            elif dc < 0:
                q[:, dc:] = 0
            q = np.clip(q, 0, None) ** rng.uniform(0.7, 1.4) * rng.uniform(0.85, 1.15)
            a.append(q.astype(np.float32))
        out.append(np.array(a))
    return np.concatenate(out)


def _logistic(X: np.ndarray, y: np.ndarray, l2: float, bias: bool) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression (labels 0/1) by L-BFGS."""
    from scipy.optimize import minimize

    n, d = X.shape

    def f(theta):
        w, b = theta[:d], (theta[d] if bias else 0.0)
        z = X @ w + b
        loss = np.logaddexp(0, z).sum() - (y * z).sum() + 0.5 * l2 * (w @ w)
        g = 1 / (1 + np.exp(-z)) - y
        grad = np.concatenate([X.T @ g + l2 * w, [g.sum()] if bias else []])
        return loss / n, grad / n

    theta = minimize(f, np.zeros(d + int(bias)), jac=True, method="L-BFGS-B", options={"maxiter": 500}).x
    return theta[:d], float(theta[d]) if bias else 0.0


def fit(train: str, out: str, l2: float, copies: int, seed: int) -> ViewModel:
    z = np.load(train)
    pics = z["pics"]
    rng = np.random.default_rng(seed)
    # view: every picture, mirrored ones too (the features are mirror-invariant, so only for the record)
    aug = _augment(pics, rng, copies)
    is_ap = np.tile(z["views"] == "ap", copies + 1).astype(float)
    F = np.array([view_features(p) for p in aug])
    mean, scale = F.mean(0), F.std(0) + 0.02
    w, b = _logistic((F - mean) / scale, is_ap, l2, bias=True)
    # side: AP pictures and their mirror images (a mirrored left knee is a right knee)
    ap = pics[z["views"] == "ap"]
    left = (z["sides"][z["views"] == "ap"] == "left").astype(float)
    ap_aug = _augment(np.concatenate([ap, ap[:, :, ::-1]]), rng, copies)
    left_aug = np.tile(np.concatenate([left, 1 - left]), copies + 1)
    S = np.array([side_features(p) for p in ap_aug])
    s_scale = np.sqrt((S ** 2).mean(0)) + 0.02  # no centring: the features' sign carries the side
    sw, _ = _logistic(S / s_scale, left_aug, l2, bias=False)
    info = {"train": os.path.basename(train), "pictures": int(len(pics)), "augmented_copies": copies, "l2": l2,
            "seed": seed, "sources": sorted(set(str(n).split("/")[0] for n in z["names"]))}
    model = ViewModel(mean, scale, w, b, s_scale, sw, info)
    model.save(out)
    print(f"wrote {out}: {info}")
    return model


def _decide(d: np.ndarray, gain: np.ndarray, min_gain: float) -> np.ndarray:
    """The whole check's verdict per pair (True: refused as swapped) from the swap score `d` and the
    second opinion's gain (needed where `d` is in OPINION_BAND)."""
    lo, hi = OPINION_BAND
    band = (d > lo) & (d <= hi)
    if np.isnan(gain[band]).any():
        raise SystemExit("pairs in the opinion band have no second opinion: make the pictures with a wider "
                         "--opinion-window")
    return (d > SWAP_MARGIN) | (band & (np.nan_to_num(gain) > min_gain))


def _rates(model: ViewModel, pics_ap: list, pics_lat: list, sides: list, gains=None, min_gain: float | None = None) -> dict:
    """Rates on pairs; `gains`: the second opinion's gain per pair as given (NaN where not
    computed), so that the whole check (margin, band, opinion) is measured, not the margin alone."""
    sa = np.array([model.view_score(p) for p in pics_ap])
    sl = np.array([model.view_score(p) for p in pics_lat])
    ss = np.array([model.side_score(p) for p in pics_ap])
    seen = np.where(ss > SIDE_MARGIN, "left", np.where(ss < -SIDE_MARGIN, "right", ""))
    truth = np.array(sides)
    other = np.where(truth == "left", "right", "left")
    n = len(sa)
    d = sl - sa  # the swap score of the pair as given; given the other way round it is -d
    lo, hi = OPINION_BAND
    out = {"pairs": n,
           "ap_images_called_ap": float(np.mean(sa > 0)), "lateral_images_called_lateral": float(np.mean(sl < 0)),
           "swap_detected": float(np.mean(-d > SWAP_MARGIN)),  # the pair given swapped, the margin alone
           "swap_false_alarm": float(np.mean(d > SWAP_MARGIN)),  # the pair as it is, the margin alone
           "min_pair_margin": float((sa - sl).min()),
           "side_right_when_seen": float(np.mean(seen[seen != ""] == truth[seen != ""])) if (seen != "").any() else None,
           "side_seen": float(np.mean(seen != "")),
           "side_false_warning": float(np.mean((seen != "") & (seen != truth))),  # declared the true side
           "side_wrong_declared_warned": float(np.mean((seen != "") & (seen != other))),  # declared the other side
           "min_margin_ap": float(sa.min()), "max_margin_lat": float(sl.max()),
           "band_hit_correct": float(np.mean((d > lo) & (d <= hi))),  # correct pairs that pay the extra pass
           "band_hit_swapped": float(np.mean((-d > lo) & (-d <= hi)))}
    if gains is not None:
        g = np.asarray(gains, np.float64)
        mg = MIN_GAIN if min_gain is None else min_gain
        out["with_opinion_swap_detected"] = float(np.mean(_decide(-d, -g, mg)))
        out["with_opinion_false_alarm"] = float(np.mean(_decide(d, g, mg)))
        inband = np.isfinite(g)
        out["max_gain_correct"] = float(np.max(g[inband])) if inband.any() else None
    return out


def _pair_gains(z) -> np.ndarray | None:
    """The second opinion's gain per AP picture's pair (the pictures file's `opinions`), or None."""
    from KneeReconLib.reconstruction.view_opinion import swap_gain

    if "opinions" not in z.files:
        return None
    return np.array([swap_gain(o[:8], o[8:]) if np.isfinite(o[0]) else np.nan for o in z["opinions"]])


def measure(model_path: str, tests: list[str], files: list[str], opinion: bool = True) -> dict:
    from KneeReconLib.io.xray_io import read_xray

    model = ViewModel.load(model_path)
    results = {}
    for t in tests:
        z = np.load(t)
        names, views, kinds = z["names"], z["views"], z["kinds"]
        gains = _pair_gains(z) if opinion else None
        for src in sorted(set(str(n).split("/")[0] for n in names)):
            for kind in ("drr", "realistic"):
                sel = np.array([str(n).startswith(src + "/") for n in names]) & (kinds == kind)
                ap = sel & (views == "ap")
                lat = sel & (views == "lateral")
                if not ap.any():
                    continue
                # pictures come in case order, views and realistic draws in the same order per case
                results[f"{src} {kind}"] = _rates(model, list(z["pics"][ap]), list(z["pics"][lat]), list(z["sides"][ap]),
                                                  None if gains is None else gains[ap])
    if files:
        pa, pl, sides, gains = [], [], [], []
        reconstructor = None
        for d in files:
            meta = json.load(open(os.path.join(d, "meta.json")))
            ap = read_xray(os.path.join(d, "ap.nrrd"), "ap", side=meta["side"])
            lat = read_xray(os.path.join(d, "lateral.nrrd"), "lateral", side=meta["side"])
            pa.append(canonical_picture(ap))
            pl.append(canonical_picture(lat))
            sides.append(meta["side"])
            score = model.view_score(pl[-1]) - model.view_score(pa[-1])
            g = np.nan
            lo, hi = OPINION_BAND
            if opinion and (lo < score <= hi or lo < -score <= hi):  # in the band as given or swapped
                if reconstructor is None:
                    from KneeReconLib.reconstruction.inference import Reconstructor
                    reconstructor = Reconstructor()
                from KneeReconLib.reconstruction.view_opinion import swap_gain
                f = _opinion_features(reconstructor, ap, lat)
                g = swap_gain(f[:8], f[8:])
            gains.append(g)
            r = _rates(model, pa[-1:], pl[-1:], sides[-1:], gains[-1:] if opinion else None)
            print(f"{d}: AP image {model.view_score(pa[-1]):+.1f}, lateral image {model.view_score(pl[-1]):+.1f}, "
                  f"side {model.side_score(pa[-1]):+.1f} ({meta['side']}), opinion gain {g:+.3f} -> swap alarm "
                  f"{r.get('with_opinion_false_alarm', r['swap_false_alarm']):.0f}, swapped refused "
                  f"{r.get('with_opinion_swap_detected', r['swap_detected']):.0f}, side warning {r['side_false_warning']:.0f}",
                  flush=True)
        results["files"] = _rates(model, pa, pl, sides, gains if opinion else None)
    for k, v in results.items():
        print(f"{k:28s} " + ", ".join(f"{a} {b:.3f}" if isinstance(b, float) else f"{a} {b}" for a, b in v.items()))
    return results


def band(train: str, model_path: str) -> dict:
    """How OPINION_BAND and the second opinion's MIN_GAIN follow from training-subject pairs (the
    pictures file of `pictures --opinion-window`): the band's lower end must hold every swapped
    training pair the margin misses, and the gain threshold is twice the largest gain of a correct
    training pair. Also compares the slot choices of the agreement score."""
    from KneeReconLib.reconstruction.view_opinion import SLOTS, swap_gain

    model = ViewModel.load(model_path)
    z = np.load(train)
    views, names = z["views"], z["names"]
    if any("xs_" in str(n) or "test" in str(n) for n in names):
        raise SystemExit(f"{train} holds held-out cases: choose the band on training subjects only")
    ap = views == "ap"
    sa = np.array([model.view_score(p) for p in z["pics"][ap]])
    sl = np.array([model.view_score(p) for p in z["pics"][views == "lateral"]])
    d = sl - sa
    op = z["opinions"][ap]
    has = np.isfinite(op[:, 0])
    res = {"pairs": int(len(d)), "max_correct_swap_score": float(d.max()),
           "band_low_needed": float(-d.max()), "band": list(OPINION_BAND),
           "band_hit_correct": float(np.mean((d > OPINION_BAND[0]) & (d <= OPINION_BAND[1]))),
           "band_hit_swapped": float(np.mean((-d > OPINION_BAND[0]) & (-d <= OPINION_BAND[1]))),
           "pairs_with_opinion": int(has.sum())}
    choices = {"all slots": np.ones(8, bool), "no femur (used)": np.array([b != "femur" for b, _ in SLOTS]),
               "patella only": np.array([b == "patella" for b, _ in SLOTS])}
    for name, slots in choices.items():
        g = np.sort([swap_gain(o[:8], o[8:], slots) for o in op[has]])
        res[name] = {"max_gain_correct": float(g[-1]), "second_gain_correct": float(g[-2]),
                     "median_gain_correct": float(np.median(g)), "min_gain_chosen": round(2 * max(float(g[-1]), 0.0), 3)}
    for k, v in res.items():
        print(f"{k}: {v}")
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pictures")
    a.add_argument("--data", nargs="+", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--realistic", type=int, default=2)
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--held-out", action="store_true", help="allow held-out subjects (for test pictures)")
    a.add_argument("--opinion-window", type=float, default=0.0,
                   help="also record the second opinion (2 network passes) for pairs with |swap score| <= this")
    a.add_argument("--every", type=int, default=1, help="every N-th case of each folder only")
    f = sub.add_parser("fit")
    f.add_argument("--train", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--l2", type=float, default=100.0)
    f.add_argument("--copies", type=int, default=3)
    f.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("measure")
    m.add_argument("--model", default=DEFAULT_MODEL)
    m.add_argument("--test", nargs="*", default=[])
    m.add_argument("--files", nargs="*", default=[])
    m.add_argument("--json", help="write the rates here")
    m.add_argument("--no-opinion", action="store_true", help="the classifier's margin alone (no second opinion)")
    b = sub.add_parser("band", help="the opinion band and gain threshold from training-subject pairs")
    b.add_argument("--train", required=True, help="pictures of training subjects made with --opinion-window")
    b.add_argument("--model", default=DEFAULT_MODEL)
    a_ = p.parse_args()
    if a_.cmd == "pictures":
        pictures(a_.data, a_.out, a_.realistic, a_.seed, a_.held_out, a_.opinion_window, a_.every)
    elif a_.cmd == "fit":
        fit(a_.train, a_.out, a_.l2, a_.copies, a_.seed)
    elif a_.cmd == "band":
        band(a_.train, a_.model)
    else:
        res = measure(a_.model, a_.test, a_.files, not a_.no_opinion)
        if a_.json:
            with open(a_.json, "w") as fh:
                json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
