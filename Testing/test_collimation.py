"""Collimator shadows (flat white bands at the image edges) are found and do not become bone."""
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from conftest import SAMPLE
from KneeReconLib.evaluation.metrics import dice_per_class
from KneeReconLib.io.preprocessing import collimated_border, fill_collimation
from KneeReconLib.io.xray_io import XRay, read_xray


def _collimate(px: np.ndarray, t: int, b: int, l: int, r: int) -> np.ndarray:
    """White (unexposed) bands with a blurred edge, as a bone-bright radiograph shows them."""
    field = np.zeros(px.shape, np.float32)
    field[t:px.shape[0] - b, l:px.shape[1] - r] = 1.0
    field = gaussian_filter(field, 1.0)
    top = float(px.max()) * 1.05
    return px * field + top * (1 - field)


def test_no_collimation_found_on_drrs():
    for v in ("ap", "lateral"):
        assert collimated_border(read_xray(os.path.join(SAMPLE, f"{v}.nrrd"), v).pixels) == (0, 0, 0, 0)
    for knee in ("knee_a", "knee_b"):
        d = os.path.join(SAMPLE, "..", "..", "..", "shared", "contract-check", knee)
        if os.path.isdir(d):
            assert collimated_border(read_xray(os.path.join(d, "ap.nrrd"), "ap").pixels) == (0, 0, 0, 0)


def test_border_widths_found():
    px = read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap").pixels.astype(np.float32)
    found = collimated_border(_collimate(px, 30, 12, 40, 25))
    for f, true in zip(found, (30, 12, 40, 25)):
        assert true <= f <= true + 5


def test_collimated_pair_reconstructs_like_the_original():
    from KneeReconLib.reconstruction.inference import reconstruct

    ap = read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap")
    lat = read_xray(os.path.join(SAMPLE, "lateral.nrrd"), "lateral")
    ap_c = XRay(_collimate(ap.pixels.astype(np.float32), 40, 30, 35, 30), ap.geometry)
    lat_c = XRay(_collimate(lat.pixels.astype(np.float32), 30, 40, 25, 20), lat.geometry)
    truth = sitk.ReadImage(os.path.join(SAMPLE, "truth.nii.gz"))
    rec = reconstruct(ap_c, lat_c, side="left", surfaces=False)
    t = sitk.GetArrayFromImage(sitk.Resample(truth, rec.labels, sitk.Transform(), sitk.sitkNearestNeighbor))
    d = dice_per_class(sitk.GetArrayFromImage(rec.labels), t)
    assert d[1] > 0.85 and d[3] > 0.85 and d[2] > 0.6
    assert any("collimator" in n for n in rec.notes)
    assert rec.ap.pixels.max() == pytest.approx(ap_c.pixels.max())  # the overlay shows the image as given


def test_fill_repeats_the_exposed_edges():
    a = np.arange(100, dtype=np.float32).reshape(10, 10)
    f = fill_collimation(a, (2, 3, 1, 4))
    assert (f[:2] == f[2]).all() and (f[-3:] == f[6]).all() and (f[:, 0] == f[:, 1]).all() and (f[:, -4:] == f[:, [5]]).all()
    assert (f[2:7, 1:6] == a[2:7, 1:6]).all()
