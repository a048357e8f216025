"""Shape models (PCA of bone SDFs) and their 2D/3D registration to the X-rays (issue 7)."""
import json
import os

import numpy as np
import pytest

from KneeReconLib.baselines.registration import FitConfig, fit, init_from_labels
from KneeReconLib.baselines.shape_model import ShapeModel, build_shape_model, canonical_sdf
from KneeReconLib.cli import main
from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.data.dataset import build_phantom_cache, load_case, make_sample
from KneeReconLib.evaluation.metrics import dice_per_class

GRID = 48


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    d = tmp_path_factory.mktemp("ssmcache")
    paths = build_phantom_cache(str(d / "train"), range(300, 306), grid_size=GRID, log=lambda m: None)
    test = build_phantom_cache(str(d / "test"), [1_000_050], grid_size=GRID, log=lambda m: None)
    return d, [load_case(p) for p in paths], load_case(test[0])


@pytest.fixture(scope="module")
def ssm(cases, tmp_path_factory):
    _, train, _ = cases
    model = build_shape_model(((c.labels, c.grid(), c.meta["side"]) for c in train), spacing_mm=3.0, n_modes=4,
                              log=lambda m: None)
    path = str(tmp_path_factory.mktemp("ssm") / "ssm.npz")
    model.save(path)
    return model, path


def test_shape_model_file_and_projection(cases, ssm):
    _, train, _ = cases
    model, path = ssm
    back = ShapeModel.load(path)
    assert set(back.bones) == {"femur", "patella", "tibia", "fibula"}
    for name, bm in model.bones.items():
        assert back.bones[name].modes.shape == bm.modes.shape == (4,) + bm.shape
        assert np.allclose(back.bones[name].mean, bm.mean, atol=0.02)  # fp16 storage
        gram = bm.modes.reshape(4, -1) @ bm.modes.reshape(4, -1).T
        assert np.allclose(gram, np.eye(4), atol=1e-3)  # orthonormal modes
    # a training femur is closer to its projection onto the model than to the mean shape
    c = train[0]
    bm = model.bones["femur"]
    sdf = canonical_sdf(c.labels, c.grid(), c.meta["side"], bm.box_mm, bm.spacing_mm, "femur", model.truncation_mm)
    err_mean = np.sqrt(((sdf - bm.mean) ** 2).mean())
    err_fit = np.sqrt(((sdf - bm.instance(bm.project(sdf))) ** 2).mean())
    assert err_fit < 0.6 * err_mean
    np.savez(str(path) + ".bad.npz", x=np.zeros(3))
    with pytest.raises(KneeReconError, match="not a KneeRecon shape model"):
        ShapeModel.load(str(path) + ".bad.npz")


def test_registration_corrects_a_displaced_start(cases, ssm):
    _, _, case = cases
    model, _ = ssm
    x, truth = make_sample(case)
    grid = case.grid()
    side = case.meta["side"]
    init = init_from_labels(model, truth, grid, side)
    shift = np.array([7.0, 0.0, -6.0], np.float32)  # mm, femur and tibia moved off their true place
    for b in ("femur", "tibia"):
        init[b].translation = shift.copy()
    start = fit(model, x, grid, side, init, FitConfig(iterations=0))
    res = fit(model, x, grid, side, init, FitConfig(iterations=120))
    d0, d1 = dice_per_class(start.labels, truth), dice_per_class(res.labels, truth)
    for b, v in (("femur", 1), ("tibia", 3)):  # (3.4-4.1 mm voxels here: Dice is coarse)
        assert d1[v] > d0[v] + 0.1 and d1[v] > 0.8, (b, d0[v], d1[v])
        # the fitted translation moved back toward the true place (the truth's anchor is itself only
        # known to a voxel on this coarse grid)
        assert np.linalg.norm(res.poses[b].translation) < 0.75 * np.linalg.norm(shift), res.poses[b].translation
    assert res.ngcc > start.ngcc


def test_evaluate_methods_table(cases, ssm, tmp_path, capsys):
    d, _, _ = cases
    _, path = ssm
    rc = main(["evaluate", "--data", str(d / "test"), "--methods", "ssm-perturbed,ssm", "--ssm", path,
               "--fit-iterations", "120", "--output", str(tmp_path / "cmp")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "SSM, manual init" in out and "Klima 2015" in out
    res = json.load(open(tmp_path / "cmp" / "comparison.json"))
    s = res["summary"]["ssm"]
    assert s["dice_femur"] > 0.75 and s["dice_tibia"] > 0.7 and s["chamfer_femur"] < 6.0  # 3.4-4.1 mm voxels
    assert "converged_femur" in res["summary"]["ssm-perturbed"]
    assert os.path.exists(tmp_path / "cmp" / "comparison.csv")
    # clear errors: unknown method, missing shape model
    assert main(["evaluate", "--data", str(d / "test"), "--methods", "kasten,magic"]) == 2
    assert main(["evaluate", "--data", str(d / "test"), "--methods", "ssm"]) == 2
    assert "need --ssm" in capsys.readouterr().err
