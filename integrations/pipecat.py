"""Pipecat: the avatar as a video service of a Pipecat pipeline.

:class:`EdTalkVideoService` takes the place of a hosted avatar service (Tavus, Simli, HeyGen) right after the TTS
service. It consumes the bot's :class:`TTSAudioRawFrame` audio (any rate, mono or stereo) instead of passing it on,
and emits, for every video frame at 25 fps, an :class:`OutputImageRawFrame` (RGB) followed by the frame's own 40 ms
of voice as a :class:`SpeechOutputAudioRawFrame` at the pipeline's output rate: the voice the lips show, in sync
with them. Between utterances it keeps emitting frames (idle head motion, a resting mouth, silence), so the output
transport sees one continuous stream, detects the bot speaking from the voice, and shows each image when the
audio before it has played (``sync_with_audio``). ``TTSStoppedFrame`` ends the utterance (and, as pipecat's
Tavus and Simli services do, is not passed on: the avatar's voice is still to come); an
:class:`InterruptionFrame` stops the avatar at once (queued speech dropped, the mouth closes) and silences voice
still on its way here, and is passed on, so the output transport drops what it holds, as pipecat expects.
``StartFrame`` opens the avatar (pipecat's ``setup`` connects it); ``EndFrame`` closes it once the speech pushed
so far has played, ``CancelFrame`` at once.

Two backends behind one small interface (:class:`AvatarBackend`):

- :class:`LocalAvatar`: a stream of an :class:`~edtalk_live.realtime.engine.AvatarEngine` in this process. One
  engine serves every bot of the process (its frames batched together on one device)::

      engine = AvatarEngine.build("weights", "photo.jpg"); engine.start()
      avatar = EdTalkVideoService(engine=engine, options={"emotion": "happy"})

- :class:`RemoteAvatar`: a session of a running ``edtalk-live serve`` (``server="http://gpu-box:8080"``), so bots
  on many machines share one GPU server: the speech goes up the session's pushed-speech WebSocket
  (:mod:`edtalk_live.realtime.pushsocket`) and the avatar and its voice come back over WebRTC. Video and voice
  arrive on separate RTP streams, each with its own clock; :class:`FramePairing` pairs every video frame with its
  own 40 ms of voice, to the sample, from how the server builds both streams of whole frames and its RTCP sender
  reports, which place both clocks on its wall clock.

pipecat is imported here at module level: ``pip install 'edtalk-live[pipecat]'``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import av
import numpy as np

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        InterruptionFrame,
        OutputImageRawFrame,
        SpeechOutputAudioRawFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessorSetup
    from pipecat.services.ai_service import AIService
    from pipecat.services.settings import ServiceSettings
except ModuleNotFoundError as e:        # pragma: no cover - the extra is in dev
    raise ImportError(f"the Pipecat integration needs pipecat-ai ({e.name} is missing): "
                      "pip install 'edtalk-live[pipecat]'") from e

from edtalk_live.edtalk.errors import EDTalkError, InputError
from edtalk_live.edtalk.timing import FPS, SAMPLE_RATE
from edtalk_live.realtime.client import each_frame

if TYPE_CHECKING:
    from edtalk_live.realtime.engine import AvatarEngine, AvatarStream

logger = logging.getLogger(__name__)

__all__ = ["AvatarBackend", "AvatarFrame", "EdTalkVideoService", "FramePairing", "LocalAvatar", "RemoteAvatar",
           "VoiceChunker"]

#: after an interruption, the voice of frames still on their way is silenced for at most this long (seconds)
MAX_MUTE_S = 1.0
#: a frame's voice counts as silent below this peak (int16): the resting voice after an interruption
SILENT_PEAK = 64
#: frames a reader may fall behind before the oldest are dropped (2 s)
FRAME_QUEUE = 2 * FPS


@dataclass(frozen=True)
class AvatarFrame:
    """One video frame of the avatar and its own voice: ``image`` uint8 RGB [H, W, 3]; ``voice`` int16 mono,
    40 ms at the rate the backend was opened with; ``index`` the frame's number (locally the session's frame index;
    from a server, a count of the frames received)."""

    index: int
    image: np.ndarray
    voice: np.ndarray


class AvatarBackend(ABC):
    """Where the avatar is made: pushed speech in, :class:`AvatarFrame` out at 25 fps (idle ones too), playback
    events (``playback_started``; ``playback_finished`` with ``position`` in seconds and ``interrupted``)."""

    @abstractmethod
    async def open(self, out_rate: int) -> None:
        """Start a session whose frames carry their voice at ``out_rate`` Hz."""

    @abstractmethod
    async def push(self, samples: np.ndarray, rate: int) -> None:
        """Queue mono int16 speech at ``rate`` Hz (the current utterance goes on); never waits for playback."""

    @abstractmethod
    async def end(self) -> None:
        """The current utterance is complete."""

    @abstractmethod
    async def clear(self) -> None:
        """Stop speaking now: queued speech dropped, the mouth closes."""

    @abstractmethod
    def frames(self) -> AsyncIterator[AvatarFrame]:
        """The frames, as they come, until the session ends."""

    @abstractmethod
    def events(self) -> AsyncIterator[dict[str, Any]]:
        """The playback events, as they come, until the session ends."""

    @abstractmethod
    async def close(self) -> None:
        """End the session (idempotent)."""


class VoiceChunker:
    """Voice at ``in_rate`` into exactly 40 ms pieces at ``out_rate`` (one per video frame).

    A stateful resampler (PyAV) keeps the voice continuous across frames; its first output is short by its
    filter delay, so a few milliseconds of silence lead the stream (a FIFO primed with 2 ms, topped up once);
    at the same rate the voice passes as it is.
    """

    def __init__(self, in_rate: int, out_rate: int):
        if out_rate % FPS:
            raise InputError(f"the output sample rate must be a multiple of {FPS} Hz (40 ms frames), got {out_rate}")
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self.size = self.out_rate // FPS
        self._resampler = (None if self.in_rate == self.out_rate else
                           av.AudioResampler(format="s16", layout="mono", rate=self.out_rate))
        self._fifo = np.zeros(0 if self._resampler is None else self.out_rate // 500, np.int16)

    def take(self, voice: np.ndarray) -> np.ndarray:
        """The next 40 ms at ``out_rate`` (int16 [size]) for ``voice`` (int16 mono, 40 ms at ``in_rate``)."""
        voice = np.ascontiguousarray(voice, dtype=np.int16)
        if self._resampler is None:
            out = voice
        else:
            frame = av.AudioFrame.from_ndarray(voice.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self.in_rate
            parts = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
            out = np.concatenate(parts) if parts else np.zeros(0, np.int16)
        fifo = np.concatenate([self._fifo, out])
        if len(fifo) < self.size:
            fifo = np.concatenate([np.zeros(self.size - len(fifo), np.int16), fifo])
        self._fifo = fifo[self.size:]
        return fifo[: self.size]


def to_mono_int16(audio: bytes, channels: int) -> np.ndarray:
    """16-bit PCM (interleaved when ``channels`` > 1) as int16 mono samples [N]."""
    x = np.frombuffer(audio[: len(audio) - len(audio) % (2 * max(channels, 1))], "<i2")
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1).round().astype(np.int16)
    return x


# ================================================================================================ local


class LocalAvatar(AvatarBackend):
    """A stream of an :class:`~edtalk_live.realtime.engine.AvatarEngine` in this process; the engine may serve many
    services (bots) at once. An engine not started yet is started here (start it once yourself when several bots
    start together)."""

    def __init__(self, engine: AvatarEngine, options: dict[str, Any] | None = None):
        self.engine = engine
        self.options = dict(options or {})
        self.stream: AvatarStream | None = None
        self._voice: VoiceChunker | None = None

    async def open(self, out_rate: int) -> None:
        self._voice = VoiceChunker(SAMPLE_RATE, out_rate)
        await asyncio.to_thread(self.engine.start)
        self.stream = await asyncio.to_thread(self.engine.open, self.options)
        logger.info("avatar stream %s open (delay %.0f ms)", self.stream.id[:8], self.stream.delay_s * 1000)

    def _open_stream(self) -> AvatarStream:
        if self.stream is None:
            raise EDTalkError("the avatar is not open")
        return self.stream

    async def push(self, samples: np.ndarray, rate: int) -> None:
        self._open_stream().push(samples, rate)

    async def end(self) -> None:
        self._open_stream().end()

    async def clear(self) -> None:
        self._open_stream().clear()

    async def frames(self) -> AsyncIterator[AvatarFrame]:
        stream, voice = self._open_stream(), self._voice
        async for chunk in stream.chunks():
            yield AvatarFrame(chunk.index, chunk.image, voice.take(chunk.voice))

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        async for event in self._open_stream().events():
            yield event

    async def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


# ================================================================================================ remote


class SenderClock:
    """A remote RTP sender's clock on its wall clock, from its RTCP sender reports: each says that the packet stamped
    ``rtp`` left at ``ntp``. aiortc hands frames over with timestamps counted from the first one received (its
    timestamp ``mapper``'s origin); :attr:`base` is when, by the latest report, the sender sent received timestamp
    0 (seconds on its wall clock): a frame stamped ``pts`` left at ``base + pts / rate``, give or take how late its
    sending was."""

    def __init__(self, rate: int, on_report: Callable[[], None] | None = None):
        self.rate = rate
        self.mapper = None
        self.base: float | None = None
        self.latest = 0                     # the newest received timestamp (to unwrap the reports' 32-bit ones)
        self.reports = 0
        self._on_report = on_report

    def report(self, ntp: int, rtp: int) -> None:
        origin = getattr(self.mapper, "_origin", None)
        if not isinstance(origin, int):
            return                          # nothing received yet: the report cannot be placed
        pts = self.latest + (((rtp - origin - self.latest) + 2**31) & 0xFFFFFFFF) - 2**31
        self.base = (ntp >> 32) + (ntp & 0xFFFFFFFF) / 2**32 - pts / self.rate
        self.reports += 1
        if self._on_report is not None:
            self._on_report()


def watch_sender_reports(pc, track, clock: SenderClock) -> bool:
    """Feed ``clock`` with the RTCP sender reports of ``track``'s sender on ``pc``. aiortc keeps neither the
    reports' RTP timestamps nor the origin of the timestamps it hands over where a caller can read them: the
    receiver's RTCP handler is wrapped and its (private) timestamp mapper read. Returns False, with a warning,
    when this aiortc has neither (frames are then paired as the streams started: right unless packets were lost
    at the start)."""
    from aiortc.rtp import RtcpSrPacket

    for transceiver in pc.getTransceivers():
        receiver = transceiver.receiver
        if receiver is None or receiver.track is not track:
            continue
        mapper = getattr(receiver, "_RTCRtpReceiver__timestamp_mapper", None)
        handler = getattr(receiver, "_handle_rtcp_packet", None)
        if mapper is None or handler is None:
            break
        clock.mapper = mapper

        async def on_rtcp(packet, handler=handler):
            if isinstance(packet, RtcpSrPacket):
                clock.report(packet.sender_info.ntp_timestamp, packet.sender_info.rtp_timestamp)
            await handler(packet)

        receiver._handle_rtcp_packet = on_rtcp
        return True
    logger.warning("aiortc's RTCP sender reports of the %s track not found: video and voice paired as they started",
                   track.kind)
    return False


class FramePairing:
    """Pairs each received video frame with the 40 ms of received voice that belongs to it.

    Both streams keep their own RTP clock (video 90 kHz, a frame every 3600; voice 48 kHz Opus, a packet every 960),
    so within a stream frames are placed exactly by their timestamps; what is missing is where one clock stands on
    the other, ``offset``: the voice of the frame stamped ``v`` starts at voice timestamp
    ``v * 48000 / 90000 + offset``. The server's frames and voice are made of whole 40 ms chunks and start with
    the same one, so the offset is :attr:`phase` (Opus' look-ahead: the decoded voice is 312 samples, 6.5 ms, late)
    plus whole frames: none as the streams start, a few after packets lost at the start or voice the server
    dropped when it could not send it. The whole frames come from the server's RTCP sender reports, which place
    both clocks on its wall clock: the median of the last reports' (video base - voice base), plus
    :attr:`send_lag` (a voice packet leaves one packet after the frame it came with, and the decoded voice is
    late: 24 ms measured), rounded to whole frames. So each frame's voice is exact to the sample while the reports
    are right within 20 ms (on loopback they were within 6 ms).

    A frame is handed over (``emit``) once the voice up to its end has arrived, or after :attr:`max_hold` seconds
    (the missing voice as silence): the video waits as long as its voice is behind it. Voice arriving for a frame
    already handed over is dropped; lost voice packets are silence.
    """

    VOICE_RATE = 48_000
    VIDEO_RATE = 90_000

    def __init__(self, out_rate: int, emit: Callable[[AvatarFrame], None], phase: int = 312, send_lag: int = 1156,
                 max_hold: float = 0.25):
        self.video = SenderClock(self.VIDEO_RATE, self._on_report)
        self.audio = SenderClock(self.VOICE_RATE, self._on_report)
        self.phase = phase
        self.send_lag = send_lag
        self.max_hold = max_hold
        self.per_frame = self.VOICE_RATE // FPS                       # 1920 voice samples a frame
        self.offset = phase
        self._emit = emit
        self._chunker = VoiceChunker(self.VOICE_RATE, out_rate)
        self._frames: collections.deque[tuple[int, np.ndarray, float]] = collections.deque()  # (pts, image, arrived)
        self._voice: dict[int, np.ndarray] = {}                      # voice packets by timestamp (48 kHz mono)
        self._voice_end = 0                                          # one past the newest voice sample
        self._bases: collections.deque[float] = collections.deque(maxlen=9)
        self.count = 0

    # ------------------------------------------------------------------ input
    def add_video(self, pts: int, image: np.ndarray, now: float) -> None:
        self.video.latest = max(self.video.latest, pts)
        self._frames.append((pts, image, now))
        self.drain(now)

    def add_voice(self, pts: int, samples: np.ndarray, now: float) -> None:
        self.audio.latest = max(self.audio.latest, pts)
        self._voice[pts] = samples
        self._voice_end = max(self._voice_end, pts + len(samples))
        self.drain(now)

    # ------------------------------------------------------------------ pairing
    @property
    def paired_by_reports(self) -> int:
        """How many report pairs the offset was estimated from (0: the start's, :attr:`phase`)."""
        return len(self._bases)

    def _on_report(self) -> None:
        if self.video.base is None or self.audio.base is None:
            return
        self._bases.append((self.video.base - self.audio.base) * self.VOICE_RATE)
        estimate = statistics.median(self._bases) + self.send_lag
        self.offset = self.phase + self.per_frame * round((estimate - self.phase) / self.per_frame)

    def drain(self, now: float) -> None:
        """Hand over every frame whose voice is complete (or that waited too long)."""
        while self._frames:
            pts, image, arrived = self._frames[0]
            start = int(round(pts * self.VOICE_RATE / self.VIDEO_RATE)) + self.offset
            if self._voice_end < start + self.per_frame and now - arrived < self.max_hold:
                return
            self._frames.popleft()
            self._emit(AvatarFrame(self.count, image, self._chunker.take(self._cut(start))))
            self.count += 1

    def _cut(self, start: int) -> np.ndarray:
        """Voice samples [start, start + 1920) from the packets held (silence where none), dropping older ones."""
        out = np.zeros(self.per_frame, np.int16)
        end = start + self.per_frame
        for pts in sorted(self._voice):
            samples = self._voice[pts]
            if pts + len(samples) <= start:
                del self._voice[pts]
                continue
            if pts >= end:
                break
            lo, hi = max(pts, start), min(pts + len(samples), end)
            out[lo - start:hi - start] = samples[lo - pts:hi - pts]
        return out


class RemoteAvatar(AvatarBackend):
    """A session of a running ``edtalk-live serve`` at ``server``: speech up its pushed-speech WebSocket, the avatar
    and its voice back over WebRTC, paired by :class:`FramePairing`. ``options`` are the session's (``avatar``,
    ``emotion``, ``pose``, ...; ``input`` is ``push``); ``token`` when the server has a token secret."""

    def __init__(self, server: str, options: dict[str, Any] | None = None, token: str | None = None,
                 connect_timeout: float = 20.0):
        self.base = server.rstrip("/")
        self.options = dict(options or {})
        self.token = token
        self.connect_timeout = connect_timeout
        self.session = ""
        self.delay_ms: float | None = None
        self.pairing: FramePairing | None = None
        self._rate = SAMPLE_RATE
        self._resamplers: dict[int, av.AudioResampler] = {}
        self._pc = None
        self._http = None
        self._ws = None
        self._tasks: list[asyncio.Task] = []
        self._frames: asyncio.Queue[AvatarFrame | None] = asyncio.Queue()
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._closed = False

    async def open(self, out_rate: int) -> None:
        import aiohttp

        from edtalk_live.realtime.audio_in import shorten_audio_buffer
        from edtalk_live.realtime.client import bearer, negotiate, peer_connection, server_config, skip_lost_video

        self._rate = out_rate
        self.pairing = pairing = FramePairing(out_rate, self._put_frame)
        headers = bearer(self.token)
        pc = self._pc = peer_connection(await server_config(self.base, headers))
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio":
                shorten_audio_buffer(pc, track, 1)
                watch_sender_reports(pc, track, pairing.audio)
                self._tasks.append(asyncio.ensure_future(self._read_voice(track)))
            else:
                skip_lost_video(pc, track)
                watch_sender_reports(pc, track, pairing.video)
                self._tasks.append(asyncio.ensure_future(self._read_video(track)))

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed") and not self._closed:
                logger.warning("the avatar server connection is %s", pc.connectionState)
                self._end_streams()

        try:
            body = await negotiate(pc, self.base, {**self.options, "input": "push"}, headers, self.connect_timeout)
            self.session = body.get("session", "")
            self.delay_ms = body.get("delay_ms")
            self._http = aiohttp.ClientSession()
            try:
                self._ws = await self._http.ws_connect(f"{self.base}/sessions/{self.session}/speech?rate={out_rate}",
                                                       headers=headers, timeout=aiohttp.ClientWSTimeout(ws_close=5))
                ready = await asyncio.wait_for(self._ws.receive(), self.connect_timeout)
            except aiohttp.ClientResponseError as e:
                raise EDTalkError(f"the server refused the speech socket of session {self.session[:8]} "
                                  f"({e.status}): {e.message}") from None
            except (aiohttp.ClientError, TimeoutError) as e:
                raise EDTalkError(f"cannot open the speech socket at {self.base}: {e}") from None
            if ready.type != aiohttp.WSMsgType.TEXT or json.loads(ready.data).get("type") != "ready":
                raise EDTalkError(f"the speech socket at {self.base} did not say ready: {ready.data!r:.200}")
            self._tasks.append(asyncio.ensure_future(self._read_socket()))
        except BaseException:
            await self.close()
            raise
        logger.info("avatar session %s at %s open (delay %s ms)", self.session[:8], self.base, self.delay_ms)

    # ------------------------------------------------------------------ speech up
    async def push(self, samples: np.ndarray, rate: int) -> None:
        if rate != self._rate:
            resampler = self._resamplers.get(rate)
            if resampler is None:
                resampler = self._resamplers[rate] = av.AudioResampler(format="s16", layout="mono", rate=self._rate)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.int16).reshape(1, -1),
                                               format="s16", layout="mono")
            frame.sample_rate = rate
            parts = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            samples = np.concatenate(parts) if parts else np.zeros(0, np.int16)
        if len(samples):
            await self._send(np.ascontiguousarray(samples, "<i2").tobytes())

    async def end(self) -> None:
        await self._send(json.dumps({"type": "end"}))

    async def clear(self) -> None:
        await self._send(json.dumps({"type": "interrupt"}))

    async def _send(self, data: bytes | str) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            raise EDTalkError(f"the speech socket of session {self.session[:8] or '?'} is closed")
        await (ws.send_bytes(data) if isinstance(data, bytes) else ws.send_str(data))

    async def _read_socket(self) -> None:
        import aiohttp

        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                event = json.loads(msg.data)
            except ValueError:
                continue
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "error":
                logger.warning("avatar session %s: %s", self.session[:8], event.get("error"))
            elif kind in ("playback_started", "playback_finished"):
                self._events.put_nowait(event)
        if not self._closed:
            logger.warning("avatar session %s: the server closed the speech socket", self.session[:8])
            self._end_streams()

    # ------------------------------------------------------------------ media down
    async def _read_video(self, track) -> None:
        def add(frame) -> None:
            self.pairing.add_video(int(frame.pts), frame.to_ndarray(format="rgb24"), time.monotonic())

        await each_frame(track, add, "video frame")

    async def _read_voice(self, track) -> None:
        def add(frame) -> None:
            pts = int(round(frame.pts * frame.time_base * FramePairing.VOICE_RATE))
            x = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1)
            if frame.sample_rate != FramePairing.VOICE_RATE:         # (Opus is always 48 kHz)
                x = np.interp(np.arange(round(len(x) * FramePairing.VOICE_RATE / frame.sample_rate)),
                              np.arange(len(x)) * FramePairing.VOICE_RATE / frame.sample_rate, x)
            self.pairing.add_voice(pts, x.round().astype(np.int16), time.monotonic())

        await each_frame(track, add, "voice frame")

    def _put_frame(self, frame: AvatarFrame) -> None:
        if self._frames.qsize() >= FRAME_QUEUE:
            self._frames.get_nowait()
        self._frames.put_nowait(frame)

    def _end_streams(self) -> None:
        self._frames.put_nowait(None)
        self._events.put_nowait(None)

    async def frames(self) -> AsyncIterator[AvatarFrame]:
        while (frame := await self._frames.get()) is not None:
            yield frame

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        while (event := await self._events.get()) is not None:
            yield event

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._http is not None:
            await self._http.close()
        if self._pc is not None:
            with contextlib.suppress(Exception):
                await self._pc.close()
        self._end_streams()


# ================================================================================================ the service


class EdTalkVideoService(AIService):
    """The avatar as a Pipecat video service (see the module): TTS audio in; per video frame an image and its 40 ms
    of voice out, in sync, at 25 fps, idle frames between utterances.

    Give one of ``engine`` (an :class:`~edtalk_live.realtime.engine.AvatarEngine` in this process, shared by any
    number of services), ``server`` (the URL of a running ``edtalk-live serve``; ``token`` when it has a token
    secret) or ``backend`` (an :class:`AvatarBackend`). ``options``: the session's (``avatar``, ``emotion``,
    ``intensity``, ``pose``, ...). ``sync_with_audio`` (default) has the output transport show each image when the
    audio before it has played (pipecat's ``OutputImageRawFrame.sync_with_audio``; leave the transport's
    ``video_out_is_live`` off); False sends the images as they come, for a live video output. ``EndFrame`` lets
    the speech pushed so far play to its end (at most ``end_timeout`` seconds); ``CancelFrame`` stops at once.

    Events: ``on_playback_started(service, event)`` when an utterance starts to play,
    ``on_playback_finished(service, event)`` when it has played (``event["position"]``: seconds played,
    ``event["interrupted"]``).
    """

    def __init__(self, *, engine: AvatarEngine | None = None, server: str | None = None,
                 backend: AvatarBackend | None = None, options: dict[str, Any] | None = None,
                 token: str | None = None, sync_with_audio: bool = True, connect_timeout: float = 20.0,
                 end_timeout: float = 30.0, **kwargs):
        kwargs.setdefault("settings", ServiceSettings(model=None))
        super().__init__(**kwargs)
        given = [x for x in (engine, server, backend) if x is not None]
        if len(given) != 1:
            raise InputError("EdTalkVideoService needs one of engine= (in this process), server= (a running "
                             f"edtalk-live server) or backend=; got {len(given)}")
        if backend is None:
            backend = (LocalAvatar(engine, options) if engine is not None else
                       RemoteAvatar(server, options, token=token, connect_timeout=connect_timeout))
        self.backend = backend
        self.sync_with_audio = sync_with_audio
        self.end_timeout = end_timeout
        self.frames_out = 0
        self._opened = False
        self._dropping = False            # TTS audio came while not open (said once)
        self._open_error: BaseException | None = None
        self._out_rate = 24_000
        self._tasks: list[asyncio.Task] = []
        self._utterance_open = False      # pushes go to an utterance not ended yet
        self._playing = 0                 # utterances pushed and not finished
        self._quiet = asyncio.Event()     # set when the last of them finished
        self._mute_until: float | None = None     # after an interruption: voice still on its way is silenced
        self._cleared = False             # ... until the backend said it stopped, and a silent frame came
        self._register_event_handler("on_playback_started")
        self._register_event_handler("on_playback_finished")

    def can_generate_metrics(self) -> bool:
        return True

    # ------------------------------------------------------------------ life cycle
    async def setup(self, setup: FrameProcessorSetup):
        await super().setup(setup)
        self._out_rate = setup.audio_out_sample_rate
        try:
            await self.backend.open(self._out_rate)
            self._opened = True
        except Exception as e:  # noqa: BLE001 - reported as the pipeline starts
            self._open_error = e
            logger.error("the avatar could not open: %s", e)

    async def start(self, frame: StartFrame):
        await super().start(frame)
        if self._open_error is not None:
            await self.push_error(error_msg=f"the avatar could not open: {self._open_error}",
                                  exception=self._open_error)
            return
        if self._opened and not self._tasks:
            self._tasks = [self.create_task(self._emit_frames(), "edtalk-frames"),
                           self.create_task(self._read_events(), "edtalk-events")]

    async def stop(self, frame: EndFrame):
        """A graceful end: what was pushed plays to its end first (at most ``end_timeout`` seconds)."""
        await super().stop(frame)
        if self._opened and self._tasks and self._playing:
            self._quiet.clear()
            if self._utterance_open:
                self._utterance_open = False
                await self._call_backend(self.backend.end())
            if self._playing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._quiet.wait(), self.end_timeout)
        await self._close()

    async def cancel(self, frame: CancelFrame):
        await super().cancel(frame)
        await self._close()

    async def cleanup(self):
        await super().cleanup()
        await self._close()

    async def _close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            await self.cancel_task(task)
        if self._opened:
            self._opened = False
            await self.backend.close()

    # ------------------------------------------------------------------ frames in
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._speak(frame)
        elif isinstance(frame, TTSStoppedFrame) and direction == FrameDirection.DOWNSTREAM:
            if self._opened and self._utterance_open:       # not passed on: the avatar's voice is still to come
                self._utterance_open = False
                await self._call_backend(self.backend.end())
        elif isinstance(frame, InterruptionFrame):
            await self._interrupt()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _speak(self, frame: TTSAudioRawFrame) -> None:
        if not self._opened:
            if not self._dropping:
                self._dropping = True
                logger.warning("the avatar is not open: its TTS audio is dropped")
            return
        samples = to_mono_int16(frame.audio, frame.num_channels)
        if not len(samples):
            return
        if not self._utterance_open:
            self._utterance_open = True
            self._playing += 1
            await self.start_ttfb_metrics()
        await self._call_backend(self.backend.push(samples, frame.sample_rate))

    async def _interrupt(self) -> None:
        if not self._opened:
            return
        if self._playing:                   # frames already on their way still speak: silence them
            self._mute_until = time.monotonic() + MAX_MUTE_S
            self._cleared = False
        self._utterance_open = False
        await self._call_backend(self.backend.clear())

    async def _call_backend(self, call) -> None:
        try:
            await call
        except (EDTalkError, ConnectionError) as e:
            await self.push_error(error_msg=f"the avatar: {e}", exception=e)

    # ------------------------------------------------------------------ frames out
    async def _emit_frames(self) -> None:
        async for f in self.backend.frames():
            voice = f.voice
            if self._mute_until is not None:
                silent = int(np.abs(voice.astype(np.int32)).max(initial=0)) < SILENT_PEAK
                if (self._cleared and silent) or time.monotonic() > self._mute_until:
                    self._mute_until = None
                else:
                    voice = np.zeros_like(voice)
            height, width = f.image.shape[:2]
            image = OutputImageRawFrame(image=np.ascontiguousarray(f.image, np.uint8).tobytes(),
                                        size=(width, height), format="RGB")
            image.sync_with_audio = self.sync_with_audio
            await self.push_frame(image)
            await self.push_frame(SpeechOutputAudioRawFrame(audio=voice.tobytes(), sample_rate=self._out_rate,
                                                            num_channels=1))
            self.frames_out += 1
        if self._opened:
            await self.push_error(error_msg="the avatar's session ended")

    async def _read_events(self) -> None:
        async for event in self.backend.events():
            kind = event.get("type")
            if kind == "playback_started":
                await self.stop_ttfb_metrics()
                await self._call_event_handler("on_playback_started", event)
            elif kind == "playback_finished":
                self._playing = max(0, self._playing - 1)
                if not self._playing:
                    self._quiet.set()
                if event.get("interrupted"):
                    self._cleared = True
                await self._call_event_handler("on_playback_finished", event)
