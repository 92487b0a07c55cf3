"""Durable job queue on SQLite: one row per clip version (path, size, mtime_ns), survives crashes.

Only the daemon's main thread writes (one connection); ``dashcamd status`` reads from another process
through :func:`read_status`. WAL lets that reader see a consistent snapshot without blocking the writer.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Iterator

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
            self._db.execute("PRAGMA foreign_keys = ON")
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
        with self._transaction():
            self._db.executescript_in_tx = None  # type: ignore[attr-defined]  # (placeholder removed below)
