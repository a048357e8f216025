"""Property-based tests (Hypothesis): whatever bytes a user's "X-ray" holds and whatever number an
option gets, KneeRecon ends with a KneeReconError (one line, exit 2 on the command line) or a
valid image, never a traceback, and leaves nothing behind. Example counts are small so the suite
stays fast; every run draws new examples (no example database is written)."""
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import SAMPLE
from KneeReconLib.cli import main
from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.io.xray_io import XRay, read_xray

LAT = os.path.join(SAMPLE, "lateral.nrrd")
FAST = settings(max_examples=25, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLI = settings(max_examples=8, deadline=None, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """The sample AP as the formats users bring: gzip NRRD (as shipped), raw NRRD, DICOM, PNG."""
    from KneeReconLib.data.realism import write_dicom_xray

    d = tmp_path_factory.mktemp("originals")
    ap = read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap")
    sitk.WriteImage(sitk.ReadImage(os.path.join(SAMPLE, "ap.nrrd")), str(d / "raw.nrrd"), False)
    write_dicom_xray((ap.pixels / ap.pixels.max() * 30000).astype(np.uint16), ap.geometry, str(d / "ap.dcm"),
                     monochrome1=False)
    sitk.WriteImage(sitk.GetImageFromArray((ap.pixels / ap.pixels.max() * 255).astype(np.uint8)), str(d / "ap.png"))
    return {".nrrd": [os.path.join(SAMPLE, "ap.nrrd"), str(d / "raw.nrrd")], ".dcm": [str(d / "ap.dcm")],
            ".png": [str(d / "ap.png")]}


@st.composite
def damaged(draw, originals):
    """(extension, bytes): random bytes, or a real file truncated, or with its header bytes overwritten."""
    ext = draw(st.sampled_from(sorted(originals)))
    how = draw(st.sampled_from(["random", "truncated", "header"]))
    if how == "random":
        return ext, draw(st.binary(max_size=4096))
    data = bytearray(open(draw(st.sampled_from(originals[ext])), "rb").read())
    if how == "truncated":
        return ext, bytes(data[: draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, min(len(data), 700) - 1))] = draw(st.integers(0, 255))
    return ext, bytes(data)


def _read(path, ext):
    return read_xray(path, "ap", pixel_spacing=0.5 if ext == ".png" else None)


@FAST
@given(data=st.data())
def test_read_xray_on_damaged_files(originals, tmp_path, data):
    ext, blob = data.draw(damaged(originals))
    p = tmp_path / f"x{ext}"
    p.write_bytes(blob)
    try:
        x = _read(str(p), ext)
    except KneeReconError as e:
        assert str(e) and "\n" not in str(e)
        return
    # what still decodes must be a usable radiograph
    assert isinstance(x, XRay) and x.pixels.ndim == 2 and np.isfinite(x.pixels).all()
    assert min(x.pixels.shape) >= 16 and all(0 < s <= 10 for s in x.geometry.spacing)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.replace("\r", "\n").split("\n") if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _nothing_left(parent, out):
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(parent) if f.startswith(".")], os.listdir(parent)


@CLI
@given(data=st.data())
def test_cli_on_damaged_files(originals, tmp_path_factory, capfd, data):
    ext, blob = data.draw(damaged(originals))
    d = tmp_path_factory.mktemp("cli")
    p = d / f"ap{ext}"
    p.write_bytes(blob)
    try:
        _read(str(p), ext)
        assume(False)  # still a readable image: that is a reconstruction, not this test's business
    except KneeReconError:
        pass
    out = str(d / "out")
    capfd.readouterr()
    code = main(["reconstruct", "--ap", str(p), "--lateral", LAT, "--output", out, "--pixel-spacing", "0.5"])
    err = capfd.readouterr().err
    assert code == 2
    assert _one_error_line(err).startswith("kneerecon: error:")
    _nothing_left(str(d), out)


BAD_NUMBERS = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e999", "", "abc", "0x10", "--", "1,5"]),
    st.floats(max_value=-1e-6, allow_nan=False).map(repr),
    st.floats(min_value=1e4, allow_infinity=False).map(repr),
    st.text(alphabet="abcxyz%$!", min_size=1, max_size=6))
OPTIONS = {  # option -> where a bad value is refused (all of these ranges exclude BAD_NUMBERS)
    "--pixel-spacing": [], "--sid": ["--sod", "900"], "--sod": ["--sid", "1100"], "--height-offset": []}


@CLI
@given(option=st.sampled_from(sorted(OPTIONS)), value=st.one_of(BAD_NUMBERS, st.just("0")))
def test_cli_refuses_bad_numbers(tmp_path_factory, capfd, option, value):
    if option == "--height-offset":
        assume(value.strip().lower() not in ("auto", "none", "0"))
        try:
            assume(not (math.isfinite(float(value)) and abs(float(value)) <= 50))
        except ValueError:
            pass
    d = tmp_path_factory.mktemp("num")
    out = str(d / "out")
    capfd.readouterr()
    try:
        code = main(["reconstruct", "--ap", os.path.join(SAMPLE, "ap.nrrd"), "--lateral", LAT, "--output", out,
                     option + "=" + value, *OPTIONS[option]])
    except SystemExit as e:  # argparse's own refusal (not a number at all)
        code = e.code
    err = capfd.readouterr().err
    assert code == 2
    line = _one_error_line(err)
    assert "error" in line and "Traceback" not in err
    _nothing_left(str(d), out)


@CLI
@given(command=st.sampled_from([["phantom", "--output", "{d}/p", "--voxel"], ["phantom", "--output", "{d}/p", "--count"],
                                ["cache", "--output", "{d}/c", "--collimate-p"], ["cache", "--output", "{d}/c", "--seed"],
                                ["reconstruct-batch", "{d}/m.csv", "--output", "{d}/b", "--workers"],
                                ["train", "--output", "{d}/t", "--lr"], ["train", "--output", "{d}/t", "--ema"]]),
       value=BAD_NUMBERS)
def test_other_commands_refuse_bad_numbers(tmp_path_factory, capfd, command, value):
    d = tmp_path_factory.mktemp("cmd")
    argv = [a.format(d=d) for a in command]
    argv[-1] = argv[-1] + "=" + value
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capfd.readouterr().err
    assert code == 2
    _one_error_line(err)
    assert os.listdir(d) == []
