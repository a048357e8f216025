import numpy as np
import SimpleITK as sitk

from conftest import centroid, ct_side_faces
from KneeReconLib.core.labels import BY_NAME
from KneeReconLib.data.phantom import PhantomConfig, generate_phantom


def _check_anatomy(ph):
    lab = sitk.GetArrayFromImage(ph.labels)
    sp, org = ph.labels.GetSpacing(), ph.labels.GetOrigin()
    vox_ml = np.prod(sp) / 1000
    vols = {n: (lab == BY_NAME[n].value).sum() * vox_ml for n in BY_NAME}
    # adult knee, within a 13-25 cm field of view
    assert 60 < vols["femur"] < 320, vols
    assert 60 < vols["tibia"] < 320, vols
    assert 8 < vols["patella"] < 60, vols
    assert 4 < vols["fibula"] < 45, vols
    for n in BY_NAME:  # exactly one connected component per bone
        cc = sitk.ConnectedComponent(sitk.GetImageFromArray((lab == BY_NAME[n].value).astype(np.uint8)))
        assert sitk.GetArrayViewFromImage(cc).max() == 1, n
    c = {n: centroid(lab == BY_NAME[n].value, sp, org) for n in BY_NAME}
    assert c["patella"][1] < c["femur"][1] - 15  # patella anterior (-y) of the femur
    assert c["femur"][2] > c["tibia"][2] + 40  # femur above tibia
    lateral_sign = 1 if ph.params["side"] == "left" else -1  # left knee: lateral is +x (patient's left)
    assert lateral_sign * (c["fibula"][0] - c["tibia"][0]) > 10
    ct = sitk.GetArrayFromImage(ph.ct)
    # cortical shell denser than the cancellous interior; soft tissue and air present
    bone = lab > 0
    from scipy.ndimage import binary_erosion
    inner = binary_erosion(bone, iterations=4)
    shell = bone & ~binary_erosion(bone, iterations=1)
    assert np.median(ct[shell]) > np.median(ct[inner]) + 300
    # air around the leg; inside the leg, mostly muscle (the CT may be far wider than the leg needs)
    soft = ~bone & (ct > -900)
    assert (ct < -900).any() and (np.abs(ct[soft] - 40) < 30).mean() > 0.5


def test_right_and_left_knee_anatomy(phantom_right, phantom_left):
    assert phantom_right.params["side"] == "right" and phantom_left.params["side"] == "left"
    _check_anatomy(phantom_right)
    _check_anatomy(phantom_left)


def test_phantoms_vary_and_are_deterministic():
    cfg = PhantomConfig(voxel_mm=1.0)
    a, b = generate_phantom(5, cfg), generate_phantom(5, cfg)
    assert a.params == b.params
    assert np.array_equal(sitk.GetArrayViewFromImage(a.ct), sitk.GetArrayViewFromImage(b.ct))
    c = generate_phantom(6, cfg)
    assert c.params["scale"] != a.params["scale"]
    _check_anatomy(generate_phantom(7, PhantomConfig(flexion_deg=(28.0, 30.0))))


def test_geometry_is_lps_and_centred(phantom_right):
    img = phantom_right.ct
    assert img.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    centre = img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()])
    assert np.allclose(centre, 0, atol=1e-3)
    assert 0.5 <= img.GetSpacing()[0] <= 1.0


def test_patella_spread_widens_only_the_patella():
    from KneeReconLib.data.phantom import sample_parameters

    base = [sample_parameters(s, PhantomConfig())["shape"] for s in range(200)]
    wide = [sample_parameters(s, PhantomConfig(patella_sd=0.25))["shape"] for s in range(200)]
    for k in ("pat_h", "pat_w", "pat_height"):
        assert np.std([w[k] for w in wide]) > 1.8 * np.std([b[k] for b in base]), k
    assert all(w["cond_w"] == b["cond_w"] for w, b in zip(wide, base))  # the other bones are the same knees


def test_leg_is_never_cut_by_the_ct():
    """A thick, flexed leg drawn with a small field: the CT widens until its side faces are air
    (a radiograph's rays cross the whole leg), while the radiographs keep the drawn field."""
    import KneeReconLib.data.dataset as ds
    from KneeReconLib.data.phantom import imaging_field_mm

    cfg = PhantomConfig(voxel_mm=2.0, fov_xy_mm=(130.0, 130.0), girth=(1.2, 1.2), flexion_deg=(28.0, 30.0))
    pc = ds.phantom_case(3, 64, cfg)  # through the training-case path
    ph = generate_phantom(3, cfg)
    ct = sitk.GetArrayFromImage(ph.ct)
    assert ph.params["ct_fov_xy_mm"] > 150.0 and ct.shape[1] * 2.0 == ph.params["ct_fov_xy_mm"]
    assert ct_side_faces(ct).max() < -900, "soft tissue reaches the CT's side: the leg was cut"
    assert (ct[:, ct.shape[1] // 2 + 40, :] > -200).any()  # the leg is there, beyond the drawn field
    fov = imaging_field_mm(ph)
    assert np.allclose(fov[:2], (130.0, 130.0)) and fov[0] < ph.params["ct_fov_xy_mm"]
    size = (65, int(round(fov[2] / 2.0)))
    case = ds.case_from_ct(ph.ct, ph.labels, 64, ds.DRRConfig(size=size))
    assert case.ap.shape == pc.ap.shape == (size[1], 65) and np.allclose(pc.ap, case.ap, atol=1e-5)
    # rays through the whole leg attenuate more than through the leg cut at the field's edge
    cut = ct.copy()
    m = (cut.shape[1] - 65) // 2
    cut[:, :m, :], cut[:, -m:, :] = -1000, -1000
    cut_img = sitk.GetImageFromArray(cut)
    cut_img.CopyInformation(ph.ct)
    cut_case = ds.case_from_ct(cut_img, ph.labels, 64, ds.DRRConfig(size=size))
    assert (case.ap - cut_case.ap).mean() > 0.05 and np.array_equal(case.labels, cut_case.labels)
