"""The one place training touches `dashcamd.detect`: build the model, read its head, predict, save.

Kept apart so the training code does not depend on the detector package's internals.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .dataset import CLASS_NAMES


def build(size: str) -> nn.Module:
    """A freshly initialised YOLOv5 of the given width/depth ("n", "s", ...) for len(CLASS_NAMES) classes."""
    from dashcamd.detect.model import build_model

    return build_model(size, num_classes=len(CLASS_NAMES))


def head_geometry(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(strides (nl,), anchors_px (nl, na, 2)) of the Detect head, in input pixels."""
    head = model.head
    return head.stride.clone().float(), head.anchors_px.clone().float()


def predictor(model: nn.Module, conf: float = 0.01, iou: float = 0.5):
    """Callable for dev eval: images (B=1, 3, S, S) -> (N, 6) [x1, y1, x2, y2, score, cls]."""
    raise NotImplementedError


def save_shipped(model: nn.Module, path: Path, meta: dict) -> None:
    """Write weights in the detector's own checkpoint format."""
    raise NotImplementedError
