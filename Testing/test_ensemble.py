"""--ensemble: the bundled U-Net and ChenNet with their probabilities averaged."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import MODEL, SAMPLE
from KneeReconLib.cli import main
from KneeReconLib.core.errors import KneeReconError
from KneeReconLib.core.labels import BY_NAME
from KneeReconLib.evaluation.metrics import dice_per_class
from KneeReconLib.reconstruction.inference import DEFAULT_ENSEMBLE, Reconstructor


def _dice_on_truth(folder):
    truth = sitk.ReadImage(os.path.join(SAMPLE, "truth.nii.gz"))
    pred = sitk.Resample(sitk.ReadImage(os.path.join(folder, "labels.nii.gz")), truth, sitk.Transform(),
                         sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return dice_per_class(sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(truth))


@pytest.mark.xfail(strict=True, reason="the bundled ChenNet member was trained on procedural phantoms only and not retrained "
                   "for U-Net 0.4.0-0.7.0: on the sample with 0.7.0 the ensemble loses femur 0.954 -> 0.892 and tibia "
                   "0.948 -> 0.883 (mean Dice 0.861 against 0.879 for the U-Net alone)")
def test_ensemble_reconstructs_the_sample(tmp_path):
    args = ["reconstruct", "--ap", os.path.join(SAMPLE, "ap.nrrd"), "--lateral", os.path.join(SAMPLE, "lateral.nrrd"),
            "--side", "left"]
    assert main(args + ["--output", str(tmp_path / "single")]) == 0
    assert main(args + ["--output", str(tmp_path / "ens"), "--ensemble"]) == 0
    report = json.load(open(tmp_path / "ens" / "report.json"))
    assert [m["name"] for m in report["ensemble"]] == ["KneeRecon ChenNet (phantom-trained, ensemble member)"]
    d_single, d_ens = _dice_on_truth(tmp_path / "single"), _dice_on_truth(tmp_path / "ens")
    for bone, floor in (("femur", 0.85), ("patella", 0.75), ("tibia", 0.85), ("fibula", 0.7)):
        assert d_ens[BY_NAME[bone].value] > floor, (bone, d_ens)
    # a second opinion, not a copy: the label maps differ, and the ensemble is not worse on average
    single = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "single" / "labels.nii.gz")))
    ens = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ens" / "labels.nii.gz")))
    assert (single != ens).sum() > 1000
    assert np.mean(d_ens[1:]) > np.mean(d_single[1:]) - 0.01
    for b in range(1, 5):  # nor does it give up one bone for another
        assert d_ens[b] > d_single[b] - 0.02, (b, d_single, d_ens)


def test_ensemble_members_must_match_and_run_in_pytorch(tmp_path):
    from test_openvino import _tiny_model  # a 32^3 U-Net

    tiny = tmp_path / "tiny.pt"
    _tiny_model(tiny, 0)
    with pytest.raises(KneeReconError, match="does not take the same input"):
        Reconstructor(MODEL, ensemble=[str(tiny)])
    with pytest.raises(KneeReconError, match="ensembles run with --backend torch"):
        Reconstructor(MODEL, backend="openvino", ensemble=DEFAULT_ENSEMBLE)
    assert Reconstructor(MODEL, ensemble=DEFAULT_ENSEMBLE).backend == "torch"
    assert main(["evaluate", "--ensemble", str(tmp_path / "missing.pt"), "--phantoms", "1"]) == 2
