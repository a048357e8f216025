"""Style transfer (CycleGAN, real radiograph -> DRR): training, resume, inference, CLI."""
import csv
import os

import numpy as np
import pytest
import torch

from conftest import SAMPLE
from KneeReconLib.cli import main
from KneeReconLib.io.xray_io import read_xray, write_xray
from KneeReconLib.models.checkpoint import read_model_file
from KneeReconLib.models.style import StyleConfig, StyleTransfer, train_style


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """'drr': the sample's two DRRs; 'real': the same anatomy with a display curve and noise."""
    root = tmp_path_factory.mktemp("style")
    rng = np.random.default_rng(0)
    for d in ("drr", "real"):
        (root / d).mkdir()
    for v in ("ap", "lateral"):
        x = read_xray(os.path.join(SAMPLE, f"{v}.nrrd"), v)
        a = x.pixels.astype(np.float32) / float(x.pixels.max())
        write_xray(a, x.geometry, str(root / "drr" / f"{v}.nrrd"))
        real = np.clip(a, 0, 1) ** 2.2 + rng.normal(0, 0.03, a.shape)
        write_xray(np.clip(real, 0, None).astype(np.float32), x.geometry, str(root / "real" / f"{v}.nrrd"))
    return root


def _cfg(domains, out, **kw):
    base = dict(real=[str(domains / "real")], drr=[str(domains / "drr")], out=str(out), steps=40, crop=32,
                pixel_mm=2.0, base=4, res_blocks=1, lr=2e-3, ckpt_every=20, log_every=10, threads=1)
    base.update(kw)
    return StyleConfig(**base)


def test_training_lowers_the_cycle_loss_and_translates(domains, tmp_path):
    path = train_style(_cfg(domains, tmp_path), log=lambda m: None)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert float(rows[-1]["cycle"]) < 0.8 * float(rows[0]["cycle"])
    st = StyleTransfer(path)
    x = read_xray(str(domains / "real" / "ap.nrrd"), "ap")
    y = st(x.pixels, x.geometry.iso_spacing)
    assert y.shape == x.pixels.shape and np.isfinite(y).all() and 0.0 <= y.min() and y.max() <= 1.0
    assert y.std() > 0.05  # an image, not a constant


def test_resume_reproduces_the_uninterrupted_run(domains, tmp_path):
    full = read_model_file(train_style(_cfg(domains, tmp_path / "a", steps=20, ckpt_every=10), log=lambda m: None))
    train_style(_cfg(domains, tmp_path / "b", steps=10, ckpt_every=10), log=lambda m: None)
    resumed = read_model_file(train_style(_cfg(domains, tmp_path / "b", steps=20, ckpt_every=10), resume=True,
                                          log=lambda m: None))
    for k, v in full["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k


def test_reconstruct_with_style_and_wrong_model_kinds(domains, tmp_path, capsys):
    style = train_style(_cfg(domains, tmp_path / "s", steps=4, ckpt_every=4), log=lambda m: None)
    ap, lat = os.path.join(SAMPLE, "ap.nrrd"), os.path.join(SAMPLE, "lateral.nrrd")
    assert main(["reconstruct", "--ap", ap, "--lateral", lat, "--output", str(tmp_path / "o"), "--style", style]) == 0
    import json
    report = json.load(open(tmp_path / "o" / "report.json"))
    assert any("DRR style" in n for n in report["notes"])
    assert main(["reconstruct", "--ap", ap, "--lateral", lat, "--output", str(tmp_path / "o2"), "--model", style]) == 2
    assert "not a reconstruction model" in capsys.readouterr().err
    from KneeReconLib.reconstruction.inference import DEFAULT_MODEL
    assert main(["reconstruct", "--ap", ap, "--lateral", lat, "--output", str(tmp_path / "o3"), "--style", DEFAULT_MODEL]) == 2
    assert "not a style model" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o2") and not os.path.exists(tmp_path / "o3")
