"""sd_notify wrapper: READY, STATUS, WATCHDOG and STOPPING; silent where systemd is absent."""

from __future__ import annotations

import os

import sdnotify


class SystemdNotifier:
    """Tells systemd how the service is doing. Every call is a no-op without ``NOTIFY_SOCKET``."""

    def __init__(self) -> None:
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self._enabled else None
        if self._notifier is not None and self._notifier.socket is not None:
            # A datagram socket blocks when the reader's queue is full; a slow reader must never stall
            # the main loop, so a message that does not fit is dropped (sdnotify swallows the error).
            self._notifier.socket.setblocking(False)
        self._last_status = ""

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half of systemd's WatchdogSec, as sd_watchdog_enabled(3) recommends; None when not asked."""
        usec = os.environ.get("WATCHDOG_USEC")
        if not self._enabled or not usec or not usec.isdigit():
            return None
        pid = os.environ.get("WATCHDOG_PID")
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None
        return int(usec) / 2e6

    def ready(self) -> None:
        self._send("READY=1")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)
