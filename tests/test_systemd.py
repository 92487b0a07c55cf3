"""The shipped unit passes `systemd-analyze verify` (where systemd-analyze exists) and asks for notify."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "dashcamd.service"


def test_unit_declares_notify_watchdog_and_hardening():
    text = UNIT.read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "ReadWritePaths=", "ProtectHome=yes", "PrivateTmp=yes",
                 "PrivateNetwork=yes", "User=dashcamd"):
        assert line in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path):
    # verify checks that ExecStart exists; the venv path only exists once installed, so point it at /bin/true.
    unit = tmp_path / "dashcamd.service"
    unit.write_text(UNIT.read_text().replace("/opt/dashcamd/.venv/bin/dashcamd", "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr and "Invalid" not in result.stderr
