"""Outgoing tracks pulled with recv() on a simulated clock: 25 fps pacing, pts, repeats, skips, A/V alignment."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from edtalk_live.realtime.tracks import (
    AUDIO_RATE,
    AUDIO_SAMPLES,
    TICKS_PER_FRAME,
    AvatarVideoTrack,
    DelayedVoiceTrack,
    SessionClock,
)


class SimClock(SessionClock):
    """Session clock whose sleep advances simulated time instantly."""

    def __init__(self, delay: float):
        self.t = 100.0
        super().__init__(delay, time_fn=lambda: self.t)

    async def sleep(self, seconds: float) -> None:
        self.t += seconds
        await asyncio.sleep(0)


def _img(v: int) -> np.ndarray:
    return np.full((8, 8, 3), v % 256, np.uint8)


def run(coro):
    return asyncio.run(coro)


def test_video_paced_at_25fps_from_the_session_clock():
    async def main():
        clock = SimClock(delay=0.2)
        track = AvatarVideoTrack(clock, lambda i: _img(i), _img(0))
        out = []
        for _ in range(100):
            f = await track.recv()
            out.append((f.pts, clock.now(), int(f.to_ndarray(format="rgb24")[0, 0, 0])))
        return out, track.stats

    out, stats = run(main())
    assert [p for p, _, _ in out] == [i * TICKS_PER_FRAME for i in range(100)]
    for i, (_, t, v) in enumerate(out):
        assert t == pytest.approx(i / 25 + 0.2, abs=1e-9)
        assert v == i
    assert stats.sent == 100 and stats.repeated == 0 and stats.skipped == 0


def test_missing_frames_repeat_the_last_good_one():
    async def main():
        clock = SimClock(delay=0.0)
        track = AvatarVideoTrack(clock, lambda i: _img(i) if i % 3 != 2 else None, _img(7))
        return [int((await track.recv()).to_ndarray(format="rgb24")[0, 0, 0]) for _ in range(6)], track.stats

    values, stats = run(main())
    assert values == [0, 1, 1, 3, 4, 4]
    assert stats.repeated == 2


def test_falling_behind_skips_ahead_and_keeps_lag_bounded():
    async def main():
        clock = SimClock(delay=0.0)
        track = AvatarVideoTrack(clock, lambda i: _img(i), _img(0))
        pts = []
        for k in range(50):
            pts.append((await track.recv()).pts)
            if k % 10 == 9 and k < 49:
                clock.t += 1.0          # the consumer stalls for a second
        lag = clock.now() - clock.video_due(pts[-1] // TICKS_PER_FRAME)
        return pts, track.stats, lag

    pts, stats, lag = run(main())
    assert all(b > a for a, b in zip(pts, pts[1:], strict=False)), "pts must increase"
    assert stats.skipped >= 4 * 23 - 1
    assert lag < 1 / 25


def test_exception_in_frame_source_sends_last_good_frame():
    def source(i):
        if i == 2:
            raise RuntimeError("boom")
        return _img(10 + i)

    async def main():
        clock = SimClock(delay=0.0)
        track = AvatarVideoTrack(clock, source, _img(0))
        return [int((await track.recv()).to_ndarray(format="rgb24")[0, 0, 0]) for _ in range(4)]

    assert run(main()) == [10, 11, 11, 13]


def test_voice_delayed_and_contiguous():
    voice = (np.arange(AUDIO_RATE * 2) % 30000).astype(np.int16)

    async def main():
        clock = SimClock(delay=0.25)
        track = DelayedVoiceTrack(clock, lambda start, n: voice[start:start + n])
        frames = []
        for _ in range(50):
            f = await track.recv()
            frames.append((f.pts, clock.now(), f.to_ndarray().reshape(-1)))
        return frames

    frames = run(main())
    for k, (pts, t, samples) in enumerate(frames):
        assert pts == k * AUDIO_SAMPLES
        assert t == pytest.approx(pts / AUDIO_RATE + 0.25, abs=1e-9)
        np.testing.assert_array_equal(samples, voice[pts:pts + AUDIO_SAMPLES])


def test_no_drift_between_lips_and_voice_over_a_long_session():
    """Ten simulated minutes: at every video frame, the voice being sent is the audio that frame was made from."""

    async def main():
        clock = SimClock(delay=0.3)
        video = AvatarVideoTrack(clock, lambda i: _img(i), _img(0))
        voice = DelayedVoiceTrack(clock, lambda start, n: np.zeros(n, np.int16))
        worst = 0.0
        next_audio = None
        for _ in range(25 * 600):
            f = await video.recv()
            while clock.audio_due(voice.next_sample) <= clock.now() + 1e-9:
                next_audio = await voice.recv()
            # media time of the voice now leaving vs media time the frame shows
            offset = (next_audio.pts / AUDIO_RATE) - f.pts / 90_000
            worst = max(worst, abs(offset))
        return worst

    assert run(main()) <= 1 / 25
