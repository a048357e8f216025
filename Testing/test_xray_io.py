import numpy as np
import pytest
import SimpleITK as sitk

from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.core.geometry import ViewGeometry
from KneeReconLib.io.xray_io import read_xray, write_xray


def _img(arr, spacing=(0.4, 0.5)):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    return im


def test_nrrd_roundtrip_keeps_spacing_and_bone_bright(tmp_path):
    a = np.zeros((60, 40), np.float32)
    a[20:40, 10:20] = 3.0
    g = ViewGeometry("ap", 40, 60, (0.4, 0.5))
    write_xray(a, g, str(tmp_path / "ap.nrrd"))
    x = read_xray(str(tmp_path / "ap.nrrd"), "ap")
    assert x.geometry.spacing == pytest.approx((0.4, 0.5))
    assert (x.geometry.width, x.geometry.height) == (40, 60)
    assert x.pixels[30, 15] > x.pixels[5, 5]
    assert sitk.ReadImage(str(tmp_path / "ap.nrrd")).GetPixelID() == sitk.sitkUInt16


def test_dicom_monochrome1_is_inverted_and_spacing_read(tmp_path):
    a = np.full((64, 48), 4000, np.uint16)
    a[20:40, 10:30] = 1000  # MONOCHROME1: low values are bright (bone)
    im = _img(a, (0.3, 0.2))  # GDCM writes the spacing as Imager Pixel Spacing (row 0.2, column 0.3)
    im.SetMetaData("0018|1110", "1100")  # Distance Source to Detector
    im.SetMetaData("0018|1111", "1000")  # Distance Source to Patient
    im.SetMetaData("0008|0060", "DX")
    p = tmp_path / "lat.dcm"
    sitk.WriteImage(im, str(p))
    raw = p.read_bytes()  # GDCM always writes MONOCHROME2; flip the tag to make a MONOCHROME1 file
    assert raw.count(b"MONOCHROME2 ") == 1
    p.write_bytes(raw.replace(b"MONOCHROME2 ", b"MONOCHROME1 "))
    x = read_xray(str(p), "lateral")
    assert x.info.get("inverted") == "MONOCHROME1"
    assert x.pixels[30, 20] > x.pixels[5, 5]  # bone bright after inversion
    assert x.geometry.spacing == pytest.approx((0.3, 0.2))
    assert x.geometry.sid == 1100 and x.geometry.sod == 1000


def test_png_needs_spacing(tmp_path):
    a = (np.random.default_rng(0).random((50, 50)) * 255).astype(np.uint8)
    p = str(tmp_path / "ap.png")
    sitk.WriteImage(sitk.GetImageFromArray(a), p)
    with pytest.raises(KneeReconError, match="no pixel spacing.*--pixel-spacing"):
        read_xray(p, "ap")
    assert read_xray(p, "ap", pixel_spacing=0.3).geometry.spacing == (0.3, 0.3)


def test_single_slice_3d_accepted_and_true_3d_refused(tmp_path):
    a = np.random.default_rng(0).random((1, 40, 30)).astype(np.float32)
    im = sitk.GetImageFromArray(a)
    im.SetSpacing((0.5, 0.6, 1.0))
    p = str(tmp_path / "one.nii.gz")
    sitk.WriteImage(im, p)
    x = read_xray(p, "ap")
    assert x.pixels.shape == (40, 30) and x.geometry.spacing == pytest.approx((0.5, 0.6))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 40, 30), np.float32)), str(tmp_path / "vol.nii.gz"))
    with pytest.raises(KneeReconError, match="is 3D"):
        read_xray(str(tmp_path / "vol.nii.gz"), "ap")


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.nrrd"
    bad.write_bytes(b"NRRD0004\nthis is not a real header\n")
    with pytest.raises(KneeReconError, match="cannot read the ap image"):
        read_xray(str(bad), "ap")
    with pytest.raises(KneeReconError, match="does not exist"):
        read_xray(str(tmp_path / "nope.nrrd"), "ap")
    flat = _img(np.ones((40, 40), np.float32))
    sitk.WriteImage(flat, str(tmp_path / "flat.nrrd"))
    with pytest.raises(KneeReconError, match="blank"):
        read_xray(str(tmp_path / "flat.nrrd"), "ap")
