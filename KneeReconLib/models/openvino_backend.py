"""The network on the CPU through OpenVINO: the fused U-Net (fused_unet.py) converted once into an
OpenVINO model (IR: .xml graph + .bin weights, no code) whose output is the label map itself.

On this project's 2-core AVX512-BF16 machine OpenVINO's bf16 convolutions run the 128^3 forward
in about half PyTorch's time (bench/bench_inference.py). Converting a model takes ~10 s, so the IR
is made once: `kneerecon export-openvino` writes it beside the model file (the bundled model ships
with one); otherwise the first reconstruction writes it to a cache folder. Every IR records the
SHA-256 of the model file it came from and is ignored when that no longer matches.

Running an IR needs no PyTorch (the card comes from the model file through model_card.py); only
converting one does, so PyTorch is imported here only to convert.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np

from ..core.errors import KneeReconError

RT_KEY = ["kneerecon", "source_sha256"]


def import_openvino():
    """`import openvino` without its usage telemetry. On import, openvino (through openvino_telemetry,
    opt-out) forks a process that posts a usage event to Google Analytics, waits for it up to 3 s
    and keeps a client id under ~/intel: on every reconstruction, from a tool that handles patients'
    images on machines that are often offline (where the wait lengthens each command). OpenVINO
    falls back to its own no-op stub where openvino_telemetry cannot be imported, so it is made
    unimportable while openvino is first imported, and importable again afterwards (nothing else
    in the process is affected). KNEERECON_OPENVINO_TELEMETRY=1 leaves OpenVINO's default alone.

    The model converter (openvino.tools.ovc, which `import openvino` loads for `convert_model`) is
    kept out the same way: inference never needs it and it is a tenth of the command's import time;
    `convert` imports it itself."""
    if "openvino" in sys.modules or "openvino_telemetry" in sys.modules or \
            os.environ.get("KNEERECON_OPENVINO_TELEMETRY") == "1":
        import openvino
        return openvino
    blocked = [m for m in ("openvino_telemetry", "openvino.tools.ovc") if m not in sys.modules]
    for m in blocked:
        sys.modules[m] = None
    try:
        import openvino
    finally:
        for m in blocked:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]
    return openvino


def available() -> bool:
    """Whether the openvino package can be imported (it is imported, see import_openvino)."""
    try:
        import_openvino()
    except ImportError:
        return False
    return True


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def beside_model(model_path: str) -> str:
    """The IR path that `kneerecon export-openvino` writes by default: <model stem>.openvino.xml."""
    return os.path.splitext(model_path)[0] + ".openvino.xml"


def int8_beside_model(model_path: str) -> str:
    """The int8 IR that `kneerecon export-openvino --int8` (models/quantize.py) writes: <model stem>.int8.openvino.xml. Its weights
    and activations are quantized (post-training, calibrated on training-set inputs); it carries the
    same source checksum as the float IR, so it is used only with the model file it was made from."""
    return os.path.splitext(model_path)[0] + ".int8.openvino.xml"


def find_int8_ir(core, model_path: str, sha: str | None = None):
    """(path, openvino.Model) of the int8 IR made from this model file, or (None, None)."""
    path = int8_beside_model(model_path)
    model = _read_if_matching(core, path, sha or file_sha256(model_path))
    return (path, model) if model is not None else (None, None)


def cache_folder() -> str:
    """$KNEERECON_CACHE/openvino, else ~/.cache/kneerecon/openvino."""
    root = os.environ.get("KNEERECON_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kneerecon")
    return os.path.join(root, "openvino")


def compiled_cache_folder() -> str:
    """Where OpenVINO caches compiled networks (<cache folder>/compiled)."""
    return os.path.join(cache_folder(), "compiled")


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _labels_module(net):
    """The network followed by the argmax over classes, so that OpenVINO returns labels (uint8),
    and, as a second output, the class scores (logits, fp16) for `refine.refine_labels`."""
    import torch

    class _Labels(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            logits = self.net(x)
            return logits.argmax(1).to(torch.uint8), logits.half()

    return _Labels(net)


def conversion_help(model_path: str) -> str:
    """What to do when a model has no converted network and PyTorch is not there to convert it."""
    return (f"{model_path} has no converted OpenVINO network (no {os.path.basename(beside_model(model_path))} made from "
            f"this very file beside it, none in {cache_folder()}), and converting one needs PyTorch, which is not "
            "installed. Convert it once where PyTorch is installed (pip install 'kneerecon[train]'): "
            f"kneerecon export-openvino --model {model_path}  - it writes <model>.openvino.xml and .bin beside the "
            "model file; keep them next to it")


def _use_depth_to_space(model) -> None:
    """Replace the reshape-transpose-reshape that `fused_unet.depth_to_space3d` traces into by
    OpenVINO's DepthToSpace, which runs in the CPU plugin's blocked layout without a copy through
    an 8-D tensor (~9 ms less per forward)."""
    import openvino.opset13 as ops

    for op in model.get_ordered_ops():
        if op.get_type_name() != "Transpose" or len(op.get_output_partial_shape(0)) != 8:
            continue
        before = op.input_value(0).get_node()
        users = list(op.output(0).get_target_inputs())
        if before.get_type_name() != "Reshape" or len(users) != 1 or users[0].get_node().get_type_name() != "Reshape":
            continue
        after = users[0].get_node()
        d2s = ops.depth_to_space(before.input_value(0), "depth_first", 2)
        for target in list(after.output(0).get_target_inputs()):
            target.replace_source_output(d2s.output(0))
    model.validate_nodes_and_infer_types()


def convert(net, shape: tuple[int, ...], source_sha256: str):
    """An openvino.Model of the torch module `net` (fp32, eval mode; labels out) for inputs of
    `shape` [1, C, z, y, x]."""
    import torch
    from openvino.tools.ovc import convert_model

    ov = import_openvino()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter traces with torch.jit, which warns of its deprecation
        model = convert_model(_labels_module(net.float().eval()), example_input=torch.zeros(shape))
    model.reshape(ov.PartialShape(list(shape)))  # static: the CPU plugin plans memory once
    _use_depth_to_space(model)
    model.set_rt_info(source_sha256, RT_KEY)
    return model


def save(model, xml_path: str) -> None:
    """Write the IR (.xml + .bin, weights stored in fp16) atomically: both files appear together."""
    import openvino as ov

    folder = os.path.dirname(os.path.abspath(xml_path))
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder, prefix=".ov-")
    try:
        name = os.path.basename(xml_path)
        ov.save_model(model, os.path.join(tmp, name), compress_to_fp16=True)
        # the .bin first: an .xml is only ever seen next to its weights
        os.replace(os.path.join(tmp, name[:-4] + ".bin"), xml_path[:-4] + ".bin")
        os.replace(os.path.join(tmp, name), xml_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_ir(core, model_path: str, sha: str | None = None):
    """(path, openvino.Model) of an IR made from this very model file, beside it or in the cache;
    (None, None) if there is none."""
    sha = sha or file_sha256(model_path)
    for path in (beside_model(model_path), os.path.join(cache_folder(), sha[:32] + ".xml")):
        model = _read_if_matching(core, path, sha)
        if model is not None:
            return path, model
    return None, None


def _read_if_matching(core, xml_path: str, sha: str):
    if not (os.path.exists(xml_path) and os.path.exists(xml_path[:-4] + ".bin")):
        return None
    try:
        model = core.read_model(xml_path)
        return model if model.get_rt_info(RT_KEY).astype(str) == sha else None
    except Exception:  # an unreadable or foreign IR is simply not used
        return None


def native_bf16(core=None) -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (AVX512-BF16 or AMX); elsewhere bf16
    would be emulated and slower than f32. The same answer as PyTorch's oneDNN check, without PyTorch."""
    import openvino as ov

    try:
        return "BF16" in (core or ov.Core()).get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no answer: f32, always correct
        return False


def pick_precision(core, model_path: str, amp: bool) -> str:
    """The OpenVINO precision for this model on this CPU: with `amp`, bf16 where the CPU runs it
    natively (AVX512-BF16/AMX), else the model's int8 IR where one exists (about 1.8x faster than
    f32 on an AVX2 CPU, held-out Dice within 0.003: MODEL_CARD.md), else f32; without `amp`, f32."""
    if not amp:
        return "f32"
    if native_bf16(core):
        return "bf16"
    # (OpenVINONetwork checks that the int8 IR was made from this model file, else runs f32)
    return "int8" if os.path.exists(int8_beside_model(model_path)) else "f32"


def threads_from_env() -> int:
    """OpenVINO's thread count: $OMP_NUM_THREADS where set (as PyTorch's), else 0 (OpenVINO's default)."""
    try:
        return max(0, int(os.environ.get("OMP_NUM_THREADS", "0")))
    except ValueError:
        return 0


def prewarm(model_path: str, shape: tuple[int, ...], amp: bool = True, threads: int | None = None):
    """Compile the model's converted network once in a background thread and return the thread
    (None where openvino is missing). The first compilation in a process costs about 0.2-0.3 s even
    from OpenVINO's compiled-network cache (the CPU plugin builds its kernels); later ones, with the
    same settings, take a few hundredths. `kneerecon reconstruct` starts this before importing the
    rest of the pipeline (SimpleITK, VTK: about 0.2 s), so the two overlap: the compilation runs
    outside the GIL. The compiled network is dropped; the Reconstructor compiles its own. Any
    failure is left to the Reconstructor to report."""
    import threading

    try:
        ov = import_openvino()  # here, not in the thread: one importer at a time
    except ImportError:
        return None

    def work():
        try:
            core = ov.Core()
            OpenVINONetwork(model_path, None, pick_precision(core, model_path, amp), shape,
                            threads_from_env() if threads is None else threads, core)
        except Exception:  # noqa: BLE001 - reported, if it recurs, where it matters
            pass
    thread = threading.Thread(target=work, name="kneerecon-openvino-prewarm", daemon=True)
    thread.start()
    return thread


class OpenVINONetwork:
    """Labels from a 2-channel volume with OpenVINO on the CPU.

    `precision` is "bf16" or "f32" (OpenVINO's inference precision hint). `net`: the torch network
    (BatchNorm folded, fused), or a function that builds it, used only when no matching IR exists
    (then the conversion is cached); None: no conversion, a missing IR is a KneeReconError that says
    how to make one."""

    def __init__(self, model_path: str, net, precision: str, shape: tuple[int, ...], threads: int = 0, core=None):
        if not available():
            raise KneeReconError("the OpenVINO backend needs the openvino package (pip install openvino); "
                                 "or use --backend torch")
        import openvino as ov

        self.core = core or ov.Core()
        self.precision = precision
        self.threads = threads
        self.source = os.path.abspath(model_path)
        sha = file_sha256(self.source)
        self.ir_path, self.model = None, None
        if precision == "int8":  # the quantized IR (its float parts run in f32), if made from this model file
            self.ir_path, self.model = find_int8_ir(self.core, self.source, sha)
            if self.model is None:  # none, or one of another model file: the float IR in f32
                self.precision = "f32"
        if self.model is None:
            self.ir_path, self.model = find_ir(self.core, self.source, sha)
        if self.model is None:
            if net is None:
                raise KneeReconError(conversion_help(self.source))
            self.model = convert(net() if callable(net) and not hasattr(net, "forward") else net, shape, sha)
            cached = os.path.join(cache_folder(), sha[:32] + ".xml")
            try:
                save(self.model, cached)
                self.ir_path = cached
            except OSError:  # a read-only home: convert again next time
                pass
        self.compiled: dict[tuple[int, ...], object] = {}
        self._request(tuple(shape))  # compile now (~0.1 s), not in the first reconstruction

    def _request(self, shape: tuple[int, ...]):
        if shape not in self.compiled:
            model = self.model
            current = model.input(0).get_partial_shape()
            hint = "f32" if self.precision == "int8" else self.precision
            config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = self.threads
            if not current.is_static or tuple(current.to_shape()) != shape:
                model = model.clone()
                model.reshape({0: list(shape)})
            elif self.ir_path is not None and _writable(compiled_cache_folder()):
                # the IR's own shape, compiled from its file: OpenVINO keeps the compiled network
                # in a cache (keyed by the file and the settings), so later processes load it in
                # ~0.05 s instead of compiling for ~0.3-0.5 s
                model = self.ir_path
                config["CACHE_DIR"] = compiled_cache_folder()
            self.compiled[shape] = self.core.compile_model(model, "CPU", config).create_infer_request()
        return self.compiled[shape]

    @property
    def has_scores(self) -> bool:
        """Whether the IR also returns the class scores (IRs converted before 0.5 return labels only)."""
        return len(self.model.outputs) > 1

    def __call__(self, volume: np.ndarray, scores: bool = False):
        """uint8 labels [z, y, x] of a float32 volume [C, z, y, x]; with `scores`, (labels, class
        scores [K, z, y, x] or None where the IR has none)."""
        x = np.ascontiguousarray(volume[None], dtype=np.float32)
        request = self._last = self._request(x.shape)
        request.infer({0: x}, share_inputs=True, share_outputs=True)  # outputs read (and copied) below
        labels = np.array(request.get_output_tensor(0).data[0], dtype=np.uint8)  # a copy: the buffer is reused
        if not scores:
            return labels
        return labels, (np.array(request.get_output_tensor(1).data[0]) if self.has_scores else None)


    def last_scores(self) -> np.ndarray | None:
        """The class scores [K, z, y, x] of the last inference as a view of OpenVINO's output
        buffer (no copy: valid until the next inference), for reading a few voxels (quality.py's
        margin); None before the first inference or where the IR has no scores."""
        request = getattr(self, "_last", None)
        if request is None or not self.has_scores:
            return None
        return request.get_output_tensor(1).data[0]


def export_ir(model_path: str, xml_path: str | None = None, grid_size: int | None = None) -> str:
    """Convert a model file to an OpenVINO IR (default: beside it, <stem>.openvino.xml); returns its path."""
    if not available():
        raise KneeReconError("export-openvino needs the openvino package (pip install openvino)")
    if not os.path.exists(model_path):
        raise KneeReconError(f"model file not found: {model_path}")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise KneeReconError("export-openvino reads the model's weights with PyTorch, which is not installed: "
                             "pip install 'kneerecon[train]'")
    from .checkpoint import load_model
    from .fused_unet import fuse_for_inference
    from .network import fold_batchnorm

    xml_path = xml_path or beside_model(model_path)
    if not xml_path.endswith(".xml"):
        raise KneeReconError(f"the IR path must end in .xml, got {xml_path!r}")
    net, card = load_model(model_path)
    size = int(grid_size or card.get("grid_size", 128))
    if size % net.divisor:
        raise KneeReconError(f"grid size {size} must be a multiple of {net.divisor} for this network")
    model = convert(fuse_for_inference(fold_batchnorm(net)), (1, int(net.config.in_channels), size, size, size),
                    file_sha256(model_path))
    save(model, xml_path)
    return xml_path
