"""Writing files so that a crash never leaves a half-written output: temp file, then rename."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager

import SimpleITK as sitk


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path` (same extension); rename onto `path` on success."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = "".join(name.partition(".")[1:]) if "." in name else ""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be readable like any file
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_image(image: sitk.Image, path: str, compress: bool = True) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, tmp, compress)


def atomic_write_json(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
