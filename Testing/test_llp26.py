"""Knees from real people's bone surfaces (LLP26): anatomy, determinism and the subject rule."""
import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("musculoskeletal.models")
pytest.importorskip("gias3.fieldwork")

from conftest import ct_side_faces  # noqa: E402
from KneeReconLib.core.errors import KneeReconError  # noqa: E402
from KneeReconLib.data.llp26 import (TEST_SUBJECTS, TRAIN_SUBJECTS, LLP26Config, check_subjects, generate_llp26_phantom,  # noqa: E402
                                     training_pca)


@pytest.fixture(scope="module")
def knees():
    out = {}
    for side, seed in (("right", 11), ("left", 12)):
        out[side] = generate_llp26_phantom(seed, LLP26Config(side=side, flexion_deg=(0.0, 40.0)))
    return out


def _mask(ph, value):
    return sitk.GetArrayFromImage(ph.labels) == value


def _centroid_mm(ph, value):
    k, j, i = np.nonzero(_mask(ph, value))
    sp, org = ph.labels.GetSpacing(), ph.labels.GetOrigin()
    return np.array([org[0] + i.mean() * sp[0], org[1] + j.mean() * sp[1], org[2] + k.mean() * sp[2]])


def _gap_mm(ph, a, b):
    """Smallest distance between two bones' voxels (mm)."""
    dist = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        sitk.GetImageFromArray(_mask(ph, a).astype(np.uint8)), insideIsPositive=False, squaredDistance=False,
        useImageSpacing=False)) * ph.labels.GetSpacing()[0]
    return float(dist[_mask(ph, b)].min())


@pytest.mark.parametrize("side", ["right", "left"])
def test_llp26_knee_anatomy(knees, side):
    ph = knees[side]
    lab = sitk.GetArrayFromImage(ph.labels)
    vox_ml = np.prod(ph.labels.GetSpacing()) / 1000.0
    for v in (1, 2, 3, 4):  # every bone present, one connected component
        cc = sitk.ConnectedComponent(sitk.GetImageFromArray((lab == v).astype(np.uint8)))
        assert sitk.GetArrayFromImage(cc).max() == 1, f"label {v} is not one component"
    vol = {v: (lab == v).sum() * vox_ml for v in (1, 2, 3, 4)}
    assert 8.0 < vol[2] < 30.0, f"patella {vol[2]:.1f} ml is not an adult patella"
    assert vol[1] > 80 and vol[3] > 60 and 3 < vol[4] < 40, vol
    # tibiofemoral joint space of cartilage and menisci (3-6 mm drawn, +-1 voxel)
    assert 2.0 <= _gap_mm(ph, 1, 3) <= 7.0
    assert _gap_mm(ph, 1, 2) <= 9.0  # the patella sits on the femur, across its cartilage
    fem, pat, tib, fib = (_centroid_mm(ph, v) for v in (1, 2, 3, 4))
    assert pat[1] < fem[1] - 15.0  # patella anterior (-y) of the femur
    distal = _mask(ph, 1)
    xs = np.nonzero(distal)[2] * ph.labels.GetSpacing()[0] + ph.labels.GetOrigin()[0]
    assert xs.min() < pat[0] < xs.max()  # over the trochlea, between the condyles
    lateral = -1.0 if side == "right" else 1.0  # LPS: the patient's left is +x
    assert lateral * (fib[0] - tib[0]) > 10.0, "the fibula must lie lateral of the tibia"
    assert fib[1] > tib[1]  # and posterior
    assert ph.params["side"] == side and ph.params["source"] == "llp26"
    # the CT holds the whole leg (its side faces are air) and is centred on the isocentre; the
    # radiograph field is the drawn one, within it
    ct = sitk.GetArrayFromImage(ph.ct)
    assert ct_side_faces(ct).max() < -900, "soft tissue reaches the CT's side: the leg was cut"
    assert np.allclose(ph.ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ph.ct.GetSize()])[:2], 0.0)
    from KneeReconLib.data.phantom import imaging_field_mm
    fov = imaging_field_mm(ph)
    assert abs(fov[0] - ph.params["fov_xy_mm"]) <= 1.0 and fov[0] <= ph.params["ct_fov_xy_mm"] == ct.shape[2] * 1.0


def test_llp26_deterministic_and_varied():
    cfg = LLP26Config(fov_xy_mm=(120.0, 120.0), fov_z_mm=(160.0, 160.0))
    a, b = generate_llp26_phantom(5, cfg), generate_llp26_phantom(5, cfg)
    assert np.array_equal(sitk.GetArrayFromImage(a.labels), sitk.GetArrayFromImage(b.labels))
    assert np.array_equal(sitk.GetArrayFromImage(a.ct), sitk.GetArrayFromImage(b.ct))
    c = generate_llp26_phantom(6, cfg)
    assert not np.array_equal(sitk.GetArrayFromImage(a.labels), sitk.GetArrayFromImage(c.labels))


def test_subject_rule_refuses_held_out_people():
    for bad in ([21], [26], [3, 22], [0]):
        with pytest.raises(KneeReconError, match="1-20"):
            check_subjects(bad)
    with pytest.raises(KneeReconError):
        generate_llp26_phantom(0, LLP26Config(subjects=(24,)))
    assert not set(TEST_SUBJECTS) & set(TRAIN_SUBJECTS)
    assert set(TEST_SUBJECTS) | set(TRAIN_SUBJECTS) == set(range(1, 21))
    mean, modes, sd = training_pca()
    assert modes.shape[1] == len(TRAIN_SUBJECTS) - 1 and np.all(sd > 0)
    assert np.allclose(modes.T @ modes, np.eye(modes.shape[1]), atol=1e-8)


def test_mean_shape_keeps_the_pose():
    cfg = LLP26Config(subjects=(TEST_SUBJECTS[0],), pca_p=0.0, warp_mm=(0.0, 0.0), scale=(1.0, 1.0),
                      fov_xy_mm=(130.0, 130.0), fov_z_mm=(180.0, 180.0))
    truth, mean = generate_llp26_phantom(3, cfg), generate_llp26_phantom(3, cfg, shape="mean")
    assert mean.params["side"] == truth.params["side"] and mean.params["flexion_deg"] == truth.params["flexion_deg"]
    t, m = sitk.GetArrayFromImage(truth.labels), sitk.GetArrayFromImage(mean.labels)
    # each CT is as wide as its own leg needs, both centred on the isocentre: compare the common part
    n = min(t.shape[1], m.shape[1])
    t, m = (a[:, (a.shape[1] - n) // 2:(a.shape[1] + n) // 2, (a.shape[2] - n) // 2:(a.shape[2] + n) // 2] for a in (t, m))
    for v in (1, 3):  # same place, not the same shape
        dice = 2 * ((t == v) & (m == v)).sum() / ((t == v).sum() + (m == v).sum())
        assert 0.6 < dice < 0.99, dice
