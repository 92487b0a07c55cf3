"""Threshold choice on the dev split: precision/recall per candidate, and the recall-first rule."""

from __future__ import annotations

import numpy as np
import pytest

from dashcamd.train.thresholds import OperatingPoint, choose, operating_points


def test_operating_points_count_kept_detections_and_hits():
    scores = np.array([0.9, 0.6, 0.3, 0.12, 0.07])
    is_tp = np.array([True, True, False, True, False])
    points = operating_points(scores, is_tp, num_gt=4, candidates=(0.05, 0.1, 0.5, 0.95))
    assert [p.threshold for p in points] == [0.05, 0.1, 0.5, 0.95]
    assert [p.precision for p in points] == pytest.approx([3 / 5, 3 / 4, 2 / 2, 1.0])
    assert [p.recall for p in points] == pytest.approx([3 / 4, 3 / 4, 2 / 4, 0.0])


def test_choose_takes_the_lowest_threshold_precise_enough():
    points = [OperatingPoint(0.05, 0.15, 0.6), OperatingPoint(0.1, 0.25, 0.5), OperatingPoint(0.2, 0.5, 0.4)]
    assert choose(points, min_precision=0.2).threshold == 0.1
    assert choose(points, min_precision=0.4).threshold == 0.2
    assert choose(points, min_precision=0.9).threshold == 0.2  # none qualifies: the most precise
