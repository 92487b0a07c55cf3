"""Runs the real daemon as a subprocess on temp folders, with a real AF_UNIX socket as NOTIFY_SOCKET."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from dashcamd.detect import build_model, save_checkpoint, yolov5_arch
from tests.helpers import wait_for

STARTUP_TIMEOUT_S = 90.0

# Config sections (for write_config) with thresholds no score reaches, nor weak ones for the tracker: random
# weights would otherwise "detect" hundreds of boxes per frame and make every clip ten times slower. For
# tests and benchmarks about faults and load, not about what gets redacted.
NO_DETECTIONS = {"detector.thresholds": {"plate": 1.0, "face": 1.0}, "redact": {"continue_threshold": 1.0}}


def make_random_weights(path: Path) -> Path:
    """A real dashcamd checkpoint with random weights: the true detector path, fast at a small size."""
    torch.manual_seed(0)
    model = build_model(yolov5_arch("n", nc=2), ["plate", "face"])
    save_checkpoint(model, path, {"purpose": "test: random weights"})
    return path


def write_config(root: Path, weights: Path, **sections: dict) -> Path:
    """A config for folders under ``root``; ``sections`` override/add keys, e.g. watch={"polling": True}."""
    values: dict[str, dict] = {
        "paths": {"watch": [str(root / "import")], "output": str(root / "output"), "state": str(root / "state")},
        "watch": {"settle_s": 0.5, "rescan_interval_s": 2.0},
        "detector": {"weights": str(weights), "device": "cpu", "inference_size": 128, "torch_threads": 1},
        "worker": {"heartbeat_timeout_s": 60.0, "retry_backoff_s": 0.5, "shutdown_timeout_s": 20.0},
        "log": {"format": "json", "level": "debug"},
    }
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    (root / "import").mkdir(parents=True, exist_ok=True)
    lines = []
    for section, keys in values.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in keys.items())
    config = root / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


class DaemonProcess:
    """`dashcamd run` in a subprocess; its JSON log lines and sd_notify messages are collected."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self.socket_path = log_path.with_suffix(".notify")
        self.socket_path.unlink(missing_ok=True)
        self.notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_socket.bind(str(self.socket_path))
        self.notify_socket.settimeout(0.2)
        self.notifications: list[str] = []
        self._listening = True
        # Read like systemd does, all the time: an unread datagram socket would fill up.
        self._listener = threading.Thread(target=self._listen, daemon=True)
        self._listener.start()
        env = dict(os.environ, NOTIFY_SOCKET=str(self.socket_path), WATCHDOG_USEC="2000000",
                   PYTHONUNBUFFERED="1")
        self._log_file = log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dashcamd", "run", "--config", str(config)],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
        )

    def _listen(self) -> None:
        while self._listening:
            try:
                self.notifications.extend(self.notify_socket.recv(4096).decode().splitlines())
            except TimeoutError:
                continue
            except OSError:
                return

    def received(self, message: str) -> bool:
        return any(line.startswith(message) for line in list(self.notifications))

    def wait_ready(self) -> None:
        wait_for(lambda: self.received("READY=1") or self.process.poll() is not None, STARTUP_TIMEOUT_S,
                 interval_s=0.05, what="READY=1")
        assert self.process.poll() is None, self.log_text()

    def events(self, name: str | None = None) -> list[dict]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or record.get("event") == name:
                records.append(record)
        return records

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        finally:
            self.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.close()

    def close(self) -> None:
        self._listening = False
        self._listener.join(5)
        self._log_file.close()
        self.notify_socket.close()
        self.socket_path.unlink(missing_ok=True)


def copy_slowly(source: Path, destination: Path, chunks: int = 4, pause_s: float = 0.3) -> None:
    """Copy like a slow SD card: the file exists, incomplete, for a while before it is whole."""
    data = source.read_bytes()
    step = len(data) // chunks + 1
    with destination.open("wb") as out:
        for start in range(0, len(data), step):
            out.write(data[start:start + step])
            out.flush()
            os.fsync(out.fileno())
            time.sleep(pause_s)
