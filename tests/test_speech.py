"""Pushed speech (a bot's TTS instead of a microphone): queued as fast as it comes, placed on the session clock
as playout nears, played at 25 fps with the lips, playback events with positions, interrupts."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import edtalk_live.edtalk as edtalk
from edtalk_live.edtalk.errors import InputError
from edtalk_live.realtime.audio_in import AudioInput
from edtalk_live.realtime.sinks import MediaChunk, Sink
from edtalk_live.realtime.speech import MAX_QUEUED_S, SpeechQueue

RATE = 16_000


def _queue():
    events = []
    return SpeechQueue(on_event=events.append), events, AudioInput(grid=640)


def test_an_utterance_starts_on_a_frame_at_the_earliest_free_sample_and_reports_its_playback():
    q, events, audio = _queue()
    audio.fill_silence_until(1000)
    uid = q.push(np.full(8000, 0.5, np.float32))
    assert q.end() == uid and q.queued_s == pytest.approx(0.5)
    assert q.place(audio, earliest=1300, horizon=1_000_000)
    (utt,) = q.utterances
    assert utt.start == 1920 and utt.end == 1920 + 8000, "the first frame boundary after both cursor and earliest"
    np.testing.assert_array_equal(audio.read(1920, 8000), 0.5)
    np.testing.assert_array_equal(audio.read(1000, 920), 0.0)
    q.played(1920)
    assert events == []
    q.played(2560)
    assert events == [{"type": "playback_started", "utterance": uid}]
    q.played(1920 + 7999)
    assert len(events) == 1
    q.played(1920 + 8000)
    assert events[1] == {"type": "playback_finished", "utterance": uid, "position": 0.5, "interrupted": False}
    assert not q.active


def test_speech_is_placed_only_up_to_the_horizon_and_utterances_follow_each_other():
    q, events, audio = _queue()
    a = q.push(np.ones(RATE * 3, np.float32))
    q.end()
    b = q.push(np.ones(RATE, np.float32) * 0.25)           # a new utterance: the last one ended
    assert b == a + 1
    q.place(audio, earliest=0, horizon=RATE)
    assert audio.cursor == RATE and q.queued_s == pytest.approx(3.0)
    q.place(audio, earliest=0, horizon=10 * RATE)
    first, second = q.utterances
    assert (first.start, first.end) == (0, 3 * RATE)
    assert second.start == 3 * RATE and second.end is not None    # 48000 is a frame boundary
    q.played(3 * RATE)
    assert [e["type"] for e in events] == ["playback_started", "playback_finished"]
    assert events[1]["position"] == pytest.approx(3.0)
    q.played(3 * RATE + 640)
    assert events[-1] == {"type": "playback_started", "utterance": b}
    q.played(4 * RATE)
    assert len(events) == 3, "the second utterance never ended: no finish"


def test_clear_reports_the_position_reached_and_drops_everything_queued():
    q, events, audio = _queue()
    uid = q.push(np.ones(RATE * 2, np.float32))
    q.place(audio, earliest=640, horizon=RATE)
    q.played(640 + 8000)
    q.clear(640 + 8000)
    assert events[-1] == {"type": "playback_finished", "utterance": uid, "position": 0.5, "interrupted": True}
    assert not q.active and q.queued_s == 0
    assert q.push(np.ones(10, np.float32)) == uid + 1


def test_pushes_are_resampled_and_checked():
    q, _, audio = _queue()
    q.push((np.sin(np.arange(24_000) / 10) * 8000).astype(np.int16), rate=24_000)
    q.push(np.zeros(24_000, np.float32), rate=24_000)
    assert q.queued_s == pytest.approx(2.0, abs=0.02)
    with pytest.raises(InputError, match="mono"):
        q.push(np.zeros((2, 100), np.float32))
    with pytest.raises(InputError, match="rate"):
        q.push(np.zeros(100, np.float32), rate=1000)
    with pytest.raises(InputError, match="NaN"):
        q.push(np.full(100, np.nan, np.float32))
    with pytest.raises(InputError, match="queued"):
        q.push(np.zeros(int(MAX_QUEUED_S * RATE), np.float32))


class _Collect(Sink):
    kind = "test"

    def __init__(self):
        super().__init__()
        self.chunks: list[MediaChunk] = []

    def put(self, chunk):
        self.chunks.append(chunk)


@pytest.mark.slow
def test_a_session_plays_speech_pushed_faster_than_real_time_in_sync_and_stops_at_an_interrupt(
        edtalk_weights, face_image, speech):
    from edtalk_live.avatar.prepare import prepare_avatar, read_face
    from edtalk_live.engines import create_renderer
    from edtalk_live.media.weights import find_weights
    from edtalk_live.realtime.protocol import SessionOptions
    from edtalk_live.realtime.scheduler import FrameScheduler
    from edtalk_live.realtime.session import Session

    w = find_weights(edtalk_weights)
    renderer = create_renderer("torch", model=edtalk.load_model(w.gen, audio2lip=w.audio2lip), device="cpu")
    avatar = prepare_avatar(renderer, read_face(face_image, align=False, name="face"))
    utterance = speech[: 2 * RATE]

    async def run():
        loop = asyncio.get_running_loop()
        scheduler = FrameScheduler(renderer)
        await scheduler.start()
        session = Session("5" * 32, renderer, scheduler, avatar, SessionOptions(avatar="face", pose="still"), {},
                          render_budget=0.1)
        events = []
        session.speech_listeners.append(lambda e: events.append((loop.time(), e)))
        voiced = []
        render = session._render

        async def spy(f, generation):
            voiced.append((f.index, f.voiced))
            await render(f, generation)

        session._render = spy
        sink = _Collect()
        session.add_sink(sink)
        session.start()
        await asyncio.sleep(0.5)
        pushed_at = loop.time()
        uid = session.push_speech((utterance * 32767).astype(np.int16))    # all at once, as a TTS engine does
        session.end_speech()
        while not any(e["type"] == "playback_finished" for _, e in events) and loop.time() - pushed_at < 6:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        # a second utterance, cut after half a second
        second = session.push_speech(speech[2 * RATE: 4 * RATE])
        while not any(e.get("utterance") == second for _, e in events) and loop.time() - pushed_at < 10:
            await asyncio.sleep(0.01)
        started_2 = loop.time()
        await asyncio.sleep(0.5)
        session.clear_speech()
        cut_at = loop.time()
        await asyncio.sleep(0.6)
        await session.close()
        await scheduler.stop()
        return uid, second, events, sink.chunks, voiced, pushed_at, started_2, cut_at

    uid, second, events, chunks, voiced, pushed_at, started_2, cut_at = asyncio.run(run())
    kinds = [(e["type"], e["utterance"]) for _, e in events]
    assert kinds == [("playback_started", uid), ("playback_finished", uid), ("playback_started", second),
                     ("playback_finished", second)]
    t_start = events[0][0]
    assert t_start - pushed_at < 0.35, "pushed speech is heard within the session's delay"
    finished = events[1][1]
    assert finished["position"] == pytest.approx(2.0, abs=0.04) and not finished["interrupted"]
    assert events[1][0] - t_start == pytest.approx(2.0, abs=0.1), "played in real time"
    cut = events[3][1]
    assert cut["interrupted"] and cut["position"] == pytest.approx(0.5, abs=0.1)

    # one chunk per 40 ms; the voice handed out is the pushed speech, sample for sample, from a frame boundary
    idx = [c.index for c in chunks]
    assert idx == list(range(idx[0], idx[0] + len(idx)))
    voice = np.concatenate([c.voice for c in chunks]).astype(np.float32) / 32767
    start = int(np.flatnonzero(np.abs(voice) > 0)[0])
    start -= start % 640
    got = voice[start: start + len(utterance)]
    assert np.abs(got - utterance[: len(got)]).max() < 2 / 32767 + 1e-6
    # the lips: voiced frames while the utterance plays, none before (but the frames whose audio window reaches
    # into it: the look-ahead, 175 ms)
    first_frame = chunks[0].index + start // 640
    v = dict(voiced)
    speech_frames = range(first_frame, first_frame + 50)
    assert sum(v.get(i, False) for i in speech_frames) >= 0.5 * len(speech_frames)
    early = [i - first_frame for i in range(chunks[0].index, first_frame) if v.get(i, False)]
    assert all(i >= -5 for i in early), early
    # after the interrupt the voice stops at once and the mouth rests within a few frames
    cut_index = next(c.index for c in chunks if c.due >= cut_at)
    after = [c for c in chunks if c.index > cut_index + 1]
    assert after and all(not c.voice.any() for c in after)
    assert not any(v.get(c.index, False) for c in after if c.index > cut_index + 3)
