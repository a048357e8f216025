"""Model files that carry their model card, loaded without executing code.

A model file is a `torch.save` of plain containers: {"format", "format_version", "card"
(a JSON string), "state_dict"}. It is read with `torch.load(weights_only=True)`, which refuses
pickled code: model files get shared between sites, and a pickled checkpoint is a program.
"""
from __future__ import annotations

import json
import os

import torch

from ..core.errors import KneeReconError
from ..io.fileio import atomic_path
from .factory import build_network

from .model_card import FORMAT, FORMAT_VERSION, check_blob  # one definition of the format, read without torch too


def save_model(path: str, model: torch.nn.Module, card: dict, half: bool = True, extra: dict | None = None) -> None:
    """Write weights (fp16 unless half=False) with the card; `extra` adds resumable training state."""
    sd = {k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in model.state_dict().items()}
    blob = {"format": FORMAT, "format_version": FORMAT_VERSION, "card": json.dumps(card), "state_dict": sd}
    if extra:
        blob.update(extra)
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def read_model_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise KneeReconError(f"model file {path!r} does not exist")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means "not a KneeRecon model file"
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise KneeReconError(f"{path!r} is not a KneeRecon model file (or it holds pickled code, which is "
                             f"refused): {msg}")
    return check_blob(blob, path)


def load_model(path: str, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """(network in eval mode, card) from a model file; the card's architecture says which network."""
    blob = read_model_file(path)
    card = blob["card"]
    if card.get("kind", "reconstruction") != "reconstruction":
        raise KneeReconError(f"{path!r} is a {card.get('kind')} model, not a reconstruction model "
                             "(a style model goes to --style)")
    try:
        with torch.device("meta"):  # no random initialisation: every tensor comes from the file
            net = build_network(card["architecture"])
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()},
                            assign=True)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise KneeReconError(f"{path!r}: the weights do not match the architecture in its card ({str(e)[:200]})")
    return net.to(device).eval(), card
