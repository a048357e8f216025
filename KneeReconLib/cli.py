"""`kneerecon` command line: reconstruct, reconstruct-batch, merge-batch, phantom, drr, cache, train,
evaluate. Every numeric option is checked (validation.py) before a command starts."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .core.errors import KneeReconError
from .io.validation import OneLineArgumentParser, validate_args

DISCLAIMER = "Research tool, not a medical device."
# optional packages (import name -> what to install): reconstruction needs none of them, other commands
# (training, DRRs, phantoms, evaluation, --backend torch) import them where they are used
OPTIONAL_PACKAGES = {"torch": ("PyTorch", "kneerecon[train]"), "scipy": ("scipy", "kneerecon[train]"),
                     "skimage": ("scikit-image", "kneerecon[train]"),
                     "musculoskeletal_models": ("musculoskeletal-models", "kneerecon[anatomy]"),
                     "gias3": ("gias3", "kneerecon[anatomy]")}


def _progress_printer(prefix: str = ""):
    last = {"t": time.perf_counter()}

    def show(frac: float, msg: str) -> None:
        bar = "#" * int(frac * 20)
        sys.stderr.write(f"\r{prefix}[{bar:<20}] {frac * 100:3.0f}%  {msg:<40}")
        if frac >= 1.0:
            sys.stderr.write("\n")
        sys.stderr.flush()
        last["t"] = time.perf_counter()
    return show


def _prewarm(a):
    """On the default CPU path, start compiling the bundled network's converted form while the rest
    of the pipeline is imported (openvino_backend.prewarm); None elsewhere."""
    if a.backend == "torch" or a.device != "cpu" or a.ensemble is not None or a.style:
        return None
    from .io import resources
    from .models import openvino_backend
    from .models.model_card import reconstruction_card

    path = os.path.abspath(a.model or resources.model_path(resources.UNET))
    try:
        card = reconstruction_card(path)
    except KneeReconError:  # reported by the reconstruction itself
        return None
    size, channels = int(card.get("grid_size", 128)), int(card.get("architecture", {}).get("in_channels", 2))
    return openvino_backend.prewarm(path, (1, channels, size, size, size))


def cmd_reconstruct(a) -> int:
    warming = _prewarm(a)
    try:
        return _reconstruct(a, warming)
    finally:  # never leave the compilation running into interpreter shutdown (an error exit included)
        if warming is not None:
            warming.join()


def _reconstruct(a, warming) -> int:
    from .reconstruction.inference import reconstruct
    from .reconstruction.outputs import check_output_folder, output_lock, write_outputs

    # the lock first: of two processes writing one folder, the second exits 2 instead of racing
    with output_lock(a.output):
        check_output_folder(a.output, a.force)  # fail before any work
        t0 = time.perf_counter()
        if warming is not None:
            warming.join()  # the Reconstructor's compilation then takes a few hundredths
        rec = reconstruct(a.ap, a.lateral, side=a.side, pixel_spacing=a.pixel_spacing, sid=a.sid, sod=a.sod,
                          model=a.model, device=a.device, progress=_progress_printer(),
                          height_offset=_height_offset_arg(a.height_offset), style=a.style, tta=a.tta,
                          backend=a.backend, ensemble=_ensemble_arg(a.ensemble), views_as_given=a.views_as_given,
                          refine=a.refine, quality_mode=a.quality, overlay=True)
        report = write_outputs(rec, a.output, a.force)
    total = time.perf_counter() - t0
    vols = ", ".join(f"{k} {v:.1f} ml" for k, v in report["volumes_ml"].items())
    print(f"wrote {a.output}: labels.nii.gz, segmentation.seg.nrrd, 4 STL surfaces, report.json, overlay.png")
    print(f"bone volumes: {vols}")
    print(f"time: {total:.2f} s ({', '.join(f'{k} {v:.2f}' for k, v in report['timings_s'].items())})")
    for n in report["notes"]:
        print(f"note: {n}")
    from .reconstruction.quality import summary_line
    print(summary_line(report["quality"]))
    for w in report["warnings"]:  # last, and on both streams: what a user must not miss
        print(f"WARNING: {w}")
        sys.stderr.write(f"kneerecon: WARNING: {w}\n")
    if a.fail_on_review and report["quality"].get("verdict") == "review":
        sys.stderr.write("kneerecon: the quality verdict is 'review' (--fail-on-review): exit 3; the outputs were written\n")
        return 3
    return 0


def _ensemble_arg(paths: list[str] | None) -> list[str] | None:
    """--ensemble alone: the bundled member; with paths: those models."""
    if paths is None:
        return None
    from .reconstruction.inference import DEFAULT_ENSEMBLE
    return paths or DEFAULT_ENSEMBLE


def _height_offset_arg(text: str):
    if text in ("auto", "none"):
        return text
    try:
        return float(text)
    except ValueError:
        raise KneeReconError(f"--height-offset must be 'auto', 'none' or a number of mm, got {text!r}")


def cmd_reconstruct_batch(a) -> int:
    from .reconstruction.batch import BatchConfig, parse_shard, run_batch

    cfg = BatchConfig(model=a.model, device=a.device, workers=a.workers, shard=parse_shard(a.shard),
                      views_as_given=a.views_as_given, tta=a.tta)
    path, rows = run_batch(a.manifest, a.output, cfg)
    failed = sum(r.get("status") != "ok" for r in rows)
    warned = sum(bool(r.get("warnings")) for r in rows)
    print(f"summary: {path} ({len(rows)} cases: {len(rows) - failed} reconstructed, {failed} failed, "
          f"{warned} with warnings)")
    return 0


def cmd_merge_batch(a) -> int:
    from .reconstruction.batch import merge_shards

    path, info = merge_shards(a.output, a.manifest)
    counts = ", ".join(f"{k} {v}" for k, v in info["status"].items())
    print(f"merged {info['shards']} shard summaries ({info['cases']} cases: {counts}) into {path}")
    return 0


def cmd_phantom(a) -> int:
    from .data.phantom import PhantomConfig, generate_phantom, write_phantom

    if not 0.25 <= a.voxel <= 2.0:
        raise KneeReconError(f"--voxel must be between 0.25 and 2 mm, got {a.voxel}")
    cfg = PhantomConfig(voxel_mm=a.voxel, side=a.side)
    llp = _llp26_config(a)
    if llp is not None:
        from dataclasses import replace

        from .data.llp26 import generate_llp26_phantom
        llp = replace(llp, voxel_mm=a.voxel)
    for i in range(a.count):
        seed = a.seed + i
        ph = generate_phantom(seed, cfg) if llp is None else generate_llp26_phantom(seed, llp, a.shape)
        ct, lab = write_phantom(ph, a.output, f"knee_{seed:07d}")
        with open(os.path.join(a.output, f"knee_{seed:07d}_params.json"), "w") as f:
            json.dump(ph.params, f, indent=1)
        print(f"{ct}  ({ph.params['side']} knee, flexion {ph.params['flexion_deg']:.1f} deg)")
    return 0


def cmd_drr(a) -> int:
    from .core.geometry import ReconGrid
    from .data.dataset import _read, _read_labelmap, labels_on_grid, parse_label_map
    from .data.drr import DRRConfig, render_drr
    from .geometry.frame import to_knee_frame
    from .io.fileio import atomic_write_image
    from .io.xray_io import write_xray

    ct = _read(a.ct, "CT")
    lab = _read_labelmap(a.labels, parse_label_map(a.label_map)) if a.labels else None
    ct_k, lab_k = to_knee_frame(ct, lab, voxel_mm=a.voxel)
    if (a.sid is None) != (a.sod is None):
        raise KneeReconError("give both --sid and --sod for a cone beam, or neither for a parallel beam")
    views = render_drr(ct_k, DRRConfig(pixel_spacing=a.pixel_spacing, sid=a.sid, sod=a.sod, side=a.side), device=a.device)
    os.makedirs(a.output, exist_ok=True)
    for v, (img, geom) in views.items():
        write_xray(img, geom, os.path.join(a.output, f"{v}.nrrd"))
    if lab_k is not None:
        grid = ReconGrid.from_views(views["ap"][1], views["lateral"][1], a.grid_size)
        atomic_write_image(grid.to_image(labels_on_grid(lab_k, grid)), os.path.join(a.output, "truth.nii.gz"))
        atomic_write_image(lab_k, os.path.join(a.output, "truth_fullres.nii.gz"))
    print(f"wrote {a.output}/ap.nrrd and lateral.nrrd" + (" and truth.nii.gz" if lab_k is not None else ""))
    return 0


def cmd_cache(a) -> int:
    from .data.dataset import build_phantom_cache, find_ct_pairs, parse_label_map, save_case, user_case

    if a.user_data:
        lm = parse_label_map(a.label_map)
        os.makedirs(a.output, exist_ok=True)
        for ct, lab in find_ct_pairs(a.user_data):
            p = os.path.join(a.output, os.path.basename(ct).split(".")[0] + ".npz")
            if not os.path.exists(p):
                save_case(user_case(ct, lab, a.grid_size, label_map=lm), p)
                print(f"cached {p}")
    else:
        from .data.dataset import GeometryConfig
        from .data.phantom import PhantomConfig

        if not 0.0 <= a.collimate_p <= 1.0:
            raise KneeReconError(f"--collimate-p must be between 0 and 1, got {a.collimate_p}")
        geometry = None if a.geometry == "parallel-full" else GeometryConfig(
            cone_p={"mixed": GeometryConfig.cone_p, "cone": 1.0, "parallel": 0.0}[a.geometry], collimate_p=a.collimate_p)
        build_phantom_cache(a.output, range(a.seed, a.seed + a.count), a.grid_size, PhantomConfig(),
                            geometry=geometry, source=a.source, llp26=_llp26_config(a))
    return 0


def _llp26_config(a):
    """LLP26Config from --subjects (e.g. '1-4,6-9' or 'train' / 'test'); None for the procedural source."""
    if getattr(a, "source", "procedural") != "llp26":
        return None
    from .data.llp26 import TEST_SUBJECTS, TRAIN_SUBJECTS, LLP26Config, check_subjects

    text = (a.subjects or "train").strip()
    if text in ("train", "test"):
        subjects = TRAIN_SUBJECTS if text == "train" else TEST_SUBJECTS
    else:
        subjects = []
        try:
            for part in text.split(","):
                lo, _, hi = part.partition("-")
                subjects += list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise KneeReconError(f"--subjects must be 'train', 'test' or ids like '1-4,6', got {text!r}")
    cfg = LLP26Config(subjects=check_subjects(subjects), side=getattr(a, "side", "random") or "random")
    if text == "test" or getattr(a, "exact", False):  # the people themselves: no new shapes, no warp, true size
        cfg.pca_p, cfg.warp_mm, cfg.scale = 0.0, (0.0, 0.0), (1.0, 1.0)
    return cfg


def cmd_train(a) -> int:
    from .models.chen_net import ChenNetConfig
    from .models.network import UNetConfig
    from .training.train import TrainConfig, train

    widths_text = a.widths or ("16,32,64,128" if a.arch == "chen" else "8,16,32,64,128")
    try:
        widths = tuple(int(w) for w in widths_text.split(","))
    except ValueError:
        raise KneeReconError(f"--widths must be comma-separated integers, got {widths_text!r}")
    arch = (ChenNetConfig(widths=widths) if a.arch == "chen" else UNetConfig(widths=widths)).to_dict()
    cfg = TrainConfig(data=a.data, phantoms_on_the_fly=a.phantoms_on_the_fly, val_data=a.val_data or [], out=a.output,
                      steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=a.warmup,
                      crop=None if a.crop == 0 else (a.crop,) * 3, ngcc_lambda=a.ngcc_lambda, dice_weight=a.dice_weight,
                      architecture=arch, device=a.device, amp=not a.no_amp, workers=a.workers, seed=a.seed,
                      val_every=a.val_every, ckpt_every=a.ckpt_every, grid_size=a.grid_size, threads=a.threads,
                      log_every=a.log_every, init_from=a.init_from, slab_p=a.slab_p, slab_depth=a.slab_depth,
                      ema_decay=a.ema)
    if a.crop_z:
        cfg.crop = (a.crop_z, cfg.grid_size, cfg.grid_size)
    cfg.augment["realism_p"] = a.realism_p
    if not a.data and not a.phantoms_on_the_fly:
        raise KneeReconError("give --data FOLDER (cached cases, see `kneerecon cache`) or --phantoms-on-the-fly")
    path = train(cfg, resume=a.resume, log=lambda m: print(m, flush=True), stop_at=a.stop_at)
    print(f"{'checkpoint' if a.stop_at and a.stop_at < a.steps else 'model'} written to {path}")
    return 0


def cmd_train_style(a) -> int:
    from .models.style import StyleConfig, train_style

    cfg = StyleConfig(real=a.real, drr=a.drr, out=a.output, steps=a.steps, crop=a.crop, pixel_mm=a.pixel_mm,
                      base=a.base, res_blocks=a.res_blocks, device=a.device, seed=a.seed, threads=a.threads,
                      ckpt_every=a.ckpt_every, log_every=a.log_every)
    path = train_style(cfg, resume=a.resume, log=lambda m: print(m, flush=True))
    print(f"style model written to {path}")
    return 0


def cmd_build_ssm(a) -> int:
    import glob

    from .baselines.shape_model import build_shape_model
    from .data.dataset import load_case
    from .reconstruction.inference import detect_side

    paths = sorted(p for d in a.data for p in glob.glob(os.path.join(d, "*.npz")))[: a.cases]
    if not paths:
        raise KneeReconError(f"no cached cases (*.npz) in {a.data}")

    def shapes():
        for p in paths:
            c = load_case(p)
            side = c.meta.get("side") or detect_side(c.labels, c.grid())
            if side:  # a shape whose side is unknown cannot be mirrored into the model's frame
                yield c.labels, c.grid(), side
    model = build_shape_model(shapes(), spacing_mm=a.spacing, n_modes=a.modes)
    model.info["training_cases"] = [os.path.basename(p) for p in paths]
    model.save(a.output)
    print(f"shape model of {len(paths)} cases written to {a.output}")
    return 0


def cmd_evaluate_2d(a) -> int:
    from .evaluation.evaluate2d import evaluate_2d, format_table_2d
    from .io.fileio import atomic_path

    res = evaluate_2d(a.masks, a.model, a.device, _height_offset_arg(a.height_offset), style=a.style)
    print(format_table_2d(res))
    if a.output:
        os.makedirs(a.output, exist_ok=True)
        with atomic_path(os.path.join(a.output, "evaluation_2d.json")) as tmp, open(tmp, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def cmd_export_openvino(a) -> int:
    from .models.openvino_backend import export_ir
    from .reconstruction.inference import DEFAULT_MODEL

    if a.int8:
        from .models.quantize import quantize_ir

        if not a.calibration:
            raise KneeReconError("--int8 needs --calibration: folders of cached training cases (kneerecon cache)")
        path = quantize_ir(a.model or DEFAULT_MODEL, a.calibration, a.calibration_count, a.output)
        print(f"wrote {path} and {path[:-4]}.bin (int8 OpenVINO IR; used by reconstruct on CPUs without native bf16 "
              "when it sits beside the model file)")
        return 0
    path = export_ir(a.model or DEFAULT_MODEL, a.output, a.grid_size)
    print(f"wrote {path} and {path[:-4]}.bin (OpenVINO IR; used by reconstruct when it sits beside the model file)")
    return 0


def cmd_evaluate(a) -> int:
    from .evaluation.evaluate import evaluate_files, evaluate_model, print_table

    if a.methods:
        from .baselines.comparison import compare_methods, format_comparison, parse_methods
        from .baselines.registration import FitConfig

        if not a.data:
            raise KneeReconError("--methods compares on cached test cases: give --data FOLDER")
        res = compare_methods(parse_methods(a.methods), a.data, model=a.model, chen_model=a.chen_model, ssm=a.ssm,
                              fit_config=FitConfig(iterations=a.fit_iterations), device=a.device, out_dir=a.output)
        print(format_comparison(res))
        if a.output:
            print(f"per-case and summary results in {a.output}/ (comparison.csv, comparison.json)")
        return 0
    if a.case_dirs:
        rows = evaluate_files(a.model, a.case_dirs, device=a.device, style=a.style, ensemble=_ensemble_arg(a.ensemble),
                              backend=a.backend, refine=a.refine, tta=a.tta)
        if a.output:
            from .io.fileio import atomic_write_json
            atomic_write_json(rows, os.path.join(a.output, "evaluation_files.json"))
        if not a.data and not a.phantoms:
            return 0

    res = evaluate_model(a.model, a.data, device=a.device, out_dir=a.output, phantoms=a.phantoms, seed0=a.seed, tta=a.tta,
                         backend=a.backend, ensemble=_ensemble_arg(a.ensemble))
    print_table(res)
    if a.output:
        print(f"per-case and summary results in {a.output}/ (evaluation.csv, evaluation.json)")
    return 0


def version_text() -> str:
    """'kneerecon 0.7.0 (bundled model: KneeRecon U-Net 0.7.0)', read without PyTorch."""
    from . import __version__
    from .io import resources
    from .models.model_card import describe, read_card

    path = resources.model_path()
    try:
        model = f"bundled model: {describe(read_card(path))}"
    except KneeReconError:
        model = f"bundled model missing or unreadable: {path}"
    return f"kneerecon {__version__} ({model})"


class _VersionAction(argparse.Action):
    """--version, worked out only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="kneerecon", description=f"3D knee bones from two X-rays. {DISCLAIMER}")
    p.add_argument("--version", action=_VersionAction, help="print KneeRecon's version and the bundled model's, then exit")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("reconstruct", help="reconstruct femur, patella, tibia and fibula from an AP and a lateral X-ray",
                       description="Reconstruct the knee bones in 3D from one AP and one lateral radiograph of the same "
                       "knee. Writes labels.nii.gz, segmentation.seg.nrrd (Slicer), one STL per bone, report.json and "
                       f"overlay.png (the bones outlined on both X-rays: check it). {DISCLAIMER}")
    r.add_argument("--ap", required=True, help="antero-posterior X-ray (DICOM, NRRD, MHA, NIfTI, PNG, TIFF, JPEG)")
    r.add_argument("--lateral", required=True, help="lateral X-ray of the same knee")
    r.add_argument("--output", required=True, help="output folder (refused if it exists, unless --force)")
    r.add_argument("--side", choices=["left", "right"], help="which knee (default: detected from the reconstructed fibula; give it for cone-beam geometry)")
    r.add_argument("--pixel-spacing", type=float, metavar="MM",
                   help="detector pixel size in mm; required for PNG/JPEG/TIFF, overrides the file's spacing")
    r.add_argument("--sid", type=float, metavar="MM", help="source-to-image distance, for cone-beam geometry")
    r.add_argument("--sod", type=float, metavar="MM", help="source-to-isocentre (object) distance, with --sid")
    r.add_argument("--model", help="model file (default: the bundled model)")
    r.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    r.add_argument("--force", action="store_true", help="replace an existing output folder")
    r.add_argument("--backend", choices=["auto", "torch", "openvino"], default="auto",
                   help="network runtime on the CPU: OpenVINO where installed (auto, default; about 1.6x faster, and "
                        "no PyTorch needed), or PyTorch")
    r.add_argument("--ensemble", nargs="*", metavar="MODEL",
                   help="average the class probabilities with further models (alone: the bundled ChenNet); more "
                        "accurate on every test set we have, about 3-4x the network time (PyTorch backend)")
    r.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="mirror test-time augmentation (default on): also reconstruct the knee mirrored left-right and "
                        "average the class probabilities; better on every bone of the cross-subject test, about twice "
                        "the network time (--no-tta: one pass, faster)")
    r.add_argument("--style", metavar="MODEL", help="style model (kneerecon train-style): translate real radiographs to "
                                                    "DRR style before reconstructing")
    r.add_argument("--height-offset", default="auto", metavar="auto|none|MM",
                   help="vertical offset of the lateral view against the AP: estimated from the images and corrected "
                        "(auto, default), not corrected (none), or this many mm (positive: lateral content higher)")
    r.add_argument("--fail-on-review", action="store_true",
                   help="exit with status 3 (after writing the outputs) when the quality report's verdict is 'review' "
                        "(a bone disagrees with the X-rays or is implausible), for pipelines")
    r.add_argument("--quality", choices=["standard", "thorough"], default="standard",
                   help="the quality report: standard (about 0.2 s), or thorough: also a second network pass on "
                        "perturbed inputs, whose disagreement with the first marks an unstable bone (one more network "
                        "time)")
    r.add_argument("--refine", type=int, choices=[1, 2, 3], default=1,
                   help="labels.nii.gz and the surfaces on a grid this many times finer per axis than DESIGN.md's "
                        "128^3 (2: 0.78 mm voxels over a 200 mm field), from the network's class scores interpolated "
                        "between its voxels: closer to the true bone boundary, 8x the file size (default 1)")
    r.add_argument("--views-as-given", action="store_true",
                   help="skip the check that --ap looks like an AP view and --lateral like a lateral one (a pair that "
                        "looks swapped is refused otherwise)")
    r.set_defaults(func=cmd_reconstruct)

    rb = sub.add_parser("reconstruct-batch", help="reconstruct many X-ray pairs listed in a CSV manifest (resumable)",
                        description="Manifest columns: id, ap, lateral [, side, pixel_spacing, sid, sod]. Each case is "
                        "written to OUTPUT/<id>/ (complete or not at all); cases already done are skipped, so a killed "
                        "batch is resumed by running it again; OUTPUT/summary.csv lists all cases.")
    rb.add_argument("manifest")
    rb.add_argument("--output", required=True)
    rb.add_argument("--model")
    rb.add_argument("--device", default="cpu")
    rb.add_argument("--workers", type=int, default=1, help="parallel processes (threads are split between them)")
    rb.add_argument("--shard", metavar="K/N", help="run only shard K of N (cases by a hash of their id; writes "
                    "OUTPUT/summary-K-of-N.csv): one per SLURM array task or Kubernetes indexed job; then merge-batch")
    rb.add_argument("--views-as-given", action="store_true", help="skip the AP/lateral view check (see reconstruct)")
    rb.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                    help="mirror test-time augmentation (default on, see reconstruct); --no-tta: one pass, faster")
    rb.set_defaults(func=cmd_reconstruct_batch)

    mb = sub.add_parser("merge-batch", help="merge the shard summaries of reconstruct-batch --shard into summary.csv",
                        description="Checks that the summaries of shards 1..N are all there and that every case is in "
                        "exactly one of them (with --manifest: every case of the manifest), then writes "
                        "OUTPUT/summary.csv in the manifest's order.")
    mb.add_argument("--output", required=True, help="the batch's output folder (holding summary-K-of-N.csv)")
    mb.add_argument("--manifest", help="the manifest: check that the shards cover it exactly once")
    mb.set_defaults(func=cmd_merge_batch)

    ph = sub.add_parser("phantom", help="generate labelled knee CT phantoms")
    ph.add_argument("--count", type=int, default=1)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--output", required=True)
    ph.add_argument("--side", choices=["left", "right", "random"], default="random")
    ph.add_argument("--voxel", type=float, default=1.0, help="voxel size in mm (0.5-1)")
    ph.add_argument("--source", choices=["procedural", "llp26"], default="procedural",
                    help="anatomy: KneeRecon's procedural generator, or real people's bone surfaces from the LLP26 "
                         "shape model (needs kneerecon[anatomy])")
    ph.add_argument("--subjects", help="llp26: 'train' (default: subjects 1-20 less our test four), 'test' (5,10,15,20, "
                                       "exact shapes) or ids like '1-4,6'; 21-26 are refused")
    ph.add_argument("--exact", action="store_true", help="llp26: the subjects' own shapes (no PCA shapes, warp or scaling)")
    ph.add_argument("--shape", choices=["sample", "mean"], default="sample",
                    help="llp26: 'mean' builds the training mean shape at the sampled knee's pose (a baseline)")
    ph.set_defaults(func=cmd_phantom)

    d = sub.add_parser("drr", help="render AP and lateral DRRs of a CT (written like real X-ray files)")
    d.add_argument("--ct", required=True)
    d.add_argument("--labels", help="label map of the CT: also writes truth.nii.gz on the reconstruction grid")
    d.add_argument("--label-map", help="label mapping 'src:dst,...' or JSON file (e.g. for TotalSegmentator labels)")
    d.add_argument("--output", required=True)
    d.add_argument("--pixel-spacing", type=float)
    d.add_argument("--sid", type=float)
    d.add_argument("--sod", type=float)
    d.add_argument("--side", choices=["left", "right"], default="right")
    d.add_argument("--voxel", type=float, help="resample the CT to this voxel size (mm) first")
    d.add_argument("--grid-size", type=int, default=128)
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=cmd_drr)

    c = sub.add_parser("cache", help="build cached training cases from phantoms or a labelled-CT folder")
    c.add_argument("--output", required=True)
    c.add_argument("--count", type=int, default=100)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--user-data", help="folder of <name>_ct.nii.gz + <name>_labels.nii.gz")
    c.add_argument("--label-map")
    c.add_argument("--grid-size", type=int, default=128)
    c.add_argument("--source", choices=["procedural", "llp26"], default="procedural", help="anatomy source (see phantom)")
    c.add_argument("--subjects", help="llp26 subjects (see phantom)")
    c.add_argument("--exact", action="store_true", help="llp26: the subjects' own shapes")
    c.add_argument("--geometry", choices=["parallel-full", "mixed", "parallel", "cone"], default="parallel-full",
                   help="radiograph geometry: parallel-full (parallel beam covering the CT, as before 0.4), mixed (60%% "
                        "cone beam, SID 900-1300 mm, magnification 1.05-1.3 per view, collimated fields 90 mm up, "
                        "pixels 0.4-1 mm, varied bone attenuation), or that mix all parallel / all cone")
    c.add_argument("--collimate-p", type=float, default=0.5,  # GeometryConfig.collimate_p
                   help="with --geometry mixed/parallel/cone: share of views with a field smaller than the CT (default 0.5)")
    c.set_defaults(func=cmd_cache)

    t = sub.add_parser("train", help="train the reconstruction network")
    t.add_argument("--data", nargs="*", default=[], help="folders of cached cases")
    t.add_argument("--phantoms-on-the-fly", action="store_true")
    t.add_argument("--val-data", nargs="*")
    t.add_argument("--output", required=True)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--crop", type=int, default=80, help="cubic random crop size (0 = full grid)")
    t.add_argument("--crop-z", type=int, help="crop slabs of this height spanning full x and y (enables NGCC)")
    t.add_argument("--slab-p", type=float, default=0.0,
                   help="fraction of steps on full-x/y slabs of --slab-depth (whole rays, NGCC applies) instead of --crop")
    t.add_argument("--slab-depth", type=int, default=32)
    t.add_argument("--realism-p", type=float, default=0.0,
                   help="fraction of views passed through the radiograph simulator (docs/realism.md) instead of the "
                        "simple intensity augmentation, for robustness to real radiographs")
    t.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights, e.g. 0.999 (0 = off); model.pt uses the average")
    t.add_argument("--ngcc-lambda", type=float, default=0.0,
                   help="weight of the NGCC projection loss (active when crops span whole rays: --crop 0 or --crop-z)")
    t.add_argument("--dice-weight", type=float, default=1.0, help="weight of the soft Dice term")
    t.add_argument("--warmup", type=int, default=100, help="learning-rate warm-up steps")
    t.add_argument("--init-from", help="start from this model file's weights (fine-tuning)")
    t.add_argument("--arch", choices=("unet", "chen"), default="unet",
                   help="unet: the 3D U-Net of Kasten et al.; chen: 2D encoder per view + 3D decoder (Chen et al. 2020)")
    t.add_argument("--widths", help="channels per scale (default unet 8,16,32,64,128; chen, of the 2D encoders: 16,32,64,128)")
    t.add_argument("--device", default="cpu")
    t.add_argument("--no-amp", action="store_true")
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-every", type=int, default=250)
    t.add_argument("--ckpt-every", type=int, default=100)
    t.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint.pt")
    t.add_argument("--stop-at", type=int, help="end this run at this step (a resumable chunk)")
    t.add_argument("--grid-size", type=int, default=128, help="grid of the cached cases")
    t.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = default)")
    t.add_argument("--log-every", type=int, default=10)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="Dice and surface distances per bone, in the paper's table format")
    e.add_argument("--model", help="model file (default: the bundled model)")
    e.add_argument("--data", nargs="*", default=[], help="folders of cached cases (.npz)")
    e.add_argument("--phantoms", type=int, default=0, help="also evaluate on N fresh phantoms")
    e.add_argument("--case-dirs", nargs="*", default=[],
                   help="folders with ap.*, lateral.*, truth.nii.gz (+ meta.json): reconstruct the files and compare "
                   "with the truth by physical coordinates (e.g. ../shared/contract-check/knee_a)")
    e.add_argument("--seed", type=int, default=1_000_000, help="first seed of --phantoms (test range)")
    e.add_argument("--ensemble", nargs="*", metavar="MODEL",
                   help="average the class probabilities with further models (alone: the bundled ChenNet); more "
                        "accurate on every test set we have, about 3-4x the network time (PyTorch backend)")
    e.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                   help="mirror test-time augmentation, as reconstruct does by default (--no-tta: one pass)")
    e.add_argument("--style", metavar="MODEL", help="with --case-dirs: translate the X-rays with this style model first")
    e.add_argument("--refine", type=int, choices=[1, 2, 3], default=1, help="with --case-dirs: see reconstruct --refine")
    e.add_argument("--output", help="folder for evaluation.csv and evaluation.json")
    e.add_argument("--device", default="cpu")
    e.add_argument("--backend", choices=["auto", "torch", "openvino"], default="auto",
                   help="network runtime on the CPU: OpenVINO where installed (auto, default; about 1.6x faster), or PyTorch")
    e.add_argument("--methods", metavar="M1,M2", help="compare methods on --data in one table: kasten, chen, ssm, "
                   "ssm-perturbed, kasten+ssm (see KneeReconLib/baselines/comparison.py)")
    e.add_argument("--chen-model", metavar="MODEL", help="ChenNet model for --methods chen (kneerecon train --arch chen)")
    e.add_argument("--ssm", metavar="FILE", help="shape model for the ssm methods (kneerecon build-ssm)")
    e.add_argument("--fit-iterations", type=int, default=150, help="registration iterations of the ssm methods")
    e.set_defaults(func=cmd_evaluate)

    ox = sub.add_parser("export-openvino", help="convert a model to OpenVINO IR for the fast CPU backend",
                        description="Writes <model>.openvino.xml/.bin beside the model (or --output), which reconstruct "
                        "then uses; without it the first reconstruction converts the model (~10 s) into a cache folder.")
    ox.add_argument("--model", help="model file (default: the bundled model)")
    ox.add_argument("--output", help="IR .xml path (default: beside the model file)")
    ox.add_argument("--grid-size", type=int, help="grid of the input (default: the model card's)")
    ox.add_argument("--int8", action="store_true",
                    help="write the int8 IR (<model>.int8.openvino.xml) by post-training quantization instead "
                         "(needs nncf; used on CPUs without native bf16)")
    ox.add_argument("--calibration", nargs="+", help="with --int8: folders of cached training cases (kneerecon cache)")
    ox.add_argument("--calibration-count", type=int, default=20, help="with --int8: calibration inputs (default 20)")
    ox.set_defaults(func=cmd_export_openvino)

    bs = sub.add_parser("build-ssm", help="build the statistical shape models (PCA of bone SDFs) for the ssm methods")
    bs.add_argument("--data", nargs="+", required=True, help="folders of cached training cases (.npz)")
    bs.add_argument("--output", required=True, help="shape model file (.npz)")
    bs.add_argument("--cases", type=int, default=100, help="at most this many training shapes")
    bs.add_argument("--modes", type=int, default=12)
    bs.add_argument("--spacing", type=float, default=2.0, help="canonical grid spacing in mm")
    bs.set_defaults(func=cmd_build_ssm)

    ts = sub.add_parser("train-style", help="train the real-radiograph -> DRR style transfer (CycleGAN, unpaired)")
    ts.add_argument("--real", nargs="+", required=True, help="folders of real (or real-like) X-ray files")
    ts.add_argument("--drr", nargs="+", required=True, help="folders of DRR files or cached cases (.npz)")
    ts.add_argument("--output", required=True)
    ts.add_argument("--steps", type=int, default=2000)
    ts.add_argument("--crop", type=int, default=128)
    ts.add_argument("--pixel-mm", type=float, default=1.0)
    ts.add_argument("--base", type=int, default=16)
    ts.add_argument("--res-blocks", type=int, default=4)
    ts.add_argument("--device", default="cpu")
    ts.add_argument("--seed", type=int, default=0)
    ts.add_argument("--threads", type=int, default=0)
    ts.add_argument("--ckpt-every", type=int, default=200)
    ts.add_argument("--log-every", type=int, default=20)
    ts.add_argument("--resume", action="store_true")
    ts.set_defaults(func=cmd_train_style)

    e2 = sub.add_parser("evaluate-2d", help="project reconstructions onto each X-ray and compare with 2D bone masks "
                                            "(2D Dice and Chamfer per bone, the paper's real-radiograph protocol)")
    e2.add_argument("--masks", required=True, metavar="DIR",
                    help="a case folder, or a folder of them: ap.*, lateral.*, ap_mask_<bone>.* and lateral_mask_<bone>.* "
                         "(or one label image per view: ap_mask.*, lateral_mask.*), optional meta.json with side")
    e2.add_argument("--model", help="model file (default: the bundled model)")
    e2.add_argument("--height-offset", default="auto", metavar="auto|none|MM")
    e2.add_argument("--style", metavar="MODEL", help="translate the X-rays with this style model first")
    e2.add_argument("--output", help="folder for evaluation_2d.json")
    e2.add_argument("--device", default="cpu")
    e2.set_defaults(func=cmd_evaluate_2d)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate_args(args)  # NaN, inf, negative, absurd: one line and exit 2 before any work
        return args.func(args)
    except KneeReconError as e:
        sys.stderr.write(f"\nkneerecon: error: {e}\n")
        return e.exit_code
    except ModuleNotFoundError as e:  # an optional package this command needs (not reconstruct's)
        missing = OPTIONAL_PACKAGES.get((e.name or "").split(".")[0])
        if missing is None:
            raise
        sys.stderr.write(f"\nkneerecon: error: kneerecon {args.command} needs {missing[0]}, which is not installed: "
                         f"pip install '{missing[1]}'\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\nkneerecon: interrupted; no partial output was kept\n")
        return 130


def entry() -> None:
    """The `kneerecon` console command (and `python -m KneeReconLib`): main(), then for
    `reconstruct` an exit without the interpreter's teardown. Unloading OpenVINO's CPU plugin, VTK
    and a thousand modules costs 0.1-0.2 s after the work is done (BENCHMARKS.md); by then every
    output is written, closed and renamed into place and the compile thread joined, so only the
    standard streams remain to be flushed. Other commands (training's worker processes) exit as usual."""
    argv = sys.argv[1:]
    code = main(argv)
    if argv[:1] == ["reconstruct"]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
