"""The OpenVINO backend: same labels as PyTorch, IR files tied to their model file, clear errors."""
import os

import numpy as np
import pytest
import torch

from conftest import MODEL, SAMPLE
from KneeReconLib.cli import main
from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.core.geometry import ReconGrid
from KneeReconLib.geometry.backprojection import backproject
from KneeReconLib.io.preprocessing import normalize_intensity
from KneeReconLib.io.xray_io import XRay, read_xray
from KneeReconLib.models import openvino_backend
from KneeReconLib.models.checkpoint import load_model, save_model
from KneeReconLib.models.network import UNet3D, UNetConfig
from KneeReconLib.reconstruction.inference import Reconstructor

pytestmark = pytest.mark.skipif(not openvino_backend.available(), reason="openvino is not installed")


@pytest.fixture(scope="module")
def sample_volume():
    xa = read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap")
    xl = read_xray(os.path.join(SAMPLE, "lateral.nrrd"), "lateral")
    grid = ReconGrid.from_views(xa.geometry, xl.geometry, 128)
    return backproject(XRay(normalize_intensity(xa.pixels), xa.geometry),
                       XRay(normalize_intensity(xl.pixels), xl.geometry), grid)


def test_bundled_ir_belongs_to_the_bundled_model_and_agrees_with_fp32(sample_volume):
    rec = Reconstructor(MODEL)
    assert rec.backend == "openvino" and "OpenVINO" in rec.precision
    # the shipped IR is used, so it was exported from this very model file (re-export after retraining)
    assert rec.ov.ir_path == openvino_backend.beside_model(MODEL)
    net, _ = load_model(MODEL)
    with torch.inference_mode():
        ref = net(torch.from_numpy(sample_volume)[None]).argmax(1)[0].numpy()
    labels = rec.predict(sample_volume)
    assert labels.dtype == np.uint8 and labels.shape == ref.shape
    assert (labels == ref).mean() >= 0.999
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}


def _tiny_model(path, seed):
    torch.manual_seed(seed)
    net = UNet3D(UNetConfig(widths=(4, 8, 16))).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_var.uniform_(0.5, 2.0)
    card = {"kind": "reconstruction", "architecture": net.config.to_dict(), "grid_size": 32}
    save_model(str(path), net, card)


def test_ir_cache_follows_the_model_file(tmp_path):
    model = tmp_path / "tiny.pt"
    _tiny_model(model, 1)
    x = np.random.default_rng(0).random((2, 32, 32, 32), dtype=np.float32)
    first = Reconstructor(str(model), backend="openvino")
    assert first.ov.ir_path.startswith(openvino_backend.cache_folder()) and os.path.exists(first.ov.ir_path)
    again = Reconstructor(str(model), backend="openvino")
    assert again.ov.ir_path == first.ov.ir_path
    torch_labels = Reconstructor(str(model), backend="torch", amp=False).predict(x)
    assert (again.predict(x) == torch_labels).mean() > 0.99
    # new weights in the same file: the old IR no longer matches and is not used
    _tiny_model(model, 2)
    retrained = Reconstructor(str(model), backend="openvino")
    assert retrained.ov.ir_path != first.ov.ir_path
    assert (retrained.predict(x) == Reconstructor(str(model), backend="torch", amp=False).predict(x)).mean() > 0.99
    # another grid size than the IR's: reshaped, not refused
    assert retrained.predict(np.zeros((2, 48, 32, 16), np.float32)).shape == (48, 32, 16)


def test_export_openvino_cli_writes_beside_the_model(tmp_path, capsys):
    model = tmp_path / "tiny.pt"
    _tiny_model(model, 3)
    assert main(["export-openvino", "--model", str(model)]) == 0
    assert os.path.exists(tmp_path / "tiny.openvino.xml") and os.path.exists(tmp_path / "tiny.openvino.bin")
    assert Reconstructor(str(model)).ov.ir_path == str(tmp_path / "tiny.openvino.xml")
    assert main(["export-openvino", "--model", str(model), "--output", str(tmp_path / "x.bin")]) == 2
    assert "must end in .xml" in capsys.readouterr().err
    assert main(["export-openvino", "--model", str(tmp_path / "missing.pt")]) == 2


def test_backend_choice_and_errors(monkeypatch):
    assert Reconstructor(MODEL, backend="torch").ov is None
    assert Reconstructor(MODEL, tta=True).backend == "torch"  # probabilities are averaged: PyTorch
    with pytest.raises(KneeReconError, match="test-time augmentation"):
        Reconstructor(MODEL, backend="openvino", tta=True)
    with pytest.raises(KneeReconError, match="unknown backend"):
        Reconstructor(MODEL, backend="tensorrt")
    monkeypatch.setattr(openvino_backend, "available", lambda: False)
    assert Reconstructor(MODEL).backend == "torch"  # auto falls back
    with pytest.raises(KneeReconError, match="needs the openvino package"):
        Reconstructor(MODEL, backend="openvino")


def test_openvino_failure_falls_back_or_says_so(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Exception from src/plugins/intel_cpu: unsupported\nmore detail")

    monkeypatch.setattr(openvino_backend, "OpenVINONetwork", broken)
    rec = Reconstructor(MODEL)  # auto: PyTorch instead, the same network
    assert rec.backend == "torch" and rec.ov is None and "OpenVINO" not in rec.precision
    assert rec.predict(np.zeros((2, 32, 32, 32), np.float32)).shape == (32, 32, 32)
    with pytest.raises(KneeReconError, match="OpenVINO could not run kneerecon_unet.pt .*unsupported\\); use --backend torch"):
        Reconstructor(MODEL, backend="openvino")
