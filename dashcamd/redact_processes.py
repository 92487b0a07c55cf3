"""Redaction in helper processes, so that its Python work stops holding the pipeline's interpreter lock.

Why: the pipeline's threads share one interpreter lock, and the time each holds it adds up across them. On
the 2-core machine redaction held it about half of the time they held it in all (3.3-3.6 of 6.1-7.0 ms a
1080p frame, without inference; bench/gil.py, README "Measured speed"): a many-core GPU host can go no
faster than that sum allows. Here the redact thread only sends each frame's slot number and boxes to a
helper, which redacts the picture in place in the shared slot (dashcamd.shared_frames) and answers.

Helpers are started per clip with the clip's frame size (``python -m dashcamd.redact_processes``: 0.3-0.45 s
to the first answer for 1-2 helpers on the 2-core machine, while the pipeline starts up) and stopped with it.
A helper ignores Ctrl-C (the pipeline stops it) and exits when its socket closes, so none outlives the
worker process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection

from dashcamd.boxes import RedactBox
from dashcamd.config import RedactSettings
from dashcamd.errors import TransientError
from dashcamd.shared_frames import SharedFrames

STOP_TIMEOUT_S = 5.0
POLL_S = 0.5


class RedactionProcesses:
    """``count`` helpers that redact pictures of ``frames``; each answers its frames in the order sent."""

    def __init__(self, settings: RedactSettings, color_matrix: str, frames: SharedFrames, count: int) -> None:
        self._helpers: list[tuple[subprocess.Popen, Connection]] = []
        self._next = 0
        config = json.dumps({"settings": settings.model_dump(mode="json"), "color_matrix": color_matrix,
                             "width": frames.width, "height": frames.height, "slots": frames.slots})
        try:
            for _ in range(count):
                ours, theirs = socket.socketpair()
                with theirs:
                    process = subprocess.Popen(
                        [sys.executable, "-m", "dashcamd.redact_processes", str(frames.fd), str(theirs.fileno()),
                         config],
                        pass_fds=(frames.fd, theirs.fileno()), stdin=subprocess.DEVNULL, env=_child_environment())
                self._helpers.append((process, Connection(ours.detach())))
        except BaseException:
            self.close()
            raise

    def submit(self, slot: int, boxes: Sequence[RedactBox]) -> int:
        """Send the picture in ``slot`` to the next helper in turn; returns the helper's number for ``wait``."""
        helper = self._next
        self._next = (self._next + 1) % len(self._helpers)
        process, connection = self._helpers[helper]
        try:
            connection.send((slot, list(boxes)))
        except OSError as gone:
            raise self._died(process) from gone
        return helper

    def wait(self, helper: int, stopping: Callable[[], bool]) -> bool:
        """Block until ``helper`` has redacted the oldest picture sent to it (True), or ``stopping()`` (False)."""
        process, connection = self._helpers[helper]
        while not connection.poll(POLL_S):
            if stopping():
                return False
            if process.poll() is not None:
                raise self._died(process)
        try:
            answer = connection.recv()
        except (EOFError, OSError) as gone:
            raise self._died(process) from gone
        if isinstance(answer, str):
            raise RuntimeError(f"redaction process failed: {answer}")
        return True

    @property
    def count(self) -> int:
        return len(self._helpers)

    def close(self) -> None:
        """Ask every helper to stop; kill any that has not within STOP_TIMEOUT_S."""
        for _, connection in self._helpers:
            try:
                connection.send(None)
            except OSError:
                pass  # already gone
            connection.close()
        for process, _ in self._helpers:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._helpers = []

    @staticmethod
    def _died(process: subprocess.Popen) -> TransientError:
        try:
            code = process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:  # its socket broke while it still ran
            process.kill()
            code = process.wait()
        return TransientError(f"a redaction process exited (code {code}) during the clip")


def _child_environment() -> dict[str, str]:
    """This environment, with the folder holding this dashcamd first on the import path (it need not be
    installed, e.g. when run from a checkout)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": here + (os.pathsep + path if path else "")}


def serve(frames_fd: int, socket_fd: int, config: dict) -> None:
    """A helper's life: redact the pictures the pipeline names until it says stop or goes away."""
    import cv2

    from dashcamd.redact import Redactor

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)  # as in the pipeline (dashcamd.pipeline.size_thread_pools)
    frames = SharedFrames.attach(frames_fd, config["width"], config["height"], config["slots"])
    redactor = Redactor(RedactSettings.model_validate(config["settings"]), config["color_matrix"])
    connection = Connection(socket_fd)
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        if message is None:
            return
        slot, boxes = message
        try:
            redactor.apply(frames.picture(slot), boxes)
        except Exception as error:  # noqa: BLE001 - reported to the pipeline, which fails the clip
            connection.send(f"{type(error).__name__}: {error}")
            return
        connection.send(slot)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))
