import numpy as np
import pytest
import SimpleITK as sitk
import torch

from KneeReconLib.data.drr import DRRConfig, hu_to_mu, project_cone, project_cone_planes, project_parallel, render_drr

# both cone-beam projectors: ray marching (the reference) and Joseph's plane method (the default)
CONE = [pytest.param(lambda v, g, view: project_cone(v, g, view, 256), id="raymarch"),
        pytest.param(lambda v, g, view: project_cone_planes(v, g, view), id="planes")]
from KneeReconLib.core.geometry import ReconGrid, ViewGeometry


def _ball(grid, r, mu=0.02, center=(0.0, 0.0, 0.0)):
    zz, yy, xx = np.meshgrid(grid.axis(2), grid.axis(1), grid.axis(0), indexing="ij")
    return (((xx - center[0]) ** 2 + (yy - center[1]) ** 2 + (zz - center[2]) ** 2) < r * r).astype(np.float32) * mu


def test_parallel_ball_matches_analytic_line_integral():
    grid = ReconGrid.centered((120, 120, 120), (240, 240, 240))
    r, mu = 40.0, 0.02
    ap, lat = project_parallel(torch.from_numpy(_ball(grid, r, mu)), grid.spacing)
    # chord through the centre: 2 r mu; and at an offset of 20 mm: 2 sqrt(r^2 - 20^2) mu
    c = (240 - 1) / 2
    centre = ap[int(c):int(c) + 2, int(c):int(c) + 2].mean().item()
    assert centre == pytest.approx(2 * r * mu, rel=0.01)
    col = int(round(c + 20 / grid.spacing[0]))
    x = (col - c) * grid.spacing[0]
    off = lat[int(c):int(c) + 2, col].mean().item()
    assert off == pytest.approx(2 * np.sqrt(r * r - x * x) * mu, rel=0.01)


def test_parallel_orientation_follows_contract():
    grid = ReconGrid.centered((100, 100, 100), (50, 50, 50))
    vol = _ball(grid, 6, center=(30.0, -20.0, 25.0))  # patient-left, anterior, superior
    ap, lat = project_parallel(torch.from_numpy(vol), grid.spacing)
    r_ap, c_ap = np.unravel_index(int(ap.argmax()), ap.shape)
    r_lat, c_lat = np.unravel_index(int(lat.argmax()), lat.shape)
    assert c_ap > 25 + 10  # AP columns increase toward patient left (+x)
    assert c_lat < 25 - 5  # lateral columns increase toward posterior: anterior is on the left
    assert r_ap < 25 - 8 and r_lat < 25 - 8  # rows increase toward inferior: superior is near the top


@pytest.mark.parametrize("cone", CONE)
def test_cone_beam_magnifies_by_sid_over_sod(cone):
    grid = ReconGrid.centered((100, 100, 100), (100, 100, 100))
    r = 30.0
    vol = torch.from_numpy(_ball(grid, r))[None]
    sid, sod = 1000.0, 600.0
    view = ViewGeometry("ap", 200, 200, (1.0, 1.0), sid, sod)
    img = cone(vol, grid, view)[0].numpy()
    width_px = (img[100] > 1e-3).sum()  # silhouette width through the centre row
    # a sphere's silhouette from a point source is slightly wider than 2 r M; M = sid/sod
    m = sid / sod
    expected = 2 * r * m / np.sqrt(1 - (r / sod) ** 2)
    assert width_px == pytest.approx(expected, abs=2.5)
    assert img.max() == pytest.approx(2 * r * 0.02, rel=0.02)
    lat = ViewGeometry("lateral", 200, 200, (1.0, 1.0), sid, sod, side="left")
    assert cone(vol, grid, lat)[0].max().item() == pytest.approx(2 * r * 0.02, rel=0.02)


@pytest.mark.parametrize("cone", CONE)
def test_cone_beam_agrees_with_geometry_projection_of_a_point(cone):
    grid = ReconGrid.centered((80, 80, 80), (80, 80, 80))
    p = (15.0, -10.0, 20.0)
    vol = torch.from_numpy(_ball(grid, 4, center=p))[None]
    for view in (ViewGeometry("ap", 160, 160, (1.0, 1.0), 900.0, 500.0),
                 ViewGeometry("lateral", 160, 160, (1.0, 1.0), 900.0, 500.0, side="right"),
                 ViewGeometry("lateral", 160, 160, (1.0, 1.0), 900.0, 500.0, side="left")):
        img = cone(vol, grid, view)[0].numpy()
        rows, cols = np.mgrid[0:160, 0:160]
        w = img / img.sum()
        c_est, r_est = (w * cols).sum(), (w * rows).sum()
        c, r = view.project(*p)
        assert abs(c_est - c) < 0.5 and abs(r_est - r) < 0.5, view


def test_projectors_are_differentiable():
    grid = ReconGrid.centered((8, 8, 8), (4, 4, 4))
    vol = torch.rand(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: project_parallel(v, grid.spacing)[0], (vol,))
    view = ViewGeometry("ap", 5, 5, (2.0, 2.0), 100.0, 60.0)
    assert torch.autograd.gradcheck(lambda v: project_cone(v, grid, view, 16), (vol,), atol=1e-6)
    assert torch.autograd.gradcheck(lambda v: project_cone_planes(v, grid, view), (vol,), atol=1e-6)


def test_plane_projector_matches_ray_marching():
    """Joseph's method and dense ray marching integrate the same volume to within 0.1 %."""
    grid = ReconGrid.centered((120, 110, 100), (60, 55, 50))
    rng = np.random.default_rng(0)
    vol = torch.from_numpy(np.clip(_ball(grid, 35) * 1.0 + _ball(grid, 10, center=(12.0, -8.0, 15.0)), 0, None)
                           + 0.002 * rng.random(grid.shape).astype(np.float32))[None]
    for view in (ViewGeometry("ap", 150, 140, (1.1, 1.0), 1000.0, 700.0),
                 ViewGeometry("lateral", 150, 140, (1.0, 1.0), 1000.0, 700.0, side="right"),
                 ViewGeometry("lateral", 150, 140, (1.0, 1.0), 1000.0, 700.0, side="left")):
        ref = project_cone(vol, grid, view, 1024)[0]
        fast = project_cone_planes(vol, grid, view)[0]
        assert float((fast - ref).abs().mean() / ref.abs().mean()) < 1e-3, view


def test_hu_to_mu_model():
    assert hu_to_mu(np.array([-1000.0]))[0] == pytest.approx(0.0)
    assert hu_to_mu(np.array([0.0]))[0] == pytest.approx(0.02)
    assert hu_to_mu(np.array([1000.0]))[0] == pytest.approx(0.02 * 2.2)
    t = hu_to_mu(torch.tensor([0.0, 500.0]))
    assert torch.allclose(t, torch.from_numpy(hu_to_mu(np.array([0.0, 500.0]))))


def test_render_drr_of_phantom_is_bone_bright(phantom_right):
    out = render_drr(phantom_right.ct, DRRConfig(pixel_spacing=1.0))
    ap, g = out["ap"]
    assert ap.shape == (g.height, g.width)
    lab = sitk.GetArrayFromImage(phantom_right.labels)
    bone_cols = np.nonzero((lab > 0).any(axis=(0, 1)))[0]
    # columns crossing bone integrate more attenuation than soft-tissue-only columns inside the leg
    mid = ap[ap.shape[0] // 2]
    assert mid[bone_cols].mean() > np.median(mid[mid > 0.5])
