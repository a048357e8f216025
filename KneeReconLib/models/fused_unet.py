"""An inference-only form of the U-Net whose full-resolution level costs less.

In `UNet3D` the finest decoder level upsamples the 16-channel features of the level below
(trilinear x2), concatenates the 8-channel skip and runs a 3x3x3 convolution over the 24 channels
at the full 128^3 grid: the single most expensive layer of the forward pass (with its
upsampling and concatenation, about a third of it). That convolution splits into one over the
skip and one over the upsampled features, and the latter, a linear map composed with a linear
upsampling, is exactly a 3x3x3 convolution at the *coarse* resolution with 8x the output channels
(one set per output phase: even/odd index along z, y, x) followed by a depth-to-space shuffle.
The arithmetic is the same but the coarse convolution has 64 output channels instead of 8 at 8x
the voxels, which oneDNN (and OpenVINO) run about twice as efficiently, and neither the 128^3
upsampled tensor nor the concatenation is ever built.

The only difference from the original function is at the grid's outermost voxel layer: the
original convolution zero-pads the upsampled features, the fused one continues them by
replication. bench/bench_inference.py measures the label maps against the fp32 eager reference.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .network import UNet3D


def _phase_taps() -> torch.Tensor:
    """T[p, k, t]: the value at fine index 2i+p+k-1 (k = 0, 1, 2: the convolution's taps) of a x2
    linear upsampling with align_corners=False, as weights over coarse indices i+t-1 (t = 0, 1, 2).
    Fine index 2j is 0.75 x[j] + 0.25 x[j-1]; fine 2j+1 is 0.75 x[j] + 0.25 x[j+1]."""
    T = torch.zeros(2, 3, 3, dtype=torch.float64)
    # even output phase: taps at fine 2i-1, 2i, 2i+1
    T[0, 0, 0], T[0, 0, 1] = 0.75, 0.25
    T[0, 1, 1], T[0, 1, 0] = 0.75, 0.25
    T[0, 2, 1], T[0, 2, 2] = 0.75, 0.25
    # odd output phase: taps at fine 2i, 2i+1, 2i+2
    T[1, 0, 1], T[1, 0, 0] = 0.75, 0.25
    T[1, 1, 1], T[1, 1, 2] = 0.75, 0.25
    T[1, 2, 2], T[1, 2, 1] = 0.75, 0.25
    return T


def depth_to_space3d(y: torch.Tensor, channels: int) -> torch.Tensor:
    """[n, channels*8, d, h, w] with channel index (c, pz, py, px) -> [n, channels, 2d, 2h, 2w]
    (OpenVINO's DepthToSpace, mode depth_first, block 2)."""
    n, _, d, h, w = y.shape
    y = y.reshape(n, channels, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return y.reshape(n, channels, 2 * d, 2 * h, 2 * w)


class UpsampleConv3d(nn.Module):
    """conv3x3x3(trilinear_upsample_x2(x)) computed at the coarse resolution.

    `weight` [cout, cin, 3, 3, 3] and `bias` are the fine-resolution convolution's; the fused
    weights are the convolution's taps contracted with the upsampling's, one output set per phase."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        T = _phase_taps().to(weight.device)  # on the weights' device (CUDA models too)
        cout, cin = weight.shape[:2]
        fused = torch.einsum("ocklm,pkt,qlu,rmv->opqrctuv", weight.detach().double(), T, T, T)
        self.channels = cout
        self.conv = nn.Conv3d(cin, cout * 8, 3, bias=bias is not None, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            self.conv.weight.copy_(fused.reshape(cout * 8, cin, 3, 3, 3).to(weight.dtype))
            if bias is not None:
                self.conv.bias.copy_(bias.detach().repeat_interleave(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # replication at the edges is what align_corners=False upsampling does there
        return depth_to_space3d(self.conv(F.pad(x, (1,) * 6, mode="replicate")), self.channels)


class FusedUNet3D(nn.Module):
    """A BatchNorm-folded `UNet3D` (see `network.fold_batchnorm`) with its finest decoder level's
    upsampling, concatenation and first convolution fused as described above. Inference only."""

    def __init__(self, folded: UNet3D):
        super().__init__()
        if folded.config.upsample != "trilinear":
            raise ValueError("only a U-Net with trilinear upsampling can be fused")
        self.net = copy.deepcopy(folded).eval()
        last = self.net.up_blocks[-1]
        conv = last[0]
        if not isinstance(conv, nn.Conv3d) or conv.bias is None:
            raise ValueError("fold the BatchNorm layers first (network.fold_batchnorm)")
        hi = conv.in_channels - conv.out_channels  # the concatenation is [upsampled, skip]
        self.up_conv = UpsampleConv3d(conv.weight[:, :hi], conv.bias)
        self.skip_conv = nn.Conv3d(conv.out_channels, conv.out_channels, 3, padding=1, bias=False, dtype=conv.weight.dtype,
                                   device=conv.weight.device)
        with torch.no_grad():
            self.skip_conv.weight.copy_(conv.weight[:, hi:])
        self.rest = nn.Sequential(*list(last)[1:])  # activation, second convolution, activation
        self.divisor = self.net.divisor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x, skips = n.encode(x)
        for up, block in zip(list(n.up)[:-1], list(n.up_blocks)[:-1]):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        x = self.rest(self.up_conv(x) + self.skip_conv(skips.pop()))
        return n.head(x)


def fuse_for_inference(folded: nn.Module) -> nn.Module:
    """`FusedUNet3D` of a folded U-Net with trilinear upsampling; any other network unchanged."""
    if isinstance(folded, UNet3D) and folded.config.upsample == "trilinear" and len(folded.config.widths) > 1:
        return FusedUNet3D(folded)
    return folded
