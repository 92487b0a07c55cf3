"""Durable job queue on SQLite: one row per clip version (path, size, mtime_ns), survives crashes.

Only the daemon's main thread writes (one connection); ``dashcamd status`` reads from another process
through :func:`read_status`. WAL lets that reader see a consistent snapshot without blocking the writer.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from dashcamd.errors import DashcamdError

log = structlog.get_logger()

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 5.0


class QueueError(DashcamdError):
    """The queue database cannot be used (newer schema, corrupt) or a job is not in the expected state."""


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class Job:
    """One row of the queue. Paths are absolute strings as stored; times are ``time.time()`` floats."""

    id: int
    path: str
    watch_root: str
    size: int
    mtime_ns: int
    state: JobState
    attempts: int
    next_attempt_at: float
    error: str | None
    enqueued_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    seconds: float | None
    frames: int | None
    output: str | None
    progress: float | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (state as its string value) for ``dashcamd status``."""
        fields = asdict(self)
        fields["state"] = str(self.state)
        return fields


_COLUMNS = (
    "id, path, watch_root, size, mtime_ns, state, attempts, next_attempt_at, error, enqueued_at, "
    "updated_at, started_at, finished_at, seconds, frames, output, progress"
)

_SCHEMA = f"""
CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    path            TEXT    NOT NULL,
    watch_root      TEXT    NOT NULL,
    size            INTEGER NOT NULL,
    mtime_ns        INTEGER NOT NULL,
    state           TEXT    NOT NULL CHECK (state IN ({", ".join(repr(s.value) for s in JobState)})),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL    NOT NULL,
    error           TEXT,
    enqueued_at     REAL    NOT NULL,
    updated_at      REAL    NOT NULL,
    started_at      REAL,
    finished_at     REAL,
    seconds         REAL,
    frames          INTEGER,
    output          TEXT,
    progress        REAL,
    UNIQUE (path, size, mtime_ns)
);
CREATE INDEX jobs_claim ON jobs (state, next_attempt_at, id);
CREATE INDEX jobs_updated ON jobs (updated_at);
"""


def _job(row: sqlite3.Row | tuple[Any, ...]) -> Job:
    values = list(row)
    values[5] = JobState(values[5])
    if values[-1] is not None:
        values[-1] = float(values[-1])  # RETURNING hands back 0.0 as the integer 0
    return Job(*values)


class JobQueue:
    """The daemon's queue. Not thread-safe by design: the main thread owns the one connection."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, so every multi-statement change below states its own
        # BEGIN IMMEDIATE and nothing is left in an implicit transaction that blocks checkpoints.
        self._db = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode = WAL")
            # FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on power loss. The daemon
            # deletes or moves an original right after mark_done, so a lost "done" would leave a row
            # pointing at a source that no longer exists. The queue commits a handful of times per
            # clip plus one progress update a second, so the extra fsync costs nothing measurable.
            self._db.execute("PRAGMA synchronous = FULL")
            self._migrate()
        except sqlite3.DatabaseError as broken:
            self._db.close()
            raise QueueError(f"{self.db_path}: {broken}") from broken

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise QueueError(
                f"{self.db_path}: schema version {version} is newer than this dashcamd ({SCHEMA_VERSION})"
            )
        if version == SCHEMA_VERSION:
            return
        # executescript() would COMMIT first; run the statements one by one inside one transaction
        # so that two daemons started at once cannot both create the table.
        with self._transaction():
            if self._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return
            for statement in filter(None, (part.strip() for part in _SCHEMA.split(";"))):
                self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock up front: no read-then-upgrade deadlock with another writer.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _get(self, job_id: int) -> Job | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def _require(self, job_id: int, allowed: tuple[JobState, ...], action: str) -> Job:
        job = self._get(job_id)
        if job is None:
            raise QueueError(f"{action}: no job {job_id}")
        if job.state not in allowed:
            raise QueueError(f"{action}: job {job_id} is {job.state}, expected {'/'.join(allowed)}")
        return job

    # -- writers ------------------------------------------------------------------------------------

    def enqueue(self, path: Path, watch_root: Path, size: int, mtime_ns: int) -> Job | None:
        """Queue one version of a clip; None when that exact (path, size, mtime_ns) is already known.

        Queued rows of the same path with another size/mtime are deleted: that version no longer exists
        on disk, so it could only fail, and a "failed" row would be noise in the status. Running, done,
        failed and quarantined rows are history and stay.
        """
        now = time.time()
        path_s, root_s = str(path), str(watch_root)
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO jobs (path, watch_root, size, mtime_ns, state, next_attempt_at, enqueued_at,"
                " updated_at) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)"
                " ON CONFLICT (path, size, mtime_ns) DO NOTHING",
                (path_s, root_s, size, mtime_ns, now, now, now),
            )
            if cursor.rowcount == 0:
                return None
            job_id = cursor.lastrowid
            superseded = self._db.execute(
                "DELETE FROM jobs WHERE path = ? AND state = 'queued' AND id != ? RETURNING id",
                (path_s, job_id),
            ).fetchall()
        if superseded:
            log.info("job_superseded", clip=path_s, job_id=job_id, superseded=[row[0] for row in superseded])
        job = self._get(job_id)
        assert job is not None
        return job

    def claim_next(self, now: float | None = None) -> Job | None:
        """Oldest queued job that is due → running, attempts + 1. None when nothing is due."""
        now = time.time() if now is None else now
        with self._transaction():
            row = self._db.execute(
                f"UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?, updated_at = ?,"
                f" finished_at = NULL, progress = 0.0"
                f" WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND next_attempt_at <= ?"
                f"             ORDER BY id LIMIT 1)"
                f" RETURNING {_COLUMNS}",
                (now, now, now),
            ).fetchone()
        return _job(row) if row else None

    def mark_done(
        self, job_id: int, output: Path, frames: int, seconds: float, now: float | None = None
    ) -> None:
        """running → done. Committed with fsync before returning, so the original may go afterwards."""
        now = time.time() if now is None else now
        with self._transaction():
            self._require(job_id, (JobState.RUNNING,), "mark_done")
            self._db.execute(
                "UPDATE jobs SET state = 'done', output = ?, frames = ?, seconds = ?, finished_at = ?,"
                " updated_at = ?, progress = 1.0, error = NULL WHERE id = ?",
                (str(output), frames, seconds, now, now, job_id),
            )

    def mark_retry(
        self, job_id: int, error: str, backoff_s: float, max_attempts: int, now: float | None = None
    ) -> str:
        """running → queued, due at now + backoff_s * 2**(attempts-1); or → failed once
        attempts >= max_attempts (max_attempts=0 fails at once).

        Returns the new state, ``"queued"`` or ``"failed"``.
        """
        now = time.time() if now is None else now
        with self._transaction():
            job = self._require(job_id, (JobState.RUNNING,), "mark_retry")
            if job.attempts >= max_attempts:
                self._db.execute(
                    "UPDATE jobs SET state = 'failed', error = ?, finished_at = ?, updated_at = ?,"
                    " progress = NULL WHERE id = ?",
                    (error, now, now, job_id),
                )
                return JobState.FAILED.value
            due = now + backoff_s * 2 ** max(0, job.attempts - 1)
            self._db.execute(
                "UPDATE jobs SET state = 'queued', error = ?, next_attempt_at = ?, updated_at = ?,"
                " progress = NULL WHERE id = ?",
                (error, due, now, job_id),
            )
            return JobState.QUEUED.value

    def mark_quarantined(self, job_id: int, error: str, now: float | None = None) -> None:
        """running or queued → quarantined (permanent: InvalidClip). Queued is allowed so that a clip
        rejected before it ever ran can be recorded with enqueue() + mark_quarantined()."""
        now = time.time() if now is None else now
        with self._transaction():
            self._require(job_id, (JobState.RUNNING, JobState.QUEUED), "mark_quarantined")
            self._db.execute(
                "UPDATE jobs SET state = 'quarantined', error = ?, finished_at = ?, updated_at = ?,"
                " progress = NULL WHERE id = ?",
                (error, now, now, job_id),
            )

    def requeue(self, job_id: int, now: float | None = None) -> None:
        """running → queued, due now, the attempt given back: shutdown abandoned it, the clip did not fail."""
        now = time.time() if now is None else now
        with self._transaction():
            self._require(job_id, (JobState.RUNNING,), "requeue")
            self._db.execute(
                "UPDATE jobs SET state = 'queued', attempts = MAX(0, attempts - 1), next_attempt_at = ?,"
                " started_at = NULL, updated_at = ?, progress = NULL WHERE id = ?",
                (now, now, job_id),
            )

    def reset_running(self, max_attempts: int | None = None, now: float | None = None) -> int:
        """On start: rows left running by a crash → queued, due now. Returns how many.

        The attempt stays counted: if the clip itself brought the daemon down (OOM kill), giving it
        back would loop forever. With ``max_attempts``, rows that already used them all become failed.
        """
        now = time.time() if now is None else now
        with self._transaction():
            failed = 0
            if max_attempts is not None:
                failed = self._db.execute(
                    "UPDATE jobs SET state = 'failed', finished_at = ?, updated_at = ?, progress = NULL,"
                    " error = 'interrupted ' || attempts || ' times (daemon stopped while processing)'"
                    " WHERE state = 'running' AND attempts >= ?",
                    (now, now, max_attempts),
                ).rowcount
            requeued = self._db.execute(
                "UPDATE jobs SET state = 'queued', next_attempt_at = ?, updated_at = ?, progress = NULL"
                " WHERE state = 'running'",
                (now, now),
            ).rowcount
        if requeued or failed:
            log.info("jobs_recovered", requeued=requeued, failed=failed)
        return requeued + failed

    def set_progress(self, job_id: int, fraction: float) -> None:
        """Record progress (0..1) of a running job; ignored for any other state (a late report)."""
        fraction = min(1.0, max(0.0, float(fraction)))
        self._db.execute(
            "UPDATE jobs SET progress = ? WHERE id = ? AND state = 'running'", (fraction, job_id)
        )

    # -- readers ------------------------------------------------------------------------------------

    def is_known(self, path: Path, size: int, mtime_ns: int) -> bool:
        """Whether this exact version of the clip has a row in any state (the watcher's de-duplication)."""
        row = self._db.execute(
            "SELECT 1 FROM jobs WHERE path = ? AND size = ? AND mtime_ns = ?", (str(path), size, mtime_ns)
        ).fetchone()
        return row is not None

    def output_owner(self, output: Path) -> str | None:
        """The source path whose finished job last wrote ``output``, if any (name collisions)."""
        row = self._db.execute(
            "SELECT path FROM jobs WHERE output = ? AND state = 'done' ORDER BY finished_at DESC LIMIT 1",
            (str(output),),
        ).fetchone()
        return row[0] if row else None

    def get(self, job_id: int) -> Job | None:
        return self._get(job_id)

    def counts(self) -> dict[str, int]:
        return _counts(self._db)

    def current(self) -> Job | None:
        return _current(self._db)

    def recent_errors(self, limit: int = 5) -> list[Job]:
        return _recent_errors(self._db, limit)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _counts(db: sqlite3.Connection) -> dict[str, int]:
    counts = {state.value: 0 for state in JobState}
    for state, count in db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
        counts[state] = count
    return counts


def _current(db: sqlite3.Connection) -> Job | None:
    row = db.execute(
        f"SELECT {_COLUMNS} FROM jobs WHERE state = 'running' ORDER BY started_at DESC, id DESC LIMIT 1"
    ).fetchone()
    return _job(row) if row else None


def _recent_errors(db: sqlite3.Connection, limit: int) -> list[Job]:
    """Rows carrying an error, newest first: failed, quarantined and queued-for-retry alike."""
    rows = db.execute(
        f"SELECT {_COLUMNS} FROM jobs WHERE error IS NOT NULL ORDER BY updated_at DESC, id DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [_job(row) for row in rows]


def read_status(db_path: Path, error_limit: int = 5) -> dict[str, Any]:
    """Read-only snapshot for ``dashcamd status``, safe while the daemon writes.

    Returns ``{"db_path", "counts": {state: n}, "current": job dict | None (with "progress"),
    "recent_errors": [job dict], "next_due_at": float | None}``. Raises QueueError when the file is
    missing or unreadable: mode=ro never creates a database.
    """
    db_path = Path(db_path)
    if not db_path.exists():
        raise QueueError(f"{db_path}: no queue database (has the daemon ever run?)")
    uri = f"{db_path.resolve().as_uri()}?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)) as db:
            # One read transaction: counts, current and errors come from the same snapshot.
            db.execute("BEGIN")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA_VERSION:
                raise QueueError(f"{db_path}: schema version {version}, this dashcamd reads {SCHEMA_VERSION}")
            current = _current(db)
            next_due = db.execute(
                "SELECT MIN(next_attempt_at) FROM jobs WHERE state = 'queued'"
            ).fetchone()[0]
            status = {
                "db_path": str(db_path),
                "counts": _counts(db),
                "current": current.as_dict() if current else None,
                "recent_errors": [job.as_dict() for job in _recent_errors(db, error_limit)],
                "next_due_at": next_due,
            }
            db.execute("COMMIT")
            return status
    except sqlite3.Error as unreadable:
        raise QueueError(f"{db_path}: {unreadable}") from unreadable
