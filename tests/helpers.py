"""Test helpers shared by several tests: condition polling instead of sleeps, a fake clock, scripts as modules,
a detector double that answers by frame."""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float = 5.0, interval_s: float = 0.005, what: str = "") -> T:
    """Poll ``condition`` until it returns something truthy and return that; fail after ``timeout_s``.

    Tests wait for what they need, not for a guessed duration: fast when the machine is fast, still
    green when two cores are shared with other test runs.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")
        time.sleep(interval_s)


class FakeClock:
    """A monotonic clock the test moves by hand, for settle and back-off logic without waiting."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ScriptedDetector:
    """A detector double at the pipeline's seam: the n-th frame it is shown (from 0) gets ``answer(n)``, a list of
    Detections in the frame's own pixels (it asks for full-size frames). ``frames_seen`` counts the frames."""

    names = ["plate", "face"]
    device = "cpu"

    def __init__(self, answer: Callable[[int], list]) -> None:
        self._answer = answer
        self.frames_seen = 0

    def resized_size(self, frame_h: int, frame_w: int) -> None:
        return None

    def detect(self, frames_rgb, source_hw=None) -> list[list]:
        found = [self._answer(self.frames_seen + i) for i in range(len(frames_rgb))]
        self.frames_seen += len(frames_rgb)
        return found


def load_script(relative_path: str) -> ModuleType:
    """A script of the repository (``bench/pipeline.py``, ``tools/label_faces.py``: folders of scripts, not
    packages) as a module. It is registered in ``sys.modules`` first: dataclasses look their defining
    module up there."""
    path = Path(__file__).resolve().parent.parent / relative_path
    spec = importlib.util.spec_from_file_location(path.parent.name + "_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
