"""The reconstruction path: two X-ray files (or arrays) -> label map in LPS + bone surfaces.

PyTorch is imported only where it is used: with the OpenVINO backend (the default on the CPU)
the network runs from the converted model beside the model file and the card is read without
PyTorch (model_card.py), so a reconstruction imports no torch."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk

from ..core.errors import KneeReconError
from ..core.geometry import ReconGrid
from ..core.labels import BONES
from ..geometry.alignment import crop_rows, estimate_height_offset, knee_height
from ..geometry.backprojection import backproject
from ..io import resources
from ..io.preprocessing import collimated_border, fill_collimation, normalize_intensity
from ..io.xray_io import XRay, read_xray, with_side
from ..models.model_card import network_divisor, reconstruction_card
from ..models.cpu_features import cpu_has_fast_bf16  # (bench/bench_inference.py imports it from here too)
from . import quality
from .refine import finer_grid, refine_labels
from .overlay import overlay_picture
from .surfaces import bone_surface, clean_labels

RESOURCES = resources.resources_dir()
DEFAULT_MODEL = resources.model_path(resources.UNET)
# the bundled ensemble member (`--ensemble` without a path): ChenNet trained at the U-Net's budget
DEFAULT_ENSEMBLE = [resources.model_path(resources.CHEN)]
TORCH_HINT = "pip install 'kneerecon[train]' (PyTorch 2.13.0)"


def torch_available() -> bool:
    """Whether PyTorch is installed (without importing it: that alone takes seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # blocked (sys.modules["torch"] = None) or broken
        return False


def _may_have_cuda() -> bool:
    """False where there certainly is no CUDA GPU (Linux without the NVIDIA driver), so that
    --device auto need not import PyTorch (seconds) to find out."""
    import sys

    return not sys.platform.startswith("linux") or os.path.exists("/proc/driver/nvidia")


def needs_torch(what: str):
    """`import torch`, or a KneeReconError (exit 2) that says what needed it and how to install it."""
    try:
        import torch
    except ImportError:
        raise KneeReconError(f"{what} needs PyTorch, which is not installed: {TORCH_HINT}")
    return torch


def detect_side(labels: np.ndarray, grid: ReconGrid) -> str | None:
    """'left' or 'right' from where the reconstructed fibula lies relative to the tibia (the fibula
    is lateral: toward +x, the patient's left, in a left knee); None if either is missing."""
    fib, tib = labels == 4, labels == 3
    if fib.sum() < 50 or tib.sum() < 50:
        return None
    dx = (np.nonzero(fib)[2].mean() - np.nonzero(tib)[2].mean()) * grid.spacing[0]
    if abs(dx) < 5.0:
        return None
    return "left" if dx > 0 else "right"


def resample_labels(labels: np.ndarray, src: ReconGrid, dst: ReconGrid) -> np.ndarray:
    """A label map on `src` moved onto `dst` by physical coordinates (nearest neighbour,
    background outside `src`)."""
    out = sitk.Resample(src.to_image(np.ascontiguousarray(labels)), dst.reference_image(), sitk.Transform(),
                        sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)


class Cancelled(Exception):
    """Raised when the caller's cancel callback asks to stop."""


@dataclass
class Reconstruction:
    labels: sitk.Image  # uint8 on the reconstruction grid, LPS, true geometry
    grid: ReconGrid
    surfaces: dict  # bone name -> vtkPolyData (LPS mm)
    volumes_ml: dict
    timings_s: dict
    card: dict
    ap: XRay
    lateral: XRay
    side: str
    device: str = "cpu"
    notes: list = field(default_factory=list)
    detected_side: str | None = None
    quality: dict = field(default_factory=dict)  # quality.assess: verdict per bone and overall, with reasons
    warnings: list = field(default_factory=list)  # what the user must not miss (CLI, report.json, Slicer status)
    view_check: dict = field(default_factory=dict)
    overlay: object = None  # the review picture (PIL image) where run(overlay=True) drew it

    @property
    def lateral_offset_mm(self) -> float:
        """Height offset of the lateral view that the reconstruction corrected (0 if none)."""
        return float((getattr(self, "height_offset", None) or {}).get("applied_mm", 0.0))

    def labels_array(self) -> np.ndarray:
        return sitk.GetArrayFromImage(self.labels)


def pick_device(device: str) -> str:
    """cpu, cuda[:N], or for auto: cuda where PyTorch is installed and sees a GPU, else cpu."""
    if device == "cpu":
        return device
    if device == "auto":
        if not torch_available() or not _may_have_cuda():  # no GPU inference: the CPU (OpenVINO), torch not imported
            return "cpu"
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        raise KneeReconError(f"unknown device {device!r}; use cpu, cuda or auto")
    if not needs_torch("--device cuda").cuda.is_available():
        raise KneeReconError("--device cuda asked for, but no CUDA GPU is available (use --device cpu)")
    return device


LONG_IMAGE_MM = 300.0  # taller views are cropped to a window around the knee
KNEE_WINDOW_MM = 220.0


BACKENDS = ("auto", "torch", "openvino")


def pick_backend(backend: str, device: str, averaged: bool) -> str:
    """The network's runtime: OpenVINO on the CPU where the package is installed (faster), else
    PyTorch; PyTorch always on CUDA and for an ensemble (`averaged`: several models' probabilities
    are averaged). Mirror test-time augmentation runs on either runtime."""
    from ..models import openvino_backend

    if backend not in BACKENDS:
        raise KneeReconError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "openvino":
        if device != "cpu":
            raise KneeReconError("the OpenVINO backend runs on the CPU only; use --device cpu or --backend torch")
        if averaged:
            raise KneeReconError("ensembles run with --backend torch only")
        if not openvino_backend.available():
            raise KneeReconError("--backend openvino needs the openvino package (pip install openvino)")
        return "openvino"
    if backend == "auto" and device == "cpu" and not averaged and openvino_backend.available():
        return "openvino"
    if not torch_available():
        if averaged:
            raise KneeReconError(f"ensembles need PyTorch, which is not installed: {TORCH_HINT}")
        if backend == "torch":
            raise KneeReconError(f"--backend torch needs PyTorch, which is not installed: {TORCH_HINT}")
        raise KneeReconError("neither of the network's runtimes is installed: pip install openvino (the CPU runtime, "
                             "about 60 MB) or " + TORCH_HINT)
    return "torch"


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(0, keepdims=True))
    e /= e.sum(0, keepdims=True)
    return e


def mirror_labels(first_labels: np.ndarray, first: np.ndarray, mirrored_labels: np.ndarray,
                  mirrored: np.ndarray) -> np.ndarray:
    """The labels of `mirror_average` without averaging the whole grid: where both passes pick the
    same class it also has the largest summed probability, so only the voxels where they disagree
    (about 1 % of the grid) are averaged. Labels [z, y, x]; logits [K, z, y, x], the mirrored
    pass's as it came (flipped along x)."""
    nx = first_labels.shape[-1]
    labels = first_labels.copy()
    z, y, x = np.nonzero(first_labels != mirrored_labels[..., ::-1])
    if len(z):
        p = _softmax(np.asarray(first[:, z, y, x], np.float32))
        p += _softmax(np.asarray(mirrored[:, z, y, nx - 1 - x], np.float32))
        labels[z, y, x] = p.argmax(0)
    return labels


def mirror_average(first: np.ndarray, mirrored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, log of the mean class probabilities) of two passes' logits [K, z, y, x]: the input
    as given and the input mirrored along x, whose scores are flipped back here."""
    # in float32: the IR returns its scores in fp16, where 1e-8 underflows and exp loses digits
    p = _softmax(np.asarray(first, np.float32))
    p += _softmax(np.asarray(mirrored[..., ::-1], np.float32))
    p *= 0.5
    return p.argmax(0).astype(np.uint8), np.log(np.maximum(p, 1e-8, out=p), out=p)


QUALITY_MODES = ("standard", "thorough")


class Reconstructor:
    """Holds a loaded model; `run` reconstructs one X-ray pair."""

    def __init__(self, model_path: str | None = None, device: str = "cpu", amp: bool = True, style: str | None = None,
                 tta: bool = True, backend: str = "auto", ensemble: list[str] | None = None):
        self.model_path = os.path.abspath(model_path or DEFAULT_MODEL)
        if model_path is None and not os.path.exists(self.model_path):
            raise KneeReconError(f"the bundled model is missing ({self.model_path}); pass --model PATH")
        self.device = pick_device(device)
        self.card = reconstruction_card(self.model_path)  # no PyTorch needed to read it
        self.tta = tta
        self.amp = amp
        # the quality report's settings, fitted for this model file (<model stem>.quality.json beside it)
        self.quality_config, self.quality_source = quality.load_config(self.model_path)
        self.keep_quality_inputs = False  # scripts/calibrate_quality.py: attach the report's inputs to the result
        self.style = None
        if style:  # real radiograph -> DRR translation before the network (kneerecon train-style)
            needs_torch("--style")
            from ..models.style import StyleTransfer
            self.style = StyleTransfer(style, self.device)
            self.style_path = style
        self.divisor = network_divisor(self.card.get("architecture", {}))
        self.backend = pick_backend(backend, self.device, bool(ensemble))
        self._net, self.ov, self._precision, self.dtype = None, None, None, None
        # with mirror TTA: the unmirrored pass's logits and labels (what the quality report judges)
        self.single_scores = self.single_labels = None
        self.members, self.member_cards = [], []
        size = int(self.card.get("grid_size", 128))
        in_channels = int(self.card.get("architecture", {}).get("in_channels", 2))
        if self.backend == "openvino":
            from ..models import openvino_backend

            ov = openvino_backend.import_openvino()  # without telemetry and the model converter
            core = ov.Core()
            precision = openvino_backend.pick_precision(core, self.model_path, amp)
            # the network for a conversion, built only when no IR made from this model file exists
            convert = (lambda: self.net) if torch_available() else None
            try:
                self.ov = openvino_backend.OpenVINONetwork(self.model_path, convert, precision,
                                                           (1, in_channels, size, size, size),
                                                           openvino_backend.threads_from_env(), core)
            except RuntimeError as e:  # OpenVINO could not convert or compile this model on this CPU
                if backend == "openvino" or not torch_available():
                    raise KneeReconError(f"OpenVINO could not run {os.path.basename(self.model_path)} "
                                         f"({str(e).strip().splitlines()[0][:200]}); use --backend torch")
                self.backend = "torch"
            else:
                why = ": this CPU has no native bf16" if amp and self.ov.precision == "f32" else ""
                self._precision = f"OpenVINO {self.ov.precision} (BatchNorm folded, upsampling fused){why}"
        if self.backend == "torch":
            self._setup_torch(ensemble)

    @property
    def net(self):
        """The model file's PyTorch network for inference (built on first use: the OpenVINO backend
        needs it only to convert a model): BatchNorm folded into the convolutions and the U-Net's
        finest decoder level fused (fused_unet.py); bench/bench_inference.py measures each step
        against fp32 eager."""
        if self._net is None:
            needs_torch("the PyTorch network")
            from ..models.checkpoint import load_model
            from ..models.fused_unet import fuse_for_inference
            from ..models.network import fold_batchnorm

            net, _ = load_model(self.model_path, self.device)
            self._net = fuse_for_inference(fold_batchnorm(net))
        return self._net

    def _setup_torch(self, ensemble: list[str] | None) -> None:
        torch = needs_torch("--backend torch" if not ensemble else "--ensemble")
        from ..models.checkpoint import load_model
        from ..models.fused_unet import fuse_for_inference
        from ..models.network import fold_batchnorm, to_channels_last

        self.dtype = torch.float32
        bf16 = self.device == "cpu" and self.amp and cpu_has_fast_bf16()
        if self.device == "cpu":
            # on the CPU with amp, bf16 weights and activations throughout (no autocast casts per
            # layer) in channels-last 3D, oneDNN's fastest layout
            self._net = to_channels_last(self.net)
            if bf16:
                self.dtype = torch.bfloat16
                self._net = self._net.to(self.dtype)
        arch = self.card.get("architecture", {})
        # ensemble members: further models whose class probabilities are averaged with this one's
        for path in ensemble or []:
            member, card = load_model(os.path.abspath(path), self.device)
            if int(card.get("grid_size", 128)) != int(self.card.get("grid_size", 128)) or \
                    member.config.num_classes != arch.get("num_classes", 5) or \
                    member.config.in_channels != arch.get("in_channels", 2):
                raise KneeReconError(f"ensemble member {path!r} does not take the same input or give the same classes "
                                     "as the main model (grid size, input channels, classes)")
            member = fuse_for_inference(fold_batchnorm(member))
            if self.device == "cpu":
                member = to_channels_last(member).to(self.dtype)
            self.members.append(member)
            self.member_cards.append(card)
            self.divisor = max(self.divisor, member.divisor)
        if self.device.startswith("cuda"):
            self._precision = "autocast " + ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if self.amp else "fp32"
        elif self.dtype == torch.bfloat16:
            self._precision = "bf16 (BatchNorm folded, upsampling fused, channels-last)"
        else:
            why = "" if not self.amp or bf16 else ": this CPU has no native bf16"
            self._precision = f"fp32 (BatchNorm folded, upsampling fused, channels-last){why}"

    @property
    def precision(self) -> str:
        """How the network runs, for the report (e.g. 'OpenVINO bf16, BatchNorm folded')."""
        return self._precision

    def predict(self, volume: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """Argmax labels of the network for a 2-channel volume [2, z, y, x]."""
        return self.predict_scores(volume, scores=False, tta=tta)

    def predict_scores(self, volume: np.ndarray, scores: bool = True, tta: bool | None = None):
        """(labels, class scores [K, z, y, x] float) of the network for a 2-channel volume; the
        scores are logits (log-probabilities when members or TTA are averaged), None where an
        OpenVINO IR converted before 0.5 returns labels only. With scores=False: the labels alone.
        `tta`: mirror test-time augmentation for this call (None: the Reconstructor's setting);
        with it, `single_scores` and `single_labels` keep the unmirrored pass's logits and labels (the
        labels as the network's own argmax: OpenVINO's scores output is fp16, whose ties differ)."""
        tta = self.tta if tta is None else tta
        self.single_scores = self.single_labels = None
        if self.ov is not None:
            if not tta:
                return self.ov(volume, scores=scores)
            if not self.ov.has_scores:
                raise KneeReconError("this model's converted network returns no class scores, which --tta averages: "
                                     "re-convert it with kneerecon export-openvino, or use --backend torch")
            single, first = self.ov(volume, scores=True)  # copies: the output buffers are reused by the second pass
            mirrored_labels = self.ov(np.ascontiguousarray(volume[..., ::-1]))
            self.single_scores, self.single_labels = first, single
            if scores:
                return mirror_average(first, np.asarray(self.ov.last_scores()))
            return mirror_labels(single, first, mirrored_labels, self.ov.last_scores())
        import torch

        x = torch.from_numpy(volume)[None].to(self.device, self.dtype)
        if self.device == "cpu":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        cuda_amp = self.amp and self.device.startswith("cuda")
        dt = torch.bfloat16 if not cuda_amp or torch.cuda.is_bf16_supported() else torch.float16
        with torch.inference_mode(), torch.autocast("cuda", dtype=dt, enabled=cuda_amp):
            if not tta and not self.members:
                logits = self.net(x)
                labels = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
                return (labels, logits[0].float().cpu().numpy()) if scores else labels
            p = 0
            for net in [self.net] + self.members:
                logits = net(x).float()
                if net is self.net and not self.members:
                    self.single_scores = logits[0].cpu().numpy()
                    self.single_labels = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
                p = p + torch.softmax(logits, 1)
                if tta:  # the knee mirrored left<->right (the input flipped along x, the same
                    # input a mirrored knee would give) and the prediction flipped back
                    p = p + torch.softmax(net(x.flip(-1)).float(), 1).flip(-1)
            labels = p.argmax(1)[0].to(torch.uint8).cpu().numpy()
            return (labels, torch.log(p[0].clamp_min(1e-8)).cpu().numpy()) if scores else labels

    def run(self, ap: XRay, lateral: XRay, side: str | None = None, grid_size: int | None = None,
            surfaces: bool = True, progress: Callable[[float, str], None] | None = None,
            cancel: Callable[[], bool] | None = None, height_offset: float | str | None = "auto",
            refine: int = 1, quality_mode: str = "standard", tta: bool | None = None,
            overlay: bool = False) -> Reconstruction:
        """Reconstruct one pair. `height_offset`: "auto" estimates the lateral view's vertical
        displacement against the AP from the images and corrects it (when the estimate is
        reliable); a number (mm, positive = lateral content higher) corrects that much;
        None or "none" corrects nothing. `refine`: the output grid has this many times DESIGN.md's
        voxels per axis (1-3), labelled from the network's class scores interpolated (refine.py).
        `quality_mode` "thorough": the quality report also runs the network a second time on
        perturbed inputs and compares the two (quality.consistency; one more network pass).
        `tta`: mirror test-time augmentation for this pair (None: the Reconstructor's setting). With
        it the written bones average both passes, while the quality report judges the unmirrored
        pass alone: the probabilities and labels its settings were fitted on. `overlay`: also draw
        the review picture (overlay.py; `Reconstruction.overlay`, written as overlay.png), beside
        the surfaces and the quality measurement rather than after them."""
        tta = self.tta if tta is None else tta
        if quality_mode not in QUALITY_MODES:
            raise KneeReconError(f"quality mode must be one of {', '.join(QUALITY_MODES)}, got {quality_mode!r}")
        progress = progress or (lambda f, m: None)
        t = {}
        side = side or ap.geometry.side
        if side not in ("left", "right"):
            raise KneeReconError(f"side must be 'left' or 'right', got {side!r}")
        ap, lateral = with_side(ap, side), with_side(lateral, side)

        def check(frac, msg):
            if cancel is not None and cancel():
                raise Cancelled("reconstruction cancelled")
            progress(frac, msg)

        check(0.05, "back-projecting the X-rays")
        t0 = time.perf_counter()
        size = int(grid_size or self.card.get("grid_size", 128))
        if refine not in (1, 2, 3):
            raise KneeReconError(f"refine must be 1, 2 or 3 (times the grid's voxels per axis), got {refine!r}")
        div = self.divisor
        if size % div:
            raise KneeReconError(f"grid size {size} must be a multiple of {div} for this network")
        notes: list[str] = []
        if tta and self.ov is not None and not self.ov.has_scores:  # an IR converted before 0.5
            tta = False
            notes.append("this model's converted network returns no class scores: mirror test-time augmentation "
                         "was skipped (re-convert it with kneerecon export-openvino)")
        shown = (ap, lateral)  # the overlay shows the images as given
        # a long-leg image: reconstruct a knee-sized window around the joint (training saw 180-250 mm)
        z_centre = 0.0
        tall = max(ap.geometry.iso_extent[1], lateral.geometry.iso_extent[1])
        if tall > LONG_IMAGE_MM and not (ap.geometry.cone or lateral.geometry.cone):
            z_knee = knee_height(ap)
            ap, z_centre = crop_rows(ap, z_knee, KNEE_WINDOW_MM)
            lateral, _ = crop_rows(lateral, z_centre, KNEE_WINDOW_MM)
            notes.append(f"the images are {tall:.0f} mm tall: reconstructed a {KNEE_WINDOW_MM:.0f} mm window around the "
                         f"knee joint found at {z_knee:+.0f} mm")
        elif tall > LONG_IMAGE_MM:
            notes.append(f"the images are {tall:.0f} mm tall (cone beam: not cropped); the grid is coarse - crop the "
                         "images to the knee for a better result")
        design = ReconGrid.from_views(ap.geometry, lateral.geometry, size)  # DESIGN.md's grid, for the outputs
        out_grid = finer_grid(design, refine)
        grid = ReconGrid.for_network(ap.geometry, lateral.geometry, size)  # the scale the network was trained at
        if grid != design:
            notes.append("the images' field of view is outside the trained range: the network ran on a "
                         f"{' x '.join(f'{s * n:.0f}' for s, n in zip(grid.spacing, grid.shape[::-1]))} mm grid around "
                         "the isocentre, resampled onto the output grid")
        # collimator shadows (flat white bands at the edges) are not anatomy: the exposed field's
        # edges are continued over them, as the network saw image edges in training
        views = {}
        for name, x in (("AP", ap), ("lateral", lateral)):
            border = collimated_border(x.pixels)
            if any(border):
                x = XRay(fill_collimation(x.pixels, border), x.geometry, x.info)
                notes.append(f"{name} view: collimator borders found (top, bottom, left, right = {border} px) and "
                             "replaced by the exposed field's edges")
            if self.style is not None:
                x = XRay(self.style(x.pixels, x.geometry.iso_spacing), x.geometry, x.info)
            views[name] = x
        ap, lateral = views["AP"], views["lateral"]
        if self.style is not None:
            notes.append(f"both views translated to DRR style by {os.path.basename(self.style_path)}")
        offset = {"mode": "none", "applied_mm": 0.0}
        if height_offset == "auto":
            est = estimate_height_offset(ap, lateral)
            offset = {"mode": "auto", "estimated_mm": round(est.offset_mm, 3), "correlation": round(est.correlation, 3),
                      "applied_mm": round(est.offset_mm, 3) if est.reliable else 0.0}
            if not est.reliable:
                notes.append("the height offset between the views could not be estimated reliably (row profiles do not "
                             "match); none was corrected - check that both images show the same knee at the same scale")
        elif height_offset not in (None, "none"):
            try:
                offset = {"mode": "given", "applied_mm": float(height_offset)}
            except (TypeError, ValueError):
                raise KneeReconError(f"height offset must be 'auto', 'none' or a number of mm, got {height_offset!r}")
        vol = backproject(XRay(normalize_intensity(ap.pixels), ap.geometry),
                          XRay(normalize_intensity(lateral.pixels), lateral.geometry), grid,
                          lateral_offset_mm=-offset["applied_mm"])
        bp = (ap, lateral, grid)  # for the thorough quality report's second pass
        t["backprojection"] = time.perf_counter() - t0
        check(0.2, "running the network")
        t0 = time.perf_counter()
        # class scores only where the output grid differs from the network's: they place the
        # bones' boundaries between the network's voxels there (refine.py)
        # (with PyTorch always: the quality report's margin reads them; OpenVINO keeps them in its
        # output buffer, read there without a copy)
        raw, scores = (self.predict_scores(vol, tta=tta) if grid != out_grid or self.ov is None
                       else (self.predict(vol, tta=tta), None))
        net_scores = scores if scores is not None else (self.ov.last_scores() if self.ov is not None else None)
        single = self.single_scores if tta and not self.members else None  # the unmirrored pass's logits
        t["network"] = time.perf_counter() - t0
        check(0.6, "cleaning the label map")
        t0 = time.perf_counter()

        def finished(raw_, scores_):  # the clean label map on the output grid
            lab_ = clean_labels(raw_)
            if grid != out_grid and scores_ is not None:
                return refine_labels(scores_, lab_, grid, out_grid)
            return resample_labels(lab_, grid, out_grid) if grid != out_grid else lab_
        # with mirror TTA the unmirrored pass is cleaned too (the quality report judges it): in a
        # second thread, as SimpleITK's filters release the GIL
        with ThreadPoolExecutor(max_workers=1) as pool:
            judged = pool.submit(finished, self.single_labels, single) if single is not None else None
            lab = finished(raw, scores)
            lab_single = judged.result() if judged is not None else None
        if grid != out_grid and scores is None and refine > 1:
            notes.append("this model's converted network returns no class scores: the finer grid holds the "
                         "network's labels resampled (re-convert it with kneerecon export-openvino)")
        # what the quality report judges: with mirror TTA the unmirrored pass (its settings were
        # fitted on one pass's labels and probabilities), else the output itself; an ensemble's
        # averaged probabilities are less peaked than one network's, so their margin is not judged
        if single is not None:
            raw_q, lab_q, q_scores = self.single_labels, lab_single, single
        else:
            raw_q, lab_q, q_scores = raw, lab, (None if self.members else net_scores)
        net_grid, grid = grid, out_grid
        t["postprocess"] = time.perf_counter() - t0
        if z_centre:  # back from the cropped window's frame to the images' own
            grid = ReconGrid(grid.shape, grid.spacing, (grid.origin[0], grid.origin[1], grid.origin[2] + z_centre))
        vox_ml = float(np.prod(grid.spacing)) / 1000.0
        volumes = {b.name: float((lab == b.value).sum() * vox_ml) for b in BONES}
        notes += [f"no {n} found in the reconstruction" for n, v in volumes.items() if v == 0]
        seen = detect_side(lab, grid)
        if seen and seen != side:
            notes.append(f"the reconstructed fibula lies on the {seen} knee's lateral side, but the side given is "
                         f"{side}: check the side and the images' orientation (AP columns toward the patient's left)")
        if z_centre:
            net_grid = ReconGrid(net_grid.shape, net_grid.spacing, (net_grid.origin[0], net_grid.origin[1],
                                                                     net_grid.origin[2] + z_centre))

        def measure_quality():
            t0 = time.perf_counter()
            m = quality.measure(lab_q, grid, *shown, offset["applied_mm"], raw_q, net_grid, q_scores,
                                self.quality_config)
            return m, time.perf_counter() - t0

        def draw_overlay():
            t0 = time.perf_counter()
            pic = overlay_picture(shown[0].pixels, shown[1].pixels, lab, grid, shown[0].geometry, shown[1].geometry,
                                  lateral_offset_mm=offset["applied_mm"])
            return pic, time.perf_counter() - t0
        surf, drawn = {}, None
        if surfaces:
            t0 = time.perf_counter()
            check(0.65, "building the bone surfaces")
            # VTK's filters release the GIL: two threads build the bones (and draw the review picture,
            # numpy and Pillow) while this thread measures the quality report (numpy); progress and
            # cancel stay on the calling (GUI) thread
            with ThreadPoolExecutor(max_workers=2) as pool:
                drawn = pool.submit(draw_overlay) if overlay else None  # the longest job first
                futures = {pool.submit(bone_surface, lab == b.value, grid): b.name for b in BONES}
                measured, t_measure = measure_quality()
                for i, fut in enumerate(as_completed(futures)):
                    surf[futures[fut]] = fut.result()
                    check(0.65 + 0.3 * (i + 1) / len(BONES), f"built the {futures[fut]} surface")
                drawn = drawn.result() if drawn is not None else None
            surf = {b.name: surf[b.name] for b in BONES}
            t["surfaces"] = time.perf_counter() - t0  # with the quality measurement beside it
        else:
            measured, t_measure = measure_quality()
            drawn = draw_overlay() if overlay else None
        if drawn is not None:
            t["overlay"] = drawn[1]
        t0 = time.perf_counter() - t_measure
        check(0.97, "checking the reconstruction against the X-rays")
        keep = None
        if self.keep_quality_inputs:
            keep = {"raw": raw_q, "raw_grid": net_grid, "labels": lab_q,
                    "margin": quality.margin_map(q_scores) if q_scores is not None else None}
        if quality_mode == "thorough":
            check(0.98, "checking the reconstruction's stability (a second network pass)")
            raw2 = self._perturbed_pass(*bp, -offset["applied_mm"], tta=tta and single is None)
            for b, d in quality.consistency(raw_q, raw2, self.quality_config.perturb_shift_voxels).items():
                measured[b]["consistency_dice"] = d
            if keep is not None:
                keep["raw2"] = raw2
        report = quality.judge(measured, self.quality_config)
        if "note" in self.quality_source:
            notes.append(self.quality_source["note"])
        report["mode"] = quality_mode
        report["thresholds"] = dict(self.quality_source)
        t["quality"] = report["time_s"] = round(time.perf_counter() - t0, 4)
        progress(1.0, "done")
        rec = Reconstruction(grid.to_image(lab), grid, surf, volumes, t, self.card, *shown, side, self.device, notes)
        rec.detected_side = seen
        rec.precision = self.precision
        rec.tta = bool(tta)
        rec.ensemble = [{"name": c.get("name"), "version": c.get("version")} for c in self.member_cards]
        rec.height_offset = offset
        rec.quality = report
        rec.overlay = drawn[0] if drawn is not None else None
        if keep is not None:
            rec.quality_inputs = keep
        return rec

    def _perturbed_pass(self, ap: XRay, lateral: XRay, grid: ReconGrid, lateral_offset_mm: float,
                        tta: bool = False) -> np.ndarray:
        """The network's labels for the same pair with the contrast changed (normalised intensities
        raised to `perturb_gamma`) on a grid moved by `perturb_shift_voxels` along every axis: a
        stable reconstruction barely changes, a doubtful bone does."""
        cfg = self.quality_config
        s = cfg.perturb_shift_voxels
        moved = ReconGrid(grid.shape, grid.spacing, tuple(o + s * d for o, d in zip(grid.origin, grid.spacing)))

        def perturbed(x: XRay) -> XRay:
            a = normalize_intensity(x.pixels)
            return XRay(np.sign(a) * np.abs(a) ** cfg.perturb_gamma, x.geometry)
        vol = backproject(perturbed(ap), perturbed(lateral), moved, lateral_offset_mm=lateral_offset_mm)
        return self.predict(vol, tta=tta)


def reconstruct(ap, lateral, side: str | None = None, pixel_spacing=None, sid: float | None = None,
                sod: float | None = None, model: str | None = None, device: str = "cpu",
                progress=None, cancel=None, surfaces: bool = True, height_offset: float | str | None = "auto",
                style: str | None = None, tta: bool = True, backend: str = "auto",
                ensemble: list[str] | None = None, views_as_given: bool = False, refine: int = 1,
                quality_mode: str = "standard", overlay: bool = False) -> Reconstruction:
    """Reconstruct the knee bones from an AP and a lateral X-ray (file paths or `XRay`s).
    `refine` 2 or 3: outputs on a grid that many times finer per axis; `quality_mode` "thorough":
    the quality report with a second, perturbed network pass; `overlay`: also draw the review
    picture (see `Reconstructor.run`).

    Before any network work the pair is checked (view_check.py): the same file or the same
    pixels given twice, or a pair whose views look swapped, raise KneeReconError (`views_as_given`
    skips the view test, not the duplicate test); where the view classifier is unsure, the pair is
    also reconstructed swapped and refused if that fits the images much better (view_opinion.py).
    A `side` that the AP image or the reconstructed fibula contradicts is kept but warned about in
    `Reconstruction.warnings`."""
    from ..io.view_check import check_views
    from .view_opinion import confirm_views

    t0 = time.perf_counter()
    side_ = side or "right"
    ap_source, lateral_source = ap, lateral
    if isinstance(ap, (str, os.PathLike)):
        ap = read_xray(os.fspath(ap), "ap", pixel_spacing, sid, sod, side_)
    if isinstance(lateral, (str, os.PathLike)):
        lateral = read_xray(os.fspath(lateral), "lateral", pixel_spacing, sid, sod, side_)
    vc = check_views(ap_source, lateral_source, ap, lateral, views_as_given)
    if side is None and vc is not None and vc.side_seen:
        # the AP image's own side as the first guess: a cone-beam pair (whose lateral source side
        # changes the geometry) is then rarely reconstructed twice; the fibula still decides below
        side_ = vc.side_seen
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec = Reconstructor(model, device, style=style, tta=tta, backend=backend, ensemble=ensemble)
    t_load = time.perf_counter() - t0
    out = rec.run(ap, lateral, side_, surfaces=surfaces, progress=progress, cancel=cancel, height_offset=height_offset,
                  refine=refine, quality_mode=quality_mode, overlay=overlay)
    if side is None:
        seen = out.detected_side
        if seen and seen != side_:
            if ap.geometry.cone or lateral.geometry.cone:  # the lateral source side changes the geometry: redo
                out = rec.run(ap, lateral, seen, surfaces=surfaces, progress=progress, cancel=cancel,
                              height_offset=height_offset, refine=refine, quality_mode=quality_mode, overlay=overlay)
            else:
                out.side = seen
        out.notes = [n for n in out.notes if "but the side given" not in n]
        out.notes.append(f"side not given: detected {out.side} from the fibula's position" if seen
                         else "side not given and not detectable (no fibula found): assumed right")
    out.timings_s = {"read": t_read, "load_model": t_load, **out.timings_s}
    if vc is not None and vc.ambiguous:  # the classifier was unsure: the network's second opinion
        t0 = time.perf_counter()
        confirm_views(rec, vc, out)  # KneeReconError where the pair reconstructs better swapped
        out.timings_s["view_second_opinion"] = time.perf_counter() - t0
    attach_view_check(out, vc, side)
    return out


def attach_view_check(rec: Reconstruction, vc, declared_side: str | None) -> None:
    """Put the view check's findings into the reconstruction (report.json `view_check`) and turn a
    declared side that the images contradict into a warning (not only a note)."""
    from ..io.view_check import side_warnings

    rec.view_check = vc.to_dict() if vc is not None else {"skipped": "views taken as given"}
    warnings = side_warnings(declared_side, vc, rec.detected_side)
    if warnings:
        rec.notes = [n for n in rec.notes if "but the side given" not in n]  # said once, as a warning
    rec.warnings = list(rec.warnings) + warnings
