"""The inference-only fused U-Net computes the same function as the network it came from."""
import pytest
import torch
import torch.nn.functional as F

from KneeReconLib.models.chen_net import ChenNet, ChenNetConfig
from KneeReconLib.models.fused_unet import FusedUNet3D, UpsampleConv3d, fuse_for_inference
from KneeReconLib.models.network import UNet3D, UNetConfig, fold_batchnorm


def test_upsample_conv_equals_conv_of_upsampling():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(3, 5, 3, 3, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    x = torch.randn(1, 5, 6, 7, 8, generator=g, dtype=torch.float64)
    ref = F.conv3d(F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False), w, b, padding=1)
    out = UpsampleConv3d(w, b)(x)
    assert out.shape == ref.shape == (1, 3, 12, 14, 16)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    assert torch.allclose(out[inner], ref[inner], atol=1e-12)
    # the outermost layer differs by design (replicated, not zero-padded, upsampled features)
    assert not torch.allclose(out, ref, atol=1e-6)


def _random_unet(widths=(4, 8, 16)) -> UNet3D:
    torch.manual_seed(0)
    net = UNet3D(UNetConfig(widths=widths)).double().eval()
    for m in net.modules():  # non-trivial BatchNorm statistics, so that folding is exercised too
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net


def test_fused_unet_matches_the_original_away_from_the_border():
    net = _random_unet()
    fused = fuse_for_inference(fold_batchnorm(net))
    assert isinstance(fused, FusedUNet3D)
    x = torch.randn(1, 2, 16, 24, 32, dtype=torch.float64)
    with torch.no_grad():
        ref, out = net(x), fused(x)
    # two full-resolution 3x3x3 convolutions follow the fused one: the border effect reaches 2 voxels in
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    assert torch.allclose(out[inner], ref[inner], atol=1e-9)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # and stays small at the border


def test_only_trilinear_unets_are_fused():
    assert not isinstance(fuse_for_inference(fold_batchnorm(UNet3D(UNetConfig(widths=(4, 8), upsample="transpose")))),
                          FusedUNet3D)
    chen = ChenNet(ChenNetConfig(widths=(4, 8), decoder_widths=(4, 8))).eval()
    assert fuse_for_inference(chen) is chen
    with pytest.raises(ValueError, match="fold the BatchNorm"):
        FusedUNet3D(UNet3D(UNetConfig(widths=(4, 8))))
