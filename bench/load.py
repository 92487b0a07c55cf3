"""Load: a backlog of clips with junk among them, dropped at once on the real daemon, stopped halfway.

Issue "Nothing is ever lost". N short clips (default 300) and M junk files (default 2,000: empty and text
files named like clips, thumbnails, sidecars, hidden and temporary names, NAS junk folders) appear in the
watch folder at once. The daemon (`python -m dashcamd run`, its spawned worker, real SQLite) is stopped with
SIGTERM once half the clips are done and started again. Checked: every clip published exactly once (one
`done` row, one `clip_done` line across both runs, one output file), every junk file named like a clip
quarantined exactly once, everything else ignored (no row). Reported: wall time, clips/s, and the peak RSS
(VmHWM from /proc) of the main process and of the worker, each over both runs.

    python bench/load.py [--clips 300] [--junk 2000] [--seconds 1.0] [--work DIR] [--json OUT]

The detector runs with random weights and thresholds no score reaches: this measures the daemon's
machinery (watcher, queue, worker, publish) under a backlog, not detection speed (see bench/pipeline.py).
tests/test_load.py runs a small version in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import closing
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path[:0] = [str(REPO_ROOT)]  # this checkout's dashcamd and its test harness

from tests.daemon_harness import NO_DETECTIONS, DaemonProcess, make_random_weights, write_config  # noqa: E402
from tests.helpers import wait_for  # noqa: E402
from tests.media_factory import make_clip  # noqa: E402

CAMERA_FOLDERS = ("DCIM/Front", "DCIM/Rear", "Event", "Parking")
# Junk kinds, in turn: (relative name pattern, how the file is made, the outcome the daemon must give).
JUNK_KINDS = (
    ("{folder}/CLIP{n:05d}.THM", "bytes", "ignored"),  # thumbnail beside a clip
    ("{folder}/CLIP{n:05d}.LRV", "bytes", "ignored"),  # low-res preview: not a clip pattern
    ("{folder}/notes{n:05d}.txt", "text", "ignored"),
    ("{folder}/.CLIP{n:05d}.MP4", "bytes", "ignored"),  # hidden
    ("{folder}/._CLIP{n:05d}.MP4", "bytes", "ignored"),  # macOS AppleDouble
    ("{folder}/CLIP{n:05d}.MP4.part", "bytes", "ignored"),  # copy in progress
    ("@eaDir/CLIP{n:05d}.MP4/SYNOFILE_THUMB_M.jpg", "bytes", "ignored"),  # Synology thumbnails
    ("#recycle/CLIP{n:05d}.MP4", "bytes", "ignored"),
    ("{folder}/EMPTY{n:05d}.MP4", "empty", "quarantined"),  # a clip name, no data
    ("{folder}/TEXT{n:05d}.mp4", "text", "quarantined"),  # a clip name, not video
)
STOP_TIMEOUT_S = 120.0


def make_backlog(staging: Path, clips: int, junk: int, seconds: float) -> dict[str, str]:
    """Write the backlog under ``staging``; returns {relative path: expected outcome}."""
    template = make_clip(staging.parent / "template.mp4", width=160, height=96, seconds=seconds)
    expected = {}
    for n in range(clips):
        rel = f"{CAMERA_FOLDERS[n % len(CAMERA_FOLDERS)]}/CLIP{n:05d}.MP4"
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, staging / rel)
        expected[rel] = "done"
    for n in range(junk):
        pattern, content, outcome = JUNK_KINDS[n % len(JUNK_KINDS)]
        rel = pattern.format(folder=CAMERA_FOLDERS[n % len(CAMERA_FOLDERS)], n=n)
        path = staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "bytes":
            path.write_bytes(os.urandom(64))
        elif content == "text":
            path.write_text(f"junk {n}\n")
        else:
            path.write_bytes(b"")
        expected[rel] = outcome
    return expected


class RssSampler:
    """Samples VmRSS/VmHWM of the daemon's main process and of its worker (spawned children) from /proc."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self.peak_kb = {"main": 0, "worker": 0}
        self._pid: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, pid: int | None) -> None:
        self._pid = pid

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            pid = self._pid
            if pid is None:
                continue
            self._sample("main", pid)
            for child in _children(pid):
                if "resource_tracker" not in _cmdline(child):
                    self._sample("worker", child)

    def _sample(self, role: str, pid: int) -> None:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        for line in status.splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                self.peak_kb[role] = max(self.peak_kb[role], int(line.split()[1]))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _rows(state: Path) -> list[tuple[str, str]]:
    uri = f"{(state / 'queue.sqlite3').resolve().as_uri()}?mode=ro"
    if not (state / "queue.sqlite3").exists():
        return []
    with closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
        return db.execute("SELECT path, state FROM jobs").fetchall()


def run_load(work: Path, clips: int, junk: int, seconds: float = 1.0, timeout_s: float = 3600.0,
             weights: Path | None = None) -> dict:
    """Run the scenario under ``work`` (emptied first); returns the report. Raises AssertionError on a loss."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    weights = weights or make_random_weights(work / "random.pt")
    config = write_config(work, weights, paths={"quarantine": str(work / "quarantine")},
                          watch={"invalid_after_s": 1.0, "rescan_interval_s": 30.0},
                          worker={"retry_backoff_s": 0.5}, log={"level": "info"}, **NO_DETECTIONS)
    expected = make_backlog(work / "staging", clips, junk, seconds)
    watch = work / "import"
    sampler = RssSampler()
    started = time.monotonic()
    first = DaemonProcess(config, work / "first.log")
    try:
        sampler.watch(first.process.pid)
        first.wait_ready()
        # All at once: one rename of the whole tree, as a card mounted or a folder moved in would appear.
        os.rmdir(watch)
        os.rename(work / "staging", watch)
        wait_for(lambda: sum(state == "done" for _, state in _rows(work / "state")) >= clips // 2,
                 timeout_s, interval_s=0.1, what="half the clips done")
        first.process.send_signal(signal.SIGTERM)
        first_exit = first.process.wait(STOP_TIMEOUT_S)
    finally:
        first.kill()
    done_before_restart = sum(state == "done" for _, state in _rows(work / "state"))
    second = DaemonProcess(config, work / "second.log")
    try:
        sampler.watch(second.process.pid)
        second.wait_ready()
        clip_named_junk = sum(outcome == "quarantined" for outcome in expected.values())

        def finished() -> bool:
            states = Counter(state for _, state in _rows(work / "state"))
            return states["done"] >= clips and states["quarantined"] >= clip_named_junk

        wait_for(finished, timeout_s, interval_s=0.5, what="every clip done and junk quarantined")
        wall_s = time.monotonic() - started
        second_exit = second.stop(STOP_TIMEOUT_S)
    finally:
        second.kill()
        sampler.stop()

    # Exactly once, nothing lost.
    rows = _rows(work / "state")
    per_path = Counter(Path(path).relative_to(watch).as_posix() for path, _ in rows)
    states = {Path(path).relative_to(watch).as_posix(): state for path, state in rows}
    assert first_exit == 0 and second_exit == 0, (first_exit, second_exit)
    assert max(per_path.values()) == 1, [p for p, n in per_path.items() if n > 1][:10]
    for rel, outcome in expected.items():
        got = states.get(rel, "ignored")
        assert got == outcome, f"{rel}: {got}, expected {outcome}"
    done_lines = Counter(e["clip"] for d in (first, second) for e in d.events("clip_done"))
    assert len(done_lines) == clips and set(done_lines.values()) == {1}, "each clip published exactly once"
    outputs = [p for p in (work / "output").rglob("*") if p.is_file()]
    assert len(outputs) == clips and not [p for p in outputs if p.name.startswith(".")]
    assert len([p for p in (work / "quarantine").rglob("*") if p.is_file()]) == clip_named_junk
    return {
        "clips": clips,
        "junk_files": junk,
        "clip_seconds": seconds,
        "done_before_restart": done_before_restart,
        "wall_s": round(wall_s, 1),
        "clips_per_s": round(clips / wall_s, 2),
        "peak_rss_mb": {role: round(kb / 1024, 1) for role, kb in sampler.peak_kb.items()},
        "quarantined": clip_named_junk,
        "ignored": sum(outcome == "ignored" for outcome in expected.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=300)
    parser.add_argument("--junk", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=1.0, help="length of each clip (160x96, 30 fps)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="dashcamd-load-"))
    try:
        report = run_load(work / "run", args.clips, args.junk, args.seconds)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
