"""The numerics of the analysis scripts (scripts/error_analysis.py, scripts/calibrate_class_bias.py):
the numbers in docs/error_analysis.json and docs/class_offsets.json come from these functions."""
import importlib.util
import os

import numpy as np

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_best_shift_dice_finds_a_known_misplacement():
    ea = _script("error_analysis")
    truth = np.zeros((40, 40, 40), bool)
    truth[10:25, 12:20, 8:30] = True
    moved = ea.shifted(truth, (2, -1, 3))
    assert moved.sum() == truth.sum() and not (moved & ~ea.shifted(np.ones_like(truth), (2, -1, 3))).any()
    d0 = ea.dice(moved, truth)
    d1, s = ea.best_shift_dice(moved, truth, reach=3)
    assert d0 < 0.75 and d1 == 1.0 and s == (-2, 1, -3)
    d2, _ = ea.best_shift_dice(moved, truth, reach=1)  # out of reach on two axes: better, not perfect
    assert d0 < d2 < 1.0


def test_class_offset_band_dice_equals_the_full_argmax():
    cb = _script("calibrate_class_bias")
    rng = np.random.default_rng(0)
    scores = rng.normal(0, 3, (cb.K, 12, 14, 16)).astype(np.float32)
    truth = rng.integers(0, cb.K, (12, 14, 16)).astype(np.uint8)
    band = cb.Band(scores, truth)
    assert 0 < len(band.band_truth) < truth.size  # some voxels are decided beyond any searched offset
    for off in (np.zeros(cb.K, np.float32), np.array([0, -0.7, 1.2, 0.3, -1.5], np.float32)):
        pred = (scores + off[:, None, None, None]).argmax(0)
        full = [2.0 * ((pred == k) & (truth == k)).sum() / ((pred == k).sum() + (truth == k).sum()) for k in range(1, cb.K)]
        assert np.allclose(band.dice(off), full)


def _tiny_model(path, seed, widths=(4, 8)):
    import torch
    from KneeReconLib.models.checkpoint import save_model
    from KneeReconLib.models.factory import build_network
    torch.manual_seed(seed)
    arch = {"kind": "unet", "in_channels": 2, "num_classes": 5, "widths": list(widths)}
    net = build_network(arch)
    for m in net.modules():  # non-trivial BatchNorm statistics, so their averaging is tested too
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    save_model(str(path), net, {"name": f"tiny{seed}", "version": "0", "architecture": arch, "grid_size": 16},
               half=False)
    return net


def test_model_soup_writes_the_weighted_mean_of_the_weights(tmp_path):
    import torch
    from KneeReconLib.models.checkpoint import load_model
    ms = _script("model_soup")
    a, b = _tiny_model(tmp_path / "a.pt", 1), _tiny_model(tmp_path / "b.pt", 2)
    out = tmp_path / "soup.pt"
    assert ms.main(["--models", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--weights", "1", "3",
                    "--output", str(out)]) == 0
    net, card = load_model(str(out))
    sa, sb, ss = a.state_dict(), b.state_dict(), net.state_dict()
    checked = 0
    for k, v in ss.items():
        if v.is_floating_point():
            want = (0.25 * sa[k] + 0.75 * sb[k]).half().float()  # written in fp16
            assert torch.allclose(v, want, atol=1e-3), k
            assert not torch.allclose(v, sb[k].half().float()) or torch.allclose(sa[k], sb[k]), k
            checked += 1
    assert checked > 10 and card["soup"]["weights"] == [1.0, 3.0] and card["name"] == "tiny2"
    # one architecture only: a clear error and exit 2, no file
    _tiny_model(tmp_path / "c.pt", 3, widths=(4, 8, 16))
    bad = tmp_path / "bad.pt"
    assert ms.main(["--models", str(tmp_path / "a.pt"), str(tmp_path / "c.pt"), "--weights", "1", "1",
                    "--output", str(bad)]) == 2
    assert not bad.exists()
