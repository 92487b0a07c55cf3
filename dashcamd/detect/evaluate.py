"""Evaluation metrics for anonymisation: is each labelled object hidden by the blur boxes, and are the
boxes on real objects. Boxes are float xyxy image pixels; arrays are numpy.

Rules:
- A ground-truth (GT) object is *hidden* when >= 80 % of its area lies inside the union of the predicted
  boxes of any class (a plate blurred by a "face" box is still hidden). With per-class enlargement
  factors, the predicted boxes are first enlarged as the redactor enlarges them: the redactor's fully
  redacted pixels always include the enlarged box, so this is what the output hides, at the least.
- A prediction is a *true positive* when it overlaps a GT box of its own class with IoU >= 0.3, or when
  >= 50 % of its own area lies inside one such GT box (a box on a plate's text alone counts).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dashcamd.boxes import enlarged_xyxy

HIDDEN_MIN_FRACTION = 0.8
TP_MIN_IOU = 0.3
TP_MIN_INSIDE_FRACTION = 0.5
WIDTH_BUCKETS_PX = (("<16", 0.0, 16.0), ("16-32", 16.0, 32.0), ("32-96", 32.0, 96.0), (">=96", 96.0, math.inf))

# Sets whose labels are exhaustive for a class: only there can an unmatched prediction be called false.
EXHAUSTIVE_CLASSES = {"openimages_plates_roboflow": {"plate"}, "widerface_val_subset": {"face"}}


def _as_boxes(boxes_xyxy: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)


def _areas(boxes_xyxy: np.ndarray) -> np.ndarray:
    return np.clip(boxes_xyxy[:, 2] - boxes_xyxy[:, 0], 0, None) * np.clip(boxes_xyxy[:, 3] - boxes_xyxy[:, 1], 0, None)


def covered_fraction(targets_xyxy: np.ndarray, covers_xyxy: np.ndarray) -> np.ndarray:
    """float64 (G,): the fraction of each target box's area inside the union of the cover boxes.

    Exact for fractional coordinates: the union is rasterised on the grid of all box edges (cells weighted
    by their area), then each target's covered area is read from a summed-area table. Empty targets get 0.
    """
    targets, covers = _as_boxes(targets_xyxy), _as_boxes(covers_xyxy)
    if len(targets) == 0 or len(covers) == 0:
        return np.zeros(len(targets))
    xs = np.unique(np.concatenate([targets[:, [0, 2]].ravel(), covers[:, [0, 2]].ravel()]))
    ys = np.unique(np.concatenate([targets[:, [1, 3]].ravel(), covers[:, [1, 3]].ravel()]))
    mask = np.zeros((len(ys) - 1, len(xs) - 1), dtype=bool)
    cols, rows = np.searchsorted(xs, covers[:, [0, 2]]), np.searchsorted(ys, covers[:, [1, 3]])
    for (col0, col1), (row0, row1) in zip(cols, rows):
        mask[row0:row1, col0:col1] = True
    covered_area = mask * np.outer(np.diff(ys), np.diff(xs))
    summed = np.zeros((len(ys), len(xs)))
    summed[1:, 1:] = covered_area.cumsum(0).cumsum(1)
    col0, col1 = np.searchsorted(xs, targets[:, 0]), np.searchsorted(xs, targets[:, 2])
    row0, row1 = np.searchsorted(ys, targets[:, 1]), np.searchsorted(ys, targets[:, 3])
    inside = summed[row1, col1] - summed[row0, col1] - summed[row1, col0] + summed[row0, col0]
    areas = _areas(targets)
    return np.where(areas > 0, inside / np.where(areas > 0, areas, 1), 0.0)


def hidden(targets_xyxy: np.ndarray | Sequence[Sequence[float]], pred_boxes: Iterable[Sequence[Any]],
           enlarge: Mapping[str, float] | None = None) -> np.ndarray:
    """bool (G,): the hidden rule. A target is hidden when >= HIDDEN_MIN_FRACTION of it lies inside the
    union of the predicted boxes ([x1, y1, x2, y2, label, ...], any class), each first enlarged by its
    class's factor in ``enlarge`` (none: as detected)."""
    covers = _as_boxes([enlarged_xyxy(*p[:4], (enlarge or {}).get(p[4], 1.0)) for p in pred_boxes])
    return covered_fraction(targets_xyxy, covers) >= HIDDEN_MIN_FRACTION


def true_positives(preds_xyxy: np.ndarray, gts_xyxy: np.ndarray) -> np.ndarray:
    """bool (P,): which predictions match a GT box of the same class (see the module's rule)."""
    preds, gts = _as_boxes(preds_xyxy), _as_boxes(gts_xyxy)
    if len(preds) == 0 or len(gts) == 0:
        return np.zeros(len(preds), dtype=bool)
    top_left = np.maximum(preds[:, None, :2], gts[None, :, :2])
    bottom_right = np.minimum(preds[:, None, 2:], gts[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    pred_areas, gt_areas = _areas(preds)[:, None], _areas(gts)[None, :]
    union = pred_areas + gt_areas - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    inside = np.divide(inter, pred_areas, out=np.zeros_like(inter), where=pred_areas > 0)
    return (iou.max(axis=1) >= TP_MIN_IOU) | (inside.max(axis=1) >= TP_MIN_INSIDE_FRACTION)


def width_bucket(width_px: float) -> str:
    """The WIDTH_BUCKETS_PX label of a GT box width."""
    return next(label for label, low, high in WIDTH_BUCKETS_PX if low <= width_px < high)


@dataclass
class ClassTally:
    """Running counts for one class on one set."""

    gt: int = 0
    hidden: int = 0
    gt_by_width: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_bucket_labels(), 0))
    hidden_by_width: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_bucket_labels(), 0))
    predictions: int = 0
    true_positives: int = 0


def _bucket_labels() -> list[str]:
    return [label for label, _, _ in WIDTH_BUCKETS_PX]


def tally_image(tallies: dict[str, ClassTally], gt_boxes: Iterable[Sequence[Any]],
                pred_boxes: Iterable[Sequence[Any]], enlarge: Mapping[str, float] | None = None) -> None:
    """Add one image. gt_boxes: [x1, y1, x2, y2, label]; pred_boxes: [x1, y1, x2, y2, label, ...].

    ``enlarge``: per-class factors applied to the predicted boxes for the hidden rule only (precision
    stays a property of the detector's own boxes). Classes missing from ``tallies`` are added.
    """
    gts, preds = list(gt_boxes), list(pred_boxes)
    for label in {g[4] for g in gts} | {p[4] for p in preds}:
        tally = tallies.setdefault(label, ClassTally())
        class_gts = _as_boxes([g[:4] for g in gts if g[4] == label])
        class_hidden = hidden(class_gts, preds, enlarge)
        tally.gt += len(class_gts)
        tally.hidden += int(class_hidden.sum())
        for box, is_hidden in zip(class_gts, class_hidden):
            bucket = width_bucket(box[2] - box[0])
            tally.gt_by_width[bucket] += 1
            tally.hidden_by_width[bucket] += int(is_hidden)
        class_preds = _as_boxes([p[:4] for p in preds if p[4] == label])
        tally.predictions += len(class_preds)
        tally.true_positives += int(true_positives(class_preds, class_gts).sum())


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


def summarise(tally: ClassTally, with_precision: bool) -> dict[str, Any]:
    """JSON-ready metrics of one class; precision only where the set's labels are exhaustive for it."""
    summary: dict[str, Any] = {
        "gt": tally.gt, "hidden": tally.hidden, "recall": _ratio(tally.hidden, tally.gt),
        "recall_by_width": {bucket: {"gt": tally.gt_by_width[bucket], "hidden": tally.hidden_by_width[bucket],
                                     "recall": _ratio(tally.hidden_by_width[bucket], tally.gt_by_width[bucket])}
                            for bucket in _bucket_labels()},
        "predictions": tally.predictions,
    }
    if with_precision:
        summary["true_positives"] = tally.true_positives
        summary["precision"] = _ratio(tally.true_positives, tally.predictions)
    return summary
