"""int8 on the CPU: onnxruntime static quantization from activation ranges measured once, offline.

Why: on a 2-core CPU the detector took about 40 % of the pipeline's CPU time in fp32, and int8 runs it
about 1.75x faster (README, "Measured speed"). Static quantization needs each activation's range on real
images. Those ranges belong to the weights, not to a clip, so they are measured once when the weights are made
(``python -m dashcamd.train calibrate``) and shipped beside them as ``<weights>.int8.json``; at start-up
each letterbox shape's fp32 export is quantized from them in memory, without any image.

The ranges are keyed by the exporter's tensor names and tied to the weights by their SHA-256: other
weights (a DashcamCleaner checkpoint, a retrained model) simply run in fp32 until they are calibrated.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dashcamd.detect.errors import CheckpointError
from dashcamd.detect.model import YoloV5

FORMAT = "dashcamd-int8-ranges"
SUFFIX = ".int8.json"
INPUT_NAME = "images"
PIXELS_NAME = "pixels"  # the int8 model's input after ``take_pixels``: uint8 (B, H, W, 3) RGB
RANGES_CACHE = "ranges.json"  # onnxruntime's own range cache, inside a temporary folder


def ranges_path(weights: Path) -> Path:
    """Where the ranges of ``weights`` live: ``weights/dashcamd-n-v1.pt`` -> ``weights/dashcamd-n-v1.int8.json``."""
    return Path(weights).with_suffix(SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def head_scope(model: YoloV5) -> str:
    """ONNX name prefix of the Detect head's nodes (the exporter names them after the module path).

    The whole head stays fp32: its three 1x1 output convolutions (logits) and the box decoding after them
    (sigmoid, grid offsets, anchor scaling). In int8, decoded pixel coordinates from 0 to 640 would move in
    steps of 2.5 px; and quantizing the output convolutions cost 0.05 plate AP50 on the training run's dev
    split (0.456 against fp32's 0.507; fp32 head: 0.498) while keeping them fp32 costs ~0.4 ms a frame.
    """
    return f"/model.{len(model.model) - 1}/"


def measure_ranges(fp32_onnx: bytes, scope: str, images: Iterable[np.ndarray], weights: Path) -> dict[str, Any]:
    """Activation ranges (min/max) of the fp32 export over ``images`` (float32 (1, 3, H, W) in [0, 1]),
    as the document ``write_ranges`` stores. ``scope``: ``head_scope`` of the exported model."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Images(CalibrationDataReader):
        def __init__(self) -> None:
            self._images = iter(images)
            self.count = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            image = next(self._images, None)
            if image is None:
                return None
            self.count += 1
            return {INPUT_NAME: image}

    reader = _Images()
    with tempfile.TemporaryDirectory(prefix="dashcamd-int8-") as tmp:
        # Quantizing once is the supported way to have onnxruntime write its range cache.
        _quantize_in(Path(tmp), fp32_onnx, scope, reader)
        ranges = json.loads((Path(tmp) / RANGES_CACHE).read_text())
    if reader.count == 0:
        raise ValueError("no calibration images")
    import onnxruntime

    return {"format": FORMAT, "weights_sha256": file_sha256(weights), "images": reader.count,
            "onnxruntime": onnxruntime.__version__, "ranges": ranges}


def write_ranges(document: dict[str, Any], path: Path) -> None:
    """Write atomically (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)


def load_ranges(weights: Path) -> dict[str, Any] | None:
    """The ranges measured for exactly these weights, or None when there are none (or they are for other
    weights). A file that is there but unreadable is an error, not a silent fp32."""
    path = ranges_path(weights)
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable int8 ranges: {e}") from e
    if document.get("format") != FORMAT or "ranges" not in document:
        raise CheckpointError(f"{path}: not a {FORMAT} file")
    if document.get("weights_sha256") != file_sha256(weights):
        return None
    return document


def quantize(fp32_onnx: bytes, scope: str, document: dict[str, Any]) -> bytes:
    """The int8 (QDQ) model for one exported shape, from the stored ranges: no image needed.

    The input's range is not taken from the calibration photos but set to what it is by construction,
    [0, 1] (8-bit pixels / 255), so that the model quantizes it to the pixels themselves (``take_pixels``).
    """
    ranges = copy.deepcopy(document["ranges"])
    ranges["data"][INPUT_NAME] = {"lowest": _float_array(0.0), "highest": _float_array(1.0), "CLS": "TensorData"}
    with tempfile.TemporaryDirectory(prefix="dashcamd-int8-") as tmp:
        (Path(tmp) / RANGES_CACHE).write_text(json.dumps(ranges))
        return _quantize_in(Path(tmp), fp32_onnx, scope, None)


def _float_array(value: float) -> dict[str, Any]:
    """One number as onnxruntime's range cache stores it."""
    return {"data": [value], "dtype": "float32", "CLS": "numpy.array"}


def take_pixels(int8_onnx: bytes) -> bytes:
    """The int8 model taking uint8 (B, H, W, 3) RGB pixels (``PIXELS_NAME``) instead of float (B, 3, H, W)
    in [0, 1].

    Why: its first step quantizes the float input with scale 1/255 and zero point 0, which gives back
    the 8-bit pixels exactly; so the pixels can go in as they are, and the caller skips the float
    conversion and layout change (1.3 ms a frame of the 2-core CPU's detector thread, against a few µs to
    pad uint8 frames). The quantize step becomes a transpose; the outputs are bit-identical.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(int8_onnx)
    graph = model.graph
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    (step,) = [node for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] == INPUT_NAME]
    scale, zero_point = constants[step.input[1]], constants[step.input[2]]
    if scale != np.float32(1 / 255) or zero_point != 0 or zero_point.dtype != np.uint8:
        raise CheckpointError(f"int8 input quantized with scale {scale}, zero point {zero_point!r}, not the pixels")
    (old_input,) = [i for i in graph.input if i.name == INPUT_NAME]
    batch, _, height, width = (d.dim_param or d.dim_value for d in old_input.type.tensor_type.shape.dim)
    graph.node.remove(step)
    graph.node.insert(0, helper.make_node("Transpose", [PIXELS_NAME], [step.output[0]], perm=[0, 3, 1, 2],
                                          name="pixels_to_nchw"))
    graph.input.remove(old_input)
    graph.input.insert(0, helper.make_tensor_value_info(PIXELS_NAME, TensorProto.UINT8, [batch, height, width, 3]))
    return model.SerializeToString()


def _quantize_in(folder: Path, fp32_onnx: bytes, scope: str, reader: Any) -> bytes:
    """The one quantization recipe, run in ``folder``: with a calibration ``reader`` it measures the ranges
    and leaves them in ``folder / RANGES_CACHE``; with None it takes them from there. Returns the int8 model.

    Per-channel int8 weights and uint8 activations, as onnxruntime's quantization guide recommends for x86
    CPUs; QDQ so that the graph stays an ordinary ONNX model; the Detect head excluded (``head_scope``).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    model_path, out_path = _prepared(fp32_onnx, folder), folder / "int8.onnx"
    quantize_static(model_path, out_path, reader, calibration_cache_path=folder / RANGES_CACHE,
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=_head_nodes(model_path, scope))
    return out_path.read_bytes()


def _prepared(fp32_onnx: bytes, folder: Path) -> Path:
    """onnxruntime's recommended pre-processing (graph optimisation, shape inference) written to ``folder``:
    without it the int8 model ran a third slower here (21 against 16 ms a frame). Done the same way for
    measuring and for quantizing, so the tensor names the ranges are keyed by match."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    raw, prepared = folder / "fp32.onnx", folder / "fp32-prepared.onnx"
    raw.write_bytes(fp32_onnx)
    # The symbolic shape pass fails on the dynamic batch axis and is not needed: all other shapes are fixed.
    quant_pre_process(raw, prepared, skip_symbolic_shape=True)
    return prepared


def _head_nodes(model_path: Path, scope: str) -> list[str]:
    import onnx

    graph = onnx.load(str(model_path)).graph
    nodes = [node.name for node in graph.node if node.name.startswith(scope)]
    if not nodes:  # an exporter that names nodes differently would otherwise quantize the head
        raise CheckpointError(f"no ONNX nodes under {scope!r}: cannot keep the Detect head in fp32")
    return nodes
