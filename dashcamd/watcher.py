"""From file-system events to "this clip is complete, queue it".

Owns the watchdog observer, the ignore rules, the stability tracker (size and mtime unchanged for
``settle_s`` plus a probe that opens the container) and the startup scan / periodic rescan that catch
what events miss. Nothing here processes a clip: the watchdog thread only records paths.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePath

import structlog
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from dashcamd.config import Settings

log = structlog.get_logger()

# Folder and file names that NAS boxes, desktops and sync tools scatter around (compared lower-cased).
# Synology @eaDir holds thumbnails named like the clip ("clip.mp4/SYNOFILE_THUMB..."), #recycle and
# #snapshot hold copies of clips we already saw, lost+found holds fsck debris.
JUNK_NAMES = frozenset(
    name.lower()
    for name in (
        "@eaDir",
        "#recycle",
        "#snapshot",
        ".Trashes",
        ".Spotlight-V100",
        ".DS_Store",
        "Thumbs.db",
        "desktop.ini",
        ".stfolder",
        "lost+found",
    )
)
# Names a copy in progress carries before its final rename (browsers, rsync --partial, editors).
TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", "~")

# How long a settled clip may keep failing the probe before it is reported invalid, and the first
# re-check delay (doubling, capped). Ten minutes because a copy can stall (Wi-Fi SD card, SMB
# hiccup, a tool that preallocates the full size) and reporting it invalid lets the daemon quarantine
# a file that is still arriving; a truncated dashcam clip (power cut, no moov) stays broken for ever,
# so waiting costs only latency on a rare case.
INVALID_AFTER_S = 600.0
PROBE_RETRY_S = 5.0
PROBE_RETRY_MAX_S = 120.0
# A watch that cannot be set up (inotify limit, permissions) is retried with this back-off cap.
WATCH_RETRY_MAX_S = 60.0

EnqueueFn = Callable[[Path, Path, int, int], None]
ProbeFn = Callable[[Path], object]  # return value ignored; raising = not (yet) a complete clip
InvalidFn = Callable[[Path, str], None]
KnownFn = Callable[[Path, int, int], bool]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    # Lower-case both sides: dashcams write CLIP.MP4, users write *.mp4 (fnmatch is case-sensitive on Linux).
    lowered = name.lower()
    return any(fnmatchcase(lowered, pattern.lower()) for pattern in patterns)


class IgnoreRules:
    """Decides which paths under a watch root are never clips. Pure: no file-system access."""

    def __init__(self, patterns: Iterable[str], ignore: Iterable[str], own_dirs: Iterable[Path]) -> None:
        self.patterns = list(patterns)
        self.ignore = list(ignore)
        # Resolved so that a symlinked or relative configuration still matches the resolved clip path.
        self.own_dirs = [Path(os.path.realpath(folder)) for folder in own_dirs]

    def _part_reason(self, part: str) -> str | None:
        lowered = part.lower()
        if part.startswith("."):
            return "hidden"  # also covers ._AppleDouble, .DS_Store, .Trashes, .stfolder, rsync's .name.XXXX
        if lowered in JUNK_NAMES:
            return "junk"
        return None

    def _ignore_reason(self, rel: PurePath) -> str | None:
        # User patterns match a single name (file or any folder on the way) or a relative path prefix,
        # so "Parking" and "DCIM/Parking" both skip the folder and "*.lrv" skips low-res previews.
        parts = rel.parts
        for index, part in enumerate(parts):
            prefix = "/".join(parts[: index + 1])
            if _matches(part, self.ignore) or _matches(prefix, self.ignore):
                return "ignore pattern"
        return None

    def own_dir_reason(self, real_path: Path) -> str | None:
        for folder in self.own_dirs:
            if real_path == folder or real_path.is_relative_to(folder):
                return "dashcamd folder"
        return None

    def dir_reason(self, rel: PurePath, real_path: Path) -> str | None:
        """Why a folder (relative to its watch root) is skipped whole, or None to descend into it."""
        for part in rel.parts:
            reason = self._part_reason(part)
            if reason:
                return reason
        return self._ignore_reason(rel) or self.own_dir_reason(real_path)

    def file_reason(self, rel: PurePath) -> str | None:
        """Why a file (relative to its watch root) is not a clip, or None. Own folders are checked on
        the resolved path separately (see own_dir_reason)."""
        for part in rel.parts:
            reason = self._part_reason(part)
            if reason:
                return reason
        name_lower = rel.name.lower()
        if name_lower.endswith(TEMP_SUFFIXES):
            return "temporary name"
        reason = self._ignore_reason(rel)
        if reason:
            return reason
        if not _matches(rel.name, self.patterns):
            return "not a clip pattern"
        return None


@dataclass
class _Candidate:
    """A clip seen but not yet queued. Main thread only."""

    path: Path  # resolved
    root: Path  # resolved watch root
    size: int
    mtime_ns: int
    first_seen: float
    stable_since: float
    probe_failures: int = 0
    first_failure_at: float | None = None
    next_probe_at: float = 0.0


@dataclass
class _Root:
    """One configured watch folder and the state of its watch."""

    path: Path  # as configured, made absolute: event paths arrive under it
    index: int
    watch: ObservedWatch | None = None
    identity: tuple[int, int] | None = None  # (st_dev, st_ino): a remounted SD card is a new folder
    missing_logged: bool = False
    failures: int = 0
    retry_at: float = 0.0

    @property
    def real(self) -> Path:
        return Path(os.path.realpath(self.path))


class _RecordingHandler(FileSystemEventHandler):
    """Runs on watchdog's dispatcher thread: records the path, nothing else, never raises.

    An exception escaping a handler stops that observer's dispatching for good, silently.
    """

    # Reads (our own probe, the worker decoding) are not changes. Folder events carry nothing the
    # file events do not: watchdog's inotify emitter reports the files of a folder moved or created
    # in as events of their own, and the rescan covers what any emitter misses.
    _SKIPPED = frozenset({"opened", "closed_no_write"})

    def __init__(self, record: Callable[[int, str], None], root_index: int) -> None:
        super().__init__()
        self._record = record
        self._root_index = root_index

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            if event.is_directory or event.event_type in self._SKIPPED:
                return
            self._record(self._root_index, os.fsdecode(event.src_path))
            if event.event_type == "moved":
                # Both ends: the source candidate must go, the destination may be a clip.
                self._record(self._root_index, os.fsdecode(event.dest_path))
        except Exception:
            try:
                log.exception("watch_event_failed", event=repr(event))
            except Exception:  # noqa: S110 - logging itself failed; staying alive matters more
                pass


def _is_utf8(path: Path) -> bool:
    """False for names holding bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(path: Path) -> str:
    """The name with non-UTF-8 bytes as \\xNN: a lone surrogate would break a UTF-8 console or log line."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def default_observer_factory(settings: Settings) -> Callable[[], BaseObserver]:
    """inotify by default; polling for network mounts where inotify sees no remote writes."""
    if settings.watch.polling:
        return lambda: PollingObserver(timeout=settings.watch.poll_interval_s)
    return lambda: Observer()


class ClipWatcher:
    """Watches the configured folders and calls ``enqueue`` once per complete clip version.

    A clip is complete when its size and mtime have not changed for ``settle_s`` (on ``clock``) and
    ``probe(path)`` returns. A settled clip that keeps failing the probe is re-checked with back-off
    (``probe_retry_s`` doubling up to 2 min) and handed to ``on_invalid`` once it has failed for
    ``invalid_after_s`` without changing; it is not reported again until its size or mtime change.

    Threading: ``start``/``stop``/``poll`` and every callback run on the caller's (main) thread; the
    watchdog thread only adds paths to a locked set.
    """

    def __init__(
        self,
        settings: Settings,
        enqueue: EnqueueFn,
        probe: ProbeFn,
        on_invalid: InvalidFn,
        is_known: KnownFn,
        clock: Callable[[], float] = time.monotonic,
        *,
        observer_factory: Callable[[], BaseObserver] | None = None,
        invalid_after_s: float = INVALID_AFTER_S,
        probe_retry_s: float = PROBE_RETRY_S,
    ) -> None:
        self._settings = settings.watch
        self._enqueue = enqueue
        self._probe = probe
        self._on_invalid = on_invalid
        self._is_known = is_known
        self._clock = clock
        self._observer_factory = observer_factory or default_observer_factory(settings)
        self._invalid_after_s = invalid_after_s
        self._probe_retry_s = probe_retry_s
        paths = settings.paths
        own_dirs = [paths.output, paths.state, *(p for p in (paths.archive, paths.quarantine) if p)]
        self.rules = IgnoreRules(self._settings.patterns, self._settings.ignore, own_dirs)
        self._roots = [_Root(path=Path(os.path.abspath(p)), index=i) for i, p in enumerate(paths.watch)]
        self._lock = threading.Lock()
        self._events: set[tuple[int, str]] = set()
        self._candidates: dict[Path, _Candidate] = {}
        # Clips reported invalid, with the (size, mtime_ns) reported: not reported again unless changed.
        self._rejected: dict[Path, tuple[int, int]] = {}
        # Paths whose names are not UTF-8 (warned about once each; the queue cannot store them).
        self._unnamable: set[Path] = set()
        self._observer: BaseObserver | None = None
        self._started = False
        self._next_rescan_at = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the observer, watch every folder that exists, scan them. Missing folders are retried
        by poll() (an SD card may be mounted later), so this never fails for a missing folder."""
        if self._started:
            return
        self._started = True
        self._start_observer()
        now = self._clock()
        self._ensure_watches(now)
        self._next_rescan_at = now + self._settings.rescan_interval_s

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self._stop_observer()
        log.info("watch_stopped")

    def _start_observer(self) -> None:
        observer = self._observer_factory()
        observer.daemon = True  # never keep the process alive on a missed stop()
        observer.start()
        self._observer = observer

    def _stop_observer(self) -> None:
        observer, self._observer = self._observer, None
        for root in self._roots:
            root.watch, root.identity = None, None
        if observer is None:
            return
        try:
            observer.unschedule_all()
            observer.stop()
            observer.join(timeout=10)
        except Exception:
            log.exception("watch_stop_failed")

    @property
    def pending(self) -> frozenset[Path]:
        """Resolved paths seen but not yet queued (settling, or failing the probe)."""
        return frozenset(self._candidates)

    # -- main-thread work ---------------------------------------------------------------------------

    def poll(self) -> None:
        """Main loop hook (every ~0.5 s): keep watches alive, take in events, rescan when due, queue
        settled clips. Never raises: a watcher bug must not take the daemon down."""
        if not self._started:
            return
        try:
            now = self._clock()
            if self._observer is None or not self._observer.is_alive():
                # Not expected (handlers never raise), but a dead observer would mean silence for ever.
                log.error("watch_observer_died", action="restarting")
                self._stop_observer()
                self._start_observer()
            self._ensure_watches(now)
            for root_index, path in self._drain():
                self._consider_safely(self._roots[root_index], Path(path), now, via="event")
            if now >= self._next_rescan_at:
                self._next_rescan_at = now + self._settings.rescan_interval_s
                self._scan_all(now)
            self._check_candidates(now)
        except Exception:
            log.exception("watch_poll_failed")

    def _record(self, root_index: int, path: str) -> None:
        with self._lock:
            self._events.add((root_index, path))

    def _drain(self) -> set[tuple[int, str]]:
        with self._lock:
            events, self._events = self._events, set()
        return events

    def _ensure_watches(self, now: float) -> None:
        """(Re)watch folders that appeared, were remounted or whose emitter stopped; scan them then."""
        assert self._observer is not None
        for root in self._roots:
            try:
                info = os.stat(root.path)
                identity = (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None
            except OSError:
                identity = None
            if identity is None:
                if root.watch is not None:
                    self._unschedule(root)
                if not root.missing_logged:
                    root.missing_logged = True
                    log.warning("watch_dir_missing", path=str(root.path), action="retrying every poll")
                continue
            if root.missing_logged:
                root.missing_logged = False
                log.info("watch_dir_available", path=str(root.path))
            if root.watch is not None and (identity != root.identity or not self._emitter_alive(root.watch)):
                log.info("watch_dir_changed", path=str(root.path))
                self._unschedule(root)
            if root.watch is None and now >= root.retry_at:
                self._schedule(root, identity, now)

    def _schedule(self, root: _Root, identity: tuple[int, int], now: float) -> None:
        assert self._observer is not None
        handler = _RecordingHandler(self._record, root.index)
        try:
            root.watch = self._observer.schedule(handler, root.path, recursive=self._settings.recursive)
        except OSError as failed:
            # Typically the inotify watch limit (ENOSPC) on a big tree. Rescans still find clips.
            root.failures += 1
            delay_s = min(WATCH_RETRY_MAX_S, 2.0 ** (root.failures - 1))
            root.retry_at = now + delay_s
            log.warning(
                "watch_failed",
                path=str(root.path),
                error=str(failed),
                retry_in_s=delay_s,
                hint="raise fs.inotify.max_user_watches or set watch.polling = true",
            )
            return
        root.identity, root.failures = identity, 0
        log.info("watch_started", path=str(root.path), recursive=self._settings.recursive,
                 observer=type(self._observer).__name__)
        # Anything that arrived while the folder was not watched (daemon down, card not mounted).
        self._scan_root(root, now)

    def _unschedule(self, root: _Root) -> None:
        watch, root.watch, root.identity = root.watch, None, None
        if watch is None or self._observer is None:
            return
        try:
            self._observer.unschedule(watch)
        except Exception:  # the emitter may already be gone with its folder
            log.debug("watch_unschedule_failed", path=str(root.path), exc_info=True)

    def _emitter_alive(self, watch: ObservedWatch) -> bool:
        # watchdog stops an emitter when its folder is deleted (inotify DELETE_SELF, polling ENOENT).
        assert self._observer is not None
        for emitter in list(self._observer.emitters):
            if emitter.watch == watch:
                return emitter.is_alive()
        return False

    # -- discovery ----------------------------------------------------------------------------------

    def _scan_all(self, now: float) -> None:
        seen: set[Path] = set()
        for root in self._roots:
            if os.path.isdir(root.path):
                seen |= self._scan_root(root, now)
        # Forget rejections of files that are gone, so the map does not grow for ever.
        for path in [p for p in self._rejected if p not in seen]:
            del self._rejected[path]

    def _scan_root(self, root: _Root, now: float) -> set[Path]:
        """Walk a watch root and consider every file; returns resolved paths
        seen. Symlinked folders are not followed (loops, and their targets are watched or outside)."""
        seen: set[Path] = set()
        before = len(self._candidates)
        stack = [root.path]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as entries:
                    listing = list(entries)
            except OSError as unreadable:
                log.debug("scan_unreadable", path=str(folder), error=str(unreadable))
                continue
            for entry in listing:
                path = Path(entry.path)
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    if self._settings.recursive and not self.rules.dir_reason(
                        path.relative_to(root.path), Path(os.path.realpath(path))
                    ):
                        stack.append(path)
                    continue
                real = self._consider_safely(root, path, now, via="scan")
                if real is not None:
                    seen.add(real)
        log.debug("scan_done", path=str(root.path), files=len(seen),
                  new_candidates=len(self._candidates) - before)
        return seen

    def _reason(self, root: _Root, rel: PurePath, path: Path, real: Path) -> str | None:
        """Why this file is not taken, or None. ``real`` is its resolved path."""
        reason = self.rules.file_reason(rel)
        if reason is not None:
            return reason
        real_root = root.real
        if not real.is_relative_to(real_root):
            return "symlink out of the watch folder"
        if real != path:
            # A link inside the root stands for its target, which must pass the rules in its own
            # place: a link into @eaDir or into our output folder is still not a clip.
            reason = self.rules.file_reason(real.relative_to(real_root))
            if reason is not None:
                return reason
        return self.rules.own_dir_reason(real)

    def _consider_safely(self, root: _Root, path: Path, now: float, via: str) -> Path | None:
        """_consider, but one odd file never costs the others their turn: an exception here used to end the
        scan (or the start-up: the daemon could not start) and drop the rest of the drained events."""
        try:
            return self._consider(root, path, now, via)
        except Exception:
            log.exception("clip_consider_failed", clip=_printable(path))
            return None

    def _consider(self, root: _Root, path: Path, now: float, via: str) -> Path | None:
        """Make ``path`` a candidate if it is a clip not yet known. Returns its resolved path when it
        exists and is a clip file (queued or not), else None."""
        try:
            rel = path.relative_to(root.path)
        except ValueError:
            return None
        if not rel.parts or (not self._settings.recursive and len(rel.parts) > 1):
            return None
        real = Path(os.path.realpath(path))
        reason = self._reason(root, rel, path, real)
        if reason is not None:
            if via == "event" and reason != "not a clip pattern":
                log.debug("clip_ignored", clip=str(path), reason=reason)
            return None
        if not _is_utf8(real) or not _is_utf8(path):
            # Latin-1 names from old cameras and shares: SQLite stores text as UTF-8, so such a clip cannot
            # be queued. Say so once (found by tests/test_bad_input.py: it crashed the start-up scan).
            if real not in self._unnamable:
                self._unnamable.add(real)
                log.warning("clip_name_not_utf8", clip=_printable(path),
                            action="skipped; rename it to have it processed")
            return None
        try:
            info = os.stat(real)
        except OSError:
            self._candidates.pop(real, None)  # deleted or moved away; the check would drop it anyway
            return None
        if not stat.S_ISREG(info.st_mode):
            return None
        if real in self._candidates:
            return real  # its own check re-stats it; one candidate per resolved path
        version = (info.st_size, info.st_mtime_ns)
        if self._rejected.get(real) == version or self._is_known(real, *version):
            return real
        self._candidates[real] = _Candidate(real, root.real, *version, first_seen=now, stable_since=now)
        log.info("clip_seen", clip=str(real), size=info.st_size, via=via)
        return real

    # -- settling -----------------------------------------------------------------------------------

    def _check_candidates(self, now: float) -> None:
        for candidate in list(self._candidates.values()):
            try:
                self._check(candidate, now)
            except Exception:
                log.exception("clip_check_failed", clip=str(candidate.path))

    def _restat(self, candidate: _Candidate, now: float) -> bool:
        """Re-read size and mtime; False when the clip is gone or changed (settle clock re-armed)."""
        try:
            info = os.stat(candidate.path)
        except OSError:
            del self._candidates[candidate.path]
            log.debug("clip_vanished", clip=str(candidate.path))
            return False
        if (info.st_size, info.st_mtime_ns) != (candidate.size, candidate.mtime_ns):
            candidate.size, candidate.mtime_ns = info.st_size, info.st_mtime_ns
            candidate.stable_since = now
            candidate.probe_failures, candidate.first_failure_at, candidate.next_probe_at = 0, None, 0.0
            return False
        return True

    def _check(self, candidate: _Candidate, now: float) -> None:
        if not self._restat(candidate, now):
            return
        if now - candidate.stable_since < self._settings.settle_s or now < candidate.next_probe_at:
            return
        if self._is_known(candidate.path, candidate.size, candidate.mtime_ns):
            del self._candidates[candidate.path]  # queued meanwhile (another root, a rescan race)
            return
        try:
            self._probe(candidate.path)
        except Exception as failed:
            self._probe_failed(candidate, str(failed) or type(failed).__name__, now)
            return
        # The probe read the file for a while: make sure it is still the version that settled.
        if not self._restat(candidate, now):
            return
        log.info("clip_settled", clip=str(candidate.path), size=candidate.size,
                 waited_s=round(now - candidate.first_seen, 3))
        try:
            self._enqueue(candidate.path, candidate.root, candidate.size, candidate.mtime_ns)
        except Exception:
            # The queue is the daemon's; if it hiccups (disk full), try again after the retry delay.
            log.exception("clip_enqueue_failed", clip=str(candidate.path))
            candidate.next_probe_at = now + self._probe_retry_s
            return
        del self._candidates[candidate.path]

    def _probe_failed(self, candidate: _Candidate, reason: str, now: float) -> None:
        candidate.probe_failures += 1
        if candidate.first_failure_at is None:
            candidate.first_failure_at = now
        failing_s = now - candidate.first_failure_at
        if failing_s >= self._invalid_after_s:
            del self._candidates[candidate.path]
            self._rejected[candidate.path] = (candidate.size, candidate.mtime_ns)
            log.warning("clip_invalid", clip=str(candidate.path), error=reason,
                        probes=candidate.probe_failures, failing_s=round(failing_s, 3))
            try:
                self._on_invalid(candidate.path, reason)
            except Exception:
                log.exception("clip_invalid_callback_failed", clip=str(candidate.path))
            return
        delay_s = min(PROBE_RETRY_MAX_S, self._probe_retry_s * 2.0 ** (candidate.probe_failures - 1))
        candidate.next_probe_at = now + delay_s
        log.info("clip_incomplete", clip=str(candidate.path), error=reason,
                 probes=candidate.probe_failures, retry_in_s=delay_s)
