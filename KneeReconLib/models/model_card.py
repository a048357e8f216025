"""A model file's card (name, version, architecture, grid size...) read without PyTorch.

A KneeRecon model file is a `torch.save` zip archive of plain containers (checkpoint.py). Its
card is a JSON string inside the pickled dict, so it can be read with the standard library: the
archive's data.pkl is unpickled by an unpickler that allows no class or function but
`collections.OrderedDict` and stand-ins for PyTorch's tensor and storage rebuilders (the weights
are never read). Like `torch.load(weights_only=True)`, it runs no code from the file. This is what
reconstruction with the OpenVINO backend, `kneerecon --version` and the Slicer module use, so
they need no PyTorch; PyTorch's loader (checkpoint.read_model_file) is used where the weights are
needed, and both check a file the same way (`check_blob`)."""
from __future__ import annotations

import collections
import json
import os
import pickle
import zipfile

from ..core.errors import KneeReconError

FORMAT = "kneerecon.model"
FORMAT_VERSION = 1


def _tensor_stand_in(*args, **kwargs):
    return None


class _CardUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" or module.startswith("torch."):  # tensors, storages, sizes: not read
            return _tensor_stand_in
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a model file")

    def persistent_load(self, pid):  # a tensor's storage (the weights), not read
        return None


def _data_pkl(z: zipfile.ZipFile) -> str:
    names = [n for n in z.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(names) != 1:
        raise ValueError("no data.pkl in the archive")
    return names[0]


def check_blob(blob, path: str) -> dict:
    """The checks every reader of a model file makes (format marker, version, card); returns the
    blob with its card parsed."""
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise KneeReconError(f"{path!r} is not a KneeRecon model file (no '{FORMAT}' format marker)")
    if int(blob.get("format_version", -1)) > FORMAT_VERSION:
        raise KneeReconError(f"{path!r} has model format version {blob.get('format_version')}; this KneeRecon reads "
                             f"up to version {FORMAT_VERSION}: update KneeRecon")
    try:
        blob["card"] = json.loads(blob["card"])
    except (KeyError, TypeError, ValueError):
        raise KneeReconError(f"{path!r} has no readable model card")
    return blob


def read_card(path: str) -> dict:
    """The card of a KneeRecon model file, without PyTorch."""
    if not os.path.isfile(path):
        raise KneeReconError(f"model file {path!r} does not exist")
    try:
        with zipfile.ZipFile(path) as z, z.open(_data_pkl(z)) as f:
            blob = _CardUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - any failure here means "not a KneeRecon model file"
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise KneeReconError(f"{path!r} is not a KneeRecon model file (or it holds pickled code, which is "
                             f"refused): {msg}")
    return check_blob(blob, path)["card"]


def reconstruction_card(path: str) -> dict:
    """read_card, refusing models of another kind (a style model passed as --model)."""
    card = read_card(path)
    if card.get("kind", "reconstruction") != "reconstruction":
        raise KneeReconError(f"{path!r} is a {card.get('kind')} model, not a reconstruction model "
                             "(a style model goes to --style)")
    return card


def network_divisor(architecture: dict) -> int:
    """What each grid dimension must be divisible by for this network (UNet3D and ChenNet: 2**(levels-1))."""
    default = (16, 32, 64, 128) if architecture.get("kind") == "chen" else (8, 16, 32, 64, 128)  # the configs' defaults
    return 2 ** (len(architecture.get("widths") or default) - 1)


def describe(card: dict) -> str:
    """'name version' of a card, for --version and reports."""
    return " ".join(str(x) for x in (card.get("name") or "unnamed model", card.get("version") or "") if x)
