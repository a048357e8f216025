"""Training the reconstruction network (`kneerecon train`).

Data: cached cases (`.npz` from `dataset.build_phantom_cache`; folders are re-scanned so a
cache can grow while training runs), phantoms generated on the fly, or a user's labelled-CT
folder. Every sample is a pure function of (seed, global sample index): a resumed run sees
exactly the samples the uninterrupted run would have seen, whatever the number of workers.
Runs on CPU (bf16 autocast, channels-last 3D) or CUDA (bf16/fp16 autocast); several
processes or GPUs under `torchrun` (DDP, gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import copy
import csv
import glob
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.errors import KneeReconError
from ..core.geometry import ReconGrid, ViewGeometry
from ..core.labels import BONE_NAMES, label_table
from ..data.dataset import AugmentConfig, Case, load_case, make_sample, phantom_case
from ..evaluation.metrics import dice_per_class
from ..models.checkpoint import read_model_file, save_model
from ..models.factory import build_network
from ..models.cpu_features import cpu_has_fast_bf16
from ..models.network import UNetConfig, to_channels_last
from ..models.widen import widen_unet
from .losses import ngcc_loss, soft_dice_loss, surface_weights, weighted_cross_entropy


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=list)  # folders of cached .npz cases
    phantoms_on_the_fly: bool = False  # generate phantoms per sample instead (slow on CPU)
    val_data: list[str] = field(default_factory=list)
    out: str = "runs/train"
    steps: int = 1000
    batch_size: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    crop: tuple[int, int, int] | None = (64, 64, 64)  # (z, y, x); None = full grid
    foreground_crop_p: float = 0.67  # crops centred on a bone voxel
    slab_p: float = 0.0  # fraction of steps trained on full-x/y slabs (whole rays: NGCC applies) instead of `crop`
    slab_depth: int = 32  # z extent of those slabs
    ema_decay: float = 0.0  # exponential moving average of the weights (0 = off); validation and model.pt use it
    wce_w0: float = 5.0
    wce_sigma_mm: float = 2.0
    ngcc_lambda: float = 0.0  # applied when the crop spans the full x and y extent
    dice_weight: float = 1.0  # soft Dice over the four bones, added to the WCE (class balance)
    architecture: dict = field(default_factory=lambda: UNetConfig().to_dict())
    grid_size: int = 128
    device: str = "cpu"
    amp: bool = True  # bf16 autocast on CPU; bf16 (or fp16 where unsupported) on CUDA
    init_from: str | None = None  # start from this model file's weights (fine-tuning), unless resuming
    bn_recalibration: int = 16  # full-grid samples to re-estimate BatchNorm statistics at the end (0 = off)
    channels_last: bool = True
    workers: int = 1
    seed: int = 0
    val_every: int = 250
    ckpt_every: int = 100
    log_every: int = 10
    augment: dict = field(default_factory=lambda: asdict(AugmentConfig()))
    threads: int = 0  # torch intra-op threads; 0 = torch default

    def to_dict(self) -> dict:
        d = asdict(self)
        d["crop"] = list(self.crop) if self.crop else None
        return d


# ----------------------------------------------------------------------------- data
class CaseSource:
    """Case files from folders; `refresh()` picks up files a running cache build added."""

    def __init__(self, folders: list[str]):
        self.folders = folders
        self.paths: list[str] = []
        self.refresh()

    def refresh(self) -> None:
        paths = sorted(p for f in self.folders for p in glob.glob(os.path.join(f, "*.npz")))
        if paths:
            self.paths = paths
        elif not self.paths:
            raise KneeReconError(f"no cached cases (*.npz) in {self.folders}")


class TrainSamples(Dataset):
    """Sample i = f(seed, i): case choice, augmentation and crop all from one seeded RNG."""

    def __init__(self, cfg: TrainConfig, paths: list[str] | None):
        self.cfg = cfg
        self.paths = paths
        self.aug = AugmentConfig(**cfg.augment)

    def __len__(self):
        return 2**62

    def _case(self, rng) -> Case:
        if self.paths is None:
            return phantom_case(int(rng.integers(0, 900_000)), self.cfg.grid_size)
        return load_case(self.paths[int(rng.integers(len(self.paths)))])

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.cfg.seed, int(i)])
        case = self._case(rng)
        x, y = make_sample(case, rng, self.aug)
        grid = case.grid()
        spacing_zyx = grid.spacing[::-1]
        ap_m, lat_m = field_masks(grid, case.ap_geom, case.lat_geom)  # no draw from rng: samples stay as they were
        crop = _crop_shape(self.cfg, int(i))
        if crop:
            x, y, (sz, sy, sx) = _crop(x, y, crop, rng, self.cfg.foreground_crop_p)
            ap_m, lat_m = ap_m[sz, sx], lat_m[sz, sy]
        w = surface_weights(y, spacing_zyx, self.cfg.wce_w0, self.cfg.wce_sigma_mm)
        return (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)),
                torch.from_numpy(w), torch.tensor(grid.spacing, dtype=torch.float32),
                torch.from_numpy(np.ascontiguousarray(ap_m)), torch.from_numpy(np.ascontiguousarray(lat_m)))


def field_masks(grid: ReconGrid, ap: ViewGeometry, lateral: ViewGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Where each view's detector sees the grid's central plane: AP [z, x] (plane y = centre),
    lateral [z, y] (plane x = centre), bool. A collimated image covers only part of the grid; the
    NGCC loss compares the image and the projection only inside it (outside, the input channel
    holds the image's edge value, which says nothing about the bones there)."""
    xs, ys, zs = (grid.axis(a) for a in range(3))
    cy, cx = float(np.mean(ys)), float(np.mean(xs))
    out = []
    for view, u in ((ap, xs), (lateral, ys)):
        uu, zz = np.meshgrid(u, zs)  # [z, u]
        pts = (uu, np.full_like(uu, cy), zz) if view.view == "ap" else (np.full_like(uu, cx), uu, zz)
        col, row = view.project(*pts)
        out.append((col >= 0) & (col <= view.width - 1) & (row >= 0) & (row <= view.height - 1))
    return out[0], out[1]


def _crop_shape(cfg: TrainConfig, index: int) -> tuple[int, int, int] | None:
    """The crop for global sample `index`: a slab with probability slab_p, decided per step (one
    seeded draw shared by every item and rank of the step, so a batch has one shape)."""
    if cfg.slab_p > 0:
        step = index // (cfg.batch_size * _dist_env()[1])
        if np.random.default_rng([cfg.seed, step, 7]).random() < cfg.slab_p:
            return (cfg.slab_depth, cfg.grid_size, cfg.grid_size)
    return tuple(cfg.crop) if cfg.crop else None


def _crop(x, y, crop, rng, fg_p):
    """Random crop; with probability fg_p centred near a voxel of a bone drawn uniformly among the
    bones present (class-balanced, so patella and fibula are seen as often as femur and tibia)."""
    shape = y.shape
    size = [min(c, s) for c, s in zip(crop, shape)]
    classes = [c for c in np.unique(y[::4, ::4, ::4]) if c > 0]
    if rng.random() < fg_p and classes:
        c = classes[int(rng.integers(len(classes)))]
        vox = np.argwhere(y[::2, ::2, ::2] == c) * 2
        idx = vox[int(rng.integers(len(vox)))]
        start = [int(np.clip(i - s // 2 + rng.integers(-s // 4, s // 4 + 1), 0, n - s)) for i, s, n in zip(idx, size, shape)]
    else:
        start = [int(rng.integers(0, n - s + 1)) for s, n in zip(size, shape)]
    sl = tuple(slice(a, a + s) for a, s in zip(start, size))
    return x[(slice(None),) + sl], y[sl], sl


class StepSampler(Sampler):
    """Global sample indices for this rank from `start_step` on: step s, rank r, item b ->
    (s * world + r) * batch + b."""

    def __init__(self, start_step: int, steps: int, batch: int, rank: int, world: int):
        self.start, self.steps, self.batch, self.rank, self.world = start_step, steps, batch, rank, world

    def __iter__(self):
        for s in range(self.start, self.steps):
            base = (s * self.world + self.rank) * self.batch
            yield from range(base, base + self.batch)

    def __len__(self):
        return max(0, self.steps - self.start) * self.batch


# ----------------------------------------------------------------------------- helpers
def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for weights; buffers (BatchNorm statistics) copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _amp_dtype(device: str):
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def _dist_env() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def model_card(cfg: TrainConfig, step: int, extra: dict | None = None) -> dict:
    return {
        "name": {"unet": "KneeRecon U-Net", "chen": "KneeRecon ChenNet (Chen et al. 2020)"}.get(
            cfg.architecture.get("kind", "unet"), "KneeRecon"),
        "version": "0.1.0",
        "architecture": cfg.architecture,
        "grid_size": cfg.grid_size,
        "labels": label_table(),
        "input": "2-channel volume: AP and lateral X-ray, percentile-normalised, replicated along each beam (DESIGN.md)",
        "training": {"steps": step, "config": cfg.to_dict()},
        **(extra or {}),
    }


def recalibrate_batchnorm(model, samples, device: str = "cpu", amp: bool = True, channels_last: bool = True) -> int:
    """Re-estimate every BatchNorm's running mean/variance as a plain average over `samples`
    (full-grid inputs [2, z, y, x]). Training on small random crops with batch 1-2 leaves running
    statistics that track the last few crops; inference on the full grid needs population ones."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    n = 0
    with torch.no_grad(), torch.autocast(device.split(":")[0], dtype=_amp_dtype(device), enabled=amp):
        for x in samples:
            xt = torch.as_tensor(x)[None].to(device)
            if channels_last:
                xt = xt.contiguous(memory_format=torch.channels_last_3d)
            model(xt)
            n += 1
    for m, (mom, tr) in zip(bns, saved):
        m.momentum = mom
        m.train(tr)
    return n


def recalibration_samples(paths: list[str], n: int, seed: int, augment: dict | None = None, realism_p: float = 0.0):
    """Full-grid training inputs (augmented like training) for `recalibrate_batchnorm`. The
    radiograph simulator is left out by default (realism_p = 0): measured on the run trained with
    --realism-p 0.5, statistics from plain inputs gave test Dice 0.947/0.897/0.946/0.857 against
    0.935/0.872/0.939/0.845 from the training mix, with the same accuracy on real-like radiographs."""
    rng = np.random.default_rng([seed, 7919])
    aug = AugmentConfig(**{**(augment or {}), "realism_p": realism_p})
    for _ in range(n):
        yield make_sample(load_case(paths[int(rng.integers(len(paths)))]), rng, aug)[0]


def validate(model, cases: list[Case], device: str, amp: bool, channels_last: bool) -> dict:
    """Mean Dice per bone over full-grid predictions of `cases`."""
    model.eval()
    dices = []
    with torch.no_grad():
        for c in cases:
            x, y = make_sample(c)
            xt = torch.from_numpy(x)[None].to(device)
            if channels_last:
                xt = xt.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.split(":")[0], dtype=_amp_dtype(device), enabled=amp):
                pred = model(xt).argmax(1)[0].cpu().numpy()
            dices.append(dice_per_class(pred, y))
    model.train()
    d = np.nanmean(np.array(dices), axis=0)
    return {name: float(d[i + 1]) for i, name in enumerate(BONE_NAMES)}


def _plot(csv_path: str, png_path: str) -> None:
    """Loss and validation-Dice curves as a PNG (drawn with Pillow, no plotting dependency)."""
    from PIL import Image, ImageDraw

    rows = list(csv.DictReader(open(csv_path)))
    if len(rows) < 2:
        return
    W, H, pad = 900, 360, 40
    img = Image.new("RGB", (W, H), "white")
    dr = ImageDraw.Draw(img)
    steps = np.array([float(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    half = W // 2
    def panel(x0, xs, ys_list, colors, title, ylo=None, yhi=None):
        ys_all = np.concatenate([y[np.isfinite(y)] for y in ys_list if np.isfinite(y).any()] or [np.zeros(1)])
        lo = ys_all.min() if ylo is None else ylo
        hi = ys_all.max() if yhi is None else yhi
        hi = hi if hi > lo else lo + 1
        dr.rectangle([x0 + pad, pad, x0 + half - 10, H - pad], outline="black")
        dr.text((x0 + pad, 10), f"{title}  [{lo:.3g}, {hi:.3g}]", fill="black")
        for ys, col in zip(ys_list, colors):
            m = np.isfinite(ys)
            if m.sum() < 2:
                continue
            px = x0 + pad + (xs[m] - xs.min()) / max(1, xs.max() - xs.min()) * (half - 10 - pad)
            py = H - pad - (ys[m] - lo) / (hi - lo) * (H - 2 * pad)
            dr.line(list(zip(px.tolist(), py.tolist())), fill=col, width=2)
    panel(0, steps, [loss], ["black"], "training loss")
    cols = ["#d94040", "#4dbf59", "#4073d9", "#e6cc40"]
    dice = [np.array([float(r.get(f"dice_{b}") or "nan") for r in rows]) for b in BONE_NAMES]
    panel(half, steps, dice, cols, "validation Dice (femur, patella, tibia, fibula)", 0.0, 1.0)
    img.save(png_path)


# ----------------------------------------------------------------------------- main loop


def _widens(init_arch: dict, arch: dict) -> bool:
    """Whether `arch` is the U-Net `init_arch` with wider scales (then --init-from widens it)."""
    if init_arch.get("kind", "unet") != "unet" or arch.get("kind", "unet") != "unet":
        return False
    old, new = tuple(init_arch.get("widths", ())), tuple(arch.get("widths", ()))
    same = {k: v for k, v in init_arch.items() if k != "widths"} == {k: v for k, v in arch.items() if k != "widths"}
    return same and old != new and len(old) == len(new) and all(n >= o for n, o in zip(new, old))


def train(cfg: TrainConfig, resume: bool = False, log=print, stop_at: int | None = None) -> str:
    """Train; returns the path of the final model file (`<out>/model.pt`), or of the checkpoint
    when `stop_at` ends this run early (a resumable chunk: continue with resume=True)."""
    rank, world, local_rank = _dist_env()
    distributed = world > 1
    device = cfg.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise KneeReconError("--device cuda asked for, but no CUDA GPU is available")
        if distributed:
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(local_rank)
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")

    model = build_network(cfg.architecture).to(device)
    if cfg.channels_last:
        model = to_channels_last(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.startswith("cuda") and _amp_dtype(device) == torch.float16)
    start = 0
    if cfg.init_from and not (resume and os.path.exists(ckpt_path)):
        init = read_model_file(cfg.init_from)
        state = {k: v.float() if v.is_floating_point() else v for k, v in init["state_dict"].items()}
        init_arch = init.get("card", {}).get("architecture", {})
        if _widens(init_arch, cfg.architecture):
            # a wider U-Net that starts as the given one (models/widen.py)
            narrow = build_network(init_arch)
            narrow.load_state_dict(state)
            state = widen_unet(narrow, tuple(cfg.architecture["widths"]), seed=cfg.seed).state_dict()
            log(f"initialised from {cfg.init_from}, widened {tuple(init_arch['widths'])} -> "
                f"{tuple(cfg.architecture['widths'])}")
        else:
            log(f"initialised from {cfg.init_from}")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # another architecture, and not one this can widen
            raise KneeReconError(
                f"--init-from {cfg.init_from}: its network ({init_arch.get('kind', 'unet')}, widths "
                f"{init_arch.get('widths')}) does not fit the one to train ({cfg.architecture.get('kind', 'unet')}, "
                f"widths {cfg.architecture.get('widths')}); give its --arch and --widths, or wider widths of the "
                f"same depth to widen it ({str(e).splitlines()[0][:120]})") from None
    if resume and os.path.exists(ckpt_path):
        blob = read_model_file(ckpt_path)
        model.load_state_dict({k: v for k, v in blob["state_dict"].items()})
        opt.load_state_dict(blob["optimizer"])
        start = int(blob["step"])
        log(f"resumed from {ckpt_path} at step {start}")
    ema = None
    if cfg.ema_decay > 0:
        ema = copy.deepcopy(model).requires_grad_(False)
        if resume and os.path.exists(ckpt_path) and "ema" in blob:
            ema.load_state_dict(blob["ema"])
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.startswith("cuda") else None)
    core = model.module if distributed else model

    source = None if cfg.phantoms_on_the_fly else CaseSource(cfg.data)
    val_cases = [load_case(p) for f in cfg.val_data for p in sorted(glob.glob(os.path.join(f, "*.npz")))]
    csv_path = os.path.join(cfg.out, "log.csv")
    fields = ["step", "loss", "wce", "ngcc", "lr", "samples_per_s"] + [f"dice_{b}" for b in BONE_NAMES]
    if rank == 0 and not (resume and os.path.exists(csv_path) and start > 0):
        with open(csv_path, "w", newline="") as f:
            csv.DictWriter(f, fields).writeheader()
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)

    full_xy = cfg.crop is None or (cfg.crop[1] >= cfg.grid_size and cfg.crop[2] >= cfg.grid_size) or cfg.slab_p > 0
    if cfg.ngcc_lambda > 0 and not full_xy and rank == 0:
        log("note: NGCC needs crops spanning the full x and y extent; it is off for this crop size")
    if cfg.ngcc_lambda > 0 and full_xy and cfg.workers > 0:
        # Observed here: slab-crop runs with DataLoader worker processes went NaN (with and without NGCC);
        # in-process loading plus the non-finite-step guard below trained cleanly. Cause not yet found.
        log("note: NGCC is on: loading data in the main process (workers=0)")
        cfg = TrainConfig(**{**cfg.__dict__, "workers": 0})
    amp_dtype = _amp_dtype(device)
    dev_type = device.split(":")[0]
    if cfg.amp and dev_type == "cpu" and not cpu_has_fast_bf16():
        log("note: this CPU has no native bf16: training in fp32 (bf16 autocast would be emulated, ~15x slower)")
        cfg = TrainConfig(**{**cfg.__dict__, "amp": False})

    step = start
    skipped = 0
    t_last, n_last = time.time(), 0
    acc = {"loss": 0.0, "wce": 0.0, "ngcc": 0.0, "n": 0}
    end = min(cfg.steps, stop_at) if stop_at else cfg.steps
    while step < end:
        chunk_end = min(end, step + max(cfg.ckpt_every, 1))
        if source is not None:
            source.refresh()
        ds = TrainSamples(cfg, None if source is None else list(source.paths))
        loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=StepSampler(step, chunk_end, cfg.batch_size, rank, world),
                            num_workers=cfg.workers, persistent_workers=False, prefetch_factor=2 if cfg.workers else None)
        for x, y, w, spacing, ap_mask, lat_mask in loader:
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            x, y, w = x.to(device), y.to(device), w.to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(dev_type, dtype=amp_dtype, enabled=cfg.amp):
                logits = model(x)
            wce = weighted_cross_entropy(logits, y, w)
            loss = wce
            if cfg.dice_weight > 0:
                loss = loss + cfg.dice_weight * soft_dice_loss(logits, y)
            ng = torch.zeros(())
            if cfg.ngcc_lambda > 0 and x.shape[-1] >= cfg.grid_size and x.shape[-2] >= cfg.grid_size:
                ng = ngcc_loss(logits, x, tuple(spacing[0].tolist()), (ap_mask.to(device), lat_mask.to(device)))
                loss = loss + cfg.ngcc_lambda * ng
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            grads_ok = all(torch.isfinite(p.grad).all() for p in core.parameters() if p.grad is not None)
            if torch.isfinite(loss) and (grads_ok or scaler.is_enabled()):
                scaler.step(opt)  # (with fp16 the scaler itself skips steps with inf/NaN gradients)
                scaler.update()
                if ema is not None:
                    _ema_update(ema, core, min(cfg.ema_decay, (1 + step) / (10 + step)))
            else:
                # a non-finite loss or gradient must not reach the weights: one bad batch would ruin the model
                opt.zero_grad(set_to_none=True)
                skipped += 1
                if rank == 0:
                    log(f"warning: step {step + 1} skipped: non-finite loss or gradient ({skipped} so far)")
                step += 1
                continue
            step += 1
            acc["loss"] += float(loss.detach())
            acc["wce"] += float(wce.detach())
            acc["ngcc"] += float(ng.detach())
            acc["n"] += 1
            n_last += x.shape[0] * world
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps):
                dt = time.time() - t_last
                sps = n_last / max(dt, 1e-9)
                row = {"step": step, "lr": f"{_lr_at(step - 1, cfg):.3g}", "samples_per_s": f"{sps:.3f}",
                       **{k: f"{acc[k] / acc['n']:.5f}" for k in ("loss", "wce", "ngcc")}}
                if val_cases and (step % cfg.val_every == 0 or step == cfg.steps):
                    probe = copy.deepcopy(ema if ema is not None else core)  # validate with population BN statistics, leave training untouched
                    if cfg.bn_recalibration and source is not None:
                        recalibrate_batchnorm(probe, recalibration_samples(source.paths, min(8, cfg.bn_recalibration), step,
                                                                           cfg.augment), device, cfg.amp, cfg.channels_last)
                    d = validate(probe, val_cases, device, cfg.amp, cfg.channels_last)
                    del probe
                    row.update({f"dice_{b}": f"{v:.4f}" for b, v in d.items()})
                with open(csv_path, "a", newline="") as f:
                    csv.DictWriter(f, fields).writerow(row)
                eta = (cfg.steps - step) * cfg.batch_size * world / max(sps, 1e-9)
                dice_txt = " ".join(f"{b[:3]} {row[f'dice_{b}']}" for b in BONE_NAMES if f"dice_{b}" in row)
                log(f"step {step}/{cfg.steps}  loss {row['loss']}  {sps:.2f} samples/s  ETA {eta / 60:.1f} min  {dice_txt}")
                acc = {"loss": 0.0, "wce": 0.0, "ngcc": 0.0, "n": 0}
                t_last, n_last = time.time(), 0
        if rank == 0:
            save_model(ckpt_path, core, model_card(cfg, step), half=False,
                       extra={"optimizer": opt.state_dict(), "step": step,
                              **({"ema": ema.state_dict()} if ema is not None else {})})
            _plot(csv_path, os.path.join(cfg.out, "curves.png"))
    if distributed:  # every rank records a digest of its weights: DDP must keep them identical
        digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in core.parameters())).hexdigest()
        with open(os.path.join(cfg.out, f"weights_rank{rank}.sha256"), "w") as f:
            f.write(digest)
        dist.barrier()
    if step < cfg.steps:
        return ckpt_path
    final = os.path.join(cfg.out, "model.pt")
    if rank == 0:
        if ema is not None:  # the averaged weights are the model
            core = ema
        if cfg.bn_recalibration and source is not None:
            recalibrate_batchnorm(core, recalibration_samples(source.paths, cfg.bn_recalibration, cfg.seed, cfg.augment),
                                  device, cfg.amp, cfg.channels_last)
        save_model(final, core, model_card(cfg, step))
    return final
