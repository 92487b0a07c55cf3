"""Turns an ultralytics YOLOv5 training checkpoint, read as inert stand-ins, into our ``YoloV5``.

Both layouts DashcamCleaner-era and current files use are handled: v5.0 (Focus, SPP) and v6+ (6x6 stem
conv, SPPF). The ``yaml`` dict the checkpoint carries describes the layers; the module tree's
``_parameters``/``_buffers`` carry the tensors, whose names match ours one-to-one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from dashcamd.detect.errors import CheckpointError
from dashcamd.detect.model import YoloV5, build_model
from dashcamd.detect.unpickle import Inert

_MODEL_GLOBALS = {"models.yolo.Model", "models.yolo.DetectionModel"}
_SILU = "torch.nn.modules.activation.SiLU"


def _children(module: Inert) -> dict[str, Inert]:
    children = module.state.get("_modules") if isinstance(module.state, dict) else None
    if not isinstance(children, Mapping):
        raise CheckpointError(f"{module!r} has no module state")
    return {name: child for name, child in children.items() if child is not None}


def _walk(module: Inert, prefix: str = "") -> tuple[dict[str, Inert], dict[str, torch.Tensor]]:
    """(modules by dotted path, tensors by state-dict key) of the stand-in tree below ``module``."""
    modules, tensors = {prefix.rstrip("."): module}, {}
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (module.state.get(kind) or {}).items():
            if tensor is not None:
                tensors[prefix + name] = tensor
    for name, child in _children(module).items():
        if not isinstance(child, Inert):
            raise CheckpointError(f"{prefix}{name}: unexpected module {type(child).__name__}")
        sub_modules, sub_tensors = _walk(child, f"{prefix}{name}.")
        modules.update(sub_modules)
        tensors.update(sub_tensors)
    return modules, tensors


def _names(raw: Any, nc: int) -> list[str]:
    # v5.0 stores a list; v6.2+ a dict {class index: name}.
    if isinstance(raw, Mapping):
        raw = [raw[i] for i in sorted(raw)]
    if not isinstance(raw, list | tuple) or len(raw) != nc:
        return [str(i) for i in range(nc)]
    return [str(name) for name in raw]


def _check_modules(modules: dict[str, Inert], rows: list[list[Any]]) -> None:
    """Refuse what the builder would silently get wrong: other layer types, other activations."""
    layers = _children(modules["model"])
    if len(layers) != len(rows):
        raise CheckpointError(f"checkpoint has {len(layers)} layers, its yaml {len(rows)}")
    for index, (layer, row) in enumerate(zip(layers.values(), rows)):
        actual = layer.global_name.rsplit(".", 1)[-1]
        expected = str(row[2]).rsplit(".", 1)[-1]
        if actual not in (expected, "Sequential"):
            raise CheckpointError(f"layer {index} is {actual}, its yaml says {expected}")
    for path, module in modules.items():
        if module.global_name == "models.common.Conv":
            act = _children(module).get("act")
            if act is None or act.global_name != _SILU:
                raise CheckpointError(f"{path}.act is {act!r}: only SiLU YOLOv5 (v4.0+) checkpoints are supported")


def model_from_ultralytics(checkpoint: Mapping[str, Any]) -> YoloV5:
    """Our model (fp32, CPU, training mode) with the weights of a ``train.py`` checkpoint dict.

    Uses the EMA weights when present, as YOLOv5's own loader does. Anchors come from the Detect buffer
    (autoanchor may have changed them after the yaml was written), in grid units times the stride.
    """
    root = checkpoint.get("ema") or checkpoint.get("model")
    if not isinstance(root, Inert) or root.global_name not in _MODEL_GLOBALS:
        raise CheckpointError(f"checkpoint 'model' is {root!r}, not a YOLOv5 detection model")
    yaml = root.state.get("yaml")
    if not isinstance(yaml, Mapping):
        raise CheckpointError("YOLOv5 checkpoint has no yaml architecture dict")
    modules, tensors = _walk(root)
    rows = list(yaml.get("backbone", [])) + list(yaml.get("head", []))
    _check_modules(modules, rows)
    detect_path = f"model.{len(rows) - 1}"
    detect = modules[detect_path]
    stride = detect.state.get("stride")
    anchors_grid = tensors.pop(f"{detect_path}.anchors", None)
    tensors.pop(f"{detect_path}.anchor_grid", None)  # v5.0 buffer: the same anchors in pixels
    if not isinstance(stride, torch.Tensor) or anchors_grid is None:
        raise CheckpointError("YOLOv5 Detect layer lacks its stride or anchors")
    stride = stride.float()
    anchors_px = anchors_grid.float() * stride.view(-1, 1, 1)
    nc = int(detect.state.get("nc", yaml.get("nc")))
    try:
        arch = {
            "nc": nc,
            "depth_multiple": float(yaml["depth_multiple"]),
            "width_multiple": float(yaml["width_multiple"]),
            "anchors": anchors_px.reshape(len(anchors_px), -1).tolist(),
            "backbone": copy.deepcopy(list(yaml["backbone"])),
            "head": copy.deepcopy(list(yaml["head"])),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"YOLOv5 yaml lacks {e}") from e
    model = build_model(arch, _names(root.state.get("names"), nc))
    if not torch.equal(model.stride, stride):
        raise CheckpointError(f"checkpoint strides {stride.tolist()} differ from the built {model.stride.tolist()}")

    state = {f"{detect_path}.anchors_px": anchors_px, f"{detect_path}.stride": stride}
    missing = []
    for key in model.state_dict():
        if key not in state:
            if key in tensors:
                state[key] = tensors.pop(key)
            else:
                missing.append(key)
    if missing or tensors:
        raise CheckpointError(f"weights do not match the yaml: missing {missing[:5]}, unexpected {list(tensors)[:5]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not match the yaml: {e}") from e
    for path, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = float(modules[path].state.get("eps", module.eps))
    return model
