"""Unpaired data for `kneerecon train-style`: radiograph-like images made by the realism
simulator from training phantoms' DRR views (the "real" domain); the DRR domain is given to
train-style as the cached cases themselves (other phantoms, so the two domains are unpaired).

    python scripts/make_style_data.py --cache cache/train2 --out cache/style_real --count 80 [--skip 0]"""
import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from KneeReconLib.data.dataset import load_case  # noqa: E402
from KneeReconLib.data.realism import RealismConfig, simulate_radiograph  # noqa: E402
from KneeReconLib.io.xray_io import write_xray  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cache", required=True, help="cached training cases (.npz), seeds < 900000")
    p.add_argument("--out", required=True)
    p.add_argument("--count", type=int, default=80)
    p.add_argument("--skip", type=int, default=0, help="start after this many cases (keep the DRR domain's cases apart)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    paths = sorted(glob.glob(os.path.join(a.cache, "*.npz")))[a.skip:a.skip + a.count]
    for i, path in enumerate(paths):
        case = load_case(path)
        rng = np.random.default_rng([a.seed, i])
        for view, img, geom in (("ap", case.ap, case.ap_geom), ("lateral", case.lateral, case.lat_geom)):
            px, _ = simulate_radiograph(img, geom.iso_spacing, rng, RealismConfig())
            name = os.path.splitext(os.path.basename(path))[0]
            write_xray(px.astype(np.float32), geom, os.path.join(a.out, f"{name}_{view}.nrrd"))
    print(f"wrote {2 * len(paths)} images to {a.out}")


if __name__ == "__main__":
    main()
