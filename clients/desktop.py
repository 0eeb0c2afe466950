"""The desktop client: a microphone in, the avatar out to a window or a virtual camera, the voice to a speaker.

    edtalk-live client --mic [--mic-device DEV] [--speaker DEV] [--show] [--virtual-camera [DEVICE]]
        [--voice-delay MS] [--duration S] [--probe]

The microphone (:class:`~edtalk_live.clients.sound.MicrophoneTrack`, a sounddevice input callback) is sent to
the server as the session's speech; the returned voice plays through a small jitter buffer
(:class:`~edtalk_live.clients.sound.VoiceBuffer`) on the chosen output device; the avatar is shown in a
window and/or sent to a virtual camera at 25 fps (:mod:`edtalk_live.clients.video_out`), so a video-call app
sees the avatar as a camera and hears the voice from the output device (routed to it as a microphone, e.g.
through a loopback device). ``--audio FILE`` sends a file instead of the microphone.

The voice and the avatar leave the server in sync, and stay so here: each frame is held as long as the voice
that came with it waits in the jitter buffer and the output device (measured as it plays). ``voice_delay_ms``
shifts them: positive plays the voice that much later (the buffer's target grows), negative shows the video
that much later, e.g. to make up for a video-call app that delays the camera more than the microphone.

Every ``report_every`` seconds, and at the end, the client measures (all on this machine's clock):

- **voice round trip**: from a sound at the microphone (the converter) to the same sound at the speaker,
  by cross-correlating what was captured with what was played (needs sound at the microphone);
- **video latency**: from the microphone to the frame on screen (or at the camera), counted from the last
  audio sample the frame shows, as ``benchmarks.latency`` does. Exact with ``--probe`` (the server paints
  each frame's index; :mod:`edtalk_live.realtime.probe`): frame ``i`` shows the session's samples
  ``[640 i, 640 (i + 1))`` and the server's ``audio_anchor`` says which captured sample is session sample 0.
  Without probe it is estimated (below);
- **A/V offset**: a frame on screen minus its first sample at the speaker (positive: the video is late).
  With ``--probe``: the frame's video latency from its first sample minus the voice round trip. Without:
  the video's hold here (shown minus arrival) minus the voice's (played minus arrival), plus the server's
  own offset, taking the frame and its voice to arrive together (they leave the server together);
- frames shown per second, the voice buffer's level, underruns and skips, and the server's stats.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError

from edtalk_live.clients.sound import (
    RATE,
    MicrophoneTrack,
    SampleClock,
    Speaker,
    StreamHistory,
    VoiceBuffer,
    frame_samples,
)
from edtalk_live.clients.video_out import AvatarWindow, FrameOutput, VideoItem, VirtualCamera
from edtalk_live.edtalk.errors import InputError
from edtalk_live.edtalk.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from edtalk_live.realtime.audio_in import shorten_audio_buffer
from edtalk_live.realtime.client import (
    FileAudioTrack,
    bearer,
    each_frame,
    negotiate,
    peer_connection,
    server_config,
    skip_lost_video,
)
from edtalk_live.realtime.probe import read_index

logger = logging.getLogger(__name__)

#: seconds the file source sends silence after the file, so its voice comes back before the session ends
FILE_TAIL_S = 2.0
#: seconds of sound compared for the voice round trip, and the longest round trip looked for
ROUND_TRIP_WINDOW_S = 4.0
ROUND_TRIP_MAX_S = 3.0
#: voice packets aiortc's receiver holds back before handing one over (``shorten_audio_buffer``): the voice reaches
#: the client this many 20 ms packets after the frame that left the server with it
VOICE_PREFETCH = 1
VOICE_PTIME = 0.020
#: the longest a frame is held (seconds): the frame queues hold 3 s
MAX_HOLD_S = 2.5
#: the voice matches what was captured when their normalised correlation reaches this
MIN_VOICE_CORRELATION = 0.5
#: a latency outside this (seconds) is a misread probe index, left out
PLAUSIBLE_S = (0.0, 10.0)


@dataclass(frozen=True)
class DesktopOptions:
    """What ``edtalk-live client --mic`` (or ``--audio`` with a speaker, window or camera) was asked for."""

    server: str = "http://127.0.0.1:8080"
    token: str | None = None
    session: dict[str, Any] = field(default_factory=dict)  # session options: avatar, emotion, pose, probe
    audio: str | Path | None = None              # a file to send instead of the microphone
    mic_device: int | str | None = None          # sounddevice's index or (part of a) name; None: the default
    speaker: int | str | None = None
    play: bool = True                            # False: no speaker
    camera: bool = False
    camera_device: str | None = None             # pyvirtualcam's device name; None: the first that works
    camera_backend: str | None = None            # pyvirtualcam's backend name; None: any
    camera_size: tuple[int, int] | None = None   # None: the server's frame size
    voice_delay_ms: float = 0.0                  # + delays the voice, - holds the video back
    jitter_ms: float = 80.0                      # the voice buffer's target (before the voice delay)
    duration: float | None = None                # None: until stopped (a file: its length and a tail)
    report_every: float = 5.0
    connect_timeout: float = 20.0

    def __post_init__(self):
        if not 20 <= self.jitter_ms <= 1000:
            raise InputError(f"--jitter-ms must be from 20 to 1000, got {self.jitter_ms:g}")
        if abs(self.voice_delay_ms) > 2000:
            raise InputError(f"--voice-delay must be from -2000 to 2000 ms, got {self.voice_delay_ms:g}")
        if self.report_every <= 0:
            raise InputError(f"--report-every must be > 0, got {self.report_every:g}")
        if self.duration is not None and self.duration <= 0:
            raise InputError(f"--duration must be > 0, got {self.duration:g}")
        if self.camera_size is not None and min(self.camera_size) < 16:
            raise InputError(f"--camera-size must be at least 16x16, got {self.camera_size}")

    @property
    def probe(self) -> bool:
        return bool(self.session.get("probe"))


class FileSource(FileAudioTrack):
    """A file sent in real time as the microphone would be (16 kHz), with the microphone's clock and history."""

    rate = SAMPLE_RATE

    def __init__(self, samples: np.ndarray, tail_silence: float = FILE_TAIL_S):
        super().__init__(samples, tail_silence)
        self.clock = SampleClock(self.rate)
        self.history = StreamHistory(self.rate)
        self.first_sent: int | None = None
        self.finished = asyncio.Event()
        self.overruns = 0
        self.latency = 0.0

    def start(self) -> None:
        pass

    async def recv(self) -> av.AudioFrame:
        try:
            frame = await super().recv()
        except MediaStreamError:
            self.finished.set()
            raise
        self.clock.observe(time.monotonic(), frame.pts)        # recv() returns when the frame's first sample is due
        self.history.write(frame.pts, frame.to_ndarray().reshape(-1).astype(np.float32) / 32768.0)
        if self.first_sent is None:
            self.first_sent = frame.pts
        return frame


@dataclass
class Measurement:
    """One report: latencies in milliseconds (None: not measurable in that window)."""

    at_s: float                                   # seconds since the session connected
    voice_round_trip_ms: float | None = None      # microphone -> speaker (converter to converter)
    voice_correlation: float = 0.0
    video_latency_ms: float | None = None         # microphone -> frame shown, from the frame's last sample
    av_offset_ms: float | None = None             # frame shown - its voice played (+: video late)
    exact: bool = False                           # probe measurement (False: video latency and offset estimated)
    fps: float | None = None                      # frames shown (camera: sent) per second
    frames: int = 0                               # frames received so far
    voice_buffer_ms: float | None = None
    underruns: int = 0
    skipped_ms: float = 0.0
    mic_overruns: int = 0
    server: dict[str, Any] = field(default_factory=dict)


@dataclass
class DesktopReport:
    """What a desktop session measured: every periodic :class:`Measurement` and the final one."""

    session: str = ""
    delay_ms: float | None = None                 # the server's output delay (its answer)
    measurements: list[Measurement] = field(default_factory=list)
    final: Measurement | None = None
    frames: int = 0
    camera_frames: int = 0
    camera_fps: float | None = None
    camera_device: str = ""
    interrupted: bool = False

    def median(self, name: str) -> float | None:
        values = [getattr(m, name) for m in self.measurements if getattr(m, name) is not None]
        return statistics.median(values) if values else None


def _to_16k(x: np.ndarray, rate: int) -> np.ndarray:
    """Mono samples at ``rate`` (16 or 48 kHz, or any by interpolation) -> 16 kHz."""
    if rate == SAMPLE_RATE:
        return np.asarray(x, np.float64)
    if rate % SAMPLE_RATE == 0:
        f = rate // SAMPLE_RATE
        n = len(x) // f * f
        return np.asarray(x[:n], np.float64).reshape(-1, f).mean(axis=1)
    t = np.arange(int(len(x) * SAMPLE_RATE / rate)) * (rate / SAMPLE_RATE)
    return np.interp(t, np.arange(len(x)), x)


def _best_lag(received: np.ndarray, sent: np.ndarray, lo: int, hi: int) -> tuple[int, float]:
    """The lag ``L`` in ``[lo, hi]`` with ``received[j] ≈ sent[j - L]`` that correlates best, and its normalised
    correlation (1.0 for an exact copy)."""
    r, s = np.asarray(received, np.float64), np.asarray(sent, np.float64)
    n = 1 << int(math.ceil(math.log2(len(r) + len(s))))
    c = np.fft.irfft(np.fft.rfft(r, n) * np.conj(np.fft.rfft(s, n)), n)       # c[L mod n] = sum r[j] s[j - L]
    lags = np.arange(max(lo, -len(s) + 1), min(hi, len(r) - 1) + 1)
    if len(lags) == 0:
        return 0, 0.0
    lag = int(lags[int(np.argmax(c[lags % n]))])
    j0, j1 = max(0, lag), min(len(r), len(s) + lag)
    a, b = r[j0:j1], s[j0 - lag:j1 - lag]
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return lag, float(a @ b) / denom if denom > 0 else 0.0


def voice_round_trip(source_clock: SampleClock, source: StreamHistory, out_clock: SampleClock,
                     played: StreamHistory, now: float, window: float = ROUND_TRIP_WINDOW_S,
                     shortest: float = 0.0, longest: float = ROUND_TRIP_MAX_S) -> tuple[float, float] | None:
    """``(seconds, correlation)`` from a sound at the source to the same sound played, or None.

    The last ``window`` seconds played are cross-correlated with what the source captured from ``longest``
    seconds before them on (both at 16 kHz), over round trips from ``shortest`` to ``longest`` seconds (the
    server's delay is the shortest possible; a narrower range keeps a sound that repeats from matching its own
    repetition): played sample ``j`` carries captured sample ``j - lag``, so the round trip is the time between
    them. None while either is silent or they do not match (correlation below
    :data:`MIN_VOICE_CORRELATION`).
    """
    end = out_clock.position_at(now)
    if end is None:
        return None
    end = min(int(end), played.end)
    out0 = end - int(window * played.rate)
    t_out0 = out_clock.time_of(out0)
    src0 = source_clock.position_at(t_out0 - longest) if out0 >= 0 else None
    if src0 is None:
        return None
    src0 = int(src0)
    t_src0 = source_clock.time_of(src0)
    p = _to_16k(played.read(out0, end - out0), played.rate)
    s = _to_16k(source.read(src0, int((window + longest) * source.rate)), source.rate)
    if float(p @ p) < 1e-6 * len(p) or float(s @ s) < 1e-6 * len(s):
        return None
    offset = t_out0 - t_src0                    # round trip = offset + lag / 16 kHz
    lag, corr = _best_lag(p, s, math.ceil((shortest - offset) * SAMPLE_RATE),
                          math.floor((longest - offset) * SAMPLE_RATE))
    rt = offset + lag / SAMPLE_RATE
    if corr < MIN_VOICE_CORRELATION or not shortest <= rt <= longest:
        return None
    return rt, corr


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class DesktopClient:
    """One desktop session: :meth:`run` connects, streams until :meth:`request_stop`, the duration, or the file's
    end, and returns a :class:`DesktopReport`; ``on_report`` is called with each :class:`Measurement` as it is
    made. Outputs made by the caller (the window, which runs on the main thread) go in :attr:`outputs`."""

    def __init__(self, options: DesktopOptions, on_report: Callable[[Measurement], None] | None = None,
                 on_connected: Callable[[str], None] | None = None):
        self.options = options
        self.on_report = on_report
        self.on_connected = on_connected
        self.outputs: list[FrameOutput] = []
        self.report = DesktopReport()
        self.source: MicrophoneTrack | FileSource | None = None
        self.speaker: Speaker | None = None
        self.camera: VirtualCamera | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = threading.Event()
        self._shown: collections.deque = collections.deque(maxlen=60 * FPS)     # (shown, arrival, index)
        self._arrivals: collections.deque = collections.deque(maxlen=30 * FPS)  # frame arrivals
        self._voice_next = 0                                                    # timestamp the next voice frame
        self._voice_holds: collections.deque = collections.deque(maxlen=50)     # seconds from arrival to speaker
        self._pending_voice: collections.deque = collections.deque(maxlen=500)  # arrived, not played yet
        self._closing = False
        self._server: dict[str, Any] = {}
        self._stats_reply: asyncio.Future | None = None
        self._last_report = 0.0
        self._t0 = 0.0
        self._round_trips: collections.deque = collections.deque(maxlen=5)

    # ------------------------------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """End the session (thread-safe; the window calls it when closed)."""
        self._stop_requested.set()
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)

    def describe(self) -> str:
        """One line: the session, the server's delay, and the devices in use with their latencies."""
        src, spk, cam = self.source, self.speaker, self.camera
        parts = [f"session {self.report.session[:8] or '?'} (server delay {_ms(self.report.delay_ms)})"]
        if isinstance(src, MicrophoneTrack):
            parts.append(f"microphone {src.device_name} ({_ms(src.latency * 1000)})")
        elif src is not None:
            parts.append(f"sending {self.options.audio}")
        parts.append(f"speaker {spk.device_name} ({_ms(spk.latency * 1000)}, voice buffer "
                     f"{_ms(spk.buffer.target / RATE * 1000)})" if spk is not None else "no speaker")
        if cam is not None:
            parts.append(f"virtual camera {cam.device} {cam.width}x{cam.height}")
        if self.options.voice_delay_ms:
            parts.append(f"voice delay {_ms(self.options.voice_delay_ms, True)}")
        return "; ".join(parts)

    # ------------------------------------------------------------------------------------------ set-up

    def _open_source(self):
        o = self.options
        if o.audio is not None:
            from edtalk_live.media.io import load_audio

            return FileSource(load_audio(o.audio, SAMPLE_RATE))
        return MicrophoneTrack(o.mic_device)

    def _on_shown(self, item: VideoItem, t: float) -> None:
        self._shown.append((t, item.arrival, item.index))

    def _on_stats(self, message: str) -> None:
        try:
            reply = json.loads(message)
        except ValueError:
            return
        if isinstance(reply, dict) and reply.get("type") == "stats" and isinstance(reply.get("stats"), dict):
            self._server = reply["stats"]
            if self._stats_reply is not None and not self._stats_reply.done():
                self._stats_reply.set_result(None)

    async def _ask_stats(self, channel, timeout: float = 1.0) -> None:
        if channel.readyState != "open":
            return
        self._stats_reply = asyncio.get_running_loop().create_future()
        channel.send(json.dumps({"type": "stats"}))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stats_reply, timeout)

    # ------------------------------------------------------------------------------------------ media

    async def _read_voice(self, track, buffer: VoiceBuffer | None) -> None:
        resampler = [None]

        def add(frame) -> None:
            if buffer is not None:
                resampler[0] = self._voice_frame(frame, buffer, resampler[0])

        await each_frame(track, add, "voice frame")

    def _voice_frame(self, frame: av.AudioFrame, buffer: VoiceBuffer, resampler):
        """Put one received voice frame into the buffer; returns the resampler (made when first needed)."""
        now = time.monotonic()
        start = int(round(frame.pts * frame.time_base * RATE)) if frame.pts is not None else None
        if frame.sample_rate == RATE:
            samples = frame_samples(frame)
        else:                                        # not Opus's 48 kHz: resample (rare)
            resampler = resampler or av.AudioResampler(format="flt", layout="mono", rate=RATE)
            samples = np.concatenate([f.to_ndarray().reshape(-1) for f in resampler.resample(frame)] or
                                     [np.zeros(0, np.float32)])
        if start is None:                            # (aiortc stamps every frame)
            start = self._voice_next
        self._voice_next = start + len(samples)
        pos = buffer.write(start, samples)
        self._pending_voice.append((now, pos))
        self._note_voice_holds()
        return resampler

    def _note_voice_holds(self) -> None:
        """How long the voice waited from its arrival to the DAC, for the frames whose first sample has played."""
        spk = self.speaker
        pending = self._pending_voice
        if spk is None:
            pending.clear()
            return
        cursor = spk.buffer.cursor
        while pending and pending[0][1] < cursor:
            arrival, pos = pending.popleft()
            played = spk.played_at(pos)
            if played is not None:                  # None: skipped, or too far behind
                self._voice_holds.append(played - arrival)

    def video_hold(self) -> float:
        """Seconds a frame arriving now is held before it is shown: as long as its voice waits before it plays
        (the median over the last second of the voice's wait from its arrival; until then, what the buffer and the
        device add), plus the time its voice reaches the client after it (:data:`VOICE_PREFETCH`), less the voice
        delay (negative: the video waits longer)."""
        delay = self.options.voice_delay_ms / 1000
        spk = self.speaker
        if spk is None:
            return max(-delay, 0.0)
        holds = list(self._voice_holds)
        voice = statistics.median(holds) if holds else spk.buffer.target / RATE + spk.latency
        return min(max(voice + VOICE_PREFETCH * VOICE_PTIME - delay, 0.0), MAX_HOLD_S)

    async def _read_video(self, track, outputs: list[FrameOutput]) -> None:
        def add(frame) -> None:
            now = time.monotonic()
            self.report.frames += 1
            self._arrivals.append(now)
            image = frame.to_ndarray(format="rgb24")
            item = VideoItem(image, now, now + self.video_hold(), read_index(image) if self.options.probe else None)
            for out in outputs:
                out.put(item)
            if not outputs:                              # nothing shows it: count it as shown when due
                self._on_shown(item, item.due)

        await each_frame(track, add, "video frame")

    # ------------------------------------------------------------------------------------------ measuring

    def _source_time(self, client_sample: int) -> float | None:
        """When the source captured its 16 kHz sample ``client_sample`` (0: the first one sent)."""
        src = self.source
        if src is None or src.first_sent is None:
            return None
        return src.clock.time_of(src.first_sent + client_sample * src.rate // SAMPLE_RATE)

    def measure(self) -> Measurement:
        """A :class:`Measurement` of the frames shown since the last one (CPU work: call it off the loop)."""
        now = time.monotonic()
        since, self._last_report = self._last_report, now
        src, spk = self.source, self.speaker
        m = Measurement(at_s=round(now - self._t0, 2), frames=self.report.frames, server=dict(self._server),
                        exact=self.options.probe)
        rt = None
        if src is not None and spk is not None:
            # no round trip is shorter than the server's delay: the range leaves out a repeating sound's echoes
            delay = float(self._server.get("delay_ms") or self.report.delay_ms or 0.0) / 1000
            found = voice_round_trip(src.clock, src.history, spk.clock, spk.history, now, shortest=delay * 0.9,
                                     longest=delay + ROUND_TRIP_MAX_S / 2)
            if found is not None:
                rt, m.voice_correlation = found
                m.voice_round_trip_ms = round(rt * 1000, 1)
                self._round_trips.append(rt)
        if rt is None and self._round_trips:                # the last ones measured (e.g. a pause in speech)
            rt = statistics.median(self._round_trips)
        shown = [s for s in list(self._shown) if s[0] > since]
        anchor = self._server.get("audio_anchor")
        if self.options.probe:
            latencies, offsets = [], []
            for t, _, index in shown:
                if index is None or anchor is None:
                    continue
                k_end = SAMPLES_PER_FRAME * (index + 1) - int(anchor)
                t_end = self._source_time(k_end) if k_end > 0 else None
                if t_end is None or not PLAUSIBLE_S[0] < t - t_end < PLAUSIBLE_S[1]:
                    continue
                latencies.append(t - t_end)
                t_start = self._source_time(k_end - SAMPLES_PER_FRAME)
                if rt is not None and t_start is not None:
                    offsets.append(t - (t_start + rt))
            lat, off = _median(latencies), _median(offsets)
            m.video_latency_ms = None if lat is None else round(lat * 1000, 1)
            m.av_offset_ms = None if off is None else round(off * 1000, 1)
        elif spk is not None:
            video_hold = _median([t - arrival for t, arrival, _ in shown])
            voice_hold = _median(list(self._voice_holds))
            if video_hold is not None and voice_hold is not None:
                off = (video_hold - voice_hold - VOICE_PREFETCH * VOICE_PTIME
                       + (m.server.get("av_offset_ms") or 0.0) / 1000)
                m.av_offset_ms = round(off * 1000, 1)
                if rt is not None:
                    m.video_latency_ms = round((rt + off) * 1000 - 1000 / FPS, 1)
        m.fps = self._fps(since, now)
        if logger.isEnabledFor(logging.DEBUG):
            video, voice = _median([t - arrival for t, arrival, _ in shown]), _median(list(self._voice_holds))
            logger.debug("waits from arrival: video %s ms, voice %s ms; first sample sent %s, anchor %s",
                         None if video is None else round(video * 1000), None if voice is None else round(voice * 1000),
                         getattr(src, "first_sent", None), anchor)
        if spk is not None:
            m.voice_buffer_ms = round(spk.buffer.level / RATE * 1000, 1)
            m.underruns = spk.buffer.underruns
            m.skipped_ms = round(spk.buffer.skipped / RATE * 1000, 1)
        if src is not None:
            m.mic_overruns = src.overruns
        return m

    def _fps(self, since: float, now: float) -> float | None:
        shows = [o for o in self.outputs + ([self.camera] if self.camera else []) if o is not None]
        if shows:
            return shows[-1].fps(max(now - since, 1.0))
        times = [t for t in list(self._arrivals) if t > since]
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else None

    async def _report_loop(self, channel) -> None:
        while True:
            await asyncio.sleep(self.options.report_every)
            await self._ask_stats(channel)
            m = await asyncio.to_thread(self.measure)
            self.report.measurements.append(m)
            if self.on_report is not None:
                self.on_report(m)

    # ------------------------------------------------------------------------------------------ the session

    async def run(self) -> DesktopReport:
        o = self.options
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stop_requested.is_set():
            self._stop.set()
        base = o.server.rstrip("/")
        headers = bearer(o.token)
        config = await server_config(base, headers)
        tasks: list[asyncio.Task] = []
        pc = None
        channel = None
        outputs = list(self.outputs)
        try:
            # devices first: a wrong one fails before the server is asked for a session
            self.source = self._open_source()
            buffer = None
            if o.play:
                buffer = VoiceBuffer(int((o.jitter_ms + max(o.voice_delay_ms, 0.0)) / 1000 * RATE))
                self.speaker = Speaker(buffer, o.speaker)
            capacity = 3 * FPS                   # the hold: the voice's (about 0.2 s) and up to 2 s of delay
            if o.camera:
                side = int(config.get("size") or 256)
                width, height = o.camera_size or (side, side)
                self.camera = VirtualCamera(width, height, o.camera_device, o.camera_backend, capacity=capacity)
                self.report.camera_device = self.camera.device
                outputs.append(self.camera)
            for out in outputs:
                out.on_shown = out.on_shown or self._on_shown

            pc = peer_connection(config)
            pc.addTrack(self.source)
            pc.addTransceiver("video", direction="recvonly")
            channel = pc.createDataChannel("control")
            channel.on("message", self._on_stats)

            @pc.on("track")
            def on_track(track):
                if track.kind == "audio":
                    shorten_audio_buffer(pc, track, VOICE_PREFETCH)
                    tasks.append(asyncio.ensure_future(self._read_voice(track, buffer)))
                else:
                    skip_lost_video(pc, track)
                    tasks.append(asyncio.ensure_future(self._read_video(track, outputs)))

            @pc.on("connectionstatechange")
            async def on_state():
                if pc.connectionState in ("failed", "closed") and not self._closing:
                    logger.warning("the connection to %s is %s", base, pc.connectionState)
                    self._stop.set()

            self.source.start()
            body = await negotiate(pc, base, o.session, headers, o.connect_timeout)
            self.report.session = body.get("session", "")
            self.report.delay_ms = body.get("delay_ms")
            self._t0 = self._last_report = time.monotonic()
            if self.speaker is not None:
                self.speaker.start()
            if self.camera is not None:
                self.camera.start()
            if self.on_connected is not None:
                self.on_connected(self.describe())
            tasks.append(asyncio.create_task(self._report_loop(channel), name="desktop-reports"))
            waits = [asyncio.create_task(self._stop.wait())]
            if isinstance(self.source, FileSource):
                waits.append(asyncio.create_task(self.source.finished.wait()))
            try:
                await asyncio.wait(waits, timeout=o.duration, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:          # Ctrl-C: end the session and still report
                self.report.interrupted = True
                current = asyncio.current_task()
                if current is not None:
                    current.uncancel()
            finally:
                for w in waits:
                    w.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            tasks.clear()
            await self._ask_stats(channel)
            self.report.final = await asyncio.to_thread(self.measure)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._closing = True
            if pc is not None:
                with contextlib.suppress(Exception):
                    await pc.close()
            for part in (self.source, self.speaker):
                if part is not None:
                    part.stop()
            for out in outputs:
                out.stop()
        if self.camera is not None:
            self.report.camera_frames = self.camera.sent
            times = self.camera.sent_times
            if len(times) > 1:
                self.report.camera_fps = (len(times) - 1) / (times[-1] - times[0])
            if self.camera.error is not None:
                logger.warning("the virtual camera failed: %s", self.camera.error)
        return self.report


# ================================================================================================ reports


def _ms(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.0f} ms" if signed else f"{x:.0f} ms"


def format_measurement(m: Measurement) -> str:
    """One line: ``12.0 s: voice round trip 412 ms | video latency 380 ms, A/V offset +8 ms (probe) | ...``."""
    how = "probe" if m.exact else "estimate"
    s = m.server
    parts = [f"{m.at_s:6.1f} s: voice round trip {_ms(m.voice_round_trip_ms)}",
             f"video latency {_ms(m.video_latency_ms)}, A/V offset {_ms(m.av_offset_ms, True)} ({how})",
             f"{m.fps:.1f} fps" if m.fps is not None else "- fps"]
    if m.voice_buffer_ms is not None:
        parts.append(f"voice buffer {_ms(m.voice_buffer_ms)}, {m.underruns} underruns, {_ms(m.skipped_ms)} skipped")
    if s:
        parts.append(f"server: delay {_ms(s.get('delay_ms'))}, latency p50 {_ms(s.get('latency_ms_p50'))}, "
                     f"A/V {_ms(s.get('av_offset_ms'), True)}")
    return " | ".join(parts)


def format_summary(report: DesktopReport) -> str:
    """The end-of-session lines: medians over the session and totals."""
    f = report.final
    lines = [f"session {report.session[:8] or '?'}: {report.frames} frames received"
             + (", interrupted" if report.interrupted else "")]
    lines.append(f"voice round trip (microphone -> speaker): median {_ms(report.median('voice_round_trip_ms'))}; "
                 f"video latency: median {_ms(report.median('video_latency_ms'))}; "
                 f"A/V offset: median {_ms(report.median('av_offset_ms'), True)} "
                 f"({'probe' if f is not None and f.exact else 'estimate'})")
    if report.camera_device:
        fps = f"{report.camera_fps:.2f} fps" if report.camera_fps is not None else "- fps"
        lines.append(f"virtual camera {report.camera_device}: {report.camera_frames} frames, {fps}")
    if f is not None and f.voice_buffer_ms is not None:
        lines.append(f"voice: {f.underruns} underruns, {_ms(f.skipped_ms)} skipped")
    if f is not None and f.server:
        s = f.server
        lines.append(f"server: delay {_ms(s.get('delay_ms'))}, latency p50 {_ms(s.get('latency_ms_p50'))} "
                     f"p95 {_ms(s.get('latency_ms_p95'))}, A/V offset {_ms(s.get('av_offset_ms'), True)}, "
                     f"frames dropped {s.get('frames_dropped')}")
    return "\n".join(lines)


# ================================================================================================ command line


def _size(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--camera-size must be WIDTHxHEIGHT, e.g. 1280x720, got {text!r}") from None
    return w, h


def options_from_args(args) -> DesktopOptions:
    """The :class:`DesktopOptions` of ``edtalk-live client`` arguments."""
    from edtalk_live.clients.sound import device_arg

    session = {key: getattr(args, key) for key in ("avatar", "emotion", "pose") if getattr(args, key, None)}
    if getattr(args, "probe", False):
        session["probe"] = True
    speaker = getattr(args, "speaker", None)
    play = bool(args.mic) or speaker is not None
    if speaker is not None and speaker.lower() == "none":
        play, speaker = False, None
    camera = getattr(args, "virtual_camera", None)
    return DesktopOptions(
        server=args.server, token=args.token or os.environ.get("EDTALK_LIVE_TOKEN"), session=session,
        audio=None if args.mic else args.audio, mic_device=device_arg(args.mic_device),
        speaker=device_arg(speaker), play=play, camera=camera is not None, camera_device=camera or None,
        camera_backend=args.camera_backend, camera_size=_size(args.camera_size), voice_delay_ms=args.voice_delay,
        jitter_ms=args.jitter_ms, duration=args.duration, report_every=args.report_every)


def main_desktop(args) -> int:
    """``edtalk-live client --mic`` (or ``--audio`` with ``--speaker``, ``--show`` or ``--virtual-camera``)."""
    options = options_from_args(args)
    client = DesktopClient(options, on_report=lambda m: print(format_measurement(m), flush=True),
                           on_connected=lambda line: print(line, flush=True))
    if not args.show:
        report = asyncio.run(client.run())
    else:
        window = AvatarWindow(capacity=3 * FPS, on_close=client.request_stop)
        client.outputs.append(window)
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["report"] = asyncio.run(client.run())
            except BaseException as e:  # noqa: BLE001 - raised again on the main thread
                outcome["error"] = e
            finally:
                window.stop()

        worker = threading.Thread(target=work, name="desktop-client")
        worker.start()
        try:
            window.run()                    # the main thread: macOS draws windows only there
        except KeyboardInterrupt:
            pass
        finally:
            client.request_stop()
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        report = outcome["report"]
    print(format_summary(report), flush=True)
    return 0
