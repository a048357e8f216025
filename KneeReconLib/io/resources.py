"""Where the bundled files are (models, model card, converted networks, the sample X-ray pair).

The repository keeps them in one place, the top-level `Resources/` (DESIGN.md). Every layout
KneeRecon runs from finds them through `resources_dir()`:
- a wheel or sdist install: package data in `KneeReconLib/Resources/` (pyproject.toml maps the
  repository's `Resources/` there at build time), found through importlib.resources;
- the source tree, an editable install and the Slicer module's installed layout (CMake installs
  `Resources/` beside the `KneeReconLib/` folder): `Resources/` beside the package;
- `$KNEERECON_RESOURCES`, when set, before both.
Only the standard library is imported here, so that any entry point can use it at no cost."""
from __future__ import annotations

import os
from importlib import resources as _resources

PACKAGE = __name__.split(".")[0]  # "KneeReconLib", wherever in the package this module lives
MODELS = "Models"
SAMPLE = "Sample"
UNET = "kneerecon_unet.pt"
CHEN = "kneerecon_chen.pt"
STYLE = "kneerecon_style.pt"
SAMPLE_FILES = ("ap.nrrd", "lateral.nrrd", "truth.nii.gz", "meta.json")


def package_dir() -> str:
    """The KneeReconLib package folder (its top level, not this module's subpackage)."""
    try:
        return os.fspath(_resources.files(PACKAGE))
    except (TypeError, ModuleNotFoundError):  # not importable as a package of files: fall back to this file
        here = os.path.dirname(os.path.abspath(__file__))
        while os.path.basename(here) != PACKAGE and os.path.dirname(here) != here:
            here = os.path.dirname(here)
        return here


def candidate_dirs() -> list[str]:
    """Where Resources/ may be, in the order they are tried."""
    pkg = package_dir()
    dirs = [os.environ["KNEERECON_RESOURCES"]] if os.environ.get("KNEERECON_RESOURCES") else []
    dirs += [os.path.join(pkg, "Resources"), os.path.join(os.path.dirname(pkg), "Resources")]
    return [os.path.normpath(d) for d in dirs]


def resources_dir() -> str:
    """The first candidate folder that holds the bundled models (else the first candidate, so that
    error messages name a concrete path)."""
    dirs = candidate_dirs()
    for d in dirs:
        if os.path.isdir(os.path.join(d, MODELS)):
            return d
    return dirs[0]


def resource_path(*parts: str) -> str:
    """Path of a bundled file, e.g. resource_path("Models", "kneerecon_unet.pt") (it may not exist)."""
    return os.path.join(resources_dir(), *parts)


def model_path(name: str = UNET) -> str:
    return resource_path(MODELS, name)


def sample_path(name: str) -> str:
    """One of the sample pair's files: ap.nrrd, lateral.nrrd, truth.nii.gz, meta.json."""
    return resource_path(SAMPLE, name)
