"""The one place training touches `dashcamd.detect`: build the model, read its head, predict, save.

Kept apart so the training code does not depend on the detector package's internals.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dashcamd.detect.arch import yolov5_arch
from dashcamd.detect.checkpoint import load_checkpoint, save_checkpoint
from dashcamd.detect.infer import postprocess
from dashcamd.detect.model import build_model, initialize_biases

from .dataset import CLASS_NAMES


def build(size: str) -> nn.Module:
    """A freshly initialised YOLOv5 of the given size ("n", "s", ...) for CLASS_NAMES, in training mode,
    with the Detect biases set to YOLOv5's prior (few objects per image) so early steps are stable."""
    model = build_model(yolov5_arch(size, nc=len(CLASS_NAMES)), CLASS_NAMES)
    initialize_biases(model)
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Copy a dashcamd checkpoint's tensors into ``model`` (same size and classes, else an error)."""
    trained, _meta = load_checkpoint(path)
    if list(trained.names) != list(CLASS_NAMES):
        raise ValueError(f"{path}: classes {trained.names}, expected {list(CLASS_NAMES)}")
    model.load_state_dict({k: v.float() for k, v in trained.state_dict().items()})


def head_geometry(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(strides float32 (nl,), anchors_px float32 (nl, na, 2)) of the Detect head, in input pixels."""
    head = model.detect
    return head.stride.clone().float(), head.anchors_px.clone().float()


def predictor(model: nn.Module, conf: float = 0.01, iou: float = 0.5):
    """Callable for dev eval: images float32 (1, 3, S, S) RGB [0, 1] -> (N, 6) [x1, y1, x2, y2, score,
    cls] in input pixels, with the detector's own post-processing (score = objectness x class)."""
    device = next(model.parameters()).device
    thresholds = torch.full((len(CLASS_NAMES),), conf, device=device)

    @torch.no_grad()
    def predict(images: torch.Tensor) -> torch.Tensor:
        model.eval()
        boxes, scores, classes = postprocess(model(images.to(device)), thresholds, iou)[0]
        return torch.cat([boxes, scores[:, None], classes[:, None].float()], 1)

    return predict


def save_shipped(model: nn.Module, path: Path, meta: dict) -> None:
    """Write weights in the detector's own format (fp16; meta must be plain data)."""
    save_checkpoint(model, path, meta)
