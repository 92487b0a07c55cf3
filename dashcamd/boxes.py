"""Box types shared by the detector, the tracker and the redactor; numpy only, so no module needs torch."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Detection(NamedTuple):
    """One detected object, frame pixels (xyxy), clipped to the frame."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str
    score: float


class RedactBox(NamedTuple):
    """One area to redact in one frame, in frame pixels (xyxy, already enlarged).

    Coordinates may lie partly outside the frame (an enlarged face at the edge keeps its shape);
    the redactor clips. ``source`` is "detected" | "tracked" | "memory" | "zone".
    """

    x1: float
    y1: float
    x2: float
    y2: float
    label: str
    score: float
    source: str


def enlarged_xyxy(x1: float, y1: float, x2: float, y2: float, factor: float) -> tuple[float, float, float, float]:
    """The box scaled by ``factor`` about its centre (DashcamCleaner's ROI enlargement)."""
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = (x2 - x1) * factor / 2, (y2 - y1) * factor / 2
    return cx - half_w, cy - half_h, cx + half_w, cy + half_h


def pairwise_iou(a_xyxy: np.ndarray, b_xyxy: np.ndarray) -> np.ndarray:
    """IoU matrix (N, M) of boxes a (N, 4) and b (M, 4), xyxy; empty boxes have IoU 0."""
    lo = np.maximum(a_xyxy[:, None, :2], b_xyxy[None, :, :2])
    hi = np.minimum(a_xyxy[:, None, 2:], b_xyxy[None, :, 2:])
    inter = np.prod(np.maximum(hi - lo, 0.0), axis=2)
    area_a = np.prod(np.maximum(a_xyxy[:, 2:] - a_xyxy[:, :2], 0.0), axis=1)
    area_b = np.prod(np.maximum(b_xyxy[:, 2:] - b_xyxy[:, :2], 0.0), axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)
