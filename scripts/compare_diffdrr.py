#!/usr/bin/env python
"""KneeRecon's DRR projector against an independent one (DiffDRR), issue 14.

For each test CT and each geometry (parallel beam; cone beam SID 1100 / SOD 950 mm) this
renders AP and lateral DRRs with `kneerecon drr` (with --labels, for truth.nii.gz) and with
DiffDRR (`scripts/diffdrr_render.py`, run by the interpreter of a separate environment that has
diffdrr: --diffdrr-python), in the same geometry and with the same HU -> attenuation model, then
reports
  (a) image agreement per view: Pearson correlation, NCC of the image gradients, relative RMS and
      mean absolute difference after a least-squares intensity fit, the absolute gain between the
      two (1 = same line integrals), misregistration by phase correlation (whole image and the
      worst 64 px tile), and a flip test (NCC for all 8 flips/transposes of DiffDRR's image;
      the identity must win by a clear margin);
  (b) reconstruction agreement: `kneerecon reconstruct` on both pairs (the bundled model unless
      --model; --side given; cone geometry from the NRRD headers), Dice per bone of each against
      the truth (truth resampled onto the reconstruction's grid, nearest neighbour, by physical
      coordinates) and Dice between the two reconstructions.
Writes a table to stdout, docs/diffdrr.json, and the results section of docs/diffdrr.md.

Runs under KneeRecon's environment; on a shared CPU:
    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python scripts/compare_diffdrr.py
Missing test CTs are generated first (LLP26 held-out subjects, see DEFAULT_CASES). After the
bundled model changes, rerun with --reuse-renders: the DRRs are kept, the reconstructions redone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import SimpleITK as sitk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from KneeReconLib.core.labels import BONE_NAMES  # noqa: E402
from KneeReconLib.data.dataset import _read, _read_labelmap  # noqa: E402
from KneeReconLib.data.drr import DRRConfig, render_drr  # noqa: E402
from KneeReconLib.geometry.frame import to_knee_frame  # noqa: E402

# (seed, side): knees of the LLP26 cross-subject test people (5, 10, 15, 20), exact shapes
DEFAULT_CASES = ((3100010, "right"), (3100012, "right"), (3100020, "left"), (3100021, "left"))
BONES = tuple(BONE_NAMES)  # label values 1..4: femur, patella, tibia, fibula
RESULTS_BEGIN = "<!-- BEGIN RESULTS (written by scripts/compare_diffdrr.py; do not edit by hand) -->"
RESULTS_END = "<!-- END RESULTS -->"


def run(cmd: list[str], log: str) -> None:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if r.returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n--- {log}:\n{tail}")
    print(f"    {os.path.basename(log)[:-4]}: {time.perf_counter() - t0:.0f} s", flush=True)


def kneerecon_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "KneeReconLib", *map(str, args)]


# ---------------------------------------------------------------- image metrics
def ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def gradient_ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Mean of the NCCs of the row and column derivatives (as NGCC)."""
    ga, gb = np.gradient(a), np.gradient(b)
    return 0.5 * (ncc(ga[0], gb[0]) + ncc(ga[1], gb[1]))


def dihedral(a: np.ndarray) -> dict[str, np.ndarray]:
    return {"identity": a, "flip_rows": a[::-1], "flip_cols": a[:, ::-1], "rot180": a[::-1, ::-1],
            "transpose": a.T, "transpose_flip_rows": a.T[::-1], "transpose_flip_cols": a.T[:, ::-1],
            "transpose_rot180": a.T[::-1, ::-1]}


def flip_test(k: np.ndarray, d: np.ndarray) -> dict:
    """NCC of KneeRecon's image with each of the 8 flips/transposes of DiffDRR's, on the centred
    square crop both share (transposes need a square)."""
    n = min(k.shape)
    r0, c0 = (k.shape[0] - n) // 2, (k.shape[1] - n) // 2
    kc, dc = k[r0:r0 + n, c0:c0 + n], d[r0:r0 + n, c0:c0 + n]
    scores = {name: ncc(kc, t) for name, t in dihedral(dc).items()}
    others = max(v for name, v in scores.items() if name != "identity")
    return {"ncc": scores, "best": max(scores, key=scores.get), "margin": scores["identity"] - others}


def phase_shift(ref: np.ndarray, mov: np.ndarray, upsample: int = 20) -> np.ndarray:
    """(row, col) shift of `mov` against `ref` in px (skimage phase correlation, Hann-windowed)."""
    from skimage.registration import phase_cross_correlation

    w = np.outer(np.hanning(ref.shape[0]), np.hanning(ref.shape[1]))
    shift, _, _ = phase_cross_correlation((ref - ref.mean()) * w, (mov - mov.mean()) * w, upsample_factor=upsample)
    return -np.asarray(shift, float)  # skimage: the shift that registers mov onto ref


def misregistration(k: np.ndarray, d: np.ndarray, tile: int = 64) -> dict:
    g = phase_shift(k, d)
    shifts = []
    s_all = float(k.std())
    for r in range(0, k.shape[0] - tile + 1, tile):
        for c in range(0, k.shape[1] - tile + 1, tile):
            kt, dt = k[r:r + tile, c:c + tile], d[r:r + tile, c:c + tile]
            if kt.std() > 0.25 * s_all:  # tiles with structure (bone edges) only
                shifts.append(phase_shift(kt, dt))
    mags = [float(np.hypot(*s)) for s in shifts]
    return {"global_shift_rc_px": [round(float(x), 3) for x in g], "global_shift_px": float(np.hypot(*g)),
            "tiles": len(mags), "tile_max_shift_px": max(mags) if mags else float("nan"),
            "tile_median_shift_px": float(np.median(mags)) if mags else float("nan")}


def fitted_rel_rms(k: np.ndarray, d: np.ndarray) -> tuple[float, float, float, np.ndarray]:
    """Least-squares fit k ~ a d + b: (a, b, RMS(residual) / RMS(k), residual)."""
    A = np.stack([d.ravel(), np.ones(d.size)], 1)
    (a, b), *_ = np.linalg.lstsq(A, k.ravel(), rcond=None)
    res = k - (a * d + b)
    return float(a), float(b), float(np.sqrt((res ** 2).mean()) / np.sqrt((k ** 2).mean())), res


def image_metrics(k: np.ndarray, d: np.ndarray, smooth_px: float) -> dict:
    """k: KneeRecon's line integrals, d: DiffDRR's, same geometry and pixel grid. `smooth_px`:
    Gaussian sigma (px) for the *_smoothed figures (one CT voxel: the two projectors interpolate
    the voxels differently, bilinear vs nearest, which shows at sharp edges below that scale)."""
    from scipy.ndimage import gaussian_filter

    a, b, rel_rms, res = fitted_rel_rms(k, d)
    ks, ds = gaussian_filter(k, smooth_px), gaussian_filter(d, smooth_px)
    rng = float(k.max() - k.min())
    return {"pearson": ncc(k, d), "gradient_ncc": gradient_ncc(k, d),
            "smooth_sigma_px": smooth_px, "pearson_smoothed": ncc(ks, ds), "gradient_ncc_smoothed": gradient_ncc(ks, ds),
            "rel_rms_after_fit_smoothed": fitted_rel_rms(ks, ds)[2],
            "fit_gain": float(a), "fit_offset": float(b),
            "gain_through_zero": float((k * d).sum() / (d * d).sum()),
            "rel_rms_after_fit": rel_rms,
            "mad_after_fit_pct_range": float(np.abs(res).mean() / rng * 100),
            "mad_raw_pct_range": float(np.abs(k - d).mean() / rng * 100),
            "max_line_integral_kneerecon": float(k.max()), "max_line_integral_diffdrr": float(d.max()),
            **misregistration(k, d), "flip_test": flip_test(k, d)}


def read_diffdrr(path: str) -> np.ndarray:
    im = sitk.ReadImage(path)
    a = sitk.GetArrayFromImage(im).astype(np.float64)
    return a * float(im.GetMetaData("DiffDRR_mu_integral_per_count")) + float(im.GetMetaData("DiffDRR_mu_integral_offset"))


# ---------------------------------------------------------------- reconstruction metrics
def dice_per_bone(pred: sitk.Image, truth: sitk.Image) -> dict:
    """Dice per bone, `truth` resampled onto `pred`'s grid (nearest neighbour, physical coordinates)."""
    t = sitk.GetArrayFromImage(sitk.Resample(truth, pred, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    p = sitk.GetArrayFromImage(pred)
    out = {}
    for i, name in enumerate(BONES, start=1):
        s = (p == i).sum() + (t == i).sum()
        out[name] = float(2.0 * np.logical_and(p == i, t == i).sum() / s) if s else float("nan")
    return out


# ---------------------------------------------------------------- main
def ensure_cts(ct_dir: str, cases) -> list[tuple[str, str, str, str]]:
    """(name, ct, labels, side) for the default cases, generating missing CTs."""
    os.makedirs(ct_dir, exist_ok=True)
    out = []
    for seed, side in cases:
        name = f"knee_{seed:07d}"
        ct, lab = (os.path.join(ct_dir, f"{name}_{k}.nii.gz") for k in ("ct", "labels"))
        if not (os.path.exists(ct) and os.path.exists(lab)):
            print(f"generating {name} ({side})", flush=True)
            run(kneerecon_cmd("phantom", "--source", "llp26", "--subjects", "test", "--exact", "--seed", seed,
                              "--count", 1, "--side", side, "--voxel", 1.0, "--output", ct_dir),
                os.path.join(ct_dir, f"{name}_phantom.log"))
        pj = os.path.join(ct_dir, f"{name}_params.json")
        if os.path.exists(pj):
            with open(pj) as f:
                p = json.load(f)
            if p.get("side") != side:
                raise SystemExit(f"{pj}: side {p.get('side')} is not the expected {side}")
        out.append((name, ct, lab, side))
    return out


def compare_case(name, ct_path, lab_path, side, geoms, a) -> list[dict]:
    cdir = os.path.join(a.work, name)
    os.makedirs(cdir, exist_ok=True)
    ct_k, lab_k = to_knee_frame(_read(ct_path, "CT"), _read_labelmap(lab_path, None))  # as `kneerecon drr` does
    ct_knee_path = os.path.join(cdir, "ct_knee.nii.gz")
    if not os.path.exists(ct_knee_path):
        sitk.WriteImage(ct_k, ct_knee_path)
    params = {}
    pj = ct_path.replace("_ct.nii.gz", "_params.json")
    if os.path.exists(pj):
        with open(pj) as f:
            p = json.load(f)
        params = {k: p.get(k) for k in ("subject", "side", "flexion_deg")}
    rows = []
    for geom, (sid, sod) in geoms:
        gdir = os.path.join(cdir, geom)
        os.makedirs(gdir, exist_ok=True)
        mag = sid / sod if sid else 1.0
        det_px = a.iso_pixel * mag
        cone = ["--sid", sid, "--sod", sod] if sid else []
        kdir, ddir = os.path.join(gdir, "kneerecon"), os.path.join(gdir, "diffdrr")
        print(f"  {name} {geom}", flush=True)
        if not (a.reuse_renders and os.path.exists(os.path.join(kdir, "truth.nii.gz"))):
            run(kneerecon_cmd("drr", "--ct", ct_path, "--labels", lab_path, "--output", kdir,
                              "--pixel-spacing", repr(det_px), "--side", side, *cone), os.path.join(gdir, "kneerecon_drr.log"))
        # KneeRecon's line integrals (float, the same call as `kneerecon drr`) and its files' sizes
        views = render_drr(ct_k, DRRConfig(pixel_spacing=det_px, sid=sid, sod=sod, side=side))
        sizes = {}
        for v in ("ap", "lateral"):
            f = sitk.ReadImage(os.path.join(kdir, f"{v}.nrrd"))
            sizes[v] = f.GetSize()
            file_px = sitk.GetArrayFromImage(f).astype(np.float64)
            if file_px.shape != views[v][0].shape or ncc(file_px, views[v][0]) < 0.9999:
                raise SystemExit(f"{kdir}/{v}.nrrd is not the in-process render_drr image")
        if not (a.reuse_renders and os.path.exists(os.path.join(ddir, "lateral.nrrd"))):
            run([a.diffdrr_python, os.path.join(REPO, "scripts", "diffdrr_render.py"), "--ct", ct_knee_path,
                 "--output", ddir, "--side", side, "--pixel-spacing", repr(det_px), "--renderer", a.renderer,
                 "--ap-size", *map(str, sizes["ap"]), "--lateral-size", *map(str, sizes["lateral"]),
                 *map(str, cone)], os.path.join(gdir, "diffdrr_render.log"))
        row = {"case": name, **params, "side": side, "geometry": geom, "sid_mm": sid, "sod_mm": sod,
               "iso_pixel_mm": a.iso_pixel, "detector_pixel_mm": det_px, "views": {}}
        for v in ("ap", "lateral"):
            k = views[v][0].astype(np.float64)
            d = read_diffdrr(os.path.join(ddir, f"{v}.nrrd"))
            m = image_metrics(k, d, float(min(ct_k.GetSpacing())) / a.iso_pixel)
            m["size_wh"] = list(sizes[v])
            row["views"][v] = m
            ft = m["flip_test"]
            if ft["best"] != "identity" or ft["margin"] < a.flip_margin:
                raise SystemExit(f"{name} {geom} {v}: DiffDRR's image matches KneeRecon's best as {ft['best']} "
                                 f"(identity margin {ft['margin']:.3f}): orientation conventions disagree: {ft['ncc']}")
        if not a.no_reconstruct:
            truth = sitk.ReadImage(os.path.join(kdir, "truth.nii.gz"))
            recs = {}
            for who, src in (("kneerecon", kdir), ("diffdrr", ddir)):
                out = os.path.join(gdir, f"rec_{who}")
                extra = ["--model", a.model] if a.model else []
                run(kneerecon_cmd("reconstruct", "--ap", os.path.join(src, "ap.nrrd"),
                                  "--lateral", os.path.join(src, "lateral.nrrd"), "--side", side,
                                  "--output", out, "--force", *extra), os.path.join(gdir, f"reconstruct_{who}.log"))
                with open(os.path.join(out, "report.json")) as f:
                    rep = json.load(f)
                recs[who] = sitk.ReadImage(os.path.join(out, "labels.nii.gz"))
                row[f"dice_{who}_vs_truth"] = dice_per_bone(recs[who], truth)
                row[f"report_{who}"] = {"model": rep.get("model"), "input_geometry": rep.get("input_geometry"),
                                        "height_offset": rep.get("height_offset"), "notes": rep.get("notes"),
                                        "volumes_ml": rep.get("volumes_ml"), "device": rep.get("device"),
                                        "precision": rep.get("precision")}
                beams = {g["beam"] for g in rep["input_geometry"].values()}
                want = "cone" if sid else "parallel"
                if beams != {want}:
                    raise SystemExit(f"{out}: reconstruct read the {who} images as {beams}, expected {want}")
            row["dice_kneerecon_vs_diffdrr"] = dice_per_bone(recs["diffdrr"], recs["kneerecon"])
        rows.append(row)
    return rows


def fmt_table(rows: list[dict]) -> tuple[str, str]:
    """(image table, reconstruction table) in Markdown."""
    img = ["| case (subject, side) | geometry | view | size | Pearson | grad NCC | rel RMS (fit) | MAD % range (fit) | "
           "grad NCC, rel RMS (1-voxel blur) | gain K/D | shift px (global) | shift px (worst tile) | flip test: identity NCC (next best) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for v, m in r["views"].items():
            ft = m["flip_test"]
            nxt = max((s, n) for n, s in ft["ncc"].items() if n != "identity")
            img.append(f"| {r['case']} ({r.get('subject')}, {r['side']}) | {r['geometry']} | {v} | {m['size_wh'][0]}x{m['size_wh'][1]} | "
                       f"{m['pearson']:.5f} | {m['gradient_ncc']:.4f} | {m['rel_rms_after_fit'] * 100:.2f} % | "
                       f"{m['mad_after_fit_pct_range']:.3f} | {m['gradient_ncc_smoothed']:.4f}, {m['rel_rms_after_fit_smoothed'] * 100:.2f} % | "
                       f"{m['gain_through_zero']:.4f} | {m['global_shift_px']:.3f} | "
                       f"{m['tile_max_shift_px']:.3f} ({m['tiles']} tiles) | {ft['ncc']['identity']:.4f} ({nxt[0]:.4f} {nxt[1]}) |")
    rec = []
    if rows and "dice_kneerecon_vs_truth" in rows[0]:
        rec = ["| case | geometry | Dice K-DRR recon vs truth (F/P/T/Fi) | Dice DiffDRR recon vs truth (F/P/T/Fi) | "
               "Dice K recon vs DiffDRR recon (F/P/T/Fi) |", "|---|---|---|---|---|"]

        def f4(d):
            return " / ".join(f"{d[b]:.3f}" for b in BONES)
        for r in rows:
            rec.append(f"| {r['case']} | {r['geometry']} | {f4(r['dice_kneerecon_vs_truth'])} | "
                       f"{f4(r['dice_diffdrr_vs_truth'])} | {f4(r['dice_kneerecon_vs_diffdrr'])} |")
        for g in dict.fromkeys(r["geometry"] for r in rows):
            rs = [r for r in rows if r["geometry"] == g]
            mean = {k: {b: float(np.nanmean([r[k][b] for r in rs])) for b in BONES}
                    for k in ("dice_kneerecon_vs_truth", "dice_diffdrr_vs_truth", "dice_kneerecon_vs_diffdrr")}
            rec.append(f"| **mean** | {g} | {f4(mean['dice_kneerecon_vs_truth'])} | {f4(mean['dice_diffdrr_vs_truth'])} | "
                       f"{f4(mean['dice_kneerecon_vs_diffdrr'])} |")
    return "\n".join(img), "\n".join(rec)


def write_md(path: str, rows: list[dict], summary: dict, cmdline: str) -> None:
    img, rec = fmt_table(rows)
    m = summary.get("model") or {}
    block = [RESULTS_BEGIN, "",
             f"Generated {summary['created']} by `{cmdline}`; DiffDRR {summary.get('diffdrr_version')}, renderer "
             f"`{summary['renderer']}`; isocentre pixel {summary['iso_pixel_mm']} mm; "
             f"reconstruction model: **{m.get('name')} {m.get('version')}** (`{m.get('file')}`, sha256 "
             f"{str(m.get('sha256'))[:12]}..., {m.get('runtime')}).", "",
             "### Images (K = KneeRecon `kneerecon drr`, D = DiffDRR)", "", img, ""]
    if rec:
        block += ["### Reconstructions (Dice per bone: femur / patella / tibia / fibula)", "", rec, ""]
    block.append(RESULTS_END)
    text = "\n".join(block)
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if RESULTS_BEGIN in old and RESULTS_END in old:
            pre, rest = old.split(RESULTS_BEGIN, 1)
            post = rest.split(RESULTS_END, 1)[1]
            text = pre + text + post
        else:
            text = old.rstrip() + "\n\n## Results\n\n" + text + "\n"
    else:
        text = "# KneeRecon's DRRs against DiffDRR\n\n## Results\n\n" + text + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ct-dir", default="/tmp/diffdrr_work/ct", help="test CTs (generated there if missing)")
    p.add_argument("--work", default="/tmp/diffdrr_work/run", help="scratch folder for renders and reconstructions")
    p.add_argument("--diffdrr-python", default="/tmp/ddrvenv/bin/python", help="python of the environment with diffdrr")
    p.add_argument("--cases", nargs="*", metavar="SEED:SIDE", help=f"default {' '.join(f'{s}:{d}' for s, d in DEFAULT_CASES)}")
    p.add_argument("--geometries", nargs="*", choices=["parallel", "cone"], default=["parallel", "cone"])
    p.add_argument("--sid", type=float, default=1100.0)
    p.add_argument("--sod", type=float, default=950.0)
    p.add_argument("--iso-pixel", type=float, default=0.6, help="pixel size at the isocentre (mm)")
    p.add_argument("--renderer", choices=["siddon", "trilinear"], default="siddon")
    p.add_argument("--flip-margin", type=float, default=0.05, help="identity must beat every other flip's NCC by this")
    p.add_argument("--model", help="model for kneerecon reconstruct (default: the bundled one)")
    p.add_argument("--no-reconstruct", action="store_true")
    p.add_argument("--reuse-renders", action="store_true", help="keep DRRs already rendered (reconstructions are redone)")
    p.add_argument("--json", default=os.path.join(REPO, "docs", "diffdrr.json"))
    p.add_argument("--md", default=os.path.join(REPO, "docs", "diffdrr.md"))
    a = p.parse_args(argv)
    cases = [(int(c.split(":")[0]), c.split(":")[1]) for c in a.cases] if a.cases else DEFAULT_CASES
    geoms = [(g, (a.sid, a.sod) if g == "cone" else (None, None)) for g in a.geometries]
    t0 = time.perf_counter()
    rows = []
    for name, ct, lab, side in ensure_cts(a.ct_dir, cases):
        rows += compare_case(name, ct, lab, side, geoms, a)
    info = {}
    first = os.path.join(a.work, rows[0]["case"], rows[0]["geometry"], "diffdrr", "diffdrr_render.json")
    if os.path.exists(first):
        with open(first) as f:
            info = json.load(f)
    model = dict(rows[0].get("report_kneerecon", {}).get("model") or {}) if rows else {}
    if model:
        import hashlib
        path = a.model or os.path.join(REPO, "Resources", "Models", model.get("file") or "kneerecon_unet.pt")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                model["sha256"] = hashlib.sha256(f.read()).hexdigest()
        model["runtime"] = rows[0]["report_kneerecon"].get("precision")
    # the command as it was run (thread count and niceness as they were, not as recommended)
    prefix = (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else "") \
        + (f"nice -n {os.nice(0)} " if os.nice(0) else "")
    cmdline = prefix + "python scripts/compare_diffdrr.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": cmdline.strip(),
               "diffdrr_version": info.get("diffdrr_version"), "torch_in_diffdrr_env": info.get("torch"),
               "renderer": a.renderer, "render_dtype": info.get("dtype"), "iso_pixel_mm": a.iso_pixel,
               "parallel_approximation": "DiffDRR cone beam with SOD 1e6 mm, detector 1000 mm beyond the isocentre",
               "model": model, "seconds": round(time.perf_counter() - t0, 1)}
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"summary": summary, "rows": rows}, f, indent=1)
    img, rec = fmt_table(rows)
    print("\n" + img + "\n\n" + rec + "\n")
    if model:
        print(f"reconstruction model: {model.get('name')} {model.get('version')} ({model.get('file')}, "
              f"sha256 {model.get('sha256')}, {model.get('runtime')})")
    write_md(a.md, rows, summary, cmdline.strip())
    print(f"wrote {a.json} and the results section of {a.md} ({summary['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
