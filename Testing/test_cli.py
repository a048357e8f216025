"""Bad input gets a specific message, exit code 2 and no output left behind."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SAMPLE
from KneeReconLib.cli import main

AP = os.path.join(SAMPLE, "ap.nrrd")
LAT = os.path.join(SAMPLE, "lateral.nrrd")


def _run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def _no_leftovers(folder):
    parent = os.path.dirname(os.path.abspath(folder))
    assert not os.path.exists(folder)
    assert not [f for f in os.listdir(parent) if f.startswith(".kneerecon-")]


def test_help_is_for_clinicians(capsys):
    with pytest.raises(SystemExit) as e:
        main(["reconstruct", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "not a medical device" in out and "--pixel-spacing" in out and "overlay.png" in out


def test_unreadable_file(capsys, tmp_path):
    bad = tmp_path / "ap.nrrd"
    bad.write_bytes(b"\x00garbage" * 10)
    out = str(tmp_path / "out")
    code, err = _run(capsys, "reconstruct", "--ap", str(bad), "--lateral", LAT, "--output", out)
    assert code == 2 and "cannot read the ap image" in err and "Traceback" not in err
    _no_leftovers(out)


def test_not_2d_and_no_spacing(capsys, tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(4, 30, 30).astype(np.float32)), str(tmp_path / "v.nii.gz"))
    code, err = _run(capsys, "reconstruct", "--ap", str(tmp_path / "v.nii.gz"), "--lateral", LAT, "--output", str(tmp_path / "o"))
    assert code == 2 and "is 3D" in err
    sitk.WriteImage(sitk.GetImageFromArray((np.random.rand(64, 64) * 255).astype(np.uint8)), str(tmp_path / "a.png"))
    code, err = _run(capsys, "reconstruct", "--ap", str(tmp_path / "a.png"), "--lateral", LAT, "--output", str(tmp_path / "o"))
    assert code == 2 and "--pixel-spacing" in err
    _no_leftovers(str(tmp_path / "o"))


def test_views_of_different_heights(capsys, tmp_path):
    lat = sitk.ReadImage(LAT)
    short = lat[:, : lat.GetSize()[1] // 2]
    sitk.WriteImage(short, str(tmp_path / "lat.nrrd"))
    code, err = _run(capsys, "reconstruct", "--ap", AP, "--lateral", str(tmp_path / "lat.nrrd"), "--output", str(tmp_path / "o"))
    assert code == 2 and "different heights" in err
    _no_leftovers(str(tmp_path / "o"))


def test_existing_output_needs_force(capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, "reconstruct", "--ap", AP, "--lateral", LAT, "--output", str(out))
    assert code == 2 and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/kneerecon_pwned",))


def test_model_files_of_the_wrong_kind(capsys, tmp_path):
    out = str(tmp_path / "o")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    code, err = _run(capsys, "reconstruct", "--ap", AP, "--lateral", LAT, "--output", out, "--model", str(junk))
    assert code == 2 and "not a KneeRecon model file" in err
    evil = tmp_path / "evil.pt"
    torch.save({"format": "kneerecon.model", "payload": Evil()}, str(evil))
    code, err = _run(capsys, "reconstruct", "--ap", AP, "--lateral", LAT, "--output", out, "--model", str(evil))
    assert code == 2 and "pickled code" in err
    assert not os.path.exists("/tmp/kneerecon_pwned")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, str(other))
    code, err = _run(capsys, "reconstruct", "--ap", AP, "--lateral", LAT, "--output", out, "--model", str(other))
    assert code == 2 and "format marker" in err
    future = tmp_path / "future.pt"
    torch.save({"format": "kneerecon.model", "format_version": 99, "card": json.dumps({}), "state_dict": {}}, str(future))
    code, err = _run(capsys, "reconstruct", "--ap", AP, "--lateral", LAT, "--output", out, "--model", str(future))
    assert code == 2 and "format version 99" in err
    _no_leftovers(out)


def test_bad_geometry_options(capsys, tmp_path):
    code, err = _run(capsys, "reconstruct", "--ap", AP, "--lateral", LAT, "--output", str(tmp_path / "o"), "--sid", "1000")
    assert code == 2 and "SID and SOD" in err
    code, err = _run(capsys, "reconstruct", "--ap", AP, "--lateral", LAT, "--output", str(tmp_path / "o"),
                     "--sid", "500", "--sod", "900")
    assert code == 2 and "SOD < SID" in err
    code, err = _run(capsys, "reconstruct", "--ap", AP, "--lateral", LAT, "--output", str(tmp_path / "o"),
                     "--height-offset", "up")
    assert code == 2 and "--height-offset" in err
    _no_leftovers(str(tmp_path / "o"))
