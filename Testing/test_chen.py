"""ChenNet (Chen et al. 2020: a 2D encoder per view, a 3D decoder) through the shared pipeline:
shapes, what it reads, BatchNorm folding, model files, training and inference."""
import csv

import numpy as np
import pytest
import torch
from conftest import tiny_train_config

from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.models.checkpoint import load_model, save_model
from KneeReconLib.models.chen_net import ChenNet, ChenNetConfig
from KneeReconLib.models.factory import build_network
from KneeReconLib.models.network import UNet3D, fold_batchnorm, to_channels_last
from KneeReconLib.training.train import train

TINY = {"kind": "chen", "in_channels": 2, "num_classes": 5, "widths": [4, 8, 16], "activation": "relu"}
SMALL = {**TINY, "widths": [8, 16, 32]}  # decoder widths 4, 8, 16: wide enough that no layer is all dead ReLUs


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cfg(cache, out, **kw):
    return tiny_train_config(cache, out, TINY, **kw)


def _randomise_batchnorm(net: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)


@pytest.mark.parametrize("shape", [(80, 80, 80), (32, 128, 128)], ids=["cubic-crop", "slab"])
def test_default_chennet_maps_training_crops_to_logits(shape):
    net = ChenNet().eval()
    assert all(s % net.divisor == 0 for s in shape)
    with torch.no_grad():
        out = net(torch.randn(1, 2, *shape))
    assert out.shape == (1, 5) + shape
    # about the U-Net's size or smaller
    assert sum(p.numel() for p in net.parameters()) <= sum(p.numel() for p in UNet3D().parameters())


def test_the_network_sees_only_the_two_images():
    torch.manual_seed(0)
    net = ChenNet(ChenNetConfig.from_dict(SMALL)).eval()
    _randomise_batchnorm(net)
    z, y, x = 16, 20, 24
    a = torch.randn(2, 2, z, y, x)
    b = torch.randn(2, 2, z, y, x)  # differs everywhere ...
    b[:, 0, :, y // 2, :] = a[:, 0, :, y // 2, :]  # ... except the AP image (y-centre slice of channel 0)
    b[:, 1, :, :, x // 2] = a[:, 1, :, :, x // 2]  # ... and the lateral image (x-centre slice of channel 1)
    with torch.no_grad():
        out = net(a)
        assert out.std(dim=(2, 3, 4)).min() > 0  # a real, spatially varying output
        assert torch.equal(out, net(b))
        c = a.clone()
        c[:, 0, :, y // 2, :] += 1.0  # another AP image: another output
        assert not torch.allclose(out, net(c))


def test_folded_batchnorm_gives_the_same_output():
    torch.manual_seed(1)
    net = ChenNet().eval()
    _randomise_batchnorm(net)
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    x = torch.randn(1, 2, 16, 32, 24)
    with torch.no_grad():
        ref = net(x)
        assert torch.allclose(folded(x), ref, atol=1e-4)
        # and in the inference path's layout (channels-last weights and input)
        cl = to_channels_last(fold_batchnorm(net))
        assert torch.allclose(cl(x.contiguous(memory_format=torch.channels_last_3d)), ref, atol=1e-4)


def test_model_file_round_trip_builds_a_chennet(tmp_path):
    torch.manual_seed(2)
    net = ChenNet(ChenNetConfig.from_dict(SMALL)).eval()
    _randomise_batchnorm(net)
    path = str(tmp_path / "chen.pt")
    save_model(path, net, {"name": "test", "architecture": net.config.to_dict(), "grid_size": 32}, half=False)
    loaded, card = load_model(path)
    assert isinstance(loaded, ChenNet) and not loaded.training
    assert loaded.config == net.config and card["architecture"]["kind"] == "chen"
    x = torch.randn(1, 2, 16, 16, 16)
    with torch.no_grad():
        out = net(x)
        assert out.std() > 0 and torch.equal(loaded(x), out)


def test_build_network_dispatches_on_kind(bundled_model, tmp_path):
    assert isinstance(build_network({"widths": [4, 8]}), UNet3D)  # cards from before "kind" existed
    assert isinstance(build_network({"kind": "unet", "widths": [4, 8]}), UNet3D)
    assert isinstance(build_network(TINY), ChenNet)
    with pytest.raises(KneeReconError, match="unknown network kind"):
        build_network({"kind": "transformer"})
    net, card = load_model(bundled_model)
    assert isinstance(net, UNet3D) and card["architecture"].get("kind", "unet") == "unet"
    # a model file written before "kind" existed (0.1.0's card) still loads as the U-Net
    arch = {k: v for k, v in card["architecture"].items() if k != "kind"}
    old_file = str(tmp_path / "old.pt")
    save_model(old_file, net, {**card, "architecture": arch})
    assert isinstance(load_model(old_file)[0], UNet3D)


def test_training_lowers_the_loss_and_the_model_reconstructs(tiny_cache, tmp_path):
    from KneeReconLib.reconstruction.inference import Reconstructor

    final = train(_cfg(tiny_cache, tmp_path, steps=40, ckpt_every=40), log=lambda m: None)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    first = sum(float(r["loss"]) for r in rows[:5]) / 5
    last = sum(float(r["loss"]) for r in rows[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    assert final == str(tmp_path / "model.pt")
    rec = Reconstructor(final)
    assert isinstance(rec.net, ChenNet) and rec.divisor == 4
    vol = np.random.default_rng(0).random((2, 32, 32, 32), dtype=np.float32)
    labels = rec.predict(vol)
    assert labels.shape == (32, 32, 32) and labels.dtype == np.uint8 and labels.max() < 5


def test_cli_train_arch_chen(tiny_cache, tmp_path):
    from KneeReconLib.cli import main
    from KneeReconLib.models.checkpoint import read_model_file

    out = tmp_path / "cli"
    code = main(["train", "--arch", "chen", "--widths", "4,8,16", "--data", tiny_cache, "--output", str(out),
                 "--steps", "2", "--crop", "0", "--grid-size", "32", "--workers", "0", "--threads", "1",
                 "--warmup", "1", "--log-every", "1", "--ckpt-every", "2"])
    assert code == 0
    arch = read_model_file(str(out / "model.pt"))["card"]["architecture"]
    assert arch["kind"] == "chen" and arch["widths"] == [4, 8, 16] and arch["decoder_widths"] == [2, 4, 8]
