"""Function-preserving widening of a trained 3D U-Net (in the spirit of Net2WiderNet).

A wider U-Net is built with fresh random weights, then every old weight is copied into its
place and every weight from a *new* channel into an *old* one is set to zero. The old channels
therefore compute exactly what they did, the head ignores the new ones, and the widened network
starts as the trained one; training then grows the new channels' outgoing weights from zero.
"""
from __future__ import annotations

import torch
from torch import nn

from .network import UNet3D, UNetConfig


def _copy_conv(new: nn.Conv3d, old: nn.Conv3d, in_map: list[int]) -> None:
    """Copy `old` into `new`; old input channel k lands on new input channel in_map[k]."""
    w = new.weight.data
    out_old = old.weight.shape[0]
    w[:out_old].zero_()  # old outputs see no new inputs
    w[:out_old, in_map] = old.weight.data
    if old.bias is not None:
        new.bias.data[:out_old] = old.bias.data


def _copy_bn(new: nn.BatchNorm3d, old: nn.BatchNorm3d) -> None:
    n = old.num_features
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).data[:n] = getattr(old, name).data
    new.num_batches_tracked.data.copy_(old.num_batches_tracked.data)


def _copy_block(new: nn.Sequential, old: nn.Sequential, in_map: list[int]) -> None:
    """A ConvBlock: conv, BN, act, conv, BN, act."""
    _copy_conv(new[0], old[0], in_map)
    _copy_bn(new[1], old[1])
    _copy_conv(new[3], old[3], list(range(old[3].weight.shape[1])))
    _copy_bn(new[4], old[4])
    for i in (2, 5):  # PReLU carries per-channel slopes
        if isinstance(old[i], nn.PReLU):
            new[i].weight.data[: old[i].weight.numel()] = old[i].weight.data


def widen_unet(old: UNet3D, widths: tuple[int, ...], seed: int = 0) -> UNet3D:
    """A UNet3D with `widths` (each at least the old width, same depth) that computes exactly
    what `old` computes; its extra channels start random with zero influence on the output."""
    oc = old.config
    if len(widths) != len(oc.widths) or any(n < o for n, o in zip(widths, oc.widths)):
        raise ValueError(f"widths {tuple(widths)} must keep the depth of {oc.widths} and widen every scale "
                         "or keep it")
    if oc.upsample == "transpose":
        raise ValueError("widening transpose-convolution upsampling is not supported")
    with torch.random.fork_rng(devices=[]):  # the new channels' random start, without touching the caller's RNG
        torch.manual_seed(seed)
        new = UNet3D(UNetConfig(in_channels=oc.in_channels, num_classes=oc.num_classes, widths=tuple(widths),
                                activation=oc.activation, upsample=oc.upsample))
    old_w, new_w = oc.widths, tuple(widths)
    with torch.no_grad():
        cin_map = list(range(oc.in_channels))
        for i, (nb, ob) in enumerate(zip(new.down, old.down)):
            _copy_block(nb, ob, cin_map)
            cin_map = list(range(old_w[i]))
        # up_blocks[j] joins scale hi (upsampled, first in the concatenation) with skip scale lo
        depth = len(old_w)
        for j, (nb, ob) in enumerate(zip(new.up_blocks, old.up_blocks)):
            lo, hi = depth - 2 - j, depth - 1 - j
            in_map = list(range(old_w[hi])) + [new_w[hi] + k for k in range(old_w[lo])]
            _copy_block(nb, ob, in_map)
        _copy_conv(new.head, old.head, list(range(old_w[0])))
    return new
