"""Style transfer from real radiographs to DRRs (Kasten et al. 2020's CycleGAN step): two 2D
ResNet generators (real -> DRR, DRR -> real) and two PatchGAN discriminators trained on
unpaired images with least-squares adversarial, cycle-consistency and identity losses.
`reconstruct --style MODEL` runs the real -> DRR generator on both views first, so the
reconstruction network sees the kind of image it was trained on.

Images are handled at a fixed pixel size (`StyleConfig.pixel_mm`, default 1 mm: noise, blur and
edge enhancement are scale-dependent) and at [-1, 1] after percentile normalisation; the
translated image is resampled back onto the input's own pixel grid.
"""
from __future__ import annotations

import csv
import glob
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import zoom
from torch import nn

from ..core.errors import KneeReconError
from ..io.preprocessing import collimated_border, fill_collimation, normalize_intensity
from .checkpoint import read_model_file, save_model

KIND = "style-cyclegan"


@dataclass
class StyleConfig:
    real: list[str] = field(default_factory=list)  # folders of real (or simulated real-like) X-ray files
    drr: list[str] = field(default_factory=list)  # folders of DRR files (or cached .npz cases)
    out: str = "runs/style"
    steps: int = 2000
    crop: int = 128  # square training crops, pixels at pixel_mm
    pixel_mm: float = 1.0
    base: int = 16  # generator / discriminator width
    res_blocks: int = 4
    lr: float = 2e-4
    cycle_weight: float = 10.0
    identity_weight: float = 5.0
    seed: int = 0
    ckpt_every: int = 200
    log_every: int = 20
    device: str = "cpu"
    threads: int = 0


# ----------------------------------------------------------------------------- networks
class _Res(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch), nn.ReLU(True),
                                  nn.ReflectionPad2d(1), nn.Conv2d(ch, ch, 3), nn.InstanceNorm2d(ch))

    def forward(self, x):
        return x + self.body(x)


class Generator(nn.Module):
    """ResNet generator (Johnson et al.; CycleGAN's): c7-d-d-R x n-u-u-c7, tanh output."""

    def __init__(self, base: int = 16, res_blocks: int = 4):
        super().__init__()
        b = base
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(1, b, 7), nn.InstanceNorm2d(b), nn.ReLU(True),
                  nn.Conv2d(b, 2 * b, 3, 2, 1), nn.InstanceNorm2d(2 * b), nn.ReLU(True),
                  nn.Conv2d(2 * b, 4 * b, 3, 2, 1), nn.InstanceNorm2d(4 * b), nn.ReLU(True)]
        layers += [_Res(4 * b) for _ in range(res_blocks)]
        layers += [nn.ConvTranspose2d(4 * b, 2 * b, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(2 * b), nn.ReLU(True),
                   nn.ConvTranspose2d(2 * b, b, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(b), nn.ReLU(True),
                   nn.ReflectionPad2d(3), nn.Conv2d(b, 1, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Discriminator(nn.Module):
    """PatchGAN: a map of real/fake scores over overlapping patches."""

    def __init__(self, base: int = 16):
        super().__init__()
        b = base
        self.net = nn.Sequential(
            nn.Conv2d(1, b, 4, 2, 1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(b, 2 * b, 4, 2, 1), nn.InstanceNorm2d(2 * b), nn.LeakyReLU(0.2, True),
            nn.Conv2d(2 * b, 4 * b, 4, 2, 1), nn.InstanceNorm2d(4 * b), nn.LeakyReLU(0.2, True),
            nn.Conv2d(4 * b, 8 * b, 4, 1, 1), nn.InstanceNorm2d(8 * b), nn.LeakyReLU(0.2, True),
            nn.Conv2d(8 * b, 1, 4, 1, 1))

    def forward(self, x):
        return self.net(x)


class CycleGAN(nn.Module):
    def __init__(self, base: int = 16, res_blocks: int = 4):
        super().__init__()
        self.g_real2drr, self.g_drr2real = Generator(base, res_blocks), Generator(base, res_blocks)
        self.d_drr, self.d_real = Discriminator(base), Discriminator(base)


# ----------------------------------------------------------------------------- images
def prepare(pixels: np.ndarray, spacing_cr: tuple[float, float], pixel_mm: float) -> np.ndarray:
    """Collimation filled, percentile-normalised to [-1, 1], resampled to `pixel_mm` pixels."""
    a = np.asarray(pixels, np.float32)
    border = collimated_border(a)
    if any(border):
        a = fill_collimation(a, border)
    a = np.clip(normalize_intensity(a), 0.0, 1.0) * 2.0 - 1.0
    return zoom(a, (spacing_cr[1] / pixel_mm, spacing_cr[0] / pixel_mm), order=1).astype(np.float32)


def _image_files(folders: list[str]) -> list[str]:
    exts = (".nrrd", ".dcm", ".mha", ".nii", ".nii.gz", ".png", ".tif", ".tiff", ".npz")
    files = sorted(p for f in folders for p in glob.glob(os.path.join(f, "**", "*"), recursive=True)
                   if p.lower().endswith(exts) and "mask" not in os.path.basename(p) and "truth" not in os.path.basename(p))
    if not files:
        raise KneeReconError(f"no X-ray files found in {folders}")
    return files


def load_images(folders: list[str], pixel_mm: float) -> list[np.ndarray]:
    """Every view in the folders, prepared: X-ray files (AP/lateral told apart by name only for
    the reader) and cached training cases (.npz: both DRR views, displayed bone-bright)."""
    from ..data.dataset import load_case
    from ..io.xray_io import read_xray

    out = []
    for p in _image_files(folders):
        if p.endswith(".npz"):
            c = load_case(p)
            out += [prepare(c.ap, c.ap_geom.iso_spacing, pixel_mm), prepare(c.lateral, c.lat_geom.iso_spacing, pixel_mm)]
        else:
            view = "lateral" if "lat" in os.path.basename(p).lower() else "ap"
            x = read_xray(p, view)
            out.append(prepare(x.pixels, x.geometry.iso_spacing, pixel_mm))
    return out


def _crop(img: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape
    if h < n or w < n:
        img = np.pad(img, ((0, max(0, n - h)), (0, max(0, n - w))), mode="reflect")
        h, w = img.shape
    r, c = int(rng.integers(0, h - n + 1)), int(rng.integers(0, w - n + 1))
    out = img[r:r + n, c:c + n]
    return out[:, ::-1] if rng.random() < 0.5 else out


# ----------------------------------------------------------------------------- training
def train_style(cfg: StyleConfig, resume: bool = False, log=print) -> str:
    """Train the CycleGAN; checkpoints every `ckpt_every` steps (resumable), then `<out>/style.pt`
    (both generators' real -> DRR direction is what inference uses; the rest is kept for resuming)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    real, drr = load_images(cfg.real, cfg.pixel_mm), load_images(cfg.drr, cfg.pixel_mm)
    log(f"{len(real)} real and {len(drr)} DRR images at {cfg.pixel_mm} mm/pixel")
    model = CycleGAN(cfg.base, cfg.res_blocks).to(cfg.device)
    g_params = list(model.g_real2drr.parameters()) + list(model.g_drr2real.parameters())
    d_params = list(model.d_drr.parameters()) + list(model.d_real.parameters())
    opt_g = torch.optim.Adam(g_params, lr=cfg.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d_params, lr=cfg.lr, betas=(0.5, 0.999))
    ckpt = os.path.join(cfg.out, "checkpoint.pt")
    step = 0
    if resume and os.path.exists(ckpt):
        blob = read_model_file(ckpt)
        model.load_state_dict(blob["state_dict"])
        opt_g.load_state_dict(blob["opt_g"])
        opt_d.load_state_dict(blob["opt_d"])
        step = int(blob["step"])
        log(f"resumed at step {step}")
    log_path = os.path.join(cfg.out, "log.csv")
    fields = ["step", "g_adv", "cycle", "identity", "d", "s_per_step"]
    if step == 0:
        with open(log_path, "w", newline="") as f:
            csv.DictWriter(f, fields).writeheader()
    mse = nn.MSELoss()
    acc = dict.fromkeys(fields[1:-1], 0.0)
    t0 = time.time()
    while step < cfg.steps:
        rng = np.random.default_rng([cfg.seed, step])  # sample = f(seed, step): resume sees the same data
        a = torch.from_numpy(np.ascontiguousarray(_crop(real[int(rng.integers(len(real)))], cfg.crop, rng)))[None, None]
        b = torch.from_numpy(np.ascontiguousarray(_crop(drr[int(rng.integers(len(drr)))], cfg.crop, rng)))[None, None]
        a, b = a.to(cfg.device), b.to(cfg.device)
        # generators
        fake_b, fake_a = model.g_real2drr(a), model.g_drr2real(b)
        pb, pa = model.d_drr(fake_b), model.d_real(fake_a)
        g_adv = mse(pb, torch.ones_like(pb)) + mse(pa, torch.ones_like(pa))
        cycle = F.l1_loss(model.g_drr2real(fake_b), a) + F.l1_loss(model.g_real2drr(fake_a), b)
        ident = F.l1_loss(model.g_real2drr(b), b) + F.l1_loss(model.g_drr2real(a), a)
        loss_g = g_adv + cfg.cycle_weight * cycle + cfg.identity_weight * ident
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        # discriminators
        d = 0.0
        for disc, real_x, fake_x in ((model.d_drr, b, fake_b), (model.d_real, a, fake_a)):
            pr, pf = disc(real_x), disc(fake_x.detach())
            d = d + 0.5 * (mse(pr, torch.ones_like(pr)) + mse(pf, torch.zeros_like(pf)))
        opt_d.zero_grad(set_to_none=True)
        d.backward()
        opt_d.step()
        step += 1
        for k, v in (("g_adv", g_adv), ("cycle", cycle), ("identity", ident), ("d", d)):
            acc[k] += float(v.detach())
        if step % cfg.log_every == 0 or step == cfg.steps:
            n = cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every
            row = {"step": step, **{k: f"{v / n:.4f}" for k, v in acc.items()}, "s_per_step": f"{(time.time() - t0) / n:.3f}"}
            with open(log_path, "a", newline="") as f:
                csv.DictWriter(f, fields).writerow(row)
            log(f"style step {step}/{cfg.steps}  adv {row['g_adv']}  cycle {row['cycle']}  D {row['d']}")
            acc = dict.fromkeys(acc, 0.0)
            t0 = time.time()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_model(ckpt, model, _card(cfg, step), half=False,
                       extra={"opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "step": step})
    final = os.path.join(cfg.out, "style.pt")
    save_model(final, model.g_real2drr, _card(cfg, step), half=True)
    return final


def _card(cfg: StyleConfig, step: int) -> dict:
    return {"kind": KIND, "name": "KneeRecon style transfer (real radiograph -> DRR)", "direction": "real->drr",
            "base": cfg.base, "res_blocks": cfg.res_blocks, "pixel_mm": cfg.pixel_mm,
            "training": {"steps": step, "config": asdict(cfg)}}


# ----------------------------------------------------------------------------- inference
class StyleTransfer:
    """The real -> DRR generator of a style model file."""

    def __init__(self, path: str, device: str = "cpu"):
        blob = read_model_file(path)
        card = blob["card"]
        if card.get("kind") != KIND:
            raise KneeReconError(f"{path!r} is not a style model (kind {card.get('kind')!r}); "
                                 "train one with `kneerecon train-style`")
        self.card, self.device, self.pixel_mm = card, device, float(card["pixel_mm"])
        self.net = Generator(int(card["base"]), int(card["res_blocks"]))
        sd = blob["state_dict"]
        if any(k.startswith("g_real2drr.") for k in sd):  # a training checkpoint: take the generator
            sd = {k[len("g_real2drr."):]: v for k, v in sd.items() if k.startswith("g_real2drr.")}
        try:
            self.net.load_state_dict({k: v.float() for k, v in sd.items()})
        except RuntimeError as e:
            raise KneeReconError(f"{path!r}: weights do not match its card ({str(e)[:160]})")
        self.net.to(device).eval()

    def __call__(self, pixels: np.ndarray, spacing_cr: tuple[float, float]) -> np.ndarray:
        """The image translated to DRR style, on its own pixel grid, in [0, 1] (bone bright)."""
        x = prepare(pixels, spacing_cr, self.pixel_mm)
        h, w = x.shape
        ph, pw = (-h) % 4, (-w) % 4  # two stride-2 stages
        t = torch.from_numpy(np.pad(x, ((0, ph), (0, pw)), mode="reflect"))[None, None].to(self.device)
        with torch.inference_mode():
            y = self.net(t)[0, 0, :h, :w].cpu().numpy()
        from skimage.transform import resize

        return resize((y + 1.0) / 2.0, pixels.shape, order=1, anti_aliasing=False).astype(np.float32)
