"""Labels on a finer grid from interpolated class scores (KneeReconLib/reconstruction/refine.py, --refine)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from KneeReconLib.core.geometry import ReconGrid
from KneeReconLib.reconstruction.refine import finer_grid, refine_labels
from KneeReconLib.reconstruction.surfaces import clean_labels

ROOT = os.path.join(os.path.dirname(__file__), "..")
SAMPLE = os.path.join(ROOT, "Resources", "Sample")


def _sphere_scores(grid: ReconGrid, centre, radius: float, bone: int = 2) -> np.ndarray:
    """Logits of a ball of `bone` in background: the bone's logit falls linearly with the distance
    from the ball's surface, so its zero level is the true sphere."""
    z, y, x = np.meshgrid(grid.axis(2), grid.axis(1), grid.axis(0), indexing="ij")
    r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    scores = np.zeros((5,) + grid.shape, np.float32)
    scores[bone] = (radius - r) * 2.0
    return scores


def test_finer_grid_keeps_the_field():
    g = ReconGrid.centered([200.0, 160.0, 240.0], (128, 128, 128))
    f = finer_grid(g, 2)
    assert f.shape == (256, 256, 256)
    for a in range(3):  # the outer faces of the field do not move
        assert np.isclose(f.origin[a] - f.spacing[a] / 2, g.origin[a] - g.spacing[a] / 2)
        assert np.isclose(f.axis(a)[-1] + f.spacing[a] / 2, g.axis(a)[-1] + g.spacing[a] / 2)
    assert finer_grid(g, 1) is g


def test_refined_sphere_is_closer_to_the_truth_than_nearest_labels():
    src = ReconGrid.centered([64.0, 64.0, 64.0], (32, 32, 32))  # 2 mm voxels
    centre, radius = (0.7, -0.4, 0.3), 9.3
    scores = _sphere_scores(src, centre, radius)
    clean = clean_labels(scores.argmax(0).astype(np.uint8))
    dst = finer_grid(src, 4)  # 0.5 mm
    fine = refine_labels(scores, clean, src, dst)
    nearest = sitk.GetArrayFromImage(sitk.Resample(src.to_image(clean), dst.reference_image(), sitk.Transform(),
                                                   sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    truth = (_sphere_scores(dst, centre, radius)[2] > 0).astype(np.uint8) * 2

    def dice(a):
        return 2 * np.sum((a == 2) & (truth == 2)) / (np.sum(a == 2) + np.sum(truth == 2))

    assert set(np.unique(fine)) == {0, 2}
    assert dice(fine) > 0.98  # linear interpolation of a concave score places the sphere ~0.05 mm inside
    assert dice(fine) > dice(nearest) + 0.01


def test_only_the_cleaned_component_is_refined():
    src = ReconGrid.centered([64.0, 64.0, 64.0], (32, 32, 32))
    scores = np.maximum(_sphere_scores(src, (-12.0, 0.0, 0.0), 8.0), _sphere_scores(src, (18.0, 0.0, 0.0), 4.0))
    raw = scores.argmax(0).astype(np.uint8)
    assert (raw[..., 16:] == 2).any()  # the network saw both balls
    clean = clean_labels(raw)  # keeps the larger one only
    dst = finer_grid(src, 2)
    fine = refine_labels(scores, clean, src, dst)
    x = dst.axis(0)
    cols = np.flatnonzero((fine == 2).any(axis=(0, 1)))
    assert x[cols].max() < 0  # nothing of the small ball on the +x side
    with pytest.raises(ValueError):
        refine_labels(scores[:, :-1], clean, src, dst)


@pytest.mark.parametrize("refine", [2])
def test_cli_refine_writes_a_finer_label_map_that_matches_the_default(tmp_path, refine):
    outs = {}
    for r in (1, refine):
        out = tmp_path / f"r{r}"
        p = subprocess.run([sys.executable, "-m", "KneeReconLib", "reconstruct", "--ap", os.path.join(SAMPLE, "ap.nrrd"),
                            "--lateral", os.path.join(SAMPLE, "lateral.nrrd"), "--output", str(out), "--refine", str(r)],
                           capture_output=True, text=True, cwd=ROOT)
        assert p.returncode == 0, p.stderr
        assert "outside the trained range" not in p.stdout  # the sample is in range: only the output grid is finer
        outs[r] = sitk.ReadImage(str(out / "labels.nii.gz"))
    coarse, fine = outs[1], outs[refine]
    assert fine.GetSize() == tuple(refine * n for n in coarse.GetSize())
    assert np.allclose(np.array(fine.GetSpacing()) * refine, coarse.GetSpacing())
    # the same bones, by physical coordinates
    back = sitk.GetArrayFromImage(sitk.Resample(fine, coarse, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8))
    c = sitk.GetArrayFromImage(coarse)
    for b in (1, 2, 3, 4):
        inter = np.sum((back == b) & (c == b))
        assert 2 * inter / (np.sum(back == b) + np.sum(c == b)) > 0.9, b
    report = json.load(open(tmp_path / f"r{refine}" / "report.json"))
    assert report["volumes_ml"]["femur"] > 100
