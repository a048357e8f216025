"""The quality report (KneeReconLib/reconstruction/quality.py): the sample passes, broken reconstructions are
flagged with the reason in words, and the report reaches report.json, the CLI's exit status and
its output."""
import json
import os

import numpy as np
import pytest

from conftest import MODEL, SAMPLE
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
    # the bundled model's own fitted settings were loaded, with the combined score
    assert q["thresholds"]["fitted_for_this_model"] and "note" not in q["thresholds"], q["thresholds"]
    cfg = quality.load_config(MODEL)[0]
    assert cfg.score and set(cfg.score) <= {"femur", "patella", "tibia", "fibula"}
    for b, model in cfg.score.items():
        assert 0.0 <= q["bones"][b]["score"] < model["cutoff"], (b, q["bones"][b]["score"], model["cutoff"])
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


def test_patella_channel_zeroed_is_flagged(bundled_model):
    """The network's patella output channel switched off (never the most probable class) in a
    real run of the pipeline: the reconstruction has no patella, and the report says so."""
    from KneeReconLib.reconstruction.inference import Reconstructor

    rec = Reconstructor(bundled_model, tta=False)  # one pass, replaced below
    net = rec.ov if rec.ov is not None else None

    def no_patella(volume, scores=True, tta=None):
        if net is not None:
            _, s = net(volume, scores=True)
        else:
            rec.predict_scores = original
            _, s = original(volume, scores=True)
            rec.predict_scores = no_patella
        s = np.array(s, np.float32)
        s[2] = s.min() - 10.0
        lab = s.argmax(0).astype(np.uint8)
        return (lab, s) if scores else lab
    original = rec.predict_scores
    rec.ov, rec.predict_scores = None, no_patella  # the run takes its labels and scores from no_patella
    ap = read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap", side="left")
    lat = read_xray(os.path.join(SAMPLE, "lateral.nrrd"), "lateral", side="left")
    q = rec.run(ap, lat, "left", surfaces=False).quality
    assert q["verdict"] == "review" and q["bones"]["patella"]["verdict"] == "review"
    assert "patella: not found in the reconstruction" in q["reasons"]
    assert q["bones"]["femur"]["verdict"] == "ok", q["reasons"]


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
    assert "quality" in rep["timings_s"]  # its time: bench/bench_quality.py, not a timed test
    assert rep["test_time_augmentation"] == "mirror"  # the default

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


def test_thresholds_file_found_in_installed_layout(tmp_path, monkeypatch):
    """The fitted settings travel with the model: found beside it in the source tree, in a wheel's
    package data and in the Slicer module's layout (io/resources.py), tied to the model's SHA-256."""
    import shutil

    from KneeReconLib.io import resources

    src = quality.thresholds_path(resources.model_path())
    assert os.path.basename(src) == "kneerecon_unet.quality.json" and os.path.isfile(src)
    cfg, info = quality.load_config(resources.model_path())
    assert info["fitted_for_this_model"] and cfg.fitted_for["sha256"] == info["fitted_for"]["sha256"]
    # a wheel: KneeReconLib/Resources/Models/ holds the model and its settings
    pkg = tmp_path / "site" / "KneeReconLib"
    (pkg / "Resources" / "Models").mkdir(parents=True)
    for f in (resources.model_path(), src):
        shutil.copy(f, pkg / "Resources" / "Models")
    monkeypatch.setattr(resources, "package_dir", lambda: str(pkg))
    assert resources.model_path() == str(pkg / "Resources" / "Models" / "kneerecon_unet.pt")
    cfg2, info2 = quality.load_config(resources.model_path())
    assert info2["fitted_for_this_model"] and cfg2.to_dict() == cfg.to_dict()


def test_thresholds_fallback_and_other_model(tmp_path):
    """No settings file: the code's defaults, with a note; a file fitted for another model file:
    used, with a note that says so; an unreadable one: defaults, with a note."""
    model = tmp_path / "mine.pt"
    model.write_bytes(b"not the bundled model")
    cfg, info = quality.load_config(str(model))
    assert cfg.to_dict() == quality.QualityConfig().to_dict() and cfg.score is None
    assert not info["fitted_for_this_model"] and "not fitted for this model" in info["note"]
    bundled = quality.load_config(MODEL)[0]
    quality.write_thresholds(quality.thresholds_path(str(model)), bundled, {"name": "x", "version": "0.1", "sha256": "0" * 64})
    cfg, info = quality.load_config(str(model))
    assert cfg.score == bundled.score and not info["fitted_for_this_model"] and "another model file" in info["note"]
    open(quality.thresholds_path(str(model)), "w").write("{not json")
    cfg, info = quality.load_config(str(model))
    assert cfg.score is None and "could not be read" in info["note"]


def test_combined_score_in_words():
    """The logistic score: a bone whose numbers lie on the bad side is flagged, with the numbers
    that raised its score named in words."""
    model = {"features": ["agreement_lateral", "interior_margin"], "mean": [0.5, 0.8], "scale": [0.1, 0.05],
             "coef": [-2.0, -1.0], "intercept": -2.0, "cutoff": 0.5}
    good = {"outline": {"lateral": {"agreement": 0.6, "best_agreement": 0.6, "best_shift_mm": [0.0, 0.0]}},
            "interior_margin": 0.85}
    bad = {"outline": {"lateral": {"agreement": 0.2, "best_agreement": 0.2, "best_shift_mm": [0.0, 0.0]}},
           "interior_margin": 0.7}
    assert quality.score(model, good)[0] < 0.05
    p, top = quality.score(model, bad)
    assert p > 0.9 and top == ["its outline's fit to the lateral image (low)", "the network's margin over the whole bone (low)"]
    m = {b: {"outline": {}, "volume_ml": v, "cross_section_cm2": c} for b, v, c in
         (("femur", 200.0, 20.0), ("patella", 20.0, 7.0), ("tibia", 180.0, 18.0), ("fibula", 25.0, 2.0))}
    m["fibula"].update(bad)
    q = quality.judge(m, quality.QualityConfig(score={"fibula": model}))
    assert q["bones"]["fibula"]["verdict"] == "review" and q["bones"]["femur"]["verdict"] == "ok"
    assert "fibula: the combined check puts it among poor reconstructions" in q["reasons"][0]
    assert "mostly its outline's fit to the lateral image (low) and the network's margin" in q["reasons"][0]


def test_outline_shape_sees_thin_and_short_bones():
    """A bright bar in an image: a silhouette thinner than the bar fits better grown, one that
    stops short of the bar's end fits badly at its end; the bar's own silhouette does neither."""
    from KneeReconLib.core import ndfilters

    img = np.zeros((120, 80), np.float32)
    img[20:100, 30:50] = 1.0
    g = np.gradient(ndfilters.gaussian_filter(img, 1.0))
    exact = img > 0
    thin = np.zeros_like(exact)
    thin[20:100, 33:47] = True
    short = np.zeros_like(exact)
    short[20:75, 30:50] = True
    e, t, s = (quality.outline_shape(g, m, quality._edge_band(m, 1.0, 3), 2.0, 0.2) for m in (exact, thin, short))
    assert e["grow"] < 0 and e["shrink"] < 0 and e["ends"] > 0.8
    assert t["grow"] > 0.1
    assert s["ends"] < e["ends"] - 0.3


def test_thorough_mode_compares_two_passes(sample_rec, bundled_model):
    from KneeReconLib.reconstruction.inference import Reconstructor

    rec = Reconstructor(bundled_model)
    r = rec.run(sample_rec.ap, sample_rec.lateral, "left", surfaces=False, quality_mode="thorough")
    q = r.quality
    assert q["mode"] == "thorough" and sample_rec.quality["mode"] == "standard"
    for b in ("femur", "tibia"):
        assert 0.9 < q["bones"][b]["consistency_dice"] <= 1.0
    assert "consistency_dice" not in sample_rec.quality["bones"]["femur"]
    assert q["verdict"] == "ok", q["reasons"]
    with pytest.raises(Exception, match="quality mode"):
        rec.run(sample_rec.ap, sample_rec.lateral, "left", surfaces=False, quality_mode="fast")


@pytest.mark.parametrize("backend", ["openvino", "torch"])
def test_mirror_tta_leaves_the_quality_report_as_fitted(backend, bundled_model):
    """With mirror TTA (the default) the written bones average two passes, but the report judges
    the unmirrored pass (labels, probabilities, the thorough mode's one-pass perturbed run): the
    same report as --no-tta, so the rates its settings were fitted for still hold. Checked on the
    sample and on a pair whose lateral view is moved 15 mm, which must stay flagged."""
    from KneeReconLib.reconstruction.inference import Reconstructor

    ap = read_xray(os.path.join(SAMPLE, "ap.nrrd"), "ap", side="left")
    lat = read_xray(os.path.join(SAMPLE, "lateral.nrrd"), "lateral", side="left")
    px = int(round(15.0 / lat.geometry.spacing[1]))
    moved = np.zeros_like(lat.pixels)
    moved[:-px] = lat.pixels[px:]
    rec = Reconstructor(bundled_model, backend=backend)
    assert rec.tta  # the default
    for lateral, offset, verdict in ((lat, "auto", "ok"), (XRay(moved, lat.geometry), "none", "review")):
        reports, labels = [], []
        for tta in (True, False):
            r = rec.run(ap, lateral, "left", surfaces=False, height_offset=offset, quality_mode="thorough", tta=tta)
            q = dict(r.quality)
            q.pop("time_s")
            reports.append(json.dumps(q, sort_keys=True))
            labels.append(r.labels_array())
        assert reports[0] == reports[1] and json.loads(reports[0])["verdict"] == verdict
        assert 0.98 < (labels[0] == labels[1]).mean() < 1.0  # while the bones themselves differ
