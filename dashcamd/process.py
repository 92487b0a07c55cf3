"""`dashcamd process`: the daemon's pipeline run once, in this process, over files or folders."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import structlog

from dashcamd import publish
from dashcamd.config import Settings
from dashcamd.errors import DashcamdError
from dashcamd.pipeline import load_detector, process_clip

log = structlog.get_logger()


def process_inputs(settings: Settings, inputs: list[Path], output_root: Path, boxes_path: Path | None) -> int:
    """Process every clip found; returns 0 when all succeeded, 1 when any failed (each failure is logged)."""
    clips = list(_find_clips(inputs, settings.watch.patterns))
    if not clips:
        log.error("no_clips_found", inputs=[str(p) for p in inputs])
        return 1
    detector = load_detector(settings)
    log.info("detector_loaded", device=str(detector.device), weights=str(settings.detector.weights))
    failed = 0
    for source, root in clips:
        output = publish.output_path_for(source, root, output_root, settings.output.suffix)
        progress = _ProgressBar(source.name) if sys.stderr.isatty() else None
        try:
            report = process_clip(source, output, settings, detector, on_progress=progress, boxes_path=boxes_path)
        except DashcamdError as error:
            failed += 1
            log.error("clip_failed", clip=str(source), error=str(error), error_type=type(error).__name__)
        else:
            log.info("clip_done", clip=str(source), **report.as_fields())
        finally:
            if progress is not None:
                progress.close()
    return 1 if failed else 0


def _find_clips(inputs: list[Path], patterns: list[str]) -> Iterator[tuple[Path, Path]]:
    """(clip, the root its output sub-path is relative to). Hidden files and folders are skipped."""
    lowered = [p.lower() for p in patterns]
    for given in inputs:
        if given.is_file():
            yield given, given.parent
            continue
        for candidate in sorted(given.rglob("*")):
            relative = candidate.relative_to(given)
            if any(part.startswith(".") for part in relative.parts):
                continue
            if candidate.is_file() and any(fnmatch(candidate.name.lower(), p) for p in lowered):
                yield candidate, given


class _ProgressBar:
    """A one-line progress bar on stderr for a person at a terminal."""

    WIDTH = 30

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, frames_done: int, frames_total: int) -> None:
        fraction = min(1.0, frames_done / frames_total) if frames_total else 0.0
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        sys.stderr.write(f"\r{self._name} [{bar}] {frames_done}/{frames_total}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
