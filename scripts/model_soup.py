"""Weight interpolation of models of one architecture (a "model soup", WiSE-FT): a fine-tuned
model and the model it was fine-tuned from lie in one basin, and a weighted average of their
weights is often better on unseen data than either end (Wortsman et al. 2022).

    python scripts/model_soup.py --models old.pt new.pt --weights 0.5 0.5 --output soup.pt \
        [--recalibrate cache/llp_train cache/proc_train --samples 16]

BatchNorm running statistics are averaged with the weights; `--recalibrate` re-estimates them
on full-grid training inputs instead (training.train.recalibrate_batchnorm). The card is the last
model's, with the recipe recorded under "soup"."""
import argparse
import os
import sys

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from KneeReconLib.core.errors import KneeReconError  # noqa: E402
from KneeReconLib.models.checkpoint import load_model, save_model  # noqa: E402


def soup(models: list[torch.nn.Module], weights: list[float]) -> dict:
    """The weighted average of the models' state dicts (floating tensors; integer buffers such as
    BatchNorm's batch counter are taken from the last model). Weights are normalised to sum to 1."""
    if len(models) != len(weights) or not models:
        raise KneeReconError("give one weight per model")
    total = float(sum(weights))
    if total <= 0:
        raise KneeReconError("the weights must sum to more than 0")
    sds = [m.state_dict() for m in models]
    keys = list(sds[-1])
    for sd in sds[:-1]:
        if list(sd) != keys or any(sd[k].shape != sds[-1][k].shape for k in keys):
            raise KneeReconError("the models do not share one architecture")
    out = {}
    for k in keys:
        if sds[-1][k].is_floating_point():
            out[k] = sum(w / total * sd[k].float() for w, sd in zip(weights, sds))
        else:
            out[k] = sds[-1][k].clone()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--weights", nargs="+", type=float, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--recalibrate", nargs="*", default=[], help="folders of cached training cases for BatchNorm statistics")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        loaded = [load_model(m) for m in a.models]
        net, card = loaded[-1]
        net.load_state_dict(soup([m for m, _ in loaded], a.weights))
        card = dict(card)
        card["soup"] = {"models": [f"{c.get('name', '?')} {c.get('version', '?')}" for _, c in loaded],
                        "weights": a.weights, "batchnorm": "recalibrated" if a.recalibrate else "averaged"}
        if a.recalibrate:
            from KneeReconLib.training.train import recalibrate_batchnorm, recalibration_samples
            from glob import glob
            paths = sorted(f for d in a.recalibrate for f in glob(os.path.join(d, "*.npz")))
            if not paths:
                raise KneeReconError(f"no cached cases in {a.recalibrate}")
            recalibrate_batchnorm(net, recalibration_samples(paths, a.samples, a.seed))
            net.eval()
        save_model(a.output, net, card)
    except KneeReconError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output}: {card['soup']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
