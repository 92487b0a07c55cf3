"""The command line as a user runs it: real subprocesses, real weights file, real media."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from tests.daemon_harness import make_random_weights
from tests.media_factory import make_clip


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_random_weights(tmp_path_factory.mktemp("weights") / "random.pt")


def _dashcamd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dashcamd", *args], capture_output=True, text=True, timeout=180)


def test_detect_json_prints_only_json_lines(tmp_path, weights):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png"):
        cv2.imwrite(str(images / name), rng.integers(0, 255, (96, 160, 3), dtype=np.uint8))
    result = _dashcamd("detect", "--weights", str(weights), "--device", "cpu", "--inference-size", "128",
                       "--json", str(images))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(Path(r["image"]).name for r in records) == ["a.jpg", "b.png"]
    for record in records:
        assert isinstance(record["boxes"], list)
        for box in record["boxes"]:
            assert len(box) == 6 and box[4] in ("plate", "face")


def test_process_writes_output_and_boxes_sidecar(tmp_path, weights):
    clip = make_clip(tmp_path / "in" / "trip.mov", seconds=1.0, width=320, height=240)
    config = tmp_path / "config.toml"
    config.write_text(
        '[paths]\nwatch = ["unused"]\noutput = "unused"\nstate = "unused"\n'
        f'[detector]\nweights = "{weights}"\ndevice = "cpu"\ninference_size = 128\n'
        '[redact]\nzones = [{x1 = 0.0, y1 = 0.9, x2 = 0.5, y2 = 1.0}]\n'
    )
    boxes = tmp_path / "boxes.jsonl"
    result = _dashcamd("process", "--config", str(config), str(clip), "-o", str(tmp_path / "out"),
                       "--export-boxes", str(boxes))
    assert result.returncode == 0, result.stdout + result.stderr
    output = tmp_path / "out" / "trip.mp4"
    with av.open(str(output)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    lines = [json.loads(line) for line in boxes.read_text().splitlines()]
    assert [line["frame"] for line in lines] == list(range(frames))
    # The privacy zone is redacted on every frame and listed as such.
    assert all(any(box[6] == "zone" for box in line["boxes"]) for line in lines)
    assert all(isinstance(line["pts"], float) for line in lines)


def test_status_prints_counts_current_clip_and_errors(tmp_path):
    from dashcamd.jobs import JobQueue

    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nwatch = ["{tmp_path}"]\noutput = "{tmp_path / "out"}"\nstate = "{state}"\n')
    with JobQueue(state / "queue.sqlite3") as queue:
        running = queue.enqueue(tmp_path / "a.mp4", tmp_path, 10, 1)
        failing = queue.enqueue(tmp_path / "b.mp4", tmp_path, 20, 2)
        queue.claim_next()
        queue.set_progress(running.id, 0.5)
        assert failing is not None
        queue.enqueue(tmp_path / "c.mp4", tmp_path, 30, 3)
        claimed = queue.claim_next()
        queue.mark_quarantined(claimed.id, "no video stream")
        result = _dashcamd("status", "--config", str(config), "--json")
        text = _dashcamd("status", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "running 1" in text.stdout and "a.mp4 (50%" in text.stdout and "no video stream" in text.stdout
    status = json.loads(result.stdout)
    assert status["counts"]["running"] == 1
    assert status["counts"]["quarantined"] == 1
    assert status["current"]["path"].endswith("a.mp4") and status["current"]["progress"] == 0.5
    assert status["recent_errors"][0]["error"] == "no video stream"
