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
    rec = Reconstructor(MODEL, amp=False, tta=False)  # the float IR in f32 (amp would pick bf16 or the int8 IR)
    assert rec.backend == "openvino" and "OpenVINO f32" in rec.precision
    # the shipped IR is used, so it was exported from this very model file (re-export after retraining)
    assert rec.ov.ir_path == openvino_backend.beside_model(MODEL)
    net, _ = load_model(MODEL)
    with torch.inference_mode():
        ref = net(torch.from_numpy(sample_volume)[None]).argmax(1)[0].numpy()
    labels = rec.predict(sample_volume)
    assert labels.dtype == np.uint8 and labels.shape == ref.shape
    assert (labels == ref).mean() >= 0.999
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}


def test_bundled_int8_ir_is_used_without_native_bf16_and_agrees(sample_volume):
    """The int8 IR (quantized from the bundled model) is the default on CPUs without native bf16,
    and gives the float IR's labels on nearly every voxel of the sample (Dice on the held-out
    tests within 0.003: MODEL_CARD.md)."""
    int8 = openvino_backend.int8_beside_model(MODEL)
    assert os.path.exists(int8) and os.path.exists(int8[:-4] + ".bin")
    core = openvino_backend.import_openvino().Core()
    path, model = openvino_backend.find_int8_ir(core, MODEL)
    assert path == int8, "the bundled int8 IR was not made from the bundled model file: re-quantize it"
    rec = Reconstructor(MODEL, tta=False)
    if openvino_backend.native_bf16(core):  # bf16 is native and fast here: it stays the default
        assert rec.ov.precision == "bf16"
    else:
        assert rec.ov.precision == "int8" and rec.ov.ir_path == int8 and "int8" in rec.precision
    net8 = openvino_backend.OpenVINONetwork(MODEL, None, "int8", (1, 2, 128, 128, 128), core=core)
    net32 = openvino_backend.OpenVINONetwork(MODEL, None, "f32", (1, 2, 128, 128, 128), core=core)
    a, b = net8(sample_volume), net32(sample_volume)
    assert (a == b).mean() >= 0.998
    bone = (a > 0) | (b > 0)
    assert (a == b)[bone].mean() >= 0.97
    assert set(np.unique(a)) == {0, 1, 2, 3, 4}


def test_int8_ir_of_another_model_file_is_not_used(tmp_path, sample_volume):
    """An int8 IR beside a model file it was not made from (a retrained model) is ignored: f32."""
    _tiny_model(tmp_path / "m.pt", 0)
    net = openvino_backend.OpenVINONetwork(str(tmp_path / "m.pt"), lambda: load_model(str(tmp_path / "m.pt"))[0].eval(),
                                           "f32", (1, 2, 32, 32, 32))
    openvino_backend.save(net.model, openvino_backend.int8_beside_model(str(tmp_path / "m.pt")))
    _tiny_model(tmp_path / "m.pt", 1)  # retrained: the IR's checksum no longer matches
    again = openvino_backend.OpenVINONetwork(str(tmp_path / "m.pt"), lambda: load_model(str(tmp_path / "m.pt"))[0].eval(),
                                             "int8", (1, 2, 32, 32, 32))
    assert again.precision == "f32" and again.ir_path != openvino_backend.int8_beside_model(str(tmp_path / "m.pt"))


def test_export_openvino_int8_cli(tmp_path, capsys):
    """`kneerecon export-openvino --int8` quantizes a model's IR on cached training cases; the
    result is tied to the model file, runs, and stays close to the float network."""
    pytest.importorskip("nncf")
    from KneeReconLib.data.dataset import build_phantom_cache

    _tiny_model(tmp_path / "m.pt", 0)
    build_phantom_cache(str(tmp_path / "cal"), range(1000900, 1000902), grid_size=32)
    assert main(["export-openvino", "--model", str(tmp_path / "m.pt"), "--output", str(tmp_path / "m.openvino.xml")]) == 0
    assert main(["export-openvino", "--int8", "--model", str(tmp_path / "m.pt"), "--calibration", str(tmp_path / "cal"),
                 "--calibration-count", "2"]) == 0
    assert "int8" in capsys.readouterr().out
    xml = openvino_backend.int8_beside_model(str(tmp_path / "m.pt"))
    net8 = openvino_backend.OpenVINONetwork(str(tmp_path / "m.pt"), None, "int8", (1, 2, 32, 32, 32))
    assert net8.precision == "int8" and net8.ir_path == xml
    text = open(xml).read()
    assert "FakeQuantize" in text or "FakeConvert" in text  # really quantized
    from KneeReconLib.data.dataset import load_case, make_sample
    import glob
    x, _ = make_sample(load_case(sorted(glob.glob(str(tmp_path / "cal" / "*.npz")))[0]))
    ref = load_model(str(tmp_path / "m.pt"))[0].eval()
    with torch.inference_mode():
        ref_labels = ref(torch.from_numpy(x)[None]).argmax(1)[0].numpy()
    assert (net8(x) == ref_labels).mean() > 0.9
    # without --calibration: a clear error, exit 2
    assert main(["export-openvino", "--int8", "--model", str(tmp_path / "m.pt")]) == 2


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
    assert Reconstructor(MODEL, tta=True).backend == "openvino"  # mirror TTA: two passes of the IR
    with pytest.raises(KneeReconError, match="ensembles run with --backend torch only"):
        Reconstructor(MODEL, backend="openvino", ensemble=[MODEL])
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


def test_mirror_tta_on_openvino_matches_pytorch_and_keeps_one_pass_for_the_margin():
    """--tta on the default OpenVINO path averages the knee and its mirror image as the PyTorch path
    does: the same labels to float rounding (f32 on both), the averaged scores are log-probabilities,
    and the quality margin reads the unmirrored pass's own logits."""
    import SimpleITK as sitk

    from KneeReconLib.evaluation.metrics import dice_per_class

    ap = read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap", None, None, None, "left")
    lat = read_xray(os.path.join(SAMPLE, "lateral.nrrd"), "lateral", None, None, None, "left")
    grid = ReconGrid.for_network(ap.geometry, lat.geometry, 128)
    vol = backproject(XRay(normalize_intensity(ap.pixels), ap.geometry),
                      XRay(normalize_intensity(lat.pixels), lat.geometry), grid)
    ov = Reconstructor(MODEL, amp=False, tta=True)
    pt = Reconstructor(MODEL, amp=False, tta=True, backend="torch")
    plain = Reconstructor(MODEL, amp=False, tta=False)
    lab_ov, logp = ov.predict_scores(vol)
    # labels only (the default path): averaged only where the passes disagree, the same labels
    assert (ov.predict(vol) == lab_ov).mean() > 0.99999
    lab_pt, _ = pt.predict_scores(vol)
    lab_1, logits_1 = plain.predict_scores(vol)
    assert (lab_ov == lab_pt).mean() > 0.9995
    assert 0.98 < (lab_ov == lab_1).mean() < 1.0  # a real second opinion, not a copy of the first pass
    p = np.exp(logp)
    assert np.allclose(p.sum(0), 1.0, atol=1e-4) and np.array_equal(p.argmax(0), lab_ov)
    assert np.allclose(ov.single_scores, logits_1, atol=1e-3)
    rec = ov.run(ap, lat, "left", surfaces=False)
    truth = sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(os.path.join(SAMPLE, "truth.nii.gz")), rec.labels,
                                                 sitk.Transform(), sitk.sitkNearestNeighbor))
    d = dice_per_class(sitk.GetArrayFromImage(rec.labels), truth)
    assert d[1] > 0.85 and d[3] > 0.85
    assert rec.quality["bones"]["femur"]["confidence_margin"] is not None  # judged on one network's probabilities


def test_mirror_tta_is_skipped_with_a_note_for_an_ir_without_scores(monkeypatch):
    """An IR converted before 0.5 returns labels only: the default mirror TTA, which averages
    scores, is skipped with a note instead of failing the reconstruction."""
    rec = Reconstructor(MODEL)
    monkeypatch.setattr(type(rec.ov), "has_scores", property(lambda self: False))
    ap = read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap", None, None, None, "left")
    lat = read_xray(os.path.join(SAMPLE, "lateral.nrrd"), "lateral", None, None, None, "left")
    r = rec.run(ap, lat, "left", surfaces=False)
    assert not r.tta and any("mirror test-time augmentation was skipped" in n for n in r.notes)
    one = rec.run(ap, lat, "left", surfaces=False, tta=False)
    assert np.array_equal(r.labels_array(), one.labels_array())
    with pytest.raises(KneeReconError, match="returns no class scores"):
        rec.predict(np.zeros((2, 128, 128, 128), np.float32))


def test_prewarm_compiles_the_bundled_network_into_the_cache_and_fails_quietly(tmp_path, monkeypatch):
    """`kneerecon reconstruct` starts the compilation while it imports the rest (openvino_backend.prewarm):
    the thread compiles the very network a Reconstructor then uses (the compiled-network cache holds
    it afterwards), and a model that cannot be compiled leaves the error to the reconstruction."""
    monkeypatch.setenv("KNEERECON_CACHE", str(tmp_path / "cache"))
    compiled = tmp_path / "cache" / "openvino" / "compiled"
    thread = openvino_backend.prewarm(MODEL, (1, 2, 128, 128, 128))
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert compiled.is_dir() and any(f.suffix == ".blob" for f in compiled.iterdir())
    bad = tmp_path / "not_a_model.pt"
    bad.write_bytes(b"nonsense")
    quiet = openvino_backend.prewarm(str(bad), (1, 2, 128, 128, 128))
    quiet.join(timeout=60)
    assert not quiet.is_alive()
    with pytest.raises(KneeReconError):  # the reconstruction reports it
        Reconstructor(str(bad), backend="openvino")
