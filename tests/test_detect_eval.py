"""Evaluation metrics on hand-made cases with known answers, and the eval command on a generated set."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from dashcamd.detect.commands import evaluate_set, run_eval
from dashcamd.detect.evaluate import ClassTally, covered_fraction, summarise, tally_image, true_positives, width_bucket
from dashcamd.detect.infer import Detection
from detect_helpers import one_torch_thread  # noqa: F401 (autouse: one torch thread)
from detect_helpers import grid_model, write_dashcamd_checkpoint


def test_hidden_threshold_79_vs_81_percent() -> None:
    gt = np.array([[0, 0, 100, 10], [0, 20, 100, 30]])
    covers = np.array([[0, 0, 79, 10], [0, 20, 81, 30]])
    fractions = covered_fraction(gt, covers)
    assert fractions.tolist() == pytest.approx([0.79, 0.81])
    tallies: dict[str, ClassTally] = {}
    tally_image(tallies, [[0, 0, 100, 10, "plate"], [0, 20, 100, 30, "plate"]],
                [[0, 0, 79, 10, "plate", 0.9], [0, 20, 81, 30, "face", 0.8]])  # any class hides
    assert (tallies["plate"].gt, tallies["plate"].hidden) == (2, 1)


def test_enlarged_detections_hide_more_but_precision_stays_the_detectors() -> None:
    # The detection spans x 46-94 of the plate's 40-120 (60 %). Enlarged about its centre (70): x1.2 spans
    # 41.2-98.8 (72 %, still not hidden), x1.5 spans 34-106 (82.5 %, hidden).
    gt = [[40, 0, 120, 10, "plate"]]
    detection = [[46, -1, 94, 11, "plate", 0.9]]
    as_detected: dict[str, ClassTally] = {}
    tally_image(as_detected, gt, detection)
    slightly_enlarged: dict[str, ClassTally] = {}
    tally_image(slightly_enlarged, gt, detection, enlarge={"plate": 1.2})
    as_redacted: dict[str, ClassTally] = {}
    tally_image(as_redacted, gt, detection, enlarge={"plate": 1.5, "face": 3.0})
    assert [t["plate"].hidden for t in (as_detected, slightly_enlarged, as_redacted)] == [0, 0, 1]
    assert as_redacted["plate"].true_positives == as_detected["plate"].true_positives == 1
    # A factor for another class leaves this one as detected.
    other_class: dict[str, ClassTally] = {}
    tally_image(other_class, gt, detection, enlarge={"face": 3.0})
    assert other_class["plate"].hidden == 0


def test_coverage_is_the_union_not_the_best_box() -> None:
    # Two boxes each cover half of the object (with a 10 % overlap): together 90 %, fractional edges.
    gt = np.array([[10.5, 0, 20.5, 10]])
    assert covered_fraction(gt, np.array([[10.5, 0, 16.5, 10], [15.5, 0, 19.5, 10]])).tolist() == pytest.approx([0.9])
    assert covered_fraction(gt, np.zeros((0, 4))).tolist() == [0.0]
    assert covered_fraction(np.array([[5, 5, 5, 9]]), gt).tolist() == [0.0]  # empty object


def test_true_positive_rule() -> None:
    gt = np.array([[0, 0, 100, 20]])
    preds = np.array([
        [0, 0, 40, 20],  # IoU 0.4
        [0, 0, 20, 20],  # IoU 0.2 but all inside the plate
        [90, 0, 130, 20],  # IoU 0.077, 25 % inside
        [200, 200, 220, 220],  # elsewhere
    ])
    assert true_positives(preds, gt).tolist() == [True, True, False, False]
    assert true_positives(preds, np.zeros((0, 4))).tolist() == [False] * 4


def test_width_buckets_and_summary() -> None:
    assert [width_bucket(w) for w in (3, 15.9, 16, 31, 32, 95.5, 96, 400)] == [
        "<16", "<16", "16-32", "16-32", "32-96", "32-96", ">=96", ">=96"]
    tallies: dict[str, ClassTally] = {}
    tally_image(tallies, [[0, 0, 10, 10, "face"], [50, 50, 150, 150, "face"]],
                [[50, 50, 150, 150, "face", 0.9], [300, 300, 310, 310, "face", 0.5]])
    summary = summarise(tallies["face"], with_precision=True)
    assert summary["recall"] == 0.5 and summary["precision"] == 0.5
    assert summary["recall_by_width"]["<16"] == {"gt": 1, "hidden": 0, "recall": 0.0}
    assert summary["recall_by_width"][">=96"] == {"gt": 1, "hidden": 1, "recall": 1.0}
    assert summary["recall_by_width"]["16-32"]["recall"] is None
    assert "precision" not in summarise(tallies["face"], with_precision=False)


def _write_set(root: Path, name: str, records: list[dict]) -> None:
    (root / name / "images").mkdir(parents=True)
    for record in records:
        cv2.imwrite(str(root / name / record["image"]), np.zeros((record["height"], record["width"], 3), np.uint8))
    (root / name / "annotations.json").write_text(json.dumps(records))


class _FakeDetector:
    names = ["plate", "face"]
    batch_size = 2

    def __init__(self, answers: list[list[Detection]]) -> None:
        self._answers = list(answers)

    def detect(self, frames_rgb: list[np.ndarray]) -> list[list[Detection]]:
        return [self._answers.pop(0) for _ in frames_rgb]


def test_evaluate_set_known_answer(tmp_path: Path) -> None:
    records = [
        {"image": "images/a.jpg", "width": 64, "height": 48, "boxes": [[0, 0, 100 / 5, 10, "plate"]]},
        {"image": "images/b.jpg", "width": 64, "height": 48, "boxes": [[10, 10, 50, 30, "plate"]]},
        {"image": "images/c.jpg", "width": 64, "height": 48, "boxes": []},
    ]
    _write_set(tmp_path, "openimages_plates_roboflow", records)
    detector = _FakeDetector([
        [Detection(0, 0, 19, 10, "plate", 0.9)],  # 95 % hidden
        [Detection(10, 10, 30, 30, "plate", 0.8)],  # 50 %: not hidden, but inside the plate -> TP
        [Detection(0, 0, 5, 5, "plate", 0.7)],  # on an image with no plate: false positive
    ])
    result = evaluate_set(detector, tmp_path / "openimages_plates_roboflow", {"plate"})
    plate = result["classes"]["plate"]
    assert result["images"] == 3 and result["unreadable_images"] == []
    assert (plate["gt"], plate["hidden"], plate["recall"]) == (2, 1, 0.5)
    assert (plate["predictions"], plate["true_positives"], plate["precision"]) == (3, 2, 0.6667)
    assert set(result["classes"]) == {"plate"}  # no face labels, face not exhaustive here


def test_run_eval_writes_json_and_skips_unlabelled_sets(tmp_path: Path, capsys) -> None:
    data = tmp_path / "eval"
    _write_set(data, "widerface_val_subset",
               [{"image": "images/a.png", "width": 96, "height": 64, "boxes": [[20, 20, 60, 50, "face"]]}])
    _write_set(data, "street_scenes_unlabelled", [{"image": "images/b.png", "width": 96, "height": 64, "boxes": []}])
    weights = tmp_path / "grid.pt"
    write_dashcamd_checkpoint(weights, grid_model())
    out = tmp_path / "metrics.json"
    code = run_eval(data, weights, "cpu", {"face": 0.5}, 96, json_out=out)
    assert code == 0
    printed = capsys.readouterr().out
    assert "street_scenes_unlabelled: no labelled boxes, skipped" in printed and "widerface_val_subset" in printed
    metrics = json.loads(out.read_text())
    face = metrics["sets"]["widerface_val_subset"]["classes"]["face"]
    assert face["recall"] == 1.0 and face["gt"] == 1  # the grid model tiles the whole image with faces
    assert 0 < face["precision"] < 1 and metrics["sets"]["widerface_val_subset"]["detect_images_per_s"] > 0
    assert set(metrics["sets"]) == {"widerface_val_subset"}
    assert metrics["enlarge"] == {}


def test_eval_command_defaults_to_the_daemons_thresholds_and_records_as_redacted_factors(tmp_path: Path) -> None:
    from dashcamd.cli import main as cli_main
    from dashcamd.config import DetectorSettings, RedactSettings

    data = tmp_path / "eval"
    _write_set(data, "widerface_val_subset",
               [{"image": "images/a.png", "width": 96, "height": 64, "boxes": [[20, 20, 60, 50, "face"]]}])
    weights = tmp_path / "grid.pt"
    write_dashcamd_checkpoint(weights, grid_model())
    out = tmp_path / "metrics.json"
    assert cli_main(["eval", "--data", str(data), "--weights", str(weights), "--device", "cpu",
                     "--inference-size", "96", "--as-redacted", "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["thresholds"] == DetectorSettings().thresholds == {"plate": 0.05, "face": 0.05}
    assert metrics["enlarge"] == RedactSettings().enlarge == {"plate": 1.2, "face": 1.3}
    assert metrics["sets"]["widerface_val_subset"]["classes"]["face"]["recall"] == 1.0
