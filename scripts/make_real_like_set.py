"""Build a "real-like" test set: held-out phantom knees, positioned with small rotations and a
height offset between the views, imaged through the realism simulator (KneeReconLib/data/realism.py)
and written as files like real radiographs, with their 3D truth and 2D bone masks.

    python scripts/make_real_like_set.py --out DIR --seed 1000000 --count 10 [--format dicom|nrrd]

Each case goes to DIR/case_<seed>/ (layout in docs/realism.md); meta.json is written last, so a
folder with meta.json is complete and is skipped when the command runs again (resumable).
DIR/manifest.csv lists the cases for `kneerecon reconstruct-batch`; the folders also suit
`kneerecon evaluate --case-dirs`."""
import argparse
import csv
import json
import os
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from KneeReconLib.core.errors import KneeReconError  # noqa: E402
from KneeReconLib.core.labels import label_table  # noqa: E402
from KneeReconLib.data.dataset import TEST_SEED0  # noqa: E402
from KneeReconLib.data.phantom import PhantomConfig, generate_phantom, imaging_field_mm  # noqa: E402
from KneeReconLib.data.realism import RealismConfig, simulate_pair, write_dicom_xray, write_nrrd_xray  # noqa: E402
from KneeReconLib.io.fileio import atomic_path, atomic_write_image, atomic_write_json  # noqa: E402

REALISM_STREAM = 7  # realism draws use default_rng([seed, 7]): independent of the phantom's own draws
ORIENTATION = {"ap": ("+x LPS (patient left)", "-z (inferior)"), "lateral": ("+y LPS (posterior)", "-z (inferior)")}


def _mask_image(mask: np.ndarray, geometry) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    sc, sr = geometry.spacing
    img.SetSpacing((sc, sr))
    img.SetOrigin((-(geometry.width - 1) / 2 * sc, -(geometry.height - 1) / 2 * sr))  # as the image files
    return img


def make_case(folder: str, seed: int, fmt: str, pixel_spacing: float, voxel: float, config: RealismConfig) -> dict:
    """Generate and write one case; returns its meta.json content."""
    t0 = time.perf_counter()
    ph = generate_phantom(seed, PhantomConfig(voxel_mm=voxel))
    side = ph.params["side"]
    rng = np.random.default_rng([seed, REALISM_STREAM])
    sim = simulate_pair(ph.ct, ph.labels, side, rng, config, pixel_spacing, field_mm=imaging_field_mm(ph))
    os.makedirs(folder, exist_ok=True)
    ext = "dcm" if fmt == "dicom" else "nrrd"
    images, masks = {}, {}
    for view in ("ap", "lateral"):
        g, params = sim[f"{view}_geometry"], sim["params"][view]
        name = f"{view}.{ext}"
        if fmt == "dicom":
            write_dicom_xray(sim[view], g, os.path.join(folder, name), monochrome1=params["monochrome1"])
            photometric = "MONOCHROME1" if params["monochrome1"] else "MONOCHROME2"
        else:
            write_nrrd_xray(sim[view], g, os.path.join(folder, name))
            photometric = "bone bright (NRRD)"
        cols, rows = ORIENTATION[view]
        images[view] = {"file": name, "size_wh": [g.width, g.height], "pixel_spacing_mm": list(g.spacing),
                        "columns": cols, "rows": rows, "photometric": photometric,
                        "bits_stored": params["bits_stored"]}
        masks[view] = {}
        for bone, m in sim["masks"][view].items():
            mname = f"{view}_mask_{bone}.nrrd"
            atomic_write_image(_mask_image(m, g), os.path.join(folder, mname))
            masks[view][bone] = mname
    atomic_write_image(sim["labels"], os.path.join(folder, "truth.nii.gz"))
    g = sim["ap_geometry"]
    meta = {
        "seed": seed,
        "side": side,
        "pixel_spacing_mm": list(g.spacing),
        "beam": "parallel (DESIGN.md); pixel spacing is at the isocentre; image centre on the isocentre",
        "format": fmt,
        "images": images,
        "height_offset_mm": sim["height_offset_mm"],
        "height_offset_sign": "positive: the lateral image's content is moved toward superior (up) relative to the AP",
        "rotation_deg": sim["rotation_deg"],
        "rotation_convention": "knee rotated about the isocentre by R = Rz @ Ry @ Rx, angles [x, y, z] in degrees, "
                               "right-handed in LPS, before projection",
        "truth": {"file": "truth.nii.gz", "labels": label_table(),
                  "frame": "LPS mm, identity direction; rotated as the X-rays show the knee; in the AP's frame "
                           "(the lateral view is offset by height_offset_mm)",
                  "voxel_mm": list(sim["labels"].GetSpacing())},
        "masks": masks,
        "masks_note": "uint8 0/1 per bone and view: the bone's projected silhouette on the image's pixels (same size, "
                      "spacing and origin as the image; the lateral masks carry the height offset); bones may overlap",
        "realism": sim["params"],
        "realism_rng": f"numpy.random.default_rng([{seed}, {REALISM_STREAM}])",
        "realism_config": config.to_dict(),
        "phantom": ph.params,
        "phantom_voxel_mm": voxel,
        "generator": "scripts/make_real_like_set.py",
        "time_s": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(meta, os.path.join(folder, "meta.json"))
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (cases go to OUT/case_<seed>/)")
    p.add_argument("--seed", type=int, default=TEST_SEED0, help=f"first phantom seed (test seeds start at {TEST_SEED0})")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--format", choices=["dicom", "nrrd"], default="dicom")
    p.add_argument("--pixel-spacing", type=float, default=0.5, help="detector pixel size in mm (default 0.5)")
    p.add_argument("--voxel", type=float, default=1.0, help="phantom CT voxel size in mm (default 1.0)")
    p.add_argument("--force", action="store_true", help="rebuild cases that are already complete")
    p.add_argument("--allow-non-test-seeds", action="store_true",
                   help=f"allow seeds below {TEST_SEED0} (those knees may have been trained on)")
    a = p.parse_args(argv)
    try:
        if a.count < 1:
            raise KneeReconError("--count must be at least 1")
        if a.seed < TEST_SEED0 and not a.allow_non_test_seeds:
            raise KneeReconError(f"seed {a.seed} is below the held-out test range (>= {TEST_SEED0}): training or "
                                 "validation knees would not test anything; pass --allow-non-test-seeds to do it anyway")
        if not a.pixel_spacing > 0 or not a.voxel > 0:
            raise KneeReconError("--pixel-spacing and --voxel must be positive")
        config = RealismConfig()
        config.validate()
        os.makedirs(a.out, exist_ok=True)
        rows = []
        for seed in range(a.seed, a.seed + a.count):
            cid = f"case_{seed:07d}"
            folder = os.path.join(a.out, cid)
            if a.force or not os.path.exists(os.path.join(folder, "meta.json")):
                meta = make_case(folder, seed, a.format, a.pixel_spacing, a.voxel, config)
                print(f"{folder}: {meta['side']} knee, height offset {meta['height_offset_mm']:+.2f} mm, rotation "
                      f"{', '.join(f'{r:+.1f}' for r in meta['rotation_deg'])} deg ({meta['time_s']:.1f} s)", flush=True)
            else:
                with open(os.path.join(folder, "meta.json")) as f:
                    meta = json.load(f)
                print(f"{folder}: already complete, skipped", flush=True)
            rows.append({"id": cid, "ap": os.path.join(cid, meta["images"]["ap"]["file"]),
                         "lateral": os.path.join(cid, meta["images"]["lateral"]["file"]), "side": meta["side"]})
        manifest = os.path.join(a.out, "manifest.csv")
        with atomic_path(manifest) as tmp:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, ["id", "ap", "lateral", "side"])
                w.writeheader()
                w.writerows(rows)
        print(f"{len(rows)} cases in {a.out}; manifest: {manifest}")
        return 0
    except KneeReconError as e:
        sys.stderr.write(f"make_real_like_set: error: {e}\n")
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
