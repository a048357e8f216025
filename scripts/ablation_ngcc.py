"""NGCC ablation (issue 4): fine-tune the same starting model twice with identical data, crops
spanning whole rays (z-slabs of the full x/y extent, so projections are complete), and
lambda = 0 vs lambda > 0; evaluate both on the test set. Prints one table; writes JSON.

    python scripts/ablation_ngcc.py --init runs/main/model.pt --steps 300 --out runs/ablation \
        --train cache/llp_train cache/proc_train --test cache/xs_parallel cache/xs_cone cache/test_proc

Each test folder is scored on its own; the paper's claim for NGCC is better generalisation to
unseen images, so the cross-subject folders (held-out people) are the ones that can show it."""
import argparse
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from KneeReconLib.core.labels import BONE_NAMES  # noqa: E402
from KneeReconLib.evaluation.evaluate import evaluate_model  # noqa: E402
from KneeReconLib.training.train import TrainConfig, train  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--init", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lam", type=float, default=0.5)
    p.add_argument("--slab", type=int, default=32)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "ablation"))
    p.add_argument("--train", nargs="+", default=[os.path.join(ROOT, "cache", "train")])
    p.add_argument("--test", nargs="+", default=[os.path.join(ROOT, "cache", "test")])
    p.add_argument("--realism-p", type=float, default=0.5, help="radiograph simulator share, as in the main training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0 = off)")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--ckpt-every", type=int, default=0, help="resumable checkpoint interval (0 = only at the end)")
    p.add_argument("--only", type=float, default=None,
                   help="train only the arm with this lambda (0 or --lam), e.g. to run the two arms as two processes; "
                        "a later run without --only finds both models and only evaluates")
    a = p.parse_args()
    results = {}
    arms = (0.0, a.lam) if a.only is None else (a.only,)
    for lam in arms:
        out = os.path.join(a.out, f"lambda_{lam:g}")
        cfg = TrainConfig(data=list(a.train), out=out, steps=a.steps, batch_size=1, lr=a.lr, warmup_steps=a.warmup,
                          crop=(a.slab, 128, 128), ngcc_lambda=lam, init_from=a.init, ema_decay=a.ema,
                          ckpt_every=a.ckpt_every or a.steps, log_every=25, seed=a.seed, threads=a.threads, workers=0)
        cfg.augment["realism_p"] = a.realism_p
        model = os.path.join(out, "model.pt")
        if not os.path.exists(model):  # an arm that already ran is not trained again; an interrupted one resumes
            model = train(cfg, resume=True, log=lambda m: print(m, flush=True))
    if a.only is not None:
        return
    # the starting model is scored too: an arm that does not beat it says more than the two arms' difference
    rows = [("start", a.init)] + [(f"lambda {lam:g}", os.path.join(a.out, f"lambda_{lam:g}", "model.pt")) for lam in arms]
    for label, model in rows:
        for test in a.test:
            name = os.path.basename(os.path.normpath(test))
            res = evaluate_model(model, [test], log=lambda m: None, amp=False)  # f32 for every row (no int8 IR beside the arms)
            results.setdefault(name, {})[label] = {"cases": res["n_cases"], **{k: v["mean"] for k, v in res["summary"].items()}}
    print(f"\nNGCC ablation: fine-tune {a.steps} steps from {os.path.basename(a.init)}, {a.slab}x128x128 slabs")
    for name, arms in results.items():
        print(f"\n{name} ({next(iter(arms.values()))['cases']} cases)")
        print(f"{'':12s}" + "".join(f"{'Dice ' + b:>14s}" for b in BONE_NAMES) + "".join(f"{'ASSD ' + b:>14s}" for b in BONE_NAMES))
        for label, r in arms.items():
            print(f"{label:12s}" + "".join(f"{r['dice_' + b]:14.4f}" for b in BONE_NAMES)
                  + "".join(f"{r['assd_' + b]:14.3f}" for b in BONE_NAMES))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "ablation.json"), "w") as f:
        json.dump({"init": os.path.basename(a.init), "steps": a.steps, "lr": a.lr, "ema": a.ema, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
