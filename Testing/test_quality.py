"""The quality report (KneeReconLib/reconstruction/quality.py): the sample passes, broken reconstructions are
flagged with the reason in words, and the report reaches report.json, the CLI's exit status and
its output."""
import json
import os

import numpy as np
import pytest

from conftest import SAMPLE
from KneeReconLib.cli import main
from KneeReconLib.io.xray_io import XRay, read_xray, write_xray
from KneeReconLib.reconstruction import quality


@pytest.fixture(scope="module")
def sample_rec(bundled_model):
    from KneeReconLib.reconstruction.inference import Reconstructor

    ap = read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap", side="left")
    lat = read_xray(os.path.join(SAMPLE, "lateral.nrrd"), "lateral", side="left")
    return Reconstructor(bundled_model).run(ap, lat, "left", surfaces=False)


def _assess(rec, labels=None, lateral=None):
    return quality.assess(rec.labels_array() if labels is None else labels, rec.grid, rec.ap,
                          lateral or rec.lateral, rec.lateral_offset_mm)


def test_sample_is_not_flagged(sample_rec):
    q = sample_rec.quality
    assert q["verdict"] == "ok", q["reasons"]
    cfg = quality.QualityConfig()
    for i, b in enumerate(("femur", "patella", "tibia", "fibula")):
        bone = q["bones"][b]
        assert bone["verdict"] == "ok" and bone["reasons"] == []
        assert bone["components"] >= 1 and 0.0 <= bone["fragment_fraction"] < cfg.max_fragment_fraction["femur"]
        assert bone["confidence_margin"] is not None  # the default OpenVINO network gives its margin
        for j, v in enumerate(("ap", "lateral")):
            assert bone["outline"][v]["agreement"] >= cfg.min_outline[b][j]
    # the femur's outline lies on the image's edges in both views: a clear correlation
    assert q["bones"]["femur"]["outline"]["ap"]["agreement"] > 0.5
    assert q["bones"]["femur"]["outline"]["lateral"]["agreement"] > 0.5


def test_patella_removed_is_flagged(sample_rec):
    labels = sample_rec.labels_array().copy()
    labels[labels == 2] = 0
    q = _assess(sample_rec, labels)
    assert q["verdict"] == "review"
    assert q["bones"]["patella"]["verdict"] == "review"
    assert "patella: not found in the reconstruction" in q["reasons"]
    assert all(q["bones"][b]["verdict"] == "ok" for b in ("femur", "tibia")), q["reasons"]


def test_lateral_view_shifted_15mm_is_flagged(sample_rec):
    """The reconstruction checked against the lateral image moved 15 mm up: the outlines of the
    bones no longer lie on that image's edges."""
    lat = sample_rec.lateral
    px = int(round(15.0 / lat.geometry.spacing[1]))
    moved = np.zeros_like(lat.pixels)
    moved[:-px] = lat.pixels[px:]
    q = _assess(sample_rec, lateral=XRay(moved, lat.geometry, lat.info))
    assert q["verdict"] == "review"
    flagged = [r for r in q["reasons"] if "lateral image" in r]
    assert any(r.startswith("femur: its projected outline") for r in flagged), q["reasons"]
    assert any(r.startswith("tibia: its projected outline") for r in flagged), q["reasons"]
    assert not any("AP image" in r for r in q["reasons"] if r.split(":")[0] in ("femur", "tibia"))


def test_displaced_bone_is_flagged(sample_rec):
    """The patella alone moved 10 mm forward (out of its place in front of the femur): flagged
    on the lateral image, where the patella is seen from the side; the other bones stay ok."""
    labels = sample_rec.labels_array()
    shift = int(round(10.0 / sample_rec.grid.spacing[1]))
    moved = labels.copy()
    moved[moved == 2] = 0
    pat = np.roll(labels == 2, -shift, axis=1)  # -y: anterior
    moved[pat & (moved == 0)] = 2
    q = _assess(sample_rec, moved)
    assert q["bones"]["patella"]["verdict"] == "review"
    assert any(r.startswith("patella: its projected outline") and "lateral image" in r for r in q["reasons"])


def test_reasons_and_summary_line_are_words():
    m = {b: {"outline": {"ap": {"agreement": 0.8, "best_agreement": 0.8, "best_shift_mm": [0.0, 0.0]},
                         "lateral": {"agreement": 0.8, "best_agreement": 0.8, "best_shift_mm": [0.0, 0.0]}},
             "volume_ml": v, "cross_section_cm2": c, "components": 1, "fragment_fraction": 0.0, "confidence_margin": 0.9}
         for b, v, c in (("femur", 200.0, 20.0), ("patella", 20.0, 7.0), ("tibia", 180.0, 18.0), ("fibula", 25.0, 2.0))}
    assert quality.judge(m)["verdict"] == "ok"
    assert quality.summary_line(quality.judge(m)).startswith("quality: ok")
    m["patella"]["outline"]["lateral"]["agreement"] = -0.2
    m["fibula"]["fragment_fraction"], m["fibula"]["components"] = 0.6, 3
    q = quality.judge(m)
    assert q["verdict"] == "review" and q["bones"]["femur"]["verdict"] == "ok"
    assert q["reasons"][0].startswith("patella: its projected outline does not match the lateral image")
    assert q["reasons"][1].startswith("fibula: the network gave it in 3 pieces")
    assert quality.summary_line(q).startswith("quality: REVIEW - patella: its projected outline")


def test_cli_report_and_fail_on_review(tmp_path, bundled_model, capsys):
    out = tmp_path / "ok"
    rc = main(["reconstruct", "--ap", os.path.join(SAMPLE, "ap.nrrd"), "--lateral", os.path.join(SAMPLE, "lateral.nrrd"),
               "--side", "left", "--model", bundled_model, "--output", str(out), "--fail-on-review"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "quality: ok" in text
    rep = json.load(open(out / "report.json"))
    assert rep["quality"]["verdict"] == "ok" and set(rep["quality"]["bones"]) == {"femur", "patella", "tibia", "fibula"}
    assert rep["quality"]["bones"]["tibia"]["outline"]["ap"]["agreement"] > 0.3
    assert "quality" in rep["timings_s"] and rep["timings_s"]["quality"] < 2.0

    # a broken pair: the lateral view moved 15 mm up and the height correction switched off, so the
    # two views disagree and the network's bones cannot match both
    lat = read_xray(os.path.join(SAMPLE, "lateral.nrrd"), "lateral", side="left")
    px = int(round(15.0 / lat.geometry.spacing[1]))
    moved = np.zeros_like(lat.pixels)
    moved[:-px] = lat.pixels[px:]
    write_xray(moved, lat.geometry, str(tmp_path / "lateral_moved.nrrd"))
    bad = tmp_path / "bad"
    rc = main(["reconstruct", "--ap", os.path.join(SAMPLE, "ap.nrrd"), "--lateral", str(tmp_path / "lateral_moved.nrrd"),
               "--side", "left", "--model", bundled_model, "--output", str(bad), "--height-offset", "none",
               "--fail-on-review"])
    cap = capsys.readouterr()
    assert rc == 3, cap.out
    assert "quality: REVIEW - " in cap.out and "--fail-on-review" in cap.err
    rep = json.load(open(bad / "report.json"))  # the outputs are written all the same, for review
    assert rep["quality"]["verdict"] == "review" and rep["quality"]["reasons"]
