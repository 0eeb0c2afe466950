"""The capacity benchmark: its arithmetic on known snapshots, and one short real run against `serve`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edtalk_live.benchmarks.capacity import Level, format_table, read_metrics, summarise_level, summary

EXPOSITION = """
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total {cpu}
# TYPE edtalk_render_thread_cpu_seconds_total counter
edtalk_render_thread_cpu_seconds_total{{stage="render"}} {render}
edtalk_render_thread_cpu_seconds_total{{stage="lipsync"}} {lipsync}
edtalk_render_thread_cpu_seconds_total{{stage="other"}} 0.0
# TYPE edtalk_frames_sent_total counter
edtalk_frames_sent_total {sent}
# TYPE edtalk_frames_repeated_total counter
edtalk_frames_repeated_total {repeated}
# TYPE edtalk_frames_skipped_total counter
edtalk_frames_skipped_total 0.0
# TYPE edtalk_frames_rendered_total counter
edtalk_frames_rendered_total {sent}
# TYPE edtalk_render_batches_total counter
edtalk_render_batches_total {batches}
# TYPE edtalk_sessions gauge
edtalk_sessions 2.0
"""


def snap(at: float, **v):
    return read_metrics(EXPOSITION.format(**v), at)


def test_figures_come_from_the_difference_of_two_snapshots():
    level = Level("test", "onnxruntime", 2)
    level.a = snap(100.0, cpu=50.0, render=10.0, lipsync=5.0, sent=1000, repeated=3, batches=600)
    # 10 s, 2 sessions: 4 s of CPU = 200 ms per session-second; 500 frames = 25 fps each; 2 late of 500
    level.b = snap(110.0, cpu=54.0, render=11.0, lipsync=6.0, sent=1500, repeated=5, batches=850)
    level.sessions_up = 2
    row = summarise_level(level)
    assert row["cpu_ms_per_session_s"] == pytest.approx(200.0)
    assert row["cores"] == pytest.approx(0.4)
    assert row["render_ms_per_session_s"] == pytest.approx(50.0)
    assert row["lipsync_ms_per_session_s"] == pytest.approx(50.0)
    assert row["media_ms_per_session_s"] == pytest.approx(100.0)
    assert row["fps"] == pytest.approx(25.0)
    assert row["late_fraction"] == pytest.approx(2 / 500)
    assert row["mean_batch"] == pytest.approx(2.0)
    assert row["kept_up"] is True
    s = summary([row])[0]
    assert s["held_here"] == 2 and s["sessions_per_core"] == pytest.approx(5.0)
    assert "| test | onnxruntime | 2 | 200 |" in format_table([row])


def test_a_level_with_late_frames_or_missing_sessions_did_not_keep_up():
    level = Level("test", "torch", 2)
    level.a = snap(0.0, cpu=0.0, render=0.0, lipsync=0.0, sent=0, repeated=0, batches=0)
    level.b = snap(10.0, cpu=4.0, render=1.0, lipsync=1.0, sent=500, repeated=10, batches=250)
    level.sessions_up = 2
    assert summarise_level(level)["kept_up"] is False           # 2 % late
    level.b = snap(10.0, cpu=4.0, render=1.0, lipsync=1.0, sent=250, repeated=0, batches=250)
    level.sessions_up = 1
    assert summarise_level(level)["kept_up"] is False           # one of two sessions never came up
    assert summary([summarise_level(level)])[0]["held_here"] == 0


@pytest.mark.slow
def test_a_short_ramp_against_serve(tmp_path):
    out = tmp_path / "cap.json"
    proc = subprocess.run(
        [sys.executable, "-m", "edtalk_live.benchmarks.capacity", "--configs", "tiny", "--backends", "torch",
         "--sessions", "1", "--warmup", "1", "--window", "3", "--idle", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    assert "| config | backend | sessions | CPU / session-s (ms)" in proc.stdout
    data = json.loads(out.read_text())
    row = data["rows"][0]
    assert row["sessions_up"] == 1 and row["fps"] > 20
    assert 0 < row["cpu_ms_per_session_s"] < 2000
    assert data["idle_cores"]["tiny/torch"] < 0.2
