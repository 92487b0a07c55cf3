"""The dev split written as eval-format sets: what bench/leak.py reads back is each dev photo with its boxes."""

from __future__ import annotations

import cv2
import numpy as np

from dashcamd.train.dataset import FACE, PLATE, Sample
from dashcamd.train.dev_sets import write_dev_sets
from tests.helpers import load_script


def _photo(path, height, width):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.zeros((height, width, 3), np.uint8))
    return path


def test_dev_photos_come_back_through_the_leak_benchmarks_reader(tmp_path):
    plates = _photo(tmp_path / "data" / "plates_openimages" / "images" / "a.png", 40, 60)
    faces = _photo(tmp_path / "data" / "faces_unlabelled" / "images" / "b.png", 30, 50)
    empty = _photo(tmp_path / "data" / "faces_unlabelled" / "images" / "c.png", 30, 50)
    samples = [
        Sample(plates, np.array([[1, 2, 30, 12], [40, 5, 48, 15]], np.float32), np.array([PLATE, FACE])),
        Sample(faces, np.array([[3, 4, 13, 16]], np.float32), np.array([FACE])),
        Sample(empty, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
    ]
    counts = write_dev_sets(samples, tmp_path / "out")
    assert counts == {"dev_plates_openimages": 1, "dev_faces_unlabelled": 1}  # the photo without boxes is left out

    synth = load_script("bench/synth.py")
    (plate_entry,) = synth.load_annotations(tmp_path / "out", "dev_plates_openimages")
    assert plate_entry["image"] == str(plates.resolve())
    assert (plate_entry["width"], plate_entry["height"]) == (60, 40)
    assert plate_entry["boxes"] == [[1.0, 2.0, 30.0, 12.0, "plate"], [40.0, 5.0, 48.0, 15.0, "face"]]
    (face_entry,) = synth.load_annotations(tmp_path / "out", "dev_faces_unlabelled")
    assert face_entry["boxes"] == [[3.0, 4.0, 13.0, 16.0, "face"]] and face_entry["width"] == 50
