"""Shared by the fault, bad-input, fuzz and load tests: a detector gate injected into the real worker,
tmpfs mounts, notification timestamps, and read-only looks at the queue and the folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sqlite3
import subprocess
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tests.daemon_harness import DaemonProcess

# Test-only sitecustomize: the daemon's spawned worker imports it too (same environment). It wraps
# Detector.detect once dashcamd.detect.infer is imported, so the main process never loads torch.
_SITECUSTOMIZE = textwrap.dedent('''
    """Test-only: Detector.detect blocks while $FAULT_GATE_DIR/closed exists (tests/fault_helpers.py)."""
    import importlib.abc
    import importlib.util
    import os
    import sys
    import time
    from pathlib import Path

    _GATE = Path(os.environ["FAULT_GATE_DIR"])


    def _patch(module):
        original = module.Detector.detect

        def detect(self, frames_rgb, source_hw=None):
            if (_GATE / "closed").exists():
                (_GATE / f"entered-{os.getpid()}-{time.monotonic_ns()}").touch()
                while (_GATE / "closed").exists():
                    time.sleep(0.02)
            return original(self, frames_rgb, source_hw)

        module.Detector.detect = detect


    class _PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "dashcamd.detect.infer":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                _patch(module)

            spec.loader.exec_module = exec_module
            return spec


    sys.meta_path.insert(0, _PatchOnImport())
''')


class DetectorGate:
    """Holds the real worker inside ``Detector.detect`` while closed: a hang, or a pause to act mid-clip.

    Installed through PYTHONPATH for the daemons started after ``install``; nothing in dashcamd changes.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def install(cls, folder: Path, monkeypatch: pytest.MonkeyPatch) -> DetectorGate:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        monkeypatch.setenv("FAULT_GATE_DIR", str(folder))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
        return cls(folder)

    def close(self) -> None:
        for old in self.folder.glob("entered-*"):
            old.unlink()
        (self.folder / "closed").touch()

    def open(self) -> None:
        (self.folder / "closed").unlink(missing_ok=True)

    def entered(self) -> bool:
        """True once a worker is blocked in the gate (since the last close())."""
        return any(self.folder.glob("entered-*"))


class TimedDaemon(DaemonProcess):
    """DaemonProcess that also records when each sd_notify message arrived (wall clock, like the logs)."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.arrivals: list[tuple[float, str]] = []
        super().__init__(config, log_path)

    def _listen(self) -> None:
        while self._listening:
            try:
                lines = self.notify_socket.recv(4096).decode().splitlines()
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.time()
            self.arrivals.extend((now, line) for line in lines)
            self.notifications.extend(lines)

    def watchdog_times(self) -> list[float]:
        return [at for at, line in list(self.arrivals) if line == "WATCHDOG=1"]


def event_time(record: dict) -> float:
    """A log record's timestamp as seconds since the epoch."""
    return datetime.fromisoformat(record["timestamp"]).timestamp()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, hidden ones included, as paths relative to it."""
    if not folder.exists():
        return []
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def job_rows(state_dir: Path) -> list[dict]:
    """Every row of the daemon's queue (read-only; safe while it runs)."""
    uri = f"{(state_dir / 'queue.sqlite3').resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
        db.row_factory = sqlite3.Row
        return [dict(row) for row in db.execute("SELECT * FROM jobs ORDER BY id")]


def pid_gone(pid: int) -> bool:
    """True when the process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return "\nState:\tZ" in status


def drop(source: Path, destination: Path) -> Path:
    """Put a finished file into a watch folder in one step (rename), as a copy tool's final rename does."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, destination)
    return destination


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """Mount a small tmpfs (root only); skips the test where mounting is not allowed."""
    mount_point.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0755" + (",ro" if read_only else "")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode}); needs root")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def remount(mount_point: Path, read_only: bool) -> None:
    subprocess.run(["mount", "-o", "remount," + ("ro" if read_only else "rw"), str(mount_point)], check=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Write a ballast file so that about ``leave_bytes`` stay free on ``folder``'s file system."""
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    ballast = folder / "ballast.bin"
    with ballast.open("wb") as out:
        out.write(b"\0" * max(0, free - leave_bytes))
    return ballast


def make_flat_clip(path: Path, width: int, height: int, frames: int, fps: int = 30) -> Path:
    """A grey H.264 clip of any size, fast even at 8K (media_factory draws every pixel in numpy)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        stream.codec_context.time_base = Fraction(1, fps)
        planes = np.full((height * 3 // 2, width), 128, np.uint8)
        for index in range(frames):
            planes[: height // 8] = (index * 40) % 256  # frames differ: not all skipped by the encoder
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts, frame.time_base = index, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def video_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def mutate(data: bytes, rng: random.Random) -> bytes:
    """Damage a media file like bit rot, a bad copy or a hostile file would: 1-3 of bit flips, random byte
    runs, "interesting" 32-bit values (box sizes, sample counts, offsets), truncation, a chunk duplicated,
    deleted or inserted. Biased towards the first and last 4 KB, where the container headers live."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        n = len(buf)
        if n < 16:
            break

        def offset() -> int:
            region = rng.random()
            if region < 0.35:
                return rng.randrange(min(n, 4096))
            if region < 0.7:
                return rng.randrange(max(0, n - 4096), n)
            return rng.randrange(n)

        kind = rng.choice(["bits", "bytes", "int", "int", "truncate", "duplicate", "delete", "insert"])
        at = offset()
        if kind == "bits":
            for _ in range(rng.randint(1, 16)):
                buf[offset()] ^= 1 << rng.randrange(8)
        elif kind == "bytes":
            span = len(buf[at:at + rng.randint(1, 64)])
            buf[at:at + span] = rng.randbytes(span)
        elif kind == "int":
            at = min(at & ~3, n - 4)
            value = rng.choice([0, 1, 7, 8, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, n, n + 1, n // 2])
            buf[at:at + 4] = value.to_bytes(4, "big")
        elif kind == "truncate":
            del buf[at:]
        elif kind == "duplicate":
            chunk = buf[at:at + rng.randint(1, 2048)]
            where = rng.randrange(n)
            buf[where:where] = chunk
        elif kind == "delete":
            del buf[at:at + rng.randint(1, 2048)]
        else:
            buf[at:at] = rng.randbytes(rng.randint(1, 256))
    return bytes(buf)
