"""Bring a CT (any size, spacing, orientation) into the knee frame: axis-aligned LPS with the
isocentre at the world origin, resampled by physical coordinates."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..core.errors import KneeReconError


def bone_center(labels: sitk.Image) -> tuple[float, float, float]:
    """Physical centre (LPS mm) of the bounding box of all non-zero labels."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(labels > 0, sitk.sitkUInt8))
    if not stats.HasLabel(1):
        raise KneeReconError("the label map contains no bone labels")
    x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(1)
    lo = labels.TransformIndexToPhysicalPoint((x0, y0, z0))
    hi = labels.TransformIndexToPhysicalPoint((x0 + sx - 1, y0 + sy - 1, z0 + sz - 1))
    return tuple((a + b) / 2.0 for a, b in zip(lo, hi))


def image_center(image: sitk.Image) -> tuple[float, float, float]:
    return image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])


def physical_extent(image: sitk.Image) -> np.ndarray:
    """Axis-aligned extent (mm) of an image's corners in LPS."""
    n = image.GetSize()
    lo_hi = [(-0.5, k - 0.5) for k in n]  # voxel edges, in continuous index
    corners = [image.TransformContinuousIndexToPhysicalPoint((a, b, c))
               for a in lo_hi[0] for b in lo_hi[1] for c in lo_hi[2]]
    c = np.array(corners)
    return c.max(0) - c.min(0)


def to_knee_frame(ct: sitk.Image, labels: sitk.Image | None = None, voxel_mm: float | None = None,
                  center: tuple[float, float, float] | None = None,
                  fov_mm: tuple[float, float, float] | None = None) -> tuple[sitk.Image, sitk.Image | None]:
    """Resample `ct` (and `labels`) onto an axis-aligned LPS grid whose origin is the isocentre.

    The isocentre defaults to the centre of the bones' bounding box when labels are given,
    else to the CT's centre. The field of view defaults to the CT's own extent."""
    if ct.GetDimension() != 3:
        raise KneeReconError(f"a CT must be 3D, got a {ct.GetDimension()}D image")
    if labels is not None:
        if labels.GetDimension() != 3:
            raise KneeReconError("the label map must be 3D")
        if not _same_space(ct, labels):
            raise KneeReconError(
                "the CT and its label map do not share one geometry (size, spacing, origin or direction differ); "
                "resample the labels onto the CT first")
    if center is None:
        center = bone_center(labels) if labels is not None else image_center(ct)
    vox = float(voxel_mm or min(ct.GetSpacing()))
    fov = np.asarray(fov_mm if fov_mm is not None else physical_extent(ct), float)
    size = [max(1, int(round(f / vox))) for f in fov]
    ref = sitk.Image(size, sitk.sitkUInt8)
    ref.SetSpacing((vox,) * 3)
    ref.SetOrigin(tuple(-(n - 1) / 2.0 * vox for n in size))
    shift = sitk.TranslationTransform(3, tuple(float(c) for c in center))  # output point -> input point
    ct_k = sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), ref, shift, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    lab_k = None
    if labels is not None:
        lab_k = sitk.Resample(sitk.Cast(labels, sitk.sitkUInt8), ref, shift, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return ct_k, lab_k


def _same_space(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 10)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))
