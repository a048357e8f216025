import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_train_config

from KneeReconLib.models.checkpoint import read_model_file
from KneeReconLib.training.train import train

TINY = {"in_channels": 2, "num_classes": 5, "widths": [4, 8, 16], "activation": "relu", "upsample": "trilinear"}


def _cfg(cache, out, **kw):
    return tiny_train_config(cache, out, TINY, **kw)


def _weights(path):
    return read_model_file(path)["state_dict"]


def test_training_lowers_the_loss(tiny_cache, tmp_path):
    import csv
    train(_cfg(tiny_cache, tmp_path, steps=40, ckpt_every=40, ngcc_lambda=0.3), log=lambda m: None)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    for key, factor in (("wce", 0.8), ("loss", 0.9)):  # the supervised term, and the total with Dice + NGCC
        first = sum(float(r[key]) for r in rows[:5]) / 5
        last = sum(float(r[key]) for r in rows[-5:]) / 5
        assert last < factor * first, (key, first, last)
    assert float(rows[-1]["ngcc"]) > 0  # the NGCC term was active (full-grid volumes)
    assert os.path.exists(tmp_path / "curves.png") and os.path.exists(tmp_path / "model.pt")


# bf16 on CPU is bit-reproducible only while the crop shape stays fixed (oneDNN's kernel choice depends on
# the shapes it has seen), so the mixed-shape case is checked in fp32
@pytest.mark.parametrize("extra", [{}, {"ema_decay": 0.9, "slab_p": 0.5, "slab_depth": 8, "crop": (16, 16, 16),
                                    "ngcc_lambda": 0.2, "amp": False}], ids=["plain", "ema+slabs+ngcc-fp32"])
def test_resume_reproduces_uninterrupted_run(tiny_cache, tmp_path, extra):
    full = train(_cfg(tiny_cache, tmp_path / "a", **extra), log=lambda m: None)
    ck = train(_cfg(tiny_cache, tmp_path / "b", **extra), log=lambda m: None, stop_at=4)
    assert ck.endswith("checkpoint.pt") and read_model_file(ck)["step"] == 4
    assert ("ema" in read_model_file(ck)) == bool(extra)
    resumed = train(_cfg(tiny_cache, tmp_path / "b", **extra), resume=True, log=lambda m: None)
    wa, wb = _weights(full), _weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # and a run that never stopped differs from a fresh one with another seed
    other = train(_cfg(tiny_cache, tmp_path / "c", seed=5, **extra), log=lambda m: None)
    assert any(not torch.equal(wa[k], _weights(other)[k]) for k in wa if wa[k].is_floating_point())


def test_ema_model_is_the_average_and_slabs_are_mixed(tiny_cache, tmp_path):
    from KneeReconLib.training.train import _crop_shape
    cfg = _cfg(tiny_cache, tmp_path, crop=(16, 16, 16), slab_p=0.5, slab_depth=8, batch_size=1)
    shapes = [_crop_shape(cfg, i) for i in range(200)]
    n_slab = sum(s == (8, 32, 32) for s in shapes)
    assert 60 < n_slab < 140 and all(s in ((8, 32, 32), (16, 16, 16)) for s in shapes)
    # EMA on: the final weights are the average, not the last iterate (BatchNorm re-estimation off to compare)
    train(_cfg(tiny_cache, tmp_path / "e", steps=16, ema_decay=0.9, bn_recalibration=0), log=lambda m: None)
    ck = read_model_file(str(tmp_path / "e" / "checkpoint.pt"))
    final = _weights(str(tmp_path / "e" / "model.pt"))
    convs = [k for k in final if k.endswith("weight") and final[k].ndim == 5]

    def gap(a, b):
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in convs)
    # model.pt holds the EMA (up to its fp16 storage), far from the last iterate
    assert gap(final, ck["ema"]) < 5e-4
    assert gap(final, ck["state_dict"]) > 5 * gap(final, ck["ema"])


def test_ddp_two_cpu_processes_train_one_model(tiny_cache, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "KneeReconLib", "train", "--data", tiny_cache, "--output", str(out), "--steps", "4", "--crop", "0",
           "--grid-size", "32", "--widths", "4,8,16", "--workers", "0", "--threads", "1", "--ckpt-every", "2",
           "--batch-size", "1", "--log-every", "1"]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    d0 = (out / "weights_rank0.sha256").read_text()
    d1 = (out / "weights_rank1.sha256").read_text()
    assert d0 == d1  # one shared model
    import csv
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert float(rows[-1]["samples_per_s"]) > 0 and len(rows) == 4
    assert os.path.exists(out / "model.pt")


def test_widening_keeps_the_function_and_training_grows_the_new_channels(tiny_cache, tmp_path):
    """A U-Net widened with models/widen.py computes what the narrow one computed (same logits),
    and `train --init-from narrow --widths wider` starts there and then uses the new channels."""
    from KneeReconLib.models.factory import build_network
    from KneeReconLib.models.widen import widen_unet

    narrow_path = train(_cfg(tiny_cache, tmp_path / "narrow", steps=6), log=lambda m: None)
    narrow = build_network(TINY)
    narrow.load_state_dict({k: v.float() for k, v in _weights(narrow_path).items()})
    narrow.eval()
    wide = widen_unet(narrow, (6, 12, 24)).eval()
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        a, b = narrow(x), wide(x)
    assert sum(p.numel() for p in wide.parameters()) > 1.8 * sum(p.numel() for p in narrow.parameters())
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    with pytest.raises(ValueError):
        widen_unet(narrow, (2, 8, 16))  # narrower than the model
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    widen_unet(narrow, (6, 12, 24))
    assert torch.equal(torch.rand(1), expected)  # the caller's random stream is left alone
    # through training: logged as widened, and the weights from new channels into old ones no longer zero
    logs = []
    wide_arch = {**TINY, "widths": [6, 12, 24]}
    out = train(tiny_train_config(tiny_cache, tmp_path / "wide", wide_arch, steps=6, init_from=narrow_path, amp=False),
                log=logs.append)
    assert any("widened (4, 8, 16) -> (6, 12, 24)" in m for m in logs)
    w = _weights(out)["head.weight"].float()  # [classes, 6, 1, 1, 1]: columns 4-5 started at zero
    assert w.shape[1] == 6 and w[:, 4:].abs().max() > 0
    # a narrower network cannot start from it: a clear error, not a state-dict traceback
    from KneeReconLib.core.errors import KneeReconError
    with pytest.raises(KneeReconError, match="does not fit the one to train"):
        train(tiny_train_config(tiny_cache, tmp_path / "narrower", {**TINY, "widths": [2, 8, 16]}, steps=2,
                                init_from=narrow_path), log=lambda m: None)
