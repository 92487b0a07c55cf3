"""The load benchmark (bench/load.py) at CI size: 12 clips and 150 junk files dropped at once on the real
daemon, stopped with SIGTERM halfway and restarted. run_load asserts that every clip is published exactly
once, every junk file named like a clip is quarantined once and everything else is ignored."""

from __future__ import annotations

import pytest

from tests.daemon_harness import make_random_weights
from tests.helpers import load_script

pytestmark = pytest.mark.slow


def test_backlog_with_junk_survives_a_restart_and_is_processed_exactly_once(tmp_path):
    load = load_script("bench/load.py")
    weights = make_random_weights(tmp_path / "random.pt")
    report = load.run_load(tmp_path / "run", clips=12, junk=150, seconds=3.0, timeout_s=120.0, weights=weights)
    print(report)
    assert report["done_before_restart"] < 12, "the restart came while clips were still queued"
    assert report["quarantined"] == 30 and report["ignored"] == 120
    assert 0 < report["peak_rss_mb"]["main"] and 0 < report["peak_rss_mb"]["worker"]
