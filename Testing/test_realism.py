"""The realism simulator (KneeReconLib/data/realism.py) and the real-like test-set script."""
import importlib.util
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from scipy.ndimage import binary_dilation

from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.core.geometry import ViewGeometry
from KneeReconLib.data.realism import (RealismConfig, bone_masks, polychromatic_transmission, rotate_about_isocentre,
                                       simulate_pair, simulate_radiograph, write_dicom_xray, xray_spectrum)
from KneeReconLib.geometry.alignment import estimate_height_offset
from KneeReconLib.io.xray_io import XRay, read_xray

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# every random effect off except the one a test looks at; linear display over the full range
PLAIN = RealismConfig(kvp=(70.0, 70.0), filtration_mm_al=(2.5, 2.5), beam_hardening=(0.0, 0.0), spr=(0.0, 0.0),
                      photons_per_pixel=(1e6, 1e6), electronic_noise=(0.0, 0.0), blur_sd_mm=(0.0, 0.0), heel=0.0,
                      collimation_p=0.0, marker_p=0.0, unsharp_amount=(0.0, 0.0), window_low_pct=(0.0, 0.0),
                      window_high_pct=(100.0, 100.0), sigmoid_p=0.0, gamma=(1.0, 1.0), bits_stored=(16,),
                      monochrome1_p=0.0, rotation_deg=(0.0, 0.0, 0.0), height_offset_mm=0.0)


@pytest.fixture(scope="module")
def knee():
    from KneeReconLib.data.phantom import PhantomConfig, generate_phantom

    return generate_phantom(1000003, PhantomConfig(voxel_mm=2.0))  # small and fast; a held-out seed


def test_quantum_noise_follows_poisson_scaling():
    L = np.full((96, 128), 1.0, np.float32)
    L[:, 64:] = 3.0
    sds = {}
    for n in (1000.0, 16000.0):
        img, _ = simulate_radiograph(L, (0.5, 0.5), np.random.default_rng(0), replace(PLAIN, photons_per_pixel=(n, n)))
        a = img.astype(float)
        lo, hi = a[8:-8, 8:56], a[8:-8, 72:-8]
        scale = hi.mean() - lo.mean()  # display units per unit of log signal x 2 (L 1 -> 3)
        sds[n] = hi.std() / scale * 2.0  # sd of the log signal behind L = 3
        expected = 1.0 / np.sqrt(n * np.exp(-3.0))  # Poisson: sd(ln N) = 1/sqrt(N)
        assert sds[n] == pytest.approx(expected, rel=0.12)
    assert sds[1000.0] / sds[16000.0] == pytest.approx(4.0, rel=0.12)


def test_scatter_lowers_bone_to_soft_tissue_contrast():
    L = np.zeros((160, 160), np.float32)
    L[:, 40:120] = 3.0  # soft tissue
    L[40:120, 65:95] = 4.5  # bone inside it

    def contrast(spr):
        cfg = replace(PLAIN, spr=(spr, spr), scatter_sigma_mm=(20.0, 20.0))
        a = simulate_radiograph(L, (0.5, 0.5), np.random.default_rng(1), cfg)[0].astype(float)
        air, soft, bone = a[60:100, 5:30].mean(), a[60:100, 45:60].mean(), a[70:90, 72:88].mean()
        return (bone - soft) / (soft - air)

    no_scatter, scatter = contrast(0.0), contrast(0.8)
    assert no_scatter == pytest.approx(0.5, rel=0.05)  # 1.5 / 3: the log signal is the line integral
    assert scatter < 0.75 * no_scatter


def test_beam_hardening_makes_the_log_signal_sublinear():
    e, w = xray_spectrum(70.0, 2.5)
    assert w.sum() == pytest.approx(1.0) and (e < 70.0).all()
    L = np.linspace(0.0, 8.0, 81, dtype=np.float32)
    assert -np.log(polychromatic_transmission(L, e, w, 0.0)) == pytest.approx(L, abs=1e-5)  # no hardening: linear
    s = -np.log(polychromatic_transmission(L, e, w, 0.8))
    assert (np.diff(s, 2) < 0).all()  # concave: each extra mm adds less
    assert s[80] < 0.95 * 2 * s[40]  # 400 mm of water-equivalent: ~7 % less than twice 200 mm
    # through the whole chain: a ramp of path lengths gives a concave displayed profile
    ramp = np.tile(np.linspace(0.0, 8.0, 128, dtype=np.float32), (32, 1))
    img = simulate_radiograph(ramp, (0.5, 0.5), np.random.default_rng(2), replace(PLAIN, beam_hardening=(0.8, 0.8)))[0]
    prof = img[8:-8].mean(axis=0)
    q = [prof[int(i)] for i in (16, 48, 80, 112)]
    assert q[1] - q[0] > q[2] - q[1] > q[3] - q[2] > 0


@pytest.mark.parametrize("monochrome1", [False, True])
def test_dicom_written_and_read_back_bone_bright_with_spacing(tmp_path, monochrome1):
    a = np.full((60, 40), 500, np.uint16)
    a[20:40, 10:20] = 4000  # bone
    g = ViewGeometry("ap", 40, 60, (0.4, 0.5), side="left")
    p = str(tmp_path / "ap.dcm")
    write_dicom_xray(a, g, p, monochrome1=monochrome1)
    x = read_xray(p, "ap")
    assert x.geometry.spacing == pytest.approx((0.4, 0.5))
    assert (x.geometry.width, x.geometry.height) == (40, 60)
    assert x.pixels[30, 15] > x.pixels[5, 5] + 3000
    assert x.info.get("inverted") == ("MONOCHROME1" if monochrome1 else None)
    r = sitk.ImageFileReader()
    r.SetFileName(p)
    r.ReadImageInformation()
    assert r.GetMetaData("0028|0004").strip() == ("MONOCHROME1" if monochrome1 else "MONOCHROME2")
    assert r.GetMetaData("0010|0010").strip() == "PHANTOM" and r.GetMetaData("0008|0060").strip() == "DX"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # atomic: no temp file left


def _row_shift(ref: np.ndarray, moved: np.ndarray, max_shift: int = 30) -> float:
    """Rows by which `moved`'s content sits below `ref`'s (negative: higher), from the
    cross-correlation of the row profiles' derivatives, with a parabolic sub-pixel peak."""
    def prof(im):
        w = im.shape[1]
        d = np.gradient(im[:, w // 10: -w // 10].astype(float).mean(axis=1))
        return d - d.mean()
    a, b = prof(ref), prof(moved)
    n = len(a)
    cc = [np.dot(a[max_shift:n - max_shift], b[max_shift + k:n - max_shift + k]) for k in range(-max_shift, max_shift + 1)]
    i = int(np.argmax(cc))
    y0, y1, y2 = cc[i - 1], cc[i], cc[i + 1]
    return i - max_shift + 0.5 * (y0 - y2) / (y0 - 2 * y1 + y2)


def test_height_offset_moves_the_lateral_content_up_by_the_stated_mm(knee):
    cfg = replace(RealismConfig(), collimation_p=0.0, marker_p=0.0)
    side = knee.params["side"]
    ref = simulate_pair(knee.ct, knee.labels, side, np.random.default_rng(4), cfg, 1.0, rotation_deg=(0, 0, 0),
                        height_offset_mm=0.0, masks=False)
    out = simulate_pair(knee.ct, knee.labels, side, np.random.default_rng(4), cfg, 1.0, rotation_deg=(0, 0, 0),
                        height_offset_mm=6.0, masks=False)
    assert out["height_offset_mm"] == 6.0
    assert np.array_equal(ref["ap"], out["ap"])  # the AP is the reference frame: untouched
    shift_rows = _row_shift(ref["lateral"], out["lateral"])
    assert shift_rows == pytest.approx(-6.0 / out["lateral_geometry"].spacing[1], abs=1.0)  # up = lower row index
    # the library's own estimator reads the same sign: positive = lateral content higher
    est = estimate_height_offset(XRay(out["ap"].astype(np.float32), out["ap_geometry"]),
                                 XRay(out["lateral"].astype(np.float32), out["lateral_geometry"]))
    assert est.offset_mm == pytest.approx(6.0, abs=2.0)


def test_masks_line_up_with_truth_and_image(knee):
    side = knee.params["side"]
    out = simulate_pair(knee.ct, knee.labels, side, np.random.default_rng(5), replace(RealismConfig(), collimation_p=0.0),
                        1.0, height_offset_mm=-5.0)
    lab = sitk.GetArrayFromImage(out["labels"])
    sp, org = out["labels"].GetSpacing(), out["labels"].GetOrigin()
    for view in ("ap", "lateral"):
        g = out[f"{view}_geometry"]
        img = out[view].astype(float)
        dz = out["height_offset_mm"] if view == "lateral" else 0.0
        for name, value in (("femur", 1), ("tibia", 3)):
            m = out["masks"][view][name]
            assert m.shape == img.shape and m.any()
            k, j, i = np.nonzero(lab == value)
            c, r = g.project(org[0] + i.mean() * sp[0], org[1] + j.mean() * sp[1], org[2] + k.mean() * sp[2] + dz)
            assert m[int(round(r)), int(round(c))], (view, name)
            # bone bright: the silhouette is brighter than a band of tissue just outside it
            ring = binary_dilation(m, iterations=6) & ~binary_dilation(m, iterations=2)
            ring &= ~np.any([out["masks"][view][b] for b in out["masks"][view]], axis=0)
            assert img[m].mean() > img[ring].mean(), (view, name)
    # the lateral masks carry the offset: shifted silhouettes of the unshifted projection
    m0 = bone_masks(out["labels"], out["lateral_geometry"])["femur"]
    rows0, rows = np.nonzero(m0)[0].mean(), np.nonzero(out["masks"]["lateral"]["femur"])[0].mean()
    assert rows - rows0 == pytest.approx(5.0 / out["lateral_geometry"].spacing[1], abs=0.6)  # -5 mm: down


def test_rotation_is_about_the_isocentre_right_handed():
    a = np.zeros((21, 21, 21), np.uint8)
    a[10, 10, 15:18] = 1  # a bar along +x, 5-7 mm from the centre
    img = sitk.GetImageFromArray(a)
    img.SetOrigin((-10.0, -10.0, -10.0))
    rot = sitk.GetArrayFromImage(rotate_about_isocentre(img, (0.0, 0.0, 90.0), label=True))
    k, j, i = np.nonzero(rot)
    assert set(i) == {10} and set(k) == {10} and sorted(set(j)) == [15, 16, 17]  # +x -> +y about z


def test_same_seed_same_pair(knee):
    side = knee.params["side"]
    a = simulate_pair(knee.ct, knee.labels, side, np.random.default_rng(9), RealismConfig(), 1.0, masks=False)
    b = simulate_pair(knee.ct, knee.labels, side, np.random.default_rng(9), RealismConfig(), 1.0, masks=False)
    assert np.array_equal(a["ap"], b["ap"]) and np.array_equal(a["lateral"], b["lateral"])
    assert a["params"] == b["params"] and a["rotation_deg"] == b["rotation_deg"]
    assert a["height_offset_mm"] == b["height_offset_mm"] and a["ap"].dtype == np.uint16
    assert np.array_equal(sitk.GetArrayFromImage(a["labels"]), sitk.GetArrayFromImage(b["labels"]))
    json.dumps(a["params"])  # meta.json-ready
    c = simulate_pair(knee.ct, knee.labels, side, np.random.default_rng(10), RealismConfig(), 1.0, masks=False)
    assert not np.array_equal(a["ap"], c["ap"])


@pytest.mark.parametrize("change, field", [
    (dict(photons_per_pixel=(-5.0, 100.0)), "photons_per_pixel"),
    (dict(spr=(0.8, 0.2)), "spr"),
    (dict(collimation_p=1.5), "collimation_p"),
    (dict(bits_stored=(20,)), "bits_stored"),
    (dict(rotation_deg=(3.0, 3.0)), "rotation_deg"),
])
def test_bad_config_is_a_clear_error(change, field):
    with pytest.raises(KneeReconError, match=field):
        simulate_radiograph(np.ones((32, 32), np.float32), (0.5, 0.5), np.random.default_rng(0),
                            replace(RealismConfig(), **change))


def test_bad_inputs_are_clear_errors(knee):
    with pytest.raises(KneeReconError, match="2D"):
        simulate_radiograph(np.ones(32, np.float32), (0.5, 0.5), np.random.default_rng(0))
    with pytest.raises(KneeReconError, match="side"):
        simulate_pair(knee.ct, knee.labels, "up", np.random.default_rng(0))


def test_script_builds_a_case_readable_like_a_real_one(tmp_path):
    spec = importlib.util.spec_from_file_location("make_real_like_set", os.path.join(ROOT, "scripts", "make_real_like_set.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "set"
    assert mod.main(["--out", str(out), "--seed", "1000004", "--count", "1", "--voxel", "2", "--pixel-spacing", "1"]) == 0
    case = out / "case_1000004"
    meta = json.loads((case / "meta.json").read_text())
    assert meta["seed"] == 1000004 and meta["side"] in ("left", "right")
    assert abs(meta["height_offset_mm"]) <= 8.0 and len(meta["rotation_deg"]) == 3
    for view in ("ap", "lateral"):
        x = read_xray(str(case / f"{view}.dcm"), view)
        assert x.geometry.spacing == pytest.approx((1.0, 1.0))
        for bone in ("femur", "patella", "tibia", "fibula"):
            m = sitk.ReadImage(str(case / meta["masks"][view][bone]))
            assert m.GetSize() == (x.geometry.width, x.geometry.height) and m.GetPixelID() == sitk.sitkUInt8
        fem = sitk.GetArrayFromImage(sitk.ReadImage(str(case / meta["masks"][view]["femur"]))) > 0
        assert x.pixels[fem].mean() > np.percentile(x.pixels, 25)  # bone bright after reading, either photometric
    truth = sitk.ReadImage(str(case / "truth.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(truth))) <= {0, 1, 2, 3, 4}
    assert (out / "manifest.csv").read_text().splitlines()[1].startswith("case_1000004,")
    assert mod.main(["--out", str(out), "--seed", "5", "--count", "1"]) == 2  # training seeds refused
