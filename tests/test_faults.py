"""Faults injected into the real daemon: kills, a hung detector, a full or read-only output volume, a source
that vanishes or changes mid-clip. Each test proves the clip is processed exactly once (or failed with a
reason), nothing partial is visible in the output folder and the original is never touched.

Real processes, signals, sockets, SQLite and tmpfs mounts; the only stand-in is a gate at the detector seam
(tests/fault_helpers.py) that holds the worker inside ``Detector.detect`` so the fault lands mid-clip.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.daemon_harness import NO_DETECTIONS, DaemonProcess, make_random_weights, write_config
from tests.fault_helpers import (
    DetectorGate,
    TimedDaemon,
    all_files,
    drop,
    event_time,
    fill,
    job_rows,
    pid_gone,
    remount,
    sha256,
    tmpfs,
    video_frames,
)
from tests.helpers import wait_for
from tests.media_factory import make_clip

pytestmark = pytest.mark.slow
TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_random_weights(tmp_path_factory.mktemp("weights") / "random.pt")


@pytest.fixture
def gate(tmp_path, monkeypatch) -> DetectorGate:
    installed = DetectorGate.install(tmp_path / "gate", monkeypatch)
    yield installed
    installed.open()  # never leave a worker blocked


def _config(tmp_path: Path, weights: Path, **sections: dict) -> Path:
    worker = {"retry_backoff_s": 0.3, "max_attempts": 5, **sections.pop("worker", {})}
    return write_config(tmp_path, weights, worker=worker, **NO_DETECTIONS, **sections)


def _done(daemon: DaemonProcess, name: str) -> list[dict]:
    return [e for e in daemon.events("clip_done") if Path(e["clip"]).name == name]


# ------------------------------------------------------------------------------------------ kills


@pytest.mark.parametrize("killed", ["main_and_worker", "main_only"])
def test_sigkill_of_the_daemon_mid_clip_processes_the_clip_exactly_once(tmp_path, weights, gate, killed):
    """kill -9 of the whole service (or of the main process alone, as the OOM killer might): after a restart
    the clip is done once, the abandoned temp is gone, the original is byte-identical, and no orphaned
    worker goes on to publish behind the new daemon's back."""
    config = _config(tmp_path, weights)
    clip = make_clip(tmp_path / "import" / "trip.mp4", width=320, height=240, seconds=1.0)
    original = sha256(clip)
    gate.close()
    first = DaemonProcess(config, tmp_path / "first.log")
    try:
        first.wait_ready()
        wait_for(gate.entered, TIMEOUT_S, interval_s=0.05, what="worker inside the detector")
        worker_pid = first.events("worker_started")[-1]["pid"]
        temps = all_files(tmp_path / "output")
        assert len(temps) == 1 and temps[0].name.startswith("."), temps
        assert (tmp_path / "output" / temps[0]).stat().st_mode & 0o777 == 0o600, "partial output is private"
        os.kill(first.process.pid, signal.SIGKILL)
        if killed == "main_and_worker":
            os.kill(worker_pid, signal.SIGKILL)
        first.process.wait(10)
        wait_for(lambda: pid_gone(worker_pid), 10, interval_s=0.05, what="the worker to die with the daemon")
    finally:
        first.kill()
        if "worker_pid" in locals() and not pid_gone(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)  # an orphan would publish behind the next daemon's back
    gate.open()
    assert not (tmp_path / "output" / "trip.mp4").exists()

    second = DaemonProcess(config, tmp_path / "second.log")
    try:
        second.wait_ready()
        wait_for(lambda: _done(second, "trip.mp4"), TIMEOUT_S, interval_s=0.1, what="clip done after restart")
    finally:
        assert second.stop() == 0
    started = second.events("daemon_started")[0]
    assert started["recovered_jobs"] == 1 and started["removed_temp_files"] == 1
    assert all_files(tmp_path / "output") == [Path("trip.mp4")], "no temp or partial file is left"
    assert video_frames(tmp_path / "output" / "trip.mp4") == 30
    assert sha256(clip) == original
    rows = job_rows(tmp_path / "state")
    assert [(r["state"], r["attempts"]) for r in rows] == [("done", 2)], "one job, the killed attempt counted"
    assert len(first.events("clip_done")) + len(second.events("clip_done")) == 1


# ------------------------------------------------------------------------------------------- hang


def test_hung_detector_is_killed_by_the_heartbeat_and_the_clip_retried(tmp_path, weights, gate):
    """A detector that never returns: the worker falls silent, WATCHDOG=1 stops while it is silent, the
    daemon kills it, starts a new one and the retried clip is published once."""
    heartbeat_s = 4.0
    config = _config(tmp_path, weights, worker={"heartbeat_timeout_s": heartbeat_s})
    daemon = TimedDaemon(config, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        wait_for(lambda: daemon.events("worker_ready"), TIMEOUT_S, interval_s=0.05, what="worker ready")
        gate.close()
        drop(make_clip(tmp_path / "hang.mp4", width=160, height=96, seconds=1.0), tmp_path / "import" / "hang.mp4")
        wait_for(gate.entered, TIMEOUT_S, interval_s=0.05, what="worker stuck in the detector")
        lost = wait_for(lambda: daemon.events("worker_lost"), 30, interval_s=0.05, what="hang detected")[0]
        gate.open()
        wait_for(lambda: _done(daemon, "hang.mp4"), TIMEOUT_S, interval_s=0.1, what="retried clip done")
        wait_for(lambda: [t for t in daemon.watchdog_times() if t > event_time(lost) + 1.5], 20,
                 interval_s=0.1, what="watchdog pings after recovery")
    finally:
        assert daemon.stop() == 0
    assert "no heartbeat" in lost["reason"]
    pids = [e["pid"] for e in daemon.events("worker_started")]
    assert len(pids) == 2 and pids[0] != pids[1] and pid_gone(pids[0])
    # Unhealthy from half the heartbeat timeout of silence until a new worker runs (the kill comes at the
    # full timeout, then the restart back-off of 1 s). Pings come every 1 s (WATCHDOG_USEC=2 s) otherwise.
    lost_at = event_time(lost)
    silent_from, silent_to = lost_at - heartbeat_s / 2 + 0.6, lost_at + 0.7
    pings = daemon.watchdog_times()
    assert [t for t in pings if t < silent_from], "pinged while healthy"
    assert not [t for t in pings if silent_from <= t <= silent_to], "no WATCHDOG=1 while the worker hangs"
    assert all_files(tmp_path / "output") == [Path("hang.mp4")]
    rows = job_rows(tmp_path / "state")
    assert [(r["state"], r["attempts"]) for r in rows] == [("done", 2)]


# ------------------------------------------------------------------------------------ output volume


def test_disk_full_on_the_output_volume_retries_without_leaving_partial_files(tmp_path, weights):
    """ENOSPC while encoding: a transient failure (not a quarantine), the temp is removed, the daemon goes on,
    and once space is freed the clip is published."""
    config = _config(tmp_path, weights, paths={"quarantine": str(tmp_path / "quarantine")},
                     worker={"max_attempts": 20, "retry_backoff_s": 0.3})
    with tmpfs(tmp_path / "output", "2m") as output:
        ballast = fill(output, leave_bytes=48 * 1024)
        clip = make_clip(tmp_path / "big.mp4", width=320, height=240, seconds=2.0)
        original = sha256(clip)
        daemon = DaemonProcess(config, tmp_path / "daemon.log")
        try:
            daemon.wait_ready()
            drop(clip, tmp_path / "import" / "big.mp4")
            failed = wait_for(lambda: daemon.events("clip_failed"), TIMEOUT_S, interval_s=0.05, what="ENOSPC")[0]
            assert "No space left" in failed["error"] and failed["state"] == "queued"
            # Nothing half-written stays visible, while the retries keep failing.
            wait_for(lambda: len(daemon.events("clip_failed")) >= 2, TIMEOUT_S, interval_s=0.05)
            assert all_files(output) == [Path("ballast.bin")] or _only_live_temp(output)
            assert daemon.process.poll() is None
            ballast.unlink()
            wait_for(lambda: _done(daemon, "big.mp4"), TIMEOUT_S, interval_s=0.1, what="done after space freed")
        finally:
            assert daemon.stop() == 0
        assert all_files(output) == [Path("big.mp4")]
        assert video_frames(output / "big.mp4") == 60
    assert not daemon.events("clip_quarantined") and all_files(tmp_path / "quarantine") == []
    assert sha256(tmp_path / "import" / "big.mp4") == original
    assert [r["state"] for r in job_rows(tmp_path / "state")] == ["done"]


def _only_live_temp(folder: Path) -> bool:
    """A retry may be writing its hidden temp right now; anything else would be a leftover."""
    return all(p.name == "ballast.bin" or p.name.startswith(".") for p in all_files(folder))


def test_read_only_output_volume_and_missing_output_folder(tmp_path, weights):
    """The output volume is mounted read-only and the output folder does not exist: the daemon still starts,
    each attempt fails as transient, and once the volume is writable the folder is created and the clip done."""
    volume = tmp_path / "volume"
    config = _config(tmp_path, weights, paths={"output": str(volume / "redacted")},
                     worker={"max_attempts": 20, "retry_backoff_s": 0.3})
    with tmpfs(volume, "4m", read_only=True):
        daemon = DaemonProcess(config, tmp_path / "daemon.log")
        try:
            daemon.wait_ready()
            drop(make_clip(tmp_path / "ro.mp4", width=160, height=96), tmp_path / "import" / "ro.mp4")
            failed = wait_for(lambda: daemon.events("clip_failed"), TIMEOUT_S, interval_s=0.05, what="EROFS")[0]
            assert "Read-only file system" in failed["error"] and failed["state"] == "queued"
            remount(volume, read_only=False)
            wait_for(lambda: _done(daemon, "ro.mp4"), TIMEOUT_S, interval_s=0.1, what="done once writable")
        finally:
            assert daemon.stop() == 0
        assert all_files(volume) == [Path("redacted/ro.mp4")]
        assert (volume / "redacted" / "ro.mp4").stat().st_mode & 0o777 == 0o644


def test_full_state_volume_delays_queueing_but_loses_nothing(tmp_path, weights):
    """The queue's volume is full: the new clip cannot be queued (the watcher retries, the daemon runs on),
    nothing is published from an unrecorded job, and once space is back the clip is queued and done."""
    config = _config(tmp_path, weights)
    with tmpfs(tmp_path / "state", "1m") as state:
        daemon = DaemonProcess(config, tmp_path / "daemon.log")
        try:
            daemon.wait_ready()
            wait_for(lambda: daemon.events("worker_ready"), TIMEOUT_S, interval_s=0.05, what="worker ready")
            ballast = fill(state, leave_bytes=0)
            clip = drop(make_clip(tmp_path / "a.mp4", width=160, height=96), tmp_path / "import" / "a.mp4")
            original = sha256(clip)
            failed = wait_for(lambda: daemon.events("clip_enqueue_failed"), TIMEOUT_S, interval_s=0.05,
                              what="enqueue refused")[0]
            assert "full" in failed.get("exception", "")
            assert daemon.process.poll() is None and not (tmp_path / "output" / "a.mp4").exists()
            ballast.unlink()
            wait_for(lambda: _done(daemon, "a.mp4"), TIMEOUT_S, interval_s=0.1, what="done once space is back")
        finally:
            assert daemon.stop() == 0
        assert [(r["state"], r["attempts"]) for r in job_rows(state)] == [("done", 1)]
    assert sha256(clip) == original


# ------------------------------------------------------------------------------------------ source


def test_source_vanishing_mid_clip_is_retried_when_back_or_failed_with_a_reason(tmp_path, weights, gate):
    """The card is pulled (its folder renamed away) while a clip is processed: nothing is published from it,
    the job is retried and done when the card is back. A clip deleted for good fails after max_attempts,
    with the reason in the queue."""
    config = _config(tmp_path, weights, worker={"max_attempts": 4, "retry_backoff_s": 0.5})
    card = tmp_path / "import" / "card"
    clip = make_clip(card / "a.mp4", width=160, height=96)
    original = sha256(clip)
    gate.close()
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        wait_for(gate.entered, TIMEOUT_S, interval_s=0.05, what="a.mp4 in progress")
        os.rename(card, tmp_path / "pulled")
        gate.open()
        failed = wait_for(lambda: daemon.events("clip_failed"), TIMEOUT_S, interval_s=0.02, what="a.mp4 failed")[0]
        assert "source unavailable" in failed["error"] and failed["state"] == "queued"
        assert not (tmp_path / "output" / "card" / "a.mp4").exists()
        os.rename(tmp_path / "pulled", card)
        wait_for(lambda: _done(daemon, "a.mp4"), TIMEOUT_S, interval_s=0.1, what="a.mp4 done after the card is back")

        gate.close()
        doomed = drop(make_clip(tmp_path / "b.mp4", width=160, height=96), tmp_path / "import" / "b.mp4")
        wait_for(gate.entered, TIMEOUT_S, interval_s=0.05, what="b.mp4 in progress")
        doomed.unlink()
        gate.open()
        given_up = wait_for(lambda: [e for e in daemon.events("clip_failed")
                                     if e["clip"].endswith("b.mp4") and e["state"] == "failed"],
                            TIMEOUT_S, interval_s=0.1, what="b.mp4 failed for good")[0]
        assert daemon.process.poll() is None
    finally:
        assert daemon.stop() == 0
    assert "source unavailable" in given_up["error"] and "No such file" in given_up["error"]
    assert sha256(card / "a.mp4") == original
    assert all_files(tmp_path / "output") == [Path("card/a.mp4")]
    rows = {Path(r["path"]).name: r for r in job_rows(tmp_path / "state")}
    assert rows["a.mp4"]["state"] == "done" and rows["a.mp4"]["attempts"] >= 2
    assert rows["b.mp4"]["state"] == "failed" and rows["b.mp4"]["attempts"] == 4
    assert "source unavailable" in rows["b.mp4"]["error"]


def test_source_changed_after_queueing_is_a_new_job_never_half_processed(tmp_path, weights, gate):
    """a.mp4 is overwritten in place while it is processed, b.mp4 is appended to while it waits in the queue:
    neither old version is published or quarantined; each new version is processed exactly once."""
    config = _config(tmp_path, weights, paths={"quarantine": str(tmp_path / "quarantine")})
    make_clip(tmp_path / "import" / "a.mp4", width=320, height=240, seconds=1.0)
    gate.close()
    daemon = DaemonProcess(config, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        wait_for(gate.entered, TIMEOUT_S, interval_s=0.05, what="a.mp4 in progress")
        drop(make_clip(tmp_path / "b.mp4", width=160, height=96, seconds=1.0), tmp_path / "import" / "b.mp4")
        wait_for(lambda: [e for e in daemon.events("clip_queued") if e["clip"].endswith("b.mp4")], TIMEOUT_S,
                 interval_s=0.05, what="b.mp4 queued")
        replacement = make_clip(tmp_path / "a2.mp4", width=320, height=240, seconds=2.0, pattern="static")
        with open(tmp_path / "import" / "a.mp4", "r+b") as rewrite:  # in place: the worker's open file changes
            rewrite.write(replacement.read_bytes())
            rewrite.truncate()
        with open(tmp_path / "import" / "b.mp4", "ab") as append:
            append.write(b"\0" * 4096)
        gate.open()
        wait_for(lambda: _done(daemon, "a.mp4") and _done(daemon, "b.mp4"), TIMEOUT_S, interval_s=0.1,
                 what="both new versions done")
        time.sleep(1.0)  # a stray second processing would show up now (settle 0.5 s, retry 0.3 s)
    finally:
        assert daemon.stop() == 0
    assert not daemon.events("clip_quarantined") and all_files(tmp_path / "quarantine") == []
    assert len(_done(daemon, "a.mp4")) == 1 and len(_done(daemon, "b.mp4")) == 1
    assert video_frames(tmp_path / "output" / "a.mp4") == 60, "the new version, not the old 30 frames"
    assert sha256(tmp_path / "import" / "a.mp4") == sha256(replacement)
    rows = job_rows(tmp_path / "state")
    done = {Path(r["path"]).name: r for r in rows if r["state"] == "done"}
    assert done["a.mp4"]["size"] == replacement.stat().st_size
    assert done["b.mp4"]["size"] == (tmp_path / "import" / "b.mp4").stat().st_size
    stale = [r for r in rows if r["state"] != "done"]
    assert all(r["state"] == "failed" and "changed" in r["error"] for r in stale), stale
    assert all_files(tmp_path / "output") == [Path("a.mp4"), Path("b.mp4")]
