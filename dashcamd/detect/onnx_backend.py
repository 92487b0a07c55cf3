"""ONNX: export our model (dynamic batch, fixed input size), run an exported file or a live model with onnxruntime.

onnx/onnxruntime are an optional extra, so this module is imported only when an ``.onnx`` path is used.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dashcamd.detect import quantize
from dashcamd.detect.checkpoint import load_model
from dashcamd.detect.errors import CheckpointError
from dashcamd.detect.model import YoloV5

OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "output"
NAMES_KEY = "names"  # metadata_props entry: JSON list of class names


def export_onnx(weights: Path, out_path: Path, inference_size: int = 640) -> None:
    """Write ``weights`` (any torch format) as ONNX taking float32 (B, 3, S, S) RGB in [0, 1], S =
    ``inference_size`` rounded up to a multiple of 32, returning decoded (B, N, 5+nc) like ``YoloV5``.

    The class names travel in the file's metadata. The file appears atomically.
    """
    import onnx

    model = load_model(weights)
    if not isinstance(model, YoloV5):
        raise CheckpointError(f"{weights}: export needs torch weights, not an ONNX file")
    side = math.ceil(inference_size / 32) * 32
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        tmp.write_bytes(export_bytes(model, (side, side)))
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = NAMES_KEY, json.dumps(model.names)
        onnx.save(proto, str(tmp))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)


def export_bytes(model: YoloV5, input_hw: tuple[int, int]) -> bytes:
    """ONNX graph for float32 (B, 3, *input_hw) input, batch dynamic."""
    target = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated, but the torch.export one needs onnxscript, which is
        # not a dependency; this small static graph exports the same with either.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (torch.zeros(1, 3, *input_hw),), target, dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    return target.getvalue()


def _session(source: str | bytes, threads: int):
    # Without this onnxruntime writes a telemetry device id and event store under ~/.cache and $TMPDIR
    # at import: files outside the folders dashcamd was given (found by tests/test_bad_input.py).
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    options = onnxruntime.SessionOptions()
    # Spinning threads burn CPU between calls; the worker shares the machine with video decode.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


class OnnxRuntimeModel(nn.Module):
    """A torch ``YoloV5`` run by onnxruntime on the CPU: about twice torch's fp32 speed there, and int8
    about 1.75x faster again (README).

    Exported in memory at start-up and once per new letterbox shape (a clip has one), so the model sees
    exactly the input torch would, padding included. Same interface as ``YoloV5`` in eval mode.
    ``int8_ranges``: a ``dashcamd.detect.quantize`` ranges document for these weights; each shape's export
    is then quantized from it, and takes the 8-bit pixels themselves (``takes_pixels``, ``forward_pixels``).
    """

    def __init__(self, model: YoloV5, threads: int | None = None, int8_ranges: dict[str, Any] | None = None) -> None:
        super().__init__()
        self._model = model.float().eval()
        self._threads = threads or torch.get_num_threads()
        self._int8_ranges = int8_ranges
        self._sessions: dict[tuple[int, int], Any] = {}
        self.names: list[str] = list(model.names)
        self.takes_pixels = int8_ranges is not None

    def prepare(self, input_hw: tuple[int, int]) -> Any:
        """The session for (height, width) inputs, exported (and quantized) on first use."""
        session = self._sessions.get(input_hw)
        if session is None:
            graph = export_bytes(self._model, input_hw)
            if self._int8_ranges is not None:
                graph = quantize.take_pixels(
                    quantize.quantize(graph, quantize.head_scope(self._model), self._int8_ranges))
            session = self._sessions[input_hw] = _session(graph, self._threads)
        return session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] -> float32 (B, N, 5+nc) on the CPU."""
        if self.takes_pixels:
            # Rounded as the int8 model's quantize step did before ``take_pixels`` replaced it: x / scale,
            # half to even; so resized (non-integer) levels give the same outputs as before too.
            levels = (x.detach().float().cpu() / torch.tensor(1 / 255, dtype=torch.float32)).round_()
            pixels = levels.clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
            return self.forward_pixels(pixels)
        session = self.prepare((x.shape[2], x.shape[3]))
        (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().float().cpu().numpy()})
        return torch.from_numpy(out)

    def forward_pixels(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB, letterboxed -> float32 (B, N, 5+nc); int8 models only (``takes_pixels``)."""
        session = self.prepare((pixels.shape[1], pixels.shape[2]))
        (out,) = session.run([OUTPUT_NAME], {quantize.PIXELS_NAME: pixels})
        return torch.from_numpy(out)


class OnnxModel(nn.Module):
    """An exported detector behind the ``YoloV5`` eval-mode interface (CPU tensors in and out).

    ``input_hw``: the fixed (height, width) the file was exported for; callers letterbox to it.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        try:
            self._session = _session(str(path), torch.get_num_threads())
        except Exception as e:  # onnxruntime raises its own untyped errors for unreadable files
            raise CheckpointError(f"{path}: onnxruntime cannot load it: {e}") from e
        meta = self._session.get_modelmeta().custom_metadata_map
        model_input = self._session.get_inputs()[0]
        height, width = model_input.shape[2:]
        if not (isinstance(height, int) and isinstance(width, int)):
            raise CheckpointError(f"{path}: expected a fixed input height and width, got {model_input.shape}")
        self.input_hw = (height, width)
        self._input_name = model_input.name
        if NAMES_KEY not in meta:
            raise CheckpointError(f"{path}: no class names in its metadata (not exported by dashcamd)")
        self.names: list[str] = json.loads(meta[NAMES_KEY])
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [0, 1] with (H, W) = input_hw -> float32 (B, N, 5+nc) on the CPU."""
        (out,) = self._session.run([OUTPUT_NAME], {self._input_name: x.detach().float().cpu().numpy()})
        return torch.from_numpy(out)
