"""Post-training int8 quantization of a model's OpenVINO IR (NNCF), for CPUs without native bf16.

On such CPUs (AVX2 only, e.g. many AMD EPYC and older Intel machines) OpenVINO runs the U-Net in
f32, which alone takes longer than the whole command's 1.5 s target; the int8 IR runs about 1.8x
faster with held-out Dice within 0.003 of f32 (MODEL_CARD.md). Calibration inputs are the
network's own inputs (back-projected volumes) made from cached *training* cases, half of them
through the radiograph simulator, so the activation ranges cover both clean DRRs and realistic
images. NNCF (Apache-2.0) is needed only here, never at inference: `pip install nncf==3.4.0`."""
from __future__ import annotations

import glob
import os

import numpy as np

from ..core.errors import KneeReconError
from ..data.dataset import AugmentConfig, load_case, make_sample
from . import openvino_backend

CALIBRATION_COUNT = 20  # the count the bundled int8 IR was made and measured with (MODEL_CARD.md); not tuned


def calibration_inputs(folders: list[str], count: int = CALIBRATION_COUNT, seed: int = 0) -> list[np.ndarray]:
    """`count` network inputs [1, 2, z, y, x] (float32) from cached cases spread evenly over
    `folders`; every second one with its views through the radiograph simulator."""
    paths = sorted(p for f in folders for p in glob.glob(os.path.join(f, "*.npz")))
    if not paths:
        raise KneeReconError(f"no cached cases (*.npz) in {folders} for the int8 calibration")
    pick = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(count, len(paths))).round()]
    rng = np.random.default_rng(seed)
    out = []
    for i, p in enumerate(pick):
        aug = AugmentConfig(realism_p=1.0) if i % 2 else None
        x, _ = make_sample(load_case(p), rng, aug)
        out.append(np.ascontiguousarray(x[None], dtype=np.float32))
    return out


def quantize_ir(model_path: str, calibration: list[str], count: int = CALIBRATION_COUNT,
                xml_path: str | None = None) -> str:
    """Write the int8 IR of `model_path` (default <stem>.int8.openvino.xml, beside it), calibrated
    on cases from the `calibration` folders; returns its path. The float IR is read if it exists
    (else converted, which needs PyTorch)."""
    try:
        import nncf
    except ImportError:
        raise KneeReconError("int8 quantization needs NNCF, which is not installed: pip install nncf==3.4.0 "
                             "(needed only to make the int8 IR, not to use it)")
    if not os.path.exists(model_path):
        raise KneeReconError(f"model file not found: {model_path}")
    ov = openvino_backend.import_openvino()
    core = ov.Core()
    sha = openvino_backend.file_sha256(model_path)
    _, model = openvino_backend.find_ir(core, model_path, sha)
    if model is None:
        model = core.read_model(openvino_backend.export_ir(model_path))
    inputs = calibration_inputs(calibration, count)
    q = nncf.quantize(model, nncf.Dataset(inputs), subset_size=len(inputs), preset=nncf.QuantizationPreset.MIXED,
                      fast_bias_correction=True)
    q.set_rt_info(sha, openvino_backend.RT_KEY)  # tied to this model file, as the float IR
    xml_path = xml_path or openvino_backend.int8_beside_model(model_path)
    openvino_backend.save(q, xml_path)
    return xml_path
