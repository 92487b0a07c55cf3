"""Choose the shipped per-class score thresholds on the dev split (never on eval/).

Anonymisation wants recall: the rule is the lowest candidate threshold whose dev precision (IoU 0.5) is
still at least ``min_precision``. The detector runs exactly as at run time (``Detector``, letterbox,
NMS) with a threshold below every candidate, so one pass over the dev images scores all candidates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dataset import CLASS_NAMES, Sample, read_rgb
from .dev_eval import match_detections

CANDIDATES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4)


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    precision: float
    recall: float


def operating_points(scores: np.ndarray, is_tp: np.ndarray, num_gt: int,
                     candidates: Sequence[float] = CANDIDATES) -> list[OperatingPoint]:
    """Precision and recall of one class's detections kept at each candidate threshold."""
    points = []
    for threshold in candidates:
        kept = scores >= threshold
        hits = int(is_tp[kept].sum())
        precision = hits / int(kept.sum()) if kept.any() else 1.0
        points.append(OperatingPoint(threshold, precision, hits / num_gt if num_gt else float("nan")))
    return points


def choose(points: Sequence[OperatingPoint], min_precision: float) -> OperatingPoint:
    """The lowest threshold with precision >= min_precision; the most precise one if none qualifies."""
    good = [p for p in points if p.precision >= min_precision]
    return min(good, key=lambda p: p.threshold) if good else max(points, key=lambda p: p.precision)


def dev_operating_points(weights: Path, samples: Sequence[Sample], inference_size: int = 640,
                         candidates: Sequence[float] = CANDIDATES) -> dict[str, list[OperatingPoint]]:
    """Per class name: operating points of ``weights`` on ``samples`` at ``candidates``."""
    from dashcamd.detect import Detector

    floor = min(candidates)
    detector = Detector(weights, device="cpu", thresholds={name: floor for name in CLASS_NAMES},
                        inference_size=inference_size, batch_size=1)
    scores: dict[int, list[np.ndarray]] = {c: [] for c in range(len(CLASS_NAMES))}
    hits: dict[int, list[np.ndarray]] = {c: [] for c in range(len(CLASS_NAMES))}
    totals = dict.fromkeys(range(len(CLASS_NAMES)), 0)
    for sample in samples:
        (found,) = detector.detect([read_rgb(sample.image_path)])
        for c, name in enumerate(CLASS_NAMES):
            dets = np.array([[d.x1, d.y1, d.x2, d.y2, d.score] for d in found if d.label == name],
                            np.float64).reshape(-1, 5)
            truth = sample.boxes_xyxy[sample.classes == c]
            scores[c].append(dets[:, 4])
            hits[c].append(match_detections(dets, truth))
            totals[c] += len(truth)
    return {name: operating_points(np.concatenate(scores[c]), np.concatenate(hits[c]), totals[c], candidates)
            for c, name in enumerate(CLASS_NAMES)}
