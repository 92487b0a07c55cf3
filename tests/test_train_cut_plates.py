"""The cut-plate measure on the dev split: where the cut falls, which plates qualify, and how a detection
counts as hiding the part of the plate that still shows (as detected, and enlarged as redacted)."""

from __future__ import annotations

import cv2
import numpy as np

from dashcamd.detect import Detection
from dashcamd.train.cut_plates import VISIBLE_FRACTIONS, cut_plate_recall, cut_through
from dashcamd.train.dataset import Sample

PLATE = np.array([50.0, 120.0, 150.0, 160.0])  # 100 x 40 px, top in the lower half of a 200 px photo


def test_the_cut_keeps_the_top_fraction_of_the_plate():
    image = np.zeros((200, 300, 3), np.uint8)
    picture, showing = cut_through(image, PLATE, 0.25)
    assert picture.shape == (130, 300, 3)
    assert showing.tolist() == [50.0, 120.0, 150.0, 130.0]
    picture, showing = cut_through(image, PLATE, 1.0)
    assert picture.shape[0] == 160 and showing.tolist() == PLATE.tolist()


class BoxDetector:
    """Answers every picture with ``make_box(picture height)`` as a plate, or nothing."""

    def __init__(self, make_box=None) -> None:
        self.make_box = make_box
        self.heights: list[int] = []

    def detect(self, frames_rgb):
        self.heights.append(frames_rgb[0].shape[0])
        if self.make_box is None:
            return [[]]
        return [[Detection(*self.make_box(frames_rgb[0].shape[0]), "plate", 0.9)]]


def _samples(tmp_path) -> list[Sample]:
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), np.full((200, 300, 3), 128, np.uint8))
    high_plate = [50.0, 20.0, 150.0, 60.0]  # top in the upper half: cutting there leaves a strip, skipped
    small_plate = [200.0, 150.0, 220.0, 158.0]  # 8 px tall: skipped
    face = [200.0, 110.0, 240.0, 150.0]
    return [Sample(path, np.array([PLATE.tolist(), high_plate, small_plate, face], np.float32),
                   np.array([0, 0, 0, 1]))]


def test_a_detection_of_what_shows_hides_every_cut(tmp_path):
    detector = BoxDetector(lambda height: (50.0, 120.0, 150.0, min(160.0, height)))
    tallies = cut_plate_recall(detector, _samples(tmp_path), enlarge={"plate": 1.2})
    assert list(tallies) == list(VISIBLE_FRACTIONS)
    assert all(t == {"plates": 1, "hidden": 1, "hidden_as_redacted": 1} for t in tallies.values())
    assert detector.heights == [160, 144, 136, 130]  # one qualifying plate, cut at each fraction


def test_nothing_found_hides_nothing(tmp_path):
    tallies = cut_plate_recall(BoxDetector(), _samples(tmp_path), enlarge={"plate": 1.2})
    assert all(t == {"plates": 1, "hidden": 0, "hidden_as_redacted": 0} for t in tallies.values())


def test_the_roi_enlargement_can_hide_what_the_detection_alone_does_not(tmp_path):
    # 84 px of the 100 px wide plate, centred: 84 % of it as detected, all of it enlarged 1.2x.
    tallies = cut_plate_recall(BoxDetector(lambda height: (58.0, 120.0, 142.0, height)), _samples(tmp_path),
                               enlarge={"plate": 1.2}, fractions=(0.5,))
    assert tallies[0.5] == {"plates": 1, "hidden": 1, "hidden_as_redacted": 1}
    # 70 px wide: 70 % as detected (not hidden), 84 % enlarged (hidden as redacted).
    tallies = cut_plate_recall(BoxDetector(lambda height: (65.0, 120.0, 135.0, height)), _samples(tmp_path),
                               enlarge={"plate": 1.2}, fractions=(0.5,))
    assert tallies[0.5] == {"plates": 1, "hidden": 0, "hidden_as_redacted": 1}
