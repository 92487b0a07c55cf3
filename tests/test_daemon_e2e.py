"""End to end: the real daemon, real watchdog events, real SQLite, real decoding/encoding, real signals."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import av
import pytest

from tests.daemon_harness import DaemonProcess, copy_slowly, make_random_weights, write_config
from tests.helpers import wait_for
from tests.media_factory import make_clip, make_text_file_named_mp4

pytestmark = pytest.mark.slow
PROCESS_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_random_weights(tmp_path_factory.mktemp("weights") / "random.pt")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stream_summary(path: Path) -> tuple[int, float, int]:
    """(video frames, video duration in seconds, audio streams)."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video))
        duration_s = float(video.duration * video.time_base) if video.duration else float(container.duration / 1e6)
        return frames, duration_s, len(container.streams.audio)


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_dropped_clip_becomes_one_verified_output(tmp_path, weights):
    clip = make_clip(tmp_path / "source.mp4", width=320, height=240, seconds=2.0, audio_streams=1)
    config = write_config(tmp_path, weights)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        target = tmp_path / "import" / "DCIM" / "Front" / "clip 1.MP4"
        target.parent.mkdir(parents=True)
        copy_slowly(clip, target)
        output = tmp_path / "output" / "DCIM" / "Front" / "clip 1.mp4"
        wait_for(output.exists, PROCESS_TIMEOUT_S, interval_s=0.1, what="output clip")
        wait_for(lambda: daemon.events("clip_done"), 10, interval_s=0.1)
        assert daemon.received("STATUS=")
        assert daemon.received("WATCHDOG=1")
        exit_code = daemon.stop()
    finally:
        daemon.kill()
    assert exit_code == 0, daemon.log_text()
    assert "STOPPING=1" in daemon.notifications

    assert _sha256(target) == _sha256(clip), "the original must be byte-identical"
    assert _visible_files(tmp_path / "output") == [output], "exactly one output, no temp files"
    source_frames, source_duration_s, _ = _stream_summary(clip)
    frames, duration_s, audio_streams = _stream_summary(output)
    assert frames == source_frames
    assert abs(duration_s - source_duration_s) < 1 / 30
    assert audio_streams == 1
    with av.open(str(output)) as container:
        assert container.streams.video[0].codec_context.name == "h264"

    done = daemon.events("clip_done")
    assert len(done) == 1
    for field in ("clip", "job_id", "frames", "fps", "seconds", "realtime_factor", "detections", "output"):
        assert field in done[0]
    assert done[0]["frames"] == source_frames
    assert len(daemon.events("clip_queued")) == 1


def test_corrupt_clip_is_quarantined_and_the_next_still_processed(tmp_path, weights):
    config = write_config(tmp_path, weights, paths={"quarantine": str(tmp_path / "quarantine")},
                          watch={"invalid_after_s": 1.0})
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        make_text_file_named_mp4(tmp_path / "import" / "broken.mp4")
        make_clip(tmp_path / "good.mp4", seconds=1.0)
        make_clip(tmp_path / "good.mov", seconds=0.5)
        os.replace(tmp_path / "good.mp4", tmp_path / "import" / "good.mp4")
        os.replace(tmp_path / "good.mov", tmp_path / "import" / "good.mov")
        # Both map to good.mp4: the second one processed keeps its extension instead of replacing the first.
        wait_for(lambda: len(daemon.events("clip_done")) == 2, PROCESS_TIMEOUT_S, interval_s=0.1,
                 what="both good clips")
        outputs = sorted(p.name for p in (tmp_path / "output").iterdir())
        assert outputs in (["good.mov.mp4", "good.mp4"], ["good.mp4", "good.mp4.mp4"])
        assert {_stream_summary(tmp_path / "output" / name)[0] for name in outputs} == {15, 30}
        wait_for((tmp_path / "quarantine" / "broken.mp4").exists, PROCESS_TIMEOUT_S, interval_s=0.1,
                 what="broken clip moved to quarantine")
        assert daemon.process.poll() is None
        quarantined = daemon.events("clip_quarantined")
        assert len(quarantined) == 1 and "broken.mp4" in quarantined[0]["clip"] and quarantined[0]["error"]
    finally:
        assert daemon.stop() == 0
    assert not (tmp_path / "output" / "broken.mp4").exists()


def test_restart_resumes_backlog_in_polling_mode_exactly_once(tmp_path, weights):
    config = write_config(tmp_path, weights, watch={"polling": True, "poll_interval_s": 0.5, "settle_s": 0.5})
    names = [f"clip{i}.mp4" for i in range(3)]
    for name in names:
        make_clip(tmp_path / "import" / name, seconds=1.0, width=160, height=96)
    first = DaemonProcess(config, tmp_path / "first.log")
    try:
        first.wait_ready()
        wait_for(lambda: first.events("clip_done"), PROCESS_TIMEOUT_S, interval_s=0.1, what="first clip done")
    finally:
        assert first.stop() == 0
    done_first = {Path(e["clip"]).name for e in first.events("clip_done")}

    second = DaemonProcess(config, tmp_path / "second.log")
    try:
        second.wait_ready()
        wait_for(lambda: all((tmp_path / "output" / n).exists() for n in names), PROCESS_TIMEOUT_S,
                 interval_s=0.1, what="all outputs")
    finally:
        assert second.stop() == 0
    done_second = {Path(e["clip"]).name for e in second.events("clip_done")}
    assert done_first | done_second == set(names)
    assert not done_first & done_second, "no clip is processed twice"
    assert sorted(p.name for p in _visible_files(tmp_path / "output")) == sorted(names)


def test_sigkill_of_worker_mid_clip_retries_and_publishes_once(tmp_path, weights):
    config = write_config(tmp_path, weights, worker={"retry_backoff_s": 0.2})
    clip = make_clip(tmp_path / "import" / "long.mp4", seconds=6.0, width=320, height=240)
    original = _sha256(clip)
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        started = wait_for(lambda: daemon.events("clip_started"), PROCESS_TIMEOUT_S, interval_s=0.05)
        worker_pid = daemon.events("worker_started")[0]["pid"]
        wait_for(lambda: any(p.name.startswith(".") for p in (tmp_path / "output").iterdir()), 60,
                 interval_s=0.02, what="temp output being written")
        os.kill(worker_pid, signal.SIGKILL)
        wait_for(lambda: daemon.events("worker_lost"), 30, interval_s=0.05)
        wait_for((tmp_path / "output" / "long.mp4").exists, PROCESS_TIMEOUT_S, interval_s=0.1, what="output")
        wait_for(lambda: daemon.events("clip_done"), 10, interval_s=0.1)
    finally:
        assert daemon.stop() == 0
    assert started[0]["job_id"] == daemon.events("clip_done")[0]["job_id"]
    assert len(daemon.events("clip_done")) == 1
    assert _visible_files(tmp_path / "output") == [tmp_path / "output" / "long.mp4"]
    assert _sha256(clip) == original
