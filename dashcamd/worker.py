"""The only process that owns the device: loads the detector once, then processes one clip at a time.

It talks to the daemon over a pipe. Progress messages double as the heartbeat, so a worker stuck inside
inference falls silent and the daemon can tell a hang from a slow clip.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from dashcamd.config import Settings
from dashcamd.errors import InvalidClip, SourceChanged, TransientError
from dashcamd.logs import configure_logging

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
IDLE_HEARTBEAT_S = 2.0
PROGRESS_INTERVAL_S = 1.0


@dataclass(frozen=True)
class JobOrder:
    """What the daemon asks the worker to do with one clip."""

    job_id: int
    source: Path
    output: Path


class Cancelled(Exception):
    """The daemon asked the worker to stop in the middle of a clip."""


class _Channel:
    """Pipe to the daemon, safe to use from the pipeline's threads."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, kind: str, /, **fields: Any) -> None:
        # Positional-only: "failed" messages carry a field named ``kind`` too. Without the slash every
        # failure report raised TypeError and took the worker down (found by tests/test_faults.py).
        with self._lock:
            self._conn.send((kind, fields))


def worker_main(conn: Connection, settings: Settings) -> None:
    """Entry point of the spawned worker process."""
    configure_logging(settings.log, process="worker")
    log = structlog.get_logger()
    _die_with_parent(log)
    cancel = threading.Event()
    # SIGINT from a terminal reaches the whole process group; only the daemon decides what to do with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda _signum, _frame: cancel.set())
    channel = _Channel(conn)

    from dashcamd.pipeline import load_detector  # imported here: torch loads only in the worker

    detector = load_detector(settings)
    channel.send("ready", device=str(detector.device), weights=str(settings.detector.weights))
    log.info("worker_ready", device=str(detector.device), weights=str(settings.detector.weights))

    while not cancel.is_set():
        if not conn.poll(IDLE_HEARTBEAT_S):
            channel.send("heartbeat")
            continue
        kind, fields = conn.recv()
        if kind == "stop":
            break
        if kind == "job":
            _run_job(JobOrder(**fields), settings, detector, channel, cancel)
    log.info("worker_stopped")


def _die_with_parent(log: Any) -> None:
    """Linux: have the kernel SIGKILL this worker when the daemon dies, even by kill -9 or the OOM killer.

    An orphaned worker would finish its clip and publish behind the back of the restarted daemon, whose new
    worker processes the same clip again (and both would hold the GPU). systemd's KillMode covers this only
    under systemd.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = multiprocessing.parent_process()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as unsupported:
        log.warning("worker_parent_death_signal_unavailable", error=str(unsupported))
        return
    if parent is not None and os.getppid() != parent.pid:  # the daemon died before prctl took effect
        os._exit(1)


def _run_job(order: JobOrder, settings: Settings, detector: Any, channel: _Channel, cancel: threading.Event) -> None:
    from dashcamd.pipeline import process_clip

    log = structlog.get_logger().bind(job_id=order.job_id, clip=str(order.source))
    last_report = 0.0

    def on_progress(frames_done: int, frames_total: int) -> None:
        nonlocal last_report
        if cancel.is_set():
            raise Cancelled()
        now = time.monotonic()
        if now - last_report >= PROGRESS_INTERVAL_S:
            last_report = now
            channel.send("progress", job_id=order.job_id, frames_done=frames_done, frames_total=frames_total)

    try:
        report = process_clip(order.source, order.output, settings, detector, on_progress=on_progress)
    except Cancelled:
        channel.send("failed", job_id=order.job_id, kind="cancelled", error="cancelled by shutdown")
    except InvalidClip as invalid:
        channel.send("failed", job_id=order.job_id, kind="invalid", error=str(invalid))
    except SourceChanged as changed:
        channel.send("failed", job_id=order.job_id, kind="source_changed", error=str(changed))
    except TransientError as transient:
        channel.send("failed", job_id=order.job_id, kind="transient", error=str(transient))
    except Exception as unexpected:  # loop edge: one bad clip must not take the worker down
        log.exception("clip_error")
        channel.send("failed", job_id=order.job_id, kind="error", error=f"{type(unexpected).__name__}: {unexpected}")
    else:
        channel.send("done", job_id=order.job_id, **report.as_fields())
