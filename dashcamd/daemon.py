"""Daemon lifecycle: watcher + durable queue + one supervised worker process, signals, systemd pings.

The main process never touches the device or decodes video; it only decides. Data flows one way:
watcher → queue → worker → publish; the worker reports back over a pipe.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import structlog

from dashcamd import publish
from dashcamd.config import ConfigError, Settings
from dashcamd.errors import DashcamdError
from dashcamd.jobs import Job, JobQueue
from dashcamd.media import probe
from dashcamd.notify import SystemdNotifier
from dashcamd.watcher import ClipWatcher
from dashcamd.worker import worker_main

TICK_S = 0.5
WORKER_RESTART_MAX_BACKOFF_S = 60.0
# Importing torch and loading the model can take minutes on a NAS (cold disk, slow CPU). The worker sends
# nothing meanwhile, so the heartbeat timeout (which may be set to seconds) must not apply to loading.
WORKER_LOAD_TIMEOUT_S = 300.0

log = structlog.get_logger()


@dataclass
class _WorkerHandle:
    """The daemon's view of the worker process."""

    process: multiprocessing.process.BaseProcess
    conn: Connection
    started_at: float
    last_heard: float
    ready: bool = False
    job: Job | None = None
    job_output: Path | None = None
    progress: tuple[int, int] = (0, 0)
    detections: dict[str, int] = field(default_factory=dict)


class Daemon:
    """Runs until SIGTERM/SIGINT. One instance per process."""

    def __init__(self, settings: Settings) -> None:
        if not settings.detector.weights.is_file():
            raise ConfigError(f"detector.weights: no such file {settings.detector.weights}")
        self.settings = settings
        self.notifier = SystemdNotifier()
        self._stop = threading.Event()
        self._worker: _WorkerHandle | None = None
        self._worker_failures = 0
        self._worker_restart_at = 0.0
        self._last_watchdog = 0.0
        settings.paths.state.mkdir(parents=True, exist_ok=True)
        try:
            settings.paths.output.mkdir(parents=True, exist_ok=True)
        except OSError as unwritable:
            # Not fatal: a read-only or full output volume must not crash-loop the service. Each job creates
            # the folder itself and fails as transient (retried) until it can.
            log.warning("output_folder_unavailable", path=str(settings.paths.output), error=unwritable.strerror)
        self.queue = JobQueue(settings.paths.state / "queue.sqlite3")
        self.watcher = ClipWatcher(
            settings,
            enqueue=self._enqueue,
            probe=probe,
            on_invalid=self._on_invalid_file,
            is_known=self.queue.is_known,
            invalid_after_s=settings.watch.invalid_after_s,
        )

    # -- lifecycle ---------------------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        # The interrupted attempt counts: a clip that takes the whole daemon down must not loop forever.
        recovered = self.queue.reset_running(max_attempts=self.settings.worker.max_attempts)
        stale = publish.remove_stale_temps(self.settings.paths.output)
        log.info(
            "daemon_started",
            watch=[str(p) for p in self.settings.paths.watch],
            output=str(self.settings.paths.output),
            recovered_jobs=recovered,
            removed_temp_files=stale,
        )
        self.watcher.start()
        self._start_worker()
        self.notifier.ready()
        try:
            while not self._stop.is_set():
                try:
                    self._tick()
                except Exception:  # loop edge: log it and keep watching; systemd's watchdog covers hangs
                    log.exception("daemon_tick_failed")
                    self._stop.wait(TICK_S)
        finally:
            self._shutdown()
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        log.info("daemon_stopping", signal=signal.Signals(signum).name)
        self.notifier.stopping()
        self._stop.set()

    def _tick(self) -> None:
        self.watcher.poll()
        worker = self._worker
        if worker is None:
            if time.monotonic() >= self._worker_restart_at:
                self._start_worker()
            else:
                self._stop.wait(TICK_S)
            self._report_health(healthy=False)
            return
        ready = wait([worker.conn, worker.process.sentinel], timeout=TICK_S)
        if worker.conn in ready:
            self._drain_messages(worker)
        silent_s = time.monotonic() - worker.last_heard
        if not worker.process.is_alive():
            self._on_worker_exit(worker, reason=f"worker exited with code {worker.process.exitcode}")
        elif silent_s > self._silence_limit_s(worker):
            worker.process.kill()
            worker.process.join(5)
            reason = ("worker hung (no heartbeat); killed" if worker.ready
                      else f"worker did not load the detector within {self._silence_limit_s(worker):.0f} s; killed")
            self._on_worker_exit(worker, reason=reason)
        elif worker.ready and worker.job is None:
            self._dispatch(worker)
        # Healthy while the worker answers within half its limit: WATCHDOG=1 stops as soon as it looks stuck,
        # not only once it is killed (found by tests/test_faults.py: pings went on through a hang).
        healthy = self._worker is not None and silent_s < self._silence_limit_s(worker) / 2
        self._report_health(healthy=healthy)

    def _shutdown(self) -> None:
        self.watcher.stop()
        worker = self._worker
        if worker is not None:
            deadline = time.monotonic() + self.settings.worker.shutdown_timeout_s
            if worker.job is not None:
                worker.process.terminate()  # the worker cancels its clip and reports back
            else:
                self._send(worker, "stop")
            while worker.process.is_alive() and time.monotonic() < deadline:
                if worker.conn.poll(0.2):
                    self._drain_messages(worker)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
            if worker.job is not None:
                self.queue.requeue(worker.job.id)
                log.info("job_requeued", job_id=worker.job.id, clip=worker.job.path)
            publish.remove_stale_temps(self.settings.paths.output)
        self.queue.close()
        log.info("daemon_stopped")

    # -- worker supervision --------------------------------------------------------------------------

    def _start_worker(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe()
        process = context.Process(target=worker_main, args=(child_conn, self.settings), name="dashcamd-worker")
        process.start()
        child_conn.close()
        now = time.monotonic()
        self._worker = _WorkerHandle(process=process, conn=parent_conn, started_at=now, last_heard=now)
        log.info("worker_started", pid=process.pid)

    def _silence_limit_s(self, worker: _WorkerHandle) -> float:
        """How long the worker may stay silent before it is killed: loading gets longer than a heartbeat."""
        heartbeat_s = self.settings.worker.heartbeat_timeout_s
        return heartbeat_s if worker.ready else max(heartbeat_s, WORKER_LOAD_TIMEOUT_S)

    def _on_worker_exit(self, worker: _WorkerHandle, reason: str) -> None:
        self._worker = None
        worker.conn.close()
        self._worker_failures += 1
        backoff_s = min(WORKER_RESTART_MAX_BACKOFF_S, 2.0 ** (self._worker_failures - 1))
        self._worker_restart_at = time.monotonic() + backoff_s
        log.error("worker_lost", reason=reason, restart_in_s=backoff_s)
        if worker.job is not None:
            self._retry(worker.job, reason)
        publish.remove_stale_temps(self.settings.paths.output)

    def _drain_messages(self, worker: _WorkerHandle) -> None:
        try:
            while worker.conn.poll():
                kind, fields = worker.conn.recv()
                worker.last_heard = time.monotonic()
                self._handle_message(worker, kind, fields)
        except (EOFError, OSError):
            pass  # the worker is gone; the sentinel check handles it

    def _handle_message(self, worker: _WorkerHandle, kind: str, fields: dict[str, Any]) -> None:
        if kind == "ready":
            worker.ready = True
            self._worker_failures = 0
        elif kind == "progress" and worker.job is not None:
            worker.progress = (fields["frames_done"], fields["frames_total"])
            total = max(1, fields["frames_total"])
            self.queue.set_progress(worker.job.id, fields["frames_done"] / total)
        elif kind == "done" and worker.job is not None:
            job, worker.job = worker.job, None
            fields.pop("job_id", None)
            self._on_done(job, fields)
        elif kind == "failed" and worker.job is not None:
            job, worker.job = worker.job, None
            self._on_failed(job, fields["kind"], fields["error"])

    def _send(self, worker: _WorkerHandle, kind: str, **fields: Any) -> None:
        try:
            worker.conn.send((kind, fields))
        except (BrokenPipeError, OSError):
            pass  # the sentinel check notices the dead worker

    # -- jobs ----------------------------------------------------------------------------------------

    def _enqueue(self, path: Path, watch_root: Path, size: int, mtime_ns: int) -> None:
        job = self.queue.enqueue(path, watch_root, size, mtime_ns)
        if job is not None:
            log.info("clip_queued", clip=str(path), job_id=job.id, size=size)

    def _on_invalid_file(self, path: Path, reason: str) -> None:
        """A file that settled but never opened as a clip: record it as quarantined, never retry it."""
        watch_root = next((root for root in self.settings.paths.watch if path.is_relative_to(root)), path.parent)
        try:
            stat = path.stat()
        except OSError:
            return  # gone again: nothing to record
        job = self.queue.enqueue(path, watch_root, stat.st_size, stat.st_mtime_ns)
        if job is None:
            return
        self.queue.mark_quarantined(job.id, reason)
        log.error("clip_quarantined", clip=str(path), job_id=job.id, error=reason)
        self._move_to_quarantine(job)

    def _dispatch(self, worker: _WorkerHandle) -> None:
        job = self.queue.claim_next()
        if job is None:
            return
        source = Path(job.path)
        try:
            stat = source.stat()
        except OSError as gone:
            self._retry(job, f"source unavailable: {gone.strerror}")
            return
        if (stat.st_size, stat.st_mtime_ns) != (job.size, job.mtime_ns):
            self._supersede(job, "source changed since it was queued")
            return
        try:
            output = publish.output_path_for(
                source, Path(job.watch_root), self.settings.paths.output, self.settings.output.suffix
            )
        except ValueError as escape:
            self.queue.mark_quarantined(job.id, str(escape))
            log.error("clip_quarantined", clip=job.path, job_id=job.id, error=str(escape))
            return
        output = self._avoid_collision(output, source, job.path)
        worker.job, worker.job_output, worker.progress = job, output, (0, 0)
        log.info("clip_started", clip=job.path, job_id=job.id, attempt=job.attempts, output=str(output))
        self._send(worker, "job", job_id=job.id, source=source, output=output)

    def _avoid_collision(self, output: Path, source: Path, source_key: str) -> Path:
        """``a.mov`` and ``a.mp4`` side by side map to one output name; the second must not replace the
        first (with ``originals = "delete"`` that would lose a clip), so it keeps its extension: ``a.mov.mp4``."""
        owner = self.queue.output_owner(output)
        if owner is None or owner == source_key:
            return output
        renamed = output.with_name(f"{output.stem}.{source.suffix.lstrip('.').lower()}{output.suffix}")
        log.warning("output_name_taken", clip=source_key, taken_by=owner, output=str(renamed))
        return renamed

    def _on_done(self, job: Job, report: dict[str, Any]) -> None:
        self.queue.mark_done(job.id, Path(report["output"]), report["frames"], report["seconds"])
        log.info("clip_done", clip=job.path, job_id=job.id, **report)
        try:
            moved_to = publish.apply_originals_policy(
                Path(job.path),
                self.settings.output.originals,
                Path(job.watch_root),
                self.settings.paths.archive,
            )
        except (OSError, DashcamdError, ValueError) as failed:
            log.error("originals_policy_failed", clip=job.path, job_id=job.id, error=str(failed))
        else:
            if self.settings.output.originals != "keep":
                log.info("original_handled", clip=job.path, policy=self.settings.output.originals,
                         archived_to=str(moved_to) if moved_to else None)

    def _on_failed(self, job: Job, kind: str, error: str) -> None:
        if kind == "invalid":
            self.queue.mark_quarantined(job.id, error)
            log.error("clip_quarantined", clip=job.path, job_id=job.id, error=error)
            self._move_to_quarantine(job)
        elif kind == "cancelled":
            self.queue.requeue(job.id)
            log.info("job_requeued", clip=job.path, job_id=job.id)
        elif kind == "source_changed":
            self._supersede(job, error)
        else:
            self._retry(job, error)

    def _supersede(self, job: Job, error: str) -> None:
        """The file changed under this job: end it as failed; the watcher queues the new version as a new job."""
        self.queue.mark_retry(job.id, error, 0.0, max_attempts=0)
        log.info("clip_changed", clip=job.path, job_id=job.id, error=error)

    def _retry(self, job: Job, error: str) -> None:
        state = self.queue.mark_retry(
            job.id, error, self.settings.worker.retry_backoff_s, self.settings.worker.max_attempts
        )
        log.warning("clip_failed", clip=job.path, job_id=job.id, error=error, attempt=job.attempts, state=state)

    def _move_to_quarantine(self, job: Job) -> None:
        if self.settings.paths.quarantine is None:
            return
        try:
            moved_to = publish.apply_originals_policy(
                Path(job.path), "move", Path(job.watch_root), self.settings.paths.quarantine
            )
        except (OSError, DashcamdError, ValueError) as failed:
            log.error("quarantine_move_failed", clip=job.path, error=str(failed))
        else:
            log.info("clip_moved_to_quarantine", clip=job.path, moved_to=str(moved_to))

    # -- systemd -------------------------------------------------------------------------------------

    def _report_health(self, healthy: bool) -> None:
        counts = self.queue.counts()
        worker = self._worker
        if worker is not None and worker.job is not None:
            done, total = worker.progress
            current = f"processing {Path(worker.job.path).name} {done}/{total} frames"
        elif worker is None:
            current = "worker restarting"
        else:
            current = "idle" if worker.ready else "loading detector"
        self.notifier.status(f"{current}; queued {counts.get('queued', 0)}, done {counts.get('done', 0)}, "
                             f"failed {counts.get('failed', 0) + counts.get('quarantined', 0)}")
        interval_s = self.notifier.watchdog_interval_s
        now = time.monotonic()
        if healthy and interval_s is not None and now - self._last_watchdog >= interval_s:
            self._last_watchdog = now
            self.notifier.watchdog()
