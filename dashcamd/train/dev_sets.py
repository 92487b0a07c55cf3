"""The dev split written in the eval folders' format, so that ``bench/leak.py --data`` can make its clips
from dev photos (never eval/) and weights can be compared on video before one of them is shipped.

Why: the dev score is measured on still photos letterboxed whole, while the daemon sees 1080p video shrunk
3x to the detector's 640; a run can gain on the first and lose on the second (small faces, seventh
session). Picking weights by the leak benchmark's own eval clips would be tuning on eval/.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2

from .dataset import CLASS_NAMES, Sample

ANNOTATIONS = "annotations.json"


def write_dev_sets(samples: Sequence[Sample], out_dir: Path) -> dict[str, int]:
    """``out_dir/eval/dev_<source>/annotations.json`` per source folder of the samples (``dev_plates_openimages``,
    ``dev_faces_unlabelled``): each labelled photo by absolute path, its size, and its boxes
    ``[x1, y1, x2, y2, class name]``. Photos without boxes are left out. Returns photos written per set."""
    per_set: dict[str, list[dict]] = {}
    for sample in samples:
        if not len(sample.boxes_xyxy):
            continue
        height, width = _image_size(sample.image_path)
        boxes = [[*(round(float(c), 2) for c in box), CLASS_NAMES[int(cls)]]
                 for box, cls in zip(sample.boxes_xyxy, sample.classes)]
        set_name = f"dev_{sample.image_path.parent.parent.name}"  # <source>/images/<photo>
        per_set.setdefault(set_name, []).append(
            {"image": str(sample.image_path.resolve()), "boxes": boxes, "width": width, "height": height})
    for set_name, entries in per_set.items():
        folder = out_dir / "eval" / set_name
        folder.mkdir(parents=True, exist_ok=True)
        temp = folder / f".{ANNOTATIONS}.tmp"
        temp.write_text(json.dumps(entries, indent=1))
        os.replace(temp, folder / ANNOTATIONS)
    return {set_name: len(entries) for set_name, entries in per_set.items()}


def _image_size(path: Path) -> tuple[int, int]:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"{path}: not a readable image")
    return image.shape[0], image.shape[1]
