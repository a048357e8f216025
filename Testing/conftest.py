import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
SAMPLE = os.path.join(ROOT, "Resources", "Sample")
MODEL = os.path.join(ROOT, "Resources", "Models", "kneerecon_unet.pt")


@pytest.fixture(scope="session", autouse=True)
def _private_model_cache(tmp_path_factory):
    """Converted OpenVINO models of the tests' own models go to a temporary cache, not ~/.cache."""
    os.environ["KNEERECON_CACHE"] = str(tmp_path_factory.mktemp("kneerecon-cache"))


@pytest.fixture(scope="session")
def phantom_right():
    from KneeReconLib.data.phantom import PhantomConfig, generate_phantom

    return generate_phantom(11, PhantomConfig(side="right"))


@pytest.fixture(scope="session")
def phantom_left():
    from KneeReconLib.data.phantom import PhantomConfig, generate_phantom

    return generate_phantom(12, PhantomConfig(side="left"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """Four cached phantom cases on a 32^3 grid: enough for training-loop tests."""
    from KneeReconLib.data.dataset import build_phantom_cache

    d = tmp_path_factory.mktemp("cache")
    build_phantom_cache(str(d), range(100, 104), grid_size=32, log=lambda m: None)
    return str(d)


def tiny_train_config(cache, out, architecture: dict, **kw):
    """A few-step, one-thread training configuration on `tiny_cache`."""
    from KneeReconLib.training.train import TrainConfig

    base = dict(data=[cache], out=str(out), steps=8, batch_size=2, lr=1e-2, warmup_steps=2, crop=None, grid_size=32,
                architecture=architecture, workers=0, ckpt_every=4, log_every=1, val_every=1000, amp=True, threads=1)
    base.update(kw)
    return TrainConfig(**base)


STRAIGHT_SUBJECT, STRAIGHT_SEED = 4, 12  # flexion 0-3 degrees
STRAIGHT_FIELD_MM = 115.0  # a field this tall about the joint: its lateral scores AP-like (swap score -2.3)


@pytest.fixture(scope="session")
def straight_pair(tmp_path_factory):
    """A nearly straight right knee (flexion under 3 degrees) of an LLP26 training subject (its own
    bones, no PCA shape), parallel-beam DRRs of a field STRAIGHT_FIELD_MM tall about the isocentre
    (the shortest fields of the training caches), as NRRD files: the kind of pair whose lateral the
    view classifier scores AP-like."""
    pytest.importorskip("musculoskeletal.models")
    from KneeReconLib.data.drr import DRRConfig, render_drr
    from KneeReconLib.data.llp26 import LLP26Config, generate_llp26_phantom
    from KneeReconLib.data.phantom import imaging_field_mm
    from KneeReconLib.geometry.frame import to_knee_frame
    from KneeReconLib.io.xray_io import write_xray

    d = tmp_path_factory.mktemp("straight")
    ph = generate_llp26_phantom(STRAIGHT_SEED, LLP26Config(subjects=(STRAIGHT_SUBJECT,), pca_p=0.0,
                                                           flexion_deg=(0.0, 3.0), side="right"))
    ct, _ = to_knee_frame(ph.ct, ph.labels)
    for view, (img, geom) in render_drr(ct, DRRConfig(pixel_spacing=0.8, side="right")).items():
        img, geom = crop_to_field(img, geom, imaging_field_mm(ph)[0], STRAIGHT_FIELD_MM)
        write_xray(img, geom, str(d / f"{view}.nrrd"))
    return str(d / "ap.nrrd"), str(d / "lateral.nrrd")


def ct_side_faces(ct: np.ndarray) -> np.ndarray:
    """The voxels of a CT array's four side faces (x and y), where a whole leg leaves only air."""
    return np.concatenate([ct[:, :, 0].ravel(), ct[:, :, -1].ravel(), ct[:, 0, :].ravel(), ct[:, -1, :].ravel()])


def crop_to_field(img: np.ndarray, geom, width_mm: float, height_mm: float | None = None):
    """A DRR of a whole phantom CT (as wide as the leg) cropped to a radiograph field about the
    isocentre, symmetrically, so the image centre stays on it: (pixels, geometry)."""
    from dataclasses import replace

    out = {}
    for key, mm, n, sp in (("width", width_mm, geom.width, geom.iso_spacing[0]),
                           ("height", height_mm, geom.height, geom.iso_spacing[1])):
        k = n if mm is None else min(n, int(round(mm / sp)))
        r0 = (n - k) // 2
        out[key] = (r0, n - 2 * r0)
    (c0, w), (r0, h) = out["width"], out["height"]
    return np.ascontiguousarray(img[r0:r0 + h, c0:c0 + w]), replace(geom, width=w, height=h)


@pytest.fixture(scope="session")
def bundled_model():
    if not os.path.exists(MODEL):
        pytest.fail(f"bundled model missing: {MODEL}")
    return MODEL


def centroid(mask: np.ndarray, spacing, origin) -> np.ndarray:
    """Centroid (x, y, z) in mm of a (k, j, i) mask on an axis-aligned grid."""
    k, j, i = np.nonzero(mask)
    return np.array([origin[0] + i.mean() * spacing[0], origin[1] + j.mean() * spacing[1], origin[2] + k.mean() * spacing[2]])
