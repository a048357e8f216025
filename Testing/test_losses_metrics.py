import numpy as np
import pytest
import torch

from KneeReconLib.evaluation.metrics import dice_per_class, surface_distances
from KneeReconLib.training.losses import ngcc, ngcc_loss, soft_dice_loss, surface_weights, weighted_cross_entropy


def _sphere(n, r, c):
    zz, yy, xx = np.mgrid[0:n, 0:n, 0:n]
    return ((xx - c[0]) ** 2 + (yy - c[1]) ** 2 + (zz - c[2]) ** 2) < r * r


def test_surface_weights_peak_at_surfaces():
    lab = _sphere(32, 8, (16, 16, 16)).astype(np.uint8)
    w = surface_weights(lab, (1.0, 1.0, 1.0), w0=5.0, sigma_mm=2.0)
    assert w[16, 16, 16 + 8] > 5.0 and w[16, 16, 16] == pytest.approx(1.0, abs=0.02)  # 7 mm from the surface
    assert w[0, 0, 0] == pytest.approx(1.0, abs=1e-3)


def test_weighted_ce_and_ngcc():
    y = torch.randint(0, 5, (1, 8, 8, 8))
    good = torch.nn.functional.one_hot(y, 5).permute(0, 4, 1, 2, 3).float() * 10
    w = torch.ones(1, 8, 8, 8)
    assert weighted_cross_entropy(good, y, w) < weighted_cross_entropy(torch.zeros_like(good), y, w)
    img = torch.rand(2, 16, 16)
    assert torch.allclose(ngcc(img, img * 3 + 1), torch.ones(2), atol=1e-5)
    assert ngcc(img, -img).mean() < -0.99
    # NGCC loss is low when the predicted bone projects onto the X-ray, high when it does not
    bone = torch.zeros(1, 16, 16, 16)
    bone[:, 4:12, 5:10, 6:11] = 1
    ap = bone.sum(2)  # [1, z, x], grid orientation
    lat = bone.sum(3)
    x = torch.stack([ap[:, :, None, :].expand(1, 16, 16, 16), lat[:, :, :, None].expand(1, 16, 16, 16)], 1)
    logits = torch.stack([-8 * bone, 8 * bone, 0 * bone, 0 * bone, 0 * bone], 1) - 4
    wrong = torch.roll(logits, 5, dims=4)
    assert ngcc_loss(logits, x, (1, 1, 1)) < 0.3 < ngcc_loss(wrong, x, (1, 1, 1))


def test_dice_and_surface_distance_on_known_shapes():
    a = _sphere(48, 12, (24, 24, 24))
    b = _sphere(48, 12, (26, 24, 24))  # shifted by 2 voxels along x
    d = dice_per_class(a.astype(int), a.astype(int), 2)
    assert d[1] == 1.0
    sd = surface_distances(a, a, (1.0, 1.0, 1.0))
    assert sd["chamfer"] < 1e-6
    sd2 = surface_distances(a, b, (0.5, 0.5, 0.5))  # 2 voxels = 1 mm shift
    assert 0.4 < sd2["chamfer"] < 1.0 and 0.9 < sd2["hd95"] < 1.2


def test_soft_dice_ignores_absent_classes():
    y = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    y[:, 2:6, 2:6, 2:6] = 1  # only the femur is present
    perfect = torch.nn.functional.one_hot(y, 5).permute(0, 4, 1, 2, 3).float() * 20
    assert soft_dice_loss(perfect, y) < 1e-3
    # predicting some patella where there is none costs nothing through Dice (the CE handles it) ...
    leaky = perfect.clone()
    leaky[:, 2, 0, 0, 0] = 40
    assert soft_dice_loss(leaky, y) < 1e-3
    # ... but missing the femur does
    assert soft_dice_loss(torch.zeros_like(perfect), y) > 0.5


def test_ngcc_gradient_is_finite_for_flat_images():
    flat = torch.zeros(1, 8, 8, requires_grad=True)
    img = torch.rand(1, 8, 8)
    ngcc(img, flat).sum().backward()
    assert torch.isfinite(flat.grad).all()


def test_ngcc_on_a_cone_beam_collimated_case():
    """The NGCC term on a real cone-beam, collimated training sample: read back at the central plane
    and compared inside each view's field only, the truth scores better than the truth moved 6 mm."""
    from KneeReconLib.data.dataset import GeometryConfig, make_sample, phantom_case
    from KneeReconLib.training.train import field_masks

    case = phantom_case(5, 64, geometry=GeometryConfig(cone_p=1.0, collimate_p=1.0))
    x, y = make_sample(case)
    grid = case.grid()
    ap_m, lat_m = field_masks(grid, case.ap_geom, case.lat_geom)
    assert ap_m.shape == (64, 64) and lat_m.shape == (64, 64)
    assert 0.1 < ap_m.mean() < 1.0 and 0.1 < lat_m.mean() < 1.0  # collimated: part of the plane
    full = phantom_case(5, 64)  # parallel beam covering the CT: the whole plane
    assert all(m.all() for m in field_masks(full.grid(), full.ap_geom, full.lat_geom))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(y.astype(np.int64)), 5).permute(3, 0, 1, 2)[None].float()
    logits = onehot * 16 - 8
    shift = int(round(6.0 / grid.spacing[0]))
    moved = torch.roll(logits, shift, dims=4)
    xt = torch.from_numpy(x)[None]
    masks = (torch.from_numpy(ap_m)[None], torch.from_numpy(lat_m)[None])
    good, bad = (float(ngcc_loss(lg, xt, grid.spacing, masks)) for lg in (logits, moved))
    assert good < bad - 0.1, (good, bad)
