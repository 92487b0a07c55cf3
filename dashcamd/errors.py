"""Typed failures: the queue decides retry or quarantine from the type alone."""


class DashcamdError(Exception):
    """Base of dashcamd's own failures."""


class InvalidClip(DashcamdError):
    """The clip can never be processed (undecodable, no video stream): quarantine it, do not retry."""


class TransientError(DashcamdError):
    """A failure that may pass (disk full, source gone for a moment): retry later with back-off."""


class SourceChanged(TransientError):
    """The source's size or mtime changed while it was processed: it is a new job, not a failure."""
