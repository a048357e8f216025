"""Packaging, checked without building anything: the Slicer extension's CMake files name every file
the installed module needs, the wheel's configuration carries every package and bundled file, the
Extensions Index entry is well formed, and there is one version. (Building and installing a wheel
into a fresh environment: test_wheel.py.)"""
import glob
import json
import os
import re
import shutil
import subprocess
import tomllib

import pytest

from conftest import ROOT

LIB = os.path.join(ROOT, "KneeReconLib")


def _tracked(folder):
    """Files under `folder` (relative to it), as they would be checked out: no caches, no hidden files."""
    out = set()
    for d, dirs, files in os.walk(folder):
        dirs[:] = [x for x in dirs if x != "__pycache__" and not x.startswith(".")]
        out |= {os.path.relpath(os.path.join(d, f), folder) for f in files if not f.startswith(".") and not f.endswith(".pyc")}
    return out


def library_modules():
    """Every module of KneeReconLib and of any subpackage it gets (found by globbing, so that moving
    modules into subpackages cannot escape the checks)."""
    return {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(LIB, "**", "*.py"), recursive=True)
            if "__pycache__" not in p}


def _cmake_lists_by_python():
    """The lists of KneeRecon/KneeReconFiles.cmake read without CMake (the set() lists, and the glob
    evaluated as CMake's GLOB_RECURSE does)."""
    text = open(os.path.join(ROOT, "KneeRecon", "KneeReconFiles.cmake")).read()
    text = re.sub(r"#[^\n]*", "", text)
    lists = {m.group(1): m.group(2).split() for m in re.finditer(r"set\((\w+)\s+([^)]*)\)", text)}
    m = re.search(r"file\(GLOB_RECURSE (\w+) RELATIVE \$\{KNEERECON_SOURCE_ROOT\} \$\{KNEERECON_SOURCE_ROOT\}/(\S+)\)", text)
    assert m, "KneeReconFiles.cmake no longer globs the library recursively"
    lists[m.group(1)] = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, m.group(2).replace("*.py", "**/*.py")),
                                                                      recursive=True) if "/__pycache__/" not in p]
    return lists


def _cmake_lists_by_cmake(tmp_path):
    script = tmp_path / "print.cmake"
    script.write_text(f'set(KNEERECON_SOURCE_ROOT "{ROOT}")\ninclude("{ROOT}/KneeRecon/KneeReconFiles.cmake")\n'
                      'foreach(v KNEERECON_MODULE_RESOURCES KNEERECON_BUNDLED_RESOURCES KNEERECONLIB_SCRIPTS)\n'
                      '  message("${v}=${${v}}")\nendforeach()\n')
    r = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return {k: v.split(";") for k, v in (line.split("=", 1) for line in r.stderr.strip().splitlines())}


def test_cmake_names_every_file_the_module_needs(tmp_path):
    variants = [_cmake_lists_by_python()]
    if shutil.which("cmake"):  # the real thing where CMake is installed (it is on this project's machines)
        variants.append(_cmake_lists_by_cmake(tmp_path))
    module_res = _tracked(os.path.join(ROOT, "KneeRecon", "Resources"))
    bundled = _tracked(os.path.join(ROOT, "Resources"))
    assert {"Icons/KneeRecon.png", "UI/KneeRecon.ui"} <= module_res
    assert {"Models/kneerecon_unet.pt", "Models/kneerecon_unet.openvino.xml", "Models/kneerecon_unet.openvino.bin",
            "Models/MODEL_CARD.md", "Sample/ap.nrrd", "Sample/lateral.nrrd", "Sample/truth.nii.gz"} <= bundled
    modules = library_modules()
    assert {"KneeReconLib/__init__.py", "KneeReconLib/io/resources.py", "KneeReconLib/models/model_card.py",
            "KneeReconLib/reconstruction/inference.py"} <= modules
    for lists in variants:
        assert set(lists["KNEERECON_MODULE_RESOURCES"]) == {"Resources/" + f for f in module_res}
        assert set(lists["KNEERECON_BUNDLED_RESOURCES"]) == bundled
        assert set(lists["KNEERECONLIB_SCRIPTS"]) == modules
    # and the build uses the lists (a list nobody installs would check nothing)
    cm = open(os.path.join(ROOT, "KneeRecon", "CMakeLists.txt")).read()
    assert "include(${CMAKE_CURRENT_SOURCE_DIR}/KneeReconFiles.cmake)" in cm
    for var in ("KNEERECON_MODULE_RESOURCES", "KNEERECON_BUNDLED_RESOURCES", "KNEERECONLIB_SCRIPTS"):
        assert f"${{{var}}}" in cm, var
    assert cm.count("install(FILES") == 2
    assert "add_subdirectory(KneeRecon)" in open(os.path.join(ROOT, "CMakeLists.txt")).read()


def _pyproject():
    return tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))


def _setup_py():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kneerecon_setup_py", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # (setup() runs only as __main__, as setuptools runs it)
    return mod


def test_wheel_configuration_carries_every_package_and_bundled_file():
    st = _pyproject()["tool"]["setuptools"]
    packages = set(st["packages"])
    subpackages = {os.path.relpath(os.path.dirname(p), ROOT).replace(os.sep, ".")
                   for p in glob.glob(os.path.join(LIB, "**", "__init__.py"), recursive=True)}
    assert subpackages <= packages, f"packages missing from pyproject.toml: {subpackages - packages}"
    # no package mapped onto another folder: `pip install -e .` stays a plain .pth entry (a mapping makes
    # setuptools use a meta path finder and print a warning block on every set-up)
    assert st.get("package-dir") == {"": "."} and "package-data" not in st
    # Resources/ is the one copy in the repository: setup.py's build step copies every file of it into the
    # wheel's KneeReconLib/Resources/, MANIFEST.in takes it into the sdist
    assert not os.path.exists(os.path.join(LIB, "Resources"))
    setup_py = _setup_py()
    assert set(setup_py.bundled_files(ROOT)) == _tracked(os.path.join(ROOT, "Resources"))
    assert setup_py.BuildPyWithResources.__mro__[1].__name__ == "build_py"
    assert "graft Resources" in open(os.path.join(ROOT, "MANIFEST.in")).read().splitlines()


def test_dependencies_version_and_licence():
    import KneeReconLib

    proj = _pyproject()["project"]
    assert proj["dynamic"] == ["version"] and "version" not in proj
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "KneeReconLib.__version__"}
    assert KneeReconLib.__version__ == "0.7.0"
    assert proj["license"] == "Apache-2.0" and "license-files" not in proj  # SPDX expression (setuptools >= 77)
    runtime = {re.split(r"[<>=!~ \[]", d)[0].lower() for d in proj["dependencies"]}
    assert not runtime & {"torch", "scikit-image", "scipy"} and "openvino" in runtime
    extras = proj["optional-dependencies"]
    assert "torch==2.13.0" in extras["train"] and set(extras) >= {"train", "anatomy", "test", "mrml"}
    assert any(d.startswith("slicer-core==") for d in extras["mrml"])
    req = open(os.path.join(ROOT, "requirements.txt")).read()
    pins = {re.split(r"[<>=!~ \[]", line)[0].lower() for line in req.splitlines() if line and line[0] not in "#-"}
    assert not pins & {"torch", "scikit-image", "scipy"} and "openvino==" in req, pins
    assert "scipy==" in open(os.path.join(ROOT, "requirements-train.txt")).read()
    assert "torch==2.13.0" in open(os.path.join(ROOT, "requirements-train.txt")).read()
    assert "-r requirements-train.txt" in open(os.path.join(ROOT, "requirements-test.txt")).read()
    # README's two commands are still the two commands, and CI runs the second
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in open(os.path.join(ROOT, ".ci", "run")).read()


def test_version_command(capsys):
    from KneeReconLib import __version__
    from KneeReconLib.cli import main
    from KneeReconLib.io.resources import model_path
    from KneeReconLib.models.model_card import read_card

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    card = read_card(model_path())
    assert capsys.readouterr().out.strip() == f"kneerecon {__version__} (bundled model: {card['name']} {card['version']})"


def test_bundled_files_found_in_each_layout(tmp_path, monkeypatch):
    from KneeReconLib.io import resources

    # the source tree (and an editable install): Resources/ beside the package
    assert resources.resources_dir() == os.path.join(ROOT, "Resources")
    assert os.path.isfile(resources.model_path()) and os.path.isfile(resources.sample_path("ap.nrrd"))
    # a wheel: the package's own Resources/ comes first
    pkg = tmp_path / "site" / "KneeReconLib"
    (pkg / "Resources" / "Models").mkdir(parents=True)
    monkeypatch.setattr(resources, "package_dir", lambda: str(pkg))
    assert resources.resources_dir() == str(pkg / "Resources")
    # the Slicer module's installed layout: <lib>/KneeReconLib beside <lib>/Resources
    shutil.rmtree(pkg / "Resources")
    (tmp_path / "site" / "Resources" / "Models").mkdir(parents=True)
    assert resources.resources_dir() == str(tmp_path / "site" / "Resources")
    # an explicit folder overrides both
    monkeypatch.setenv("KNEERECON_RESOURCES", str(tmp_path / "mine"))
    (tmp_path / "mine" / "Models").mkdir(parents=True)
    assert resources.model_path() == str(tmp_path / "mine" / "Models" / "kneerecon_unet.pt")


def test_extension_index_entry():
    """KneeRecon.json, the entry the Slicer Extensions Index takes (schema v1.0.2: these keys only),
    agrees with the extension's CMake metadata; the icon and screenshots it points to exist."""
    from PIL import Image

    entry = json.load(open(os.path.join(ROOT, "KneeRecon.json")))
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    assert entry["build_dependencies"] == []  # PyTorch is optional now
    assert entry["build_subdirectory"] == "." and 1 <= entry["tier"] <= 5
    cm = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    meta = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', cm))
    assert meta["EXTENSION_CATEGORY"] == entry["category"]
    assert meta["EXTENSION_DEPENDS"] == "NA"
    assert meta["EXTENSION_HOMEPAGE"].startswith(entry["scm_url"])
    urls = [meta["EXTENSION_ICONURL"]] + meta["EXTENSION_SCREENSHOTURLS"].split()
    prefix = entry["scm_url"].replace("https://github.com/", "https://raw.githubusercontent.com/") + f"/{entry['scm_revision']}/"
    for url in urls:
        assert url.startswith(prefix), url
        assert os.path.isfile(os.path.join(ROOT, url[len(prefix):])), url
    icon = Image.open(os.path.join(ROOT, meta["EXTENSION_ICONURL"][len(prefix):]))
    assert icon.format == "PNG" and icon.size == (128, 128)
