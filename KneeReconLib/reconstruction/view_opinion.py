"""The view check's second opinion: does the pair reconstruct better as given or swapped?

The view classifier (io/view_check.py) scores nearly straight knees' laterals AP-like, so on
those its swap score is ambiguous. The network itself does not depend on flexion: a pair
reconstructed the right way round gives bones whose projected outlines lie on both images' edges
(quality.py's outline agreement); given the wrong way round, the network sees an AP where it
expects a lateral and returns bones that fit badly, typically with no patella. So in the
ambiguous band (`view_check.OPINION_BAND`) the pair is also reconstructed swapped (one extra
network pass, no surfaces) and refused when the swapped reconstruction agrees with the images
much better than the as-given one. Correct pairs of the bundled sample are outside the band and
pay nothing. Thresholds: `SwapOpinionConfig`, chosen by `scripts/fit_view_check.py band` on
training-subject data (README, "Input checks")."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..core.labels import BONES
from ..io.view_check import SwappedViewsError, ViewCheck
from ..io.xray_io import XRay

SLOTS = [(b.name, v) for b in BONES for v in ("ap", "lateral")]  # the 8 (bone, view) outline agreements
# the slots that carry the evidence: not the femur's, whose large outline fits either way round about
# equally (on training pairs it fit slightly better swapped); `fit_view_check.py band` compares the choices
EVIDENCE = np.array([bone != "femur" for bone, _ in SLOTS])


@dataclass(frozen=True)
class SwapOpinionConfig:
    """When the second opinion calls a pair swapped."""

    # refused when the swapped reconstruction's mean outline agreement beats the as-given one's
    # by more than this (0-1 scale; a bone not reconstructed counts 0): twice the largest gain of
    # a correct training pair (0.041; the next largest is -0.097), `fit_view_check.py band`
    min_gain: float = 0.08


def swap_views(ap: XRay, lateral: XRay) -> tuple[XRay, XRay]:
    """The pair the other way round: the --lateral image read as the AP view and vice versa
    (pixels, spacing and beam kept; only the view each is taken as changes)."""
    return (XRay(lateral.pixels, replace(lateral.geometry, view="ap"), lateral.info),
            XRay(ap.pixels, replace(ap.geometry, view="lateral"), ap.info))


def outline_features(quality_report: dict) -> np.ndarray:
    """The 8 outline agreements (bone x view, `SLOTS` order) of a quality report; NaN where a
    bone is not reconstructed or its outline is not in view."""
    bones = quality_report.get("bones", {})
    out = []
    for bone, view in SLOTS:
        o = bones.get(bone, {}).get("outline", {}).get(view)
        out.append(np.nan if o is None else float(o["agreement"]))
    return np.array(out, np.float64)


def agreement_score(features: np.ndarray, slots: np.ndarray = EVIDENCE) -> float:
    """Mean outline agreement over the evidence slots (patella, tibia, fibula in both views); a
    missing bone or outline counts 0 (a swapped pair's reconstruction typically has no patella:
    that is evidence, not a gap)."""
    return float(np.nan_to_num(np.asarray(features, np.float64)[slots], nan=0.0).mean())


def swap_gain(given: np.ndarray, swapped: np.ndarray, slots: np.ndarray = EVIDENCE) -> float:
    """How much better the swapped reconstruction agrees with the images than the as-given one
    (positive: the pair looks swapped). Antisymmetric: the pair given the other way round gets
    exactly the opposite gain."""
    return agreement_score(swapped, slots) - agreement_score(given, slots)


def reconstruct_swapped_features(reconstructor, ap: XRay, lateral: XRay, side: str) -> np.ndarray:
    """Outline features of the pair reconstructed swapped (one network pass, no surfaces; without
    mirror TTA, whose quality report judges the unmirrored pass anyway)."""
    sap, slat = swap_views(ap, lateral)
    return outline_features(reconstructor.run(sap, slat, side, surfaces=False, tta=False).quality)


def confirm_views(reconstructor, vc: ViewCheck | None, given, config: SwapOpinionConfig | None = None) -> dict | None:
    """Where the view classifier was ambiguous (`vc.ambiguous`), reconstruct the pair swapped and
    compare with `given` (the as-given Reconstruction): SwappedViewsError (exit 2) when the swapped
    one agrees much better with the images. Records the opinion in `vc.second_opinion` and
    returns it (None when the band was not hit)."""
    if vc is None or not vc.ambiguous:
        return None
    cfg = config or SwapOpinionConfig()
    f_given = outline_features(given.quality)
    f_swapped = reconstruct_swapped_features(reconstructor, given.ap, given.lateral, given.side)
    gain = swap_gain(f_given, f_swapped)
    vc.second_opinion = {"as_given_agreement": round(agreement_score(f_given), 4),
                         "swapped_agreement": round(agreement_score(f_swapped), 4),
                         "swap_gain": round(gain, 4), "min_gain": cfg.min_gain, "looks_swapped": gain > cfg.min_gain}
    if gain > cfg.min_gain:
        vc.looks_swapped = True
        a_swapped, a_given = agreement_score(f_swapped), agreement_score(f_given)
        raise SwappedViewsError(f" (reconstructed the other way round, the bones fit the images better: outline "
                                f"agreement {a_swapped:.2f} against {a_given:.2f} as given)")
    return vc.second_opinion
