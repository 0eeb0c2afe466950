"""Incoming audio placed by timestamps: resampling, gaps from lost packets, bounded ring, interrupt."""

from __future__ import annotations

import fractions

import av
import numpy as np

from edtalk_live.realtime.audio_in import RATE, AudioInput, SampleRing


def _frame(samples: np.ndarray, pts: int, rate: int, layout: str = "mono") -> av.AudioFrame:
    data = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
    if layout == "stereo":
        data = np.stack([data, data], axis=1).reshape(1, -1)      # packed s16: interleaved
    else:
        data = data.reshape(1, -1)
    f = av.AudioFrame.from_ndarray(data, format="s16", layout=layout)
    f.sample_rate = rate
    f.pts = pts
    f.time_base = fractions.Fraction(1, rate)
    return f


def _tone(n: int, rate: int, hz: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * hz * np.arange(n) / rate)).astype(np.float32)


def test_48k_stereo_is_resampled_and_contiguous():
    a = AudioInput()
    tone = _tone(48_000, 48_000)
    for k in range(50):                                  # 50 x 20 ms
        a.push(_frame(tone[k * 960:(k + 1) * 960], k * 960, 48_000, "stereo"), arrival_pos=0)
    assert abs(a.cursor - RATE) <= 64                     # ~1 s at 16 kHz (resampler delay aside)
    assert a.gap_samples == 0
    x = a.read(2000, 4000)
    assert np.abs(x).max() > 0.4                          # the tone is there


def test_lost_packets_leave_silence_at_the_right_place():
    """Frames 10..14 lost: later audio still lands at its timestamp, not 100 ms early."""
    a = AudioInput()
    tone = _tone(16_000, 16_000)
    for k in range(50):
        if 10 <= k < 15:
            continue
        a.push(_frame(tone[k * 320:(k + 1) * 320], k * 320, 16_000), arrival_pos=1000)
    assert a.gap_samples >= 5 * 320 - 160
    assert abs(a.cursor - (1000 + 50 * 320)) <= 64
    gap = a.read(1000 + 10 * 320 + 80, 5 * 320 - 160)
    assert np.abs(gap).max() == 0.0
    after = a.read(1000 + 20 * 320, 320)
    np.testing.assert_allclose(after, tone[20 * 320:21 * 320], atol=0.02)


def test_silence_fill_and_ring_bounds():
    a = AudioInput(capacity_s=1.0)
    a.fill_silence_until(5 * RATE)
    assert a.cursor == 5 * RATE
    assert a.ring.end - a.ring.start <= RATE
    np.testing.assert_array_equal(a.read(0, 100), np.zeros(100, np.float32))


def test_ring_write_read_wrap_and_clear():
    r = SampleRing(100)
    data = np.arange(250, dtype=np.float32)
    r.write(0, data)
    assert r.start == 150 and r.end == 250
    np.testing.assert_array_equal(r.read(140, 20), np.r_[np.zeros(10), data[150:160]])
    r.clear_from(200)
    assert r.end == 200
    np.testing.assert_array_equal(r.read(195, 10), np.r_[data[195:200], np.zeros(5)])
    r.write(300, np.ones(10, np.float32))                 # a gap after the end reads as silence
    np.testing.assert_array_equal(r.read(200, 100), np.zeros(100))
    np.testing.assert_array_equal(r.read(300, 10), np.ones(10))


def test_int16_voice_for_the_outgoing_track():
    a = AudioInput()
    a.push(_frame(np.full(320, 0.5, np.float32), 0, 16_000), arrival_pos=0)
    v = a.read_int16(100, 100)
    assert v.dtype == np.int16 and abs(int(v.mean()) - 16383) < 200
