"""Soak (issue: reliability): sessions held for minutes at 25 fps with lips on the voice, no drift, a responsive
event loop and bounded buffers. CI runs 2 sessions x 3 minutes; ``benchmarks/soak.py`` runs 30 minutes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from edtalk_live.benchmarks.capacity import read_metrics
from edtalk_live.benchmarks.soak import (
    BUFFER_BOUNDS,
    FPS_TOLERANCE,
    MAX_DRIFT_MS_PER_MIN,
    MAX_FPS_DECAY,
    MAX_LOOP_LAG_P99_S,
    MAX_OFFSET_MS,
    histogram_quantile,
    server_window,
)
from edtalk_live.edtalk.timing import FPS
from edtalk_live.realtime.metrics import BufferSizes, EventLoopLag, MergedMetrics, ServerMetrics


def _exposition(metrics: ServerMetrics) -> str:
    return metrics.exposition()[0].decode()


def test_event_loop_lag_sees_a_blocked_loop_and_the_window_p99_reads_it():
    """The lag task records how late it wakes: a callback holding the loop 60 ms shows as one late wake-up, and
    the p99 of the window that held it (from two scrapes) lands in its bucket."""
    metrics = ServerMetrics(2, lambda: [])
    lag = EventLoopLag(metrics.registry, period=0.01)

    async def main():
        lag.start()
        await asyncio.sleep(0.1)
        a = read_metrics(_exposition(metrics), 0.0)
        time.sleep(0.06)                                  # a callback that holds the loop
        await asyncio.sleep(0.1)
        b = read_metrics(_exposition(metrics), 1.0)
        await lag.stop()
        return a, b

    a, b = asyncio.run(main())
    assert a.get("edtalk_event_loop_lag_seconds_count") >= 3
    assert b.get("edtalk_event_loop_lag_seconds_bucket", le="0.05") < b.get("edtalk_event_loop_lag_seconds_count")
    p99 = histogram_quantile(0.99, a, b, "edtalk_event_loop_lag_seconds")
    assert 0.05 <= p99 <= 0.075, p99
    assert server_window(a, b, 0.0)["loop_lag_p99_ms"] == pytest.approx(p99 * 1000)


def test_buffer_gauge_is_the_largest_over_sessions_and_over_workers():
    sizes = [{"frames": 3, "tasks": 5}, {"frames": 7, "tasks": 1}]
    metrics = ServerMetrics(2, lambda: [])
    metrics.registry.register(BufferSizes(lambda: sizes))
    one = read_metrics(_exposition(metrics), 0.0)
    assert one.get(BufferSizes.NAME, buffer="frames") == 7 and one.get(BufferSizes.NAME, buffer="tasks") == 5
    merged = MergedMetrics(4, 2)
    merged.update(0, _exposition(metrics))
    sizes[0]["tasks"] = 9
    merged.update(1, _exposition(metrics))
    both = read_metrics(merged.exposition()[0].decode(), 0.0)
    assert both.get(BufferSizes.NAME, buffer="frames") == 7 and both.get(BufferSizes.NAME, buffer="tasks") == 9


def test_late_audio_after_the_silence_fill_keeps_its_timestamp():
    """Incoming audio late by more than the jitter margin: the producer fills silence ahead, then the late packets
    come. Every later sample must still sit at its timestamp (the lips show the sample the voice plays at that
    place); written at the cursor instead, the speech moves later for good, and the soak's lips - voice steps."""
    import fractions

    import av
    import numpy as np

    from edtalk_live.realtime.audio_in import AudioInput

    def frame(pts: int) -> av.AudioFrame:
        f = av.AudioFrame.from_ndarray(np.full((1, 320), 1000, np.int16), format="s16", layout="mono")
        f.sample_rate, f.pts, f.time_base = 16000, pts, fractions.Fraction(1, 16000)
        return f

    audio = AudioInput(grid=640)
    for k in range(10):
        audio.push(frame(320 * k), arrival_pos=0)
    audio.fill_silence_until(audio.cursor + 200)      # the next packets are late: silence ran ahead
    for k in range(10, 20):
        audio.push(frame(320 * k), arrival_pos=0)
    assert audio.cursor == 320 * 20


@pytest.mark.slow
def test_two_sessions_hold_for_three_minutes(tmp_path, edtalk_weights, face_image):
    """2 sessions x 3 minutes (the benchmark's 30 minutes, short): in every 10 s window of each session 25 ± 1 fps
    delivered and on time, lips within 40 ms of the returned voice; drift <= 1 ms/min; the last 30 s as fast as the
    first; event-loop lag p99 <= 20 ms in every window of the server; every buffer within its bound."""
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "edtalk_live.benchmarks.soak", "--sessions", "2", "--minutes", "3",
           "--weights", str(edtalk_weights), "--avatar", str(face_image), "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads(out.read_text())
    # each figure checked here too, so a failure names it (the benchmark's verdict judges the same)
    for session, summary in zip(data["sessions"], data["summaries"], strict=True):
        assert len(session["windows"]) == 18, session["windows"]
        for w in session["windows"]:
            assert abs(w["fps"] - FPS) <= FPS_TOLERANCE and abs(w["fps_on_time"] - FPS) <= FPS_TOLERANCE, w
            assert w["av_measured"] >= FPS and abs(w["av_offset_ms_p50"]) <= MAX_OFFSET_MS, w
        assert abs(summary["drift_ms_per_min"]) <= MAX_DRIFT_MS_PER_MIN, summary
        assert summary["fps_first"] - summary["fps_last"] <= MAX_FPS_DECAY, summary
        for k, v in summary["buffers_max"].items():
            assert v <= BUFFER_BOUNDS[k], (k, summary["buffers_max"])
        assert set(summary["buffers_max"]) == set(BUFFER_BOUNDS), summary["buffers_max"]
    full = [w for w in data["server_windows"] if w["sessions"] == 2]
    assert len(full) >= 15, data["server_windows"]
    for w in full:
        assert w["loop_lag_samples"] >= 90 and w["loop_lag_p99_ms"] <= MAX_LOOP_LAG_P99_S * 1000, w
        assert all(v <= BUFFER_BOUNDS[k] for k, v in w["buffers"].items()), w
    assert run.returncode == 0 and not data["short_of_target"], data["short_of_target"]
