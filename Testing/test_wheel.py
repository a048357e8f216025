"""KneeRecon installed as a user installs it: a wheel (`pip wheel .`) and an sdist built from the
source tree, installed into a fresh virtual environment WITHOUT PyTorch; the installed
`kneerecon` finds its bundled files and reconstructs the bundled sample as well as the source
tree does; then the same wheel with the [train] extra trains a tiny model and reconstructs with it
(its network converted on first use, now that PyTorch is there).

Slow (pip installs; pip's cache is used): deselect with `-m "not wheel"` while developing."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import ROOT

pytestmark = pytest.mark.wheel


def _env(tmp, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(KNEERECON_CACHE=str(tmp / "kneerecon-cache"), PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _run(cmd, env, cwd, timeout=1200):
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return r


def _ok(cmd, env, cwd, timeout=1200):
    r = _run(cmd, env, cwd, timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("wheel")


@pytest.fixture(scope="module")
def dists(work):
    """(wheel, sdist) built from a copy of what the build reads (no caches, runs or venvs)."""
    src = work / "src"
    src.mkdir()
    for f in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, f), src / f)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    for d in ("KneeReconLib", "Resources"):
        shutil.copytree(os.path.join(ROOT, d), src / d, ignore=ignore)
    env = _env(work)
    out = work / "dist"
    r = _ok([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(src)], env, work)  # = pip wheel .
    sdist = _ok([sys.executable, "-c", f"from setuptools import build_meta as b; print(b.build_sdist({str(out)!r}))"],
                env, src)
    for text in (r.stdout + r.stderr, sdist.stdout + sdist.stderr):
        assert "eprecat" not in text and "!!" not in text, text[-3000:]  # no deprecation noise or warning blocks
    wheel = next(out.glob("kneerecon-*.whl"))
    return wheel, out / sdist.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def venv(work, dists):
    """A fresh virtual environment with the wheel and its runtime dependencies: no PyTorch."""
    env = _env(work)
    _ok([sys.executable, "-m", "venv", str(work / "venv")], env, work)
    py = work / "venv" / "bin" / "python"
    _ok([py, "-m", "pip", "install", "-q", str(dists[0])], env, work)
    return py


def test_editable_install_is_quiet_and_finds_the_source_tree(work, dists):
    """`pip install -e .`, as scripts/setup.sh runs it: no warning block (a package-dir mapping made
    setuptools fall back to a meta path finder and print one), and the installed package finds the
    source tree's Resources/ (no copy made)."""
    env = _env(work)
    src = work / "src"
    _ok([sys.executable, "-m", "venv", str(work / "venv-e")], env, work)
    py = work / "venv-e" / "bin" / "python"
    r = _ok([py, "-m", "pip", "install", "-q", "--no-deps", "-e", str(src)], env, work)
    text = r.stdout + r.stderr
    assert "!!" not in text and "Warning" not in text and "eprecat" not in text, text[-3000:]  # (setuptools warning classes)
    res = _ok([py, "-c", "from KneeReconLib.io import resources; print(resources.resources_dir())"], env, work).stdout.strip()
    assert res == str(src / "Resources") and not (src / "KneeReconLib" / "Resources").exists(), res


def _dice(pred_path, truth_path):
    from KneeReconLib.evaluation.metrics import dice_per_class

    truth = sitk.ReadImage(truth_path)
    pred = sitk.Resample(sitk.ReadImage(pred_path), truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return dice_per_class(sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(truth))


def _installed_resources(py, env, work):
    r = _ok([py, "-c", "from KneeReconLib.io import resources; print(resources.resources_dir())"], env, work)
    return r.stdout.strip()


def test_wheel_carries_its_resources(dists):
    import zipfile

    names = set(zipfile.ZipFile(dists[0]).namelist())
    for f in os.listdir(os.path.join(ROOT, "Resources", "Models")) + ["../Sample/" + s for s in os.listdir(os.path.join(ROOT, "Resources", "Sample"))]:
        if not f.startswith("."):
            assert os.path.normpath(f"KneeReconLib/Resources/Models/{f}") in names, f
    meta = zipfile.ZipFile(dists[0]).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in meta and "Requires-Dist: openvino" in meta
    assert "Requires-Dist: torch==2.13.0; extra == \"train\"" in meta
    assert not any(line.startswith("Requires-Dist: torch") and "extra" not in line for line in meta.splitlines())


def test_installed_without_torch_reconstructs_the_sample(venv, work):
    env = _env(work)
    assert _run([venv, "-c", "import torch"], env, work).returncode != 0  # really no PyTorch here
    assert _run([venv, "-c", "import skimage"], env, work).returncode != 0
    assert _run([venv, "-c", "import scipy"], env, work).returncode != 0  # not a runtime dependency any more
    res = _installed_resources(venv, env, work)
    assert res.startswith(str(work / "venv")) and res.endswith(os.path.join("KneeReconLib", "Resources")), res
    import KneeReconLib
    from KneeReconLib.models.model_card import read_card
    card = read_card(os.path.join(ROOT, "Resources", "Models", "kneerecon_unet.pt"))
    version = _ok([work / "venv" / "bin" / "kneerecon", "--version"], env, work).stdout.strip()
    assert version == f"kneerecon {KneeReconLib.__version__} (bundled model: {card['name']} {card['version']})"
    sample = os.path.join(res, "Sample")
    out = work / "out"
    r = _ok([work / "venv" / "bin" / "kneerecon", "reconstruct", "--ap", os.path.join(sample, "ap.nrrd"),
             "--lateral", os.path.join(sample, "lateral.nrrd"), "--side", "left", "--output", str(out)], env, work)
    assert "note:" not in r.stdout or "outside the trained range" not in r.stdout
    from KneeReconLib.reconstruction.outputs import OUTPUT_FILES
    assert sorted(os.listdir(out)) == sorted(OUTPUT_FILES)
    report = json.load(open(out / "report.json"))
    assert report["precision"].startswith("OpenVINO") and report["model"]["version"] == card["version"]
    d = _dice(str(out / "labels.nii.gz"), os.path.join(sample, "truth.nii.gz"))
    # the same thresholds as the source tree's test (test_reconstruct.py)
    assert d[1] > 0.85 and d[3] > 0.85 and d[2] > 0.6 and d[4] > 0.5, d
    # through the API: still no torch in sys.modules afterwards
    code = ("import sys, KneeReconLib\nfrom KneeReconLib.io import resources\n"
            "rec = KneeReconLib.reconstruct(resources.sample_path('ap.nrrd'), resources.sample_path('lateral.nrrd'), side='left')\n"
            "assert rec.volumes_ml['femur'] > 50, rec.volumes_ml\n"
            "assert not {'torch', 'skimage', 'scipy'} & set(sys.modules), sorted(sys.modules)\n"
            "print('ok', rec.precision)")
    assert _ok([venv, "-c", code], env, work).stdout.startswith("ok OpenVINO")


def test_installed_without_torch_says_how_to_convert_a_new_model(venv, work):
    env = _env(work)
    model = work / "mine.pt"
    shutil.copy(os.path.join(ROOT, "Resources", "Models", "kneerecon_unet.pt"), model)  # no converted network beside it
    sample = os.path.join(_installed_resources(venv, env, work), "Sample")
    r = _run([work / "venv" / "bin" / "kneerecon", "reconstruct", "--ap", os.path.join(sample, "ap.nrrd"),
              "--lateral", os.path.join(sample, "lateral.nrrd"), "--model", str(model), "--output", str(work / "o2")],
             env, work)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert f"kneerecon export-openvino --model {model}" in r.stderr and "kneerecon[train]" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = _run([work / "venv" / "bin" / "kneerecon", "export-openvino", "--model", str(model)], env, work)
    assert r.returncode == 2 and "kneerecon[train]" in r.stderr, r.stderr[-2000:]


def test_sdist_installs_with_its_resources(venv, dists, work):
    env = _env(work)
    _ok([venv, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(dists[1])], env, work)
    res = _installed_resources(venv, env, work)
    assert res.startswith(str(work / "venv")), res
    for d in ("Models", "Sample"):
        assert sorted(os.listdir(os.path.join(res, d))) == sorted(
            f for f in os.listdir(os.path.join(ROOT, "Resources", d)) if not f.startswith("."))
    assert _ok([work / "venv" / "bin" / "kneerecon", "--version"], env, work).stdout.startswith("kneerecon ")


def test_train_extra_trains_and_converts_on_first_use(venv, dists, work):
    env = _env(work, OMP_NUM_THREADS="1")
    _ok([venv, "-m", "pip", "install", "-q", f"{dists[0]}[train]"], env, work)
    kr = work / "venv" / "bin" / "kneerecon"
    assert _ok([venv, "-c", "import torch; print(torch.__version__)"], env, work).stdout.startswith("2.13.0")
    _ok([kr, "cache", "--output", str(work / "cache"), "--count", "2", "--seed", "100", "--grid-size", "32"], env, work)
    _ok([kr, "train", "--data", str(work / "cache"), "--output", str(work / "run"), "--steps", "4", "--grid-size", "32",
         "--crop", "0", "--batch-size", "1", "--widths", "4,8,16", "--warmup", "1", "--val-every", "1000",
         "--ckpt-every", "2", "--log-every", "1", "--workers", "0", "--threads", "1"], env, work)
    model = work / "run" / "model.pt"
    log = (work / "run" / "log.csv").read_text().splitlines()
    assert len(log) >= 5 and all(np.isfinite(float(row.split(",")[1])) for row in log[1:]), log[:3]
    # a model of one's own: its converted network is made on first use (PyTorch is there now) and cached
    sample = os.path.join(_installed_resources(venv, env, work), "Sample")
    _ok([kr, "reconstruct", "--ap", os.path.join(sample, "ap.nrrd"), "--lateral", os.path.join(sample, "lateral.nrrd"),
         "--side", "left", "--model", str(model), "--output", str(work / "o3")], env, work)
    assert list((work / "kneerecon-cache" / "openvino").glob("*.xml"))
    assert json.load(open(work / "o3" / "report.json"))["precision"].startswith("OpenVINO")
