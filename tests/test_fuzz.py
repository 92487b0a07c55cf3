"""Fuzz: 300 damaged variants of valid MP4, MKV, MPEG-TS and AVI clips through probe and the whole pipeline
(decode, encode, verify, publish), each in a child process under a time and memory limit.

Every case must end as published or as a typed error (InvalidClip: quarantine; TransientError: retry). A
segfault or abort in FFmpeg, a hang, or any other exception fails the test with the case's seed; the case
file is kept under the test's tmp_path to reproduce it. A few mutated files also go through the running
daemon in tests/test_bad_input.py.
"""

from __future__ import annotations

import json
import queue
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fault_helpers import mutate
from tests.media_factory import make_clip

REPO_ROOT = Path(__file__).resolve().parent.parent
CASES = {".mp4": 150, ".mkv": 50, ".ts": 50, ".avi": 50}
SEED = 1312
CASE_TIMEOUT_S = 30.0  # a tiny clip takes well under a second; this is "hung", not "slow"
RESULT = "fuzz-result "
CHILD_MEMORY_BYTES = 4 << 30  # a header claiming a gigantic frame must fail cleanly, not eat the NAS's RAM


class _NullDetector:
    """The detector seam, empty: the fuzz is about the media layers."""

    names = ["plate", "face"]

    def resized_size(self, frame_h, frame_w):
        return None

    def detect(self, frames_rgb, source_hw=None):
        return [[] for _ in frames_rgb]


def _child_main() -> None:
    """Child: one case per stdin line (a path), one JSON outcome per stdout line."""
    import resource

    from dashcamd.config import LogSettings, Settings
    from dashcamd.errors import InvalidClip, TransientError
    from dashcamd.logs import configure_logging
    from dashcamd.pipeline import process_clip

    configure_logging(LogSettings(format="json", level="warning"), stream=sys.stderr)  # stdout is the channel
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY_BYTES, CHILD_MEMORY_BYTES))
    for line in sys.stdin:
        source = Path(line.rstrip("\n"))
        out_dir = source.parent / "out"
        settings = Settings(paths={"watch": [str(source.parent)], "output": str(out_dir), "state": str(out_dir)},
                            encoder={"preset": "ultrafast"})
        try:
            report = process_clip(source, out_dir / f"{source.stem}.mp4", settings, _NullDetector())
            outcome = {"outcome": "published", "frames": report.frames}
        except InvalidClip as invalid:
            outcome = {"outcome": "invalid", "error": str(invalid)[-200:]}
        except TransientError as transient:
            outcome = {"outcome": "transient", "error": str(transient)[-200:]}
        except Exception as unexpected:  # the finding: anything untyped is a bug to fix in media.py
            outcome = {"outcome": "unexpected", "error": f"{type(unexpected).__name__}: {unexpected}"[-300:]}
        leftovers = [p.name for p in out_dir.glob(".*")] if out_dir.exists() else []
        if leftovers:
            outcome = {"outcome": "unexpected", "error": f"temp files left behind: {leftovers}"}
        print(RESULT + json.dumps(outcome), flush=True)


class _Child:
    """A long-lived case runner (one interpreter start for hundreds of cases), replaced when it dies or hangs."""

    def __init__(self, stderr_path: Path) -> None:
        self._stderr = stderr_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.test_fuzz"], cwd=REPO_ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1,
        )
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith(RESULT):  # anything else a library prints is not ours
                self._lines.put(line.removeprefix(RESULT))
        self._lines.put(None)  # EOF: the child died

    def run(self, path: Path) -> dict:
        try:
            self.process.stdin.write(f"{path}\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # reported below as a crash
        try:
            line = self._lines.get(timeout=CASE_TIMEOUT_S)
        except queue.Empty:
            self.stop()
            return {"outcome": "hang", "error": f"no answer in {CASE_TIMEOUT_S} s"}
        if line is None:
            code = self.process.wait(10)
            return {"outcome": "crash", "error": f"child exited with {code}"}
        return json.loads(line)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._stderr.close()


def _seed_clip(folder: Path, suffix: str) -> bytes:
    codec = "mjpeg" if suffix == ".avi" else "h264"
    clip = make_clip(folder / f"seed{suffix}", width=160, height=96, seconds=0.3, codec=codec,
                     audio_streams=0 if suffix == ".avi" else 1)
    return clip.read_bytes()


@pytest.mark.slow
def test_mutated_clips_never_crash_hang_or_escape_the_error_types(tmp_path):
    started = time.monotonic()
    child = _Child(tmp_path / "child.stderr")
    outcomes: dict[str, dict[str, int]] = {}
    failures = []
    try:
        for suffix, count in CASES.items():
            seed = _seed_clip(tmp_path, suffix)
            for case in range(count):
                rng = random.Random(f"{suffix}-{SEED}-{case}")
                folder = tmp_path / f"{suffix[1:]}-{case:03d}"
                folder.mkdir()
                path = folder / f"case{suffix}"
                path.write_bytes(mutate(seed, rng))
                result = child.run(path)
                kind = result["outcome"]
                outcomes.setdefault(suffix, {}).setdefault(kind, 0)
                outcomes[suffix][kind] += 1
                if kind in ("hang", "crash", "unexpected"):
                    failures.append(f"{path} (random.Random('{suffix}-{SEED}-{case}')): {kind}: {result['error']}")
                    if kind != "unexpected":
                        child = _Child(tmp_path / "child.stderr")
                else:
                    for file in folder.rglob("*"):  # keep only what is needed to reproduce a failure
                        if file.is_file():
                            file.unlink()
    finally:
        child.stop()
    elapsed_s = time.monotonic() - started
    print(f"fuzz: {sum(CASES.values())} cases in {elapsed_s:.1f} s: {outcomes}")
    assert not failures, "\n".join(failures)
    for suffix, counts in outcomes.items():
        assert counts.get("published") and counts.get("invalid"), f"{suffix}: the mutations must hit both ways"


if __name__ == "__main__":
    _child_main()
