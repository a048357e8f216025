"""Reconstruction without PyTorch: the card is read without it, the converted network runs without
it, nothing on the reconstruction path imports it, and where it would be needed (a model that has
no converted network yet) the message says what to do. The OpenVINO and PyTorch paths agree."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from conftest import MODEL, ROOT, SAMPLE
from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.models.checkpoint import read_model_file, save_model
from KneeReconLib.models.model_card import network_divisor, read_card, reconstruction_card

openvino_backend = pytest.importorskip("KneeReconLib.models.openvino_backend")
MODELS = os.path.dirname(MODEL)


def _env(tmp_path, **extra):
    env = dict(os.environ, PYTHONPATH=ROOT, KNEERECON_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def test_card_read_without_torch_is_the_card_torch_reads(tmp_path):
    import torch

    from KneeReconLib.models.network import UNet3D, UNetConfig

    for name in ("kneerecon_unet.pt", "kneerecon_chen.pt", "kneerecon_style.pt"):
        path = os.path.join(MODELS, name)
        assert read_card(path) == read_model_file(path)["card"], name
    net = UNet3D(UNetConfig(widths=(4, 8, 16)))
    card = {"kind": "reconstruction", "name": "tiny", "version": "9.9", "architecture": net.config.to_dict()}
    # a training checkpoint: weights plus optimiser state and a step counter
    save_model(str(tmp_path / "ck.pt"), net, card, extra={"step": 7, "optimizer": torch.optim.AdamW(net.parameters()).state_dict()})
    assert read_card(str(tmp_path / "ck.pt")) == card
    assert network_divisor(card["architecture"]) == net.divisor == 4
    assert network_divisor(read_card(os.path.join(MODELS, "kneerecon_chen.pt"))["architecture"]) == 8
    with pytest.raises(KneeReconError, match="is a style-cyclegan model"):
        reconstruction_card(os.path.join(MODELS, "kneerecon_style.pt"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_card_reader_runs_no_code_from_the_file(tmp_path):
    import torch

    evil = tmp_path / "evil.pt"
    torch.save({"format": "kneerecon.model", "format_version": 1, "card": "{}", "payload": _Evil()}, str(evil))
    with pytest.raises(KneeReconError, match="not a KneeRecon model file.*posix.system|not a KneeRecon model file.*os.system"):
        read_card(str(evil))
    (tmp_path / "text.pt").write_text("hello")
    zipfile.ZipFile(tmp_path / "empty.pt", "w").close()
    for bad in ("text.pt", "empty.pt"):
        with pytest.raises(KneeReconError, match="not a KneeRecon model file"):
            read_card(str(tmp_path / bad))
    torch.save({"format": "something else"}, str(tmp_path / "other.pt"))
    with pytest.raises(KneeReconError, match="no 'kneerecon.model' format marker"):
        read_card(str(tmp_path / "other.pt"))
    torch.save({"format": "kneerecon.model", "format_version": 99, "card": "{}"}, str(tmp_path / "new.pt"))
    with pytest.raises(KneeReconError, match="format version 99"):
        read_card(str(tmp_path / "new.pt"))
    with pytest.raises(KneeReconError, match="does not exist"):
        read_card(str(tmp_path / "missing.pt"))
    assert pickle.dumps  # the module under test uses the standard library only


NO_TORCH_SCRIPT = r"""
import json, os, sys, time
for name in ("torch", "scipy", "skimage"):  # `import torch` etc. fail here, as where they are not installed
    sys.modules[name] = None
t0 = time.perf_counter()
import KneeReconLib
from KneeReconLib.reconstruction.outputs import write_outputs
rec = KneeReconLib.reconstruct(os.path.join(SAMPLE, "ap.nrrd"), os.path.join(SAMPLE, "lateral.nrrd"), side="left")
write_outputs(rec, OUT)
from KneeReconLib.cli import main
rc = main(["reconstruct", "--ap", os.path.join(SAMPLE, "ap.nrrd"), "--lateral", os.path.join(SAMPLE, "lateral.nrrd"),
           "--side", "left", "--output", OUT + "_cli"])
heavy = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in
               ("torch", "scipy", "skimage", "vtk", "openvino_telemetry", "multiprocessing"))
print(json.dumps({"rc": rc, "heavy": heavy, "precision": rec.precision, "backend": "openvino" if rec.precision.startswith("OpenVINO") else "torch"}))
"""


def test_reconstruction_imports_no_torch(tmp_path):
    """The API and the command line reconstruct the sample with torch, scipy and scikit-image
    unimportable (as in a wheel installed without the [train] extra); afterwards none of them, nor
    the whole of vtk, nor OpenVINO's usage telemetry (which forks a process to post an event) is in
    sys.modules."""
    out = str(tmp_path / "out")
    code = f"SAMPLE = {SAMPLE!r}; OUT = {out!r}\n" + NO_TORCH_SCRIPT
    r = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0 and res["heavy"] == [] and res["backend"] == "openvino", res
    from KneeReconLib.reconstruction.outputs import OUTPUT_FILES
    for d in (out, out + "_cli"):
        assert sorted(os.listdir(d)) == sorted(OUTPUT_FILES)


def test_a_model_without_converted_network_and_no_torch_says_how_to_convert(tmp_path):
    model = tmp_path / "mine.pt"
    shutil.copy(MODEL, model)  # the bundled weights, but no .openvino.xml beside this copy and an empty cache
    code = ("import sys; sys.modules['torch'] = None\nfrom KneeReconLib.cli import main\n"
            f"sys.exit(main(['reconstruct', '--ap', {os.path.join(SAMPLE, 'ap.nrrd')!r}, '--lateral', "
            f"{os.path.join(SAMPLE, 'lateral.nrrd')!r}, '--model', {str(model)!r}, '--output', {str(tmp_path / 'o')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err = r.stderr
    assert "has no converted OpenVINO network" in err and "needs PyTorch" in err, err
    assert f"kneerecon export-openvino --model {model}" in err and "kneerecon[train]" in err, err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "o")
    # the other ways PyTorch is asked for say so too
    for args, what in ((["--backend", "torch"], "--backend torch needs PyTorch"),
                       (["--device", "cuda"], "--device cuda needs PyTorch"),
                       (["--ensemble"], "ensembles need PyTorch")):
        code2 = code.replace(f"'--model', {str(model)!r}, ", ", ".join(repr(x) for x in args) + ", ")
        r = subprocess.run([sys.executable, "-c", code2], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and what in r.stderr and "kneerecon[train]" in r.stderr, (args, r.stderr[-1000:])


def test_commands_that_need_the_train_extra_say_so(tmp_path):
    """Without [train] (no torch, scipy, scikit-image) the commands that need it exit 2 with one line
    naming the extra, no traceback."""
    cases = ((["evaluate-2d", "--masks", str(tmp_path)], "kneerecon evaluate-2d needs scipy"),
             (["train", "--data", str(tmp_path), "--output", str(tmp_path / "m.pt"), "--steps", "1"],
              "kneerecon train needs PyTorch"))
    for args, what in cases:
        code = ("import sys\nfor n in ('torch', 'scipy', 'skimage'): sys.modules[n] = None\n"
                f"from KneeReconLib.cli import main\nsys.exit(main({args!r}))")
        r = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, (args, r.returncode, r.stderr[-2000:])
        assert f"{what}, which is not installed: pip install 'kneerecon[train]'" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _phantom_pair(seed):
    from KneeReconLib.data.dataset import phantom_case
    from KneeReconLib.io.xray_io import XRay

    case = phantom_case(seed)
    return XRay(case.ap, case.ap_geom), XRay(case.lateral, case.lat_geom), case.ap_geom.side


def test_openvino_and_torch_paths_agree(bundled_model):
    """The whole reconstruction (back-projection, network, clean-up) through either runtime: the same
    label map on at least 99.9 % of the voxels, on the sample and on two fresh test-range phantoms."""
    from KneeReconLib.io.xray_io import read_xray
    from KneeReconLib.reconstruction.inference import Reconstructor

    ov, pt = Reconstructor(bundled_model, backend="openvino"), Reconstructor(bundled_model, backend="torch")
    assert ov.ov is not None and pt.ov is None
    side = json.load(open(os.path.join(SAMPLE, "meta.json")))["side"]
    cases = [(read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap"), read_xray(os.path.join(SAMPLE, "lateral.nrrd"), "lateral"), side)]
    cases += [_phantom_pair(seed) for seed in (1_000_301, 1_000_302)]
    for ap, lat, side in cases:
        a = ov.run(ap, lat, side, surfaces=False).labels_array()
        b = pt.run(ap, lat, side, surfaces=False).labels_array()
        agree = (a == b).mean()
        assert agree >= 0.999, agree
        assert set(np.unique(a)) == {0, 1, 2, 3, 4}
