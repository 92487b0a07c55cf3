"""Typed detector failures: a bad weights file is a configuration problem, never a clip problem."""

from __future__ import annotations

from dashcamd.errors import DashcamdError


class DetectorError(DashcamdError):
    """Base of the detector's own failures."""


class ArchitectureError(DetectorError):
    """An architecture config names a layer or argument this builder does not know."""


class CheckpointError(DetectorError):
    """A weights file cannot be read or does not match the architecture it describes."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint references a global outside the allow-list; nothing from it was executed."""
