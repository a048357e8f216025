"""Height offset between the views: estimated from the images, corrected in the reconstruction."""
import os

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import shift as ndshift

from KneeReconLib.data.dataset import AugmentConfig, _augment_image
from KneeReconLib.evaluation.metrics import dice_per_class
from KneeReconLib.geometry.alignment import estimate_height_offset
from KneeReconLib.io.xray_io import XRay, read_xray

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "Resources", "Sample")


def _pair():
    return read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap"), read_xray(os.path.join(SAMPLE, "lateral.nrrd"), "lateral")


def _raise_lateral(lat: XRay, mm: float) -> XRay:
    """The lateral image's content moved toward superior by `mm` (up in the image)."""
    px = ndshift(lat.pixels.astype(np.float32), (-mm / lat.geometry.iso_spacing[1], 0), order=1, mode="nearest")
    return XRay(px, lat.geometry)


@pytest.mark.parametrize("mm", [-8.0, -2.5, 0.0, 3.3, 9.0])
def test_offset_estimated_within_half_a_millimetre(mm):
    ap, lat = _pair()
    rng = np.random.default_rng(int(mm * 10) + 100)
    aug = AugmentConfig()  # different display curves, noise and blur on the two views
    ap_a = XRay(_augment_image(ap.pixels, rng, aug), ap.geometry)
    lat_a = XRay(_augment_image(_raise_lateral(lat, mm).pixels, rng, aug), lat.geometry)
    est = estimate_height_offset(ap_a, lat_a)
    assert est.reliable and est.correlation > 0.7
    assert est.offset_mm == pytest.approx(mm, abs=0.5)


def test_unrelated_images_are_not_reliable():
    ap, lat = _pair()
    noise = XRay(np.random.default_rng(0).random(lat.pixels.shape).astype(np.float32), lat.geometry)
    assert not estimate_height_offset(ap, noise).reliable


def test_reconstruction_corrects_the_offset():
    from KneeReconLib.reconstruction.inference import reconstruct

    ap, lat = _pair()
    lat7 = _raise_lateral(lat, 7.0)
    truth = sitk.ReadImage(os.path.join(SAMPLE, "truth.nii.gz"))
    dice = {}
    for mode in ("none", "auto"):
        rec = reconstruct(ap, lat7, side="left", surfaces=False, height_offset=mode)
        t = sitk.GetArrayFromImage(sitk.Resample(truth, rec.labels, sitk.Transform(), sitk.sitkNearestNeighbor))
        dice[mode] = dice_per_class(sitk.GetArrayFromImage(rec.labels), t)
    assert rec.height_offset["applied_mm"] == pytest.approx(7.0, abs=0.5)
    assert dice["auto"][1] > dice["none"][1] + 0.015  # femur
    assert dice["auto"][2] > dice["none"][2] + 0.015  # patella


def test_long_leg_images_are_cropped_to_the_knee():
    """The sample pair extended to 420 mm (shafts continued above and below, knee off-centre):
    the knee is found, a knee-sized window reconstructed, and the result lands on the truth in
    the extended images' frame."""
    from KneeReconLib.core.geometry import ViewGeometry
    from KneeReconLib.geometry.alignment import knee_height
    from KneeReconLib.reconstruction.inference import reconstruct

    ap, lat = _pair()
    s = ap.geometry.iso_spacing[1]
    top, bottom = int(130 / s), int(60 / s)

    def extend(x):
        px = np.pad(x.pixels, ((top, bottom), (0, 0)), mode="edge")
        g = x.geometry
        return XRay(px, ViewGeometry(g.view, g.width, px.shape[0], g.spacing, side=g.side))

    ap_l, lat_l = extend(ap), extend(lat)
    shift = -(top - bottom) * s / 2.0  # where the original image centre (the knee's frame) now lies
    assert knee_height(ap) == pytest.approx(knee_height(ap_l) - shift, abs=3.0)
    rec = reconstruct(ap_l, lat_l, side="left", surfaces=False)
    assert any("window around the knee" in n for n in rec.notes)
    assert rec.grid.spacing[2] < 2.0  # a knee-sized grid, not 420 mm / 128
    truth = sitk.ReadImage(os.path.join(SAMPLE, "truth.nii.gz"))
    o = truth.GetOrigin()
    truth.SetOrigin((o[0], o[1], o[2] + shift))
    t = sitk.GetArrayFromImage(sitk.Resample(truth, rec.labels, sitk.Transform(), sitk.sitkNearestNeighbor))
    d = dice_per_class(sitk.GetArrayFromImage(rec.labels), t)
    assert d[1] > 0.7 and d[3] > 0.7  # model 0.4.0 on the cone-beam sample stretched to a parallel long leg: 0.75 measured
