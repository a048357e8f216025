"""Build hook (everything else is in pyproject.toml): the repository keeps its bundled files once, in
the top-level Resources/ (DESIGN.md); a wheel carries them as KneeReconLib/Resources/, copied there
while the wheel is built. KneeReconLib/io/resources.py finds them in either place.

Why not a package-dir mapping of KneeReconLib.Resources onto Resources/ in pyproject.toml: with it
the layout is not "simple" to setuptools, so `pip install -e .` falls back to a meta path finder and
prints a warning block on every set-up. An editable install needs no copy (resources.py finds
Resources/ beside the package); an sdist carries Resources/ through MANIFEST.in."""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
RESOURCES = "Resources"
PACKAGE = "KneeReconLib"


def bundled_files(root: str = HERE) -> list[str]:
    """Files under Resources/ that ship (relative to it): all of them but hidden files and caches."""
    out = []
    for d, dirs, files in os.walk(os.path.join(root, RESOURCES)):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x != "__pycache__")
        out += [os.path.relpath(os.path.join(d, f), os.path.join(root, RESOURCES))
                for f in sorted(files) if not f.startswith(".") and not f.endswith(".pyc")]
    return out


class BuildPyWithResources(build_py):
    """build_py, then Resources/ copied into the built package (not for editable installs)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        files = bundled_files()
        if not files:
            raise SystemExit(f"{os.path.join(HERE, RESOURCES)} is missing or empty: the wheel would have no models")
        for rel in files:
            dst = os.path.join(self.build_lib, PACKAGE, RESOURCES, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.join(HERE, RESOURCES, rel), dst)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return outputs + [os.path.join(self.build_lib, PACKAGE, RESOURCES, rel) for rel in bundled_files()]


if __name__ == "__main__":  # (setuptools runs this file as __main__; tests import bundled_files)
    setup(cmdclass={"build_py": BuildPyWithResources})
