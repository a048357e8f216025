"""Quality report of one reconstruction: does each reconstructed bone agree with the input X-rays
and is it plausible, and so can it be used as it is (`ok`) or should a person look (`review`)?

Per bone:
- outline agreement per view: the bone's silhouette projected with the view's own geometry
  (overlay.splat_silhouette, as the outlines in overlay.png), blurred, and the gradients of that
  compared with the image's gradients around the outline: a normalised gradient correlation
  (1: every outline pixel lies on an image edge of the same direction; 0: no relation). The same
  correlation for the outline moved by up to `max_shift_mm` gives the shift at which it fits best
  (a displaced bone fits better elsewhere);
- the network's confidence: the mean margin between the two most probable classes (softmax of
  its class scores) on the surface voxels of the bone in its raw output (where it is unsure, the
  margin is small), when the network's runtime gives the scores;
- size: volume in ml and mean cross-section (volume per height of the bone in the field, cm^2,
  which depends less on how much shaft the image shows) against the ranges of adult knees (the
  calibration knees' range, widened: a sanity check);
- pieces: connected components of the network's raw output for the bone and the share of its
  voxels outside the largest (the label map keeps only the largest);
- shape against the image (for bones a little too thin or too short, whose outline still lies
  mostly on image edges): the outline agreement of the silhouette grown and shrunk by `width_mm`
  (a too-thin bone fits better grown), the agreement on the bone's two end regions alone (a
  too-short bone's end lies where the image has no edge), and the network's margin over the
  whole bone, not only its surface;
- with `--quality thorough` only: the Dice between this reconstruction and a second network pass
  on the images intensity-perturbed and the grid moved by whole voxels (an unstable bone is a
  doubtful one).
The verdict combines fixed-bound rules (a missing, displaced or fragmented bone, a size outside
adult ranges, an outline on no edge at all) with a per-bone logistic score of the numbers above
(the probability that the bone's Dice is below 0.8), both fitted per model by
scripts/calibrate_quality.py and stored beside the model file (`<model stem>.quality.json`,
`load_config`); README, "Quality report"."""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import SimpleITK as sitk

from ..core import ndfilters

from ..core.geometry import ReconGrid, ViewGeometry
from ..core.labels import BONES
from ..io.preprocessing import normalize_intensity
from ..io.xray_io import XRay
from .overlay import splat_silhouette

VIEW_NAMES = {"ap": "AP", "lateral": "lateral"}


# Defaults: `python scripts/calibrate_quality.py fit` on 107 reconstructions of knees from LLP26
# training subjects and procedural phantoms (+ 108 with one bone moved); README "Quality report".
# A bound of -1 / 2.0 / 0.0 / 1.0 is a test that is off.
def _default_min_outline() -> dict:
    # bone -> minimum outline agreement (AP, lateral)
    return {"femur": (0.649, 0.641), "patella": (0.226, 0.291), "tibia": (0.493, 0.493), "fibula": (0.558, 0.102)}


def _default_gain() -> dict:
    # bone -> (AP, lateral) gain in agreement at a best shift beyond max_offset_mm that marks a displaced outline
    return {"femur": (2.0, 0.073), "patella": (2.0, 0.165), "tibia": (2.0, 2.0), "fibula": (0.102, 2.0)}


def _default_margin() -> dict:
    # bone -> minimum mean class-probability margin on its surface
    return {"femur": 0.285, "patella": 0.496, "tibia": 0.144, "fibula": 0.475}


def _default_fragments() -> dict:
    # bone -> largest share of the network's raw output for it outside its largest piece (a sanity bound)
    return {"femur": 0.5, "patella": 0.5, "tibia": 0.5, "fibula": 0.5}


def _default_cross_section() -> dict:
    # bone -> range of the mean cross-section in cm^2 (volume / height of the bone in the field)
    return {"femur": (5.88, 50.84), "patella": (1.62, 13.82), "tibia": (5.41, 58.33), "fibula": (0.71, 6.4)}


def _default_volume() -> dict:
    # bone -> range of the volume in ml within a knee field of view (the patella is whole)
    return {"femur": (47.1, 433.0), "patella": (4.5, 62.8), "tibia": (38.8, 564.5), "fibula": (5.3, 53.2)}


@dataclass
class QualityConfig:
    """Thresholds of the quality report (defaults: calibrated, README "Quality report")."""

    pixel_mm: float = 1.0  # the images are compared at this pixel size at the isocentre
    sigma_mm: float = 1.0  # blur of image and outline before the gradients
    border_mm: float = 3.0  # outline pixels this close to the image border are not compared
    max_shift_mm: float = 6.0  # search range of the best-fitting outline shift
    min_outline: dict = field(default_factory=_default_min_outline)
    max_offset_mm: float = 2.0  # an outline fitting best this far away is displaced ...
    min_offset_gain: dict = field(default_factory=_default_gain)  # ... if it fits this much better there (AP, lateral)
    min_margin: dict = field(default_factory=_default_margin)  # mean top-2 class probability margin on the surface (0-1)
    max_fragment_fraction: dict = field(default_factory=_default_fragments)  # share of the raw output outside the largest piece
    min_piece_ml: float = 0.2  # smaller raw pieces are not counted as components
    cross_section_cm2: dict = field(default_factory=_default_cross_section)
    volume_ml: dict = field(default_factory=_default_volume)
    width_mm: float = 2.0  # the silhouette grown and shrunk by this much for the width test
    end_fraction: float = 0.2  # share of the bone's projected height at each end for the end test
    # bone -> logistic score model {"features", "mean", "scale", "coef", "intercept", "cutoff"}
    # (score_features' names; None: no score, the rules alone), one for the default report and
    # one with the consistency pass (`thorough`)
    score: dict | None = None
    score_thorough: dict | None = None
    perturb_gamma: float = 0.8  # thorough: the second pass's images normalised and raised to this power ...
    perturb_shift_voxels: int = 2  # ... and its grid moved by this many voxels along x, y and z
    fitted_for: dict | None = None  # the model file these values were fitted for (name, version, sha256)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "QualityConfig":
        """A config from `to_dict`'s output (JSON: tuples come back as lists); unknown keys are refused."""
        names = {f.name for f in fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown quality settings: {', '.join(sorted(unknown))}")
        out = dict(values)
        for k in ("min_outline", "min_offset_gain", "cross_section_cm2", "volume_ml"):
            if k in out:
                out[k] = {b: tuple(v) for b, v in out[k].items()}
        return cls(**out)


THRESHOLDS_SUFFIX = ".quality.json"


def thresholds_path(model_path: str) -> str:
    """Where a model's fitted quality settings live: beside it, `<model stem>.quality.json`
    (as its OpenVINO IR, `<model stem>.openvino.xml`), so that they travel with the model."""
    return os.path.splitext(model_path)[0] + THRESHOLDS_SUFFIX


def write_thresholds(path: str, config: QualityConfig, model: dict, calibration: dict | None = None) -> None:
    """Write fitted settings for the model described by `model` (name, version, sha256, file)."""
    with open(path, "w") as f:
        json.dump({"format": 1, "model": model, "config": config.to_dict(), "calibration": calibration or {}}, f, indent=1)
        f.write("\n")


def load_config(model_path: str, sha256: str | None = None) -> tuple[QualityConfig, dict]:
    """(settings, where they came from) for a model file. The file beside the model is used when
    it exists, and said to be fitted for this model when its SHA-256 matches (`sha256`: the
    model's, when the caller has it already); a file fitted for another model file is still used
    (a fine-tuned model is closer to its predecessor than to the code's defaults) with a note;
    without a readable file, the code's defaults (rules only, fitted for model 0.4.0) with a note."""
    path = thresholds_path(model_path)
    info = {"file": os.path.basename(path), "fitted_for_this_model": False}
    if not os.path.isfile(path):
        info["note"] = (f"the quality thresholds were not fitted for this model (no {info['file']} beside it): "
                        "the defaults in code (fitted for model 0.4.0, without the combined score) are used")
        return QualityConfig(), info
    try:
        with open(path) as f:
            data = json.load(f)
        cfg = QualityConfig.from_dict(data["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        info["note"] = (f"the quality thresholds in {info['file']} could not be read ({type(e).__name__}: {e}); "
                        "the defaults in code are used")
        return QualityConfig(), info
    fitted = data.get("model") or {}
    info["fitted_for"] = {k: fitted.get(k) for k in ("name", "version", "sha256")}
    if sha256 is None:
        from ..models.openvino_backend import file_sha256

        sha256 = file_sha256(model_path)
    info["fitted_for_this_model"] = fitted.get("sha256") == sha256
    if not info["fitted_for_this_model"]:
        info["note"] = (f"the quality thresholds in {info['file']} were fitted for another model file "
                        f"({fitted.get('name')} {fitted.get('version')}); they are used, but rerun "
                        "scripts/calibrate_quality.py all --model for this one")
    return cfg, info


# the numbers the combined score reads (score_features), in words for its reasons; the reason says
# whether the value was low or high against the calibration knees
FEATURE_WORDS = {
    "agreement_ap": "its outline's fit to the AP image", "agreement_lateral": "its outline's fit to the lateral image",
    "ends_ap": "the fit of its ends to the AP image", "ends_lateral": "the fit of its ends to the lateral image",
    "grow_ap": "the fit gained by a wider outline on the AP image",
    "grow_lateral": "the fit gained by a wider outline on the lateral image",
    "shrink_ap": "the fit gained by a narrower outline on the AP image",
    "shrink_lateral": "the fit gained by a narrower outline on the lateral image",
    "margin": "the network's margin at its surface", "interior_margin": "the network's margin over the whole bone",
    "log_cross_section": "its mean cross-section", "consistency": "its agreement with a perturbed second pass"}


def score_features(m: dict) -> dict:
    """The combined score's inputs from one bone's measurements (None: not measured)."""
    f = {}
    for v in ("ap", "lateral"):
        o = (m.get("outline") or {}).get(v)
        f[f"agreement_{v}"] = o["agreement"] if o else None
        for k in ("ends", "grow", "shrink"):
            f[f"{k}_{v}"] = o.get(k) if o else None
    f["margin"] = m.get("confidence_margin")
    f["interior_margin"] = m.get("interior_margin")
    cs = m.get("cross_section_cm2")
    f["log_cross_section"] = math.log(cs) if cs else None
    f["consistency"] = m.get("consistency_dice")
    return f


def score(model: dict, m: dict) -> tuple[float, list[str]]:
    """(probability that the bone's Dice is below 0.8, in words the two numbers that raise it
    most, e.g. "the network's margin at its surface (low)") by one bone's logistic model; a
    number not measured counts as its calibration mean."""
    f = score_features(m)
    z = model["intercept"]
    parts = []
    for name, mu, sd, c in zip(model["features"], model["mean"], model["scale"], model["coef"]):
        v = f.get(name)
        t = 0.0 if v is None else c * (v - mu) / sd
        z += t
        parts.append((t, f"{FEATURE_WORDS.get(name, name)} ({'low' if v is not None and v < mu else 'high'})"))
    p = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))
    return p, [w for t, w in sorted(parts, reverse=True)[:2] if t > 0]


def _check_view(view: ViewGeometry, pixel_mm: float) -> tuple[ViewGeometry, float]:
    """A coarser view with the same field (centred, same geometry) and its pixel size factor."""
    f = max(1.0, pixel_mm / min(view.iso_spacing))
    w, h = max(8, int(round(view.width / f))), max(8, int(round(view.height / f)))
    sp = (view.spacing[0] * view.width / w, view.spacing[1] * view.height / h)
    return ViewGeometry(view.view, w, h, sp, view.sid, view.sod, view.side), f


def _resample_image(pixels: np.ndarray, view: ViewGeometry, small: ViewGeometry) -> np.ndarray:
    """The image at `small`'s pixel centres (anti-aliased, bilinear)."""
    a = normalize_intensity(pixels)
    fc, fr = small.spacing[0] / view.spacing[0], small.spacing[1] / view.spacing[1]
    if max(fc, fr) > 1.2:
        a = ndfilters.gaussian_filter(a, (0.4 * fr, 0.4 * fc))
    c = (np.arange(small.width) - (small.width - 1) / 2.0) * fc + (view.width - 1) / 2.0
    r = (np.arange(small.height) - (small.height - 1) / 2.0) * fr + (view.height - 1) / 2.0
    return ndfilters.sample_bilinear(a, r, c, mode="nearest")


def _correlate_valid(a: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """sum_p a[p + s] * b[p] for the shifts s in [0, 2k]^2 (a is b's shape plus 2k each way): the
    'valid' part of scipy.signal.correlate, by FFT (circular, which here never wraps)."""
    fa = np.fft.rfft2(a)
    fb = np.fft.rfft2(b, s=a.shape)
    return np.fft.irfft2(fa * np.conj(fb), s=a.shape)[: 2 * k + 1, : 2 * k + 1]


def outline_agreement(image_grad: tuple[np.ndarray, np.ndarray], silhouette: np.ndarray, sigma_px: float,
                      border_px: int, max_shift_px: int, edges: tuple | None = None) -> dict | None:
    """Normalised gradient correlation between an image and a bone's blurred silhouette, around
    the silhouette's outline, at zero shift and at the best shift within `max_shift_px`.
    `image_grad`: (d/drow, d/dcol) of the blurred image; `edges`: the silhouette's `_edge_band`,
    where the caller has it. None where the outline is not in view."""
    if silhouette is None or not silhouette.any():
        return None
    gm, band = edges if edges is not None else _edge_band(silhouette, sigma_px, border_px)
    if band.sum() < 10:
        return None
    gm = [g * band for g in gm]
    (r0, r1), (c0, c1) = [(int(ix.min()), int(ix.max()) + 1) for ix in np.nonzero(band)]
    k = max_shift_px
    H, W = silhouette.shape
    # the image's gradients over the band's box widened by the shift range (zeros outside the image)
    def window(a):
        out = np.zeros((r1 - r0 + 2 * k, c1 - c0 + 2 * k), np.float32)
        rs, cs = max(0, r0 - k), max(0, c0 - k)
        re, ce = min(H, r1 + k), min(W, c1 + k)
        out[rs - (r0 - k):re - (r0 - k), cs - (c0 - k):ce - (c0 - k)] = a[rs:re, cs:ce]
        return out
    gi = [window(g) for g in image_grad]
    gmc = [g[r0:r1, c0:c1] for g in gm]
    w = band[r0:r1, c0:c1].astype(np.float32)
    num = sum(_correlate_valid(a, b, k) for a, b in zip(gi, gmc))
    den_i = _correlate_valid(gi[0] ** 2 + gi[1] ** 2, w, k)
    den_m = float(sum((b ** 2).sum() for b in gmc))
    ncc = num / np.sqrt(np.maximum(den_i, 1e-12) * max(den_m, 1e-12))
    best = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    return {"agreement": float(ncc[k, k]), "best_agreement": float(ncc[best]),
            "best_shift_px": (int(best[1]) - k, int(best[0]) - k)}  # (col, row) the outline fits best moved by


def _edge_band(silhouette: np.ndarray, sigma_px: float, border_px: int):
    """(gradients of the blurred silhouette, its outline band: where that gradient is at least a
    tenth of its largest, away from the image border)."""
    gm = np.gradient(ndfilters.gaussian_filter(silhouette.astype(np.float32), sigma_px))
    mag = np.hypot(*gm)
    band = mag > 0.1 * mag.max() if mag.max() > 0 else np.zeros(mag.shape, bool)
    if border_px:
        band[:border_px], band[-border_px:], band[:, :border_px], band[:, -border_px:] = False, False, False, False
    return gm, band


def _ncc(gi, gm, band: np.ndarray) -> float | None:
    """Normalised gradient correlation at zero shift over `band` (as outline_agreement's); None
    under 10 pixels."""
    if band.sum() < 10:
        return None
    a0, a1, b0, b1 = gi[0][band], gi[1][band], gm[0][band], gm[1][band]
    den = math.sqrt(max(float((a0 * a0 + a1 * a1).sum()), 1e-12) * max(float((b0 * b0 + b1 * b1).sum()), 1e-12))
    return float((a0 * b0 + a1 * b1).sum()) / den


def _sample_points(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """image at the points (rows[i], cols[i]), bilinear, the edge values continued outside."""
    h, w = image.shape
    r = np.clip(rows, 0, h - 1)
    c = np.clip(cols, 0, w - 1)
    r0, c0 = np.minimum(r.astype(int), h - 2), np.minimum(c.astype(int), w - 2)
    fr, fc = r - r0, c - c0
    top = image[r0, c0] * (1 - fc) + image[r0, c0 + 1] * fc
    bottom = image[r0 + 1, c0] * (1 - fc) + image[r0 + 1, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr


def outline_shape(image_grad: tuple[np.ndarray, np.ndarray], silhouette: np.ndarray, edges: tuple,
                  width_px: float, end_fraction: float) -> dict:
    """What the outline agreement at zero shift misses in a bone a little too thin or too short:
    `grow` / `shrink`: the agreement of the outline moved `width_px` outward / inward along its
    own normal, minus the agreement where it is (positive: the image's edges lie outside /
    inside the outline: the bone is too thin / too thick; the image gradients sampled at the
    moved outline, no second blur); `ends`: the lower of the agreements on the top and bottom
    `end_fraction` of the silhouette's rows (a bone ending short of the image's bone ends there
    on no edge). `edges`: the silhouette's `_edge_band`."""
    gm, band = edges
    out = {"ends": None, "grow": None, "shrink": None}
    base = _ncc(image_grad, gm, band)
    if base is None:
        return out
    r, c = np.nonzero(band)
    b0, b1 = gm[0][r, c], gm[1][r, c]
    norm = np.maximum(np.hypot(b0, b1), 1e-12)
    n0, n1 = b0 / norm, b1 / norm  # the inward normal (the blurred silhouette rises inward)
    den_m = float((b0 * b0 + b1 * b1).sum())
    for key, sign in (("grow", -1.0), ("shrink", 1.0)):
        rr, cc = r + sign * width_px * n0, c + sign * width_px * n1
        a0, a1 = (_sample_points(g, rr, cc) for g in image_grad)
        den = np.sqrt(max(float((a0 * a0 + a1 * a1).sum()), 1e-12) * max(den_m, 1e-12))
        out[key] = round(float((a0 * b0 + a1 * b1).sum()) / float(den) - base, 4)
    rows = np.nonzero(silhouette.any(axis=1))[0]
    span = max(1.0, (rows[-1] - rows[0]) * end_fraction)
    rr = np.arange(silhouette.shape[0])[:, None]
    ends = [_ncc(image_grad, gm, band & sel) for sel in (rr <= rows[0] + span, rr >= rows[-1] - span)]
    ends = [e for e in ends if e is not None]
    out["ends"] = round(min(ends), 4) if ends else None
    return out


def interior_margin(scores: np.ndarray, box: tuple, mask: np.ndarray, stride: int = 2) -> float:
    """Mean top-2 class-probability margin over the whole bone (every `stride`-th voxel per axis,
    enough for a mean at a fraction of the cost): the surface margin's complement for a bone the
    network is unsure of inside, e.g. a thin fibula."""
    sub = tuple(slice(s.start, s.stop, stride) for s in box)
    m = mask[::stride, ::stride, ::stride]
    if not m.any():
        m = mask
        sub = box
    s = np.asarray(scores[(slice(None), *sub)])[:, m].astype(np.float32)
    p = np.exp(s - s.max(axis=0))
    p /= p.sum(axis=0)
    top = np.sort(p, axis=0)
    return float((top[-1] - top[-2]).mean())


def margin_map(scores: np.ndarray) -> np.ndarray:
    """Top-2 class-probability margin of every voxel (float16), for the calibration's cache:
    `measure` accepts it in place of the scores."""
    out = np.empty(scores.shape[1:], np.float16)
    for z in range(0, scores.shape[1], 16):  # in slabs: the softmax of all voxels at once is 5 x the scores
        s = np.asarray(scores[:, z:z + 16], np.float32)
        p = np.exp(s - s.max(axis=0))
        p /= p.sum(axis=0)
        top = np.sort(p, axis=0)
        out[z:z + 16] = top[-1] - top[-2]
    return out


def consistency(raw: np.ndarray, raw2: np.ndarray, shift: int) -> dict:
    """Per bone, the Dice between the network's labels `raw` and those of a second pass on a grid
    moved by `shift` voxels along every axis (`raw2`, brought back onto `raw`'s voxels), on the
    voxels both passes saw."""
    a = raw[shift:, shift:, shift:] if shift else raw
    b = raw2[:raw2.shape[0] - shift, :raw2.shape[1] - shift, :raw2.shape[2] - shift] if shift else raw2
    out = {}
    for bone in BONES:
        x, y = a == bone.value, b == bone.value
        n = int(x.sum()) + int(y.sum())
        out[bone.name] = round(2.0 * int((x & y).sum()) / n, 4) if n else None
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of a mask with a 6-neighbour outside it (the box's faces count as outside)."""
    return mask & ~ndfilters.binary_erosion(mask, border_value=False)


def bone_pieces(mask: np.ndarray, min_voxels: float) -> tuple[int, float]:
    """(components of at least `min_voxels` voxels, share of the voxels outside the largest) of
    one bone's mask in the network's raw output (6-connected, as clean_labels)."""
    n_all = int(mask.sum())
    if not n_all:
        return 0, 0.0
    lab = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    sizes = np.bincount(lab.ravel())[1:]
    return max(int((sizes >= min_voxels).sum()), 1), float(1.0 - sizes.max() / n_all)


def surface_margin(scores: np.ndarray, box: tuple, mask: np.ndarray) -> float:
    """Mean margin between the two most probable classes (softmax of `scores` [K, z, y, x], logits
    or log-probabilities) on the surface voxels of `mask`, the bone inside `box` of the grid."""
    s = np.asarray(scores[(slice(None), *box)])[:, _surface(mask)].astype(np.float32)
    p = np.exp(s - s.max(axis=0))
    p /= p.sum(axis=0)
    top = np.sort(p, axis=0)
    return float((top[-1] - top[-2]).mean())


def measure(labels: np.ndarray, grid: ReconGrid, ap: XRay, lateral: XRay, lateral_offset_mm: float = 0.0,
            raw: np.ndarray | None = None, raw_grid: ReconGrid | None = None, scores: np.ndarray | None = None,
            config: QualityConfig | None = None, margin: np.ndarray | None = None) -> dict:
    """The quality measurements per bone (no verdict): see the module docstring. `labels`: the
    cleaned label map on `grid`; `raw` (on `raw_grid`): the network's own labels; `scores`: its
    class scores [K, z, y, x] on `raw_grid` (logits or log-probabilities), None when not available;
    `margin`: instead of the scores, their top-2 margin per voxel (margin_map)."""
    cfg = config or QualityConfig()
    out = {b.name: {"outline": {}} for b in BONES}
    voxel_ml = float(np.prod(grid.spacing)) / 1000.0
    dz = grid.spacing[2]
    for b in BONES:
        m = labels == b.value
        n = int(m.sum())
        row = out[b.name]
        row["volume_ml"] = round(n * voxel_ml, 3)
        rows = np.nonzero(m.any(axis=(1, 2)))[0]
        row["cross_section_cm2"] = round(n * voxel_ml / (len(rows) * dz / 10.0), 3) if len(rows) else None
    # each bone's boundary voxels, found once (one search of the label map) for both views
    found = ndfilters.bounding_boxes(labels, max(b.value for b in BONES))
    points = {}
    for b in BONES:
        box = found[b.value - 1]
        if box is not None:
            sub = labels[box] == b.value
            k, j, i = (a + s.start for a, s in zip(np.nonzero(_surface(sub)), box))
            points[b.name] = (grid.origin[0] + i * grid.spacing[0], grid.origin[1] + j * grid.spacing[1],
                              grid.origin[2] + k * grid.spacing[2])
    for x, off in ((ap, 0.0), (lateral, lateral_offset_mm)):
        small, _ = _check_view(x.geometry, cfg.pixel_mm)
        img = _resample_image(x.pixels, x.geometry, small)
        px_mm = small.iso_spacing[0]
        sigma_px = cfg.sigma_mm / px_mm
        g = np.gradient(ndfilters.gaussian_filter(img, sigma_px))
        k = max(1, int(round(cfg.max_shift_mm / px_mm)))
        border = int(np.ceil(cfg.border_mm / px_mm))
        width = cfg.width_mm / px_mm
        for b in BONES:
            sil = splat_silhouette(points[b.name], grid, small, off) if b.name in points else None
            edges = _edge_band(sil, sigma_px, border) if sil is not None and sil.any() else None
            res = outline_agreement(g, sil, sigma_px, border, k, edges)
            if res is not None:
                sc, sr = res.pop("best_shift_px")
                res["best_shift_mm"] = [round(sc * small.iso_spacing[0], 2), round(sr * small.iso_spacing[1], 2)]
                res = {k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in res.items()}
                res.update(outline_shape(g, sil, edges, width, cfg.end_fraction))
            out[b.name]["outline"][x.geometry.view] = res
    if raw is not None:
        rv = float(np.prod((raw_grid or grid).spacing)) / 1000.0
        raw_boxes = ndfilters.bounding_boxes(raw, max(b.value for b in BONES))
    for b in BONES:
        out[b.name]["confidence_margin"] = out[b.name]["interior_margin"] = None
        if raw is None:
            continue
        box = raw_boxes[b.value - 1]
        if box is None:
            out[b.name].update(components=0, fragment_fraction=0.0)
            continue
        sub = raw[box] == b.value
        n, frac = bone_pieces(sub, cfg.min_piece_ml / rv)
        out[b.name].update(components=n, fragment_fraction=round(frac, 4))
        if scores is not None:
            out[b.name]["confidence_margin"] = round(surface_margin(scores, box, sub), 4)
            out[b.name]["interior_margin"] = round(interior_margin(scores, box, sub), 4)
        elif margin is not None:
            mb = np.asarray(margin[box], np.float32)
            out[b.name]["confidence_margin"] = round(float(mb[_surface(sub)].mean()), 4)
            out[b.name]["interior_margin"] = round(float(mb[::2, ::2, ::2][sub[::2, ::2, ::2]].mean()
                                                         if sub[::2, ::2, ::2].any() else mb[sub].mean()), 4)
    return out


def _fmt(v: float) -> str:
    return f"{v:.2f}"


def judge(measured: dict, config: QualityConfig | None = None) -> dict:
    """Verdicts from `measure`'s numbers: per bone and overall `ok` or `review`, with the reasons
    in words."""
    cfg = config or QualityConfig()
    bones, reasons = {}, []
    for b in BONES:
        m = measured[b.name]
        why = []
        if not m["volume_ml"]:
            why.append("not found in the reconstruction")
        else:
            lo, hi = cfg.volume_ml[b.name]
            if not lo <= m["volume_ml"] <= hi:
                why.append(f"its volume {m['volume_ml']:.1f} ml is outside the expected range {lo:g}-{hi:g} ml")
            cs = m.get("cross_section_cm2")
            lo, hi = cfg.cross_section_cm2[b.name]
            if cs is not None and not lo <= cs <= hi:
                why.append(f"its mean cross-section {cs:.1f} cm^2 is outside the expected range {lo:g}-{hi:g} cm^2")
            for i, v in enumerate(("ap", "lateral")):
                o = m["outline"].get(v)
                if o is None:
                    continue
                if o["agreement"] < cfg.min_outline[b.name][i]:
                    why.append(f"its projected outline does not match the {VIEW_NAMES[v]} image (agreement "
                               f"{_fmt(o['agreement'])}, expected at least {_fmt(cfg.min_outline[b.name][i])})")
                elif np.hypot(*o["best_shift_mm"]) > cfg.max_offset_mm and \
                        o["best_agreement"] - o["agreement"] >= cfg.min_offset_gain[b.name][i]:
                    why.append(f"its projected outline fits the {VIEW_NAMES[v]} image better "
                               f"{np.hypot(*o['best_shift_mm']):.1f} mm away")
            if m.get("fragment_fraction", 0.0) > cfg.max_fragment_fraction[b.name]:
                why.append(f"the network gave it in {m['components']} pieces ({m['fragment_fraction']:.0%} of it outside "
                           "the largest, which was kept)")
            if m.get("confidence_margin") is not None and m["confidence_margin"] < cfg.min_margin[b.name]:
                why.append(f"the network is unsure at its surface (mean class-probability margin "
                           f"{_fmt(m['confidence_margin'])}, expected at least {_fmt(cfg.min_margin[b.name])})")
        row = dict(m)
        model = _score_model(cfg, b.name, m)
        if m["volume_ml"] and model is not None:
            p, top = score(model, m)
            row["score"] = round(p, 3)
            if p >= model["cutoff"]:
                why.append(f"the combined check puts it among poor reconstructions (score {p:.2f}, review from "
                           f"{model['cutoff']:.2f}; mostly {' and '.join(top) or 'all together'})")
        bones[b.name] = {**row, "verdict": "review" if why else "ok", "reasons": why}
        reasons += [f"{b.name}: {w}" for w in why]
    return {"verdict": "review" if reasons else "ok", "reasons": reasons, "bones": bones}


def _score_model(cfg: QualityConfig, bone: str, m: dict) -> dict | None:
    """The bone's score model: the thorough one where the consistency pass was run and one is fitted."""
    if m.get("consistency_dice") is not None and cfg.score_thorough and bone in cfg.score_thorough:
        return cfg.score_thorough[bone]
    return (cfg.score or {}).get(bone)


def assess(labels: np.ndarray, grid: ReconGrid, ap: XRay, lateral: XRay, lateral_offset_mm: float = 0.0,
           raw: np.ndarray | None = None, raw_grid: ReconGrid | None = None, scores: np.ndarray | None = None,
           config: QualityConfig | None = None, margin: np.ndarray | None = None,
           consistency_dice: dict | None = None) -> dict:
    """The quality report of one reconstruction (`measure`, then `judge`), with its run time.
    `consistency_dice`: per bone, the Dice against the perturbed second pass (`consistency`),
    where it was run."""
    t0 = time.perf_counter()
    m = measure(labels, grid, ap, lateral, lateral_offset_mm, raw, raw_grid, scores, config, margin)
    for bone, d in (consistency_dice or {}).items():
        m[bone]["consistency_dice"] = d
    q = judge(m, config)
    q["time_s"] = round(time.perf_counter() - t0, 4)
    return q


def summary_line(quality: dict) -> str:
    """One line for a console or a status bar: 'quality: ok' or 'quality: review - reason; reason'."""
    if not quality or "verdict" not in quality:
        return "quality: not assessed"
    if quality.get("verdict") == "ok":
        return "quality: ok (every bone agrees with both X-rays and is plausible)"
    return "quality: REVIEW - " + "; ".join(quality.get("reasons", []))
