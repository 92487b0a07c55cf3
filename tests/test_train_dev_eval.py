"""The dev split's score: AP@0.5 beside the eval's hidden rule, on a photo with known boxes."""

from pathlib import Path

import cv2
import numpy as np
import torch

from dashcamd.config import DetectorSettings
from dashcamd.train.dataset import CLASS_NAMES, Sample
from dashcamd.train.dev_eval import daemon_thresholds, evaluate


def test_hidden_counts_what_the_eval_counts_where_ap50_accepts_half_a_box(tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), np.zeros((50, 100, 3), np.uint8))
    # Letterboxed to 100 px the photo keeps its scale and moves down 25 px.
    sample = Sample(image, np.array([[10, 10, 50, 30], [60, 10, 90, 40]], np.float32), np.array([0, 1]))
    detections = torch.tensor([
        [10.0, 35, 46, 55, 0.5, 0],  # plate, 90 % of it covered: hidden
        [60.0, 35, 78, 65, 0.5, 1],  # face, 60 % covered (IoU 0.6): a true positive for AP@0.5, not hidden
        [60.0, 35, 90, 65, 0.01, 1],  # the whole face, below the default thresholds
    ])

    metrics = evaluate(lambda images: detections, [sample], image_size=100)
    assert metrics["plate_hidden"] == 1.0 and metrics["face_hidden"] == 0.0
    assert metrics["plate_ap50"] == 1.0 and metrics["face_ap50"] == 1.0
    lowered = evaluate(lambda images: detections, [sample], image_size=100, hidden_thresholds=[0.5, 0.005])
    assert lowered["face_hidden"] == 1.0 and lowered["plate_hidden"] == 1.0
    assert evaluate(lambda images: detections, [sample], image_size=100,
                    hidden_thresholds=[0.6, 0.005])["plate_hidden"] == 0.0  # per class: the plate's box is out
    assert dict(zip(CLASS_NAMES, daemon_thresholds().tolist())) == DetectorSettings().thresholds
