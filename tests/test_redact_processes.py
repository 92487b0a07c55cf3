"""Redaction in helper processes over shared frame slots: the same output as the redact thread, real
subprocesses, a full pool, a helper that dies, and no helper outliving its clip or its parent."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dashcamd import pipeline
from dashcamd.boxes import RedactBox
from dashcamd.config import RedactSettings, load_settings
from dashcamd.detect import Detection
from dashcamd.errors import TransientError
from dashcamd.media import ClipWriter
from dashcamd.pipeline import process_clip, redaction_process_count
from dashcamd.redact_processes import RedactionProcesses
from dashcamd.shared_frames import SharedFrames, supported
from tests.fault_helpers import pid_gone
from tests.helpers import ScriptedDetector, wait_for
from tests.media_factory import make_clip

pytestmark = pytest.mark.skipif(not supported(), reason="shared frames need Linux memfd")


def moving_boxes_detector() -> ScriptedDetector:
    """A plate drifting right and a face drifting down, a little further on each frame shown."""
    return ScriptedDetector(lambda n: [Detection(40 + 1.5 * n, 60, 120 + 1.5 * n, 100, "plate", 0.9),
                                       Detection(200, 30 + 0.75 * n, 250, 90 + 0.75 * n, "face", 0.8)])


def _settings(tmp_path: Path, processes: int):
    return load_settings(None, {
        "paths": {"watch": [str(tmp_path)], "output": str(tmp_path / "out"), "state": str(tmp_path / "s")},
        "redact": {"processes": processes},
    })


def _helper_pids() -> set[int]:
    """This process's children that run a redaction helper."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == os.getpid() and b"dashcamd.redact_processes" in command:
            pids.add(int(entry.name))
    return pids


@pytest.fixture
def clip(tmp_path):
    return make_clip(tmp_path / "in.mp4", width=321, height=241, seconds=1.0)  # odd sides: padded pictures


@pytest.fixture
def encoded(monkeypatch):
    """What the encoder is handed, one digest of the three planes a frame, per run (a list per ClipWriter).

    Pictures, not the output files, are compared: x264 may encode the same pictures differently from one run
    to the next (seen here with its frame threads), which says nothing about redaction.
    """
    runs: dict[Path, list[str]] = {}
    real_write = ClipWriter.write

    def recording_write(self, picture, pts):
        digest = hashlib.sha256()
        for plane in picture.planes():
            digest.update(np.ascontiguousarray(plane).tobytes())
        runs.setdefault(self.path, []).append(digest.hexdigest())
        return real_write(self, picture, pts)

    monkeypatch.setattr(ClipWriter, "write", recording_write)
    return runs


@pytest.fixture
def submitted(monkeypatch):
    """Counts the pictures sent to helpers, so a test knows the helpers did the work."""
    calls = []
    real_submit = RedactionProcesses.submit

    def counting_submit(self, slot, boxes):
        calls.append(slot)
        return real_submit(self, slot, boxes)

    monkeypatch.setattr(RedactionProcesses, "submit", counting_submit)
    return calls


def test_helpers_redact_exactly_as_the_redact_thread(tmp_path, clip, submitted, encoded):
    in_thread = process_clip(clip, tmp_path / "out" / "thread.mp4", _settings(tmp_path, 0), moving_boxes_detector())
    assert not submitted
    helped = process_clip(clip, tmp_path / "out" / "helped.mp4", _settings(tmp_path, 2), moving_boxes_detector())
    assert len(submitted) == helped.frames == in_thread.frames
    assert len(set(submitted)) > 2  # slots are reused, but more than one is in flight
    assert in_thread.cpu_ms_per_frame["helpers"] == 0 < helped.cpu_ms_per_frame["helpers"]
    thread_pictures, helped_pictures = encoded.values()
    assert len(thread_pictures) == helped.frames
    assert thread_pictures == helped_pictures
    assert not _helper_pids()


def test_when_the_slots_run_out_the_redact_thread_takes_over(tmp_path, clip, submitted, encoded, monkeypatch):
    class ThreeSlots(SharedFrames):
        def __init__(self, width, height, slots, **kwargs):
            super().__init__(width, height, 3, **kwargs)

    process_clip(clip, tmp_path / "out" / "thread.mp4", _settings(tmp_path, 0), moving_boxes_detector())
    monkeypatch.setattr(pipeline, "SharedFrames", ThreeSlots)
    report = process_clip(clip, tmp_path / "out" / "few.mp4", _settings(tmp_path, 1), moving_boxes_detector())
    assert 0 < len(submitted) < report.frames  # some frames in slots, the others private
    thread_pictures, few_slot_pictures = encoded.values()
    assert thread_pictures == few_slot_pictures


def test_a_helper_that_dies_fails_the_clip_as_transient_and_leaves_nothing(tmp_path, clip, monkeypatch):
    real_submit = RedactionProcesses.submit
    sent = []

    def submit_then_kill(self, slot, boxes):
        sent.append(slot)
        if len(sent) == 5:
            os.kill(self._helpers[0][0].pid, signal.SIGKILL)
        return real_submit(self, slot, boxes)

    monkeypatch.setattr(RedactionProcesses, "submit", submit_then_kill)
    output = tmp_path / "out" / "in.mp4"
    with pytest.raises(TransientError, match="redaction process exited"):
        process_clip(clip, output, _settings(tmp_path, 1), moving_boxes_detector())
    assert not output.exists()
    assert sorted(p.name for p in output.parent.iterdir()) == []  # no temp file either
    assert not _helper_pids()


def test_a_helper_that_cannot_redact_says_why():
    frames = SharedFrames(64, 48, 2)
    helpers = RedactionProcesses(RedactSettings(), "bt709", frames, 1)
    try:
        nowhere = RedactBox(float("nan"), 0.0, 10.0, 10.0, "plate", 0.9, "detected")
        helper = helpers.submit(frames.take().slot, [nowhere])
        with pytest.raises(RuntimeError, match="redaction process failed: ValueError: box with non-finite"):
            helpers.wait(helper, lambda: False)
    finally:
        helpers.close()
        frames.close()
    assert not _helper_pids()


def test_helpers_exit_when_their_parent_is_killed(tmp_path):
    script = textwrap.dedent("""
        import sys, time
        from dashcamd.config import RedactSettings
        from dashcamd.redact_processes import RedactionProcesses
        from dashcamd.shared_frames import SharedFrames
        helpers = RedactionProcesses(RedactSettings(), "bt709", SharedFrames(64, 48, 4), 2)
        print(" ".join(str(process.pid) for process, _ in helpers._helpers), flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    helper_pids = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(helper_pids) == 2
    parent.kill()
    parent.wait()
    wait_for(lambda: all(pid_gone(pid) for pid in helper_pids), timeout_s=10, what="helpers to exit")


def test_shared_slots_are_one_memory_across_processes():
    frames = SharedFrames(64, 48, 3)
    try:
        first, second = frames.take(), frames.take()
        assert (first.slot, second.slot) == (0, 1) and frames.free_slots == 1
        script = textwrap.dedent(f"""
            from dashcamd.shared_frames import SharedFrames
            frames = SharedFrames.attach({frames.fd}, 64, 48, 3)
            for plane in frames.picture(1).planes():
                plane[...] = 77
        """)
        subprocess.run([sys.executable, "-c", script], check=True, pass_fds=(frames.fd,),
                       cwd=Path(__file__).resolve().parent.parent)
        assert all((plane == 77).all() for plane in second.planes())
        frame = second.to_frame()  # copied out: the slot is free again, the frame keeps the pixels
        assert frames.free_slots == 2
        assert (frame.to_ndarray() == 77).all()
        assert frames.take().slot == 1  # the slot freed last is taken first
    finally:
        frames.close()


def test_auto_uses_helpers_only_on_many_cores(tmp_path, monkeypatch):
    settings = load_settings(None, {"paths": {"watch": [str(tmp_path)], "output": str(tmp_path / "o"),
                                              "state": str(tmp_path / "s")}})
    assert settings.redact.processes == "auto"
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert redaction_process_count(settings) == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert redaction_process_count(settings) == 2
    assert redaction_process_count(_settings(tmp_path, 3)) == 3


@pytest.mark.parametrize("value", [-1, 17, "many"])
def test_process_count_is_checked(value):
    with pytest.raises(ValueError):
        RedactSettings(processes=value)
