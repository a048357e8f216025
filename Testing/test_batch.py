import csv
import os
import shutil

from conftest import SAMPLE
from KneeReconLib.cli import main


def test_batch_is_resumable_and_reports_errors(tmp_path, bundled_model, capsys):
    shutil.copy(os.path.join(SAMPLE, "ap.nrrd"), tmp_path / "ap.nrrd")
    shutil.copy(os.path.join(SAMPLE, "lateral.nrrd"), tmp_path / "lat.nrrd")
    (tmp_path / "broken.nrrd").write_bytes(b"not an image")
    m = tmp_path / "manifest.csv"
    m.write_text("id,ap,lateral,side\nk1,ap.nrrd,lat.nrrd,left\nbad,broken.nrrd,lat.nrrd,left\n")
    out = tmp_path / "out"
    assert main(["reconstruct-batch", str(m), "--output", str(out)]) == 0
    rows = {r["id"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert rows["k1"]["status"] == "ok" and float(rows["k1"]["femur_ml"]) > 50
    # the quality report's columns: the sample passes, every bone ok; a failed case has no verdict
    assert rows["k1"]["quality"] == "ok" and rows["k1"]["quality_reasons"] == ""
    assert all(rows["k1"][f"{b}_quality"] == "ok" for b in ("femur", "patella", "tibia", "fibula"))
    assert rows["bad"]["quality"] == ""
    assert rows["bad"]["status"] == "error" and "cannot read" in rows["bad"]["error"]
    assert (out / "k1" / "labels.nii.gz").exists() and not (out / "bad").exists()
    stamp = os.path.getmtime(out / "k1" / "report.json")
    capsys.readouterr()
    assert main(["reconstruct-batch", str(m), "--output", str(out)]) == 0  # resumed: k1 is not redone
    assert "1 already done" in capsys.readouterr().out
    assert os.path.getmtime(out / "k1" / "report.json") == stamp
