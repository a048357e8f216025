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


@pytest.fixture(scope="session")
def bundled_model():
    if not os.path.exists(MODEL):
        pytest.fail(f"bundled model missing: {MODEL}")
    return MODEL


def centroid(mask: np.ndarray, spacing, origin) -> np.ndarray:
    """Centroid (x, y, z) in mm of a (k, j, i) mask on an axis-aligned grid."""
    k, j, i = np.nonzero(mask)
    return np.array([origin[0] + i.mean() * spacing[0], origin[1] + j.mean() * spacing[1], origin[2] + k.mean() * spacing[2]])
