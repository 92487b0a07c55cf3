"""The speed benchmark's ``replay`` measurement (bench/pipeline.py): the detector's answers recorded in one
``process_clip`` are handed back unchanged, call for call, without running the detector again."""

from __future__ import annotations

from dashcamd.config import load_settings
from dashcamd.detect import Detection
from dashcamd.pipeline import process_clip
from tests.helpers import ScriptedDetector, load_script
from tests.media_factory import make_clip


def moving_plate_detector() -> ScriptedDetector:
    """A plate that moves 3 px a frame shown, so each frame's answer differs."""
    return ScriptedDetector(lambda n: [Detection(20.0 + 3 * n, 40.0, 80.0 + 3 * n, 70.0, "plate", 0.9)])


def test_replay_hands_back_the_recorded_boxes_without_running_the_detector(tmp_path):
    bench = load_script("bench/pipeline.py")
    clip = make_clip(tmp_path / "in.mp4", width=320, height=240, seconds=1.0)
    settings = load_settings(None, {
        "paths": {"watch": [str(tmp_path)], "output": str(tmp_path / "out"), "state": str(tmp_path / "s")},
        "detector": {"detection_stride": 2, "batch_size": 3}})
    detector = moving_plate_detector()
    replay = bench._ReplayDetector(detector)
    replay.record(clip, tmp_path / "out" / "record.mp4", settings)
    shown = detector.frames_seen
    assert shown == 15  # 30 frames, stride 2
    assert not (tmp_path / "out" / "record.mp4").exists()

    replayed = process_clip(clip, tmp_path / "out" / "replayed.mp4", settings, replay,
                            boxes_path=tmp_path / "replayed.jsonl")
    fresh = process_clip(clip, tmp_path / "out" / "fresh.mp4", settings, moving_plate_detector(),
                         boxes_path=tmp_path / "fresh.jsonl")
    assert detector.frames_seen == shown  # nothing ran the detector again
    assert replayed.detections == fresh.detections == {"plate": 15, "face": 0}
    assert (tmp_path / "replayed.jsonl").read_text() == (tmp_path / "fresh.jsonl").read_text()
