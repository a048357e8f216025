"""DESIGN.md's coordinate contract: X-ray views, their projection of world points, and the
reconstruction grid. World frame is patient LPS in mm with the isocentre at the origin."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import KneeReconError

VIEWS = ("ap", "lateral")
# extents (x, y, z) in mm that the network sees at its grid size: the range of the training cases'
# own grids (CT fields of view 130-175 mm across and 180-250 mm high)
NETWORK_EXTENT_MM = ((128.0, 180.0), (128.0, 180.0), (180.0, 250.0))
SIDES = ("left", "right")


@dataclass(frozen=True)
class ViewGeometry:
    """Geometry of one radiograph.

    `spacing` is (column, row) in mm on the detector as stored in the file. With a parallel
    beam (sid/sod None) that is the spacing at the isocentre; with a cone beam the spacing at
    the isocentre is spacing * sod / sid.
    """

    view: str
    width: int
    height: int
    spacing: tuple[float, float]
    sid: float | None = None
    sod: float | None = None
    side: str = "right"  # places the lateral cone-beam source on the knee's lateral side

    def __post_init__(self):
        if self.view not in VIEWS:
            raise KneeReconError(f"unknown view {self.view!r}; expected 'ap' or 'lateral'")
        if not all(np.isfinite(s) and s > 0 for s in self.spacing):  # NaN passes every comparison: test it first
            raise KneeReconError(f"the {self.view} pixel spacing must be positive finite mm, got {tuple(self.spacing)}")
        if self.width < 1 or self.height < 1:
            raise KneeReconError(f"the {self.view} image has no pixels ({self.width}x{self.height})")
        if (self.sid is None) != (self.sod is None):
            raise KneeReconError("cone-beam geometry needs both SID and SOD")
        if self.cone and not (np.isfinite(self.sid) and np.isfinite(self.sod)):
            raise KneeReconError(f"cone-beam geometry needs finite SID and SOD (got SID={self.sid}, SOD={self.sod})")
        if self.cone and not (0 < self.sod < self.sid):
            raise KneeReconError(f"cone-beam geometry needs 0 < SOD < SID (got SID={self.sid}, SOD={self.sod})")
        if self.side not in SIDES:
            raise KneeReconError(f"side must be 'left' or 'right', got {self.side!r}")

    @property
    def cone(self) -> bool:
        return self.sid is not None

    @property
    def magnification(self) -> float:
        return self.sid / self.sod if self.cone else 1.0

    @property
    def iso_spacing(self) -> tuple[float, float]:
        m = self.magnification
        return (self.spacing[0] / m, self.spacing[1] / m)

    @property
    def iso_extent(self) -> tuple[float, float]:
        """(width, height) in mm at the isocentre."""
        s = self.iso_spacing
        return (self.width * s[0], self.height * s[1])

    def source_position(self) -> np.ndarray:
        """Cone-beam source in LPS mm."""
        if self.view == "ap":
            return np.array([0.0, -self.sod, 0.0])
        return np.array([-self.sod if self.side == "right" else self.sod, 0.0, 0.0])

    def project(self, x, y, z):
        """World points (LPS mm) to continuous pixel coordinates (column, row)."""
        x, y, z = (np.asarray(a, dtype=np.float64) for a in (x, y, z))
        u = x if self.view == "ap" else y  # in-plane horizontal coordinate
        if self.cone:
            if self.view == "ap":
                depth = y + self.sod
            elif self.side == "right":
                depth = x + self.sod
            else:
                depth = self.sod - x
            m = self.sid / depth
            col = u * m / self.spacing[0]
            row = -z * m / self.spacing[1]
        else:
            col = u / self.spacing[0]
            row = -z / self.spacing[1]
        return col + (self.width - 1) / 2.0, row + (self.height - 1) / 2.0

    def pixel_to_detector(self, col, row):
        """Pixel coordinates to the in-plane detector offsets (u, v) in mm (v toward superior)."""
        return ((np.asarray(col) - (self.width - 1) / 2.0) * self.spacing[0],
                -(np.asarray(row) - (self.height - 1) / 2.0) * self.spacing[1])


@dataclass(frozen=True)
class ReconGrid:
    """Axis-aligned LPS grid; arrays on it are indexed (k, j, i) = (z, y, x)."""

    shape: tuple[int, int, int]  # (nz, ny, nx)
    spacing: tuple[float, float, float]  # (sx, sy, sz) mm
    origin: tuple[float, float, float]  # centre of voxel (0, 0, 0), LPS mm

    @classmethod
    def centered(cls, extent_xyz, size_xyz) -> "ReconGrid":
        sp = tuple(float(e) / int(n) for e, n in zip(extent_xyz, size_xyz))
        org = tuple(-(int(n) - 1) / 2.0 * s for n, s in zip(size_xyz, sp))
        return cls(shape=(int(size_xyz[2]), int(size_xyz[1]), int(size_xyz[0])), spacing=sp, origin=org)

    @classmethod
    def from_views(cls, ap: ViewGeometry, lateral: ViewGeometry, size: int | tuple[int, int, int] = 128,
                   height_tolerance: float = 0.2) -> "ReconGrid":
        """DESIGN.md's grid: x from the AP width, y from the lateral width, z from the common
        height, centred on the isocentre. Refuses views whose heights disagree too much."""
        ha, hl = ap.iso_extent[1], lateral.iso_extent[1]
        if abs(ha - hl) > height_tolerance * max(ha, hl):
            raise KneeReconError(
                f"the AP and lateral views cover different heights at the isocentre ({ha:.1f} mm vs {hl:.1f} mm, "
                f"more than {height_tolerance:.0%} apart): check that both images show the same knee, their pixel "
                "spacing, and the SID/SOD geometry")
        n = (size, size, size) if isinstance(size, int) else tuple(size)
        return cls.centered((ap.iso_extent[0], lateral.iso_extent[0], min(ha, hl)), n)

    @classmethod
    def for_network(cls, ap: ViewGeometry, lateral: ViewGeometry, size: int | tuple[int, int, int] = 128) -> "ReconGrid":
        """The grid the network runs on: DESIGN.md's grid (`from_views`) with each extent clamped
        to `NETWORK_EXTENT_MM`, the range the network was trained at, so that a tightly
        collimated image (the grid is padded beyond it) and a large cassette (the grid is cropped
        around the isocentre) show the bones at the same scale. Outputs are resampled from it onto
        `from_views`' grid by physical coordinates."""
        design = cls.from_views(ap, lateral, size)
        n = design.shape[::-1]
        ext = [float(np.clip(s * k, *NETWORK_EXTENT_MM[a])) for a, (s, k) in enumerate(zip(design.spacing, n))]
        return cls.centered(ext, n)

    def axis(self, a: int) -> np.ndarray:
        """Voxel-centre coordinates along x (0), y (1) or z (2)."""
        n = self.shape[2 - a]
        return self.origin[a] + np.arange(n) * self.spacing[a]

    def reference_image(self, pixel_type=sitk.sitkUInt8) -> sitk.Image:
        img = sitk.Image([self.shape[2], self.shape[1], self.shape[0]], pixel_type)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        return img

    def to_image(self, array: np.ndarray) -> sitk.Image:
        """Array (k, j, i) on this grid -> SimpleITK image with the grid's true geometry."""
        if tuple(array.shape) != tuple(self.shape):
            raise ValueError(f"array shape {array.shape} is not the grid's {self.shape}")
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        return img

    def to_dict(self) -> dict:
        return {"shape_zyx": list(self.shape), "spacing_xyz_mm": list(self.spacing),
                "origin_xyz_mm": list(self.origin), "frame": "LPS, identity direction"}
