"""Turn a finished training run into the bundled model: evaluate it on the held-out test set,
write Resources/Models/kneerecon_unet.pt (fp16, card inside), its converted network
(kneerecon_unet.openvino.xml/.bin, which records the .pt's SHA-256: reconstruction without PyTorch
runs from it) and MODEL_CARD.md. Needs PyTorch and openvino (requirements-test.txt).

    python scripts/bundle_model.py RUN_DIR --test cache/test_proc_v2 --cross-subject cache/xs2_parallel cache/xs2_cone \
        --baseline xs2_parallel=docs/mean_shape_baseline_parallel.json,xs2_cone=docs/mean_shape_baseline_cone.json \
        [--hours H --device-desc "..."]

(the test sets with whole legs, built 2026-12-03 on: docs/leg_field.json; the mean-shape baseline
is the same on the old and the rebuilt sets, whose bones, poses and grids are identical)

To re-export only the converted network of an already bundled model (e.g. after changing the
conversion), `kneerecon export-openvino` does the same as the end of this script."""
import argparse
import json
import os
import sys
from unittest import mock

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from KneeReconLib import __version__  # noqa: E402
from KneeReconLib.core.labels import BONE_NAMES  # noqa: E402
from KneeReconLib.data.phantom import PhantomConfig  # noqa: E402
from KneeReconLib.evaluation.evaluate import evaluate_files, evaluate_model, format_table  # noqa: E402
from KneeReconLib.models import openvino_backend
from KneeReconLib.models.checkpoint import load_model, read_model_file, save_model  # noqa: E402
from KneeReconLib.training.train import recalibrate_batchnorm, recalibration_samples  # noqa: E402


def _cross_subject_md(cross: dict) -> str:
    """The card's headline: held-out people, per geometry, beside the mean-shape baseline and the paper."""
    if not cross:
        return ""
    head = "| | " + " | ".join(f"Dice {n}" for n in BONE_NAMES) + " | " + " | ".join(f"ASSD {n} (mm)" for n in BONE_NAMES) + " |"
    rows = [head, "|---|" + "---|" * 8]
    for name, r in cross.items():
        rows.append(f"| this model, {name} ({r['cases']} cases) | " + " | ".join(f"{r[f'dice_{n}']:.3f}" for n in BONE_NAMES)
                    + " | " + " | ".join(f"{r[f'assd_{n}']:.2f}" for n in BONE_NAMES) + " |")
        b = r.get("mean_shape_baseline")
        if b:
            rows.append(f"| mean shape at the true pose, {name} | " + " | ".join(f"{b[f'dice_{n}']:.3f}" for n in BONE_NAMES)
                        + " | " + " | ".join(f"{b[f'assd_{n}']:.2f}" for n in BONE_NAMES) + " |")
    rows.append("| Kasten 2020 (DRRs of real CT, Dice; Chamfer 1.075/1.709/1.175/1.218 mm) | 0.943 | 0.894 | 0.945 | 0.848 | - | - | - | - |")
    rows.append("| SSR-KD 2025 | 0.961 | 0.875 | 0.960 | 0.841 | 0.80 | 1.12 | 0.77 | 1.05 |")
    return ("## Cross-subject test: people the model never saw (the headline)\n\n"
            "Knees built from LLP26 subjects 5, 10, 15 and 20 (held out of training and of the shape statistics), "
            "exact shapes and sizes, 6 poses each (left and right alternating, flexion 0-40 degrees), rendered in "
            "parallel and in cone beam, the CT holding the whole leg (`python scripts/cross_subject.py build --out cache/xs2 --poses 6`, "
            "`kneerecon evaluate --data cache/xs2_parallel`). Mean-shape baseline: the 16 training people's mean shape "
            "placed at each knee's true pose (`python scripts/cross_subject.py baseline --data cache/xs2_parallel`).\n\n"
            + "\n".join(rows) + "\n\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--test", default=os.path.join(ROOT, "cache", "test"))
    p.add_argument("--out", default=os.path.join(ROOT, "Resources", "Models"))
    p.add_argument("--hours", type=float, required=True, help="wall-clock training time")
    p.add_argument("--device-desc", default="2-core CPU (no GPU), bf16 autocast")
    p.add_argument("--n-train", type=int, required=True, help="number of cached training phantoms")
    p.add_argument("--train-data", default=os.path.join(ROOT, "cache", "train"))
    p.add_argument("--history", default="", help="how the run was reached (earlier phases), for the card")
    p.add_argument("--recalibrate", type=int, default=32,
                   help="full-grid samples for BatchNorm statistics (0 = keep the run's own, as evaluated)")
    p.add_argument("--recalibrate-realism-p", type=float, default=0.0,
                   help="share of those samples passed through the radiograph simulator (default: plain DRRs)")
    p.add_argument("--real-like", help="folder of real-like simulated cases (scripts/make_real_like_set.py) to report")
    p.add_argument("--style", help="style model to report on the real-like cases as well")
    p.add_argument("--version", default=__version__, help=f"the model's version (default: KneeRecon's, {__version__})")
    p.add_argument("--cross-subject", nargs="*", default=[],
                   help="cached cross-subject test folders (scripts/cross_subject.py build): the headline")
    p.add_argument("--baseline", help="mean-shape baseline JSON per folder (scripts/cross_subject.py baseline --output), "
                                      "as NAME=FILE,NAME=FILE (NAME: the folder's basename)")
    p.add_argument("--int8-calibration", nargs="*", default=[],
                   help="folders of cached training cases: also write the int8 IR (needs nncf) and score it on --cross-subject")
    p.add_argument("--data-summary", help="the card's training-data sentence (default: N phantoms of the generator)")
    a = p.parse_args()
    if not openvino_backend.available():  # without it the .pt would ship with a stale converted network
        sys.exit("bundle_model.py needs openvino to write the converted network (pip install -r requirements-test.txt)")
    src = os.path.join(a.run, "model.pt")
    blob = read_model_file(src)
    card = blob["card"]
    tmp = os.path.join(a.out, ".candidate.pt")
    cfg = card["training"]["config"]
    card.update({
        "name": "KneeRecon U-Net",
        "version": a.version,
        "file": "kneerecon_unet.pt",
        "intended_use": "Research on bi-planar knee reconstruction. Not a medical device; not validated on clinical radiographs.",
        "training_data": {
            "summary": a.data_summary or f"{a.n_train} synthetic knee CT phantoms (KneeRecon procedural generator, seeds < 900000), parallel-beam DRRs",
            "phantom_config": PhantomConfig().to_dict(),
            "augmentation": cfg.get("augment"),
            "validation": "6 procedural phantoms, seeds 900000-900005 (monitoring only: no model selection)",
        },
        "training_cost": {"steps": card["training"]["steps"], "batch_size": cfg["batch_size"], "crop": cfg["crop"],
                          "hours": a.hours, "device": a.device_desc, "history": a.history},
    })
    net, _ = load_model(src)
    if a.recalibrate:  # population BatchNorm statistics over full-grid training inputs
        import glob
        paths = sorted(glob.glob(os.path.join(a.train_data, "*.npz")))
        net.train()
        recalibrate_batchnorm(net, recalibration_samples(paths, a.recalibrate, 0, cfg.get("augment"), a.recalibrate_realism_p))
        net.eval()
        card["bn_recalibration_samples"] = a.recalibrate
        card["bn_recalibration_realism_p"] = a.recalibrate_realism_p
    save_model(tmp, net, card, half=True)
    res = evaluate_model(tmp, [a.test], out_dir=a.run)
    cross = {}
    for folder in a.cross_subject:  # held-out people: never trained on, not in the shape statistics
        r = evaluate_model(tmp, [folder], log=lambda m: None)
        cross[os.path.basename(os.path.normpath(folder))] = r
    baselines = {}
    for item in (a.baseline or "").split(","):
        if item:
            name, path = item.split("=", 1)
            with open(path) as f:
                baselines[name] = json.load(f)["summary"]
    ext = evaluate_files(tmp, [os.path.join(ROOT, "..", "shared", "contract-check", k) for k in ("knee_a", "knee_b")])
    s = res["summary"]
    card["test_metrics"] = {
        "test_set": f"{res['n_cases']} phantoms, seeds 1000000-{1000000 + res['n_cases'] - 1} (never used in training), full 128^3 inference",
        **{f"dice_{n}": round(s[f"dice_{n}"]["mean"], 4) for n in ("background",) + BONE_NAMES},
        **{f"{m}_{n}_mm": round(s[f"{m}_{n}"]["mean"], 3) for m in ("chamfer", "assd", "hd95") for n in BONE_NAMES},
        "time_per_case_s": round(s["time_s"]["mean"], 3),
    }
    card["cross_subject_test"] = {
        name: {"cases": r["n_cases"], **{f"{m}_{n}": round(r["summary"][f"{m}_{n}"]["mean"], 4)
                                          for m in ("dice", "chamfer", "assd") for n in BONE_NAMES},
               **({"mean_shape_baseline": {f"{m}_{n}": round(baselines[name][f"{m}_{n}"]["mean"], 4)
                                           for m in ("dice", "chamfer", "assd") for n in BONE_NAMES}}
                  if name in baselines else {})}
        for name, r in cross.items()}
    card["external_check"] = {r["case"]: {k: round(v, 4) for k, v in r.items() if k.startswith(("dice_", "chamfer_"))}
                              for r in ext}
    real_like = {}
    if a.real_like:
        import glob
        dirs = sorted(d for d in glob.glob(os.path.join(a.real_like, "case_*")) if os.path.isdir(d))
        for name, style in (("this model", None), ("this model + style transfer", a.style)):
            if style is None and name != "this model":
                continue
            rows = evaluate_files(tmp, dirs, style=style, log=lambda m: None)
            real_like[name] = {f"{m}_{n}": round(float(np.nanmean([r[f"{m}_{n}"] for r in rows])), 4)
                               for m in ("dice", "chamfer") for n in BONE_NAMES}
        card["real_like_check"] = {"cases": len(dirs), "folder": os.path.basename(os.path.normpath(a.real_like)),
                                   "note": "simulated radiographs of held-out phantoms (docs/realism.md); collimation is "
                                           "filled before reconstruction", **real_like}
    final = os.path.join(a.out, "kneerecon_unet.pt")
    save_model(final, net, card, half=True)
    os.remove(tmp)
    # the converted network, tied to this file by its SHA-256: what reconstruction runs without PyTorch
    ir = openvino_backend.export_ir(final)
    import openvino as ov
    if openvino_backend.find_ir(ov.Core(), final)[0] != ir:
        sys.exit(f"{ir} does not match {final}: the bundled model would need PyTorch at inference")
    print(f"wrote {ir}")
    int8_md = ""
    if a.int8_calibration:  # the default on CPUs without native bf16: scored against the float network
        from KneeReconLib.models.quantize import quantize_ir
        print(f"wrote {quantize_ir(final, a.int8_calibration)}")
        rows = []
        for folder in a.cross_subject:
            name = os.path.basename(os.path.normpath(folder))
            # score the int8 IR itself: on a CPU with native bf16 the runtime would pick bf16
            with mock.patch.object(openvino_backend, "native_bf16", return_value=False):
                r8 = evaluate_model(final, [folder], log=lambda m: None, backend="openvino")
            rows.append(f"| {name}, int8 | " + " | ".join(f"{r8['summary'][f'dice_{n}']['mean']:.3f}" for n in BONE_NAMES) + " |")
            rows.append(f"| {name}, float | " + " | ".join(f"{cross[name]['summary'][f'dice_{n}']['mean']:.3f}" for n in BONE_NAMES) + " |")
        int8_md = ("## int8 network (CPUs without native bf16)\n\n`kneerecon_unet.int8.openvino.xml` is the float IR quantized "
                   "after training (NNCF, `kneerecon export-openvino --int8`, calibrated on "
                   f"{len(a.int8_calibration)} training-case folders); reconstruction uses it where the CPU has no native "
                   "bf16 (AVX2 only), about 1.8x faster than f32 there. Cross-subject Dice:\n\n| test | "
                   + " | ".join(BONE_NAMES) + " |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n")
    table = format_table(res)
    # sections written by hand about the other bundled models (style model, ensemble member) survive
    card_md = os.path.join(a.out, "MODEL_CARD.md")
    kept = ""
    if os.path.exists(card_md):
        old = open(card_md).read()
        starts = [i for i in (old.find("\n## Style model"), old.find("\n## Ensemble member")) if i >= 0]
        kept = old[min(starts):] if starts else ""
    with open(card_md, "w") as f:
        f.write(f"""# Model card: {card['name']} {card['version']}

**Research tool, not a medical device.** Trained on synthetic knee CTs built by KneeRecon: from
16 real people's CT-derived bone surfaces (LLP26 shape model) and from its procedural generator;
rendered as DRRs, never real CT or real radiographs. Not validated on clinical radiographs.

- Architecture: 3D U-Net of Kasten et al. 2020 (widths {card['architecture']['widths']}, two 3x3x3 conv + BN + ReLU per
  block, max-pool down, trilinear up, concatenated skips, 1x1x1 conv to 5 classes), {sum(p.numel() for p in net.parameters()):,} parameters,
  stored in fp16 ({os.path.getsize(final) / 1e6:.1f} MB).
- Input: AP and lateral X-ray, percentile-normalised, replicated along each beam into a 2 x 128^3 grid (DESIGN.md).
- Training data: {card['training_data']['summary']}. Anatomy and geometry: docs/anatomy.md, docs/phantoms.md.
  Augmentation: display curves, exposure, noise, blur, background ramps, left/right mirroring,
  2-4 mm shifts and lateral-view height offsets{f"; the radiograph simulator (docs/realism.md) on {cfg['augment'].get('realism_p', 0):.0%} of the views" if cfg.get('augment', {}).get('realism_p') else ""}.
- Loss: surface-weighted cross-entropy (w0 = {cfg['wce_w0']}, sigma = {cfg['wce_sigma_mm']} mm) + {cfg.get('dice_weight', 0)} x soft Dice;
  NGCC lambda = {cfg['ngcc_lambda']}. Crops: {cfg['crop']} (class-balanced centres){f", {cfg.get('slab_p', 0):.0%} of the steps on {cfg.get('slab_depth')} x 128 x 128 slabs spanning whole rays" if cfg.get('slab_p') else ""}.
  {f"Weights: exponential moving average (decay {cfg.get('ema_decay')})." if cfg.get('ema_decay') else ""} BatchNorm statistics re-estimated on {a.recalibrate or cfg.get('bn_recalibration', 0)} full-grid inputs{" (plain DRRs, no simulator)" if a.recalibrate and not a.recalibrate_realism_p else (" (at the end of training)" if not a.recalibrate else "")}.
- Optimiser: AdamW, lr {cfg['lr']}, warm-up {cfg['warmup_steps']} steps then cosine; batch {cfg['batch_size']}.
- Cost: {card['training_cost']['steps']} steps in {a.hours:.2f} h on {a.device_desc}. {a.history}

""" + _cross_subject_md(card.get("cross_subject_test", {})) + int8_md + f"""## Procedural test set ({card['test_metrics']['test_set']})

```
{table}
```

## External check: the two contract-check knees (built and rendered by other software)

| knee | """ + " | ".join(f"Dice {n}" for n in BONE_NAMES) + " | " + " | ".join(f"Chamfer {n} (mm)" for n in BONE_NAMES) + """ |
|---|""" + "---|" * 8 + "\n" + "\n".join(
            f"| {r['case']} | " + " | ".join(f"{r[f'dice_{n}']:.3f}" for n in BONE_NAMES) + " | "
            + " | ".join(f"{r[f'chamfer_{n}']:.2f}" for n in BONE_NAMES) + " |" for r in ext) + """

""" + (f"""## Robustness: {card['real_like_check']['cases']} real-like simulated radiograph pairs (docs/realism.md)

Held-out phantoms rendered through the radiograph simulator (beam hardening, scatter, noise, blur,
display curves, collimation, side markers, 3-5 degree rotations, height offsets up to 8 mm) and
written as DICOM; 3D truth compared by physical coordinates (`kneerecon evaluate --case-dirs`).

| | """ + " | ".join(f"Dice {n}" for n in BONE_NAMES) + " | " + " | ".join(f"Chamfer {n} (mm)" for n in BONE_NAMES) + """ |
|---|""" + "---|" * 8 + "\n" + "\n".join(
            f"| {k} | " + " | ".join(f"{v[f'dice_{n}']:.3f}" for n in BONE_NAMES) + " | "
            + " | ".join(f"{v[f'chamfer_{n}']:.2f}" for n in BONE_NAMES) + " |" for k, v in real_like.items())
            + "\n\nThe default is this model without style transfer; `--style` is optional (README, 'Domain adaptation': "
            "all four adaptations compared).\n\n"
            if real_like else "") + """## Limits

The training anatomy is 16 adults' bone surfaces (LLP26; their sex, age and pathology are those of
the shape model's cohort, not a clinical population) and procedural shapes; the cross-subject
test has 4 further people of the same cohort, segmented and meshed the same way, so it measures
generalisation to new people, not to other segmentations or scanners. The network has never seen
a real knee CT or a real radiograph: no osteoarthritis, osteophytes, implants, children or
fractures, and real X-rays differ (scatter, beam hardening, positioning); expect lower accuracy
there and check the projected outlines.
""")
        f.write(kept)
    print(table)
    print(json.dumps(card["external_check"], indent=1))


if __name__ == "__main__":
    main()
