"""`kneerecon evaluate --data`: the paper's table from cached test cases, with CSV and JSON."""
import csv
import json

from KneeReconLib.cli import main
from KneeReconLib.data.dataset import build_phantom_cache


def test_evaluate_cached_cases_writes_the_table(tmp_path, capsys, bundled_model):
    build_phantom_cache(str(tmp_path / "test"), [1_000_070], grid_size=128, log=lambda m: None)
    assert main(["evaluate", "--data", str(tmp_path / "test"), "--output", str(tmp_path / "ev")]) == 0
    out = capsys.readouterr().out
    assert "Dice (Kasten 2020)" in out and "Chamfer mm (ours)" in out
    res = json.load(open(tmp_path / "ev" / "evaluation.json"))
    s = res["summary"]
    assert res["n_cases"] == 1 and s["dice_femur"]["mean"] > 0.85 and s["dice_tibia"]["mean"] > 0.75  # 0.4.0 on a procedural phantom: 0.79 measured
    assert 0 < s["chamfer_femur"]["mean"] < 3.0 and s["hd95_tibia"]["mean"] >= s["assd_tibia"]["mean"]
    rows = list(csv.DictReader(open(tmp_path / "ev" / "evaluation.csv")))
    assert len(rows) == 1 and float(rows[0]["dice_background"]) > 0.95
    assert main(["evaluate", "--data", str(tmp_path / "empty")]) == 2  # no cases: a clear error
