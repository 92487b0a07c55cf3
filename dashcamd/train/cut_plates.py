"""Whether the detector still hides a plate that the frame's edge cuts, on the dev split (never eval/).

Dashcam frames cut plates at their edges (cars entering, leaving, or close in front), while the training
crops drop a cut box from the labels below ``min_visible`` of its area and keep its pixels as background;
the dev score, on whole photos, does not see the effect. Here each dev plate in the lower half of its photo
is cut by a new bottom edge of the photo so that only its top ``fraction`` shows, and the detector runs as
the daemon runs it (``Detector``: precision, thresholds). As ``dashcamd eval`` counts, the cut plate is
hidden when >= 80 % of what shows lies inside the detections, and hidden as redacted when it lies inside
them enlarged by the ROI factors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dashcamd.detect.evaluate import hidden

from .dataset import CLASS_NAMES, Sample, read_rgb

VISIBLE_FRACTIONS = (1.0, 0.6, 0.4, 0.25)
MIN_PLATE_HEIGHT_PX = 12  # a cut through a lower plate leaves too few rows to say anything
MIN_KEPT_HEIGHT = 0.5  # share of the photo left above the cut: still a frame, not a strip


def cut_through(image: np.ndarray, plate_xyxy: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(the photo above a horizontal cut through the plate, the plate's part that still shows): only the
    top ``fraction`` of the plate stays in the picture."""
    x1, y1, x2, y2 = (float(v) for v in plate_xyxy)
    cut = max(1, round(y1 + fraction * (y2 - y1)))
    return image[:cut], np.array([x1, y1, x2, min(y2, cut)])


def cut_plate_recall(detector, samples: Sequence[Sample], enlarge: Mapping[str, float],
                     fractions: Sequence[float] = VISIBLE_FRACTIONS) -> dict[float, dict[str, int]]:
    """Per visible fraction: {"plates", "hidden", "hidden_as_redacted"} over the dev plates that qualify
    (at least MIN_PLATE_HEIGHT_PX tall, top in the lower half of the photo). ``detector``: a ``Detector``."""
    plate = CLASS_NAMES.index("plate")
    tallies = {f: {"plates": 0, "hidden": 0, "hidden_as_redacted": 0} for f in fractions}
    for sample in samples:
        plates = sample.boxes_xyxy[sample.classes == plate]
        if len(plates) == 0:
            continue
        image = read_rgb(sample.image_path)
        for box in plates:
            if box[3] - box[1] < MIN_PLATE_HEIGHT_PX or box[1] < MIN_KEPT_HEIGHT * image.shape[0]:
                continue
            for fraction in fractions:
                picture, showing = cut_through(image, box, fraction)
                (found,) = detector.detect([picture])
                preds = [[d.x1, d.y1, d.x2, d.y2, d.label] for d in found]
                tally = tallies[fraction]
                tally["plates"] += 1
                tally["hidden"] += bool(hidden(showing[None], preds)[0])
                tally["hidden_as_redacted"] += bool(hidden(showing[None], preds, enlarge)[0])
    return tallies
