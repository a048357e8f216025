"""Reading and writing radiographs per DESIGN.md: any 2D image SimpleITK reads, spacing from
the file (or an explicit override), bone bright (DICOM MONOCHROME1 is inverted on reading)."""
from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk

from ..core.errors import KneeReconError
from ..core.geometry import ViewGeometry
from .fileio import atomic_write_image

# formats whose files carry no physical pixel spacing: SimpleITK reports 1.0 for them
_NO_SPACING_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_DICOM_EXT = (".dcm", ".dicom", ".ima")


@dataclass
class XRay:
    """A radiograph: pixels [row, col] (bone bright) and the view's geometry."""

    pixels: np.ndarray
    geometry: ViewGeometry
    info: dict = field(default_factory=dict)  # e.g. DICOM-derived SID/SOD, source file


@contextmanager
def _native_stderr_silenced():
    """Silence what C libraries print straight to the process's stderr while a file is decoded
    (libpng's "CRC error" lines, GDCM and ITK warnings): a broken file is reported once, as
    KneeReconError's one line, not as a page of library chatter."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _is_dicom(path: str) -> bool:
    if path.lower().endswith(_DICOM_EXT):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _tag(reader_or_image, key: str) -> str | None:
    try:
        if reader_or_image.HasMetaDataKey(key):
            return reader_or_image.GetMetaData(key).strip()
    except RuntimeError:
        pass
    return None


def _floats(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        return [float(t) for t in text.replace("\\", " ").split()]
    except ValueError:
        return None


@functools.lru_cache(maxsize=1)
def _reader_inverts_monochrome1() -> bool:
    """Whether this SimpleITK/GDCM already turns MONOCHROME1 pixels into MONOCHROME2 on reading
    (ITK 5.3 and newer do; older ones do not). Probed once with a two-pixel file."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "probe.dcm")
        im = sitk.GetImageFromArray(np.array([[0, 1000]], np.uint16))
        im.SetMetaData("0008|0060", "DX")
        sitk.WriteImage(im, p)
        with open(p, "rb") as f:
            raw = f.read()
        with open(p, "wb") as f:
            f.write(raw.replace(b"MONOCHROME2 ", b"MONOCHROME1 "))
        a = sitk.GetArrayFromImage(sitk.ReadImage(p)).ravel()
    return bool(a[0] > a[1])


def read_xray(path: str, view: str, pixel_spacing: float | tuple[float, float] | None = None,
              sid: float | None = None, sod: float | None = None, side: str = "right") -> XRay:
    """Read one radiograph. `pixel_spacing` (mm, detector) overrides the file's; SID/SOD given
    here override DICOM's Distance Source to Detector / to Patient tags."""
    if not os.path.isfile(path):
        raise KneeReconError(f"{view} image {path!r} does not exist")
    try:
        with _native_stderr_silenced():
            img = sitk.ReadImage(path)
    except RuntimeError as e:
        raise KneeReconError(f"cannot read the {view} image {path!r}: it is not an image file SimpleITK can read "
                             f"(or it is corrupt): {str(e).strip().splitlines()[-1][:160]}")
    dicom = _is_dicom(path)
    info: dict = {"file": os.path.abspath(path)}
    tags = {k: _tag(img, k) for k in ("0018|1164", "0028|0030", "0028|0004", "0018|1110", "0018|1111")}  # slicing drops them
    meta = {k: _tag(img, k) for k in ("KneeRecon_SID_mm", "KneeRecon_SOD_mm")}
    if img.GetNumberOfComponentsPerPixel() > 1:  # RGB(A) screenshots: luminance
        comps = [sitk.VectorIndexSelectionCast(img, i, sitk.sitkFloat32) for i in range(min(3, img.GetNumberOfComponentsPerPixel()))]
        img = comps[0] * 0.299 + comps[1] * 0.587 + comps[2] * 0.114 if len(comps) == 3 else comps[0]
    size = img.GetSize()
    if img.GetDimension() == 3:
        if size[2] != 1:
            raise KneeReconError(f"the {view} image {path!r} is 3D ({size[0]}x{size[1]}x{size[2]}); "
                                 "an X-ray must be a 2D image (or 3D with a single slice)")
        spacing3 = img.GetSpacing()
        img = img[:, :, 0]
        img.SetSpacing(spacing3[:2])
    elif img.GetDimension() != 2:
        raise KneeReconError(f"the {view} image {path!r} has {img.GetDimension()} dimensions; expected 2")
    w, h = img.GetSize()
    if w < 16 or h < 16:
        raise KneeReconError(f"the {view} image {path!r} is only {w}x{h} pixels; too small to be a radiograph")
    px = sitk.GetArrayFromImage(img).astype(np.float32)
    if not np.isfinite(px).all():
        raise KneeReconError(f"the {view} image {path!r} contains NaN or infinite pixels")

    spacing = None
    if pixel_spacing is not None:
        spacing = (float(pixel_spacing), float(pixel_spacing)) if np.isscalar(pixel_spacing) else tuple(map(float, pixel_spacing))
        info["spacing_source"] = "option"
    elif dicom:
        for key, name in (("0018|1164", "Imager Pixel Spacing"), ("0028|0030", "Pixel Spacing")):
            v = _floats(tags[key])
            if v and len(v) >= 2 and min(v) > 0:
                spacing = (v[1], v[0])  # DICOM stores row spacing first
                info["spacing_source"] = f"DICOM {name}"
                break
        photometric = tags["0028|0004"]
        if photometric and photometric.upper().startswith("MONOCHROME1"):
            info["inverted"] = "MONOCHROME1"
            if not _reader_inverts_monochrome1():  # MONOCHROME1: bright = low attenuation; invert
                px = px.max() + px.min() - px
        if sid is None and sod is None:
            dsd, dsp = _floats(tags["0018|1110"]), _floats(tags["0018|1111"])
            if dsd and dsp and 0 < dsp[0] < dsd[0]:
                sid, sod = dsd[0], dsp[0]
                info["geometry_source"] = "DICOM Distance Source to Detector/Patient"
    elif not path.lower().endswith(_NO_SPACING_EXT):
        spacing = tuple(float(s) for s in img.GetSpacing())
        info["spacing_source"] = "file"
        if sid is None and sod is None:  # cone-beam geometry that `write_xray` (kneerecon drr) recorded
            dsd, dsp = (_floats(meta[k]) for k in ("KneeRecon_SID_mm", "KneeRecon_SOD_mm"))
            if dsd and dsp:
                sid, sod = dsd[0], dsp[0]
                info["geometry_source"] = "file header (KneeRecon_SID_mm, KneeRecon_SOD_mm)"
    if spacing is None:
        raise KneeReconError(
            f"the {view} image {path!r} carries no pixel spacing (PNG/JPEG/TIFF files and DICOM without "
            "Imager Pixel Spacing do not); give it with --pixel-spacing MM (mm per pixel at the detector)")
    if not np.isfinite(spacing).all() or min(spacing) <= 0 or max(spacing) > 10:
        raise KneeReconError(f"the {view} image {path!r} has an implausible pixel spacing {spacing} mm")
    if float(px.max() - px.min()) <= 0:
        raise KneeReconError(f"the {view} image {path!r} is blank (all pixels equal)")
    try:
        geom = ViewGeometry(view, w, h, spacing, sid, sod, side)
    except KneeReconError as e:
        raise KneeReconError(f"{view} image {path!r}: {e}")
    return XRay(px, geom, info)


def write_xray(pixels: np.ndarray, geometry: ViewGeometry, path: str, max_value: float = 30000.0) -> None:
    """Write a radiograph as real inputs come: 2D uint16, bone bright, spacing set, image centre
    on the isocentre (origin = -(n-1)/2 * spacing). Values are scaled so the maximum is `max_value`."""
    a = np.asarray(pixels, np.float32)
    a = a - min(0.0, float(a.min()))
    top = float(a.max()) or 1.0
    img = sitk.GetImageFromArray(np.clip(np.rint(a * (max_value / top)), 0, 65535).astype(np.uint16))
    sx, sy = geometry.spacing
    img.SetSpacing((sx, sy))
    img.SetOrigin((-(geometry.width - 1) / 2 * sx, -(geometry.height - 1) / 2 * sy))
    img.SetMetaData("KneeRecon_view", geometry.view)
    if geometry.cone:
        img.SetMetaData("KneeRecon_SID_mm", f"{geometry.sid}")
        img.SetMetaData("KneeRecon_SOD_mm", f"{geometry.sod}")
    atomic_write_image(img, path, compress=True)


def with_side(xray: XRay, side: str) -> XRay:
    return replace(xray, geometry=replace(xray.geometry, side=side))
