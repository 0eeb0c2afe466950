"""The avatar engine: the server's core on a thread of its own, streams opened and fed from other threads with
their own event loops (LiveKit jobs), sharing one frame scheduler; speech pushed, chunks and events read back."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture()
def engine(edtalk_weights, face_image):
    from edtalk_live.realtime.engine import AvatarEngine
    from edtalk_live.realtime.server import ServerSettings

    eng = AvatarEngine.build(edtalk_weights, face_image, settings=ServerSettings(max_sessions=2), align=False,
                             cache=False)
    eng.start()
    yield eng
    eng.stop()


def _job(engine, speech, out: dict, key: str) -> None:
    """What a LiveKit job thread does: its own loop, one stream, one utterance pushed in bursts."""
    async def main():
        stream = engine.open({"pose": "still"})
        chunks, events = [], []

        async def read_chunks():
            async for chunk in stream.chunks():
                chunks.append((time.monotonic(), chunk))

        async def read_events():
            async for event in stream.events():
                events.append((time.monotonic(), event))

        readers = [asyncio.ensure_future(read_chunks()), asyncio.ensure_future(read_events())]
        await asyncio.sleep(0.5)
        pcm = (speech[:16000] * 32767).astype(np.int16)
        pushed = time.monotonic()
        for k in range(0, len(pcm), 4000):
            stream.push(pcm[k:k + 4000], 16000)
        stream.end()
        while not any(e["type"] == "playback_finished" for _, e in events) and time.monotonic() - pushed < 8:
            await asyncio.sleep(0.05)
        load = engine.load()
        stream.close()
        await asyncio.wait_for(asyncio.gather(*readers), 10)
        out[key] = (pushed, chunks, events, load, stream.delay_s)

    asyncio.run(main())


def test_streams_from_two_job_threads_share_the_engine_and_play_their_speech(engine, speech):
    out: dict = {}
    jobs = [threading.Thread(target=_job, args=(engine, speech, out, k)) for k in ("a", "b")]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(60)
    assert set(out) == {"a", "b"}
    for pushed, chunks, events, load, delay in out.values():
        kinds = [e["type"] for _, e in events]
        assert kinds == ["playback_started", "playback_finished"], kinds
        assert events[0][0] - pushed < delay + 0.15
        assert events[1][1]["position"] == pytest.approx(1.0, abs=0.04) and not events[1][1]["interrupted"]
        times = np.asarray([t for t, _ in chunks])
        idx = [c.index for _, c in chunks]
        assert idx == list(range(idx[0], idx[0] + len(idx))), "every frame, in order"
        assert 23.5 <= (len(times) - 1) / (times[-1] - times[0]) <= 26.5
        voice = np.concatenate([c.voice for _, c in chunks])
        assert np.abs(voice).max() > 1000, "the pushed voice comes back with the frames"
        assert 0.0 < load <= 1.0
    assert engine.streams == 0, "closed streams end their sessions"


def test_engine_refuses_bad_input_and_calls_when_not_started(edtalk_weights, face_image, engine):
    from edtalk_live.edtalk.errors import EDTalkError, InputError
    from edtalk_live.realtime.engine import AvatarEngine

    stream = engine.open()
    with pytest.raises(InputError, match="mono"):
        stream.push(np.zeros((2, 10), np.int16), 16000)
    with pytest.raises(InputError, match="rate"):
        stream.push(np.zeros(10, np.int16), 10)
    with pytest.raises(InputError, match="unknown pose"):
        engine.open({"pose": "dance"})
    second = engine.open()
    with pytest.raises(EDTalkError, match="full"):
        engine.open()
    assert stream.control({"type": "stats"})["type"] == "stats"
    stream.close()
    second.close()
    with pytest.raises(EDTalkError, match="closed"):
        stream.end()
    idle = AvatarEngine(engine.server)
    with pytest.raises(EDTalkError, match="not started"):
        idle.open()
