import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
SAMPLE = os.path.join(ROOT, "Resources", "Sample")
MODEL = os.path.join(ROOT, "Resources", "Models", "kneerecon_unet.pt")


@pytest.fixture(scope="session")
def phantom_right():
    from KneeReconLib.phantom import PhantomConfig, generate_phantom

    return generate_phantom(11, PhantomConfig(side="right"))


@pytest.fixture(scope="session")
def phantom_left():
    from KneeReconLib.phantom import PhantomConfig, generate_phantom

    return generate_phantom(12, PhantomConfig(side="left"))


@pytest.fixture(scope="session")
def bundled_model():
    if not os.path.exists(MODEL):
        pytest.fail(f"bundled model missing: {MODEL}")
    return MODEL


def centroid(mask: np.ndarray, spacing, origin) -> np.ndarray:
    """Centroid (x, y, z) in mm of a (k, j, i) mask on an axis-aligned grid."""
    k, j, i = np.nonzero(mask)
    return np.array([origin[0] + i.mean() * spacing[0], origin[1] + j.mean() * spacing[1], origin[2] + k.mean() * spacing[2]])
