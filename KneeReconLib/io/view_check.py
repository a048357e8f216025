"""Checks of the input pair before reconstructing: the same picture given twice, an AP and a
lateral image given the wrong way round, and a declared side the AP image contradicts.

Swapped or duplicated views used to reconstruct silently into wrong bones (exit 0, "done"). The
checks here look at image content only:

- identical inputs: the same file, or the same pixels (after the intensity normalisation, so a
  re-encoded copy counts too);
- view: two linear classifiers on a small canonical picture of each image (5 mm pixels, 160 mm
  field at the isocentre, robust intensity range). The view classifier sees features that do not
  change when the picture is mirrored (the mean of the picture and its mirror image, and their
  absolute difference), so it does not depend on the side; the side classifier sees the
  antisymmetric part only and has no bias, so mirroring an AP image turns its verdict exactly
  around. Both are fitted by `scripts/fit_view_check.py` on DRRs and simulated radiographs of
  LLP26 training subjects and procedural phantoms only (Resources/Models/kneerecon_views.npz),
  and measured on held-out subjects (README, "Input checks").

A pair is refused as swapped when the --lateral image scores as more AP-like than the --ap image
by a margin: the two images are compared with each other, which is far more reliable than
classifying either alone (a lateral view is a lateral view by a wide margin; an unusual AP view
may score near zero). Where that swap score is ambiguous (OPINION_BAND: nearly straight knees'
laterals score AP-like), the reconstruction decides: reconstruction/view_opinion.py reconstructs
the pair swapped too and refuses it when that fits the images much better."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..core import ndfilters
from ..core.errors import KneeReconError
from . import resources
from .preprocessing import collimated_border, fill_collimation, normalize_intensity
from .xray_io import XRay

CANON_PX_MM = 5.0  # pixel of the canonical picture, at the isocentre
CANON_SIZE = 32  # 32 x 32 pixels: a 160 mm field, the knee joint and a hand's width of each shaft
MODEL_FILE = "kneerecon_views.npz"
# a pair is swapped when the --lateral image scores this much more AP-like (log-odds) than the --ap
# image; correct held-out pairs reach -1.6 at worst (README, "Input checks")
SWAP_MARGIN = 3.0
# the AP image's side score (log-odds of "left") beyond this contradicts a declared side
SIDE_MARGIN = 2.5  # held-out AP images: the wrong way by 1.8 at worst
# swap scores in this band (lateral minus AP log-odds) are ambiguous: nearly straight knees' laterals
# score AP-like, so a swapped pair of one can land here. There the reconstruction gives a second
# opinion (reconstruction/view_opinion.py: one more network pass). The lower end: the band holds
# every swapped training pair that the margin misses (the most AP-like correct training lateral:
# +2.73, so its swapped pair scores -2.73), `scripts/fit_view_check.py band` (README, "Input checks")
OPINION_BAND = (-SWAP_MARGIN, SWAP_MARGIN)
CLI_OVERRIDE = "pass --views-as-given (views_as_given=True)"


def swapped_message(override: str = CLI_OVERRIDE, detail: str = "") -> str:
    """What a refused swapped pair is told; `override`: how this front end skips the check."""
    return ("the AP and the lateral image look swapped: the --ap image looks like a lateral view and the --lateral "
            f"image like an AP view{detail}; give them the other way round, or {override} to reconstruct them as given")


class SwappedViewsError(KneeReconError):
    """The pair looks swapped (exit 2 like every KneeReconError); its own type so that a front end
    (the Slicer module) can name its own override. `detail`: the evidence, in words."""

    def __init__(self, detail: str = "", override: str = CLI_OVERRIDE):
        self.detail = detail
        super().__init__(swapped_message(override, detail))


def canonical_picture(xray: XRay) -> np.ndarray:
    """The image as the classifiers see it: collimator shadows filled, intensities on the robust
    [0, 1] range, resampled to CANON_PX_MM pixels (the geometry's isocentre spacing) and cropped or
    padded about the image centre to CANON_SIZE x CANON_SIZE (float32 [row, col])."""
    a = np.asarray(xray.pixels, np.float32)
    border = collimated_border(a)
    if any(border):
        a = fill_collimation(a, border)
    a = normalize_intensity(a)
    sx, sy = xray.geometry.iso_spacing
    # area averaging (a box of the target pixel) before sampling: fine detail and noise do not alias
    # an odd box, centred on its pixel: a mirrored image gives exactly the mirrored picture
    box = tuple(2 * int(CANON_PX_MM / s / 2) + 1 for s in (sy, sx))
    a = ndfilters.uniform_filter(a, box)
    rows = (np.arange(CANON_SIZE) - CANON_SIZE / 2 + 0.5) * CANON_PX_MM / sy + (a.shape[0] - 1) / 2
    cols = (np.arange(CANON_SIZE) - CANON_SIZE / 2 + 0.5) * CANON_PX_MM / sx + (a.shape[1] - 1) / 2
    return ndfilters.sample_bilinear(a, rows, cols, mode="constant", cval=0.0).astype(np.float32)


def view_features(pic: np.ndarray) -> np.ndarray:
    """Mirror-invariant features of a canonical picture: (P + mirror(P)) / 2 and |P - mirror(P)| / 2
    on one half of the columns (the other half repeats them)."""
    m = pic[:, ::-1]
    half = pic.shape[1] // 2
    return np.concatenate([((pic + m) / 2)[:, :half].ravel(), (np.abs(pic - m) / 2)[:, :half].ravel()])


def side_features(pic: np.ndarray) -> np.ndarray:
    """Antisymmetric features of a canonical AP picture: (P - mirror(P)) / 2 on one half of the
    columns; mirroring the picture negates them."""
    half = pic.shape[1] // 2
    return ((pic - pic[:, ::-1]) / 2)[:, :half].ravel()


@dataclass
class ViewModel:
    """Two linear classifiers: view (log-odds of AP) and side (log-odds of a left knee)."""

    view_mean: np.ndarray
    view_scale: np.ndarray
    view_w: np.ndarray
    view_b: float
    side_scale: np.ndarray
    side_w: np.ndarray
    info: dict

    def view_score(self, pic: np.ndarray) -> float:
        """Log-odds that the picture is an AP view (negative: lateral)."""
        f = (view_features(pic) - self.view_mean) / self.view_scale
        return float(f @ self.view_w + self.view_b)

    def side_score(self, pic: np.ndarray) -> float:
        """Log-odds that an AP picture shows a left knee (negative: right); no bias, so a mirrored
        picture gets exactly the opposite score."""
        return float((side_features(pic) / self.side_scale) @ self.side_w)

    def save(self, path: str) -> None:
        import json

        from .fileio import atomic_path

        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, view_mean=self.view_mean, view_scale=self.view_scale, view_w=self.view_w,
                                    view_b=np.float64(self.view_b), side_scale=self.side_scale, side_w=self.side_w,
                                    info=np.array(json.dumps(self.info)))

    @classmethod
    def load(cls, path: str) -> "ViewModel":
        import json

        try:
            with np.load(path, allow_pickle=False) as z:
                m = cls(z["view_mean"], z["view_scale"], z["view_w"], float(z["view_b"]), z["side_scale"], z["side_w"],
                        json.loads(str(z["info"])))
        except (OSError, KeyError, ValueError) as e:
            raise KneeReconError(f"the view-check model {path!r} is missing or unreadable ({e}); reinstall KneeRecon "
                                 "or pass views_as_given=True (--views-as-given) to skip the check")
        n = CANON_SIZE * (CANON_SIZE // 2)
        if m.view_w.shape != (2 * n,) or m.side_w.shape != (n,):
            raise KneeReconError(f"the view-check model {path!r} was made for another picture size")
        return m


_MODEL: ViewModel | None = None


def default_model() -> ViewModel:
    """The bundled view-check model (loaded once)."""
    global _MODEL
    if _MODEL is None:
        _MODEL = ViewModel.load(resources.model_path(MODEL_FILE))
    return _MODEL


def check_not_same(ap, lateral, ap_x: XRay, lat_x: XRay) -> None:
    """KneeReconError when both views are one file, or one picture (equal after normalisation)."""
    paths = [os.fspath(p) for p in (ap, lateral) if isinstance(p, (str, os.PathLike))]
    if len(paths) == 2:
        same = os.path.abspath(paths[0]) == os.path.abspath(paths[1])
        try:
            same = same or os.path.samefile(*paths)
        except OSError:
            pass
        if same:
            raise KneeReconError(f"the AP and the lateral image are the same file ({paths[0]!r}): give one AP and "
                                 "one lateral X-ray of the knee")
    a, b = ap_x.pixels, lat_x.pixels
    if a.shape == b.shape and np.allclose(normalize_intensity(a), normalize_intensity(b), atol=1e-3):
        raise KneeReconError("the AP and the lateral image have identical pixels: the same picture was given twice; "
                             "give one AP and one lateral X-ray of the knee")


@dataclass
class ViewCheck:
    """The checks' findings on one pair, as written to report.json's `view_check`."""

    ap_view_score: float  # log-odds that the --ap image is an AP view
    lateral_view_score: float  # log-odds that the --lateral image is an AP view
    ap_side_score: float  # log-odds that the AP image shows a left knee
    side_seen: str | None  # the side the AP image shows, where the score is past SIDE_MARGIN
    looks_swapped: bool
    second_opinion: dict | None = None  # view_opinion.confirm_views' findings, where the band was hit

    @property
    def swap_score(self) -> float:
        """How much more AP-like the --lateral image scores than the --ap image (log-odds)."""
        return self.lateral_view_score - self.ap_view_score

    @property
    def ambiguous(self) -> bool:
        """The swap score is in OPINION_BAND: the reconstruction's second opinion decides."""
        return OPINION_BAND[0] < self.swap_score <= OPINION_BAND[1] and not self.looks_swapped

    def to_dict(self) -> dict:
        d = {"ap_image_ap_logodds": round(self.ap_view_score, 2),
             "lateral_image_ap_logodds": round(self.lateral_view_score, 2),
             "ap_image_left_logodds": round(self.ap_side_score, 2), "side_seen": self.side_seen,
             "looks_swapped": self.looks_swapped}
        if self.second_opinion is not None:
            d["second_opinion"] = self.second_opinion
        return d


def assess_views(ap: XRay, lateral: XRay, model: ViewModel | None = None) -> ViewCheck:
    """Score the pair (no decision beyond the margins; see `check_views`)."""
    model = model or default_model()
    pa, pl = canonical_picture(ap), canonical_picture(lateral)
    sa, sl = model.view_score(pa), model.view_score(pl)
    swapped = sl - sa > SWAP_MARGIN  # beyond the band: refused without a second opinion
    side_pic = pl if swapped else pa  # the picture that looks like the AP
    ss = model.side_score(side_pic)
    seen = "left" if ss > SIDE_MARGIN else "right" if ss < -SIDE_MARGIN else None
    return ViewCheck(sa, sl, ss, seen, swapped)


def check_views(ap_source, lateral_source, ap: XRay, lateral: XRay, views_as_given: bool = False,
                model: ViewModel | None = None) -> ViewCheck | None:
    """Refuse (KneeReconError, exit 2) the same picture twice and, unless `views_as_given`, a pair
    that looks swapped. `*_source`: what the caller was given (paths or XRays), for the same-file
    test. Returns the findings (None when `views_as_given` skips the view classifier); where they
    are `ambiguous`, the caller asks the reconstruction for a second opinion
    (reconstruction/view_opinion.confirm_views)."""
    check_not_same(ap_source, lateral_source, ap, lateral)
    if views_as_given:
        return None
    vc = assess_views(ap, lateral, model)
    if vc.looks_swapped:
        raise SwappedViewsError()
    return vc


def side_warnings(declared: str | None, vc: ViewCheck | None, reconstructed_side: str | None) -> list[str]:
    """Warnings for a declared side that the images contradict: the AP image's side classifier, or
    the fibula of the reconstruction (it lies on the knee's lateral side)."""
    if declared is None:
        return []
    out = []
    if vc is not None and vc.side_seen and vc.side_seen != declared:
        out.append(f"side {declared} was given, but the AP image looks like a {vc.side_seen} knee (the fibula is on the "
                   f"other side): check --side and that the AP image is not mirrored (columns toward the patient's left)")
    elif reconstructed_side and reconstructed_side != declared:
        out.append(f"side {declared} was given, but the reconstructed fibula lies on a {reconstructed_side} knee's "
                   "lateral side: check --side and that the AP image is not mirrored (columns toward the patient's left)")
    return out
