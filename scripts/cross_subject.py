"""The cross-subject test: knees built from our 4 held-out LLP26 subjects (5, 10, 15, 20; never
trained on, not in the shape statistics), several poses each, left and right, in parallel and in
cone beam; and the mean-shape baseline on the same cases (the training subjects' mean shape
placed at each knee's true pose, scored like a reconstruction).

  python scripts/cross_subject.py build --out cache/xs2 --poses 6      # cache/xs2_parallel, cache/xs2_cone
  kneerecon evaluate --data cache/xs2_parallel                           # the network
  python scripts/cross_subject.py baseline --data cache/xs2_parallel     # the mean-shape baseline
  python scripts/cross_subject.py files --out cache/xsf_v2 --poses 2     # X-ray files + 0.75 mm truth
  kneerecon evaluate --case-dirs cache/xsf_v2/*                           # through files, by physical coordinates

(cache/xs_* and cache/xsf: the same knees built before 2026-12-03, their legs cut at the CT's faces.)
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

from KneeReconLib.core.labels import BONE_NAMES  # noqa: E402
from KneeReconLib.data.dataset import GeometryConfig, case_from_ct, labels_on_grid, load_case, save_case  # noqa: E402
from KneeReconLib.data.llp26 import TEST_SUBJECTS, LLP26Config, generate_llp26_phantom  # noqa: E402
from KneeReconLib.data.phantom import imaging_field_mm  # noqa: E402
from KneeReconLib.evaluation.evaluate import score_labels, summarize  # noqa: E402

SEED0 = 3_000_000  # seeds of the cross-subject cases: seed = SEED0 + 1000 * subject + pose
GEOMETRIES = {"parallel": 0.0, "cone": 1.0}


def exact(subject: int) -> LLP26Config:
    """The person's own shape: no PCA shape, no warp, true size; poses and sides vary."""
    return LLP26Config(subjects=(subject,), pca_p=0.0, warp_mm=(0.0, 0.0), scale=(1.0, 1.0))


def held_out_knees(poses: int, voxel: float, first_pose: int = 0):
    """(geometry name, subject, seed, config, geometry sampler) of every held-out knee: each test
    subject in `poses` poses (sides alternating) per geometry; nothing is generated yet."""
    for name, cone_p in GEOMETRIES.items():
        geo = GeometryConfig(cone_p=cone_p, collimate_p=0.0, bone_slope=(1.2, 1.2))
        for subject in TEST_SUBJECTS:
            for k in range(poses):
                cfg = exact(subject)
                cfg.voxel_mm = voxel
                cfg.side = "left" if k % 2 else "right"
                yield name, subject, SEED0 + 1000 * subject + first_pose + k, cfg, geo


def knee_and_views(seed: int, cfg: LLP26Config, geo: GeometryConfig):
    """(phantom, AP DRR config, lateral DRR config, what the geometry drew) of one held-out knee."""
    ph = generate_llp26_phantom(seed, cfg)
    da, dl, drawn = geo.sample(ph.ct, cfg.side, np.random.default_rng([seed, 11]), imaging_field_mm(ph))
    return ph, da, dl, drawn


def build(out: str, poses: int, voxel: float) -> None:
    for name, subject, seed, cfg, geo in held_out_knees(poses, voxel):
        folder = f"{out}_{name}"
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"xs_s{subject:02d}_{seed}.npz")
        if os.path.exists(path):
            continue
        ph, da, dl, drawn = knee_and_views(seed, cfg, geo)
        case = case_from_ct(ph.ct, ph.labels, 128, da, {**ph.params, "geometry": drawn, "config": cfg.to_dict()},
                            lateral_drr=dl)
        save_case(case, path)
        print(f"cached {path}", flush=True)


def files(out: str, poses: int, voxel: float) -> None:
    """Cases as a user has them: ap.nrrd and lateral.nrrd (cone geometry in the header), the truth
    label map at `voxel` mm and meta.json (written last: a folder without it is redone), one folder
    per case, parallel and cone beam."""
    import SimpleITK as sitk

    from KneeReconLib.data.drr import render_drr
    from KneeReconLib.io.fileio import atomic_write_image, atomic_write_json
    from KneeReconLib.io.xray_io import write_xray

    # poses of their own (500 on), not those of `build`
    for name, subject, seed, cfg, geo in held_out_knees(poses, voxel, first_pose=500):
        folder = os.path.join(out, f"{name}_s{subject:02d}_{seed}")
        if os.path.exists(os.path.join(folder, "meta.json")):
            continue
        os.makedirs(folder, exist_ok=True)
        ph, da, dl, drawn = knee_and_views(seed, cfg, geo)
        for view, drr in (("ap", da), ("lateral", dl)):
            pixels, g = render_drr(ph.ct, replace(drr, views=(view,)))[view]
            write_xray(pixels, g, os.path.join(folder, f"{view}.nrrd"))
        atomic_write_image(sitk.Cast(ph.labels, sitk.sitkUInt8), os.path.join(folder, "truth.nii.gz"))
        atomic_write_json({"side": cfg.side, "subject": subject, "seed": seed, "geometry": drawn},
                          os.path.join(folder, "meta.json"))
        print(f"wrote {folder}", flush=True)


def baseline(data: list[str], out: str | None) -> dict:
    rows = []
    for folder in data:
        for path in sorted(glob.glob(os.path.join(folder, "*.npz"))):
            case = load_case(path)
            cfg = LLP26Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in case.meta["config"].items()})
            mean = generate_llp26_phantom(int(case.meta["seed"]), cfg, shape="mean")
            pred = labels_on_grid(mean.labels, case.grid())
            rows.append({"case": os.path.basename(path), **score_labels(pred, case.labels, case.grid().spacing[::-1])})
            print(os.path.basename(path), " ".join(f"{b} {rows[-1][f'dice_{b}']:.3f}" for b in BONE_NAMES), flush=True)
    s = summarize(rows)
    print("mean-shape baseline, mean over", len(rows), "cases:")
    for m in ("dice", "chamfer", "assd"):
        print(f"  {m:8s}", " ".join(f"{b} {s[f'{m}_{b}']['mean']:.3f}" for b in BONE_NAMES))
    if out:
        with open(out, "w") as f:
            json.dump({"summary": s, "cases": rows}, f, indent=1)
    return s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default="cache/xs")
    b.add_argument("--poses", type=int, default=6, help="poses per subject and geometry (sides alternate)")
    b.add_argument("--voxel", type=float, default=1.0)
    f = sub.add_parser("files")
    f.add_argument("--out", default="cache/xsf")
    f.add_argument("--poses", type=int, default=2, help="poses per subject and geometry (sides alternate)")
    f.add_argument("--voxel", type=float, default=0.75, help="voxel of the truth label map (mm)")
    m = sub.add_parser("baseline")
    m.add_argument("--data", nargs="+", required=True)
    m.add_argument("--output", help="JSON file for the per-case and mean scores")
    a = p.parse_args()
    if a.cmd == "build":
        build(a.out, a.poses, a.voxel)
    elif a.cmd == "files":
        files(a.out, a.poses, a.voxel)
    else:
        baseline(a.data, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
