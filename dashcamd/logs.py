"""structlog set-up, done once in every process (the worker is spawned and starts blank)."""

from __future__ import annotations

import logging
import sys

import structlog

from dashcamd.config import LogSettings


def configure_logging(settings: LogSettings, process: str = "main") -> None:
    """JSON lines on stdout when not on a TTY (journald keeps them), a console renderer on a TTY.

    No ``cache_logger_on_first_use``: with spawned processes a cached logger would keep the parent's set-up.
    """
    use_json = settings.format == "json" or (settings.format == "auto" and not sys.stdout.isatty())
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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=False,
    )


def _add_process(process: str) -> structlog.types.Processor:
    def add_process(_logger: object, _method: str, event: dict) -> dict:
        event.setdefault("process", process)
        return event

    return add_process
