"""Weights files: dashcamd's own format (save + load), and ``load_model`` that accepts every supported one.

Own format (``torch.load(path, weights_only=True)`` reads it)::

    {"format": "dashcamd-yolov5", "version": 1, "arch": <plain arch dict, see arch.py>,
     "names": ["plate", "face"], "state_dict": {name: tensor (floats fp16)}, "meta": {<plain training info>}}
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dashcamd.detect.errors import CheckpointError
from dashcamd.detect.model import YoloV5, build_model
from dashcamd.detect.unpickle import read_torch_archive

FORMAT = "dashcamd-yolov5"
VERSION = 1


def save_checkpoint(model: YoloV5, path: Path, meta: Mapping[str, Any]) -> None:
    """Write ``model`` in dashcamd's format, floats as fp16 (half the size, no measurable accuracy loss).

    ``meta`` must hold plain types only (str, int, float, bool, None, list, dict, tensors) so that the file
    stays loadable with ``weights_only=True``. The file appears atomically: a reader never sees half of it.
    """
    state = {
        name: (t.detach().half() if t.is_floating_point() else t.detach()).cpu().contiguous().clone()
        for name, t in model.state_dict().items()
    }
    payload = {"format": FORMAT, "version": VERSION, "arch": model.arch, "names": list(model.names),
               "state_dict": state, "meta": dict(meta)}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def model_from_dashcamd(checkpoint: Mapping[str, Any]) -> tuple[YoloV5, dict[str, Any]]:
    """(model in fp32, training mode, on CPU; meta) from an unpickled dashcamd checkpoint dict."""
    version = checkpoint.get("version")
    if checkpoint.get("format") != FORMAT or not isinstance(version, int) or version > VERSION:
        raise CheckpointError(f"not a dashcamd checkpoint of version <= {VERSION} "
                              f"(format={checkpoint.get('format')!r}, version={version!r})")
    try:
        model = build_model(checkpoint["arch"], checkpoint["names"])
        model.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"dashcamd checkpoint does not match its architecture: {e}") from e
    return model, dict(checkpoint.get("meta") or {})


def load_checkpoint(path: Path) -> tuple[YoloV5, dict[str, Any]]:
    """(model, meta) from a dashcamd ``.pt`` file, e.g. to resume training; the model is in training mode."""
    return model_from_dashcamd(torch.load(Path(path), map_location="cpu", weights_only=True))


def load_model(path: Path | str) -> nn.Module:
    """The detector in ``path``: dashcamd ``.pt``, ultralytics YOLOv5 ``.pt`` (v5.0 or v6+) or ``.onnx``.

    Returns an eval-mode fp32 CPU module with ``names`` (list[str]) whose ``forward`` maps float
    (B, 3, H, W) RGB in [0, 1] to decoded (B, N, 5+nc), see ``YoloV5.forward``. Pickled files are read
    with the allow-listed unpickler, so nothing in them is executed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file")
    if path.suffix.lower() == ".onnx":
        from dashcamd.detect.onnx_backend import OnnxModel  # onnxruntime is an optional extra

        return OnnxModel(path)
    raw = read_torch_archive(path)
    if isinstance(raw, dict) and "format" in raw:
        model, _meta = model_from_dashcamd(raw)
    elif isinstance(raw, dict) and "model" in raw:
        from dashcamd.detect.ultralytics import model_from_ultralytics

        model = model_from_ultralytics(raw)
    else:
        raise CheckpointError(f"{path}: neither a dashcamd nor a YOLOv5 training checkpoint")
    return model.float().eval()
