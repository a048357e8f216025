"""Per-class logit offsets that undo the network's systematic over- or under-segmentation,
fitted on knees the model did not train on from the *training* subjects and the procedural
generator, then checked on the cross-subject test (never fitted there).

  python scripts/calibrate_class_bias.py fit --data cache/q_cal_llp26 cache/q_cal_proc --out runs/bias.json
  python scripts/calibrate_class_bias.py check --bias runs/bias.json --data cache/xs_parallel cache/xs_cone

An offset c_k added to class k's logit before the argmax is the same as adding c_k to the bias of
the network's last 1x1x1 convolution. Measured for 0.5.0 (docs/class_offsets.json): mixed on the
cross-subject test (patella better, tibia worse), so no model carries offsets.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from KneeReconLib.core.labels import BONES  # noqa: E402
from KneeReconLib.data.dataset import load_case, make_sample  # noqa: E402
from KneeReconLib.evaluation.evaluate import score_labels, summarize  # noqa: E402
from KneeReconLib.reconstruction.inference import Reconstructor  # noqa: E402
from KneeReconLib.reconstruction.surfaces import clean_labels  # noqa: E402

K = 1 + len(BONES)
BAND = 4.0  # logit margin beyond which no offset searched here (|c| <= 1.5 each) can change a voxel's label


def case_paths(folders: list[str]) -> list[str]:
    paths = []
    for f in folders:
        found = sorted(glob.glob(os.path.join(f, "*.npz")))
        if not found:
            sys.exit(f"calibrate_class_bias: no cached cases (*.npz) in {f!r}")
        paths += found
    return paths


def logits_of(rec: Reconstructor, path: str):
    case = load_case(path)
    x, truth = make_sample(case)
    _, scores = rec.predict_scores(x)
    if scores is None:
        sys.exit("calibrate_class_bias: this model's network returns no class scores (re-convert it)")
    return np.asarray(scores, np.float32), truth.astype(np.uint8), case


class Band:
    """One case reduced to what an offset can change: the voxels near a decision boundary (their
    logits and truth) and the fixed counts of all others."""

    def __init__(self, scores: np.ndarray, truth: np.ndarray):
        top2 = np.partition(scores, K - 2, axis=0)[K - 2:]
        near = (top2[1] - top2[0]) < BAND
        fixed_pred = scores.argmax(0)[~near]
        fixed_truth = truth[~near]
        self.inter = np.bincount(fixed_pred[fixed_pred == fixed_truth], minlength=K)[:K].astype(np.int64)
        self.pred = np.bincount(fixed_pred, minlength=K)[:K].astype(np.int64)
        self.truth_total = np.bincount(truth.ravel(), minlength=K)[:K].astype(np.int64)
        self.logits = scores[:, near].T.copy()  # [n, K]
        self.band_truth = truth[near]

    def dice(self, offsets: np.ndarray) -> np.ndarray:
        p = (self.logits + offsets).argmax(1)
        inter = self.inter + np.bincount(p[p == self.band_truth], minlength=K)[:K]
        pred = self.pred + np.bincount(p, minlength=K)[:K]
        denom = pred + self.truth_total
        return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), 1.0)[1:]


def objective(bands: list[Band], offsets: np.ndarray) -> float:
    return float(np.mean([b.dice(offsets) for b in bands]))


def fit(bands: list[Band], rounds: int = 4, span: float = 1.5, step: float = 0.05) -> tuple[np.ndarray, float, float]:
    """Coordinate search of the four bone offsets (background fixed at 0) maximising the mean
    per-bone Dice over the cases."""
    off = np.zeros(K, np.float32)
    start = best = objective(bands, off)
    values = np.arange(-span, span + 1e-9, step)
    for _ in range(rounds):
        moved = False
        for k in range(1, K):
            for v in values:
                cand = off.copy()
                cand[k] = v
                s = objective(bands, cand)
                if s > best + 1e-6:
                    best, off, moved = s, cand, True
        if not moved:
            break
    return off, start, best


def score_set(rec: Reconstructor, paths: list[str], offsets: np.ndarray | None) -> dict:
    rows = []
    for p in paths:
        scores, truth, case = logits_of(rec, p)
        if offsets is not None:
            scores = scores + offsets[:, None, None, None]
        pred = clean_labels(scores.argmax(0).astype(np.uint8))
        rows.append(score_labels(pred, truth, case.grid().spacing[::-1]))
    return summarize(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit")
    f.add_argument("--data", nargs="+", required=True)
    f.add_argument("--out", required=True)
    c = sub.add_parser("check")
    c.add_argument("--bias", required=True)
    c.add_argument("--data", nargs="+", required=True)
    c.add_argument("--out", default=None)
    for s in (f, c):
        s.add_argument("--model", default=None, help="model file (default: the bundled model)")
    a = p.parse_args(argv)
    rec = Reconstructor(a.model, amp=False)  # f32 logits: the fit should not depend on this CPU's precision
    if a.cmd == "fit":
        paths = case_paths(a.data)
        bands = []
        for i, path in enumerate(paths):
            scores, truth, _ = logits_of(rec, path)
            bands.append(Band(scores, truth))
            print(f"{i + 1}/{len(paths)} {os.path.basename(path)}: {len(bands[-1].band_truth)} band voxels", flush=True)
        off, start, best = fit(bands)
        res = {"model": rec.card.get("version"), "data": a.data, "cases": len(paths), "offsets": off.tolist(),
               "mean_bone_dice_before": round(start, 4), "mean_bone_dice_after": round(best, 4),
               "note": "band objective without the connected-component clean-up"}
        with open(a.out + ".tmp", "w") as fh:
            json.dump(res, fh, indent=1)
        os.replace(a.out + ".tmp", a.out)
        print(json.dumps(res, indent=1))
        return 0
    off = np.asarray(json.load(open(a.bias))["offsets"], np.float32)
    out = {}
    for folder in a.data:
        paths = case_paths([folder])
        out[folder] = {"plain": score_set(rec, paths, None), "offsets": score_set(rec, paths, off)}
        for k in ("plain", "offsets"):
            m = out[folder][k]
            print(f"{folder} {k:8s} Dice " + " / ".join(f"{m['dice_' + b.name]['mean']:.4f}" for b in BONES) +
                  "  ASSD " + " / ".join(f"{m['assd_' + b.name]['mean']:.2f}" for b in BONES), flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"offsets": off.tolist(), "sets": out}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
