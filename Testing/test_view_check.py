"""Input checks before reconstructing: swapped views and the same picture twice end in exit 2
with a message (on the sample and on a fresh phantom pair), a declared side the images contradict
is a warning in the CLI output and report.json, and the sample passes. The network's second
opinion (view_opinion.py) tells swapped from correct pairs on the sample, a fresh phantom and a
nearly straight knee of a training subject, and refuses the straight knee's swapped pair that the
classifier alone lets through."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import SAMPLE, crop_to_field
from KneeReconLib.cli import main
from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.io.view_check import OPINION_BAND, assess_views, check_views, side_warnings
from KneeReconLib.io.xray_io import XRay, read_xray, write_xray
from KneeReconLib.reconstruction.view_opinion import (SwapOpinionConfig, outline_features,
                                                      reconstruct_swapped_features, swap_gain)

AP = os.path.join(SAMPLE, "ap.nrrd")
LAT = os.path.join(SAMPLE, "lateral.nrrd")


@pytest.fixture(scope="module")
def phantom_pair(tmp_path_factory):
    """A fresh procedural knee (a seed no training used), parallel-beam DRRs as NRRD files."""
    from KneeReconLib.data.drr import DRRConfig, render_drr
    from KneeReconLib.data.phantom import PhantomConfig, generate_phantom, imaging_field_mm
    from KneeReconLib.geometry.frame import to_knee_frame

    d = tmp_path_factory.mktemp("fresh")
    ph = generate_phantom(7_777_001, PhantomConfig(side="left"))
    ct, _ = to_knee_frame(ph.ct, ph.labels)
    for view, (img, geom) in render_drr(ct, DRRConfig(pixel_spacing=0.8, side="left")).items():
        write_xray(*crop_to_field(img, geom, imaging_field_mm(ph)[0]), str(d / f"{view}.nrrd"))
    return str(d / "ap.nrrd"), str(d / "lateral.nrrd")


@pytest.fixture(scope="module")
def reconstructor():
    from KneeReconLib.reconstruction.inference import Reconstructor

    return Reconstructor()


def _refused(capfd, tmp_path, ap, lat, *extra, after_progress: bool = False):
    """Exit 2, one line of error, nothing written. `after_progress`: refused after reconstructing
    (the second opinion), so the progress bar's line comes first."""
    out = tmp_path / "out"
    capfd.readouterr()
    code = main(["reconstruct", "--ap", ap, "--lateral", lat, "--output", str(out), *extra])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]  # (splitlines also splits at the bar's \r)
    if after_progress:
        assert any("100%" in ln for ln in lines if ln.startswith("["))
        lines = [ln for ln in lines if not ln.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("kneerecon: error:")
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    return err


@pytest.mark.parametrize("pair", ["sample", "phantom"])
def test_swapped_views_are_refused(capfd, tmp_path, phantom_pair, pair):
    ap, lat = (AP, LAT) if pair == "sample" else phantom_pair
    err = _refused(capfd, tmp_path, lat, ap, "--side", "left")
    assert "look swapped" in err and "--views-as-given" in err


@pytest.mark.parametrize("pair", ["sample", "phantom"])
def test_same_picture_twice_is_refused(capfd, tmp_path, phantom_pair, pair):
    ap, lat = (AP, LAT) if pair == "sample" else phantom_pair
    for view in (ap, lat):
        err = _refused(capfd, tmp_path, view, view)
        assert "the same file" in err
        copy = tmp_path / "copy.nrrd"
        shutil.copy(view, copy)
        err = _refused(capfd, tmp_path, view, str(copy), "--views-as-given")  # not skipped by the override
        assert "identical pixels" in err
        os.remove(copy)


def test_sample_and_phantom_pass(phantom_pair):
    for ap, lat, side in ((AP, LAT, "left"), (*phantom_pair, "left")):
        a, b = read_xray(ap, "ap"), read_xray(lat, "lateral")
        vc = check_views(ap, lat, a, b)
        assert vc is not None and not vc.looks_swapped
        assert vc.ap_view_score > vc.lateral_view_score + 3
        assert side_warnings(side, vc, side) == []
        # the override skips the view test: a swapped pair is then taken as given
        assert check_views(lat, ap, b, a, views_as_given=True) is None
        with pytest.raises(KneeReconError, match="look swapped"):
            check_views(lat, ap, b, a)


def test_sample_side_from_the_ap_image():
    vc = assess_views(read_xray(AP, "ap"), read_xray(LAT, "lateral"))
    assert vc.side_seen == "left"  # the sample is a left knee
    mirrored = read_xray(AP, "ap")
    mirrored.pixels = np.ascontiguousarray(mirrored.pixels[:, ::-1])  # a mirrored AP image looks like a right knee
    vm = assess_views(mirrored, read_xray(LAT, "lateral"))
    assert vm.side_seen == "right" and vm.ap_side_score == pytest.approx(-vc.ap_side_score, abs=1e-6)
    (w,) = side_warnings("right", vc, None)
    assert "looks like a left knee" in w


def test_api_refuses_swapped_views():
    import KneeReconLib

    with pytest.raises(KneeReconError, match="look swapped"):
        KneeReconLib.reconstruct(LAT, AP, side="left")
    with pytest.raises(KneeReconError, match="same file"):
        KneeReconLib.reconstruct(AP, AP, side="left", views_as_given=True)


def test_contradicted_side_is_a_warning(capfd, tmp_path):
    """The sample is a left knee: declared right, the reconstruction goes ahead with a warning on the
    command line and in report.json; declared left, no warning."""
    out = tmp_path / "o"
    capfd.readouterr()
    assert main(["reconstruct", "--ap", AP, "--lateral", LAT, "--side", "right", "--output", str(out)]) == 0
    cap = capfd.readouterr()
    rep = json.load(open(out / "report.json"))
    assert len(rep["warnings"]) == 1 and "side right was given" in rep["warnings"][0]
    assert "left knee" in rep["warnings"][0]
    assert f"WARNING: {rep['warnings'][0]}" in cap.out and "WARNING" in cap.err
    assert rep["view_check"]["side_seen"] == "left" and rep["view_check"]["looks_swapped"] is False
    assert not any("but the side given" in n for n in rep["notes"])  # said once, as the warning


def test_batch_rows_with_swapped_or_repeated_views_fail_with_the_message(tmp_path, capsys):
    shutil.copy(AP, tmp_path / "ap.nrrd")
    shutil.copy(LAT, tmp_path / "lat.nrrd")
    m = tmp_path / "m.csv"
    m.write_text("id,ap,lateral,side\nswapped,lat.nrrd,ap.nrrd,left\ntwice,ap.nrrd,ap.nrrd,left\n")
    out = tmp_path / "out"
    assert main(["reconstruct-batch", str(m), "--output", str(out)]) == 0
    import csv
    rows = {r["id"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["swapped"]["status"] == "error" and "look swapped" in rows["swapped"]["error"]
    assert rows["twice"]["status"] == "error" and "same file" in rows["twice"]["error"]
    assert sorted(os.listdir(out)) == ["summary.csv"]


def _opinion_gain(reconstructor, ap: XRay, lat: XRay) -> float:
    """The second opinion's gain for the pair as given (positive: it fits better swapped)."""
    given = outline_features(reconstructor.run(ap, lat, ap.geometry.side, surfaces=False).quality)
    return swap_gain(given, reconstruct_swapped_features(reconstructor, ap, lat, ap.geometry.side))


@pytest.mark.parametrize("pair", ["sample", "phantom", "straight"])
def test_second_opinion_tells_swapped_from_correct(reconstructor, phantom_pair, straight_pair, pair):
    """The network's opinion on its own, whatever the classifier says: the files given the wrong
    way round reconstruct better swapped by more than the threshold; the right way round, worse by
    more than it."""
    ap, lat = {"sample": (AP, LAT), "phantom": phantom_pair, "straight": straight_pair}[pair]
    side = "right" if pair == "straight" else "left"
    min_gain = SwapOpinionConfig().min_gain
    correct = _opinion_gain(reconstructor, read_xray(ap, "ap", side=side), read_xray(lat, "lateral", side=side))
    swapped = _opinion_gain(reconstructor, read_xray(lat, "ap", side=side), read_xray(ap, "lateral", side=side))
    assert correct < -min_gain and swapped > min_gain, (correct, swapped)
    assert swapped == pytest.approx(-correct, abs=0.02)  # the same two reconstructions, the other way round


def test_sample_pays_no_second_opinion():
    """The bundled sample (the 1.5 s whole-command target) is outside the ambiguous band."""
    vc = assess_views(read_xray(AP, "ap"), read_xray(LAT, "lateral"))
    assert not vc.ambiguous and vc.swap_score <= OPINION_BAND[0]


def test_straight_knee_swapped_is_refused_by_the_second_opinion(capfd, tmp_path, straight_pair):
    """The straight knee's swapped pair scores inside the ambiguous band (the classifier alone would
    reconstruct it); the command refuses it on the network's opinion, exit 2, one line; given the
    right way round it is reconstructed, with the opinion in report.json."""
    ap, lat = straight_pair
    vc = assess_views(read_xray(lat, "ap", side="right"), read_xray(ap, "lateral", side="right"))
    assert vc.ambiguous and not vc.looks_swapped, vc.swap_score
    err = _refused(capfd, tmp_path, lat, ap, "--side", "right", after_progress=True)
    assert "look swapped" in err and "reconstructed the other way round" in err and "--views-as-given" in err
    out = tmp_path / "ok"
    assert main(["reconstruct", "--ap", ap, "--lateral", lat, "--side", "right", "--output", str(out)]) == 0
    rep = json.load(open(out / "report.json"))
    so = rep["view_check"]["second_opinion"]
    assert so["looks_swapped"] is False and so["as_given_agreement"] > so["swapped_agreement"] + so["min_gain"]
    assert rep["view_check"]["looks_swapped"] is False
