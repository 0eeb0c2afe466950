"""The Pipecat video service, driven with pipecat's own test runner (``pipecat.tests.utils.run_test``): TTS audio
frames in (24 kHz, as TTS services make them), TTS started/stopped, an interruption; out, per 25 fps frame, an image
and its 40 ms of voice, idle frames before the speech, the voice and a moving mouth while it plays, silence within
a frame or two of the interruption. Locally (an avatar engine on the tiny fixture weights) and against a running
server (slow); the pairing of the server's video and voice, and the service's frame handling on a scripted backend."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import pytest

pytest.importorskip("pipecat")

from pipecat.frames.frames import (  # noqa: E402
    InterruptionFrame,
    OutputImageRawFrame,
    SpeechOutputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.observers.base_observer import BaseObserver, FrameProcessed, FramePushed  # noqa: E402
from pipecat.pipeline.worker import PipelineParams  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402

from edtalk_live.integrations.pipecat import (  # noqa: E402
    AvatarBackend,
    AvatarFrame,
    EdTalkVideoService,
    FramePairing,
    VoiceChunker,
)

TTS_RATE = 24_000          # what TTS services send, and the pipeline's output rate here
PER_FRAME = TTS_RATE // 25


def _tts(speech: np.ndarray, seconds: float, offset: float = 0.0, chunk_s: float = 0.2) -> list[TTSAudioRawFrame]:
    """``seconds`` of the test speech at 24 kHz in TTS-sized frames (int16 mono)."""
    import av

    x = speech[int(offset * 16000): int((offset + seconds) * 16000)]
    frame = av.AudioFrame.from_ndarray((x * 32767).astype(np.int16)[None], format="s16", layout="mono")
    frame.sample_rate = 16000
    resampler = av.AudioResampler(format="s16", layout="mono", rate=TTS_RATE)
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in [*resampler.resample(frame), *resampler.resample(None)]])
    step = int(chunk_s * TTS_RATE)
    return [TTSAudioRawFrame(audio=pcm[k:k + step].tobytes(), sample_rate=TTS_RATE, num_channels=1)
            for k in range(0, len(pcm), step)]


class Watch(BaseObserver):
    """What the service processed and pushed, stamped with the pipeline clock (seconds)."""

    def __init__(self, service):
        super().__init__()
        self.service = service
        self.pushed: list[tuple[float, object]] = []
        self.processed: list[tuple[float, object]] = []

    async def on_push_frame(self, data: FramePushed):
        if data.source is self.service:
            self.pushed.append((data.timestamp / 1e9, data.frame))

    async def on_process_frame(self, data: FrameProcessed):
        if data.processor is self.service:
            self.processed.append((data.timestamp / 1e9, data.frame))


@dataclass
class Run:
    images: list[tuple[float, OutputImageRawFrame]] = field(default_factory=list)
    voice: list[tuple[float, np.ndarray]] = field(default_factory=list)       # int16 [960] per frame
    order_ok: bool = True
    down: list = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    first_tts: float = 0.0         # the first TTS audio of each utterance reached the service (pipeline clock)
    second_tts: float = 0.0
    interrupted_at: float = 0.0

    def peak(self) -> np.ndarray:
        return np.array([np.abs(v.astype(np.int32)).max() for _, v in self.voice])

    def times(self) -> np.ndarray:
        return np.array([t for t, _ in self.images])

    def motion(self) -> np.ndarray:
        """Per frame, its mean change from the frame before, below the probe's rows (the head is still: what
        changes is the mouth; the tiny fixture networks move it little, but only while there is speech)."""
        out = [0.0]
        for (_, a), (_, b) in zip(self.images, self.images[1:], strict=False):
            w, h = b.size
            pa = np.frombuffer(a.image, np.uint8).reshape(h, w, 3)[h // 4:].astype(np.float32)
            pb = np.frombuffer(b.image, np.uint8).reshape(h, w, 3)[h // 4:].astype(np.float32)
            out.append(float(np.abs(pa - pb).mean()))
        return np.array(out)


async def _drive(service: EdTalkVideoService, speech: np.ndarray, idle_s: float = 0.8, first_s: float = 1.2,
                 cut_after: float = 0.8, tail_s: float = 0.8, start_timeout: float = 30.0) -> Run:
    """Idle, one utterance played to its end, a second one interrupted ``cut_after`` seconds after it was sent."""
    run = Run()
    service.add_event_handler("on_playback_finished", lambda _s, e: run.events.append(e))
    watch = Watch(service)
    frames = [SleepFrame(idle_s), TTSStartedFrame(), *_tts(speech, first_s), TTSStoppedFrame(),
              SleepFrame(first_s + 0.8), TTSStartedFrame(), *_tts(speech, 2.0, offset=3.0),
              SleepFrame(cut_after), InterruptionFrame(), SleepFrame(tail_s)]
    down, _ = await run_test(service, frames_to_send=frames, observers=[watch], start_timeout=start_timeout,
                             pipeline_params=PipelineParams(audio_out_sample_rate=TTS_RATE))
    run.down = down
    pending = None
    for t, f in watch.pushed:
        if isinstance(f, OutputImageRawFrame):
            run.order_ok &= pending is None
            pending = (t, f)
        elif isinstance(f, SpeechOutputAudioRawFrame):
            run.order_ok &= pending is not None and f.sample_rate == TTS_RATE and f.num_channels == 1
            run.images.append(pending)
            run.voice.append((t, np.frombuffer(f.audio, np.int16)))
            pending = None
        elif isinstance(f, InterruptionFrame):
            run.interrupted_at = t
    tts = [t for t, f in watch.processed if isinstance(f, TTSAudioRawFrame)]
    starts = [t for t, f in watch.processed if isinstance(f, TTSStartedFrame)]
    run.first_tts = min(t for t in tts if t >= starts[0])
    run.second_tts = min(t for t in tts if t >= starts[1])
    return run


def _check(run: Run, first_s: float, delay: float, report: dict, fps_range=(24.0, 26.0), lips: bool = True) -> None:
    """What every backend must do (see the module); ``report`` collects the measured numbers. ``lips``: check that
    the image changes with the speech (not through VP8: the tiny networks move the mouth less than its noise)."""
    assert run.order_ok, "each image is followed by its own 40 ms of voice at the pipeline's rate"
    assert not any(isinstance(f, TTSAudioRawFrame) for f in run.down), "the TTS audio itself is not passed on"
    assert not any(isinstance(f, TTSStoppedFrame) for f in run.down)
    assert any(isinstance(f, InterruptionFrame) for f in run.down), "the interruption is passed on"
    assert all(len(v) == PER_FRAME for _, v in run.voice)
    times, peak = run.times(), run.peak()
    fps = (len(times) - 1) / (times[-1] - times[0])
    report["fps"] = round(fps, 2)
    report["frames"] = len(times)
    report["gaps"] = np.round(np.diff(times)[np.diff(times) > 0.07], 3).tolist()
    assert fps_range[0] <= fps <= fps_range[1], report
    assert np.diff(times).max() < 0.3, "no stall"
    idle = peak[times < run.first_tts]
    assert len(idle) >= 10 and idle.max() < 200, "idle frames, silent, before the speech"
    voiced = np.flatnonzero(peak > 1000)
    first_voiced = times[voiced[0]]
    report["push_to_voice_ms"] = round((first_voiced - run.first_tts) * 1000)
    assert first_voiced - run.first_tts < delay + 0.3, "pushed speech is heard within the session's delay"
    finished = [e for e in run.events if not e["interrupted"]]
    assert finished and finished[0]["position"] == pytest.approx(first_s, abs=0.05), run.events
    cut = [e for e in run.events if e["interrupted"]]
    assert cut, run.events
    report["interrupted_position_s"] = cut[0]["position"]
    # the voice of the first utterance: loud for about its length; the lips move with it
    during = (times > first_voiced + 0.1) & (times < first_voiced + first_s - 0.1)
    assert (peak[during] > 1000).mean() > 0.5
    motion = run.motion()
    still = motion[times < run.first_tts][1:].mean()
    report["motion_speech_idle"] = (round(motion[during].mean(), 3), round(still, 3))
    assert not lips or motion[during].mean() > 2 * still + 0.02, "the lips move"
    # the interruption: the second utterance was heard, then silence within a frame or two
    second = peak[(times > run.second_tts) & (times < run.interrupted_at)]
    assert (second > 1000).any(), "the second utterance played until the interruption"
    after = np.flatnonzero((times >= run.interrupted_at) & (peak > 1000))
    report["voiced_frames_after_interruption"] = len(after)
    quiet = times[(times >= run.interrupted_at) & (peak <= 1000)]
    report["interruption_to_silence_ms"] = round((quiet[0] - run.interrupted_at) * 1000) if len(quiet) else None
    assert len(after) <= 2 and times[after].max(initial=run.interrupted_at) - run.interrupted_at < 0.1


def _pairing_error_ms(run: Run, start: int, speech: np.ndarray) -> float:
    """How late the voice that came with the frames is, relative to them (ms): in probe mode each image shows its
    session frame ``i``, which shows the voice of session samples [640 i, 640 (i + 1)); the utterance starts at
    session sample ``start``. Found by cross-correlating its first 0.5 s with the voice from that frame on."""
    from edtalk_live.realtime.probe import read_index

    index = np.array([read_index(np.frombuffer(f.image, np.uint8).reshape(f.size[1], f.size[0], 3))
                      for _, f in run.images])
    k = int(np.flatnonzero(index == start // 640)[0])            # the emitted frame where the utterance starts
    voice = np.concatenate([v for _, v in run.voice]).astype(np.float32)
    ref = np.concatenate([np.frombuffer(f.audio, np.int16) for f in _tts(speech, 0.6)]).astype(np.float32)
    lags = np.arange(-PER_FRAME, PER_FRAME + 1)
    window = ref[: TTS_RATE // 2]
    base = k * PER_FRAME
    score = [np.dot(voice[base + lag: base + lag + len(window)], window) for lag in lags]
    return round(float(lags[int(np.argmax(score))]) / TTS_RATE * 1000, 1)


class Starts:
    """Where each utterance starts on the session clock (16 kHz samples), from the session's speech queue."""

    def __init__(self, monkeypatch):
        from edtalk_live.realtime.speech import SpeechQueue

        self.starts: list[int] = []
        place = SpeechQueue.place

        def spy(queue, audio, earliest, horizon):
            before = [u.start for u in queue.utterances]
            placed = place(queue, audio, earliest, horizon)
            new = zip(queue.utterances, before, strict=False)
            self.starts.extend(u.start for u, b in new if b is None and u.start is not None)
            return placed

        monkeypatch.setattr(SpeechQueue, "place", spy)


# ------------------------------------------------------------------------------------------------ local


def test_local_service_speaks_in_sync_idles_and_stops_on_interruption(edtalk_weights, face_image, speech,
                                                                      monkeypatch):
    from edtalk_live.realtime.engine import AvatarEngine
    from edtalk_live.realtime.server import ServerSettings

    engine = AvatarEngine.build(edtalk_weights, face_image, settings=ServerSettings(max_sessions=2), align=False,
                                cache=False)
    engine.start()
    starts = Starts(monkeypatch).starts
    try:
        service = EdTalkVideoService(engine=engine, options={"pose": "still", "probe": True})
        run = asyncio.run(_drive(service, speech))
        delay = service.backend.stream.delay_s
        assert engine.streams == 0, "EndFrame closes the stream"
    finally:
        engine.stop()
    report: dict = {}
    _check(run, 1.2, delay, report)
    report["pairing_error_ms"] = _pairing_error_ms(run, starts[0], speech)
    print("local:", report)
    assert abs(report["pairing_error_ms"]) < 4, "each frame carries its own voice"


@pytest.mark.slow
def test_two_bots_share_one_engine(edtalk_weights, face_image, speech):
    """Two pipelines on one loop, each with its own service on the same engine: each hears its own utterance, to
    its end even when the pipeline ends (EndFrame) while it still plays."""
    from edtalk_live.realtime.engine import AvatarEngine
    from edtalk_live.realtime.server import ServerSettings

    engine = AvatarEngine.build(edtalk_weights, face_image, settings=ServerSettings(max_sessions=2), align=False,
                                cache=False)
    engine.start()

    async def bot(seconds: float, offset: float, wait: float):
        service = EdTalkVideoService(engine=engine, options={"pose": "still"})
        events: list[dict] = []
        service.add_event_handler("on_playback_finished", lambda _s, e: events.append(e))
        frames = [SleepFrame(0.3), *_tts(speech, seconds, offset), TTSStoppedFrame(), SleepFrame(wait)]
        down, _ = await run_test(service, frames_to_send=frames, start_timeout=30,
                                 pipeline_params=PipelineParams(audio_out_sample_rate=TTS_RATE))
        voice = [np.frombuffer(f.audio, np.int16) for f in down if isinstance(f, SpeechOutputAudioRawFrame)]
        return events, voice

    async def main():
        return await asyncio.gather(bot(0.6, 0.0, 1.4), bot(1.0, 3.0, 0.1))

    try:
        results = asyncio.run(main())
        assert engine.streams == 0
    finally:
        engine.stop()
    for (events, voice), (seconds, offset) in zip(results, ((0.6, 0.0), (1.0, 3.0)), strict=True):
        assert [e["position"] for e in events] == [pytest.approx(seconds, abs=0.05)], events
        loud = sum(int(np.abs(v.astype(np.int32)).max() > 1000) for v in voice)
        # as many loud 40 ms frames as the bot's own utterance has (8 and 14 of them: the two differ by 6)
        source = speech[int(offset * 16000): int((offset + seconds) * 16000)] * 32767
        want = int((np.abs(source[: len(source) // 640 * 640].reshape(-1, 640)).max(axis=1) > 1000).sum())
        assert abs(loud - want) <= 3, (seconds, loud, want)


# ------------------------------------------------------------------------------------------------ remote


@pytest.mark.slow
def test_remote_service_pairs_the_server_s_video_with_its_voice(edtalk_weights, face_image, speech, monkeypatch):
    """Against a server in this process: a session in probe mode paints each frame's index, so the voice the
    service paired with a frame can be checked against where the server placed the speech on its clock."""
    from conftest import Running

    starts = Starts(monkeypatch).starts

    async def main():
        async with Running(edtalk_weights, face_image) as srv:
            service = EdTalkVideoService(server=srv.url, options={"pose": "still", "probe": True})
            run = await _drive(service, speech)
            await asyncio.sleep(0.3)
            return run, (service.backend.delay_ms or 0) / 1000, len(srv.server.peers), service.backend.pairing

    run, delay, left, pairing = asyncio.run(main())
    report: dict = {}
    _check(run, 1.2, delay, report, fps_range=(23.0, 27.0), lips=False)     # (WebRTC's receiver: some jitter)
    assert left == 0, "EndFrame ends the server's session"
    assert pairing.paired_by_reports > 0, "the RTCP sender reports paired video and voice"
    report["pairing_error_ms"] = _pairing_error_ms(run, starts[0], speech)
    print("remote:", report)
    assert abs(report["pairing_error_ms"]) < 4, "each frame carries its own voice"


# ------------------------------------------------------------------------------------------------ units


def test_voice_chunker_gives_exact_40_ms_pieces_of_continuous_voice():
    t = np.arange(16000 * 2) / 16000
    tone = (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
    for out_rate in (16000, 24000, 44100, 48000):
        chunker = VoiceChunker(16000, out_rate)
        pieces = [chunker.take(tone[k:k + 640]) for k in range(0, len(tone), 640)]
        assert {len(p) for p in pieces} == {out_rate // 25}
        out = np.concatenate(pieces).astype(np.float32)
        ref = 8000 * np.sin(2 * np.pi * 220 * np.arange(len(out)) / out_rate)
        lag = max(range(0, out_rate // 100), key=lambda d: float(np.dot(out[d + out_rate // 10:][:out_rate],
                                                                          ref[out_rate // 10:][:out_rate])))
        assert lag < out_rate * 0.003, f"{out_rate}: {lag} samples late"
        tail = out[out_rate // 10 + lag: out_rate + lag] - ref[out_rate // 10: out_rate]
        assert np.abs(tail).max() < 400, f"{out_rate}: a click or gap"
    with pytest.raises(ValueError, match="multiple of 25"):
        VoiceChunker(16000, 22_030)


def test_frame_pairing_places_each_frame_s_voice_by_the_sender_reports():
    """Two RTP streams whose timestamps start at random points (the video's wraps past 2^32), received from
    different frames on: the sender reports place them on the server's clock, and every frame gets exactly the
    voice sent with it; a frame without voice waits at most ``max_hold``, then goes with silence."""
    out: list[AvatarFrame] = []
    pairing = FramePairing(48_000, out.append, phase=0, send_lag=0)
    v0, a0, t0 = 4_294_960_000 - 3 * 3600, 123_456, 1000.0     # raw timestamps of session frame 0

    class Mapper:                               # aiortc's: received timestamps count from the first one received
        def __init__(self, origin):
            self._origin = origin

    pairing.video.mapper, pairing.audio.mapper = Mapper(v0 + 3 * 3600), Mapper(a0)
    for i in range(40):                         # frame i and its voice leave the server at t0 + i / 25
        now = t0 + i / 25 + 0.05
        if i >= 3:                              # the video arrives first; its first frames were lost
            pairing.add_video(3600 * (i - 3), np.full((4, 4, 3), i, np.uint8), now)
        for half in (0, 1):                     # frame i's voice: two 20 ms packets filled with i
            pairing.add_voice(1920 * i + 960 * half, np.full(960, i, np.int16), now + 0.01)
        if i == 10:                             # the reports (each a little late) name frames 10 and 9
            pairing.video.report(int((t0 + 10 / 25 + 0.004) * 2**32), (v0 + 3600 * 10) & 0xFFFFFFFF)
            pairing.audio.report(int((t0 + 9 / 25 + 0.001) * 2**32), a0 + 1920 * 9)
    assert pairing.paired_by_reports and pairing.offset == 3 * 1920 and len(out) >= 30
    late = [f for f in out if (f.voice == int(f.image[0, 0, 0])).mean() < 1]
    assert [int(f.image[0, 0, 0]) for f in late] == list(range(3, 3 + len(late))) and len(late) <= 8, \
        "before the reports, frames are paired as the streams started (here wrongly: the first video was lost)"
    # without voice a frame waits at most max_hold, then goes with silence
    pairing.add_video(3600 * 40, np.full((4, 4, 3), 99, np.uint8), t0 + 3)
    assert int(out[-1].image[0, 0, 0]) != 99
    pairing.drain(t0 + 3 + pairing.max_hold)
    assert int(out[-1].image[0, 0, 0]) == 99 and not out[-1].voice.any()


class ScriptedBackend(AvatarBackend):
    """A backend without a model: a frame every 40 ms whose image and voice say whether it speaks."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.speaking = 0.0                      # seconds of speech left
        self.closed = False
        self._events: asyncio.Queue = asyncio.Queue()
        self.rate = 0

    async def open(self, out_rate):
        self.rate = out_rate

    async def push(self, samples, rate):
        self.calls.append(("push", samples.dtype.name, samples.shape, rate))
        self.speaking += len(samples) / rate

    async def end(self):
        self.calls.append(("end",))

    async def clear(self):
        self.calls.append(("clear",))
        self.speaking = 0.0
        await self._events.put({"type": "playback_finished", "position": 0.1, "interrupted": True})

    async def frames(self):
        i = 0
        while not self.closed:
            await asyncio.sleep(0.04)
            loud = self.speaking > 0
            self.speaking = max(0.0, self.speaking - 0.04)
            yield AvatarFrame(i, np.full((8, 6, 3), 255 if loud else 0, np.uint8),
                              np.full(self.rate // 25, 5000 if loud else 0, np.int16))
            i += 1

    async def events(self):
        while not self.closed:
            yield await self._events.get()

    async def close(self):
        self.closed = True
        self.calls.append(("close",))


def test_service_frame_handling_on_a_scripted_backend():
    backend = ScriptedBackend()
    service = EdTalkVideoService(backend=backend)
    stereo = np.repeat((np.arange(2400) % 100).astype(np.int16), 2)

    async def main():
        watch = Watch(service)
        frames = [SleepFrame(0.2), TTSStartedFrame(),
                  TTSAudioRawFrame(audio=stereo.tobytes(), sample_rate=48000, num_channels=2),
                  TTSAudioRawFrame(audio=np.zeros(4800, np.int16).tobytes(), sample_rate=24000, num_channels=1),
                  TTSStoppedFrame(), SleepFrame(0.1), InterruptionFrame(), SleepFrame(0.3)]
        down, _ = await run_test(service, frames_to_send=frames, observers=[watch],
                                 pipeline_params=PipelineParams(audio_out_sample_rate=16000))
        return down

    down = asyncio.run(main())
    assert backend.calls[:4] == [("push", "int16", (2400,), 48000), ("push", "int16", (4800,), 24000), ("end",),
                                 ("clear",)]
    assert backend.calls[-1] == ("close",)
    images = [f for f in down if isinstance(f, OutputImageRawFrame)]
    audio = [f for f in down if isinstance(f, SpeechOutputAudioRawFrame)]
    assert len(images) == len(audio) >= 12
    assert images[0].size == (6, 8) and images[0].format == "RGB" and images[0].sync_with_audio
    assert {a.sample_rate for a in audio} == {16000} and {a.num_frames for a in audio} == {640}
    assert [type(f).__name__ for f in down if not isinstance(f, (OutputImageRawFrame, SpeechOutputAudioRawFrame))] \
        == ["TTSStartedFrame", "InterruptionFrame"]
    # after the interruption the backend's frames still speaking on their way are silenced
    i = next(k for k, f in enumerate(down) if isinstance(f, InterruptionFrame))
    assert all(not np.frombuffer(a.audio, np.int16).any() for a in down[i:] if isinstance(a, SpeechOutputAudioRawFrame))


def test_service_needs_exactly_one_backend():
    from edtalk_live.edtalk.errors import InputError

    with pytest.raises(InputError, match="one of engine="):
        EdTalkVideoService()
    with pytest.raises(InputError, match="got 2"):
        EdTalkVideoService(server="http://127.0.0.1:1", backend=ScriptedBackend())


def test_a_missing_pipecat_names_the_extra():
    import subprocess
    import sys

    code = ("import sys; sys.modules['pipecat'] = None\n"
            "try:\n    import edtalk_live.integrations.pipecat\n"
            "except ImportError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'edtalk-live[pipecat]'" in done.stdout, done.stdout + done.stderr[-2000:]


def test_remote_service_reports_a_server_it_cannot_reach():
    from pipecat.frames.frames import ErrorFrame

    service = EdTalkVideoService(server="http://127.0.0.1:9", connect_timeout=2)

    async def main():
        _, up = await run_test(service, frames_to_send=[SleepFrame(0.1)], start_timeout=10)
        return up

    up = asyncio.run(main())
    errors = [f for f in up if isinstance(f, ErrorFrame)]
    assert errors and "could not open" in errors[0].error and "127.0.0.1:9" in errors[0].error
