"""structlog set-up, done once in every process (the worker is spawned and starts blank)."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from dashcamd.config import LogSettings


def configure_logging(settings: LogSettings, process: str = "main", stream: TextIO | None = None) -> None:
    """JSON lines when not on a TTY (journald keeps them), a console renderer on a TTY.

    ``stream`` defaults to stdout; commands whose stdout is data (``detect --json``) log to stderr.

    No ``cache_logger_on_first_use``: with spawned processes a cached logger would keep the parent's set-up.
    """
    stream = stream or sys.stdout
    use_json = settings.format == "json" or (settings.format == "auto" and not stream.isatty())
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_process(process),
            structlog.processors.format_exc_info if use_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, settings.level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def _add_process(process: str) -> structlog.types.Processor:
    def add_process(_logger: object, _method: str, event: dict) -> dict:
        event.setdefault("process", process)
        return event

    return add_process
