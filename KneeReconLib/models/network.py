"""The paper's 3D U-Net (Kasten et al. 2020): two 3x3x3 conv+BN+activation per block,
max-pool down, upsampling up, concatenated skips, 1x1x1 conv to the classes."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass
class UNetConfig:
    """Architecture of the 3D U-Net; stored in every checkpoint's card."""

    in_channels: int = 2
    num_classes: int = 5
    widths: tuple[int, ...] = (8, 16, 32, 64, 128)
    activation: str = "relu"  # relu | leaky_relu | prelu
    upsample: str = "trilinear"  # trilinear | transpose

    def to_dict(self) -> dict:
        d = {"kind": "unet", **asdict(self)}  # build_network dispatches on "kind"; older cards lack it
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "widths" in known:
            known["widths"] = tuple(int(w) for w in known["widths"])
        return cls(**known)


def _act(name: str, ch: int) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "leaky_relu":
        return nn.LeakyReLU(0.02, inplace=True)
    if name == "prelu":
        return nn.PReLU(ch)
    raise ValueError(f"unknown activation {name!r}")


class ConvBlock(nn.Sequential):
    """Two (3x3x3 conv, batch norm, activation) layers."""

    def __init__(self, cin: int, cout: int, act: str):
        super().__init__(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), _act(act, cout),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), _act(act, cout),
        )


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An inference copy of `model` with every Conv2d/Conv3d + BatchNorm2d/3d pair that follows
    each other inside an nn.Sequential (UNet3D's ConvBlocks, ChenNet's encoder and decoder blocks)
    merged into one biased convolution (the BatchNorm's running statistics folded into the
    weights): the same function in eval mode, one pass over memory fewer per layer."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = ((nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))
    folded = copy.deepcopy(model).eval()
    for block in folded.modules():
        if isinstance(block, nn.Sequential):
            for i in range(len(block) - 1):
                if any(type(block[i]) is c and type(block[i + 1]) is b for c, b in pairs):
                    block[i] = fuse_conv_bn_eval(block[i], block[i + 1])
                    block[i + 1] = nn.Identity()
    return folded


def to_channels_last(model: nn.Module) -> nn.Module:
    """`model` with its 5-D weights in channels-last 3D and its 4-D ones (ChenNet's 2D encoders)
    in channels-last: `model.to(memory_format=torch.channels_last_3d)` refuses 4-D tensors."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t
    return model._apply(convert)


class UNet3D(nn.Module):
    """3D U-Net over len(widths) resolutions. Input sizes must be divisible by 2**(depth-1)."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config = config or UNetConfig()
        w = config.widths
        self.down = nn.ModuleList()
        cin = config.in_channels
        for ch in w:
            self.down.append(ConvBlock(cin, ch, config.activation))
            cin = ch
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for lo, hi in zip(reversed(w[:-1]), reversed(w[1:])):
            if config.upsample == "transpose":
                self.up.append(nn.ConvTranspose3d(hi, hi, 2, stride=2))
            else:
                self.up.append(nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False))
            self.up_blocks.append(ConvBlock(hi + lo, lo, config.activation))
        self.head = nn.Conv3d(w[0], config.num_classes, 1)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.config.widths) - 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The contracting path: the coarsest features and the skips, finest first."""
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()
        return x, skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, skips = self.encode(x)
        for up, block in zip(self.up, self.up_blocks):
            x = up(x)
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
