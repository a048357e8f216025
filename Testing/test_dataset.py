import numpy as np
import pytest
import SimpleITK as sitk

from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.data.dataset import (AugmentConfig, case_from_ct, load_case, make_sample, parse_label_map,
                                       phantom_case, save_case, user_case)
from KneeReconLib.data.phantom import write_phantom
from KneeReconLib.geometry.frame import to_knee_frame


def test_user_ct_dataset_reproduces_in_memory_pair(tmp_path, phantom_right):
    ct_p, lab_p = write_phantom(phantom_right, str(tmp_path), "knee")
    mem = case_from_ct(*to_knee_frame(phantom_right.ct, phantom_right.labels), grid_size=64)
    disk = user_case(ct_p, lab_p, grid_size=64)
    assert np.allclose(mem.ap, disk.ap, atol=1e-3) and np.allclose(mem.lateral, disk.lateral, atol=1e-3)
    assert np.array_equal(mem.labels, disk.labels)
    save_case(disk, str(tmp_path / "c.npz"))
    back = load_case(str(tmp_path / "c.npz"))
    assert np.array_equal(back.labels, disk.labels) and back.ap_geom == disk.ap_geom


def test_user_ct_label_mapping_and_errors(tmp_path, phantom_right):
    lab = sitk.GetArrayFromImage(phantom_right.labels)
    ts = np.zeros_like(lab, np.uint16)
    for src, dst in ((75, 1), (77, 2), (78, 3), (79, 4)):
        ts[lab == dst] = src
    ts_img = sitk.GetImageFromArray(ts)
    ts_img.CopyInformation(phantom_right.labels)
    sitk.WriteImage(phantom_right.ct, str(tmp_path / "k_ct.nii.gz"))
    sitk.WriteImage(ts_img, str(tmp_path / "k_labels.nii.gz"))
    with pytest.raises(KneeReconError, match="labels outside 0-4"):
        user_case(str(tmp_path / "k_ct.nii.gz"), str(tmp_path / "k_labels.nii.gz"), grid_size=32)
    c = user_case(str(tmp_path / "k_ct.nii.gz"), str(tmp_path / "k_labels.nii.gz"), grid_size=32,
                  label_map=parse_label_map("75:1,77:2,78:3,79:4"))
    assert set(np.unique(c.labels)) == {0, 1, 2, 3, 4}
    shifted = sitk.Image(ts_img)
    shifted.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(shifted, str(tmp_path / "m_labels.nii.gz"))
    with pytest.raises(KneeReconError, match="do not share one geometry"):
        user_case(str(tmp_path / "k_ct.nii.gz"), str(tmp_path / "m_labels.nii.gz"), label_map={75: 1, 78: 3})
    empty = sitk.Image(ts_img.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(ts_img)
    sitk.WriteImage(empty, str(tmp_path / "e_labels.nii.gz"))
    with pytest.raises(KneeReconError, match="no femur and no tibia"):
        user_case(str(tmp_path / "k_ct.nii.gz"), str(tmp_path / "e_labels.nii.gz"))


def test_mirroring_keeps_labels_consistent():
    case = phantom_case(21, grid_size=64)
    aug = AugmentConfig(mirror_p=1.0, display_p=0, noise_sd=(0, 0), blur_px=(0, 0), offset_mm=0, shift_mm=0,
                        background_p=0)
    x, y = make_sample(case, np.random.default_rng(0), aug)
    x0, y0 = make_sample(case)
    assert np.array_equal(y, y0[:, :, ::-1])
    # the AP channel is mirrored in x like the labels; the lateral channel (a sum along x) is unchanged
    assert np.corrcoef(x[0].ravel(), x0[0][:, :, ::-1].ravel())[0, 1] > 0.99
    assert np.corrcoef(x[1].ravel(), x0[1].ravel())[0, 1] > 0.99
    side = case.meta["side"]
    fib = np.nonzero(y == 4)[2].mean() - np.nonzero(y == 3)[2].mean()
    assert (fib > 0) == (side == "right")  # mirrored: the fibula moves to the other side


def test_realism_augmentation_makes_radiograph_like_inputs():
    """With realism_p = 1 both views go through the simulator (noise, scatter, collimation filled):
    the input differs from the clean one but keeps the bones where they were."""
    from KneeReconLib.data.dataset import AugmentConfig, make_sample, phantom_case

    case = phantom_case(1000123, grid_size=32)
    clean, lab = make_sample(case)
    aug = AugmentConfig(realism_p=1.0, mirror_p=0.0, offset_mm=0.0, shift_mm=0.0)
    real, lab2 = make_sample(case, np.random.default_rng(3), aug)
    assert real.shape == clean.shape and np.isfinite(real).all()
    assert (lab2 == lab).all()
    assert np.abs(real - clean).mean() > 0.01
    bone, soft = lab > 0, lab == 0
    for ch in (0, 1):  # bone still brighter than its surroundings in both views
        assert real[ch][bone].mean() > real[ch][soft].mean()
