"""Training losses: surface-weighted cross-entropy and normalized gradient cross-correlation
(NGCC) between the input X-rays and projections of the predicted bone probabilities.

Weights (`surface_weights`): w = 1 + w0 * exp(-d^2 / (2 sigma^2)), d the distance in mm from
a voxel to the nearest bone surface (any boundary between two different labels). Defaults
w0 = 5, sigma = 2 mm: voxels on a surface count 6x, voxels 5 mm away barely more than 1x, so
the loss attends to the shape rather than the easy interior (Kasten et al.'s motivation).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import distance_transform_edt

from ..data.drr import project_parallel


def surface_weights(labels: np.ndarray, spacing_zyx, w0: float = 5.0, sigma_mm: float = 2.0) -> np.ndarray:
    """Per-voxel weights rising near every bone surface (float32, same shape as labels)."""
    lab = np.asarray(labels)
    boundary = np.zeros(lab.shape, bool)
    for ax in range(lab.ndim):
        a = np.swapaxes(lab, 0, ax)
        b = np.swapaxes(boundary, 0, ax)
        diff = a[1:] != a[:-1]
        b[1:] |= diff
        b[:-1] |= diff
    if not boundary.any():
        return np.ones(lab.shape, np.float32)
    d = distance_transform_edt(~boundary, sampling=spacing_zyx)
    return (1.0 + w0 * np.exp(-(d * d) / (2.0 * sigma_mm**2))).astype(np.float32)


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.float(), target.long(), reduction="none")
    return (ce * weights).sum() / weights.sum().clamp_min(1e-6)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice of the bone classes present in the batch's target, pooled over the batch.
    Small bones (patella, fibula) weigh as much as the femur here, unlike in the voxel-wise
    cross-entropy. Classes absent from a crop are left out: their Dice would only teach the
    network never to predict them."""
    prob = torch.softmax(logits.float(), dim=1)[:, 1:]
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].float()
    dims = (0, 2, 3, 4)
    inter = (prob * onehot).sum(dims)
    truth = onehot.sum(dims)
    dice = (2 * inter + eps) / (prob.sum(dims) + truth + eps)
    present = truth > 0
    if not present.any():
        return logits.sum() * 0.0
    return 1.0 - dice[present].mean()


def _grad2d(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return img[..., 1:, :-1] - img[..., :-1, :-1], img[..., :-1, 1:] - img[..., :-1, :-1]


def _ncc(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Normalised cross-correlation per batch item; `w` (same shape, 0/1): only those pixels count."""
    a, b = a.flatten(1), b.flatten(1)
    if w is None:
        w = torch.ones_like(a)
    else:
        w = w.flatten(1).to(a.dtype)
    n = w.sum(1, keepdim=True).clamp_min(1.0)
    a = (a - (a * w).sum(1, keepdim=True) / n) * w
    b = (b - (b * w).sum(1, keepdim=True) / n) * w
    # sqrt(. + eps), not .norm(): the norm's gradient at a zero vector is NaN (a flat projection)
    return (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1) + eps)


def ngcc(image: torch.Tensor, projection: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized gradient cross-correlation of two image batches [B, H, W], in [-1, 1] per item;
    `mask` [B, H, W]: compare only there (a gradient counts where all three of its pixels are in)."""
    gi, gp = _grad2d(image), _grad2d(projection)
    if mask is None:
        return 0.5 * (_ncc(gi[0], gp[0]) + _ncc(gi[1], gp[1]))
    m = mask.to(image.dtype)
    gm = m[..., 1:, :-1] * m[..., :-1, :-1] * m[..., :-1, 1:]
    return 0.5 * (_ncc(gi[0], gp[0], gm) + _ncc(gi[1], gp[1], gm))


def ngcc_loss(logits: torch.Tensor, inputs: torch.Tensor, spacing_xyz, masks: tuple | None = None) -> torch.Tensor:
    """1 - mean NGCC between each input X-ray, read back from its channel at the grid's central
    plane (the isocentre's depth), and the parallel projection of the predicted bone probability.
    Exact for a parallel beam, where the channel is the image replicated along the ray; for a cone
    beam the central plane holds the image at the isocentre's scale, so bones off that plane are
    compared about 2-5 % too large or small (1-2 voxels at the edge of a knee), a small blur of
    the loss, not a bias. `masks` (ap [B, z, x], lateral [B, z, y], True where the view's
    detector sees that point of the central plane, e.g. a collimated field): compare only there.
    Needs volumes that span the full x and y extent (projection along the full ray)."""
    prob = torch.softmax(logits.float(), dim=1)
    bone = 1.0 - prob[:, 0]  # [B, z, y, x]
    ap_pred, lat_pred = project_parallel(bone, spacing_xyz)  # image orientation (rows inferior)
    ny, nx = inputs.shape[-2], inputs.shape[-1]
    # the central plane: the mean of the two middle planes of an even grid
    ap_in = inputs[:, 0, :, (ny - 1) // 2:ny // 2 + 1, :].float().mean(-2).flip(-2)  # AP image, along y
    lat_in = inputs[:, 1, :, :, (nx - 1) // 2:nx // 2 + 1].float().mean(-1).flip(-2)  # lateral image, along x
    if masks is None:
        return 1.0 - 0.5 * (ngcc(ap_in, ap_pred) + ngcc(lat_in, lat_pred)).mean()
    ap_m, lat_m = (m.flip(-2) for m in masks)
    return 1.0 - 0.5 * (ngcc(ap_in, ap_pred, ap_m) + ngcc(lat_in, lat_pred, lat_m)).mean()
