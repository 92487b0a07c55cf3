"""Periodic score on the dev split (carved out of TRAIN, never eval/): AP@0.5, recall and hidden per class.

Used only to pick best.pt and to watch training; the project's figures come from `dashcamd eval`.
"""

from __future__ import annotations

import numpy as np
import torch

from dashcamd.boxes import pairwise_iou
from dashcamd.config import DetectorSettings
from dashcamd.detect.evaluate import hidden
from dashcamd.detect.infer import DEFAULT_THRESHOLD

from .dataset import CLASS_NAMES, Sample, letterbox, read_rgb


def average_precision(scores: np.ndarray, is_tp: np.ndarray, num_gt: int) -> float:
    """All-point interpolated AP from per-detection scores and TP flags (VOC 2010+ style)."""
    if num_gt == 0:
        return float("nan")
    order = np.argsort(-scores)
    tp = np.cumsum(is_tp[order])
    fp = np.cumsum(~is_tp[order])
    recall = np.concatenate([[0.0], tp / num_gt, [1.0]])
    precision = np.concatenate([[1.0], tp / np.maximum(tp + fp, 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(recall) * precision[1:]))


def match_detections(dets: np.ndarray, gt_boxes: np.ndarray, iou_thresh: float = 0.5) -> np.ndarray:
    """Greedy by score: a detection is a TP if it overlaps an unused GT box by >= iou_thresh.

    dets (N, 5) [x1, y1, x2, y2, score] of one class, gt (M, 4). Returns is_tp (N,) bool.
    """
    is_tp = np.zeros(len(dets), bool)
    if len(dets) == 0 or len(gt_boxes) == 0:
        return is_tp
    iou = pairwise_iou(dets[:, :4], gt_boxes)
    used = np.zeros(len(gt_boxes), bool)
    for i in np.argsort(-dets[:, 4]):
        cand = np.where(~used & (iou[i] >= iou_thresh))[0]
        if cand.size:
            j = cand[np.argmax(iou[i, cand])]
            used[j], is_tp[i] = True, True
    return is_tp


def daemon_thresholds() -> np.ndarray:
    """float (nc,): the daemon's default threshold of each class, in CLASS_NAMES order."""
    defaults = DetectorSettings.model_fields["thresholds"].default_factory()
    return np.array([defaults.get(name, DEFAULT_THRESHOLD) for name in CLASS_NAMES])


@torch.no_grad()
def evaluate(predict, samples: list[Sample], image_size: int, recall_conf: float = 0.25,
             hidden_thresholds: np.ndarray | None = None) -> dict:
    """Score a detector on samples letterboxed to image_size.

    predict: callable(images float32 (1, 3, S, S) RGB [0, 1]) -> (N, 6) tensor [x1, y1, x2, y2,
    score, cls] in that input's pixels. Returns {"<class>_ap50", "<class>_recall", "<class>_hidden",
    "score"} where score is the mean AP50 over classes with labels (the number best.pt is chosen by) and
    hidden is ``dashcamd eval``'s rule (>= 80 % of the object under detections of any class scoring at
    least their class's ``hidden_thresholds``, by default ``daemon_thresholds()``). Why both: AP@0.5
    accepts a box that covers half an object; the eval's misses are mostly such boxes (model card,
    eleventh session).
    """
    thresholds = daemon_thresholds() if hidden_thresholds is None else np.asarray(hidden_thresholds)
    per_class = {c: {"scores": [], "tp": [], "gt": 0, "hit": 0, "hidden": 0} for c in range(len(CLASS_NAMES))}
    for s in samples:
        image, scale, (px, py) = letterbox(read_rgb(s.image_path), image_size)
        x = torch.from_numpy(image).permute(2, 0, 1).float().div_(255)[None]
        dets = predict(x).cpu().numpy().astype(np.float64)
        gt = s.boxes_xyxy * scale + np.array([px, py, px, py], np.float32)
        covers = [[*box[:4], "any"] for box in dets[dets[:, 4] >= thresholds[dets[:, 5].astype(int)]]]
        for c, acc in per_class.items():
            d, g = dets[dets[:, 5] == c], gt[s.classes == c]
            tp = match_detections(d[:, :5], g)
            acc["scores"].append(d[:, 4])
            acc["tp"].append(tp)
            acc["gt"] += len(g)
            acc["hit"] += int(tp[d[:, 4] >= recall_conf].sum())
            acc["hidden"] += int(hidden(g, covers).sum())
    out, aps = {}, []
    for c, acc in per_class.items():
        ap = average_precision(np.concatenate(acc["scores"]), np.concatenate(acc["tp"]), acc["gt"])
        out[f"{CLASS_NAMES[c]}_ap50"] = round(ap, 4)
        out[f"{CLASS_NAMES[c]}_recall"] = round(acc["hit"] / max(1, acc["gt"]), 4)
        out[f"{CLASS_NAMES[c]}_hidden"] = round(acc["hidden"] / max(1, acc["gt"]), 4)
        if acc["gt"]:
            aps.append(ap)
    out["score"] = round(float(np.mean(aps)), 4) if aps else 0.0
    return out
