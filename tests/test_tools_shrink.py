"""tools/shrink_train_data.py: a smaller copy of the training data with every box scaled along."""

import json
import subprocess
import sys
from pathlib import Path

import cv2

from dashcamd.train.dataset import load_samples

from test_train_smoke import _tiny_sets

REPO = Path(__file__).resolve().parents[1]


def test_shrunk_copy_scales_boxes_keeps_names_and_the_dev_split(tmp_path):
    args = _tiny_sets(tmp_path / "full")
    plates, faces, labels = (Path(p) for p in args[1::2])
    out = tmp_path / "small"
    subprocess.run([sys.executable, str(REPO / "tools" / "shrink_train_data.py"), "--data", str(plates.parent),
                    "--labels", str(labels), "--out", str(out), "--max-side", "64", "--quality", "90"],
                   check=True, capture_output=True)
    before = load_samples(plates, faces, labels, 0.5, 0.5)
    after = load_samples(out / plates.name, out / faces.name, out / "labels", 0.5, 0.5)
    for split_before, split_after in zip(before, after):
        assert [s.image_path.name for s in split_before] == [s.image_path.name for s in split_after]
        for full, small in zip(split_before, split_after):
            scale = 64 / max(cv2.imread(str(full.image_path)).shape[:2])
            assert max(cv2.imread(str(small.image_path)).shape[:2]) == 64
            assert (small.classes == full.classes).all()
            assert abs(small.boxes_xyxy - full.boxes_xyxy * scale).max() < 0.01
    records = json.loads((out / plates.name / "annotations.json").read_text())
    assert records[0]["width"] == 64 and records[0]["boxes"][0][4] == "plate"
