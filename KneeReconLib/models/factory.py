"""The network a model card's architecture describes (UNet3D or ChenNet). Apart from
network.py, so that network.py and chen_net.py do not import each other."""
from __future__ import annotations

from torch import nn

from ..core.errors import KneeReconError
from .chen_net import ChenNet, ChenNetConfig
from .network import UNet3D, UNetConfig


def build_network(architecture: dict) -> nn.Module:
    """The network an architecture dict (a model card's "architecture") describes: UNet3D for
    kind "unet" or no kind (cards written before ChenNet existed), ChenNet for kind "chen"."""
    kind = architecture.get("kind", "unet")
    if kind == "unet":
        return UNet3D(UNetConfig.from_dict(architecture))
    if kind == "chen":
        return ChenNet(ChenNetConfig.from_dict(architecture))
    raise KneeReconError(f"unknown network kind {kind!r} in the architecture (known: unet, chen)")
