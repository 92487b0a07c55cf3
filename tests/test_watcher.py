"""The watcher on real temp folders with real watchdog observers and a real SQLite queue.

Settling runs on a FakeClock where the test needs determinism; only the slow-copy test uses real time.
The probe stand-in accepts a file once it ends with END_MARK, as a real probe accepts an MP4 once its
moov atom is written.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from watchdog.events import FileCreatedEvent, FileSystemEvent
from watchdog.observers.api import BaseObserver, EventEmitter

from dashcamd.config import Settings
from dashcamd.errors import InvalidClip
from dashcamd.jobs import JobQueue
from dashcamd.watcher import ClipWatcher, IgnoreRules, _RecordingHandler
from helpers import FakeClock, wait_for

END_MARK = b"\x00MOOV-END\x00"
SETTLE_S = 2.0  # on the fake clock


def fake_probe(path: Path) -> None:
    """Stand-in for dashcamd.media.probe: complete once the file ends with END_MARK."""
    with path.open("rb") as clip:
        clip.seek(0, os.SEEK_END)
        if clip.tell() < len(END_MARK):
            raise InvalidClip("too short to be a clip")
        clip.seek(-len(END_MARK), os.SEEK_END)
        if clip.read() != END_MARK:
            raise InvalidClip("no end marker (still copying?)")


def write_clip(path: Path, body: bytes = b"frames" * 100, complete: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body + (END_MARK if complete else b""))
    return path


class _SilentEmitter(EventEmitter):
    """An emitter that never reports anything: models events lost to an overflow or an NFS mount."""

    def queue_events(self, timeout: float) -> None:
        self.stopped_event.wait(timeout)


def deaf_observer() -> BaseObserver:
    return BaseObserver(_SilentEmitter, timeout=0.05)


@dataclass
class Harness:
    watcher: ClipWatcher
    queue: JobQueue
    watch_dir: Path
    clock: FakeClock | None
    enqueued: list[tuple[Path, Path, int, int, float]] = field(default_factory=list)
    invalid: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def enqueued_paths(self) -> list[Path]:
        return [entry[0] for entry in self.enqueued]

    def poll_until(self, condition: Callable[[], Any], timeout_s: float = 5.0, what: str = "") -> Any:
        def step() -> Any:
            self.watcher.poll()
            return condition()

        return wait_for(step, timeout_s, what=what)

    def see(self, *paths: Path) -> None:
        """Poll until the watcher tracks every path (events are asynchronous)."""
        wanted = {Path(os.path.realpath(p)) for p in paths}
        self.poll_until(lambda: wanted <= self.watcher.pending, what=f"{wanted} pending")

    def settle(self) -> None:
        """Move the fake clock past settle_s and poll once."""
        assert self.clock is not None
        self.clock.advance(SETTLE_S + 0.01)
        self.watcher.poll()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    wait_for(
        lambda: not [t for t in threading.enumerate() if t not in before and t.is_alive()],
        timeout_s=10,
        what="watcher threads to end",
    )


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    started: list[Harness] = []

    def make(
        *,
        watch_dir: Path | None = None,
        fake_clock: bool = True,
        observer_factory: Callable[[], BaseObserver] | None = None,
        paths: dict[str, Any] | None = None,
        probe: Callable[[Path], None] = fake_probe,
        enqueue_hook: Callable[[Path], None] | None = None,
        create_dir: bool = True,
        invalid_after_s: float = 30.0,
        probe_retry_s: float = 5.0,
        **watch: Any,
    ) -> Harness:
        watch_dir = watch_dir or tmp_path / "watch"
        if create_dir:
            watch_dir.mkdir(parents=True, exist_ok=True)
        settings = Settings(
            paths={
                "watch": [watch_dir],
                "output": tmp_path / "out",
                "state": tmp_path / "state",
                **(paths or {}),
            },
            watch={"settle_s": SETTLE_S, **watch},
        )
        clock = FakeClock() if fake_clock else None
        queue = JobQueue(tmp_path / "state" / "queue.sqlite3")
        harness: Harness

        def enqueue(path: Path, root: Path, size: int, mtime_ns: int) -> None:
            if enqueue_hook:
                enqueue_hook(path)
            harness.enqueued.append((path, root, size, mtime_ns, time.monotonic()))
            queue.enqueue(path, root, size, mtime_ns)

        watcher = ClipWatcher(
            settings,
            enqueue=enqueue,
            probe=probe,
            on_invalid=lambda path, reason: harness.invalid.append((path, reason)),
            is_known=queue.is_known,
            clock=clock or time.monotonic,
            observer_factory=observer_factory,
            invalid_after_s=invalid_after_s,
            probe_retry_s=probe_retry_s,
        )
        harness = Harness(watcher, queue, watch_dir, clock)
        started.append(harness)
        watcher.start()
        return harness

    yield make
    for harness in started:
        harness.watcher.stop()
        harness.queue.close()


# -- settling ----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")  # watchdog, folders made under a watch
def test_slow_chunked_copy_is_enqueued_once_after_the_writes_stop(make_harness, tmp_path: Path) -> None:
    settle_s = 0.3
    h = make_harness(fake_clock=False, settle_s=settle_s)
    target = h.watch_dir / "DCIM" / "Normal" / "Front" / "20240501_120000_F.MP4"
    target.parent.mkdir(parents=True)
    last_write_at: list[float] = []

    def slow_copy() -> None:
        # A card reader over USB 2: chunks with pauses shorter than settle_s. The pauses are the
        # scenario being modelled, not a wait for a condition.
        with target.open("wb") as out:
            for _ in range(6):
                out.write(b"x" * 64 * 1024)
                out.flush()
                time.sleep(0.05)
            out.write(END_MARK)
        last_write_at.append(time.monotonic())

    writer = threading.Thread(target=slow_copy)
    writer.start()
    h.poll_until(lambda: h.enqueued, timeout_s=15, what="the clip to be queued")
    writer.join()

    assert h.enqueued_paths == [target]
    path, root, size, mtime_ns, enqueued_at = h.enqueued[0]
    assert (root, size, mtime_ns) == (h.watch_dir, target.stat().st_size, target.stat().st_mtime_ns)
    assert enqueued_at - last_write_at[0] >= settle_s
    h.watcher.poll()
    assert h.watcher.pending == frozenset() and len(h.enqueued) == 1


def test_any_change_re_arms_the_settle_clock(make_harness) -> None:
    h = make_harness()
    target = write_clip(h.watch_dir / "a.mp4", complete=False)
    h.see(target)
    h.clock.advance(SETTLE_S * 0.9)
    h.watcher.poll()
    with target.open("ab") as out:
        out.write(b"more frames")
    h.clock.advance(SETTLE_S * 0.9)
    h.watcher.poll()  # sees the new size: the clock starts again from here
    h.clock.advance(SETTLE_S * 0.9)
    h.watcher.poll()
    assert h.enqueued == []
    with target.open("ab") as out:
        out.write(END_MARK)
    h.watcher.poll()
    h.settle()
    assert h.enqueued_paths == [target]
    assert h.enqueued[0][2] == target.stat().st_size


def test_duplicate_events_give_one_enqueue(make_harness) -> None:
    h = make_harness()
    target = write_clip(h.watch_dir / "a.mp4")
    stat = target.stat()
    for _ in range(5):  # attribute events, opens and reads: nothing that changes the clip
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        target.read_bytes()
    h.see(target)
    h.settle()
    assert h.enqueued_paths == [target]

    for _ in range(5):
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.chmod(target, 0o644)
    # Events arrive in order: once this later file is seen, the noise above has been taken in.
    sentinel = write_clip(h.watch_dir / "b.mp4")
    h.see(sentinel)
    h.settle()
    assert h.enqueued_paths == [target, sentinel]
    assert h.queue.counts()["queued"] == 2


def test_changed_after_enqueue_is_a_new_job(make_harness) -> None:
    h = make_harness()
    target = write_clip(h.watch_dir / "a.mp4")
    h.see(target)
    h.settle()
    first_size = h.enqueued[0][2]
    write_clip(target, body=b"a longer recording" * 100)
    h.see(target)
    h.settle()
    assert [entry[2] for entry in h.enqueued] == [first_size, target.stat().st_size]
    # The first version was still queued: the queue keeps only the version that exists.
    assert h.queue.counts()["queued"] == 1
    assert h.queue.is_known(target, target.stat().st_size, target.stat().st_mtime_ns)


def test_renamed_into_place_after_copy(make_harness) -> None:
    h = make_harness()
    partial = write_clip(h.watch_dir / "a.mp4.part")
    final = h.watch_dir / "a.mp4"
    partial.rename(final)
    h.see(final)
    h.settle()
    assert h.enqueued_paths == [final]


def test_folder_moved_in_whole(make_harness, tmp_path: Path) -> None:
    h = make_harness()
    staging = tmp_path / "staging" / "Event"
    clips = [write_clip(staging / f"{i}.mp4") for i in range(3)]
    staging.rename(h.watch_dir / "Event")
    moved = [h.watch_dir / "Event" / c.name for c in clips]
    h.see(*moved)
    h.settle()
    assert sorted(h.enqueued_paths) == sorted(moved)


def test_unprobeable_clip_is_retried_then_reported_invalid_once(make_harness) -> None:
    h = make_harness(invalid_after_s=30.0, probe_retry_s=5.0)
    target = write_clip(h.watch_dir / "truncated.mp4", complete=False)
    h.see(target)
    h.settle()  # first probe fails: not yet invalid, may still be arriving
    assert h.invalid == [] and target.resolve() in h.watcher.pending
    elapsed = 0.0
    while not h.invalid:
        h.clock.advance(5.0)
        elapsed += 5.0
        h.watcher.poll()
        assert elapsed <= 60, "never reported"
    assert elapsed >= 30.0
    assert h.invalid == [(target, "no end marker (still copying?)")]
    assert h.enqueued == [] and h.watcher.pending == frozenset()

    # Unchanged: neither events nor rescans report it again.
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns))
    for _ in range(100):  # 500 s: past rescan_interval_s (300 s) and several probe windows
        h.clock.advance(5.0)
        h.watcher.poll()
    assert len(h.invalid) == 1 and h.watcher.pending == frozenset()

    # The copy resumes and finishes: a new version, taken normally.
    with target.open("ab") as out:
        out.write(END_MARK)
    h.see(target)
    h.settle()
    assert h.enqueued_paths == [target]


def test_enqueue_failure_is_retried_and_does_not_stop_the_watcher(make_harness) -> None:
    failures = [RuntimeError("database is locked")]

    def flaky(path: Path) -> None:
        if failures:
            raise failures.pop()

    h = make_harness(enqueue_hook=flaky, probe_retry_s=5.0)
    target = write_clip(h.watch_dir / "a.mp4")
    h.see(target)
    h.settle()
    assert h.enqueued == [] and failures == []
    h.clock.advance(5.0)
    h.watcher.poll()
    assert h.enqueued_paths == [target]


def test_handler_never_raises() -> None:
    def broken(*_args: object) -> None:
        raise RuntimeError("boom")

    handler = _RecordingHandler(broken, 0)
    handler.dispatch(FileCreatedEvent("/watch/a.mp4"))

    class Weird(FileSystemEvent):
        event_type = "created"

    handler.dispatch(Weird(None))  # type: ignore[arg-type]


# -- discovery ---------------------------------------------------------------------------------------


def test_startup_scan_finds_clips_that_arrived_while_down(make_harness, tmp_path: Path) -> None:
    watch_dir = tmp_path / "watch"
    layout = ["DCIM/Normal/Front/F1.MP4", "DCIM/Normal/Back/B1.mp4", "Event/E1.mov", "Parking/P1.TS",
              "top.mp4"]
    clips = [write_clip(watch_dir / rel) for rel in layout]
    h = make_harness(observer_factory=deaf_observer)
    assert h.watcher.pending == {c.resolve() for c in clips}
    h.settle()
    assert sorted(h.enqueued_paths) == sorted(clips)
    assert {entry[1] for entry in h.enqueued} == {watch_dir}


def test_startup_scan_skips_clips_already_known(make_harness, tmp_path: Path) -> None:
    watch_dir = tmp_path / "watch"
    old = write_clip(watch_dir / "old.mp4")
    with JobQueue(tmp_path / "state" / "queue.sqlite3") as queue:
        info = old.stat()
        queue.enqueue(old, watch_dir, info.st_size, info.st_mtime_ns)
    h = make_harness(observer_factory=deaf_observer)
    assert h.watcher.pending == frozenset()


def test_non_recursive_takes_only_the_top_level(make_harness, tmp_path: Path) -> None:
    watch_dir = tmp_path / "watch"
    nested = write_clip(watch_dir / "DCIM" / "nested.mp4")
    top = write_clip(watch_dir / "top.mp4")
    h = make_harness(recursive=False)
    late_nested = write_clip(watch_dir / "DCIM" / "late.mp4")
    late_top = write_clip(watch_dir / "late.mp4")
    h.see(late_top)
    h.settle()
    assert sorted(h.enqueued_paths) == sorted([top, late_top])
    assert nested not in h.enqueued_paths and late_nested not in h.enqueued_paths


def test_rescan_finds_a_clip_whose_event_was_missed(make_harness) -> None:
    h = make_harness(observer_factory=deaf_observer, rescan_interval_s=60.0)
    target = write_clip(h.watch_dir / "DCIM" / "missed.mp4")
    h.watcher.poll()
    assert h.watcher.pending == frozenset()
    h.clock.advance(60.0)
    h.watcher.poll()
    assert h.watcher.pending == {target.resolve()}
    h.settle()
    assert h.enqueued_paths == [target]
    h.clock.advance(60.0)
    h.watcher.poll()  # the next rescan finds it known
    assert h.watcher.pending == frozenset() and len(h.enqueued) == 1


def test_polling_observer(make_harness, tmp_path: Path) -> None:
    h = make_harness(polling=True, poll_interval_s=0.05, watch_dir=tmp_path / "nfs")
    assert h.watcher.pending == frozenset()
    target = write_clip(h.watch_dir / "DCIM" / "a.mp4")
    h.see(target)
    h.settle()
    assert h.enqueued_paths == [target]


def test_missing_watch_dir_is_retried_until_it_appears(make_harness, tmp_path: Path) -> None:
    card = tmp_path / "media" / "sdcard"
    h = make_harness(watch_dir=card, create_dir=False)  # the card is not mounted yet: no crash
    h.watcher.poll()
    assert not card.exists()
    card.mkdir(parents=True)
    target = write_clip(card / "DCIM" / "a.mp4")  # copied before the watch is set up: the scan finds it
    h.see(target)
    later = write_clip(card / "DCIM" / "b.mp4")  # after: an event
    h.see(later)
    h.settle()
    assert sorted(h.enqueued_paths) == sorted([target, later])


def test_stopped_emitter_is_replaced(make_harness) -> None:
    h = make_harness()
    for emitter in list(h.watcher._observer.emitters):  # what watchdog does on DELETE_SELF or ENOENT
        emitter.stop()
        emitter.join()
    h.watcher.poll()
    target = write_clip(h.watch_dir / "a.mp4")
    h.see(target)
    h.settle()
    assert h.enqueued_paths == [target]


def test_watch_dir_removed_and_recreated(make_harness, tmp_path: Path) -> None:
    h = make_harness()
    first = write_clip(h.watch_dir / "a.mp4")
    h.see(first)
    shutil.rmtree(h.watch_dir)  # card pulled: watchdog stops that emitter
    h.poll_until(lambda: h.watcher.pending == frozenset(), what="candidate dropped")
    h.watch_dir.mkdir()
    second = write_clip(h.watch_dir / "b.mp4")
    h.see(second)
    third = write_clip(h.watch_dir / "c.mp4")
    h.see(third)
    h.settle()
    assert sorted(h.enqueued_paths) == sorted([second, third])


# -- ignore rules ------------------------------------------------------------------------------------

JUNK = [
    "@eaDir/clip.mp4",
    "DCIM/@EADIR/clip.mp4/SYNOFILE_THUMB_M.mp4",
    "#recycle/clip.mp4",
    "#snapshot/daily/clip.mp4",
    ".Trashes/501/clip.mp4",
    ".Spotlight-V100/clip.mp4",
    ".DS_Store",
    "DCIM/._clip.mp4",
    "Thumbs.db",
    "THUMBS.DB",
    "desktop.ini",
    ".stfolder/clip.mp4",
    "lost+found/#1234.mp4",
    "clip.mp4.part",
    "clip.mp4.tmp",
    "clip.mp4.crdownload",
    "clip.mp4~",
    ".hidden.mp4",
    ".sync/clip.mp4",
    "DCIM/.clip.mp4.Xy12ab",  # rsync's temporary name
]


@pytest.mark.parametrize("rel", JUNK)
def test_junk_names_are_ignored(rel: str) -> None:
    rules = IgnoreRules(patterns=["*"], ignore=[], own_dirs=[])
    assert rules.file_reason(PurePosixPath(rel)) is not None


@pytest.mark.parametrize(
    ("rel", "taken"),
    [("CLIP.MP4", True), ("Clip.Mov", True), ("DCIM/Front/F.mTs", True), ("notes.txt", False),
     ("clip.mp4.jpg", False), ("DCIM/F.LRV", False)],
)
def test_patterns_are_case_insensitive(rel: str, taken: bool) -> None:
    rules = IgnoreRules(patterns=["*.mp4", "*.mov", "*.mts"], ignore=[], own_dirs=[])
    assert (rules.file_reason(PurePosixPath(rel)) is None) is taken


@pytest.mark.parametrize(
    ("ignore", "rel", "ignored"),
    [
        (["parking"], "Parking/P1.mp4", True),
        (["DCIM/Back"], "dcim/back/B1.mp4", True),
        (["DCIM/Back"], "DCIM/Front/F1.mp4", False),
        (["*_B.MP4"], "DCIM/20240501_B.mp4", True),
        (["*_B.MP4"], "DCIM/20240501_F.mp4", False),
    ],
)
def test_user_ignore_patterns(ignore: list[str], rel: str, ignored: bool) -> None:
    rules = IgnoreRules(patterns=["*.mp4"], ignore=ignore, own_dirs=[])
    assert (rules.file_reason(PurePosixPath(rel)) is not None) is ignored


def test_junk_is_ignored_by_scan_and_events(make_harness, tmp_path: Path) -> None:
    watch_dir = tmp_path / "watch"
    for rel in JUNK[: len(JUNK) // 2]:
        write_clip(watch_dir / rel)
    keep_early = write_clip(watch_dir / "DCIM" / "KEEP1.MP4")
    h = make_harness(patterns=["*"], ignore=["parking", "*.lrv"])  # "*": only the rules stop junk
    for rel in JUNK[len(JUNK) // 2 :] + ["Parking/P.mp4", "DCIM/F.LRV"]:
        write_clip(watch_dir / rel)
    keep_late = write_clip(watch_dir / "DCIM" / "keep2.mp4")
    h.see(keep_late)
    h.settle()
    assert sorted(h.enqueued_paths) == sorted([keep_early, keep_late])


def test_symlinks(make_harness, tmp_path: Path) -> None:
    watch_dir = tmp_path / "watch"
    outside = write_clip(tmp_path / "elsewhere" / "private.mp4")
    real = write_clip(watch_dir / "DCIM" / "real.mp4")
    (watch_dir / "link_out.mp4").parent.mkdir(parents=True, exist_ok=True)
    (watch_dir / "link_out.mp4").symlink_to(outside)
    (watch_dir / "alias.mp4").symlink_to(real)
    (watch_dir / "linked_dir").symlink_to(outside.parent, target_is_directory=True)
    h = make_harness()
    (watch_dir / "late_out.mp4").symlink_to(outside)
    (watch_dir / "late_alias.mp4").symlink_to(real)
    sentinel = write_clip(watch_dir / "sentinel.mp4")
    h.see(sentinel)
    h.settle()
    # Links out are ignored; links inside dedupe to their target (queued once, by its real path).
    assert sorted(h.enqueued_paths) == sorted([real, sentinel])


def test_own_folders_inside_the_watch_dir_are_ignored(make_harness, tmp_path: Path) -> None:
    watch_dir = tmp_path / "watch"
    own = {name: watch_dir / name for name in ("redacted", "dashcamd-state", "archive", "quarantine")}
    paths = {"output": own["redacted"], "state": own["dashcamd-state"], "archive": own["archive"],
             "quarantine": own["quarantine"]}
    for folder in own.values():
        write_clip(folder / "DCIM" / "early.mp4")
    h = make_harness(paths=paths)
    for folder in own.values():
        write_clip(folder / "DCIM" / "late.mp4")
    # The output arrives as a temp file renamed into place, like publish does.
    write_clip(own["redacted"] / "DCIM" / ".x.mp4.tmp").rename(own["redacted"] / "DCIM" / "x.mp4")
    source = write_clip(watch_dir / "DCIM" / "x.mp4")
    h.see(source)
    h.settle()
    assert h.enqueued_paths == [source]


# -- with the real probe -----------------------------------------------------------------------------


def test_real_probe_waits_for_the_moov_of_a_half_copied_mp4(make_harness, tmp_path: Path) -> None:
    media = pytest.importorskip("dashcamd.media")
    media_factory = pytest.importorskip("media_factory")
    (tmp_path / "card").mkdir()
    source = media_factory.make_clip(tmp_path / "card" / "clip.mp4", width=160, height=120, seconds=0.5,
                                     audio_streams=0)
    data = source.read_bytes()
    h = make_harness(probe=media.probe)
    target = h.watch_dir / "DCIM" / "20240501_120000_F.MP4"
    target.parent.mkdir()
    target.write_bytes(data[: len(data) // 2])  # the copy stalls half-way: no moov yet
    h.see(target)
    h.settle()
    assert h.enqueued == [] and h.invalid == [] and target.resolve() in h.watcher.pending
    with target.open("ab") as out:
        out.write(data[len(data) // 2 :])
    h.watcher.poll()
    h.settle()
    assert h.enqueued_paths == [target]


def test_dead_observer_is_restarted(make_harness) -> None:
    h = make_harness()
    h.watcher._observer.stop()
    h.watcher._observer.join()
    h.watcher.poll()
    target = write_clip(h.watch_dir / "a.mp4")
    h.see(target)
    h.settle()
    assert h.enqueued_paths == [target]
