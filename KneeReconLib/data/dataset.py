"""Training pairs: (AP, lateral) DRRs -> label volume on the reconstruction grid.

Sources: procedural phantoms (generated on the fly or cached as .npz), and a user's folder of
labelled CTs (NIfTI/NRRD). A case stores raw line-integral DRRs and the labels on the
reconstruction grid; `make_sample` turns a case into the network's 2-channel input with
X-ray-relevant augmentations (display curve, exposure, noise, blur, small view offsets and
in-plane shifts, left/right mirroring with consistent labels).
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import SimpleITK as sitk

from ..core.errors import KneeReconError
from ..core.geometry import ReconGrid, ViewGeometry
from ..core.labels import BY_NAME
from ..geometry.backprojection import backproject
from ..geometry.frame import to_knee_frame
from ..io.fileio import atomic_path
from ..io.preprocessing import normalize_intensity
from ..io.xray_io import XRay
from .drr import DRRConfig, render_drr
from .phantom import PhantomConfig, generate_phantom, imaging_field_mm

# seeds: training draws from [0, 900000); validation from [900000, 1000000); the test set from
# [1000000, ...). Keeping the ranges disjoint is what makes the test knees unseen.
VAL_SEED0 = 900_000
TEST_SEED0 = 1_000_000


@dataclass
class Case:
    ap: np.ndarray  # line integrals [H, W]
    lateral: np.ndarray
    ap_geom: ViewGeometry
    lat_geom: ViewGeometry
    labels: np.ndarray  # uint8 [nz, ny, nx] on ReconGrid.for_network(ap_geom, lat_geom, grid_size)
    meta: dict = field(default_factory=dict)

    def grid(self) -> ReconGrid:
        return ReconGrid.for_network(self.ap_geom, self.lat_geom, self.labels.shape)


def labels_on_grid(labels: sitk.Image, grid: ReconGrid) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto the grid, by physical coordinates."""
    out = sitk.Resample(labels, grid.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(out)


def case_from_ct(ct_knee: sitk.Image, labels_knee: sitk.Image, grid_size: int = 128,
                 drr: DRRConfig | None = None, meta: dict | None = None,
                 lateral_drr: DRRConfig | None = None) -> Case:
    """A training case from a CT and label map already in the knee frame; `lateral_drr` (default:
    `drr`) gives the lateral view its own geometry."""
    if lateral_drr is None:
        views = render_drr(ct_knee, drr)
    else:
        views = {**render_drr(ct_knee, replace(drr or DRRConfig(), views=("ap",))),
                 **render_drr(ct_knee, replace(lateral_drr, views=("lateral",)))}
    ap, ga = views["ap"]
    lat, gl = views["lateral"]
    grid = ReconGrid.for_network(ga, gl, grid_size)
    return Case(ap, lat, ga, gl, labels_on_grid(labels_knee, grid), meta or {})


@dataclass
class GeometryConfig:
    """How training radiographs are formed: beam geometry per view, field of view, detector
    pixels and the HU-to-attenuation slope (uniform ranges)."""

    cone_p: float = 0.6  # per case: cone beam (each view its own SID and magnification) vs parallel
    sid_mm: tuple[float, float] = (900.0, 1300.0)
    magnification: tuple[float, float] = (1.05, 1.3)
    iso_pixel_mm: tuple[float, float] = (0.4, 1.0)  # detector pixel at the isocentre
    collimate_p: float = 0.5  # per view: a field of view smaller than the CT
    min_fov_mm: float = 90.0  # tightest collimation (height and width)
    bone_slope: tuple[float, float] = (0.9, 1.6)

    def sample(self, ct: sitk.Image, side: str, rng: np.random.Generator,
               field_mm: tuple[float, float, float] | None = None) -> tuple[DRRConfig, DRRConfig, dict]:
        """(AP config, lateral config, what was drawn) for one knee CT; the uncollimated field is
        `field_mm` (x, y, z extents about the isocentre; a phantom's `imaging_field_mm`) or the
        CT's extent."""
        ext = np.array(field_mm if field_mm is not None else np.array(ct.GetSize()) * np.array(ct.GetSpacing()), float)
        cone = rng.random() < self.cone_p
        slope = float(rng.uniform(*self.bone_slope))
        iso_px = float(rng.uniform(*self.iso_pixel_mm))
        out, drawn = [], {"beam": "cone" if cone else "parallel", "bone_slope": slope, "iso_pixel_mm": iso_px}
        for view, wa in (("ap", 0), ("lateral", 1)):
            sid = float(rng.uniform(*self.sid_mm)) if cone else None
            sod = sid / float(rng.uniform(*self.magnification)) if cone else None
            w_mm, h_mm = ext[wa], ext[2]
            if rng.random() < self.collimate_p:
                w_mm = float(rng.uniform(min(self.min_fov_mm + 10, w_mm), w_mm))
                h_mm = float(rng.uniform(min(self.min_fov_mm, h_mm), h_mm))
            mag = sid / sod if cone else 1.0
            size = (int(round(w_mm / iso_px)), int(round(h_mm / iso_px)))
            out.append(DRRConfig(pixel_spacing=iso_px * mag, size=size, sid=sid, sod=sod, side=side, bone_slope=slope))
            drawn[view] = {"sid": sid, "sod": sod, "fov_mm": [round(w_mm, 1), round(h_mm, 1)]}
        # one height for both views (DESIGN.md's grid takes the common height)
        h = min(out[0].size[1] * out[0].pixel_spacing / (out[0].sid / out[0].sod if cone else 1.0),
                out[1].size[1] * out[1].pixel_spacing / (out[1].sid / out[1].sod if cone else 1.0))
        for i in range(2):
            m = out[i].sid / out[i].sod if cone else 1.0
            out[i] = replace(out[i], size=(out[i].size[0], int(round(h / (out[i].pixel_spacing / m)))))
        return out[0], out[1], drawn


SOURCES = ("procedural", "llp26")


def phantom_case(seed: int, grid_size: int = 128, config: PhantomConfig | None = None,
                 geometry: GeometryConfig | None = None, source: str = "procedural", llp26=None) -> Case:
    """A training case from a generated knee: `source` 'procedural' (phantom.py, `config`) or
    'llp26' (real people's bone surfaces, llp26.py, `llp26` an LLP26Config); parallel-beam DRRs
    covering the CT unless `geometry` draws the radiograph geometry (seeded by `seed`)."""
    if source == "procedural":
        ph = generate_phantom(seed, config)
    elif source == "llp26":
        from .llp26 import generate_llp26_phantom
        ph = generate_llp26_phantom(seed, llp26)
    else:
        raise KneeReconError(f"unknown anatomy source {source!r}; use one of {', '.join(SOURCES)}")
    meta = {"source": source if source == "llp26" else "phantom", **ph.params}
    fov = imaging_field_mm(ph)
    if geometry is None:
        vox = ph.ct.GetSpacing()[0]
        drr = DRRConfig(size=(int(round(fov[0] / vox)), int(round(fov[2] / vox))))
        return case_from_ct(ph.ct, ph.labels, grid_size, drr, meta=meta)
    da, dl, drawn = geometry.sample(ph.ct, ph.params["side"], np.random.default_rng([seed, 11, SOURCES.index(source)]),
                                    fov)
    return case_from_ct(ph.ct, ph.labels, grid_size, da, {**meta, "geometry": drawn}, lateral_drr=dl)


def save_case(case: Case, path: str) -> None:
    geo = {k: asdict(g) for k, g in (("ap", case.ap_geom), ("lateral", case.lat_geom))}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, ap=case.ap.astype(np.float16), lateral=case.lateral.astype(np.float16),
                                labels=case.labels, geometry=json.dumps(geo), meta=json.dumps(case.meta))


def load_case(path: str) -> Case:
    with np.load(path) as z:
        geo = json.loads(str(z["geometry"]))
        geo = {k: ViewGeometry(**{**g, "spacing": tuple(g["spacing"])}) for k, g in geo.items()}
        return Case(z["ap"].astype(np.float32), z["lateral"].astype(np.float32), geo["ap"], geo["lateral"],
                    z["labels"], json.loads(str(z["meta"])))


def build_phantom_cache(folder: str, seeds, grid_size: int = 128, config: PhantomConfig | None = None,
                        log=print, geometry: GeometryConfig | None = None, source: str = "procedural",
                        llp26=None) -> list[str]:
    """Generate (or skip if present) one cached case per seed; resumable. See `phantom_case`."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    prefix = "phantom" if source == "procedural" else source
    for s in seeds:
        p = os.path.join(folder, f"{prefix}_{s:07d}.npz")
        if not os.path.exists(p):
            save_case(phantom_case(int(s), grid_size, config, geometry, source, llp26), p)
            log(f"cached {p}")
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- user CTs
def _read_labelmap(path: str, label_map: dict[int, int] | None) -> sitk.Image:
    lab = _read(path, "label map")
    arr = sitk.GetArrayFromImage(lab)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.allclose(arr, np.round(arr)):
            raise KneeReconError(f"{path}: a label map must hold integer labels")
        arr = np.round(arr).astype(np.int32)
    if label_map:
        out = np.zeros(arr.shape, np.uint8)
        for src, dst in label_map.items():
            out[arr == int(src)] = int(dst)
    else:
        if arr.max() > 4 or arr.min() < 0:
            raise KneeReconError(
                f"{path}: labels outside 0-4 ({int(arr.min())}..{int(arr.max())}); pass a label mapping, "
                "e.g. --label-map '75:1,76:1,...' or a JSON file")
        out = arr.astype(np.uint8)
    present = set(np.unique(out).tolist()) - {0}
    missing = [b for b in ("femur", "tibia") if BY_NAME[b].value not in present]
    if missing:
        raise KneeReconError(f"{path}: the label map has no {' and no '.join(missing)} after label mapping")
    img = sitk.GetImageFromArray(out)
    img.CopyInformation(lab)
    return img


def _read(path: str, what: str) -> sitk.Image:
    if not os.path.isfile(path):
        raise KneeReconError(f"{what} {path!r} does not exist")
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        raise KneeReconError(f"cannot read {what} {path!r}: not an image SimpleITK can read ({str(e).splitlines()[0][:120]})")


def find_ct_pairs(folder: str) -> list[tuple[str, str]]:
    """Pairs (ct, labels) in a folder: `<name>_ct.<ext>` with `<name>_labels.<ext>`, or
    `ct/<name>` with `labels/<name>`."""
    pairs = []
    for ct in sorted(glob.glob(os.path.join(folder, "*_ct.*"))):
        stem, ext = ct.rsplit("_ct", 1)
        lab = stem + "_labels" + ext
        if os.path.exists(lab):
            pairs.append((ct, lab))
    for ct in sorted(glob.glob(os.path.join(folder, "ct", "*"))):
        lab = os.path.join(folder, "labels", os.path.basename(ct))
        if os.path.exists(lab):
            pairs.append((ct, lab))
    if not pairs:
        raise KneeReconError(f"no CT/label pairs in {folder!r}: expected <name>_ct.nii.gz + <name>_labels.nii.gz, "
                             "or ct/<name> + labels/<name>")
    return pairs


def user_case(ct_path: str, labels_path: str, grid_size: int = 128, voxel_mm: float | None = None,
              label_map: dict[int, int] | None = None, fov_mm=None, drr: DRRConfig | None = None) -> Case:
    """A training case from a user's labelled CT: resampled into the knee frame, centred on the bones."""
    ct = _read(ct_path, "CT")
    lab = _read_labelmap(labels_path, label_map)
    ct_k, lab_k = to_knee_frame(ct, lab, voxel_mm=voxel_mm, fov_mm=fov_mm)
    return case_from_ct(ct_k, lab_k, grid_size, drr, meta={"source": "user", "ct": ct_path, "labels": labels_path})


def parse_label_map(text: str | None) -> dict[int, int] | None:
    """'75:1,76:1,2:3' or a JSON file {"75": 1}; the preset 'totalsegmentator' needs the file's
    own label names and is handled by the caller."""
    if not text:
        return None
    if os.path.isfile(text):
        with open(text) as f:
            return {int(k): int(v) for k, v in json.load(f).items()}
    try:
        return {int(a): int(b) for a, b in (item.split(":") for item in text.split(","))}
    except ValueError:
        raise KneeReconError(f"cannot parse label mapping {text!r}: use 'src:dst,src:dst' or a JSON file")


# ----------------------------------------------------------------------------- augmentation
@dataclass
class AugmentConfig:
    """Random changes applied to each training sample (probabilities and ranges)."""

    enabled: bool = True
    mirror_p: float = 0.5  # mirror left<->right (x), labels follow
    display_p: float = 0.7  # non-linear display curve: 1 - exp(-k L) (film/detector look) or gamma
    noise_sd: tuple[float, float] = (0.0, 0.03)  # Gaussian noise, fraction of the image range
    blur_px: tuple[float, float] = (0.0, 1.2)
    offset_mm: float = 3.0  # lateral view shifted vertically against the AP (patient motion)
    shift_mm: float = 4.0  # both views shifted together (isocentre misplacement)
    background_p: float = 0.3  # additive smooth background ramp (heel effect, scatter)
    realism_p: float = 0.0  # per view: the radiograph simulator (realism.py) instead of the simple changes above;
    # its collimator shadows are filled the way inference fills them


def _augment_image(img: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    a = img.astype(np.float32)
    a = a / max(float(np.percentile(a, 99.5)), 1e-6)
    if rng.random() < cfg.display_p:
        if rng.random() < 0.5:
            k = rng.uniform(0.5, 3.0)
            a = 1.0 - np.exp(-k * a)
        else:
            a = np.clip(a, 0, None) ** rng.uniform(0.6, 1.6)
    if rng.random() < cfg.background_p:
        h, w = a.shape
        gy, gx = np.mgrid[0:h, 0:w]
        a = a + rng.uniform(-0.15, 0.15) * gx / w + rng.uniform(-0.15, 0.15) * gy / h
    b = rng.uniform(*cfg.blur_px)
    if b > 0.2:
        a = gaussian_filter(a, b)
    sd = rng.uniform(*cfg.noise_sd)
    if sd > 0:
        a = a + rng.normal(0, sd, a.shape).astype(np.float32)
    return a * rng.uniform(0.3, 3.0) + rng.uniform(-0.2, 0.2)  # exposure/level: normalisation must undo it


def _realistic(line_integrals: np.ndarray, geom: ViewGeometry, rng: np.random.Generator) -> np.ndarray:
    """A radiograph-like version of a DRR view, preprocessed as `Reconstructor.run` preprocesses."""
    from ..io.preprocessing import collimated_border, fill_collimation
    from .realism import RealismConfig, simulate_radiograph

    img, _ = simulate_radiograph(line_integrals, geom.iso_spacing, rng, RealismConfig())
    img = img.astype(np.float32)
    border = collimated_border(img)
    return fill_collimation(img, border) if any(border) else img


def make_sample(case: Case, rng: np.random.Generator | None = None, aug: AugmentConfig | None = None):
    """(input[2, z, y, x] float32, labels[z, y, x] int64 as uint8) for the network."""
    aug = aug or AugmentConfig(enabled=False)
    ap, lat, labels = case.ap, case.lateral, case.labels
    ga, gl = case.ap_geom, case.lat_geom
    dz = dx = dy = 0.0
    if aug.enabled:
        rng = rng or np.random.default_rng()
        ap, lat = (_realistic(img, g, rng) if rng.random() < aug.realism_p else _augment_image(img, rng, aug)
                   for img, g in ((ap, ga), (lat, gl)))
        if rng.random() < aug.mirror_p:
            ap = ap[:, ::-1]
            labels = labels[:, :, ::-1]
        dz = rng.uniform(-aug.offset_mm, aug.offset_mm)
        dx, dy = rng.uniform(-aug.shift_mm, aug.shift_mm, 2)
    grid = ReconGrid.for_network(ga, gl, labels.shape)
    x = backproject(XRay(normalize_intensity(ap), ga), XRay(normalize_intensity(lat), gl), grid,
                    lateral_offset_mm=dz, shift_mm=(dx, dy))
    if dx or dy:
        labels = _shift_labels(labels, grid, dx, dy)
    return x, np.ascontiguousarray(labels)


def _shift_labels(labels: np.ndarray, grid: ReconGrid, dx: float, dy: float) -> np.ndarray:
    """Labels of the knee moved by (dx, dy) mm (nearest neighbour, background fill)."""
    from scipy.ndimage import shift

    return shift(labels, (0.0, dy / grid.spacing[1], dx / grid.spacing[0]), order=0, mode="constant", cval=0)
