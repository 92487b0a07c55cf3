"""The one place training touches `dashcamd.detect`: build the model, read its head, predict, save.

Kept apart so the training code does not depend on the detector package's internals.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dashcamd.detect.arch import yolov5_arch
from dashcamd.detect.model import build_model, initialize_biases

from .dataset import CLASS_NAMES


def build(size: str) -> nn.Module:
    """A freshly initialised YOLOv5 of the given size ("n", "s", ...) for CLASS_NAMES, in training mode,
    with the Detect biases set to YOLOv5's prior (few objects per image) so early steps are stable."""
    model = build_model(yolov5_arch(size, nc=len(CLASS_NAMES)), CLASS_NAMES)
    initialize_biases(model)
    return model


def head_geometry(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(strides float32 (nl,), anchors_px float32 (nl, na, 2)) of the Detect head, in input pixels."""
    head = model.detect
    return head.stride.clone().float(), head.anchors_px.clone().float()


def _nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, iou_thresh: float) -> torch.Tensor:
    """Greedy NMS on (N, 4) boxes; returns kept indices, best first."""
    order = scores.argsort(descending=True)
    keep = []
    while order.numel():
        i = order[0]
        keep.append(i)
        rest = order[1:]
        lt = torch.maximum(boxes_xyxy[i, :2], boxes_xyxy[rest, :2])
        rb = torch.minimum(boxes_xyxy[i, 2:], boxes_xyxy[rest, 2:])
        inter = (rb - lt).clamp(min=0).prod(1)
        area = (boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]).prod(1)
        order = rest[inter / (area[i] + area[rest] - inter + 1e-9) < iou_thresh]
    return torch.stack(keep) if keep else torch.zeros(0, dtype=torch.long)


def predictor(model: nn.Module, conf: float = 0.01, iou: float = 0.5, max_det: int = 300):
    """Callable for dev eval: images float32 (1, 3, S, S) RGB [0, 1] -> (N, 6) [x1, y1, x2, y2, score,
    cls] in input pixels; score = objectness * class probability, one class per box, NMS per class."""

    @torch.no_grad()
    def predict(images: torch.Tensor) -> torch.Tensor:
        model.eval()
        out = model(images)[0]  # (N, 5 + nc): cx, cy, w, h, obj, cls...
        score, cls = (out[:, 5:] * out[:, 4:5]).max(1)
        keep = score >= conf
        out, score, cls = out[keep], score[keep], cls[keep]
        if score.numel() > 10 * max_det:
            top = score.topk(10 * max_det).indices
            out, score, cls = out[top], score[top], cls[top]
        xyxy = torch.cat([out[:, :2] - out[:, 2:4] / 2, out[:, :2] + out[:, 2:4] / 2], 1)
        # Offsetting boxes by class makes one NMS pass class-aware.
        kept = _nms(xyxy + cls[:, None] * 10_000.0, score, iou)[:max_det]
        return torch.cat([xyxy[kept], score[kept, None], cls[kept, None].float()], 1)

    return predict


def save_shipped(model: nn.Module, path: Path, meta: dict) -> None:
    """Write weights in the detector's own checkpoint format."""
    raise NotImplementedError
