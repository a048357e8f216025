"""Issue 6's comparison of domain adaptations on the real-like test set: no adaptation, style
transfer, the radiograph simulator as training augmentation, and both; plus the clean DRR test
set for each model (an adaptation must not cost accuracy on clean inputs).

    python scripts/adaptation_table.py --plain MODEL_A --simaug MODEL_B --style STYLE \
        --real-like cache/reallike --test cache/test2 --out docs/adaptation.json

MODEL_A and MODEL_B must come from runs that differ only in --realism-p."""
import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from KneeReconLib.core.labels import BONE_NAMES  # noqa: E402
from KneeReconLib.evaluation.evaluate import evaluate_files, evaluate_model  # noqa: E402
from KneeReconLib.io.fileio import atomic_write_json  # noqa: E402


def _mean(rows, key):
    return round(float(np.nanmean([r[key] for r in rows])), 4)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--plain", required=True, help="model trained without the simulator")
    p.add_argument("--simaug", required=True, help="the same run with --realism-p > 0")
    p.add_argument("--style", required=True, help="style model (kneerecon train-style)")
    p.add_argument("--real-like", required=True)
    p.add_argument("--test", help="clean DRR test set (cached cases) evaluated for both models")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    dirs = sorted(d for d in glob.glob(os.path.join(a.real_like, "case_*")) if os.path.isdir(d))
    arms = [("no adaptation", a.plain, None), ("style transfer", a.plain, a.style),
            ("simulator augmentation", a.simaug, None), ("both", a.simaug, a.style)]
    res = {"real_like_cases": len(dirs), "arms": {}, "clean_test": {}}
    for name, model, style in arms:
        rows = evaluate_files(model, dirs, style=style, log=lambda m: None)
        res["arms"][name] = {"model": model, "style": style,
                             **{f"{m}_{b}": _mean(rows, f"{m}_{b}") for m in ("dice", "chamfer") for b in BONE_NAMES}}
        print(f"{name:24s} " + " ".join(f"{b[:3]} {res['arms'][name][f'dice_{b}']:.3f}/{res['arms'][name][f'chamfer_{b}']:.2f}"
                                        for b in BONE_NAMES), flush=True)
    if a.test:
        for name, model in (("plain", a.plain), ("simulator augmentation", a.simaug)):
            s = evaluate_model(model, [a.test], log=lambda m: None)["summary"]
            res["clean_test"][name] = {f"{m}_{b}": round(s[f"{m}_{b}"]["mean"], 4) for m in ("dice", "chamfer") for b in BONE_NAMES}
            print(f"clean DRR test, {name:24s} " + " ".join(
                f"{b[:3]} {res['clean_test'][name][f'dice_{b}']:.3f}" for b in BONE_NAMES), flush=True)
    best = max(res["arms"], key=lambda k: np.mean([res["arms"][k][f"dice_{b}"] for b in BONE_NAMES]))
    res["best_on_real_like"] = best
    atomic_write_json(res, a.out)
    print("\n| real-like test set | " + " | ".join(f"Dice {b}" for b in BONE_NAMES) + " | "
          + " | ".join(f"Chamfer {b} (mm)" for b in BONE_NAMES) + " |")
    print("|---" * 9 + "|")
    for k, v in res["arms"].items():
        print(f"| {k} | " + " | ".join(f"{v[f'dice_{b}']:.3f}" for b in BONE_NAMES) + " | "
              + " | ".join(f"{v[f'chamfer_{b}']:.2f}" for b in BONE_NAMES) + " |")
    print(f"best mean Dice on the real-like set: {best}")


if __name__ == "__main__":
    main()
