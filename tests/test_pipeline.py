"""One clip through the real pipeline (real decode/encode/verify/publish) with a detector double at the seam."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest

from dashcamd.config import load_settings
from dashcamd.detect import Detection
from dashcamd.pipeline import load_detector, process_clip, size_thread_pools
from dashcamd.redact import Redactor
from dashcamd.track import TemporalFilter
from tests.media_factory import make_clip

BOX = (96.0, 64.0, 224.0, 176.0)  # inside a 320x240 frame


class KnownBoxDetector:
    """Finds one plate at BOX on every frame it is asked about; records which frames it saw."""

    names = ["plate", "face"]
    device = "cpu"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def resized_size(self, frame_h, frame_w):
        return None  # full frames, so BOX is in their pixels

    def detect(self, frames_rgb, source_hw=None):
        self.batches.append(len(frames_rgb))
        return [[Detection(*BOX, "plate", 0.9)] for _ in frames_rgb]


def _settings(tmp_path: Path, **sections):
    # Redaction in this process's redact thread, whatever "auto" picks on this machine's cores (the helper
    # processes have tests of their own, tests/test_redact_processes.py).
    values = {"paths": {"watch": [str(tmp_path)], "output": str(tmp_path / "out"), "state": str(tmp_path / "s")},
              "redact": {"feather": 0.0, "enlarge": {"plate": 1.0, "face": 1.0}, "processes": 0}}
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    return load_settings(None, values)


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_known_box_is_blurred_and_the_rest_untouched(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", width=320, height=240, seconds=1.0)
    detector = KnownBoxDetector()
    output = tmp_path / "out" / "in.mp4"
    report = process_clip(clip, output, _settings(tmp_path), detector)

    source, redacted = _frames(clip), _frames(output)
    assert report.frames == len(source) == len(redacted)
    assert max(detector.batches) <= 4
    x1, y1, x2, y2 = (int(v) for v in BOX)
    margin = 8
    for before, after in zip(source, redacted):
        inside_before = before[y1:y2, x1:x2].astype(float)
        inside_after = after[y1:y2, x1:x2].astype(float)
        # The texture (noise rows in blue) is gone: row-to-row differences collapse.
        detail_before = np.abs(np.diff(inside_before[..., 2], axis=0)).mean()
        detail_after = np.abs(np.diff(inside_after[..., 2], axis=0)).mean()
        assert detail_after < 0.2 * detail_before
        outside = np.ones(before.shape[:2], bool)
        outside[y1 - margin:y2 + margin, x1 - margin:x2 + margin] = False
        # Outside the region only encoder noise differs.
        assert np.abs(before[outside].astype(float) - after[outside].astype(float)).mean() < 4.0


class ShrunkFramesDetector(KnownBoxDetector):
    """Asks the decoder for frames shrunk 4x, as the real Detector does, and reports BOX in source pixels."""

    def resized_size(self, frame_h, frame_w):
        return frame_h // 4, frame_w // 4

    def detect(self, frames_rgb, source_hw=None):
        assert source_hw == (240, 320) and all(f.shape == (60, 80, 3) for f in frames_rgb)
        return super().detect(frames_rgb)


def test_detector_gets_the_decoders_shrunk_frames_and_the_boxes_land_on_the_full_frames(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", width=320, height=240, seconds=0.5)
    detector = ShrunkFramesDetector()
    output = tmp_path / "out" / "in.mp4"
    process_clip(clip, output, _settings(tmp_path), detector)
    x1, y1, x2, y2 = (int(v) for v in BOX)
    for before, after in zip(_frames(clip), _frames(output)):
        detail_before = np.abs(np.diff(before[y1:y2, x1:x2, 2].astype(float), axis=0)).mean()
        detail_after = np.abs(np.diff(after[y1:y2, x1:x2, 2].astype(float), axis=0)).mean()
        assert detail_after < 0.2 * detail_before


def test_detection_stride_runs_the_detector_on_every_kth_frame(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", width=160, height=96, seconds=1.0)
    detector = KnownBoxDetector()
    report = process_clip(clip, tmp_path / "out" / "in.mp4", _settings(tmp_path, detector={"detection_stride": 3}),
                          detector)
    assert sum(detector.batches) == -(-report.frames // 3)
    assert report.redacted_frames == report.frames


class FadingPlateDetector(KnownBoxDetector):
    """The plate at BOX scores 0.9 on the first 5 frames, then 0.02 (below the threshold); a face that
    never reaches its threshold sits in a corner throughout."""

    def __init__(self) -> None:
        super().__init__()
        self.frames_seen = 0

    def detect(self, frames_rgb, source_hw=None):
        out = []
        for _ in frames_rgb:
            plate_score = 0.9 if self.frames_seen < 5 else 0.02
            out.append([Detection(*BOX, "plate", plate_score), Detection(0.0, 0.0, 30.0, 30.0, "face", 0.02)])
            self.frames_seen += 1
        return out


def test_weak_detections_only_continue_tracks_through_the_pipeline(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", width=320, height=240, seconds=1.0)
    boxes_path = tmp_path / "boxes.jsonl"
    settings = _settings(tmp_path, redact={"pad": 0, "max_gap": 0, "hold": 0, "smoothing": 0.0})
    report = process_clip(clip, tmp_path / "out" / "in.mp4", settings, FadingPlateDetector(), boxes_path=boxes_path)
    lines = [json.loads(line) for line in boxes_path.read_text().splitlines()]
    assert len(lines) == report.frames > 5
    assert all([box[4] for box in line["boxes"]] == ["plate"] for line in lines)
    assert [line["boxes"][0][5] for line in lines[4:6]] == [0.9, 0.02]
    assert report.detections == {"plate": 5, "face": 0}  # the log line counts confident detections only


def test_the_detector_is_asked_for_the_weak_detections_too(tmp_path, monkeypatch):
    import dashcamd.detect

    built = {}
    monkeypatch.setattr(dashcamd.detect, "Detector", lambda weights, **kwargs: built.update(kwargs))
    load_detector(_settings(tmp_path, redact={"continue_threshold": 0.02}))
    assert built["thresholds"] == {"plate": 0.02, "face": 0.02}


def test_cancellation_leaves_no_file_behind(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", width=160, height=96, seconds=2.0)
    output = tmp_path / "out" / "in.mp4"

    class Cancelled(Exception):
        pass

    def cancel_midway(done: int, total: int) -> None:
        if done >= total // 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        process_clip(clip, output, _settings(tmp_path), KnownBoxDetector(), on_progress=cancel_midway)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_failing_stage_stops_the_others_and_leaves_no_file(tmp_path, monkeypatch):
    """Redaction runs on a thread of its own: its error must reach the caller, with every stage thread
    ended and no output or sidecar left."""
    clip = make_clip(tmp_path / "in.mp4", width=160, height=96, seconds=2.0)
    output = tmp_path / "out" / "in.mp4"

    class RedactionBroke(Exception):
        pass

    calls = []

    def apply(self, picture, boxes):
        calls.append(len(boxes))
        if len(calls) == 10:
            raise RedactionBroke()

    monkeypatch.setattr(Redactor, "apply", apply)
    with pytest.raises(RedactionBroke):
        process_clip(clip, output, _settings(tmp_path), KnownBoxDetector(), boxes_path=tmp_path / "out" / "b.jsonl")
    assert len(calls) == 10
    assert not [t for t in threading.enumerate() if t.name.startswith("dashcamd-")]
    assert list((tmp_path / "out").iterdir()) == []


class BusyDetector(KnownBoxDetector):
    """Spends 20 ms of its own thread's CPU per frame, so the report must charge it to "detect"."""

    def detect(self, frames_rgb, source_hw=None):
        for _ in frames_rgb:
            started = time.thread_time()
            while time.thread_time() - started < 0.020:
                pass
        return super().detect(frames_rgb, source_hw)


def test_report_says_where_the_cpu_went(tmp_path, monkeypatch):
    push = TemporalFilter.push

    def busy_push(self, frame_index, detections):  # 10 ms of the detect thread's CPU a frame, in the tracker
        started = time.thread_time()
        while time.thread_time() - started < 0.010:
            pass
        return push(self, frame_index, detections)

    monkeypatch.setattr(TemporalFilter, "push", busy_push)
    clip = make_clip(tmp_path / "in.mp4", width=320, height=240, seconds=1.0)
    report = process_clip(clip, tmp_path / "out" / "in.mp4", _settings(tmp_path), BusyDetector())
    cpu = report.cpu_ms_per_frame
    assert set(cpu) == {"decode", "detect", "track", "redact", "encode", "other", "helpers", "total"}
    assert 20.0 <= cpu["detect"] < 30.0  # the detector's busy loop, charged to the detect stage's thread
    assert 10.0 <= cpu["track"] < 20.0  # the tracker's, split out of that thread's time
    assert cpu["decode"] > 0 and cpu["redact"] > 0 and cpu["encode"] > 0 and cpu["other"] >= 0
    assert cpu["helpers"] == 0
    stages = sum(cpu[stage] for stage in ("decode", "detect", "track", "redact", "encode", "other", "helpers"))
    assert abs(stages - cpu["total"]) < 0.05  # the parts add up (rounding)


def test_thread_pools_are_sized_for_the_pipeline(tmp_path):
    import cv2
    import torch

    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        size_thread_pools(_settings(tmp_path, detector={"torch_threads": 1}))
        assert cv2.getNumThreads() == 1  # redaction's small regions run on the redact thread alone
        assert torch.get_num_threads() == 1  # the configured count
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


def _nice_of_each_thread() -> dict[int, int]:
    """Linux: thread id -> nice value, for every thread of this process."""
    nice = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):  # the thread ended since the listing
            continue
        nice[int(task.name)] = int(fields[16])  # field 19 of stat, counted after "(comm)"
    return nice


class NiceWatchingDetector(KnownBoxDetector):
    """Records the nice value of every thread of the process at each call (the last call's is kept: by then
    the tracker's look-ahead has let frames through and the encoder runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[int, int] = {}
        self.main_thread = threading.get_native_id()

    def detect(self, frames_rgb, source_hw=None):
        self.seen = _nice_of_each_thread()
        return super().detect(frames_rgb, source_hw)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread nice values are Linux's")
@pytest.mark.parametrize("nice", [0, 5])
def test_encoder_threads_run_nicer_than_the_detector(tmp_path, nice):
    clip = make_clip(tmp_path / "in.mp4", width=320, height=240, seconds=2.0)
    detector = NiceWatchingDetector()
    before = _nice_of_each_thread()
    base = before[detector.main_thread]
    settings = _settings(tmp_path, encoder={"threads": 2, "nice": nice})
    process_clip(clip, tmp_path / "out" / "in.mp4", settings, detector)
    assert detector.seen[detector.main_thread] == base  # the detector keeps its priority
    # Threads of earlier tests' encoders may still be ending (freed with their container): not this run's.
    niced = [tid for tid, value in detector.seen.items() if value != base and tid not in before]
    if nice:
        # the encode stage's thread and the x264 frame threads it started, which inherit its value
        assert len(niced) >= 3 and {detector.seen[tid] for tid in niced} == {min(base + nice, 19)}
    else:
        assert niced == []
    assert _nice_of_each_thread()[detector.main_thread] == base
