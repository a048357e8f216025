import numpy as np
import pytest

from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.core.geometry import ReconGrid, ViewGeometry
from KneeReconLib.geometry.backprojection import backproject
from KneeReconLib.io.xray_io import XRay


def test_grid_follows_views():
    ap = ViewGeometry("ap", 200, 267, (0.75, 0.75))
    lat = ViewGeometry("lateral", 180, 267, (0.75, 0.75))
    g = ReconGrid.from_views(ap, lat, 128)
    assert g.shape == (128, 128, 128)
    assert g.spacing == pytest.approx((150 / 128, 135 / 128, 200.25 / 128))
    assert g.axis(0).mean() == pytest.approx(0) and g.axis(2).mean() == pytest.approx(0)
    with pytest.raises(KneeReconError, match="different heights"):
        ReconGrid.from_views(ap, ViewGeometry("lateral", 180, 150, (0.75, 0.75)), 128)


def test_contract_pixel_mapping():
    ap = ViewGeometry("ap", 201, 101, (0.5, 0.5))
    c, r = ap.project(10.0, 123.0, 5.0)  # y does not matter for a parallel AP beam
    assert c == pytest.approx(100 + 20) and r == pytest.approx(50 - 10)
    lat = ViewGeometry("lateral", 201, 101, (0.5, 0.5))
    c, r = lat.project(77.0, -10.0, -5.0)
    assert c == pytest.approx(100 - 20) and r == pytest.approx(50 + 10)


def test_parallel_backprojection_replicates_along_beams():
    ap_g = ViewGeometry("ap", 64, 64, (2.0, 2.0))
    lat_g = ViewGeometry("lateral", 64, 64, (2.0, 2.0))
    ap_px = np.zeros((64, 64), np.float32)
    ap_px[10, 50] = 1.0  # a bright pixel: x = (50 - 31.5) * 2 = 37, z = (31.5 - 10) * 2 = 43
    lat_px = np.zeros((64, 64), np.float32)
    grid = ReconGrid.from_views(ap_g, lat_g, 64)
    vol = backproject(XRay(ap_px, ap_g), XRay(lat_px, lat_g), grid)
    k, j, i = np.unravel_index(int(vol[0].argmax()), grid.shape)
    assert grid.axis(0)[i] == pytest.approx(37.0) and grid.axis(2)[k] == pytest.approx(43.0)
    assert np.allclose(vol[0][k, :, i], vol[0][k, 0, i])  # constant along y (the AP beam)


def test_cone_backprojection_samples_where_voxels_project():
    ap_g = ViewGeometry("ap", 96, 96, (1.5, 1.5), 1000.0, 650.0)
    lat_g = ViewGeometry("lateral", 96, 96, (1.5, 1.5), 1000.0, 650.0, side="left")
    grid = ReconGrid.from_views(ap_g, lat_g, 96)  # grid step = iso pixel: no anti-alias blur
    rng = np.random.default_rng(0)
    ap_px, lat_px = rng.random((96, 96)).astype(np.float32), rng.random((96, 96)).astype(np.float32)
    vol = backproject(XRay(ap_px, ap_g), XRay(lat_px, lat_g), grid)
    from scipy.ndimage import map_coordinates
    for (k, j, i) in [(3, 5, 7), (60, 10, 90), (48, 48, 48)]:
        x, y, z = grid.axis(0)[i], grid.axis(1)[j], grid.axis(2)[k]
        for ch, (px, g) in enumerate(((ap_px, ap_g), (lat_px, lat_g))):
            c, r = g.project(x, y, z)
            expect = map_coordinates(px, [[r], [c]], order=1, mode="nearest")[0]
            assert vol[ch, k, j, i] == pytest.approx(expect, abs=1e-4)
