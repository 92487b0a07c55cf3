"""The durable queue on real SQLite files: idempotence, claim order, back-off, crash recovery, status."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dashcamd.jobs import JobQueue, JobState, QueueError, read_status

ROOT = Path("/srv/dashcam")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "queue.sqlite3"


@pytest.fixture
def queue(db_path: Path):
    with JobQueue(db_path) as opened:
        yield opened


def clip(name: str) -> Path:
    return ROOT / "DCIM" / name


def test_schema_is_versioned_and_uses_wal(queue: JobQueue, db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(db_path: Path) -> None:
    JobQueue(db_path).close()
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(QueueError, match="newer"):
        JobQueue(db_path)


def test_enqueue_same_version_is_a_no_op(queue: JobQueue) -> None:
    first = queue.enqueue(clip("a.mp4"), ROOT, 100, 5)
    assert first is not None and first.state == JobState.QUEUED and first.attempts == 0
    assert first.path == str(clip("a.mp4")) and first.watch_root == str(ROOT)
    assert queue.enqueue(clip("a.mp4"), ROOT, 100, 5) is None
    assert queue.is_known(clip("a.mp4"), 100, 5)
    assert not queue.is_known(clip("a.mp4"), 100, 6)
    assert queue.counts() == {"queued": 1, "running": 0, "done": 0, "failed": 0, "quarantined": 0}


def test_known_in_any_state(queue: JobQueue) -> None:
    job = queue.enqueue(clip("a.mp4"), ROOT, 100, 5)
    claimed = queue.claim_next()
    queue.mark_done(claimed.id, Path("/out/a.mp4"), frames=30, seconds=1.5)
    assert queue.enqueue(clip("a.mp4"), ROOT, 100, 5) is None
    assert queue.get(job.id).state == JobState.DONE


def test_changed_file_is_a_new_job_and_supersedes_the_queued_one(queue: JobQueue) -> None:
    old = queue.enqueue(clip("a.mp4"), ROOT, 100, 5)
    new = queue.enqueue(clip("a.mp4"), ROOT, 200, 7)
    assert new is not None and new.id != old.id
    # The old version no longer exists on disk: its queued row is dropped, not left to fail.
    assert queue.get(old.id) is None
    assert queue.counts()["queued"] == 1
    # Another clip's row is untouched.
    other = queue.enqueue(clip("b.mp4"), ROOT, 100, 5)
    queue.enqueue(clip("a.mp4"), ROOT, 300, 9)
    assert queue.get(other.id).state == JobState.QUEUED


def test_change_after_done_or_while_running_keeps_history(queue: JobQueue) -> None:
    queue.enqueue(clip("a.mp4"), ROOT, 100, 5)
    done = queue.claim_next()
    queue.mark_done(done.id, Path("/out/a.mp4"), 10, 1.0)
    queue.enqueue(clip("b.mp4"), ROOT, 100, 5)
    running = queue.claim_next()
    assert queue.enqueue(clip("a.mp4"), ROOT, 150, 6) is not None
    assert queue.enqueue(clip("b.mp4"), ROOT, 150, 6) is not None
    assert queue.get(done.id).state == JobState.DONE
    assert queue.get(running.id).state == JobState.RUNNING
    assert queue.counts() == {"queued": 2, "running": 1, "done": 1, "failed": 0, "quarantined": 0}


def test_claim_takes_the_oldest_due_job(queue: JobQueue) -> None:
    a = queue.enqueue(clip("a.mp4"), ROOT, 1, 1)
    b = queue.enqueue(clip("b.mp4"), ROOT, 1, 1)
    first = queue.claim_next()
    assert first.id == a.id and first.state == JobState.RUNNING and first.attempts == 1
    assert first.started_at is not None and first.progress == 0.0
    assert queue.current().id == a.id
    assert queue.claim_next().id == b.id
    assert queue.claim_next() is None


def test_retry_backs_off_exponentially_then_fails(queue: JobQueue) -> None:
    job = queue.enqueue(clip("a.mp4"), ROOT, 1, 1)
    now = time.time() + 1000  # later than the real clock: enqueue stamped the row due now

    claimed = queue.claim_next(now=now)
    assert queue.mark_retry(claimed.id, "disk full", backoff_s=10, max_attempts=3, now=now) == "queued"
    assert queue.get(job.id).next_attempt_at == pytest.approx(now + 10)
    assert queue.claim_next(now=now + 9.9) is None
    claimed = queue.claim_next(now=now + 10)
    assert claimed.id == job.id and claimed.attempts == 2 and claimed.error == "disk full"

    now += 10
    assert queue.mark_retry(claimed.id, "disk full again", backoff_s=10, max_attempts=3, now=now) == "queued"
    assert queue.get(job.id).next_attempt_at == pytest.approx(now + 20)  # 10 * 2**(2-1)
    assert queue.claim_next(now=now + 19.9) is None
    claimed = queue.claim_next(now=now + 20)
    assert claimed.attempts == 3

    assert queue.mark_retry(claimed.id, "still full", backoff_s=10, max_attempts=3, now=now + 20) == "failed"
    failed = queue.get(job.id)
    assert failed.state == JobState.FAILED and failed.error == "still full" and failed.finished_at == now + 20
    assert queue.claim_next(now=now + 10_000) is None
    assert [j.id for j in queue.recent_errors()] == [job.id]


def test_backing_off_job_does_not_block_newer_ones(queue: JobQueue) -> None:
    now = time.time() + 1000
    old = queue.enqueue(clip("old.mp4"), ROOT, 1, 1)
    queue.mark_retry(queue.claim_next(now=now).id, "flaky", backoff_s=60, max_attempts=5, now=now)
    new = queue.enqueue(clip("new.mp4"), ROOT, 1, 1)
    assert queue.claim_next(now=now + 1).id == new.id
    assert queue.claim_next(now=now + 60).id == old.id  # once due, the older job goes first again


def test_max_attempts_zero_fails_at_once(queue: JobQueue) -> None:
    # The daemon uses this for "source changed since it was queued": the row is history, not retried.
    queue.enqueue(clip("a.mp4"), ROOT, 1, 1)
    claimed = queue.claim_next()
    assert queue.mark_retry(claimed.id, "source changed", 0.0, max_attempts=0) == "failed"


def test_mark_done_records_the_result(queue: JobQueue) -> None:
    queue.enqueue(clip("a.mp4"), ROOT, 1, 1)
    claimed = queue.claim_next()
    queue.set_progress(claimed.id, 0.5)
    assert queue.current().progress == 0.5
    queue.mark_done(claimed.id, Path("/out/a.mp4"), frames=300, seconds=12.5)
    done = queue.get(claimed.id)
    assert (done.state, done.output, done.frames, done.seconds, done.progress) == (
        JobState.DONE, "/out/a.mp4", 300, 12.5, 1.0
    )
    assert queue.current() is None
    queue.set_progress(claimed.id, 0.2)  # a late progress report is ignored, not an error
    assert queue.get(claimed.id).progress == 1.0


def test_wrong_transitions_raise(queue: JobQueue) -> None:
    job = queue.enqueue(clip("a.mp4"), ROOT, 1, 1)
    with pytest.raises(QueueError, match="queued"):
        queue.mark_done(job.id, Path("/out"), 1, 1.0)
    with pytest.raises(QueueError, match="no job"):
        queue.requeue(12345)
    assert queue.get(job.id).state == JobState.QUEUED


def test_quarantine_from_queued_or_running(queue: JobQueue) -> None:
    # Queued: the watcher found a clip that never probed; the daemon records it without running it.
    never_ran = queue.enqueue(clip("a.mp4"), ROOT, 1, 1)
    queue.mark_quarantined(never_ran.id, "no moov atom")
    queue.enqueue(clip("b.mp4"), ROOT, 1, 1)
    ran = queue.claim_next()
    queue.mark_quarantined(ran.id, "no video stream")
    assert queue.counts()["quarantined"] == 2
    assert {j.error for j in queue.recent_errors()} == {"no moov atom", "no video stream"}
    assert queue.is_known(clip("a.mp4"), 1, 1)


def test_requeue_gives_the_attempt_back(queue: JobQueue) -> None:
    job = queue.enqueue(clip("a.mp4"), ROOT, 1, 1)
    queue.claim_next()
    queue.requeue(job.id)
    again = queue.get(job.id)
    assert (again.state, again.attempts, again.progress) == (JobState.QUEUED, 0, None)
    assert queue.claim_next().attempts == 1


CRASHING_DAEMON = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from dashcamd.jobs import JobQueue
    queue = JobQueue(Path(sys.argv[1]))
    queue.enqueue(Path("/srv/dashcam/a.mp4"), Path("/srv/dashcam"), 1, 1)
    queue.enqueue(Path("/srv/dashcam/b.mp4"), Path("/srv/dashcam"), 1, 1)
    job = queue.claim_next()
    queue.set_progress(job.id, 0.4)
    os._exit(9)  # no close(), no cleanup: as if the daemon was SIGKILLed mid-clip
    """
)


def test_reset_running_after_a_crash(db_path: Path) -> None:
    subprocess.run([sys.executable, "-c", CRASHING_DAEMON, str(db_path)], check=False, timeout=60)
    with JobQueue(db_path) as queue:
        assert queue.counts()["running"] == 1
        assert queue.reset_running() == 1
        counts = queue.counts()
        assert (counts["running"], counts["queued"]) == (0, 2)
        job = queue.claim_next()
        # The interrupted attempt stays counted (a clip that kills the daemon must not loop for ever).
        assert job.path == "/srv/dashcam/a.mp4" and job.attempts == 2


def test_reset_running_fails_jobs_out_of_attempts(queue: JobQueue) -> None:
    queue.enqueue(clip("a.mp4"), ROOT, 1, 1)
    job = queue.claim_next()
    assert queue.reset_running(max_attempts=1) == 1
    failed = queue.get(job.id)
    assert failed.state == JobState.FAILED and "interrupted 1 times" in failed.error


def test_second_queue_on_same_file_sees_the_same_rows(db_path: Path) -> None:
    with JobQueue(db_path) as first:
        first.enqueue(clip("a.mp4"), ROOT, 1, 1)
        first.claim_next()
        with JobQueue(db_path) as second:
            assert second.reset_running() == 1
            assert second.counts()["queued"] == 1
        assert first.counts()["queued"] == 1


def test_read_status_snapshot(queue: JobQueue, db_path: Path) -> None:
    queue.enqueue(clip("a.mp4"), ROOT, 1, 1)
    queue.enqueue(clip("b.mp4"), ROOT, 1, 1)
    first = queue.claim_next()
    queue.mark_retry(first.id, "decoder hiccup", 30, 3)
    running = queue.claim_next()
    queue.set_progress(running.id, 0.25)

    status = read_status(db_path)
    assert status["counts"] == {"queued": 1, "running": 1, "done": 0, "failed": 0, "quarantined": 0}
    assert status["current"]["path"] == str(clip("b.mp4"))
    assert status["current"]["progress"] == 0.25 and status["current"]["state"] == "running"
    assert [e["error"] for e in status["recent_errors"]] == ["decoder hiccup"]
    assert status["next_due_at"] > first.enqueued_at


def test_read_status_while_a_writer_holds_the_lock(queue: JobQueue, db_path: Path) -> None:
    queue.enqueue(clip("a.mp4"), ROOT, 1, 1)
    writer = sqlite3.connect(db_path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE jobs SET state = 'running'")
        # WAL: the reader gets the last committed snapshot at once instead of waiting for the lock.
        status = read_status(db_path)
        assert status["counts"]["queued"] == 1 and status["current"] is None
        writer.execute("COMMIT")
    finally:
        writer.close()
    assert read_status(db_path)["counts"]["running"] == 1


def test_read_status_never_creates_a_database(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sqlite3"
    with pytest.raises(QueueError, match="no queue database"):
        read_status(missing)
    assert not missing.exists()


STATUS_READER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dashcamd.jobs import read_status
    seen = set()
    for _ in range(200):
        status = read_status(Path(sys.argv[1]))
        seen.add(sum(status["counts"].values()))
    print(max(seen))
    """
)


def test_status_from_another_process_while_the_daemon_writes(queue: JobQueue, db_path: Path) -> None:
    queue.enqueue(clip("0.mp4"), ROOT, 1, 1)
    reader = subprocess.Popen(
        [sys.executable, "-c", STATUS_READER, str(db_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    written = 1
    while reader.poll() is None and written < 2000:
        claimed = queue.claim_next()
        queue.set_progress(claimed.id, 0.5)
        queue.mark_done(claimed.id, Path("/out") / claimed.path, 1, 0.1)
        queue.enqueue(clip(f"{written}.mp4"), ROOT, 1, 1)
        written += 1
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    assert 1 <= int(out) <= written


def test_output_owner_names_the_source_of_a_finished_output(tmp_path):
    with JobQueue(tmp_path / "q.sqlite3") as queue:
        job = queue.enqueue(tmp_path / "a.mov", tmp_path, 1, 1)
        queue.claim_next()
        assert queue.output_owner(tmp_path / "out" / "a.mp4") is None
        queue.mark_done(job.id, tmp_path / "out" / "a.mp4", frames=1, seconds=0.1)
        assert queue.output_owner(tmp_path / "out" / "a.mp4") == str(tmp_path / "a.mov")
