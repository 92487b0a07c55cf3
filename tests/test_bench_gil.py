"""The interpreter-lock benchmark (bench/gil.py): py-spy's raw samples turned into lock-held ms a frame per
pipeline thread, counting the main thread only inside process_clip."""

from __future__ import annotations

import pytest

from tests.helpers import load_script

# py-spy --threads --format raw: "thread (id): name;frame;frame... count" (outermost frame first).
RAW = """\
thread (11): MainThread;<module> (gil.py:200);load_detector (dashcamd/pipeline.py:100) 50
thread (11): MainThread;<module> (gil.py:200);process_clip (dashcamd/pipeline.py:150);_run_stages (dashcamd/pipeline.py:292);TemporalFilter.push (dashcamd/track.py:196) 30
thread (11): MainThread 101;<module> (gil.py:200);process_clip (dashcamd/pipeline.py:150);_run_stages (dashcamd/pipeline.py:290) 10
thread (12): dashcamd-redact;_redact_frames (dashcamd/pipeline.py:350);region_alpha (dashcamd/redact.py:113);clip (numpy/_core/fromnumeric.py:2207) 40
thread (12): dashcamd-redact 1;_redact_frames (dashcamd/pipeline.py:350);Redactor._effect (dashcamd/redact.py:212) 20
thread (13): dashcamd-decode 12
thread (14): dashcamd-encode;_encode_frames (dashcamd/pipeline.py:380);ClipWriter.write (dashcamd/media.py:682) 8
thread (15): Thread-3;run (threading.py:1000) 99
"""


def test_samples_become_lock_held_ms_a_frame_per_thread(tmp_path):
    gil = load_script("bench/gil.py")
    raw = tmp_path / "samples.txt"
    raw.write_text(RAW)
    result = gil.lock_held_by_thread(raw, rate_hz=100.0, frames=10, top=2)
    # 100 samples a second over 10 frames: one sample is 1 ms a frame. Start-up and other threads do not count.
    assert result["ms_per_frame"] == {"decode": 12.0, "detect+track": 40.0, "encode": 8.0, "redact": 60.0}
    assert result["total_ms_per_frame"] == pytest.approx(120.0)
    assert result["top_lines"]["redact"] == [("region_alpha (dashcamd/redact.py:113)", 40.0),
                                             ("Redactor._effect (dashcamd/redact.py:212)", 20.0)]
    assert result["top_lines"]["decode"] == [("(no Python frame)", 12.0)]
