"""Every numeric option is validated: NaN, inf, negative and absurd values end in one line and
exit code 2 before any work, on every command; manifest cells are checked the same way."""
import argparse
import csv
import os
import shutil

import pytest

from conftest import SAMPLE
from KneeReconLib.cli import build_parser, main
from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.core.geometry import ViewGeometry
from KneeReconLib.io.validation import LIMITS, WORDS_OR_NUMBER, Limit

AP = os.path.join(SAMPLE, "ap.nrrd")
LAT = os.path.join(SAMPLE, "lateral.nrrd")


def _numeric_options():
    """(command, dest) of every option parsed as a number, plus the number-or-word ones."""
    out = []
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for act in p._actions:
            if act.type in (int, float) or act.dest in WORDS_OR_NUMBER:
                out.append((name, act.dest))
    return out


def test_every_numeric_option_has_a_limit():
    missing = [(c, d) for c, d in _numeric_options() if d not in LIMITS and d not in WORDS_OR_NUMBER]
    assert not missing, f"add these to KneeReconLib/io/validation.py LIMITS: {missing}"
    assert len(_numeric_options()) > 40


def _run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("option,value,words", [
    ("--pixel-spacing", "nan", "finite"), ("--pixel-spacing", "-0.5", "more than 0"), ("--pixel-spacing", "inf", "finite"),
    ("--pixel-spacing", "50", "at most 10"), ("--sid", "1e9", "at most 5000"), ("--height-offset", "nan", "finite"),
    ("--height-offset", "400", "at most 50"), ("--height-offset", "up", "auto, none")])
def test_reconstruct_numbers(capsys, tmp_path, option, value, words):
    out = tmp_path / "o"
    code, err = _run(capsys, "reconstruct", "--ap", AP, "--lateral", LAT, "--output", str(out), option, value)
    assert code == 2 and words in err and option in err and "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1
    assert not out.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,words", [
    (["phantom", "--output", "{d}/p", "--voxel", "nan"], "--voxel"),
    (["phantom", "--output", "{d}/p", "--count", "-3"], "--count must be at least 0"),
    (["cache", "--output", "{d}/c", "--grid-size", "100"], "multiple of 16"),
    (["cache", "--output", "{d}/c", "--collimate-p", "1.5"], "--collimate-p"),
    (["train", "--output", "{d}/t", "--lr", "inf"], "--lr"),
    (["train", "--output", "{d}/t", "--steps", "0"], "--steps"),
    (["reconstruct-batch", "{d}/m.csv", "--output", "{d}/b", "--workers", "0"], "--workers"),
    (["reconstruct-batch", "{d}/m.csv", "--output", "{d}/b", "--shard", "4/3"], "--shard"),
    (["reconstruct-batch", "{d}/m.csv", "--output", "{d}/b", "--shard", "0/3"], "K counts from 1"),
    (["drr", "--ct", "{d}/ct.nii", "--output", "{d}/x", "--sid", "nan", "--sod", "900"], "--sid"),
    (["evaluate", "--phantoms", "-1"], "--phantoms"),
    (["build-ssm", "--data", "{d}", "--output", "{d}/s.npz", "--spacing", "0"], "--spacing"),
    (["train-style", "--real", "{d}", "--drr", "{d}", "--output", "{d}/s", "--pixel-mm", "-1"], "--pixel-mm"),
    (["phantom", "--output", "{d}/p", "--count", "many"], "invalid int value"),
])
def test_other_commands(capsys, tmp_path, argv, words):
    code, err = _run(capsys, *[a.format(d=tmp_path) for a in argv])
    assert code == 2 and words in err and "Traceback" not in err, err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1
    assert os.listdir(tmp_path) == []


def test_limit_messages():
    lim = Limit(0.0, 10.0, lo_open=True, unit="mm")
    assert lim.check("--x", "2.5") == 2.5
    for bad, words in (("nan", "finite"), ("0", "more than 0"), ("11", "at most 10 mm"), ("x", "a number")):
        with pytest.raises(KneeReconError, match=words):
            lim.check("--x", bad)
    with pytest.raises(KneeReconError, match="whole number"):
        Limit(integer=True).check("--n", 2.5)


def test_library_refuses_nan_geometry():
    """The library checks too: a NaN spacing or an infinite SID from code or from DICOM tags."""
    with pytest.raises(KneeReconError, match="positive finite"):
        ViewGeometry("ap", 100, 100, (float("nan"), 0.5))
    with pytest.raises(KneeReconError, match="finite SID"):
        ViewGeometry("ap", 100, 100, (0.5, 0.5), float("inf"), 1000.0)
    from KneeReconLib.io.xray_io import read_xray
    with pytest.raises(KneeReconError, match="implausible pixel spacing"):
        read_xray(AP, "ap", pixel_spacing=float("nan"))


def test_manifest_cells_are_checked(tmp_path, capsys):
    """A bad number in one manifest row fails that case with a message; the batch goes on."""
    shutil.copy(AP, tmp_path / "ap.nrrd")
    shutil.copy(LAT, tmp_path / "lat.nrrd")
    m = tmp_path / "m.csv"
    m.write_text("id,ap,lateral,side,pixel_spacing,sid,sod\n"
                 "a,ap.nrrd,lat.nrrd,left,nan,,\n"
                 "b,ap.nrrd,lat.nrrd,up,,,\n"
                 "c,ap.nrrd,lat.nrrd,left,,abc,900\n")
    out = tmp_path / "out"
    assert main(["reconstruct-batch", str(m), "--output", str(out)]) == 0
    rows = {r["id"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["a"]["status"] == "error" and "pixel_spacing must be a finite number" in rows["a"]["error"]
    assert rows["b"]["status"] == "error" and "side must be left or right" in rows["b"]["error"]
    assert rows["c"]["status"] == "error" and "sid must be a number" in rows["c"]["error"]
    assert sorted(os.listdir(out)) == ["summary.csv"]


@pytest.mark.parametrize("option", ["--pixel-spacing", "--sid"])
def test_double_dash_value(capsys, tmp_path, option):
    """argparse reads `--sid=--` as an empty list, not as a refusal: still exit 2 and one line."""
    out = tmp_path / "o"
    code, err = _run(capsys, "reconstruct", "--ap", AP, "--lateral", LAT, "--output", str(out), f"{option}=--")
    assert code == 2 and f"{option} must be a number" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []
