"""Figure for docs/phantoms.md: per phantom, a coronal and a sagittal CT slice with label
outlines next to its AP and lateral DRRs. Usage: python docs/make_phantom_figure.py OUT.png SEED..."""
import os
import sys

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from KneeReconLib.core.labels import BONES  # noqa: E402
from KneeReconLib.data.drr import DRRConfig, render_drr  # noqa: E402
from KneeReconLib.data.phantom import generate_phantom  # noqa: E402
from KneeReconLib.io.preprocessing import normalize_intensity  # noqa: E402


def _gray(a, lo, hi):
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _outlined(gray, lab):
    rgb = np.repeat(gray[:, :, None], 3, 2)
    for b in BONES:
        rgb[find_boundaries(lab == b.value, mode="inner")] = (np.array(b.color) * 255).astype(np.uint8)
    return rgb


def row(seed):
    ph = generate_phantom(seed)
    ct = sitk.GetArrayFromImage(ph.ct).astype(np.float32)
    lab = sitk.GetArrayFromImage(ph.labels)
    ny, nx = ct.shape[1:]
    j = int(np.median(np.nonzero(lab == 1)[1]))  # coronal through the femur
    i = int(np.median(np.nonzero(lab == 3)[2]))  # sagittal through the tibia
    cor = _outlined(_gray(ct[::-1, j, :], -300, 1600), lab[::-1, j, :])
    sag = _outlined(_gray(ct[::-1, :, i], -300, 1600), lab[::-1, :, i])
    views = render_drr(ph.ct, DRRConfig())
    ap = np.repeat(_gray(normalize_intensity(views["ap"][0]), 0, 1)[:, :, None], 3, 2)
    lat = np.repeat(_gray(normalize_intensity(views["lateral"][0]), 0, 1)[:, :, None], 3, 2)
    panels = [cor, sag, ap, lat]
    h = max(p.shape[0] for p in panels)
    out = np.concatenate([np.pad(p, ((0, h - p.shape[0]), (0, 6), (0, 0))) for p in panels], 1)
    img = Image.fromarray(out)
    d = ImageDraw.Draw(img)
    d.text((4, 4), f"seed {seed}: {ph.params['side']} knee, flexion {ph.params['flexion_deg']:.0f} deg, "
           f"scale {ph.params['scale']:.2f}", fill=(255, 255, 0))
    return np.asarray(img)


if __name__ == "__main__":
    rows = [row(int(s)) for s in sys.argv[2:]]
    w = max(r.shape[1] for r in rows)
    fig = np.concatenate([np.pad(r, ((0, 6), (0, w - r.shape[1]), (0, 0))) for r in rows], 0)
    Image.fromarray(fig).save(sys.argv[1])
