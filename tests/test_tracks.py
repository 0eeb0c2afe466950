"""The pacer and the WebRTC sink on a simulated clock: 25 fps pacing, pts, repeats, skips, A/V alignment, and sinks
that fall behind or fail without holding anything else up."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from edtalk_live.realtime.pacer import AUDIO_RATE, AUDIO_SAMPLES, TICKS_PER_FRAME, Pacer, SessionClock
from edtalk_live.realtime.sinks import DropOldest, MediaChunk, Sink, ThreadSink
from edtalk_live.realtime.tracks import WebRTCSink


class SimClock(SessionClock):
    """Session clock whose sleep advances simulated time instantly."""

    def __init__(self, delay: float):
        self.t = 100.0
        super().__init__(delay, time_fn=lambda: self.t)

    async def sleep(self, seconds: float) -> None:
        self.t += seconds
        await asyncio.sleep(0)


class ListSink(Sink):
    kind = "test"

    def __init__(self):
        super().__init__()
        self.chunks: list[MediaChunk] = []

    def put(self, chunk: MediaChunk) -> None:
        self.chunks.append(chunk)


def _img(v: int) -> np.ndarray:
    return np.full((8, 8, 3), v % 256, np.uint8)


def _voice(start: int, n: int) -> np.ndarray:
    return (np.arange(start, start + n) % 30000).astype(np.int16)


def run(coro):
    return asyncio.run(coro)


async def _pace(pacer: Pacer, frames: int, on_step=None) -> None:
    for k in range(frames):
        wait = pacer.clock.video_due(pacer.next_index) - pacer.clock.now()
        if wait > 0:
            await pacer.clock.sleep(wait)
        pacer.step()
        if on_step is not None:
            on_step(k)


def test_frames_and_voice_paced_at_25fps_from_the_session_clock():
    async def main():
        clock = SimClock(delay=0.2)
        pacer = Pacer(clock, _img, _voice, _img(0))
        sink = ListSink()
        pacer.sinks.append(sink)
        times = []
        await _pace(pacer, 100, on_step=lambda k: times.append(clock.now()))
        return sink.chunks, times, pacer.stats

    chunks, times, stats = run(main())
    assert [c.index for c in chunks] == list(range(100))
    for i, (c, t) in enumerate(zip(chunks, times, strict=True)):
        assert t == pytest.approx(i / 25 + 0.2, abs=1e-9)
        assert c.due == pytest.approx(100.0 + i / 25 + 0.2, abs=1e-9)
        assert int(c.image[0, 0, 0]) == i % 256
        np.testing.assert_array_equal(c.voice, _voice(640 * i, 640))
        assert c.media_time == pytest.approx(i / 25)
    assert stats.sent == 100 and stats.repeated == 0 and stats.skipped == 0


def test_missing_frames_repeat_the_last_good_one():
    async def main():
        pacer = Pacer(SimClock(delay=0.0), lambda i: _img(i) if i % 3 != 2 else None, _voice, _img(7))
        sink = ListSink()
        pacer.sinks.append(sink)
        await _pace(pacer, 6)
        return [int(c.image[0, 0, 0]) for c in sink.chunks], pacer.stats

    values, stats = run(main())
    assert values == [0, 1, 1, 3, 4, 4]
    assert stats.repeated == 2


def test_falling_far_behind_skips_ahead_and_keeps_lag_bounded():
    async def main():
        clock = SimClock(delay=0.0)
        pacer = Pacer(clock, _img, _voice, _img(0))
        sink = ListSink()
        pacer.sinks.append(sink)

        def stall(k):
            if k % 10 == 9 and k < 49:
                clock.t += 1.0          # the loop stalls for a second

        await _pace(pacer, 50, on_step=stall)
        lag = clock.now() - clock.video_due(sink.chunks[-1].index)
        return [c.index for c in sink.chunks], pacer.stats, lag

    idx, stats, lag = run(main())
    assert all(b > a for a, b in zip(idx, idx[1:], strict=False)), "indices must increase"
    assert stats.skipped >= 4 * 23 - 1
    assert lag < 1 / 25


def test_a_short_stall_hands_the_late_chunks_over_without_losing_voice():
    async def main():
        clock = SimClock(delay=0.0)
        pacer = Pacer(clock, _img, _voice, _img(0))
        sink = ListSink()
        pacer.sinks.append(sink)
        await _pace(pacer, 10, on_step=lambda k: setattr(clock, "t", clock.t + (0.15 if k == 4 else 0.0)))
        return [c.index for c in sink.chunks], pacer.stats

    idx, stats = run(main())
    assert idx == list(range(10)) and stats.skipped == 0


def test_exception_in_frame_source_sends_last_good_frame():
    def source(i):
        if i == 2:
            raise RuntimeError("boom")
        return _img(10 + i)

    async def main():
        pacer = Pacer(SimClock(delay=0.0), source, _voice, _img(0))
        sink = ListSink()
        pacer.sinks.append(sink)
        await _pace(pacer, 4)
        return [int(c.image[0, 0, 0]) for c in sink.chunks], [int(np.abs(c.voice).sum()) for c in sink.chunks]

    images, voices = run(main())
    assert images == [10, 11, 11, 13]
    assert voices[2] == 0 and voices[3] > 0


def test_a_failing_sink_loses_only_its_own_frames():
    class Broken(Sink):
        kind = "broken"

        def put(self, chunk):
            raise RuntimeError("boom")

    async def main():
        pacer = Pacer(SimClock(delay=0.0), _img, _voice, _img(0))
        good = ListSink()
        pacer.sinks += [Broken(), good]
        await _pace(pacer, 5)
        return len(good.chunks)

    assert run(main()) == 5


def test_webrtc_sink_sends_video_and_voice_in_20ms_frames_on_time():
    voice = (np.arange(AUDIO_RATE * 2) % 30000).astype(np.int16)

    async def main():
        loop = asyncio.get_running_loop()
        clock = SessionClock(0.05, time_fn=loop.time)
        offsets = []
        sink = WebRTCSink(on_av_offset=offsets.append)
        pacer = Pacer(clock, _img, lambda s, n: voice[s:s + n], _img(0))
        pacer.sinks.append(sink)
        task = asyncio.create_task(pacer.run())
        frames, audio = [], []

        async def pull_video():
            for _ in range(10):
                f = await sink.video.recv()
                frames.append((f.pts, loop.time() - clock.t0, int(f.to_ndarray(format="rgb24")[0, 0, 0])))

        async def pull_voice():
            for _ in range(20):
                f = await sink.voice.recv()
                audio.append((f.pts, loop.time() - clock.t0, f.to_ndarray().reshape(-1)))

        await asyncio.gather(pull_video(), pull_voice())
        task.cancel()
        await sink.stop()
        return frames, audio, offsets, sink.stats

    frames, audio, offsets, stats = run(main())
    assert [p for p, _, _ in frames] == [i * TICKS_PER_FRAME for i in range(10)]
    assert [v for _, _, v in frames] == list(range(10))
    for i, (_, t, _) in enumerate(frames):
        assert t == pytest.approx(i / 25 + 0.05, abs=0.015)
    for k, (pts, t, samples) in enumerate(audio):
        assert pts == k * AUDIO_SAMPLES
        assert t == pytest.approx(pts / AUDIO_RATE + 0.05, abs=0.015)
        np.testing.assert_array_equal(samples, voice[pts:pts + AUDIO_SAMPLES])
    assert stats.frames == 10
    assert offsets and max(abs(x) for x in offsets) < 15


def test_webrtc_sink_behind_drops_old_video_but_keeps_the_voice():
    async def main():
        sink = WebRTCSink(time_fn=lambda: 0.0)
        for i in range(6):                       # nobody pulls: the sender fell behind
            sink.put(MediaChunk(i, _img(i), _voice(640 * i, 640), due=0.0))
        video = [(await sink.video.recv()).pts // TICKS_PER_FRAME for _ in range(2)]
        voice = [(await sink.voice.recv()).pts for _ in range(12)]
        await sink.stop()
        return video, voice, sink.stats

    video, voice, stats = run(main())
    assert video == [4, 5], "only the newest frames are sent"
    assert voice == [k * AUDIO_SAMPLES for k in range(12)], "no voice is lost"
    assert stats.drops == 4


def test_no_drift_between_lips_and_voice_over_a_long_session():
    """Ten simulated minutes: every chunk's voice is the audio its frame was made from, and leaves with it."""

    async def main():
        clock = SimClock(delay=0.3)
        pacer = Pacer(clock, _img, _voice, _img(0))
        worst = 0.0
        for _ in range(25 * 600):
            wait = clock.video_due(pacer.next_index) - clock.now()
            if wait > 0:
                await clock.sleep(wait)
            c = pacer.step()
            worst = max(worst, abs((clock.now() - c.media_time) - (clock.audio_due(c.first_sample)
                                                                  - c.first_sample / AUDIO_RATE)))
            assert int(c.voice[0]) == c.first_sample % 30000
        return worst

    assert run(main()) <= 1e-6


def test_drop_oldest_never_waits_and_wakes_async_and_thread_takers():
    q = DropOldest(2)
    assert q.put(1) and q.put(2) and not q.put(3)
    assert [q.get_nowait(), q.get_nowait(), q.get_nowait()] == [2, 3, None]

    got = []
    t = threading.Thread(target=lambda: got.append(q.get_blocking(5.0)))
    t.start()
    time.sleep(0.05)
    q.put("x")
    t.join(5.0)
    assert got == ["x"]

    async def main():
        waiter = asyncio.create_task(q.get())
        await asyncio.sleep(0.01)
        threading.Thread(target=q.put, args=("from a thread",)).start()
        first = await asyncio.wait_for(waiter, 5.0)
        closer = asyncio.create_task(q.get())
        await asyncio.sleep(0.01)
        q.close()
        return first, await asyncio.wait_for(closer, 5.0)

    assert run(main()) == ("from a thread", None)


def test_thread_sink_reconnects_with_backoff_and_resumes_at_the_live_edge():
    class Flaky(ThreadSink):
        kind = "flaky"
        backoff = 0.02
        max_backoff = 0.05

        def __init__(self):
            super().__init__(capacity=3)
            self.opens = 0
            self.written: list[int] = []

        def open(self):
            self.opens += 1
            if self.opens == 2:
                raise ConnectionRefusedError("receiver down")

        def write(self, chunk):
            if chunk.index == 3 and 3 not in self.written:
                self.written.append(3)
                raise BrokenPipeError("receiver dropped the connection")
            self.written.append(chunk.index)

    async def main():
        sink = Flaky()
        sink.start()
        for i in range(20):
            sink.put(MediaChunk(i, _img(i), _voice(0, 640), due=0.0))
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        await sink.stop()
        return sink

    sink = run(main())
    assert sink.stats.reconnects == 1 and sink.stats.errors == 2
    assert sink.written[-1] == 19, "the sink caught up with the newest chunk"
    assert sink.stats.frames == len(sink.written) - 1
    assert not sink._thread.is_alive()


def test_a_stuck_sink_holds_up_neither_the_pacer_nor_the_other_sinks():
    """A sink whose receiver hangs (its write blocks) loses its own frames (counted); the pacer keeps its times."""
    from edtalk_live.realtime.metrics import ServerMetrics

    release = threading.Event()
    metrics = ServerMetrics(1, lambda: [])

    class Stuck(ThreadSink):
        kind = "rtmp"

        def write(self, chunk):
            release.wait(10.0)

    async def main():
        loop = asyncio.get_running_loop()
        clock = SessionClock(0.0, time_fn=loop.time)
        pacer = Pacer(clock, _img, _voice, _img(0))
        stuck, good = Stuck(capacity=5, on_count=metrics.sinks.count), ListSink()
        stuck.start()
        pacer.sinks += [stuck, good]
        times = []
        task = asyncio.create_task(pacer.run())
        while len(good.chunks) < 50:
            n = len(good.chunks)
            await asyncio.sleep(0.005)
            if len(good.chunks) > n:
                times.append(loop.time() - good.chunks[-1].due)
        task.cancel()
        release.set()
        await stuck.stop()
        return times, stuck.stats

    late, stats = run(main())
    assert np.percentile(late, 90) < 0.03, "chunks reach the other sink on time"
    assert stats.drops >= 40, "the stuck sink dropped its oldest chunks"
    body = metrics.exposition()[0].decode()
    assert f'edtalk_sink_drops_total{{kind="rtmp"}} {float(stats.drops)}' in body
    assert 'edtalk_sink_frames_total{kind="webrtc"} 0.0' in body
