"""Comparison network after Chen et al. 2020: one 2D convolutional encoder per X-ray view feeding
a 3D decoder.

Chen et al. 2020 reconstruct bone from bi-planar radiographs with a network that encodes each
radiograph by its own 2D CNN, lifts the 2D feature maps into the volume by extending them along
that view's projection direction, fuses the two views there, and decodes the fused 3D features
into a voxel segmentation with a 3D CNN, with the lifted features of finer scales as skip
connections. Kasten et al. 2020 (the network in network.py) instead replicate the images into a
2-channel volume first and run a full 3D U-Net on it.

What this module reproduces is that design, not the layer-exact network of the paper (widths,
depth and blocks here are KneeRecon's, sized like the U-Net): it takes the same 2-channel
back-projected volume as UNet3D, so the data pipeline, training loop, model files and inference
path are shared, and reads only one slice of each channel, i.e. the two images themselves.
For parallel beam that slice is exactly the resampled image; for cone beam it is the image
resampled at the isocentre plane (the divergence of the rays is then not modelled by the network).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .network import _act


@dataclass
class ChenNetConfig:
    """Architecture of ChenNet; stored in every checkpoint's card like UNetConfig."""

    kind: str = "chen"
    in_channels: int = 2  # the AP and lateral channels of the back-projected volume; nothing else is supported
    num_classes: int = 5
    widths: tuple[int, ...] = (16, 32, 64, 128)  # 2D encoders, one feature map per scale
    decoder_widths: tuple[int, ...] | None = None  # 3D decoder per scale; None = widths // 2
    activation: str = "relu"  # relu | leaky_relu | prelu

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if self.decoder_widths is None:
            self.decoder_widths = tuple(max(2, w // 2) for w in self.widths)
        self.decoder_widths = tuple(int(w) for w in self.decoder_widths)
        if self.kind != "chen":
            raise ValueError(f"ChenNetConfig needs kind 'chen', got {self.kind!r}")
        if self.in_channels != 2:
            raise ValueError(f"ChenNet reads exactly two channels (AP, lateral), got in_channels={self.in_channels}")
        if len(self.decoder_widths) != len(self.widths) or len(self.widths) < 2:
            raise ValueError(f"ChenNet needs >= 2 scales and one decoder width per encoder width, got "
                             f"widths={self.widths}, decoder_widths={self.decoder_widths}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["decoder_widths"] = list(self.decoder_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ChenNetConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def _conv_bn_act(conv: nn.Module, ch: int, act: str, dims: int) -> list[nn.Module]:
    bn = nn.BatchNorm2d(ch) if dims == 2 else nn.BatchNorm3d(ch)
    return [conv, bn, _act(act, ch)]


def _encoder_level(cin: int, cout: int, act: str, downsample: bool) -> nn.Sequential:
    """(3x3 conv, stride 2 unless the first level) + 3x3 conv, each with BN and activation."""
    return nn.Sequential(
        *_conv_bn_act(nn.Conv2d(cin, cout, 3, stride=2 if downsample else 1, padding=1, bias=False), cout, act, 2),
        *_conv_bn_act(nn.Conv2d(cout, cout, 3, padding=1, bias=False), cout, act, 2),
    )


class Encoder2D(nn.Module):
    """2D CNN over one view: a feature map per scale (full, 1/2, 1/4, ...) of its image."""

    def __init__(self, widths: tuple[int, ...], act: str):
        super().__init__()
        self.levels = nn.ModuleList(_encoder_level(cin, cout, act, i > 0)
                                    for i, (cin, cout) in enumerate(zip((1,) + widths[:-1], widths)))

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        x = image
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class ChenNet(nn.Module):
    """Two 2D encoders (AP: the (z, x) plane, lateral: the (z, y) plane) and a 3D decoder.

    Input: the back-projected volume [B, 2, Z, Y, X] (channel 0 = AP replicated along y, channel
    1 = lateral replicated along x), any Z, Y, X divisible by `divisor`. Output: logits
    [B, num_classes, Z, Y, X]. At each scale both views' features are projected (1x1, per pixel)
    to the decoder width and lifted into the volume along their beams; the decoder starts from
    the coarsest lifted level and upsamples (2x2x2 transposed conv) with the finer lifted levels
    as concatenated skips.
    """

    def __init__(self, config: ChenNetConfig | None = None):
        super().__init__()
        self.config = config = config or ChenNetConfig()
        w, d, act = config.widths, config.decoder_widths, config.activation
        self.encoder_ap = Encoder2D(w, act)
        self.encoder_lat = Encoder2D(w, act)
        # per-pixel projections to the decoder width: done in 2D, before lifting, so they cost
        # nothing per voxel and the 3D convolutions read d[i] skip channels instead of w[i]
        self.proj_ap = nn.ModuleList(nn.Conv2d(wi, di, 1) for wi, di in zip(w, d))
        self.proj_lat = nn.ModuleList(nn.Conv2d(wi, di, 1) for wi, di in zip(w, d))
        self.bottom = nn.Sequential(
            *_conv_bn_act(nn.Conv3d(d[-1], d[-1], 3, padding=1, bias=False), d[-1], act, 3),
            *_conv_bn_act(nn.Conv3d(d[-1], d[-1], 3, padding=1, bias=False), d[-1], act, 3),
        )
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for i in reversed(range(len(d) - 1)):
            self.up.append(nn.ConvTranspose3d(d[i + 1], d[i], 2, stride=2))
            layers = _conv_bn_act(nn.Conv3d(2 * d[i], d[i], 3, padding=1, bias=False), d[i], act, 3)
            if i > 0:  # one conv at full resolution: that level dominates the cost; the 2D skips carry fine edges
                layers += _conv_bn_act(nn.Conv3d(d[i], d[i], 3, padding=1, bias=False), d[i], act, 3)
            self.dec.append(nn.Sequential(*layers))
        self.head = nn.Conv3d(d[0], config.num_classes, 1)

    @property
    def divisor(self) -> int:
        return 2 ** (len(self.config.widths) - 1)

    @staticmethod
    def views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two images in the volume: AP [B, 1, Z, X] (the y-centre slice of channel 0) and
        lateral [B, 1, Z, Y] (the x-centre slice of channel 1)."""
        _, _, _, ny, nx = x.shape
        return x[:, 0:1, :, ny // 2, :], x[:, 1:2, :, :, nx // 2]

    @staticmethod
    def lift(ap: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
        """[B, C, z, x] along y plus [B, C, z, y] along x -> [B, C, z, y, x].

        Summed rather than concatenated: a 3D conv over a concatenation is itself a sum of one
        linear map per view (conv(cat(a, b)) = conv_a(a) + conv_b(b)), which each view's own
        encoder and 1x1 projection can learn, so the sum loses little while every 3D conv reads
        half the channels; broadcasting also builds the sum without expanding either view first."""
        return ap.unsqueeze(3) + lat.unsqueeze(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ap, lat = self.views(x)
        fused = [self.lift(pa(fa), pl(fl)) for fa, fl, pa, pl in
                 zip(self.encoder_ap(ap), self.encoder_lat(lat), self.proj_ap, self.proj_lat)]
        if x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
            # keep the caller's channels-last layout (oneDNN's fastest for the 3D convs)
            fused = [f.contiguous(memory_format=torch.channels_last_3d) for f in fused]
        y = self.bottom(fused.pop())
        for up, dec in zip(self.up, self.dec):
            y = dec(torch.cat([up(y), fused.pop()], dim=1))
        return self.head(y)
