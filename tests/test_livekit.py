"""LiveKit Agents on the avatar engine, without a LiveKit server: the video generator (each frame with its 40 ms of
voice, the end of an utterance marked, an interruption), the runner publishing into a duck-typed room (local mode),
the real ``DataStreamAudioOutput`` talking to the real ``DataStreamAudioReceiver`` through in-process rooms (what
the agent hears back: full length, or interrupted where it was cut), the worker's job and its dispatch answers, and
the command line. One test needs a real LiveKit server (``LIVEKIT_URL``) and skips without one."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="needs the livekit extra: pip install 'edtalk-live[livekit]'")

from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import (  # noqa: E402
    AudioSegmentEnd,
    DataStreamAudioOutput,
    DataStreamAudioReceiver,
)
from livekit_loopback import LoopbackRoom, loopback_rooms  # noqa: E402

from edtalk_live.edtalk.errors import InputError  # noqa: E402
from edtalk_live.integrations.livekit_avatar import (  # noqa: E402
    AGENT_NAME,
    AvatarJob,
    EngineVideoGenerator,
    start_avatar_runner,
)

RATE = 16000


# ----------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def engine(edtalk_weights, face_image):
    from edtalk_live.realtime.engine import AvatarEngine
    from edtalk_live.realtime.server import ServerSettings

    eng = AvatarEngine.build(edtalk_weights, face_image, settings=ServerSettings(max_sessions=3), align=False,
                             cache=False)
    eng.start()
    yield eng
    eng.stop()


def _frames(speech: np.ndarray, seconds: float, rate: int = RATE, channels: int = 1, frame_ms: int = 100):
    """``seconds`` of the speech as int16 ``rtc.AudioFrame`` s at ``rate`` (resampled) with ``channels`` channels
    (copies), ``frame_ms`` each, as a TTS or the ``DataStreamAudioReceiver`` hands them over."""
    n = int(seconds * RATE)
    x = speech[:n]
    if rate != RATE:
        x = np.interp(np.arange(int(seconds * rate)) / rate, np.arange(n) / RATE, x)
    pcm = np.round(np.clip(x, -1, 1) * 32767).astype(np.int16)
    pcm = np.repeat(pcm[:, None], channels, axis=1)
    step = rate * frame_ms // 1000
    return [rtc.AudioFrame(pcm[k:k + step].tobytes(), rate, channels, len(pcm[k:k + step]))
            for k in range(0, len(pcm), step)]


class Reports:
    """An ``AudioReceiver``'s playback notifications, recorded with the time and the generator's output so far."""

    def __init__(self, items: list):
        self.items = items
        self.started: list[tuple[float, int]] = []
        self.finished: list[tuple[float, int, float, bool]] = []

    def notify_playback_started(self) -> None:
        self.started.append((time.monotonic(), len(self.items)))

    def notify_playback_finished(self, playback_position: float, interrupted: bool) -> None:
        self.finished.append((time.monotonic(), len(self.items), playback_position, interrupted))


class _AgentSession(rtc.EventEmitter):
    """What an avatar plugin uses of an ``AgentSession``: its audio output, and events."""

    def __init__(self):
        super().__init__()
        self.output = SimpleNamespace(audio=None)


async def _until(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------------------------------- no engine


def test_avatar_job_metadata_round_trips_and_names_what_is_wrong():
    job = AvatarJob(avatar_identity="edtalk-avatar-a", agent_identity="a", options={"emotion": "happy"})
    assert AvatarJob.from_json(job.to_json()) == job
    assert AvatarJob.from_json("") == AvatarJob()
    with pytest.raises(InputError, match="not JSON"):
        AvatarJob.from_json("{")
    with pytest.raises(InputError, match="options"):
        AvatarJob.from_json(json.dumps({"options": [1]}))
    with pytest.raises(InputError, match="agent_identity"):
        AvatarJob.from_json(json.dumps({"agent_identity": 3}))


def test_worker_settings_check_the_load_threshold_and_the_cli_shares_the_defaults(monkeypatch, capsys):
    from edtalk_live.clients.cli import build_parser, main
    from edtalk_live.integrations.livekit_worker import DEFAULT_HTTP_PORT, DEFAULT_LOAD_THRESHOLD, WorkerSettings

    with pytest.raises(InputError, match="load_threshold"):
        WorkerSettings(load_threshold=1.5)
    args = build_parser().parse_args(["livekit-worker"])
    assert (args.load_threshold, args.agent_name, args.http_port) == (DEFAULT_LOAD_THRESHOLD, AGENT_NAME,
                                                                      DEFAULT_HTTP_PORT)
    for env in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(env, raising=False)
    assert main(["livekit-worker", "--api-key", "k", "--api-secret", "s"]) == 1
    err = capsys.readouterr().err
    assert "--url" in err and "$LIVEKIT_URL" in err


def test_livekit_worker_without_the_extra_names_the_extra(monkeypatch, capsys):
    from edtalk_live.clients.cli import main

    for name in [m for m in sys.modules if m.startswith(("edtalk_live.integrations.livekit", "livekit"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "livekit", None)          # as if not installed
    assert main(["livekit-worker", "--url", "ws://x", "--api-key", "k", "--api-secret", "s"]) == 1
    assert "pip install 'edtalk-live[livekit]'" in capsys.readouterr().err
    with pytest.raises(ImportError, match=r"edtalk-live\[livekit\]"):
        import edtalk_live.integrations.livekit  # noqa: F401


# ----------------------------------------------------------------------------------------- the generator


@pytest.mark.slow
def test_generator_pairs_each_frame_with_its_voice_and_marks_the_end_of_the_utterance(engine, speech):
    items: list = []
    reports = Reports(items)

    async def main():
        stream = engine.open({"pose": "still"})
        gen = EngineVideoGenerator(stream, reports=reports)
        size = await gen.frame_size()

        async def read():
            async for item in gen:
                items.append((time.monotonic(), item))

        reader = asyncio.create_task(read())
        await asyncio.sleep(0.3)
        pushed = time.monotonic()
        for frame in _frames(speech, 1.0, rate=24000, channels=2):         # stereo 24 kHz TTS, downmixed
            await gen.push_audio(frame)
        await gen.push_audio(AudioSegmentEnd())
        await _until(lambda: reports.finished, 5, "playback_finished")
        await asyncio.sleep(0.2)
        skipped = stream.stats["frames_skipped"]     # frames the pacer jumped over, behind on a busy machine
        stream.close()
        await asyncio.wait_for(reader, 5)
        return size, pushed, gen.stats, stream.delay_s, skipped

    (width, height), pushed, stats, delay, skipped = asyncio.run(main())
    kinds = [type(item).__name__ for _, item in items]
    assert kinds.count("AudioSegmentEnd") == 1
    media = [item for _, item in items if not isinstance(item, AudioSegmentEnd)]
    assert [type(m).__name__ for m in media] == ["VideoFrame", "AudioFrame"] * (len(media) // 2), "frame, voice, ..."
    videos, voices = media[0::2], media[1::2]
    assert all((v.width, v.height, v.type) == (width, height, rtc.VideoBufferType.RGB24) for v in videos)
    assert all((a.sample_rate, a.num_channels, a.samples_per_channel) == (RATE, 1, 640) for a in voices)

    # the utterance: from the frame reported started to the end marker, 25 frames (1.0 s), voiced; silent around
    (t_start, i_start), = reports.started
    (_, i_end, position, interrupted), = reports.finished
    i_marker = kinds.index("AudioSegmentEnd")
    assert i_end == i_marker + 1, "reported finished after the end marker, which follows the utterance's last frame"
    utterance = [item for _, item in items[i_start:i_marker] if isinstance(item, rtc.AudioFrame)]
    assert 25 - skipped - 1 <= len(utterance) <= 26, (len(utterance), skipped)
    assert position == pytest.approx(1.0, abs=0.02) and not interrupted
    level = [np.abs(np.frombuffer(a.data, np.int16)).max() for a in utterance]
    assert np.median(level) > 1000, "the pushed voice is published with the frames"
    after = [item for _, item in items[i_marker + 3:] if isinstance(item, rtc.AudioFrame)]
    assert after and all(np.abs(np.frombuffer(a.data, np.int16)).max() == 0 for a in after), "silent after it"
    assert t_start - pushed < delay + 0.25, "heard about delay_s after it was pushed"

    times = np.asarray([t for t, item in items if isinstance(item, rtc.VideoFrame)])
    assert 23.5 <= (len(times) - 1) / (times[-1] - times[0]) <= 26.5
    assert stats.stale <= 1 and stats.utterances == 1 and stats.pushed_s == pytest.approx(1.0, abs=0.01)


@pytest.mark.slow
def test_generator_clear_interrupts_at_once_reports_the_position_and_the_next_utterance_plays(engine, speech):
    items: list = []
    reports = Reports(items)

    async def main():
        stream = engine.open({"pose": "still"})
        gen = EngineVideoGenerator(stream, reports=reports)

        async def read():
            async for item in gen:
                items.append((time.monotonic(), item))

        reader = asyncio.create_task(read())
        for frame in _frames(speech, 3.0):
            await gen.push_audio(frame)
        await gen.push_audio(AudioSegmentEnd())
        await _until(lambda: reports.started, 3, "playback_started")
        await asyncio.sleep(0.5)
        cleared = time.monotonic()
        gen.clear_buffer()
        await _until(lambda: reports.finished, 2, "the interrupted playback_finished")
        await asyncio.sleep(0.3)
        for frame in _frames(speech[RATE:], 0.4):
            await gen.push_audio(frame)
        await gen.push_audio(AudioSegmentEnd())
        await _until(lambda: len(reports.finished) == 2, 3, "the next playback_finished")
        stream.close()
        await asyncio.wait_for(reader, 5)
        return cleared

    cleared = asyncio.run(main())
    (t_cut, i_cut, position, interrupted), (_, _, position2, interrupted2) = reports.finished
    assert interrupted and position == pytest.approx(0.5, abs=0.1), position
    assert t_cut - cleared < 0.25, "reported at once"
    assert not interrupted2 and position2 == pytest.approx(0.4, abs=0.02)
    assert [type(item).__name__ for _, item in items].count("AudioSegmentEnd") == 1, "only the utterance that ended"
    i_next = reports.started[1][1]
    cut = [item for _, item in items[i_cut + 4:i_next] if isinstance(item, rtc.AudioFrame)]
    assert cut and all(np.abs(np.frombuffer(a.data, np.int16)).max() == 0 for a in cut), "the voice stops at once"


# ----------------------------------------------------------------------------------------- the runner, local mode


@pytest.mark.slow
def test_local_avatar_session_publishes_the_avatar_and_reports_playback(engine, speech, monkeypatch):
    """Local mode: the agent's own room, an ``AvatarRunner`` publishing the engine's frames (a duck-typed room
    holds the tracks), the agent's audio output a ``QueueAudioOutput`` told by the engine what played."""
    from edtalk_live.integrations.livekit import AvatarSession

    captured: list[tuple[float, int, int]] = []
    capture = rtc.VideoSource.capture_frame

    def spy(self, frame, **kwargs):
        captured.append((time.monotonic(), frame.width, frame.height))
        return capture(self, frame, **kwargs)

    monkeypatch.setattr(rtc.VideoSource, "capture_frame", spy)
    events: list = []

    async def main():
        (room,) = loopback_rooms("agent-local")
        session = _AgentSession()
        avatar = AvatarSession.local(engine, pose="still")
        await avatar.start(session, room)
        audio = session.output.audio
        audio.on("playback_started", lambda ev: events.append((time.monotonic(), "started", ev)))
        audio.on("playback_finished", lambda ev: events.append((time.monotonic(), "finished", ev)))
        reply = await avatar.control({"type": "stats"})
        await asyncio.sleep(0.5)
        pushed = time.monotonic()
        for frame in _frames(speech, 1.0, frame_ms=20):
            await audio.capture_frame(frame)
        audio.flush()
        done = await asyncio.wait_for(audio.wait_for_playout(), 5)
        await asyncio.sleep(0.2)
        publications = list(room.local_participant.track_publications.values())
        stats = avatar.generator.stats
        await avatar.aclose()
        return reply, pushed, done, publications, stats

    reply, pushed, done, publications, stats = asyncio.run(main())
    assert reply["type"] == "stats"
    assert sorted(p.kind for p in publications) == sorted([rtc.TrackKind.KIND_AUDIO, rtc.TrackKind.KIND_VIDEO])
    assert done.playback_position == pytest.approx(1.0, abs=0.02) and not done.interrupted
    assert [kind for _, kind, _ in events] == ["started", "finished"]
    assert events[0][0] - pushed < 0.6, "playback starts about delay_s after the first audio"
    times = np.asarray([t for t, _, _ in captured])
    assert len(times) > 25 and 23.5 <= (len(times) - 1) / (times[-1] - times[0]) <= 26.5, "25 fps published"
    assert stats.stale <= 2 and stats.late_max_s < 0.15
    assert engine.streams == 0, "aclose ends the stream"


# ----------------------------------------------------------------------------------------- agent <-> avatar


@pytest.mark.slow
def test_datastream_output_hears_full_and_interrupted_playback_from_the_receiver(engine, speech):
    """The real ``DataStreamAudioOutput`` (agent) and ``DataStreamAudioReceiver`` (avatar) through in-process
    rooms: byte streams carry the TTS audio, RPCs the interruption and the playback reports."""
    events: list = []

    async def main():
        agent_room, avatar_room = loopback_rooms("agent-1", "edtalk-avatar-agent-1")
        output = DataStreamAudioOutput(agent_room, destination_identity="edtalk-avatar-agent-1",
                                       wait_playback_start=True)
        output.on("playback_started", lambda ev: events.append((time.monotonic(), "started", ev)))
        output.on("playback_finished", lambda ev: events.append((time.monotonic(), "finished", ev)))
        stream = engine.open({"pose": "still"})
        receiver = DataStreamAudioReceiver(avatar_room, sender_identity="agent-1")
        runner, gen = await start_avatar_runner(avatar_room, stream, receiver)
        try:
            await asyncio.sleep(0.3)
            first = time.monotonic()
            for frame in _frames(speech, 1.0, rate=24000, frame_ms=20):            # utterance 1: played out
                await output.capture_frame(frame)
            output.flush()
            full = await asyncio.wait_for(output.wait_for_playout(), 5)

            for frame in _frames(speech, 3.0, rate=24000, frame_ms=20):            # utterance 2: cut at 0.5 s
                await output.capture_frame(frame)
            output.flush()
            await _until(lambda: sum(kind == "started" for _, kind, _ in events) == 2, 3, "the 2nd start")
            await asyncio.sleep(0.5)
            cut_at = time.monotonic()
            output.clear_buffer()
            cut = await asyncio.wait_for(output.wait_for_playout(), 3)
            cut_reported = time.monotonic()

            for frame in _frames(speech[RATE:], 0.4, rate=24000, frame_ms=20):     # utterance 3: plays again
                await output.capture_frame(frame)
            output.flush()
            last = await asyncio.wait_for(output.wait_for_playout(), 5)
        finally:
            await runner.aclose()
            stream.close()
        return first, full, cut, cut_at, cut_reported, last, stream.delay_s, gen.stats

    first, full, cut, cut_at, cut_reported, last, delay, stats = asyncio.run(main())
    assert full.playback_position == pytest.approx(1.0, abs=0.02) and not full.interrupted
    assert cut.interrupted and cut.playback_position == pytest.approx(0.5, abs=0.1), cut
    assert cut_reported - cut_at < 0.3
    assert last.playback_position == pytest.approx(0.4, abs=0.02) and not last.interrupted
    assert [kind for _, kind, _ in events] == ["started", "finished"] * 3
    assert events[0][0] - first < delay + 0.3, "the agent hears that playback started about delay_s later"
    assert stats.utterances == 2 and stats.interrupted == 1 and stats.stale <= 2


# ----------------------------------------------------------------------------------------- the worker


class _Request:
    def __init__(self, metadata: str):
        self.job = SimpleNamespace(metadata=metadata, id="AJ_test")
        self.room = SimpleNamespace(name="room-1")
        self.answer = None

    async def accept(self, **kwargs):
        self.answer = ("accept", kwargs)

    async def reject(self, *, terminate: bool = True):
        self.answer = ("reject", terminate)


@pytest.mark.slow
def test_worker_accepts_as_the_avatar_on_behalf_of_the_agent_and_declines_when_full(engine):
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

    from edtalk_live.integrations.livekit_worker import accept_job, engine_load

    async def answer(metadata: str):
        request = _Request(metadata)
        await accept_job(request, engine=engine)
        return request.answer

    job = AvatarJob(avatar_identity="edtalk-avatar-agent-9", agent_identity="agent-9", avatar_name="Ava")
    kind, args = asyncio.run(answer(job.to_json()))
    assert kind == "accept" and args == {"name": "Ava", "identity": "edtalk-avatar-agent-9",
                                         "attributes": {ATTRIBUTE_PUBLISH_ON_BEHALF: "agent-9"}}
    assert asyncio.run(answer("not json")) == ("reject", True)
    streams = [engine.open() for _ in range(engine.server.settings.max_sessions)]
    try:
        assert asyncio.run(answer(job.to_json())) == ("reject", False), "full: another worker takes the room"
        assert engine_load(engine) == 1.0
    finally:
        for s in streams:
            s.close()


@pytest.mark.slow
def test_worker_jobs_in_two_threads_play_for_their_agents_until_they_leave(engine, speech):
    """The job entrypoint as the worker runs it, a thread and a loop per room, two rooms at once on the one engine,
    in duck-typed job contexts: each joins on behalf of its agent, plays the agent's speech, answers its control
    RPC, and ends its stream when the agent leaves."""
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

    from edtalk_live.integrations.livekit_worker import avatar_job

    async def room(agent: str, seconds: float):
        avatar = f"{AGENT_NAME}-{agent}"
        agent_room, avatar_room = loopback_rooms(agent, avatar)
        shutdowns: list[str] = []

        async def connect(**_):
            return None

        ctx = SimpleNamespace(job=SimpleNamespace(metadata=AvatarJob(agent_identity=agent,
                                                                     options={"pose": "still"}).to_json()),
                              room=avatar_room, connect=connect, shutdown=shutdowns.append)
        job = asyncio.create_task(avatar_job(ctx, engine=engine))
        output = DataStreamAudioOutput(agent_room, destination_identity=avatar,
                                       wait_remote_track=rtc.TrackKind.KIND_VIDEO, wait_playback_start=True)
        for frame in _frames(speech, seconds, frame_ms=20):
            await output.capture_frame(frame)
        output.flush()
        done = await asyncio.wait_for(output.wait_for_playout(), 8)
        reply = await agent_room.local_participant.perform_rpc(
            destination_identity=avatar, method="edtalk.control", payload='{"type": "stats"}')
        await agent_room.disconnect()
        await asyncio.wait_for(job, 5)
        return done, avatar_room.local_participant.attributes, json.loads(reply), shutdowns

    out: dict = {}

    def thread(agent: str, seconds: float) -> None:
        out[agent] = asyncio.run(room(agent, seconds))

    threads = [threading.Thread(target=thread, args=args) for args in (("agent-2", 0.6), ("agent-3", 1.2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(out) == {"agent-2", "agent-3"}
    for agent, seconds in (("agent-2", 0.6), ("agent-3", 1.2)):
        done, attributes, reply, shutdowns = out[agent]
        assert done.playback_position == pytest.approx(seconds, abs=0.02) and not done.interrupted
        assert attributes[ATTRIBUTE_PUBLISH_ON_BEHALF] == agent
        assert reply["type"] == "stats"
        assert shutdowns == ["the agent left"]
    assert engine.streams == 0, "each job closed its stream"


@pytest.mark.slow
def test_avatar_session_dispatches_the_worker_and_routes_the_agents_audio_to_it(engine, speech, monkeypatch):
    """Remote mode end to end without a server: the plugin's dispatch (its metadata) goes to the worker's
    ``accept_job`` (the avatar's identity, on behalf of the agent) and ``avatar_job``, in in-process rooms; the
    agent's audio output is the plugin's ``DataStreamAudioOutput``, and the avatar's joining is seen."""
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF

    from edtalk_live.integrations.livekit import AvatarSession
    from edtalk_live.integrations.livekit_worker import accept_job, avatar_job

    async def main():
        (agent_room,) = loopback_rooms("agent-7", name="room-7")
        dispatched, jobs = [], []

        async def dispatch(self, room_name, job, url, key, secret):
            dispatched.append((room_name, job))
            request = _Request(job.to_json())
            await accept_job(request, engine=engine)
            _, accepted = request.answer
            avatar_room = LoopbackRoom(accepted["identity"], network=agent_room.network, name=room_name,
                                       attributes=accepted["attributes"])
            avatar_room.join()

            async def connect(**_):
                return None

            ctx = SimpleNamespace(job=SimpleNamespace(metadata=job.to_json()), room=avatar_room, connect=connect,
                                  shutdown=lambda reason: None)
            jobs.append(asyncio.create_task(avatar_job(ctx, engine=engine)))

        monkeypatch.setattr(AvatarSession, "_dispatch", dispatch)
        session = _AgentSession()
        avatar = AvatarSession(emotion="happy", pose="still")
        await avatar.start(session, agent_room)
        await avatar.wait_for_join(timeout=10)
        output = session.output.audio
        for frame in _frames(speech, 0.8, rate=24000, frame_ms=20):
            await output.capture_frame(frame)
        output.flush()
        done = await asyncio.wait_for(output.wait_for_playout(), 8)
        reply = await avatar.control({"type": "emotion", "name": "sad"})
        attributes = dict(agent_room.remote_participants[avatar.avatar_identity].attributes)
        await agent_room.disconnect()
        await asyncio.wait_for(jobs[0], 5)
        return dispatched, done, reply, attributes, avatar.avatar_identity, type(output).__name__

    dispatched, done, reply, attributes, identity, output = asyncio.run(main())
    ((room_name, job),) = dispatched
    assert room_name == "room-7" and identity == f"{AGENT_NAME}-agent-7" == job.avatar_identity
    assert job.agent_identity == "agent-7" and job.options == {"emotion": "happy", "pose": "still"}
    assert attributes[ATTRIBUTE_PUBLISH_ON_BEHALF] == "agent-7"
    assert output == "DataStreamAudioOutput"
    assert done.playback_position == pytest.approx(0.8, abs=0.02) and not done.interrupted
    assert reply["type"] == "ok"
    assert engine.streams == 0


def test_agent_server_runs_jobs_as_threads_with_the_engines_load():
    from livekit.agents import JobExecutorType

    from edtalk_live.integrations.livekit_worker import WorkerSettings, build_agent_server

    fake = SimpleNamespace(server=SimpleNamespace(settings=SimpleNamespace(max_sessions=4)), streams=1,
                           load=lambda: 0.1)
    server = build_agent_server(fake, WorkerSettings(load_threshold=0.6, http_port=0))
    assert server._job_executor_type == JobExecutorType.THREAD
    assert server._agent_name == AGENT_NAME and server._load_threshold == 0.6
    assert server.load_fnc() == pytest.approx(0.25), "streams over the limit when above the render load"
    fake.load = lambda: 0.7
    assert server.load_fnc() == pytest.approx(0.7)


# ----------------------------------------------------------------------------------------- a real server


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LIVEKIT_URL"), reason="needs a LiveKit server: set LIVEKIT_URL, "
                    "LIVEKIT_API_KEY and LIVEKIT_API_SECRET")
def test_real_livekit_server_dispatches_the_worker_and_plays_an_utterance(engine, speech):
    from livekit import api

    from edtalk_live.integrations.livekit import AvatarSession
    from edtalk_live.integrations.livekit_worker import WorkerSettings, build_agent_server

    name = f"edtalk-test-{uuid.uuid4().hex[:8]}"

    async def main():
        server = build_agent_server(engine, WorkerSettings(agent_name=name, http_port=0))
        running = asyncio.create_task(server.run(devmode=True))
        room = rtc.Room()
        token = (api.AccessToken().with_identity("agent-test").with_kind("agent")
                 .with_grants(api.VideoGrants(room_join=True, room=name)).to_jwt())
        try:
            await asyncio.sleep(2)                         # registered
            await room.connect(os.environ["LIVEKIT_URL"], token)
            session = _AgentSession()
            avatar = AvatarSession(agent_name=name, pose="still")
            await avatar.start(session, room)
            await avatar.wait_for_join(timeout=30)
            output = session.output.audio
            for frame in _frames(speech, 1.0, frame_ms=20):
                await output.capture_frame(frame)
            output.flush()
            return await asyncio.wait_for(output.wait_for_playout(), 15)
        finally:
            await room.disconnect()
            await server.aclose()
            running.cancel()

    done = asyncio.run(main())
    assert done.playback_position == pytest.approx(1.0, abs=0.05) and not done.interrupted
