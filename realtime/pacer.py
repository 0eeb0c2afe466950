"""The session clock and the pacer: one frame and its 40 ms of voice to every output sink at their due time.

The clock: session time ``t`` runs from the session's start (``loop.time() - t0``). Incoming audio
sample ``n`` (16 kHz) is placed at session time ``n / 16000`` by its RTP timestamps (see
``realtime.session``). Video frame ``i`` shows the mouth of audio ``[640 i, 640 (i+1))`` and is
due at ``i * 40 ms + delay``; outgoing voice sample ``n`` is due at ``n / 16000 + delay``. With
one ``delay`` for both, lips and voice leave the server together and cannot drift apart, however
long the session: every timestamp derives from the audio sample clock, never from a frame count
that could slip. ``delay`` covers the mel look-ahead and smoothing (~170 ms) plus a render budget.

The :class:`Pacer` hands frame ``i`` with its voice to every sink (:mod:`edtalk_live.realtime.sinks`) at
``i/25 + delay``: a WebRTC peer's tracks, WHEP viewers, RTMP, a virtual camera all get the same chunks at
the same moments. Nothing here knows about networks.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edtalk_live.edtalk.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME
from edtalk_live.realtime.sinks import MediaChunk, Sink

logger = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
TICKS_PER_FRAME = VIDEO_CLOCK // FPS          # 3600
AUDIO_RATE = SAMPLE_RATE
AUDIO_PTIME = 0.020                           # 20 ms audio frames, as Opus sends them
AUDIO_SAMPLES = int(AUDIO_RATE * AUDIO_PTIME)  # 320


@dataclass
class TrackStats:
    """Counters of a session's output pacer (read by the session's stats and /metrics)."""

    sent: int = 0
    repeated: int = 0     # video: frame not ready at its due time, the last one was sent again
    skipped: int = 0      # frames jumped over because the pacer fell far behind the clock
    late_ms: list[float] = field(default_factory=list)   # how late each frame was handed to the sinks (bounded)

    def note_late(self, seconds: float) -> None:
        self.late_ms.append(seconds * 1000)
        if len(self.late_ms) > 512:
            del self.late_ms[:256]


class SessionClock:
    """Session time: ``now() = loop.time() - t0``; ``delay`` is the fixed output delay (seconds)."""

    def __init__(self, delay: float, time_fn: Callable[[], float] | None = None):
        self.delay = delay
        self._time = time_fn or asyncio.get_running_loop().time
        self.t0 = self._time()

    def now(self) -> float:
        return self._time() - self.t0

    def restart(self) -> None:
        """Start session time now (before any frame was sent: when the peer connects)."""
        self.t0 = self._time()

    def shift(self, seconds: float) -> None:
        """Move session time back by ``seconds`` (once, before the first speech: see ``Session.push_audio``).

        What is due later is sent later by as much: a one-time pause of both tracks.
        """
        self.t0 += seconds

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of session time (overridable for simulated clocks in tests)."""
        await asyncio.sleep(seconds)

    def video_due(self, index: int) -> float:
        """Session time at which video frame ``index`` is shown."""
        return index / FPS + self.delay

    def audio_due(self, sample: int) -> float:
        return sample / AUDIO_RATE + self.delay


#: the pacer jumps to the present when it falls more frames than this behind the clock (a stalled loop); less
#: behind, it hands the late chunks over at once, and each sink drops what it cannot use (WebRTC video: stale
#: frames; voice: nothing, so a short stall delays the voice instead of cutting it)
PACER_MAX_BEHIND = 5


class Pacer:
    """Hands frame ``i`` and its 40 ms of voice to every sink at session time ``i/25 + delay`` (:meth:`run`).

    ``frame_source(i)`` gives the uint8 RGB frame ``[H,W,3]`` rendered for index ``i``, or ``None`` when it is
    not ready: the previous frame goes again (counted as repeated). ``voice_source(start, n)`` gives ``n`` int16
    samples from ``start``. ``on_sent(i)`` is told as frame ``i`` leaves. The due time moves with the clock's
    delay (a render budget change): both pause, or jump ahead, together. Exceptions of the sources never end
    the output (the last good frame, silent, goes instead), nor does a sink's.
    """

    def __init__(self, clock: SessionClock, frame_source: Callable[[int], np.ndarray | None],
                 voice_source: Callable[[int, int], np.ndarray], idle_frame: np.ndarray,
                 on_sent: Callable[[int], None] | None = None, name: str = ""):
        self.clock = clock
        self._frame_source = frame_source
        self._voice_source = voice_source
        self._last = idle_frame
        self._on_sent = on_sent
        self.name = name
        self.sinks: list[Sink] = []
        self.stats = TrackStats()
        self.next_index = 0

    @property
    def next_sample(self) -> int:
        """First voice sample of the next chunk: what is before it has left."""
        return self.next_index * SAMPLES_PER_FRAME

    def step(self) -> MediaChunk:
        """The chunk due next (called at or after its due time), handed to every sink."""
        index = self.next_index
        behind = math.floor((self.clock.now() - self.clock.video_due(index)) * FPS)
        if behind > PACER_MAX_BEHIND:                       # far behind: jump to the present, never queue up
            index += behind
            self.stats.skipped += behind
        self.stats.note_late(max(0.0, self.clock.now() - self.clock.video_due(index)))
        self.next_index = index + 1
        try:
            image = self._frame_source(index)
            if image is None:
                self.stats.repeated += 1
                image = self._last
            else:
                self._last = image
            voice = np.asarray(self._voice_source(index * SAMPLES_PER_FRAME, SAMPLES_PER_FRAME), np.int16)
        except Exception:  # noqa: BLE001 - one failed frame must not end the output: the last good one, silent
            logger.exception("%s: frame %d failed; resending the last good frame", self.name, index)
            image, voice = self._last, np.zeros(SAMPLES_PER_FRAME, np.int16)
        chunk = MediaChunk(index, image, voice, due=self.clock.t0 + self.clock.video_due(index))
        if self._on_sent is not None:
            self._on_sent(index)
        self.stats.sent += 1
        for sink in self.sinks:
            try:
                sink.put(chunk)
            except Exception:  # noqa: BLE001 - a broken sink loses its own frames, not the others'
                logger.exception("%s: sink %s/%s failed to take frame %d", self.name, sink.kind, sink.name, index)
        return chunk

    async def run(self) -> None:
        """Hand over every chunk at its due time, until cancelled."""
        while True:
            wait = self.clock.video_due(self.next_index) - self.clock.now()
            if wait > 0:
                await self.clock.sleep(wait)
            self.step()
